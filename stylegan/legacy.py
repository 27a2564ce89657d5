"""Safe importer for official NVlabs StyleGAN2(-ADA) network pickles.

The networks are those of Karras et al. 2020, "Analyzing and Improving the Image Quality of
StyleGAN" and "Training Generative Adversarial Networks with Limited Data", as pickled by the
NVlabs stylegan2-ada-pytorch and stylegan3 repositories (`network-snapshot-*.pkl`). Such a file
carries the Python source of its classes and `pickle.load` would execute it. Here a restricted
unpickler resolves only the handful of globals those files need (see PICKLE_FORMAT.md) to safe
stand-ins: every persistent object becomes a plain `PersistentObject` record whose source text is
never read, tensors are rebuilt by torch, and everything else is refused. The records are then
mapped onto our own modules: constructor kwargs -> `GeneratorConfig` / `DiscriminatorConfig`,
state tree -> flat state dict -> `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from stylegan.errors import UserError
from stylegan.networks import Discriminator, DiscriminatorConfig, Generator, GeneratorConfig

# Keys of a snapshot dict that hold networks (in the order they are reported).
NETWORK_KEYS = ("G", "D", "G_ema")

# Defaults of the official constructors where the two repositories differ. They matter only
# for kwargs a snapshot leaves out (the training scripts normally pass all of them).
_REPO_DEFAULTS = {
    "stylegan2-ada-pytorch": dict(num_fp16_res=0, g_conv_clamp=None, d_conv_clamp=None),
    "stylegan3": dict(num_fp16_res=4, g_conv_clamp=256, d_conv_clamp=256),
}

# Class names and kwargs that only StyleGAN3 (-t / -r) networks have.
_STYLEGAN3_CLASSES = frozenset({"SynthesisInput"})
_STYLEGAN3_KWARGS = frozenset({
    "magnitude_ema_beta", "conv_kernel", "use_radial_filters", "channel_base_r", "num_critical",
    "first_cutoff", "first_stopband", "last_stopband_rel", "margin_size", "filter_size",
    "lrelu_upsampling",
})


@dataclass
class PersistentObject:
    """What an official persistent object (network, layer, AugmentPipe) is read as: data only."""

    class_name: str
    version: int
    state: dict = field(repr=False)

    def __setstate__(self, state: Any) -> None:  # a BUILD opcode aimed at a record
        raise pickle.UnpicklingError("a persistent object was given extra pickled state")


# ----------------------------------------------------------------------------------------------
# Safe stand-ins for the globals official pickles use.


def _persistent_record(meta: Any) -> PersistentObject:
    """Stand-in for `torch_utils.persistence._reconstruct_persistent_obj`: keep `meta` as data.

    `meta['module_src']` (the pickled source code) is deliberately never looked at.
    """
    if not isinstance(meta, dict):
        raise pickle.UnpicklingError("a persistent object without its meta dict")
    if meta.get("type") != "class":
        raise pickle.UnpicklingError(f"unknown persistent object type {meta.get('type')!r}")
    class_name, version, state = meta.get("class_name"), meta.get("version"), meta.get("state")
    if not isinstance(class_name, str) or not isinstance(version, int):
        raise pickle.UnpicklingError("a persistent object without class_name/version")
    if not isinstance(state, dict):
        raise pickle.UnpicklingError(f"persistent object {class_name} without a state dict")
    return PersistentObject(class_name=class_name, version=version, state=dict(state))


class _EasyDict(dict):
    """Stand-in for `dnnlib.util.EasyDict`: a plain dict."""

    def __setstate__(self, state: Any) -> None:
        if state:
            raise pickle.UnpicklingError("an EasyDict with extra pickled state")


def _load_storage(data: Any) -> torch.storage.TypedStorage:
    """Stand-in for `torch.storage._load_from_bytes`: a legacy `torch.save` stream of one storage.

    Decoded by torch's own restricted loader: `torch.load(..., weights_only=True)` reads these
    legacy (non-zip) streams of typed storages (checked on torch 2.13 for every dtype).
    """
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("a tensor storage that is not bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage deprecation notices
            storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- any failure means an unreadable storage
        raise pickle.UnpicklingError(f"an unreadable tensor storage ({exc})") from None
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"a storage stream that holds {type(storage).__name__}")
    return storage


def _check_ints(values: Any, what: str) -> None:
    if not isinstance(values, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise pickle.UnpicklingError(f"a tensor with a malformed {what}")


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None,
                    metadata=None) -> torch.Tensor:
    """Stand-in for `torch._utils._rebuild_tensor_v2`, checking every argument's type first."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError("a tensor whose storage is not a typed storage")
    if not isinstance(offset, int):
        raise pickle.UnpicklingError("a tensor with a malformed storage offset")
    _check_ints(size, "size")
    _check_ints(stride, "stride")
    if offset < 0 or len(size) != len(stride) or min((*size, *stride), default=0) < 0:
        raise pickle.UnpicklingError("a tensor with a negative size, stride or offset")
    # torch would silently grow the storage to fit; a real tensor lies inside its storage.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        numel = storage.size()
    if 0 not in size and last >= numel:
        raise pickle.UnpicklingError("a tensor that reaches beyond its storage")
    if hooks or metadata:  # real snapshots never carry hooks or tensor attributes
        raise pickle.UnpicklingError("a tensor with backward hooks or extra attributes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch._utils._rebuild_tensor_v2(
            storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict()
        )


