"""Images from a StyleGAN2 generator for given seeds (Karras et al. 2020), as NVlabs' gen_images.

Conventions kept so that a network and a seed give the same picture in both tools: the latent
of seed s is `RandomState(s).randn(1, z_dim)`, and an image becomes uint8 through
`(img * 127.5 + 128).clamp(0, 255)`, channels last (`stylegan.imageutil.to_uint8`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stylegan.checkpoint import load_network
from stylegan.errors import UserError
from stylegan.runtime import resolve_device
from stylegan.imageutil import save_grid, save_image, to_uint8
from stylegan.networks import NOISE_MODES, Generator, z_from_seed
from stylegan.progress import progress

GRID_MAX = 64  # grid.png shows at most the first 64 seeds
_SEED_PART = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_seeds(text: str) -> list[int]:
    """'0-7,12' -> [0, 1, ..., 7, 12] (ranges inclusive, order kept, repeats dropped)."""
    seeds: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        match = _SEED_PART.match(part)
        if not match:
            raise UserError(f"--seeds {text!r}: {part!r} is not a seed or a range; write e.g. "
                            "'0-7,12'.")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise UserError(f"--seeds {text!r}: range {part} runs backwards; write {hi}-{lo}.")
        if hi >= 2**32:
            raise UserError(f"--seeds {text!r}: seeds must be below 2**32.")
        seeds.extend(s for s in range(lo, hi + 1) if s not in seeds)
    return seeds


def class_labels(c_dim: int, class_idx: int | None, n: int) -> torch.Tensor | None:
    """One-hot labels [n, c_dim] for a conditional network; None for an unconditional one."""
    if c_dim == 0:
        if class_idx is not None:
            raise UserError("--class was given but the network is unconditional; leave it out.")
        return None
    if class_idx is None:
        raise UserError(f"the network is conditional ({c_dim} classes); "
                        f"pass --class 0..{c_dim - 1}.")
    if not 0 <= class_idx < c_dim:
        raise UserError(f"--class {class_idx} is out of range; the network has classes "
                        f"0..{c_dim - 1}.")
    c = torch.zeros(n, c_dim)
    c[:, class_idx] = 1
    return c  # [n, c_dim]


@torch.no_grad()
def synthesize(G: Generator, seeds: list[int], *, truncation_psi: float = 1.0,
               noise_mode: str = "const", class_idx: int | None = None) -> torch.Tensor:
    """Images [len(seeds), C, H, W] (float, about [-1, 1]) for `seeds`, on G's device.

    With noise_mode 'random' the noise is drawn from torch's RNG seeded with the first seed, so
    a run can be repeated.
    """
    device = next(G.parameters()).device
    z = torch.cat([z_from_seed(s, G.z_dim) for s in seeds]).to(device)  # [N, z_dim]
    c = class_labels(G.c_dim, class_idx, len(seeds))
    c = None if c is None else c.to(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seeds[0])
        return G(z, c, truncation_psi=truncation_psi, noise_mode=noise_mode)


@dataclass(frozen=True)
class GenerateOptions:
    """Options of `anostyle generate`."""

    network: str | os.PathLike  # official .pkl or AnoStyle .safetensors
    seeds: tuple[int, ...]
    outdir: str | os.PathLike
    truncation_psi: float = 1.0  # 1: no truncation
    noise_mode: str = "const"  # one of NOISE_MODES
    class_idx: int | None = None  # required for a conditional network
    batch_size: int = 8  # images per forward pass
    device: str = "cpu"  # cpu, cuda or cuda:N


def generate_images(options: GenerateOptions) -> list[Path]:
    """Write `seed%04d.png` for each seed and `grid.png` (first 64) into `options.outdir`.

    Uses G_ema when the file has it, else G. Returns the written image paths (grid last).
    """
    seeds, batch_size = list(options.seeds), options.batch_size
    if options.noise_mode not in NOISE_MODES:
        raise UserError(f"--noise-mode {options.noise_mode!r} is unknown; use one of "
                        f"{NOISE_MODES}.")
    if batch_size < 1 or not seeds:
        raise UserError("--batch must be >= 1 and --seeds must name at least one seed.")
    nets = load_network(options.network, device=resolve_device(options.device))
    G = nets["G_ema"] if nets["G_ema"] is not None else nets["G"]
    if G is None:
        raise UserError(f"{Path(options.network).name} holds no generator (neither G_ema nor G).")
    class_labels(G.c_dim, options.class_idx, 1)  # check --class before any work
    outdir = Path(options.outdir)
    written, grid = [], []
    for start in progress(range(0, len(seeds), batch_size), desc="generate", unit="batch",
                      disable=None):
        batch = seeds[start:start + batch_size]
        images = to_uint8(synthesize(G, batch, truncation_psi=options.truncation_psi,
                                     noise_mode=options.noise_mode,
                                     class_idx=options.class_idx))  # [N, H, W, C]
        for seed, image in zip(batch, images):
            written.append(outdir / f"seed{seed:04d}.png")
            save_image(image, written[-1])
        grid.extend(images[: max(0, GRID_MAX - len(grid))])
    save_grid(np.stack(grid), outdir / "grid.png")
    return written + [outdir / "grid.png"]
