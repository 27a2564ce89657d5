"""AnoStyle network checkpoints: the weights plus the configs that built them, and nothing else.

A checkpoint is one `<name>.safetensors` file (a checkpoint = weights + config, as in nanoGPT).
Its tensors are the networks' state dicts with the prefixes `G.`, `D.`, `G_ema.`; its
safetensors metadata holds `format` / `format_version` and, under `anostyle`, JSON with the
`dataclasses.asdict` of each network's config and a free `extra` dict (kimg, ADA p, options).
Loading runs no code: safetensors stores raw tensors and the rest is JSON.

Optimizer and RNG state for resuming live beside it in `*.state.pt`: `torch.save` of plain
tensors, numbers and strings, read back with `weights_only=True`.

`load_network` is what the rest of the project calls: it takes either an official NVlabs `.pkl`
(through `stylegan.legacy`) or an AnoStyle checkpoint and returns the same dict.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from stylegan.errors import UserError
from stylegan.fileio import atomic_path
from stylegan.legacy import NETWORK_KEYS, load_network_pkl, load_tensors
from stylegan.networks import (
    Discriminator,
    DiscriminatorConfig,
    Generator,
    GeneratorConfig,
    channels_at,
)
from stylegan.schemas import (
    CheckpointMeta,
    NetworkBody,
    config_from_record,
    json_field,
    validated,
)

FORMAT = "anostyle-networks"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"
_CONFIG_TYPES = {"G": GeneratorConfig, "G_ema": GeneratorConfig, "D": DiscriminatorConfig}
_MODULE_TYPES = {"G": Generator, "G_ema": Generator, "D": Discriminator}
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses longer headers


# ----------------------------------------------------------------------------------------------
# Our format


def checkpoint_path(path: str | os.PathLike) -> Path:
    """`path` with the `.safetensors` suffix (added when missing)."""
    path = Path(path)
    return path if path.suffix == SUFFIX else path.with_name(path.name + SUFFIX)


def save_networks(path: str | os.PathLike, *, G: Generator | None = None,
                  D: Discriminator | None = None, G_ema: Generator | None = None,
                  extra: dict | None = None) -> Path:
    """Write the given networks and their configs to one `.safetensors` file, atomically.

    `extra` must be JSON-serialisable. Returns the written path.
    """
    nets = {key: net for key, net in (("G", G), ("D", D), ("G_ema", G_ema)) if net is not None}
    if not nets:
        raise ValueError("save_networks needs at least one of G, D, G_ema")
    tensors: dict[str, torch.Tensor] = {}
    configs = {}
    for key, net in nets.items():
        if not isinstance(net, _MODULE_TYPES[key]):
            raise TypeError(f"{key} must be a {_MODULE_TYPES[key].__name__}, got {type(net)}")
        configs[key] = dataclasses.asdict(net.cfg)
        for name, tensor in net.state_dict().items():
            # clone: safetensors refuses tensors that share memory
            tensors[f"{key}.{name}"] = tensor.detach().to("cpu").contiguous().clone()
    body = json.dumps({"configs": configs, "extra": extra or {}})
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "anostyle": body}
    path = checkpoint_path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors metadata (string -> string) of `path`, without reading the tensors."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path.name} is not a readable safetensors file ({exc}).") from None


def _check_format(path: Path, metadata: dict[str, str]) -> dict:
    fmt = metadata.get("format", "")
    if fmt != FORMAT:
        if "encoder" in fmt:
            raise UserError(f"{path.name} is an encoder checkpoint, not a network; "
                            "pass it to --encoder.")
        raise UserError(f"{path.name} is not an AnoStyle network checkpoint (format "
                        f"{fmt or 'unknown'!r}); pass a network .safetensors or an official .pkl.")
    fix = "the file is damaged: copy it again or use another snapshot"
    meta = validated(CheckpointMeta, metadata, where=f"The metadata of {path.name}", fix=fix)
    version = int(meta.format_version)
    if version > FORMAT_VERSION:
        raise UserError(f"{path.name} was written by a newer AnoStyle (checkpoint format "
                        f"{version}); upgrade AnoStyle to read it.")
    body = json_field(meta.anostyle, where=f"The metadata of {path.name}", fix=fix)
    return validated(NetworkBody, body, where=f"The metadata of {path.name}",
                     fix=fix).model_dump(exclude_unset=True)


def config_from_dict(cls: type, values: Any, *, source: str = "the checkpoint") -> Any:
    """Rebuild a frozen config dataclass from its `asdict` (JSON lists become tuples again),
    checked by its schema (stylegan.schemas.config_model): unknown settings, wrong types or
    sizes beyond any network end in one sentence."""
    if not isinstance(values, dict):
        raise UserError(f"{source} records its {cls.__name__} as {type(values).__name__}, not "
                        f"an object; the file is damaged.")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise UserError(f"{source} has {cls.__name__} settings {unknown} that this AnoStyle "
                        "does not know; upgrade AnoStyle.")
    return config_from_record(cls, values, where=f"{source} ({cls.__name__})",
                              fix="the file is damaged: copy it again or use another snapshot")


def check_finite(tensors: dict[str, torch.Tensor], *, what: str) -> None:
    """Refuse weights holding NaN or infinity: a damaged file must fail at load, not score."""
    bad = [name for name, t in tensors.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise UserError(f"{what} holds non-finite weights (NaN or infinity) in {bad[0]}"
                        f"{f' and {len(bad) - 1} more tensors' if len(bad) > 1 else ''}; the "
                        f"file is damaged: copy it again or use another snapshot.")


def load_networks(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict:
    """Read an AnoStyle checkpoint -> {'G', 'D', 'G_ema' (modules in eval mode or None), 'meta'}.

    'meta' holds 'format', 'format_version', 'configs' and 'extra' as written.
    """
    path = Path(path)
    metadata = read_metadata(path)
    body = _check_format(path, metadata)
    tensors = load_file(str(path), device="cpu")
    check_finite(tensors, what=path.name)
    configs = body.get("configs", {})
    stray = sorted({name.split(".", 1)[0] for name in tensors} - set(configs))
    if stray:
        raise UserError(f"{path.name} holds tensors for {stray} without their configs; "
                        "the file is damaged.")
    out: dict[str, Any] = {key: None for key in NETWORK_KEYS}
    for key, values in configs.items():
        if key not in _CONFIG_TYPES:
            raise UserError(f"{path.name} holds an unknown network {key!r}.")
        cfg = config_from_dict(_CONFIG_TYPES[key], values, source=path.name)
        own = {name[len(key) + 1:]: t for name, t in tensors.items() if name.startswith(key + ".")}
        module = load_tensors(_MODULE_TYPES[key](cfg), own, what=f"{path.name} ({key})")
        out[key] = module.to(device)
    out["meta"] = dict(format=FORMAT, format_version=int(metadata["format_version"]), **body)
    return out


# ----------------------------------------------------------------------------------------------
# Any network file


def _sniff(path: Path) -> str:
    """'safetensors' | 'pickle' | 'zip' | 'unknown', from the first bytes.

    Safetensors is judged first and by its whole structure (u64 little-endian header length,
    plausible for the file size, then '{'): its first byte is that length mod 256, which is the
    pickle opcode 0x80 for one header length in 256.
    """
    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    if len(head) == 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 2 <= header_len <= min(size - 8, _MAX_HEADER_BYTES):
            return "safetensors"
    if head.startswith(b"\x80"):
        return "pickle"
    if head.startswith(b"PK"):
        return "zip"
    return "unknown"


def load_network(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict:
    """Load an official NVlabs `.pkl` or an AnoStyle `.safetensors` checkpoint (judged by content).

    Returns {'G', 'D', 'G_ema' (modules in eval mode, or None), 'augment_pipe',
    'training_set_kwargs', 'meta'}; the modules are on `device`.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass a network file (.pkl or .safetensors).")
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a network .pkl or .safetensors file.")
    kind = _sniff(path)
    if kind == "pickle":
        out = load_network_pkl(path)
        for key in NETWORK_KEYS:
            if out[key] is not None:
                check_finite(out[key].state_dict(), what=f"{path.name} ({key})")
            out[key] = None if out[key] is None else out[key].to(device)
        out["meta"] = dict(format="nvlabs-pickle", source=path.name)
        return out
    if kind == "safetensors":
        out = load_networks(path, device=device)
        extra = out["meta"].get("extra", {})
        out["augment_pipe"] = extra.get("augment_pipe")
        out["training_set_kwargs"] = extra.get("training_set_kwargs")
        return out
    if kind == "zip" and path.name.endswith(".state.pt"):
        raise UserError(f"{path.name} holds optimizer and RNG state, not networks; pass the "
                        f"network checkpoint ({SUFFIX}) beside it.")
    what = "a zip archive (torch.save file or dataset)" if kind == "zip" else "not a network file"
    raise UserError(f"{path.name} is {what}; pass an official .pkl or an AnoStyle {SUFFIX}.")