def _rebuild_parameter(data, requires_grad=False, hooks=None) -> torch.Tensor:
    """Stand-in for `torch._utils._rebuild_parameter`: the parameter's data as a plain tensor."""
    if not isinstance(data, torch.Tensor) or hooks:
        raise pickle.UnpicklingError("a parameter that is not a plain tensor")
    return data


class _DtypeSpec:
    """Stand-in for `numpy.dtype` while unpickling: remembers the type code and byte order."""

    def __init__(self, code: Any, align: Any = False, copy: Any = True):
        if not isinstance(code, str) or len(code) > 4:
            raise pickle.UnpicklingError(f"an unexpected numpy dtype {code!r}")
        self.code, self.byteorder = code, "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "=", "|"):
            self.byteorder = state[1]

    def dtype(self) -> np.dtype:
        try:
            dtype = np.dtype(self.code)
        except TypeError:
            raise pickle.UnpicklingError(f"an unknown numpy dtype {self.code!r}") from None
        if dtype.kind not in "biufc":  # numbers only: never objects, strings or records
            raise pickle.UnpicklingError(f"a numpy scalar of kind {dtype.kind!r}")
        return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" else dtype


def _numpy_scalar(spec: Any, data: Any = None) -> Any:
    """Stand-in for `numpy.core.multiarray.scalar`: a number from its dtype and raw bytes."""
    if not isinstance(spec, _DtypeSpec) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("a numpy scalar that is not (dtype, bytes)")
    dtype = spec.dtype()
    if len(data) != dtype.itemsize:
        raise pickle.UnpicklingError("a numpy scalar with the wrong number of bytes")
    return np.frombuffer(data, dtype=dtype)[0].item()


_SAFE_GLOBALS: dict[tuple[str, str], Callable] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # Python <= 3.7 (pickle protocol 3) writes torch's `_non_persistent_buffers_set` this way.
    ("builtins", "set"): set,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _DtypeSpec,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `_SAFE_GLOBALS` and refuses every other global."""

    def __init__(self, file, *, name: str):
        super().__init__(file)
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        safe = _SAFE_GLOBALS.get((module, name))
        if safe is not None:
            return safe
        if module.startswith("dnnlib.tflib"):
            raise UserError(
                f"{self.name} is a TensorFlow-era StyleGAN pickle, which AnoStyle cannot read; "
                "convert it with stylegan2-ada-pytorch's legacy.py to a PyTorch pickle first."
            )
        if module.startswith("training.networks_stylegan3"):
            raise UserError(_stylegan3_message(self.name))
        raise UserError(
            f"refusing to load {self.name}: it asks for {module}.{name}, which AnoStyle never "
            "runs; use an official NVlabs network pickle or an AnoStyle checkpoint."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UserError(
            f"refusing to load {self.name}: it uses pickle persistent ids, which official "
            "network pickles never do."
        )


def _stylegan3_message(name: str) -> str:
    return (
        f"{name} holds a StyleGAN3 (-t/-r) network; AnoStyle implements StyleGAN2(-ADA) only, "
        "so use a StyleGAN2 snapshot (e.g. one trained with --cfg=stylegan2)."
    )


def read_pickle(path: str | os.PathLike) -> Any:
    """Unpickle an official snapshot into plain data (dicts, tensors, `PersistentObject`s).

    Nothing from the file is executed; a global outside the safe list raises `UserError`.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass the path of a network .pkl file.")
    with open(path, "rb") as f:
        head = f.read(9)
        f.seek(0)
        _check_magic(path, head)
        try:
            return _RestrictedUnpickler(f, name=path.name).load()
        except UserError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
                AttributeError, MemoryError, OverflowError, UnicodeDecodeError,
                RecursionError, RuntimeError) as exc:
            raise UserError(
                f"{path.name} is not a readable network pickle (truncated or damaged: {exc}); "
                "download or copy it again."
            ) from None


