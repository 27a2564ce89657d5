"""GPU readiness check: one JSON report on whether AnoStyle's CUDA paths work and how fast they
are, in a few minutes on one CUDA machine.

Checks (each reports its own numbers, `ok` and any error; one failing check does not stop the
others):
- fp16_vs_fp32      G and D of paper256's shape with the float16 blocks (num_fp16_res 4) and the
                    activation clamp (256) on, against the same networks in float32: relative
                    errors of G's image (training and inference modulated conv) and D's logits;
- mixed_precision   a few complete training iterations (G, path length, D, R1) with the float16
                    blocks: every loss and every weight stays finite;
- training_speed    s/kimg and img/s at 256 px (paper256, batch 16) and 64 px (paper256, batch 16;
                    and the `cpu` preset), lazy regularisation amortised as in bench/train.py;
- torchrun          `torchrun --nproc-per-node N` (N = 2 with two GPUs or more, else 1): an NCCL
                    all-reduce in every process, then `train-gan` for a few iterations;
- encoder_scoring   izif encoder training (images/s) and `score` throughput of all methods, through
                    the public anomaly functions;
plus the CUDA settings in force and the peak GPU memory of each check.

Without CUDA it prints one JSON line saying so and exits 0. Every check is a function of the
device, so the tests run them on the CPU with tiny networks (float16 forced on the CPU, gloo
instead of NCCL). Usage: `python bench/gpu_check.py [--device cuda:0]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/gpu_check.py` puts bench/ first, not the root
    sys.path.insert(0, str(ROOT))

from bench.train import make_zip, summarise, time_training  # noqa: E402
from stylegan import networks as nw  # noqa: E402
from stylegan.networks import (Discriminator, DiscriminatorConfig, Generator,  # noqa: E402
                               GeneratorConfig)

# Tolerances of `ok`: float16 carries 11 significant bits; NVlabs' float16 blocks (with weight
# normalisation and clamping) stay within a few per cent of float32.
FP16_MAX_RELATIVE_ERROR = 0.05


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _float16_context(device: torch.device):
    # The float16 blocks compute float16 on CUDA by themselves; on a CPU the check forces them.
    return nw.float16_on_any_device() if device.type != "cuda" else contextlib.nullcontext()


def _peak_memory(device: torch.device) -> Callable[[], float | None]:
    """Resets the device's peak-memory counter; the returned function reads it in MiB."""
    if device.type != "cuda":
        return lambda: None
    torch.cuda.reset_peak_memory_stats(device)
    return lambda: round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def check_fp16_vs_fp32(device: torch.device, *, resolution: int = 256, channel_base: int = 16384,
                       channel_max: int = 512, batch: int = 4, num_fp16_res: int = 4,
                       conv_clamp: float = 256, seed: int = 0) -> dict:
    """Relative error of G's image and D's logits with the float16 blocks against float32."""
    torch.manual_seed(seed)
    G = Generator(GeneratorConfig(img_resolution=resolution, channel_base=channel_base,
                                  channel_max=channel_max, num_fp16_res=num_fp16_res,
                                  conv_clamp=conv_clamp)).to(device).requires_grad_(False)
    D = Discriminator(DiscriminatorConfig(img_resolution=resolution, channel_base=channel_base,
                                          channel_max=channel_max, num_fp16_res=num_fp16_res,
                                          conv_clamp=conv_clamp)).to(device).requires_grad_(False)
    z = torch.randn([batch, G.z_dim], device=device)
    out: dict = {"resolution": resolution, "num_fp16_res": num_fp16_res,
                 "conv_clamp": conv_clamp}
    with torch.no_grad(), _float16_context(device):
        for mode, training in (("G_inference", False), ("G_training", True)):
            G.train(training)  # training: plain modulated conv; inference on CUDA: grouped conv
            full = G(z, None, noise_mode="const", force_fp32=True)
            half = G(z, None, noise_mode="const")
            out[f"{mode}_relative_error"] = _relative_error(half, full)
            out[f"{mode}_finite"] = bool(torch.isfinite(half).all())
        img = full.clamp(-1, 1)
        logits_full = D(img, None, force_fp32=True)
        logits_half = D(img, None)
        out["D_logits_relative_error"] = _relative_error(logits_half, logits_full)
        feats_full = D.block_features(img, force_fp32=True)
        feats_half = D.block_features(img)
        out["D_features_max_relative_error"] = max(
            _relative_error(feats_half[k], feats_full[k]) for k in feats_full)
    errors = [v for k, v in out.items() if k.endswith("relative_error")]
    out["ok"] = all(math.isfinite(e) and e < FP16_MAX_RELATIVE_ERROR for e in errors) and \
        out["G_inference_finite"] and out["G_training_finite"]
    return out


