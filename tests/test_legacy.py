"""Importer of official NVlabs pickles: exact tensors and outputs, and nothing from the file runs.

The official code cannot run here, so `write_official_pickle` builds a snapshot the way the
official tool pickles one: persistent objects reduce to
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, dicts are `dnnlib.util.EasyDict`,
tensors use torch's normal reduce. The two stand-in modules exist in `sys.modules` only while
writing.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from stylegan.errors import UserError
from stylegan.legacy import (
    discriminator_config_from_kwargs,
    generator_config_from_kwargs,
    load_network_pkl,
    read_pickle,
)
from stylegan.networks import Discriminator, DiscriminatorConfig, Generator, GeneratorConfig

G_CFG = GeneratorConfig(z_dim=8, w_dim=8, img_resolution=16, mapping_layers=2,
                        channel_base=128, channel_max=16, conv_clamp=256)
D_CFG = DiscriminatorConfig(img_resolution=16, channel_base=128, channel_max=16, conv_clamp=256,
                            mbstd_group_size=2)
SOURCE_TEXT = "# the official module source would be here; the importer must never run it\n"


# ----------------------------------------------------------------------------------------------
# Fixture writer


@contextlib.contextmanager
def official_modules():
    """Put stand-ins for `torch_utils.persistence` and `dnnlib.util` into sys.modules."""
    added = {}

    def reconstruct(meta):  # only ever called by a careless pickle.load, never here
        raise AssertionError("the stand-in reconstruct function must not be called")

    class EasyDict(dict):
        pass

    for name, attrs in (("torch_utils", {}), ("dnnlib", {}),
                        ("torch_utils.persistence", {"_reconstruct_persistent_obj": reconstruct}),
                        ("dnnlib.util", {"EasyDict": EasyDict})):
        module = types.ModuleType(name)
        for attr, value in attrs.items():
            value.__module__, value.__qualname__ = name, attr
            setattr(module, attr, value)
        assert name not in sys.modules
        added[name] = sys.modules[name] = module
    try:
        yield sys.modules["torch_utils.persistence"], EasyDict
    finally:
        for name in added:
            del sys.modules[name]


class Persistent:
    """Pickles exactly like an official persistent object."""

    def __init__(self, class_name: str, state: dict, reconstruct, *, src: str = SOURCE_TEXT):
        self.class_name, self.state = class_name, state
        self.reconstruct, self.src = reconstruct, src

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=self.src, class_name=self.class_name,
                    state=self.state)
        return (self.reconstruct, (meta,))


def persistent_tree(module: torch.nn.Module, persistence, easydict, *, class_name=None,
                    init_kwargs=None, src=SOURCE_TEXT) -> Persistent:
    """An official-style persistent object (recursively) holding `module`'s tensors and attrs."""
    od = collections.OrderedDict
    state = dict(
        training=False,
        _parameters=od(module._parameters),
        _buffers=od(module._buffers),
        _non_persistent_buffers_set=set(module._non_persistent_buffers_set),
        _backward_hooks=od(), _forward_hooks=od(), _forward_pre_hooks=od(),
        _state_dict_hooks=od(), _load_state_dict_pre_hooks=od(),
        _modules=od((k, persistent_tree(m, persistence, easydict, src=src))
                    for k, m in module._modules.items()),
        _init_args=(),
        _init_kwargs=easydict(init_kwargs or {}),
        act_gain=np.float64(np.sqrt(2)),  # numpy scalars, as official layers hold them
        weight_gain=np.float32(0.125),
    )
    for key, value in vars(module).items():
        if not key.startswith("_") and isinstance(value, (int, float, str, list, type(None))):
            state[key] = value
    name = class_name or type(module).__name__
    return Persistent(name, state, persistence._reconstruct_persistent_obj, src=src)