def _check_magic(path: Path, head: bytes) -> None:
    """Name the common wrong kinds of file before the unpickler sees them."""
    if head.startswith(b"PK"):
        what = "a zip archive (a torch.save file or a dataset)"
    elif len(head) == 9 and head[8:9] == b"{":  # u64 header length, then the JSON header
        what = "a safetensors file (an AnoStyle checkpoint; load it with load_network)"
    elif not head.startswith(b"\x80"):  # PROTO opcode: every pickle of protocol >= 2
        what = "not a pickle"
    else:
        return
    raise UserError(f"{path.name} is {what}, not an official network pickle.")


# ----------------------------------------------------------------------------------------------
# Constructor kwargs -> our configs.


def plain(value: Any) -> Any:
    """Recursively turn EasyDicts/OrderedDicts/tuples of unpickled data into plain dicts/lists."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, set):
        return sorted(plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _take(kwargs: dict, key: str, default: Any) -> Any:
    return kwargs.pop(key) if key in kwargs else default


def _require(kwargs: dict, key: str, expected: Any, *, where: str) -> None:
    """Pop `key`; a value other than `expected` means an architecture AnoStyle does not have."""
    if key in kwargs and kwargs.pop(key) != expected:
        raise UserError(
            f"the {where} was built with a {key} other than {expected!r}, which AnoStyle's "
            "networks do not implement."
        )


def _reject_leftovers(kwargs: dict, harmless: frozenset, *, where: str) -> None:
    unknown = sorted(k for k in kwargs if k not in harmless)
    if unknown:
        shown = ", ".join(f"{k}={kwargs[k]!r}" for k in unknown)
        raise UserError(
            f"the {where} was built with {shown}, which AnoStyle's networks do not implement; "
            "it is not a standard StyleGAN2-ADA network."
        )


_G_HARMLESS = frozenset({"fp16_channels_last", "fused_modconv_default"})
_MAPPING_HARMLESS = frozenset({"freeze_layers", "freeze_embed"})
_D_BLOCK_HARMLESS = frozenset({"fp16_channels_last", "freeze_layers"})


def generator_config_from_kwargs(kwargs: Mapping[str, Any], *, repo: str | None = None
                                 ) -> GeneratorConfig:
    """Official `Generator` constructor kwargs (either repository's layout) -> `GeneratorConfig`.

    `repo` selects the defaults for omitted kwargs; by default it is inferred from the layout
    (`synthesis_kwargs` dict: stylegan2-ada-pytorch; flat synthesis kwargs: stylegan3).
    """
    kw = plain(kwargs)
    stylegan3_keys = sorted(_STYLEGAN3_KWARGS & (set(kw) | set(kw.get("synthesis_kwargs") or {})))
    if stylegan3_keys:
        raise UserError(_stylegan3_message(f"the network (it has {stylegan3_keys[0]})"))
    repo = repo or ("stylegan2-ada-pytorch" if "synthesis_kwargs" in kw else "stylegan3")
    defaults = _REPO_DEFAULTS[repo]
    mapping = dict(_take(kw, "mapping_kwargs", None) or {})
    synthesis = dict(_take(kw, "synthesis_kwargs", None) or {})
    dims = {key: kw.pop(key) for key in ("z_dim", "c_dim", "w_dim", "img_resolution",
                                         "img_channels") if key in kw}
    synthesis.update(kw)  # stylegan3-repo layout: synthesis settings sit among the kwargs
    missing = {"z_dim", "c_dim", "w_dim", "img_resolution", "img_channels"} - set(dims)
    if missing:
        raise UserError(f"the Generator's constructor arguments lack {sorted(missing)}.")
    config = GeneratorConfig(
        **dims,
        mapping_layers=_take(mapping, "num_layers", 8),
        mapping_lr_multiplier=float(_take(mapping, "lr_multiplier", 0.01)),
        mapping_layer_features=_take(mapping, "layer_features", None),
        embed_features=_take(mapping, "embed_features", None),
        w_avg_beta=_w_avg_beta(_take(mapping, "w_avg_beta", 0.998)),
        channel_base=_take(synthesis, "channel_base", 32768),
        channel_max=_take(synthesis, "channel_max", 512),
        num_fp16_res=_take(synthesis, "num_fp16_res", defaults["num_fp16_res"]),
        conv_clamp=_take(synthesis, "conv_clamp", defaults["g_conv_clamp"]),
        architecture=_take(synthesis, "architecture", "skip"),
        resample_filter=tuple(_take(synthesis, "resample_filter", (1, 3, 3, 1))),
        use_noise=bool(_take(synthesis, "use_noise", True)),
    )
    _require(mapping, "activation", "lrelu", where="Generator mapping network")
    _reject_leftovers(mapping, _MAPPING_HARMLESS, where="Generator mapping network")
    _require(synthesis, "activation", "lrelu", where="Generator")
    _require(synthesis, "kernel_size", 3, where="Generator")
    _reject_leftovers(synthesis, _G_HARMLESS, where="Generator")
    return config


def _w_avg_beta(value: Any) -> float:
    if value is None:
        raise UserError("the Generator does not track the average W (w_avg_beta=None), which "
                        "AnoStyle's networks always do.")
    return float(value)


def discriminator_config_from_kwargs(kwargs: Mapping[str, Any], *,
                                     repo: str = "stylegan2-ada-pytorch") -> DiscriminatorConfig:
    """Official `Discriminator` constructor kwargs -> `DiscriminatorConfig`.

    `repo` ('stylegan2-ada-pytorch' | 'stylegan3') selects the defaults for omitted kwargs.
    """
    kw = plain(kwargs)
    defaults = _REPO_DEFAULTS[repo]
    block = dict(_take(kw, "block_kwargs", None) or {})
    mapping = dict(_take(kw, "mapping_kwargs", None) or {})
    epilogue = dict(_take(kw, "epilogue_kwargs", None) or {})
    missing = {"c_dim", "img_resolution", "img_channels"} - set(kw)
    if missing:
        raise UserError(f"the Discriminator's constructor arguments lack {sorted(missing)}.")
    if kw["c_dim"] == 0:  # no label mapping is built: its kwargs (e.g. TF-converted ones) are moot
        mapping = {}
    config = DiscriminatorConfig(
        c_dim=kw.pop("c_dim"),
        img_resolution=kw.pop("img_resolution"),
        img_channels=kw.pop("img_channels"),
        architecture=_take(kw, "architecture", "resnet"),
        channel_base=_take(kw, "channel_base", 32768),
        channel_max=_take(kw, "channel_max", 512),
        num_fp16_res=_take(kw, "num_fp16_res", defaults["num_fp16_res"]),
        conv_clamp=_take(kw, "conv_clamp", defaults["d_conv_clamp"]),
        cmap_dim=_take(kw, "cmap_dim", None),
        mapping_layers=_take(mapping, "num_layers", 8),
        mbstd_group_size=_take(epilogue, "mbstd_group_size", 4),
        mbstd_num_channels=_take(epilogue, "mbstd_num_channels", 1),
        resample_filter=tuple(_take(block, "resample_filter", (1, 3, 3, 1))),
    )
    _reject_leftovers(kw, frozenset(), where="Discriminator")
    for part, bucket in (("block", block), ("epilogue", epilogue), ("mapping", mapping)):
        _require(bucket, "activation", "lrelu", where=f"Discriminator {part}")
    for key, official_default in (("embed_features", None), ("layer_features", None),
                                  ("lr_multiplier", 0.01)):
        _require(mapping, key, official_default, where="Discriminator mapping network")
    _reject_leftovers(block, _D_BLOCK_HARMLESS, where="Discriminator block")
    _reject_leftovers(mapping, _MAPPING_HARMLESS, where="Discriminator mapping network")
    _reject_leftovers(epilogue, frozenset(), where="Discriminator epilogue")
    return config


# Official positional constructor arguments, for snapshots built with positional args.
_G_POSITIONAL = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels")
_D_POSITIONAL = ("c_dim", "img_resolution", "img_channels")


def init_kwargs(obj: PersistentObject, positional: tuple[str, ...]) -> dict:
    """The constructor kwargs recorded by the official `persistent_class` decorator."""
    args = list(obj.state.get("_init_args") or ())
    kwargs = dict(obj.state.get("_init_kwargs") or {})
    if len(args) > len(positional):
        raise UserError(f"the {obj.class_name} was built with unexpected positional arguments.")
    kwargs.update(zip(positional, args))
    return kwargs


# ----------------------------------------------------------------------------------------------
# State tree -> flat state dict -> our modules.


def flatten_state(obj: PersistentObject, prefix: str = "") -> dict[str, torch.Tensor]:
    """Name -> tensor for every parameter and persistent buffer in a persistent-object tree."""
    state = obj.state
    out: dict[str, torch.Tensor] = {}
    skip = set(state.get("_non_persistent_buffers_set") or ())
    tensors = list((state.get("_parameters") or {}).items())
    tensors += [(k, v) for k, v in (state.get("_buffers") or {}).items() if k not in skip]
    for name, tensor in tensors:
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise UserError(f"{prefix}{name} in the {obj.class_name} is not a tensor.")
        out[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, PersistentObject):
            raise UserError(f"submodule {prefix}{name} is not an official persistent object.")
        out.update(flatten_state(child, f"{prefix}{name}."))
    return out


def class_names(obj: PersistentObject) -> set[str]:
    """Every class name in a persistent-object tree."""
    names = {obj.class_name}
    for child in (obj.state.get("_modules") or {}).values():
        if isinstance(child, PersistentObject):
            names |= class_names(child)
    return names


def load_tensors(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], *, what: str
                 ) -> torch.nn.Module:
    """`load_state_dict(strict=True)` with a `UserError` that lists missing/unexpected names."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
                 for label, names in (("missing", missing), ("unexpected", unexpected),
                                      ("wrong shape", wrong)) if names]
        raise UserError(f"{what} does not match the network it describes ({'; '.join(parts)}).")
    module.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v
                            for k, v in tensors.items()}, strict=True)
    return module.eval().requires_grad_(False)