def _train_options(data: Path, outdir: Path, device: torch.device, **flags):
    from stylegan.options import TrainFlags, resolve

    return resolve(TrainFlags(outdir=str(outdir), data=str(data), workers=0,
                              device=device.type, **flags)).options


def check_mixed_precision_steps(device: torch.device, tmp: Path, *, resolution: int = 256,
                                steps: int = 3, flags: dict | None = None) -> dict:
    """A few iterations with every phase (Gmain, path length, Dmain, R1) with the float16 blocks:
    losses and weights stay finite."""
    from stylegan import train as T

    flags = dict(cfg="paper256", batch=8, mbstd_group=4) if flags is None else flags
    data = make_zip(tmp / f"mixed{resolution}.zip", resolution, n=16)
    opts = _train_options(data, tmp / "mixed-runs", device, **flags)
    assert opts.generator.num_fp16_res > 0, "the options must enable the float16 blocks"
    torch.manual_seed(0)
    with _float16_context(device):
        step = T.TrainingStep(opts, T.Dist(device=device))
        losses: dict[str, list[float]] = {}
        for _ in range(steps):
            step(batch_idx=0)  # all four phases
            for name, values in step.stats.values.items():
                losses.setdefault(name, []).extend(values)
            step.stats.values.clear()
    weights_finite = all(bool(torch.isfinite(p).all()) for net in (step.state.G, step.state.D)
                         for p in net.parameters())
    losses_finite = all(math.isfinite(v) for values in losses.values() for v in values)
    return {"resolution": resolution, "steps": steps, "num_fp16_res": opts.generator.num_fp16_res,
            "conv_clamp": opts.generator.conv_clamp,
            "losses": {k: [round(v, 4) for v in vals] for k, vals in losses.items()},
            "weights_finite": weights_finite, "ok": weights_finite and losses_finite}


GPU_SPEED_CASES = {
    "paper256_256px": (256, dict(cfg="paper256", batch=16)),
    "paper256_64px": (64, dict(cfg="paper256", batch=16)),
    "cpu_preset_64px": (64, dict(cfg="cpu")),
}


def check_training_speed(device: torch.device, tmp: Path, *, cases: dict | None = None,
                         repeats: int = 2) -> dict:
    """s/kimg and img/s of complete training iterations per case (bench/train.py's method)."""
    cases = GPU_SPEED_CASES if cases is None else cases
    out: dict = {}
    for name, (res, flags) in cases.items():
        peak = _peak_memory(device)
        (tmp / name).mkdir(parents=True, exist_ok=True)
        timing = time_training(res, flags, repeats, tmp / name, device=device)
        figures = summarise(timing)
        out[name] = {"resolution": res, "batch": timing["batch"],
                     "images_per_second": figures["images_per_second"],
                     "sec_per_kimg": figures["sec_per_kimg"],
                     "seconds_per_iteration": figures["seconds_per_iteration"],
                     "peak_memory_mib": peak()}
    out["ok"] = all(math.isfinite(v["sec_per_kimg"]) for v in out.values())
    return out


