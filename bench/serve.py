"""`anostyle serve` latency and throughput on loopback: POST /api/score against a real uvicorn
server, for the network `--cfg cpu` trains (64 px, cbase 2048, cmax 128, 128-d W, random
weights: speed does not depend on them) and the encoder `train-encoder` builds for it (as wide
as D), izif at D layer b8 with kappa 1.

Each request uploads one HAM10000 JPEG (200x150, from ../shared/data when present, else a
generated 200x150 PNG) and gets the full answer, three PNG data URLs included. Requests are
bounded (`--requests`, default 100 per concurrency level) and go to 127.0.0.1 only. Reports
p50/p95 latency and requests/s at concurrency 1 and `--concurrency` (default 8), with the
server's torch threads. Prints one JSON object.
Usage: `.venv/bin/python bench/serve.py [--requests 100] [--concurrency 8] [--threads 2]`
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from anomaly.app.model import ServeOptions, load_serve_model
from anomaly.app.server import LOOPBACK_NAMES, BackgroundServer, create_app, upload_limits
from anomaly.encoder import Encoder, EncoderConfig
from anomaly.encoder_io import save_encoder
from anomaly.evaluate import EvaluateOptions, write_summary
from anomaly.sheets import write_score_sheet
from stylegan.checkpoint import save_networks
from stylegan.networks import Discriminator, DiscriminatorConfig, Generator, GeneratorConfig

G_CFG = GeneratorConfig(z_dim=128, w_dim=128, img_resolution=64, mapping_layers=2,
                        channel_base=2048, channel_max=128)
D_CFG = DiscriminatorConfig(img_resolution=64, channel_base=2048, channel_max=128)
HAM_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000" / "images"


def build_model_files(root: Path) -> ServeOptions:
    """Random cpu-preset G/D, a matching encoder, a score sheet and a summary, under `root`."""
    torch.manual_seed(0)
    G, D = Generator(G_CFG).eval(), Discriminator(D_CFG).eval()
    cfg = EncoderConfig(img_resolution=64, img_channels=3, num_ws=G.num_ws, w_dim=G.w_dim,
                        channel_base=D_CFG.channel_base, channel_max=D_CFG.channel_max)
    save_networks(root / "net.safetensors", G=G, D=D, G_ema=G)
    save_encoder(root / "encoder.safetensors", Encoder(cfg, w_avg=G.mapping.w_avg),
                 extra={"training_options": {"kappa": 1.0, "feature_layer": "b8"}})
    scores = np.random.default_rng(0).gamma(2.0, 0.05, 200)  # a plausible val-naevi spread
    write_score_sheet(pd.DataFrame({"score": scores, "label": 0, "class": "nv", "split": "val",
                                    "file": [f"{i}.png" for i in range(200)]}),
                      root / "scores" / "izif.xlsx")
    write_summary(pd.DataFrame([{"method": "izif", "comparison": "nv vs mel",
                                 "threshold": float(np.percentile(scores, 95)),
                                 "threshold_rule": "p95 (val)"}]),
                  EvaluateOptions(scores_dir=root / "scores", outdir=root), [])
    return ServeOptions(str(root / "net.safetensors"), str(root / "encoder.safetensors"),
                        str(root / "summary.json"), device="cpu")


def upload_image() -> tuple[str, bytes]:
    jpgs = sorted(HAM_IMAGES.glob("*.jpg")) if HAM_IMAGES.is_dir() else []
    if jpgs:
        return jpgs[0].name, jpgs[0].read_bytes()
    noise = np.random.default_rng(1).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    return "generated.png", buf.getvalue()


def one_request(port: int, body: bytes) -> tuple[int, float]:
    """(HTTP status, seconds) of one POST /api/score on a fresh connection."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/api/score", body=body,
                     headers={"content-type": "multipart/form-data; boundary=BENCH"})
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - start
    finally:
        conn.close()


def measure(port: int, body: bytes, *, requests: int, concurrency: int) -> dict:
    one_request(port, body)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda _: one_request(port, body), range(requests)))
    wall = time.perf_counter() - start
    latency = np.array([seconds for _status, seconds in answers]) * 1000
    return {"concurrency": concurrency, "requests": requests,
            "errors": sum(status != 200 for status, _ in answers),
            "p50_ms": round(float(np.percentile(latency, 50)), 1),
            "p95_ms": round(float(np.percentile(latency, 95)), 1),
            "requests_per_s": round(requests / wall, 2)}


def run(requests: int, concurrency: int) -> dict:
    name, data = upload_image()
    body = (b'--BENCH\r\nContent-Disposition: form-data; name="image"; filename="'
            + name.encode() + b'"\r\nContent-Type: image/jpeg\r\n\r\n' + data
            + b"\r\n--BENCH--\r\n")
    with tempfile.TemporaryDirectory() as tmp:
        opts = build_model_files(Path(tmp))
        model = load_serve_model(opts)
    app = create_app(model, upload_limits(opts), allowed_hosts=LOOPBACK_NAMES)
    with BackgroundServer(app) as server:
        levels = [measure(server.port, body, requests=requests, concurrency=c)
                  for c in sorted({1, concurrency})]
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "load_avg": os.getloadavg(),
            "model": "cpu preset: 64 px, cbase 2048, cmax 128, 128-d W; encoder as wide as D; "
                     "izif kappa 1 at D b8; random weights",
            "upload": f"{name} ({len(data)} bytes), answer with 3 PNG data URLs",
            "results": levels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100, help="requests per level")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch threads [min(4, cores), as serve]")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or min(4, os.cpu_count() or 1))
    start = time.perf_counter()
    results = run(args.requests, args.concurrency)
    results["bench_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