def _build_network(obj: Any, key: str, *, name: str, repo: str) -> torch.nn.Module | None:
    if obj is None:
        return None
    if not isinstance(obj, PersistentObject):
        raise UserError(f"{name}: '{key}' is not an official network object.")
    if class_names(obj) & _STYLEGAN3_CLASSES:
        raise UserError(_stylegan3_message(name))
    expected = "Discriminator" if key == "D" else "Generator"
    if obj.class_name != expected:
        raise UserError(f"{name}: '{key}' is a {obj.class_name}, expected a {expected}.")
    try:
        if key == "D":
            cfg = discriminator_config_from_kwargs(init_kwargs(obj, _D_POSITIONAL), repo=repo)
            module = Discriminator(cfg)
        else:
            cfg = generator_config_from_kwargs(init_kwargs(obj, _G_POSITIONAL), repo=repo)
            module = Generator(cfg)
    except UserError as exc:
        raise UserError(f"{name} ({key}): {exc}") from None
    return load_tensors(module, flatten_state(obj), what=f"{name} ({key})")


def _repo_style(snapshot: dict) -> str:
    """Which repository wrote the snapshot, judged from the Generator's kwargs layout."""
    for key in ("G_ema", "G"):
        obj = snapshot.get(key)
        if isinstance(obj, PersistentObject):
            kwargs = obj.state.get("_init_kwargs") or {}
            return "stylegan2-ada-pytorch" if "synthesis_kwargs" in kwargs else "stylegan3"
    return "stylegan2-ada-pytorch"