def ada_kwargs(cfg: GeneratorConfig, easydict) -> dict:
    """stylegan2-ada-pytorch layout: synthesis settings under `synthesis_kwargs`."""
    return dict(z_dim=cfg.z_dim, c_dim=cfg.c_dim, w_dim=cfg.w_dim,
                img_resolution=cfg.img_resolution, img_channels=cfg.img_channels,
                mapping_kwargs=easydict(num_layers=cfg.mapping_layers),
                synthesis_kwargs=easydict(channel_base=cfg.channel_base,
                                          channel_max=cfg.channel_max, num_fp16_res=4,
                                          conv_clamp=cfg.conv_clamp))


def stylegan3_repo_kwargs(cfg: GeneratorConfig, easydict) -> dict:
    """stylegan3-repo layout: synthesis settings flat among the kwargs."""
    return dict(z_dim=cfg.z_dim, w_dim=cfg.w_dim, mapping_kwargs=easydict(num_layers=np.int64(
        cfg.mapping_layers)), channel_base=cfg.channel_base, channel_max=cfg.channel_max,
        num_fp16_res=4, conv_clamp=np.float32(cfg.conv_clamp),
        fused_modconv_default="inference_only", c_dim=cfg.c_dim,
        img_resolution=cfg.img_resolution, img_channels=cfg.img_channels)


def d_kwargs(cfg: DiscriminatorConfig, easydict) -> dict:
    return dict(c_dim=cfg.c_dim, img_resolution=cfg.img_resolution,
                img_channels=cfg.img_channels, channel_base=cfg.channel_base,
                channel_max=cfg.channel_max, num_fp16_res=4, conv_clamp=cfg.conv_clamp,
                block_kwargs=easydict(freeze_layers=0),
                mapping_kwargs=easydict(num_layers=cfg.mapping_layers),
                epilogue_kwargs=easydict(mbstd_group_size=cfg.mbstd_group_size))


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Distinct random values in every tensor (filters excepted), so a swapped name shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not name.endswith("resample_filter"):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
    return module.eval()


def make_sources(g_cfg=G_CFG, d_cfg=D_CFG) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return dict(G=randomize(Generator(g_cfg), 1), G_ema=randomize(Generator(g_cfg), 2),
                D=randomize(Discriminator(d_cfg), 3))


def write_official_pickle(path: Path, sources: dict, *, style: str = "ada", protocol: int = 4,
                          src: str = SOURCE_TEXT, g_kwargs_hook=None) -> Path:
    """Pickle `sources` ({'G', 'G_ema', 'D'}: our modules) as an official snapshot would be."""
    with official_modules() as (persistence, easydict):
        snapshot = {}
        for key, module in sources.items():
            if key == "D":
                kwargs = d_kwargs(module.cfg, easydict)
            else:
                layout = ada_kwargs if style == "ada" else stylegan3_repo_kwargs
                kwargs = layout(module.cfg, easydict)
                if g_kwargs_hook is not None:
                    g_kwargs_hook(kwargs)
            snapshot[key] = persistent_tree(module, persistence, easydict, init_kwargs=kwargs,
                                            src=src)
        pipe = torch.nn.Module()
        pipe.register_buffer("p", torch.tensor(0.375))
        pipe.register_buffer("Hz_geom", torch.randn(12))
        snapshot["augment_pipe"] = persistent_tree(
            pipe, persistence, easydict, class_name="AugmentPipe",
            init_kwargs=dict(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1,
                             brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1))
        snapshot["training_set_kwargs"] = easydict(
            class_name="training.dataset.ImageFolderDataset", path="/data/naevi.zip",
            use_labels=False, max_size=120, xflip=False, resolution=16, random_seed=0)
        path.write_bytes(pickle.dumps(snapshot, protocol=protocol))
    return path


# ----------------------------------------------------------------------------------------------
# Faithful import


