"""Encoder throughput on this machine, for the network `--cfg cpu` trains (64 px, cbase 2048,
cmax 128, 128-d W) and the encoder `train-encoder` builds for it by default (as wide as D):

- izif encoder training: images/s of `fit_encoder` (batch 16, measured after a warm-up tick);
- reconstruction x -> G(E(x)): images/s through the encoder (batch 16);
- projection (anostyle project): images/s at --steps 300, and how many times faster the encoder is.

The networks are random (speed does not depend on the weights). Projection time grows linearly
with the number of steps (every step is the same computation), so it is timed for
`--project-steps` steps (default: all 300) and scaled to 300; the JSON says so. Prints one JSON
object.
Usage: `.venv/bin/python bench/encode.py [--train-iters 12] [--project-steps 300] [--threads N]`
(on a busy 2-core machine `--threads 1` avoids OpenMP oversubscription, which slows these
small networks many times).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from anomaly.model.encoder import Encoder, EncoderConfig
from anomaly.model.fit import FitOptions, fit_encoder
from anomaly.model.ano_model import reconstruct_batch
from anomaly.model.project import project_batch
from stylegan.checkpoint import save_networks
from stylegan.imageutil import from_uint8, save_image, to_uint8
from stylegan.networks import Discriminator, DiscriminatorConfig, Generator, GeneratorConfig

G_CFG = GeneratorConfig(z_dim=128, w_dim=128, img_resolution=64, mapping_layers=2,
                        channel_base=2048, channel_max=128)
D_CFG = DiscriminatorConfig(img_resolution=64, channel_base=2048, channel_max=128)
BATCH = 16
PROJECT_BATCH = 4
PROJECT_STEPS = 300


def training_rate(network: Path, data: Path, outdir: Path, iters: int) -> dict:
    """Encoder training images/s from stats.jsonl: the second half of the run (after warm-up)."""
    tick = max(iters // 2, 1)
    fit_encoder(FitOptions(network=str(network), data=str(data), outdir=str(outdir), iters=iters,
                           batch=BATCH, snap=0, tick=tick, workers=0, device="cpu"),
                echo=lambda message: None)
    records = [json.loads(line) for line in open(outdir / "stats.jsonl")]
    sec = records[-1]["sec_per_iter"]
    return {"batch": BATCH, "iters": iters, "timed_iters": records[-1]["iter"] - tick,
            "sec_per_iter": sec, "images_per_s": round(BATCH / sec, 2)}


@torch.no_grad()
def reconstruction_rate(G: Generator, E: Encoder, x: torch.Tensor, *, repeats: int = 5) -> dict:
    reconstruct_batch(G, E, x)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        reconstruct_batch(G, E, x)
    seconds = (time.perf_counter() - start) / repeats
    return {"batch": len(x), "sec_per_batch": round(seconds, 4),
            "images_per_s": round(len(x) / seconds, 2)}


def projection_rate(G: Generator, D: Discriminator, x: torch.Tensor, steps: int) -> dict:
    start_ws = G.mapping.w_avg.expand(len(x), G.num_ws, -1)
    project_batch(G, D, x, start_ws, steps=1)  # warm-up
    start = time.perf_counter()
    project_batch(G, D, x, start_ws, steps=steps)
    per_step = (time.perf_counter() - start) / steps
    seconds = per_step * PROJECT_STEPS
    return {"batch": len(x), "measured_steps": steps, "steps": PROJECT_STEPS,
            "sec_per_step": round(per_step, 4), "sec_per_batch_at_300_steps": round(seconds, 2),
            "images_per_s": round(len(x) / seconds, 4),
            "note": (f"timed for {steps} steps" if steps == PROJECT_STEPS else
                     f"timed for {steps} steps, scaled linearly to {PROJECT_STEPS}")}


def run(train_iters: int, project_steps: int) -> dict:
    torch.manual_seed(0)
    G, D = Generator(G_CFG).eval().requires_grad_(False), Discriminator(D_CFG).eval()
    D.requires_grad_(False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        network = save_networks(root / "net.safetensors", G=G, D=D, G_ema=G)
        with torch.no_grad():
            images = to_uint8(G(torch.randn(64, G.z_dim), None))  # [64, H, W, C]
        for i, image in enumerate(images):
            save_image(image, root / "data" / f"{i:03d}.png")
        train = training_rate(network, root / "data", root / "run", train_iters)
    cfg = EncoderConfig(img_resolution=64, img_channels=3, num_ws=G.num_ws, w_dim=G.w_dim,
                        channel_base=D_CFG.channel_base, channel_max=D_CFG.channel_max)
    E = Encoder(cfg, w_avg=G.mapping.w_avg).eval().requires_grad_(False)
    x = from_uint8(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))
    encoder = reconstruction_rate(G, E, x[:BATCH])
    project = projection_rate(G, D, x[:PROJECT_BATCH], project_steps)
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "load_avg": os.getloadavg(),
            "resolution": 64, "encoder_parameters": sum(p.numel() for p in E.parameters()),
            "train_encoder": train, "reconstruct_encoder": encoder, "project": project,
            "encoder_speedup_vs_project": round(encoder["images_per_s"]
                                                / project["images_per_s"], 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-iters", type=int, default=12)
    parser.add_argument("--project-steps", type=int, default=PROJECT_STEPS)
    parser.add_argument("--threads", type=int, help="torch threads [torch's default]")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = run(args.train_iters, args.project_steps)
    results["bench_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
