"""Encoder checkpoints and the checks that pair an encoder with its network.

An encoder checkpoint is ONE `.safetensors` file laid out like the network checkpoints of
stylegan.checkpoint: the encoder's tensors (including its `w_avg` buffer) plus, in the safetensors
metadata (string -> string), `format` = "anostyle-encoder", `format_version`, and under `anostyle`
JSON {"config": EncoderConfig, "extra": training options, iteration and the network the encoder
was trained against (path, sha256, generator config)}. Loading runs no code from the file; its
optimizer state lives beside it in `encoder-<iter>.state.pt` (stylegan.checkpoint's
save_training_state format).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from anomaly.model.encoder import Encoder, EncoderConfig
from stylegan.checkpoint import FORMAT as NETWORK_FORMAT
from stylegan.checkpoint import check_finite, config_from_dict
from stylegan.errors import UserError
from stylegan.fileio import atomic_path, loads_untrusted, sha256_file
from stylegan.legacy import load_tensors
from stylegan.schemas import CheckpointMeta, EncoderBody, json_field, validated

ENCODER_FORMAT = "anostyle-encoder"
ENCODER_VERSION = 1
ENCODER_PREFIX = "encoder-"
VALIDATION_FILE = "validation.json"  # train-encoder --val: the loss per checkpoint, the best


# ----------------------------------------------------------------------------------------------
# Encoder checkpoints


def save_encoder(path: str | os.PathLike, E: Encoder, *, extra: dict[str, Any] | None = None
                 ) -> None:
    """Write `E` (weights + EncoderConfig) and `extra` (JSON-able) to one .safetensors file."""
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous()
               for name, t in E.state_dict().items()}
    body = {"config": dataclasses.asdict(E.cfg), "extra": extra or {}}
    metadata = {"format": ENCODER_FORMAT, "format_version": str(ENCODER_VERSION),
                "anostyle": json.dumps(body)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_metadata(path: str | os.PathLike, *, flag: str = "--encoder") -> dict[str, str]:
    """The safetensors metadata of `path`; a missing or non-safetensors file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path} does not exist; give an encoder-<iter>.safetensors file "
                        f"written by `anostyle train-encoder`.")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{flag} {path} is not a safetensors checkpoint ({exc}); give an "
                        f"encoder-<iter>.safetensors file written by `anostyle train-encoder`."
                        ) from None


def load_encoder(path: str | os.PathLike, *, device: str | torch.device = "cpu"
                 ) -> tuple[Encoder, dict[str, Any]]:
    """Encoder (eval mode, on `device`) and its `extra` metadata from an encoder checkpoint."""
    path = Path(path)
    if path.suffix == ".pkl":
        raise UserError(f"{path} is a network pickle, not an encoder; pass it to --network and "
                        f"give --encoder an encoder-<iter>.safetensors file.")
    metadata = read_metadata(path)
    kind = metadata.get("format", "")
    if kind != ENCODER_FORMAT:
        if kind == NETWORK_FORMAT:
            raise UserError(f"{path} is a network checkpoint, not an encoder; pass it to "
                            f"--network.")
        raise UserError(f"{path} is not an AnoStyle encoder checkpoint (format {kind!r}); give "
                        f"an encoder-<iter>.safetensors file written by `anostyle train-encoder`.")
    fix = "the file is damaged: copy it again or use another checkpoint"
    where = f"The metadata of --encoder {path}"
    meta = validated(CheckpointMeta, metadata, where=where, fix=fix)
    if int(meta.format_version) > ENCODER_VERSION:
        raise UserError(f"{path} was written by a newer AnoStyle (encoder format version "
                        f"{meta.format_version}); upgrade AnoStyle to read it.")
    body = validated(EncoderBody, json_field(meta.anostyle, where=where, fix=fix), where=where,
                     fix=fix).model_dump(exclude_unset=True)
    cfg = config_from_dict(EncoderConfig, body["config"], source=str(path))
    tensors = load_file(str(path), device="cpu")
    check_finite(tensors, what=f"--encoder {path}")
    E = load_tensors(Encoder(cfg), tensors, what=f"{path} (encoder)")
    return E.to(device).eval().requires_grad_(False), body.get("extra", {})