@pytest.mark.parametrize("style,protocol", [("ada", 3), ("stylegan3-repo", 4)])
def test_official_snapshot_loads_exactly(tmp_path, style, protocol):
    sources = make_sources()
    path = write_official_pickle(tmp_path / "snap.pkl", sources, style=style, protocol=protocol)
    assert {"torch_utils.persistence", "dnnlib.util"}.isdisjoint(sys.modules)
    nets = load_network_pkl(path)
    for key, source in sources.items():
        loaded, expected = nets[key].state_dict(), source.state_dict()
        assert loaded.keys() == expected.keys()
        for name in expected:
            assert torch.equal(loaded[name], expected[name]), f"{key}.{name}"
        assert not nets[key].training
    # Official configs pass num_fp16_res=4 (float32 on CPU anyway) and the given conv_clamp.
    assert nets["G"].cfg == GeneratorConfig(**{**G_CFG.__dict__, "num_fp16_res": 4})
    assert nets["D"].cfg == DiscriminatorConfig(**{**D_CFG.__dict__, "num_fp16_res": 4})
    z = torch.from_numpy(np.random.RandomState(5).randn(4, G_CFG.z_dim).astype(np.float32))
    with torch.no_grad():
        for key in ("G", "G_ema"):
            assert torch.equal(nets[key](z, None, noise_mode="const"), sources[key](z, None))
        img = sources["G"](z, None)
        assert torch.equal(nets["D"](img, None), sources["D"](img, None))
    assert nets["augment_pipe"] == dict(
        class_name="AugmentPipe", p=0.375,
        init_kwargs=dict(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1,
                         brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1))
    tsk = nets["training_set_kwargs"]
    assert type(tsk) is dict and tsk["path"] == "/data/naevi.zip" and tsk["max_size"] == 120


def test_conditional_snapshot_maps_embedding_and_projection(tmp_path):
    g_cfg = GeneratorConfig(**{**G_CFG.__dict__, "c_dim": 3})
    d_cfg = DiscriminatorConfig(**{**D_CFG.__dict__, "c_dim": 3, "mapping_layers": 2})
    sources = make_sources(g_cfg, d_cfg)
    nets = load_network_pkl(write_official_pickle(tmp_path / "c.pkl", sources))
    assert "mapping.embed.weight" in nets["G"].state_dict()
    assert "mapping.fc1.weight" in nets["D"].state_dict()
    z = torch.randn(2, 8)
    c = torch.eye(3)[[0, 2]]
    with torch.no_grad():
        assert torch.equal(nets["G_ema"](z, c), sources["G_ema"](z, c))
        img = sources["G"](z, c)
        assert torch.equal(nets["D"](img, c), sources["D"](img, c))


def test_snapshot_without_D_and_extras(tmp_path):
    sources = make_sources()
    del sources["D"]
    path = write_official_pickle(tmp_path / "g.pkl", sources)
    nets = load_network_pkl(path)
    assert nets["D"] is None and nets["G"] is not None


def test_architecture_mismatch_lists_names(tmp_path):
    # The kwargs claim a 3-layer mapping network; the tensors have 2 layers.
    path = write_official_pickle(
        tmp_path / "bad.pkl", make_sources(),
        g_kwargs_hook=lambda kw: kw["mapping_kwargs"].update(num_layers=3))
    with pytest.raises(UserError, match=r"missing: mapping\.fc2\.bias, mapping\.fc2\.weight"):
        load_network_pkl(path)


# ----------------------------------------------------------------------------------------------
# kwargs -> config


def test_generator_kwargs_both_layouts_and_defaults():
    ada = dict(z_dim=512, c_dim=0, w_dim=512, img_resolution=256, img_channels=3,
               mapping_kwargs=dict(num_layers=2, lr_multiplier=0.01, w_avg_beta=0.995),
               synthesis_kwargs=dict(channel_base=16384, channel_max=512, num_fp16_res=4,
                                     conv_clamp=256, fp16_channels_last=False))
    cfg = generator_config_from_kwargs(ada)
    assert (cfg.mapping_layers, cfg.channel_base, cfg.conv_clamp, cfg.w_avg_beta) == (
        2, 16384, 256, 0.995)
    flat = dict(z_dim=512, c_dim=0, w_dim=512, img_resolution=256, img_channels=3,
                mapping_kwargs=dict(num_layers=8), channel_base=32768, channel_max=512,
                fused_modconv_default="inference_only")
    cfg3 = generator_config_from_kwargs(flat)
    # Omitted kwargs take the stylegan3 repository's defaults there: fp16 x4, clamp 256.
    assert (cfg3.mapping_layers, cfg3.num_fp16_res, cfg3.conv_clamp) == (8, 4, 256)
    bare = dict(z_dim=4, c_dim=0, w_dim=4, img_resolution=8, img_channels=1, synthesis_kwargs={})
    assert generator_config_from_kwargs(bare).conv_clamp is None  # ada-pytorch default


