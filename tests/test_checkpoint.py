"""AnoStyle checkpoints: exact round trips, one-sentence refusals, weights_only training state."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_legacy import G_CFG, make_sources, write_official_pickle

from stylegan.checkpoint import (
    convert_pickle,
    describe_networks,
    load_network,
    load_networks,
    load_training_state,
    read_metadata,
    save_networks,
    save_training_state,
)
from stylegan.errors import UserError


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_round_trip_is_exact(tmp_path):
    sources = make_sources()
    extra = {"kimg": 12.5, "ada_p": 0.125, "options": {"cfg": "cpu", "gamma": 0.5}}
    path = save_networks(tmp_path / "network-snapshot-000012", **sources, extra=extra)
    assert path.name == "network-snapshot-000012.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp files left
    nets = load_networks(path)
    for key, source in sources.items():
        assert nets[key].cfg == source.cfg  # tuples survive JSON
        assert not nets[key].training
        assert_same_state(nets[key], source)
    assert nets["meta"]["extra"] == extra
    json_cfg = dataclasses.asdict(G_CFG) | {"resample_filter": [1, 3, 3, 1]}
    assert nets["meta"]["configs"]["G"] == json_cfg
    z = torch.randn(4, G_CFG.z_dim)
    with torch.no_grad():
        assert torch.equal(nets["G_ema"](z), sources["G_ema"](z))
        img = sources["G"](z)
        assert torch.equal(nets["D"](img), sources["D"](img))
    metadata = read_metadata(path)
    assert metadata["format"] == "anostyle-networks" and metadata["format_version"] == "1"


def test_partial_checkpoint_and_load_network_dispatch(tmp_path):
    sources = make_sources()
    path = save_networks(tmp_path / "g.safetensors", G_ema=sources["G_ema"],
                         extra={"augment_pipe": {"p": 0.5}})
    nets = load_network(path)
    assert nets["G"] is None and nets["D"] is None
    assert_same_state(nets["G_ema"], sources["G_ema"])
    assert nets["augment_pipe"] == {"p": 0.5} and nets["training_set_kwargs"] is None


def test_convert_official_pickle(tmp_path):
    sources = make_sources()
    pkl = write_official_pickle(tmp_path / "network-snapshot-000100.pkl", sources)
    written, found = convert_pickle(pkl, tmp_path / "out")
    assert written == tmp_path / "out" / "network-snapshot-000100.safetensors"
    ours, official = load_network(written), load_network(pkl)
    for key in ("G", "D", "G_ema"):
        assert_same_state(ours[key], official[key])
        assert_same_state(ours[key], sources[key])
    assert ours["augment_pipe"]["p"] == official["augment_pipe"]["p"] == 0.375
    assert ours["training_set_kwargs"]["path"] == "/data/naevi.zip"
    assert official["meta"] == {"format": "nvlabs-pickle", "source": pkl.name}
    text = describe_networks(found)
    assert "G: 16x16x3, z_dim 8, w_dim 8, c_dim 0, mapping 2 layers, skip, conv_clamp 256; " \
           "channels 4:16 8:16 16:8" in text
    assert "augment_pipe: AugmentPipe, p = 0.375" in text


def test_wrong_kinds_of_file(tmp_path):
    enc = tmp_path / "encoder.safetensors"
    save_file({"w": torch.zeros(2)}, str(enc), metadata={"format": "anostyle-encoder"})
    with pytest.raises(UserError, match="encoder.safetensors is an encoder checkpoint, not a "
                                        "network; pass it to --encoder"):
        load_network(enc)
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    with pytest.raises(UserError, match="not an AnoStyle network checkpoint"):
        load_network(bare)
    state = save_training_state(tmp_path / "network-snapshot-000001.state.pt", {"a": 1})
    with pytest.raises(UserError, match="holds optimizer and RNG state, not networks"):
        load_network(state)
    with pytest.raises(UserError, match="is a directory"):
        load_network(tmp_path)
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    with pytest.raises(UserError, match="notes.txt is not a network file"):
        load_network(junk)


def test_damaged_or_newer_checkpoints_are_named(tmp_path):
    path = save_networks(tmp_path / "n.safetensors", G=make_sources()["G"])
    metadata = read_metadata(path)
    tensors = load_file(str(path))
    del tensors["G.mapping.fc1.bias"]
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(UserError, match=r"n.safetensors \(G\).*missing: mapping\.fc1\.bias"):
        load_networks(path)
    body = json.loads(metadata["anostyle"])
    body["configs"]["G"]["mapping_layers"] = 3  # the 8-layer-file / --map-depth 2 situation
    save_file(load_file(str(path)), str(path), metadata={**metadata, "anostyle": json.dumps(body)})
    with pytest.raises(UserError, match=r"missing: .*mapping\.fc2\.weight"):
        load_networks(path)
    save_file(tensors, str(path), metadata={**metadata, "format_version": "99"})
    with pytest.raises(UserError, match="newer AnoStyle"):
        load_networks(path)


def test_training_state_round_trip_resumes_adam_exactly(tmp_path):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.Adam([param], lr=0.01, betas=(0.0, 0.99))
    for _ in range(3):
        opt.zero_grad()
        (param**2).sum().backward()
        opt.step()
    random.seed(4)
    state = {"G_opt": opt.state_dict(), "torch_rng": torch.get_rng_state(),
             "python_rng": random.getstate(), "kimg": 1.5, "cur_nimg": 1536, "note": None}
    path = save_training_state(tmp_path / "s.state.pt", state)
    back = load_training_state(path)
    assert torch.equal(back["torch_rng"], state["torch_rng"])
    assert back["python_rng"] == state["python_rng"]
    assert (back["kimg"], back["cur_nimg"], back["note"]) == (1.5, 1536, None)
    # A fresh optimizer loaded from the file takes exactly the step the original takes.
    param2 = torch.nn.Parameter(param.detach().clone())
    opt2 = torch.optim.Adam([param2], lr=0.01, betas=(0.0, 0.99))
    opt2.load_state_dict(back["G_opt"])
    for p, o in ((param, opt), (param2, opt2)):
        o.zero_grad()
        (p**2).sum().backward()
        o.step()
    assert torch.equal(param, param2)


class NeedsCode:
    """An object that only a full (code-running) unpickler could rebuild."""


def test_training_state_refuses_non_plain_values(tmp_path):
    with pytest.raises(TypeError, match=r"state\.np_rng\[1\]: ndarray"):
        save_training_state(tmp_path / "x.state.pt", {"np_rng": ("MT19937", np.zeros(3))})

    evil = tmp_path / "evil.state.pt"
    torch.save({"obj": NeedsCode()}, evil)  # needs code to load: weights_only must refuse it
    with pytest.raises(UserError, match="evil.state.pt is not a readable training state"):
        load_training_state(evil)