def check_torchrun(device: torch.device, tmp: Path, *, nproc: int | None = None,
                   resolution: int = 64, flags: tuple[str, ...] | None = None,
                   timeout: float = 300) -> dict:
    """`torchrun --nproc-per-node N` on this script's `--dist-child`: a few training iterations
    through train-gan, whose gradients go through the process group (NCCL on CUDA, gloo on
    CPU); with one process an explicit all-reduce checks the group."""
    if nproc is None:
        nproc = min(2, torch.cuda.device_count()) if device.type == "cuda" else 1
    nproc = max(nproc, 1)
    data = make_zip(tmp / f"torchrun{resolution}.zip", resolution, n=16)
    flags = flags or ("--cfg", "cpu", "--batch", str(4 * nproc), "--kimg", "0.032",
                      "--tick", "0.016", "--snap", "1")
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", str(nproc),
           str(Path(__file__).resolve()), "--dist-child", device.type,
           "--", "--outdir", str(tmp / "torchrun-runs"), "--data", str(data), "--workers", "0",
           "--device", device.type, *flags]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    out: dict = {"nproc": nproc, "backend": "nccl" if device.type == "cuda" else "gloo",
                 "seconds": round(time.perf_counter() - start, 1), "returncode": proc.returncode}
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    # helper ranks leave without interpreter teardown once the run is written (stylegan.train),
    # so only the main process reports
    if proc.returncode != 0 or not any(r["rank"] == 0 for r in reports):
        out["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1][:500]
        out["ok"] = False
        return out
    main = next(r for r in reports if r["rank"] == 0)
    out["all_reduce_ok"] = bool(main["all_reduce_ok"])
    out["kimg"], out["stats"] = main["kimg"], main["stats"]
    out["ok"] = out["all_reduce_ok"] and main["kimg"] > 0 and main["finite"]
    return out


def _dist_child(device_type: str, train_args: list[str]) -> None:
    """Runs under torchrun. With several processes train-gan itself runs on the process group
    (broadcast, gradient all-reduce, replica check); with one it needs none, so this process
    opens the group (NCCL on CUDA) for one all-reduce first."""
    import torch.distributed as dist

    from anomaly.cli import main as cli

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    all_reduce_ok = None
    if world == 1:
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local) if device_type == "cuda" else torch.device("cpu")
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        x = torch.full([4], 3.0, device=device)
        dist.all_reduce(x)
        all_reduce_ok = bool((x == 3.0).all())
        dist.destroy_process_group()
    try:
        cli.main(["train-gan", *train_args], standalone_mode=False)
    except SystemExit as exit_:
        if exit_.code:
            raise
    stats, kimg, finite = {}, 0.0, True
    if rank == 0:
        outdir = Path(train_args[train_args.index("--outdir") + 1])
        run_dir = max(outdir.iterdir(), key=lambda p: p.name)
        stats = json.loads((run_dir / "stats.jsonl").read_text().splitlines()[-1])
        kimg = stats["kimg"]
        finite = all(math.isfinite(v) for v in stats.values() if isinstance(v, float))
        if world > 1:  # every gradient went through the all-reduce; the replicas must agree
            all_reduce_ok = f"replicas identical across {world}" in \
                (run_dir / "log.txt").read_text()
    print(json.dumps({"rank": rank, "all_reduce_ok": all_reduce_ok, "kimg": kimg,
                      "finite": finite, "stats": stats}), flush=True)