def state_path(encoder_path: str | os.PathLike) -> Path:
    """`encoder-000100.safetensors` -> `encoder-000100.state.pt` (optimizer, iteration, RNG)."""
    path = Path(encoder_path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".state.pt")


def encoder_checkpoints(outdir: str | os.PathLike) -> list[Path]:
    """Every `encoder-<iter>.safetensors` in `outdir`, oldest iteration first."""
    found = [p for p in Path(outdir).glob(f"{ENCODER_PREFIX}*.safetensors")
             if p.name.removeprefix(ENCODER_PREFIX).removesuffix(".safetensors").isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(ENCODER_PREFIX):-len(".safetensors")]))


def find_latest_encoder(outdir: str | os.PathLike) -> Path:
    """The newest complete pair (encoder .safetensors + .state.pt) in `outdir` (--resume latest)."""
    complete = [p for p in encoder_checkpoints(outdir) if state_path(p).is_file()]
    if not complete:
        raise UserError(f"--resume latest found no encoder checkpoint with its .state.pt in "
                        f"{outdir}; train first or pass --resume PATH.")
    return complete[-1]


# ----------------------------------------------------------------------------------------------
# Encoder and network together


def best_encoder(outdir: str | os.PathLike) -> Path | None:
    """The checkpoint validation.json (train-encoder --val) names as best, when it is there."""
    path = Path(outdir) / VALIDATION_FILE
    try:
        name = loads_untrusted(path.read_bytes())["best"]["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    best = Path(outdir) / str(name)
    return best if best.is_file() and best.parent == Path(outdir) else None


def check_compatible(E: Encoder, G: torch.nn.Module, *, encoder_path: str | os.PathLike,
                     network_path: str | os.PathLike) -> None:
    """Refuse an encoder that was built for a different generator shape."""
    pairs = [("resolution", E.img_resolution, G.img_resolution),
             ("image channels", E.img_channels, G.img_channels),
             ("number of ws", E.num_ws, G.num_ws), ("w_dim", E.w_dim, G.w_dim)]
    for what, e, g in pairs:
        if e != g:
            raise UserError(f"--encoder {encoder_path} has {what} {e} but --network "
                            f"{network_path} has {g}; use the encoder trained for this network.")


def check_pairing(encoder_extra: dict[str, Any], network_path: str | os.PathLike, *,
                  allow_mismatch: bool, encoder_path: str | os.PathLike = "the encoder",
                  network_sha256: str | None = None) -> str | None:
    """Compare the network sha256 an encoder recorded in training with the network file's.

    Returns None when they match, a warning when the encoder records none (older encoders) or
    when `allow_mismatch` lets a different network through; refuses a mismatch otherwise.
    `network_sha256`: the file's hash when the caller already has it (it is read only once).
    """
    recorded = (encoder_extra.get("network") or {}).get("sha256")
    encoder, network = Path(encoder_path).name, Path(network_path).name  # no folders in answers
    if not recorded:
        return (f"--encoder {encoder} records no network sha256 (trained by an older "
                f"AnoStyle), so its pairing with --network {network} is not checked")
    actual = network_sha256 or sha256_file(network_path)
    if actual == recorded:
        return None
    trained_with = Path(str(encoder_extra["network"].get("path", "?"))).name
    if allow_mismatch:
        return (f"--allow-mismatch: --encoder {encoder} was trained for another network "
                f"({trained_with}, sha256 {recorded[:12]}) than --network {network} "
                f"(sha256 {actual[:12]}); its scores are not comparable")
    raise UserError(f"--encoder {encoder} was trained for another network ({trained_with}, "
                    f"sha256 {recorded[:12]}) than --network {network} (sha256 "
                    f"{actual[:12]}); give the network it was trained with, or pass "
                    f"--allow-mismatch to score anyway.")