def test_discriminator_kwargs():
    kw = dict(c_dim=2, img_resolution=64, img_channels=3, architecture="resnet",
              channel_base=16384, channel_max=256, num_fp16_res=0, conv_clamp=None,
              cmap_dim=32, block_kwargs=dict(freeze_layers=2),
              mapping_kwargs=dict(num_layers=1), epilogue_kwargs=dict(mbstd_group_size=8,
                                                                      mbstd_num_channels=2))
    cfg = discriminator_config_from_kwargs(kw)
    assert cfg == DiscriminatorConfig(c_dim=2, img_resolution=64, channel_base=16384,
                                      channel_max=256, cmap_dim=32, mapping_layers=1,
                                      mbstd_group_size=8, mbstd_num_channels=2)
    assert discriminator_config_from_kwargs(
        dict(c_dim=0, img_resolution=8, img_channels=3), repo="stylegan3").conv_clamp == 256
    # TF-converted snapshots give an unconditional D a moot mapping with lr_multiplier 0.1 ...
    tf_mapping = dict(num_layers=0, embed_features=None, layer_features=None,
                      activation="lrelu", lr_multiplier=0.1)
    unconditional = dict(c_dim=0, img_resolution=8, img_channels=3, mapping_kwargs=tf_mapping,
                         epilogue_kwargs=dict(mbstd_group_size=None, activation="lrelu"))
    assert discriminator_config_from_kwargs(unconditional).mbstd_group_size is None
    # ... which a conditional D would really use, and AnoStyle's D mapping runs at 0.01.
    with pytest.raises(UserError, match="lr_multiplier other than 0.01"):
        discriminator_config_from_kwargs({**unconditional, "c_dim": 2})


@pytest.mark.parametrize("kwargs,named", [
    (dict(synthesis_kwargs=dict(channel_base=1024, kernel_size=5)), "kernel_size"),
    (dict(synthesis_kwargs=dict(mystery_option=1)), "mystery_option=1"),
    (dict(mapping_kwargs=dict(activation="relu")), "activation"),
    (dict(magnitude_ema_beta=0.999), "StyleGAN3"),
])
def test_unknown_generator_kwargs_are_named(kwargs, named):
    base = dict(z_dim=4, c_dim=0, w_dim=4, img_resolution=8, img_channels=3)
    with pytest.raises(UserError, match=named):
        generator_config_from_kwargs({**base, **kwargs})


# ----------------------------------------------------------------------------------------------
# Refusals: nothing from the file is ever executed


class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_os_system_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G": _RunsShell(marker)}, protocol=4))
    with pytest.raises(UserError, match=r"evil\.pkl: it asks for (posix|os|nt)\.system"):
        load_network_pkl(path)
    assert not marker.exists()


def test_builtin_eval_is_refused(tmp_path):
    class Evaluates:
        def __reduce__(self):
            return (eval, ("1 + 1",))

    path = tmp_path / "eval.pkl"
    path.write_bytes(pickle.dumps([Evaluates()]))
    with pytest.raises(UserError, match=r"builtins\.eval, which AnoStyle never runs"):
        read_pickle(path)


def test_module_src_is_never_executed(tmp_path):
    marker = tmp_path / "src_ran"
    src = f"open({str(marker)!r}, 'w').write('x')\nimport os\nos.system('touch {marker}')\n"
    sources = make_sources()
    nets = load_network_pkl(write_official_pickle(tmp_path / "src.pkl", sources, src=src))
    assert nets["G"] is not None  # a valid snapshot: it loads, and its source stays unrun
    assert not marker.exists()


