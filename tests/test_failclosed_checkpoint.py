"""Checkpoints that always load and never load damage: safetensors headers of every length mod
256 are recognised (issue 15, item 0), non-finite weights are refused at load (item 1), and an
encoder is paired only with the network it was trained for (item 2)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_legacy import make_sources, write_official_pickle

from stylegan.checkpoint import _sniff, load_network, save_networks
from stylegan.errors import UserError


def raw_safetensors(path, header_len: int) -> None:
    """A valid safetensors file (one float32 tensor) whose JSON header is `header_len` bytes
    (padded with spaces, as the format allows)."""
    header = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    assert len(header) <= header_len
    header += b" " * (header_len - len(header))
    path.write_bytes(struct.pack("<Q", header_len) + header + struct.pack("<2f", 1.0, 2.0))


def test_every_header_length_mod_256_is_sniffed_as_safetensors(tmp_path):
    """The first byte of a safetensors file is its header length mod 256; 0x80 (= 128) is also
    the first byte of a pickle. Every residue, and a header longer than 64 KiB, is safetensors."""
    for residue in range(256):
        path = tmp_path / f"h{residue}.safetensors"
        raw_safetensors(path, 256 + residue)
        assert _sniff(path) == "safetensors", residue
        assert load_file(str(path))["x"].tolist() == [1.0, 2.0]  # really a valid file
    raw_safetensors(tmp_path / "long.safetensors", 70_000 + 128)
    assert _sniff(tmp_path / "long.safetensors") == "safetensors"


def test_implausible_lengths_and_pickles_are_not_safetensors(tmp_path):
    path = tmp_path / "liar.bin"
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")  # header longer than the file
    assert _sniff(path) == "unknown"
    path.write_bytes(b"\x80\x02}q\x00.")  # a tiny protocol-2 pickle
    assert _sniff(path) == "pickle"
    write_official_pickle(tmp_path / "official.pkl", make_sources())
    assert _sniff(tmp_path / "official.pkl") == "pickle"


def test_a_checkpoint_with_header_length_128_mod_256_loads(tmp_path):
    """The reported case: a real snapshot whose header length is 0x..80 loads end to end."""
    sources = make_sources()
    for pad in range(0, 400):
        path = save_networks(tmp_path / "net", **sources, extra={"pad": "x" * pad})
        with open(path, "rb") as f:
            if f.read(1) == b"\x80":
                break
    else:
        pytest.fail("no padding gave a header length of 128 mod 256")
    nets = load_network(path)
    assert torch.equal(nets["G_ema"].mapping.w_avg, sources["G_ema"].mapping.w_avg)


# ----------------------------------------------------------------------------------------------
# Item 1: damaged weights are refused at load


def test_network_with_a_nan_weight_is_refused(tmp_path):
    from safetensors import safe_open

    sources = make_sources()
    path = save_networks(tmp_path / "net", **sources)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.startswith("D.") and tensors[k].is_floating_point())
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(UserError, match=rf"non-finite weights \(NaN or infinity\) in {name}"):
        load_network(path)


def test_encoder_with_a_random_tail_is_refused(tmp_path):
    """The reported case: the tail of an encoder file overwritten with random bytes."""
    import numpy as np
    from encoder_helpers import tiny_encoder, tiny_networks

    from anomaly.model.encoder_io import load_encoder, save_encoder

    G, _D = tiny_networks()
    path = tmp_path / "encoder.safetensors"
    save_encoder(path, tiny_encoder(G))
    data = bytearray(path.read_bytes())
    tail = 4096
    data[-tail:] = np.random.default_rng(0).integers(0, 256, tail, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="non-finite weights"):
        load_encoder(path)


# ----------------------------------------------------------------------------------------------
# Item 2: an encoder is paired with the network it was trained for


def test_pairing_by_network_sha256(tmp_path):
    from anomaly.model.encoder_io import check_pairing, sha256_file

    (tmp_path / "a.safetensors").write_bytes(b"network a")
    (tmp_path / "b.safetensors").write_bytes(b"network b")
    extra = {"network": {"path": str(tmp_path / "a.safetensors"),
                         "sha256": sha256_file(tmp_path / "a.safetensors")}}
    assert check_pairing(extra, tmp_path / "a.safetensors", allow_mismatch=False) is None
    with pytest.raises(UserError) as refused:
        check_pairing(extra, tmp_path / "b.safetensors", allow_mismatch=False,
                      encoder_path="enc.safetensors")
    message = str(refused.value)
    assert message.count(". ") == 0 and message.endswith("--allow-mismatch to score anyway.")
    assert "a.safetensors" in message and extra["network"]["sha256"][:12] in message
    warning = check_pairing(extra, tmp_path / "b.safetensors", allow_mismatch=True)
    assert warning.startswith("--allow-mismatch: ") and "not comparable" in warning
    old = check_pairing({}, tmp_path / "b.safetensors", allow_mismatch=False)
    assert "records no network sha256" in old  # older encoders: a warning, not a refusal
