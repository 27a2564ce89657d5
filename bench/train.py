"""Training throughput on this machine: images/s of complete StyleGAN2-ADA training iterations
(ADA on, lazy regularisation amortised) for `--cfg cpu` at 64 px and a paper256-shaped network at
256 px, plus peak RSS.

Lazy regularisation is amortised exactly: one iteration is timed in each of its three kinds
(main phases only; + path length, every 4th; + R1, every 16th), and
    t = t_main + (t_pl - t_main) / 4 + (t_r1 - t_pl) / 16.
Prints one JSON object. Usage: `.venv/bin/python bench/train.py [--repeats 2]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stylegan import train as T
from stylegan.options import TrainFlags, resolve

CASES = {
    # name: (resolution, flags beyond the data); paper256 at a CPU-sized batch.
    "cpu64": (64, dict(cfg="cpu")),
    "paper256": (256, dict(cfg="paper256", batch=4, mbstd_group=4)),
}


def make_zip(path: Path, res: int, n: int = 32) -> Path:
    rng = np.random.RandomState(0)
    labels = []
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n):
            buf = BytesIO()
            Image.fromarray(rng.randint(0, 256, (res, res, 3), dtype=np.uint8)).save(buf, "PNG")
            zf.writestr(f"{i:05d}.png", buf.getvalue())
            labels.append([f"{i:05d}.png", 0])
        zf.writestr("dataset.json", json.dumps({"labels": labels}))
    return path


def time_case(name: str, repeats: int, tmp: Path) -> dict:
    res, flags = CASES[name]
    data = make_zip(tmp / f"{name}.zip", res)
    opts = resolve(TrainFlags(outdir=str(tmp / "runs"), data=str(data), workers=0, device="cpu",
                              **flags)).options
    env = T.Dist()
    state, _ = T._build_state(opts, env, None)
    state.augment.p.fill_(0.5)  # ADA at work on every image D sees
    dataset = T.ImageDataset(opts.data)
    reals = T._real_batches(dataset, opts, env, start=0)
    stats = T._StatsCollector()
    kinds = {"main": 1, "pl": 4, "r1": 0}  # batch_idx that selects each kind of iteration
    seconds = {}
    for kind, idx in kinds.items():
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            state.batch_idx = idx
            start = time.perf_counter()
            T._iteration(opts, env, state, reals, stats)
            times.append(time.perf_counter() - start)
        seconds[kind] = min(times[1:])
    t = seconds["main"] + (seconds["pl"] - seconds["main"]) / opts.pl_interval \
        + (seconds["r1"] - seconds["pl"]) / opts.r1_interval
    return {"resolution": res, "batch": opts.batch, "cfg": opts.cfg,
            "G_params": sum(p.numel() for p in state.G.parameters()),
            "D_params": sum(p.numel() for p in state.D.parameters()),
            "seconds_per_iteration": {k: round(v, 3) for k, v in seconds.items()},
            "amortised_seconds_per_iteration": round(t, 3),
            "images_per_second": round(opts.batch / t, 2),
            "sec_per_kimg": round(1000 * t / opts.batch, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    torch.manual_seed(0)
    out = {"benchmark": "train", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": platform.machine(), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            out["cases"][name] = time_case(name, args.repeats, Path(tmp))
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
