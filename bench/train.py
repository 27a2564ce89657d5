"""Training throughput on this machine: images/s and s/kimg of complete StyleGAN2-ADA training
iterations (ADA on, lazy regularisation amortised) for `--cfg cpu` at 64 px and a paper256-shaped
network with a small channel budget at 256 px, plus peak RSS.

Lazy regularisation is amortised exactly: one iteration is timed in each of its three kinds
(main phases only; + path length, every 4th; + R1, every 16th), and
    t = t_main + (t_pl - t_main) / 4 + (t_r1 - t_pl) / 16.

`--baseline DIR` also times an older checkout of this repository (e.g. `git worktree add
/tmp/anostyle-base <commit>`), in alternating child processes so that both see the same machine
load; each figure is the fastest of its repeats and rounds. Prints one JSON object.
Usage: `.venv/bin/python bench/train.py [--repeats 2] [--rounds 2] [--baseline DIR]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CASES = {
    # name: (resolution, flags beyond the data)
    "cpu64": (64, dict(cfg="cpu")),
    # paper256's shape (8 mapping layers, 512-d latents, resnet D) with channels 16 at 256 px up
    # to 128 at 32 px and below, at a CPU-sized batch.
    "small256": (256, dict(cfg="paper256", batch=4, mbstd_group=4, cbase=4096, cmax=128)),
    # The full paper256 network (24.8 M parameters in G): minutes per iteration kind.
    "paper256": (256, dict(cfg="paper256", batch=4, mbstd_group=4)),
}
KINDS = {"main": 1, "pl": 4, "r1": 0}  # batch_idx that selects each kind of iteration


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


def _training_step(opts, device: torch.device):
    """A callable running one iteration with `batch_idx`, and the state it trains."""
    from stylegan import train as T

    if hasattr(T, "TrainingStep"):
        step = T.TrainingStep(opts, T.Dist(device=device))
        return (lambda idx: step(batch_idx=idx)), step.state
    # Checkouts before the public TrainingStep (commit 201b02a and older): their private names.
    env = T.Dist(device=device)
    state, _ = T._build_state(opts, env, None)
    reals = T._real_batches(T.ImageDataset(opts.data), opts, env, start=0)
    stats = T._StatsCollector()

    def run(idx: int) -> None:
        state.batch_idx = idx
        T._iteration(opts, env, state, reals, stats)
    return run, state


def time_kinds(name: str, repeats: int, tmp: Path) -> dict:
    """Fastest wall-clock seconds of each iteration kind (after one warm-up) in this process."""
    res, flags = CASES[name]
    return time_training(res, flags, repeats, tmp, device=torch.device("cpu"))


def time_training(res: int, flags: dict, repeats: int, tmp: Path, *,
                  device: torch.device) -> dict:
    """Per-kind fastest seconds (wall and CPU) of training iterations on random `res` px data."""
    from stylegan.options import TrainFlags, resolve

    data = make_zip(tmp / f"data{res}.zip", res)
    opts = resolve(TrainFlags(outdir=str(tmp / "runs"), data=str(data), workers=0,
                              device=device.type, **flags)).options
    torch.manual_seed(0)
    step, state = _training_step(opts, device)
    if state.augment is not None:
        state.augment.p.fill_(0.5)  # ADA at work on every image D sees
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds, cpu_seconds = {}, {}
    for kind, idx in KINDS.items():
        times, cpu_times = [], []
        for _ in range(repeats + 1):  # the first run warms up
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            step(idx)
            sync()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        seconds[kind], cpu_seconds[kind] = min(times[1:]), min(cpu_times[1:])
    return {"resolution": res, "batch": opts.batch, "cfg": opts.cfg,
            "pl_interval": opts.pl_interval, "r1_interval": opts.r1_interval,
            "G_params": sum(p.numel() for p in state.G.parameters()),
            "D_params": sum(p.numel() for p in state.D.parameters()), "seconds": seconds,
            "cpu_seconds": cpu_seconds}


def _amortised(s: dict, timing: dict) -> float:
    return s["main"] + (s["pl"] - s["main"]) / timing["pl_interval"] \
        + (s["r1"] - s["pl"]) / timing["r1_interval"]


def summarise(timing: dict) -> dict:
    """img/s and s/kimg of one case from its per-kind seconds (lazy regularisation amortised).

    The `cpu_` figures divide by the process's CPU time instead of wall-clock time: with one
    thread on a machine that other jobs share, they are what a quiet machine would show.
    """
    s = timing["seconds"]
    t, cpu = _amortised(s, timing), _amortised(timing["cpu_seconds"], timing)
    return {"seconds_per_iteration": {k: round(v, 3) for k, v in s.items()},
            "amortised_seconds_per_iteration": round(t, 3),
            "images_per_second": round(timing["batch"] / t, 2),
            "sec_per_kimg": round(1000 * t / timing["batch"], 1),
            "cpu_images_per_second": round(timing["batch"] / cpu, 2),
            "cpu_sec_per_kimg": round(1000 * cpu / timing["batch"], 1)}


def _child(code_dir: Path, case: str, repeats: int, threads: int | None) -> dict:
    """time_kinds in a fresh process that imports stylegan from `code_dir`."""
    env = dict(os.environ, PYTHONPATH=str(code_dir))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case,
           "--repeats", str(repeats)] + ([] if threads is None else ["--threads", str(threads)])
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare(cases: list[str], *, baseline: Path, current: Path, repeats: int, rounds: int,
            threads: int | None) -> dict:
    """Before (baseline) and after (current) side by side, alternating rounds; fastest wins."""
    results: dict = {}
    for case in cases:
        best: dict[str, dict] = {}
        for _ in range(rounds):
            for label, code in (("before", baseline), ("after", current)):
                timing = _child(code, case, repeats, threads)
                if label in best:
                    for key in ("seconds", "cpu_seconds"):
                        timing[key] = {k: min(v, best[label][key][k])
                                       for k, v in timing[key].items()}
                best[label] = timing
        before, after = summarise(best["before"]), summarise(best["after"])
        results[case] = {"resolution": best["after"]["resolution"],
                         "batch": best["after"]["batch"], "before": before, "after": after,
                         "speedup": round(after["images_per_second"]
                                          / before["images_per_second"], 2),
                         "cpu_speedup": round(after["cpu_images_per_second"]
                                              / before["cpu_images_per_second"], 2)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternations with --baseline")
    parser.add_argument("--cases", default="cpu64,small256")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                        "torch's choice)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="an older checkout to time side by side")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(time_kinds(args.child, args.repeats, Path(tmp))))
        return
    out = {"benchmark": "train", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": platform.machine(), "load_average_start": os.getloadavg()}
    cases = args.cases.split(",")
    if args.baseline is not None:
        current = Path(__file__).resolve().parents[1]
        out["baseline"] = str(args.baseline)
        out["cases"] = compare(cases, baseline=args.baseline, current=current,
                               repeats=args.repeats, rounds=args.rounds, threads=args.threads)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out["cases"] = {}
            for name in cases:
                timing = time_kinds(name, args.repeats, Path(tmp))
                out["cases"][name] = {"resolution": timing["resolution"],
                                      "batch": timing["batch"], "G_params": timing["G_params"],
                                      "D_params": timing["D_params"], **summarise(timing)}
        out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["load_average_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
