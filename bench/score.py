"""Scoring throughput and memory: `anostyle score` (every default method: izif + the distances,
all from one forward pass per batch, on 2 threads) over N images at 64 px
with the `cpu` preset's networks and the default encoder, in a fresh process per size, so the
peak RSS of scoring 1,000 and 10,000 images can be compared (streaming: it should not grow).

Then (`--configs`) the tuned detector's configurations (anomaly/methods/detector.py), each alone,
with and without TTA (8 rotations/flips), in this process on 2 threads: images per second of the
Scorer over `--config-images` fitted images (the bank fitted on 256 other images first; the
time is the scoring alone, as `score` and `serve` spend it per batch of 64).

Last (`--model DIR`, default models/ham64-cpu), the model folder's own tuned detector with its
real networks: images per second of `AnoModel.open(DIR).detector.score_batch`, as `score --model`
and `serve --model` spend it.

Prints one JSON object. Usage: `.venv/bin/python bench/score.py [--sizes 1000,10000]
[--configs knn-latent:5,...] [--config-images 512] [--model models/ham64-cpu]`.
"""

from __future__ import annotations

import argparse
import json
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

from anomaly.model.encoder import Encoder, EncoderConfig
from anomaly.model.encoder_io import save_encoder
from anomaly.model.ano_model import DEFAULT_METHODS
from stylegan.checkpoint import save_networks
from stylegan.networks import Discriminator, DiscriminatorConfig, Generator, GeneratorConfig

RES = 64


def make_networks(folder: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    G = Generator(GeneratorConfig(z_dim=128, w_dim=128, img_resolution=RES, mapping_layers=2,
                                  channel_base=2048, channel_max=128))
    D = Discriminator(DiscriminatorConfig(img_resolution=RES, channel_base=2048, channel_max=128))
    network = save_networks(folder / "net.safetensors", G=G, D=D, G_ema=G)
    # As wide as D, which is what `anostyle train-encoder` builds by default.
    E = Encoder(EncoderConfig(img_resolution=RES, img_channels=3, num_ws=G.num_ws, w_dim=G.w_dim,
                              channel_base=2048, channel_max=128), w_avg=G.mapping.w_avg)
    encoder = folder / "encoder-000001.safetensors"
    save_encoder(encoder, E)
    return network, encoder


def make_zip(path: Path, n: int) -> Path:
    """n distinct 64 px PNGs (random blocks upsampled: compressible, quick to decode)."""
    rng = np.random.RandomState(1)
    labels = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for i in range(n):
            small = rng.randint(0, 256, (8, 8, 3), dtype=np.uint8)
            img = np.kron(small, np.ones((RES // 8, RES // 8, 1), dtype=np.uint8))
            buf = BytesIO()
            Image.fromarray(img).save(buf, "PNG", compress_level=1)
            zf.writestr(f"img{i:06d}.png", buf.getvalue())
            labels.append([f"img{i:06d}.png", i % 2])
        zf.writestr("dataset.json", json.dumps({"labels": labels}))
    return path


CHILD = """
import json, resource, sys, time
import torch
from anomaly.scoring.score import ScoreOptions, score_datasets
net, enc, data, out, methods = sys.argv[1:6]
torch.set_num_threads(2)
start = time.perf_counter()
score_datasets(ScoreOptions(network=net, encoder=enc, data=(data,), outdir=out, batch=64,
                            device="cpu", methods=methods))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


DETECTOR_CONFIGS = ("residual:mean,residual:p99,residual:smax:2,izif:1,dfeat-res:b8+b16+b32,"
                    "knn-latent:5,maha-latent,knn-dfeat:b8:5,knn-dfeat:b16:5,maha-dfeat:b16")


def bench_configs(network: Path, encoder: Path, methods: list[str], n: int) -> dict:
    """Images per second (wall) and CPU milliseconds per image of each (method, TTA)
    configuration alone, scoring n images."""
    from anomaly.methods import detector as det
    from anomaly.model.ano_model import AnoModel

    torch.set_num_threads(2)
    model = AnoModel.load(network, encoder, device="cpu")
    rng = np.random.RandomState(2)
    train = [torch.from_numpy(rng.randint(0, 256, (64, 3, RES, RES)).astype(np.uint8))
             for _ in range(4)]
    bank = det.build_bank(model, train, det.needs_of(methods, model), modes=("plain", "tta"),
                          dims=64, bank_size=2000)
    images = torch.from_numpy(rng.randint(0, 256, (n, 3, RES, RES)).astype(np.uint8))
    out = {}
    for method in methods:
        for tta in (False, True):
            scorer = det.Scorer(model, [(method, tta)], bank=bank)
            out[det.config_name(method, tta)] = time_scoring(scorer.score_batch, images)
    return out


def time_scoring(score_batch, images: torch.Tensor) -> dict:
    """Images per second (wall) and CPU ms per image of `score_batch` over `images` in batches
    of 64, after a warm-up. cpu_ms_per_image counts all threads: on a shared machine the wall
    figure drops while this one stays (2 free cores give at most 2000 / cpu_ms images/s)."""
    n = len(images)
    score_batch(images[:8])  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, n, 64):
        score_batch(images[i:i + 64])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"images_per_second": round(n / wall, 1), "cpu_ms_per_image": round(1000 * cpu / n, 2)}


def bench_detector(model_dir: str, n: int) -> dict:
    """Images per second (wall) and CPU ms per image of a model folder's own tuned detector
    (detector.json on its networks: every component from one pass per batch of 64, as `score
    --model` and `serve --model` spend it), on n random fitted images."""
    from anomaly.model.ano_model import AnoModel

    torch.set_num_threads(2)
    model = AnoModel.open(model_dir, device="cpu")
    scorer = model.detector
    res = model.resolution
    images = torch.from_numpy(np.random.RandomState(3).randint(
        0, 256, (n, model.channels, res, res)).astype(np.uint8))
    return {"model": model_dir, "method": scorer.detector.method, "resolution": res,
            **time_scoring(scorer.score_batch, images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="izif + the distance methods (all six) by default")
    parser.add_argument("--configs", default=DETECTOR_CONFIGS,
                        help="detector configurations to time alone ('' for none)")
    parser.add_argument("--config-images", type=int, default=512)
    parser.add_argument("--model", default="models/ham64-cpu",
                        help="a model folder whose own detector.json is timed ('' for none)")
    args = parser.parse_args()
    out = {"benchmark": "score", "resolution": RES, "methods": args.methods, "threads": 2,
           "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        network, encoder = make_networks(tmp)
        for n in (int(s) for s in args.sizes.split(",")):
            data = make_zip(tmp / f"test{n}.zip", n)
            res = subprocess.run([sys.executable, "-c", CHILD, str(network), str(encoder),
                                  str(data), str(tmp / f"scores{n}"), args.methods],
                                 capture_output=True, text=True, check=True)
            rec = json.loads(res.stdout.strip().splitlines()[-1])
            out["sizes"][str(n)] = {"seconds": round(rec["seconds"], 1),
                                    "images_per_second": round(n / rec["seconds"], 1),
                                    "peak_rss_mib": round(rec["peak_rss_mib"], 1)}
        if args.configs:
            out["configurations_images_per_second"] = bench_configs(
                network, encoder, [m for m in args.configs.split(",") if m],
                args.config_images)
    if args.model:
        out["detector"] = bench_detector(args.model, args.config_images)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