def test_tensorflow_pickle_is_refused(tmp_path):
    tflib = types.ModuleType("dnnlib.tflib.network")

    class Network:
        def __getstate__(self):
            return dict(version=4, name="G", static_kwargs={}, build_module_src="x = 1")

    Network.__module__, Network.__qualname__ = "dnnlib.tflib.network", "Network"
    tflib.Network = Network
    names = ("dnnlib", "dnnlib.tflib", "dnnlib.tflib.network")
    sys.modules.update({n: tflib if n.endswith("network") else types.ModuleType(n) for n in names})
    try:
        data = pickle.dumps((Network(), Network(), Network()), protocol=3)
    finally:
        for n in names:
            del sys.modules[n]
    path = tmp_path / "karras2019stylegan-ffhq-1024x1024.pkl"
    path.write_bytes(data)
    with pytest.raises(UserError, match="TensorFlow-era StyleGAN pickle"):
        load_network_pkl(path)


def test_stylegan3_network_is_refused(tmp_path):
    sources = make_sources()
    path = write_official_pickle(tmp_path / "sg3.pkl", sources)
    # Rename a submodule's class to the StyleGAN3 input layer by rewriting the pickle stream.
    raw = path.read_bytes()
    renamed = raw.replace(b"\x8c\x0eSynthesisBlock", b"\x8c\x0eSynthesisInput")
    assert renamed != raw
    path.write_bytes(renamed)
    with pytest.raises(UserError, match=r"StyleGAN3 \(-t/-r\) network"):
        load_network_pkl(path)


@pytest.mark.parametrize("content,message", [
    (b"just some text\n", "not a pickle"),
    (b"PK\x03\x04rest-of-a-zip", "zip archive"),
    (b"\x80\x04\x95", "truncated or damaged"),
    (b"\x80\x02P0\n.", "persistent ids"),
])
def test_unreadable_files_get_one_sentence(tmp_path, content, message):
    path = tmp_path / "x.pkl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_network_pkl(path)


def test_tensor_outside_its_storage_is_refused(tmp_path):
    class OutOfBounds:
        def __reduce__(self):
            storage = torch.zeros(4).storage()
            return (torch._utils._rebuild_tensor_v2,
                    (storage, 2, (100,), (1,), False, collections.OrderedDict()))

    path = tmp_path / "oob.pkl"
    path.write_bytes(pickle.dumps(OutOfBounds(), protocol=4))
    with pytest.raises(UserError, match="truncated or damaged"):
        read_pickle(path)


def test_truncated_snapshot(tmp_path):
    path = write_official_pickle(tmp_path / "t.pkl", make_sources())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or damaged"):
        load_network_pkl(path)


def test_numpy_object_scalar_is_refused(tmp_path):
    class ObjectScalar:
        def __reduce__(self):
            return (np._core.multiarray.scalar, (np.dtype("O"), b"\x00" * 8))

    path = tmp_path / "o.pkl"
    path.write_bytes(pickle.dumps(ObjectScalar(), protocol=3))
    with pytest.raises(UserError, match="numpy scalar of kind 'O'"):
        read_pickle(path)


def test_numpy_scalars_and_sets_read_as_plain_values(tmp_path):
    path = tmp_path / "s.pkl"
    value = [np.float64(0.5), np.float32(-2.25), np.int64(7), {1, 2}]
    path.write_bytes(pickle.dumps(value, protocol=3))  # protocol 3: sets via builtins.set
    assert read_pickle(path) == [0.5, -2.25, 7, {1, 2}]


def test_tensors_of_every_dtype_and_views_rebuild_exactly(tmp_path):
    # Each storage travels as a small legacy torch.save stream (torch.storage._load_from_bytes).
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {str(dtype): (base * 1.5 - 7).to(dtype) for dtype in (
        torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool)}
    tensors["view"] = base[1:, ::2].t()  # storage offset 6, strides (2, 6)
    tensors["parameter"] = torch.nn.Parameter(base[0].clone())
    path = tmp_path / "t.pkl"
    path.write_bytes(pickle.dumps(tensors, protocol=4))
    back = read_pickle(path)
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor.detach()), name
    assert back["view"].stride() == (2, 6) and back["view"].storage_offset() == 6