def describe_augment_pipe(obj: Any) -> dict | None:
    """An official AugmentPipe -> {'class_name', 'init_kwargs', 'p'} (plain data), or None."""
    if obj is None:
        return None
    if not isinstance(obj, PersistentObject):
        raise UserError("the snapshot's augment_pipe is not an official persistent object.")
    p = (obj.state.get("_buffers") or {}).get("p")
    return dict(
        class_name=obj.class_name,
        init_kwargs=plain(obj.state.get("_init_kwargs") or {}),
        p=float(p) if isinstance(p, torch.Tensor) else None,
    )


def load_network_pkl(path: str | os.PathLike) -> dict:
    """Read an official StyleGAN2(-ADA) snapshot into our modules without executing anything.

    Returns {'G', 'D', 'G_ema'} (our modules in eval mode, float32, CPU; None when absent),
    'augment_pipe' (None or plain dict with 'init_kwargs' and 'p') and 'training_set_kwargs'
    (plain dict or None).
    """
    path = Path(path)
    data = read_pickle(path)
    if not isinstance(data, dict) or not any(k in data for k in NETWORK_KEYS):
        raise UserError(
            f"{path.name} does not hold a network snapshot (expected a dict with G, D, G_ema)."
        )
    repo = _repo_style(data)
    out = {key: _build_network(data.get(key), key, name=path.name, repo=repo)
           for key in NETWORK_KEYS}
    out["augment_pipe"] = describe_augment_pipe(data.get("augment_pipe"))
    tsk = data.get("training_set_kwargs")
    out["training_set_kwargs"] = plain(tsk) if isinstance(tsk, dict) else None
    return out