def check_encoder_and_scoring(device: torch.device, tmp: Path, *, resolution: int = 64,
                              images: int = 256, iters: int = 40, channel_base: int = 2048,
                              channel_max: int = 128) -> dict:
    """izif encoder training images/s and `score` images/s (all default methods)."""
    from anomaly.model.fit import FitOptions, fit_encoder
    from anomaly.scoring.score import ScoreOptions, score_datasets
    from stylegan.checkpoint import save_networks

    torch.manual_seed(0)
    G = Generator(GeneratorConfig(z_dim=128, w_dim=128, img_resolution=resolution,
                                  mapping_layers=2, channel_base=channel_base,
                                  channel_max=channel_max))
    D = Discriminator(DiscriminatorConfig(img_resolution=resolution, channel_base=channel_base,
                                          channel_max=channel_max))
    network = save_networks(tmp / "net.safetensors", G=G, D=D, G_ema=G)
    data = make_zip(tmp / f"encoder{resolution}.zip", resolution, n=images)
    peak = _peak_memory(device)
    tick = max(iters // 2, 1)
    encoder = fit_encoder(FitOptions(network=str(network), data=str(data),
                                     outdir=str(tmp / "encoder"), iters=iters, batch=16, snap=0,
                                     tick=tick, workers=0, device=str(device)),
                          echo=lambda message: None)
    records = [json.loads(line) for line in open(tmp / "encoder" / "stats.jsonl")]
    sec_per_iter = records[-1]["sec_per_iter"]
    train = {"batch": 16, "iters": iters, "sec_per_iter": sec_per_iter,
             "images_per_second": round(16 / sec_per_iter, 2), "peak_memory_mib": peak()}
    peak = _peak_memory(device)
    start = time.perf_counter()
    score_datasets(ScoreOptions(network=str(network), encoder=str(encoder), data=(str(data),),
                                outdir=str(tmp / "scores"), batch=64, device=str(device)))
    seconds = time.perf_counter() - start
    score = {"images": images, "seconds": round(seconds, 2),
             "images_per_second": round(images / seconds, 1), "peak_memory_mib": peak()}
    ok = math.isfinite(sec_per_iter) and any((tmp / "scores").iterdir())
    return {"resolution": resolution, "train_encoder": train, "score": score, "ok": ok}


def cuda_settings() -> dict:
    """The CUDA backend settings in force (TF32, cuDNN autotuning)."""
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def run_checks(checks: dict[str, Callable[[], dict]], *, device: torch.device) -> dict:
    """Run each check, recording its seconds, peak memory and any error instead of stopping."""
    results: dict = {}
    for name, check in checks.items():
        start = time.perf_counter()
        peak = _peak_memory(device)
        try:
            results[name] = check()
            results[name].setdefault("peak_memory_mib", peak())
        except Exception as error:  # noqa: BLE001 - the report names it; other checks go on
            results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:500]}
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
    return results


def _peaks(report) -> list[float]:
    """Every peak_memory_mib figure in a nested report."""
    if not isinstance(report, dict):
        return []
    own = [v for k, v in report.items() if k == "peak_memory_mib" and v is not None]
    return own + [p for v in report.values() for p in _peaks(v)]


def gpu_report(device: torch.device, tmp: Path) -> dict:
    from stylegan.train import cuda_backend_settings

    cuda_backend_settings(device)  # what train-gan sets on CUDA
    checks = {
        "fp16_vs_fp32": lambda: check_fp16_vs_fp32(device),
        "mixed_precision": lambda: check_mixed_precision_steps(device, tmp),
        "training_speed": lambda: check_training_speed(device, tmp),
        "torchrun": lambda: check_torchrun(device, tmp),
        "encoder_scoring": lambda: check_encoder_and_scoring(device, tmp),
    }
    start = time.perf_counter()
    results = run_checks(checks, device=device)
    return {"gpu_check": "ran", "device": str(device),
            "name": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "cuda": torch.version.cuda, "settings": cuda_settings(),
            "ok": all(r.get("ok", False) for r in results.values()), "checks": results,
            "peak_memory_mib": max(_peaks(results), default=None),
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dist-child", default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.dist_child is not None:
        _dist_child(args.dist_child, [a for a in rest if a != "--"])
        return
    if not torch.cuda.is_available():
        print(json.dumps({"gpu_check": "skipped", "reason": "no CUDA device is available",
                          "torch": torch.__version__, "cuda_build": torch.version.cuda}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(gpu_report(torch.device(args.device), Path(tmp)), indent=2))


if __name__ == "__main__":
    main()
