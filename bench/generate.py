"""Generator throughput on this machine: images/s at 64 px (the `cpu` preset's network) and at
256 px (paper256-shaped), batch 1 and 16, plain vs fused modulated convolution, plus peak RSS.

Prints one JSON object. Usage: `.venv/bin/python bench/generate.py [--seconds 8]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from dataclasses import asdict

import torch

from stylegan.networks import Generator, GeneratorConfig

CONFIGS = {
    # The network `--cfg cpu` trains (stylegan/presets.py: cbase 2048, cmax 128, 128-d W).
    "cpu64": GeneratorConfig(z_dim=128, w_dim=128, img_resolution=64, mapping_layers=2,
                             channel_base=2048, channel_max=128),
    # paper256-shaped (Karras et al. 2020, ADA paper): 256 px, 8 mapping layers, 512-d W.
    "paper256": GeneratorConfig(z_dim=512, w_dim=512, img_resolution=256, mapping_layers=8,
                                channel_base=16384, channel_max=512),
}
BATCHES = (1, 16)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def images_per_second(G: Generator, *, batch: int, fused: bool, seconds: float) -> dict:
    """Time G at one batch size for about `seconds` (at least one timed call after a warm-up)."""
    z = torch.randn(batch, G.z_dim)
    with torch.inference_mode():
        start = time.perf_counter()
        G(z, None, fused_modconv=fused)  # warm-up, also the first timing sample
        warm = time.perf_counter() - start
        calls, elapsed = 0, 0.0
        if warm < seconds / 2:
            while elapsed < seconds / 2 or calls == 0:
                start = time.perf_counter()
                G(z, None, fused_modconv=fused)
                elapsed += time.perf_counter() - start
                calls += 1
        else:  # one call already takes most of the budget: report it
            calls, elapsed = 1, warm
    return {"batch": batch, "path": "fused" if fused else "plain", "calls": calls,
            "images_per_s": round(batch * calls / elapsed, 3),
            "ms_per_image": round(1000 * elapsed / (batch * calls), 2)}


def run(seconds: float) -> dict:
    torch.manual_seed(0)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(),
               "machine": platform.machine(), "cpus": os.cpu_count(),
               "load_average_before": [round(v, 2) for v in os.getloadavg()],
               "seconds_per_case": seconds, "configs": {}}
    for name, cfg in CONFIGS.items():
        G = Generator(cfg).eval()
        params = sum(p.numel() for p in G.parameters())
        rows = [images_per_second(G, batch=batch, fused=fused, seconds=seconds)
                for batch in BATCHES for fused in (False, True)]
        results["configs"][name] = {"config": asdict(cfg), "num_ws": G.num_ws,
                                    "parameters": params, "results": rows,
                                    "peak_rss_mib_so_far": round(peak_rss_mib(), 1)}
        del G
    results["peak_rss_mib"] = round(peak_rss_mib(), 1)
    # Other processes compete for the cores: read the figures together with this.
    results["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="time budget per (config, batch, path) case; one call at least")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(run(args.seconds), indent=2))


if __name__ == "__main__":
    main()
