"""anomaly/model/encoder.py and anomaly/model/encoder_io.py: shapes, the w_avg start, W vs W+,
checkpoint round trip, wrong kinds of file and the `--resume latest` rule (tiny networks, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from anomaly.model.encoder import Encoder, EncoderConfig
from anomaly.model.encoder_io import (ENCODER_FORMAT, encoder_checkpoints, find_latest_encoder,
                                      load_encoder, save_encoder, state_path)
from encoder_helpers import one_thread  # noqa: F401 (autouse fixture)
from encoder_helpers import E_BASE, E_MAX, save_tiny_networks, tiny_encoder, tiny_networks
from stylegan.checkpoint import load_network
from stylegan.errors import UserError


def perturb_head(E: Encoder, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        E.head.weight.copy_(torch.randn(E.head.weight.shape, generator=g))


def test_untrained_encoder_returns_w_avg_exactly():
    G, _D = tiny_networks()
    E = tiny_encoder(G)
    x = torch.randn(3, 3, 16, 16)
    ws = E(x)
    assert ws.shape == (3, G.num_ws, G.w_dim)
    assert torch.equal(ws, G.mapping.w_avg.expand(3, G.num_ws, -1))
    assert torch.equal(E.w_avg, G.mapping.w_avg) and E.w_avg.data_ptr() != G.mapping.w_avg.data_ptr()


def test_layer_sizes_follow_channel_rule():
    G, _D = tiny_networks()
    E = tiny_encoder(G)
    c4 = min(E_BASE // 4, E_MAX)  # 32
    c16 = min(E_BASE // 16, E_MAX)  # 16
    assert E.b16.fromrgb.weight.shape == (c16, 3, 1, 1)
    assert E.b8.conv1.weight.shape == (c4, min(E_BASE // 8, E_MAX), 3, 3)
    assert E.fc.weight.shape == (c4, c4 * 16)
    assert E.head.weight.shape == (G.num_ws * G.w_dim, c4)  # 6 * 16 = 96 outputs
    E_w = tiny_encoder(G, latent="w")
    assert E_w.head.weight.shape == (G.w_dim, c4)
    assert sum(p.numel() for p in E.parameters()) - sum(p.numel() for p in E_w.parameters()) \
        == (G.num_ws - 1) * G.w_dim * (c4 + 1)


def test_w_latent_is_broadcast_and_wplus_is_not():
    G, _D = tiny_networks()
    x = torch.randn(2, 3, 16, 16)
    E_w, E_plus = tiny_encoder(G, latent="w"), tiny_encoder(G, latent="wplus")
    perturb_head(E_w)
    perturb_head(E_plus)
    ws = E_w(x)
    assert torch.equal(ws, ws[:, :1].expand_as(ws))
    assert not torch.allclose(ws[0], ws[1])  # still depends on the image
    ws_plus = E_plus(x)
    assert not torch.allclose(ws_plus[:, 0], ws_plus[:, 1])


def test_zero_head_passes_gradient_to_head_only():
    G, _D = tiny_networks()
    E = tiny_encoder(G)
    E(torch.randn(2, 3, 16, 16)).square().sum().backward()
    assert E.head.weight.grad.abs().sum() > 0 and E.head.bias.grad.abs().sum() > 0
    assert E.fc.weight.grad.abs().sum() == 0  # d out / d fc = head.weight = 0
    # d/d bias of sum((w_avg + b)^2) = 2 * (w_avg + b) summed over the 2 images, b = 0
    expected = 4 * G.mapping.w_avg.repeat(G.num_ws)
    torch.testing.assert_close(E.head.bias.grad, expected)


def test_shape_is_asserted_at_entry():
    G, _D = tiny_networks()
    E = tiny_encoder(G)
    with pytest.raises(AssertionError, match=r"images must be \[N, 3, 16, 16\]"):
        E(torch.randn(2, 3, 32, 32))
    with pytest.raises(AssertionError, match="latent must be one of"):
        EncoderConfig(img_resolution=16, img_channels=3, num_ws=6, w_dim=16, latent="z")


def test_checkpoint_round_trip(tmp_path):
    G, _D = tiny_networks()
    E = tiny_encoder(G, latent="w")
    perturb_head(E)
    path = tmp_path / "encoder-000012.safetensors"
    save_encoder(path, E, extra={"iter": 12, "network": {"sha256": "ab" * 32}})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == ENCODER_FORMAT
    assert json.loads(meta["anostyle"])["config"]["latent"] == "w"
    E2, extra = load_encoder(path)
    assert E2.cfg == E.cfg and extra == {"iter": 12, "network": {"sha256": "ab" * 32}}
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(E2(x), E(x))
    assert not E2.training and not any(p.requires_grad for p in E2.parameters())


def test_wrong_kinds_of_file_are_one_clear_sentence(tmp_path):
    G, D = tiny_networks()
    net = save_tiny_networks(tmp_path / "net.safetensors", G, D)
    enc = tmp_path / "enc.safetensors"
    save_encoder(enc, tiny_encoder(G))
    with pytest.raises(UserError, match="net.safetensors is a network checkpoint, not an "
                                        "encoder; pass it to --network"):
        load_encoder(net)
    with pytest.raises(UserError, match="enc.safetensors is an encoder checkpoint, not a "
                                        "network; pass it to --encoder"):
        load_network(enc)
    with pytest.raises(UserError, match="missing.safetensors does not exist"):
        load_encoder(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="junk.safetensors is not a safetensors checkpoint"):
        load_encoder(tmp_path / "junk.safetensors")


def test_latest_is_the_newest_complete_pair(tmp_path):
    G, _D = tiny_networks()
    E = tiny_encoder(G)
    for it in (900, 1000, 20000, 30000):
        save_encoder(tmp_path / f"encoder-{it:06d}.safetensors", E)
    for it in (900, 1000, 20000):  # 30000 has no state: a crash between the two writes
        state_path(tmp_path / f"encoder-{it:06d}.safetensors").write_bytes(b"x")
    (tmp_path / "encoder-latest.safetensors").write_bytes(b"")  # not an iteration: ignored
    names = [p.name for p in encoder_checkpoints(tmp_path)]
    assert names == ["encoder-000900.safetensors", "encoder-001000.safetensors",
                     "encoder-020000.safetensors", "encoder-030000.safetensors"]
    assert find_latest_encoder(tmp_path).name == "encoder-020000.safetensors"
    with pytest.raises(UserError, match="--resume latest found no encoder checkpoint"):
        find_latest_encoder(tmp_path / "empty")
