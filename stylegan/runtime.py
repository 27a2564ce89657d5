"""Runtime pieces shared by both trainers (`train-gan` and `train-encoder`) and every command:
device resolution, the run log (console + log.txt + stats.jsonl) and the endless sampler."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from stylegan.errors import UserError


def resolve_device(name: str, *, rank: int = 0) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a torch device (auto: CUDA when available). Plain
    'cuda' gives process `rank` GPU rank % count, which also becomes the current device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N.") \
            from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} was asked for but no CUDA device is available; "
                            f"use --device cpu.")
        if device.index is None:
            device = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
    return device


def cuda_backend_settings(device: torch.device) -> None:
    """On CUDA, as the official training: cuDNN picks the fastest algorithms for the fixed
    shapes, and float32 layers compute in full float32 (no TF32, whose 10-bit mantissa would
    make the float32 path differ from the CPU's by ~1e-3). Nothing changes on other devices."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


class RunLog:
    """Console (above any progress bar) + `<outdir>/log.txt`; stats records also go to
    `<outdir>/stats.jsonl`. With outdir None (other ranks) it stays silent."""

    def __init__(self, outdir: Path | None, echo: Callable[[str], None] | None = None):
        if outdir is not None:
            outdir.mkdir(parents=True, exist_ok=True)
        self.outdir, self.echo = outdir, echo or tqdm.write

    def __call__(self, message: str) -> None:
        if self.outdir is None:
            return
        self.echo(message)
        with open(self.outdir / "log.txt", "a", encoding="utf-8") as f:
            f.write(message + "\n")

    def stats(self, record: dict[str, Any]) -> None:
        """Append one JSON record to stats.jsonl and print it as one line."""
        if self.outdir is None:
            return
        with open(self.outdir / "stats.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in record.items() if k != "timestamp"))


class EndlessSampler(torch.utils.data.Sampler):
    """Indices of one seeded permutation per epoch, forever, sharded across `world` processes
    (each takes every world-th index), starting `start` samples into this process's stream.

    Epoch e is `randperm(n)` under the seed `seed * seed_stride + e`.
    """

    def __init__(self, n: int, *, seed: int, start: int = 0, rank: int = 0, world: int = 1,
                 seed_stride: int = 100003):
        assert n >= 1 and 0 <= rank < world, (n, rank, world)
        self.n, self.seed, self.start = n, seed, start
        self.rank, self.world, self.seed_stride = rank, world, seed_stride

    def __iter__(self) -> Iterator[int]:
        epoch, skip = divmod(self.start, max(self.n // self.world, 1))
        while True:
            g = torch.Generator().manual_seed(self.seed * self.seed_stride + epoch)
            order = torch.randperm(self.n, generator=g)[self.rank::self.world].tolist()
            yield from order[skip:]
            epoch, skip = epoch + 1, 0
