"""ADA augmentation cost and sharpness on this machine: forward + backward ms per image of the
full 'bgc' pipeline at p = 1 (bilinear vs bicubic resampling), and how much high-frequency
energy a pure fractional translation keeps (the blur the resampling adds).

Prints one JSON object. Usage: `.venv/bin/python bench/augment.py [--size 128] [--batch 16]`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from stylegan.augment import AugmentConfig, AugmentPipe


def test_images(batch: int, size: int) -> torch.Tensor:
    """Smooth random blobs plus fine texture: a stand-in for dermoscopy crops, in [-1, 1]."""
    coarse = F.interpolate(torch.rand(batch, 3, 8, 8), size=(size, size), mode="bicubic",
                           align_corners=False)
    return (coarse + 0.2 * torch.rand(batch, 3, size, size)).clamp(0, 1) * 2 - 1


def laplacian_energy(x: torch.Tensor) -> float:
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    kernel = kernel.reshape(1, 1, 3, 3).repeat(x.shape[1], 1, 1, 1)
    edges = F.conv2d(x, kernel, groups=x.shape[1])[..., 8:-8, 8:-8]  # ignore the borders
    return float(edges.square().mean())


def ms_per_image(pipe: AugmentPipe, x: torch.Tensor, repeats: int) -> float:
    x = x.clone().requires_grad_(True)
    pipe(x).sum().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        pipe(x).sum().backward()
    return 1000 * (time.perf_counter() - start) / (repeats * x.shape[0])


def run(size: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x = test_images(batch, size)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "size": size,
               "batch": batch, "modes": {}}
    for mode in ("bilinear", "bicubic"):
        full = AugmentPipe(AugmentConfig(interpolation=mode), p=1.0)
        shift = AugmentPipe(AugmentConfig.preset("geom", interpolation=mode, scale=0.0,
                                                 rotate=0.0, aniso=0.0), p=1.0)
        torch.manual_seed(1)
        kept = laplacian_energy(shift(x)) / laplacian_energy(x)
        cost = ms_per_image(full, x, repeats)
        results["modes"][mode] = {"bgc_fwd_bwd_ms_per_image": round(cost, 3),
                                  "hf_energy_kept_after_xfrac": round(kept, 3)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(run(args.size, args.batch, args.repeats), indent=2))


if __name__ == "__main__":
    main()