# ----------------------------------------------------------------------------------------------
# Conversion of official pickles


def convert_pickle(src: str | os.PathLike, out: str | os.PathLike) -> tuple[Path, dict]:
    """Official `.pkl` -> AnoStyle checkpoint. `out` is a `.safetensors` path or a directory.

    Returns the written path and the loaded networks (as `load_network_pkl` gives them).
    """
    src, out = Path(src), Path(out)
    nets = load_network_pkl(src)
    dest = out if out.suffix == SUFFIX else out / (src.stem + SUFFIX)
    extra = dict(source=src.name, augment_pipe=nets["augment_pipe"],
                 training_set_kwargs=nets["training_set_kwargs"])
    written = save_networks(dest, G=nets["G"], D=nets["D"], G_ema=nets["G_ema"], extra=extra)
    return written, nets


def describe_networks(nets: dict) -> str:
    """A few human lines: resolution, mapping depth, channels per resolution, clamp, ADA p."""
    lines = []
    for key in NETWORK_KEYS:
        net = nets.get(key)
        if net is None:
            lines.append(f"{key}: absent")
            continue
        cfg = net.cfg
        res = [2**i for i in range(2, cfg.img_resolution.bit_length())]  # 4 .. img_resolution
        channels = " ".join(
            f"{r}:{channels_at(r, channel_base=cfg.channel_base, channel_max=cfg.channel_max)}"
            for r in res)
        head = f"{key}: {cfg.img_resolution}x{cfg.img_resolution}x{cfg.img_channels}"
        if isinstance(cfg, GeneratorConfig):
            head += (f", z_dim {cfg.z_dim}, w_dim {cfg.w_dim}, c_dim {cfg.c_dim}, mapping "
                     f"{cfg.mapping_layers} layers")
        else:
            head += f", c_dim {cfg.c_dim}, mbstd group {cfg.mbstd_group_size}"
        lines.append(f"{head}, {cfg.architecture}, conv_clamp {cfg.conv_clamp}; "
                     f"channels {channels}")
    pipe = nets.get("augment_pipe")
    if pipe:
        lines.append(f"augment_pipe: {pipe['class_name']}, p = {pipe['p']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Training state (optimizers, RNG) for resuming


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} must be str or int")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, (torch.Tensor, int, float, bool, str, type(None))):
        raise TypeError(f"{where}: {type(value).__name__} cannot be saved as training state; "
                        "convert it to a tensor or a plain number")


def save_training_state(path: str | os.PathLike, state: dict) -> Path:
    """Save nested dicts/lists/tuples of tensors, numbers, strings and None (atomically)."""
    _check_plain(state, "state")
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_training_state(path: str | os.PathLike) -> dict:
    """Read a `*.state.pt` written by `save_training_state` (`weights_only=True`, on CPU)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; resume needs the .state.pt beside the snapshot.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- any failure is an unreadable file for the user
        raise UserError(f"{path.name} is not a readable training state ({exc}).") from None


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as plain tensors/ints/lists, loadable with
    `torch.load(weights_only=True)`; put it into a training state to resume bit-exactly."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    out = {"torch": torch.get_rng_state(),
           "python": {"version": version, "internal": list(internal), "gauss": gauss},
           "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)),
                     "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                     "gauss": float(np_state[4])}}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng_state(rng: dict[str, Any]) -> None:
    """Undo `rng_state`: set every generator back to the saved state."""
    torch.set_rng_state(rng["torch"])
    py = rng["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
