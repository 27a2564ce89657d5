"""`anostyle serve` latency and throughput on loopback: POST /api/score against a real uvicorn
server, for the network `--cfg cpu` trains (64 px, cbase 2048, cmax 128, 128-d W, random
weights: speed does not depend on them) and the encoder `train-encoder` builds for it (as wide
as D), izif at D layer b8 with kappa 1.

Each request uploads one HAM10000 JPEG (200x150, from ../shared/data when present, else a
generated 200x150 PNG) and gets the full answer, three PNG data URLs included. Requests are
bounded (`--requests`, default 100 per concurrency level) and go to 127.0.0.1 only. Reports
p50/p95 latency and requests/s at concurrency 1 and `--concurrency` (default 8), with the
server's torch threads. Prints one JSON object.

`--attack` instead starts the real `anostyle serve` command (default limits) in a subprocess per
scenario and reports the server process's peak resident memory (VmHWM from /proc) while it is
sent decompression-amplifying PNGs: `--attack-requests` (2) concurrent requests of
`--attack-files` (2) files each, and how long a normal request takes meanwhile. Scenarios: the
issue's 7000x7000 all-zero 16-bit PNG (95 KB; over the 24-megapixel default, refused from its
header), and the worst the defaults admit: 6000x4000 all-zero 16-bit gray and 8-bit RGBA PNGs.

`--attack idle` starts `anostyle serve` the same way and opens `--idle-clients` (100)
connections that each send `POST /api/info` with `Content-Length: 100000000`, read the answer,
send one body byte and then idle; a closed one is opened again at once, for `--attack-seconds`
(20). Meanwhile a normal request (one image, ?images=false) is sent every 0.25 s and timed, and
the server's resident memory is sampled. Reports the normal requests' statuses and latencies,
how many attack connections were opened, and RSS before, during (peak of the samples) and 3 s
after the attack.
Usage: `.venv/bin/python bench/serve.py [--requests 100] [--concurrency 8] [--threads 2]`
       `.venv/bin/python bench/serve.py --attack [memory | idle]`
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from anomaly.app.model import ServeOptions, load_serve_model
from anomaly.app.access import LOOPBACK_NAMES
from anomaly.app.server import BackgroundServer, create_app, upload_limits
from anomaly.model.encoder import Encoder, EncoderConfig
from anomaly.model.encoder_io import save_encoder
from anomaly.evaluation.evaluate import EvaluateOptions, write_summary
from anomaly.evaluation.sheets import write_score_sheet
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


# ----------------------------------------------------------------------------------------------
# Memory under decompression-amplifying uploads


def zero_png(mode: str, width: int, height: int) -> bytes:
    """An all-zero PNG (compresses to a few hundred bytes per megapixel)."""
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def multipart_body(files: list[tuple[str, bytes]]) -> bytes:
    body = b""
    for name, data in files:
        body += (b'--BENCH\r\nContent-Disposition: form-data; name="image"; filename="'
                 + name.encode() + b'"\r\nContent-Type: image/png\r\n\r\n' + data + b"\r\n")
    return body + b"--BENCH--\r\n"


def proc_memory(pid: int) -> dict:
    """VmRSS and VmHWM (peak) of a process, in MB, from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def post_detail(port: int, body: bytes) -> tuple[int, float, str]:
    """(status, seconds, detail or '') of one POST /api/score?images=false."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/api/score?images=false", body=body,
                     headers={"content-type": "multipart/form-data; boundary=BENCH"})
        response = conn.getresponse()
        raw = response.read()
        try:
            detail = str(json.loads(raw or b"{}").get("detail", ""))
        except ValueError:  # not JSON (e.g. uvicorn's own 503)
            detail = raw[:200].decode("latin-1")
        return response.status, time.perf_counter() - start, detail
    finally:
        conn.close()


def start_server(opts: ServeOptions, *, threads: int) -> tuple[subprocess.Popen, int]:
    """`anostyle serve` on a free loopback port in a subprocess; (process, port)."""
    code = "from anomaly.cli import main; main()"
    cmd = [sys.executable, "-c", code, "serve", "--network", opts.network, "--encoder",
           opts.encoder, "--summary", opts.summary, "--port", "0", "--device", "cpu",
           "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        found = re.search(r"serving http://127\.0\.0\.1:(\d+)/", line)
        if found:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            port = int(found.group(1))
            for _ in range(300):  # the socket listens once uvicorn runs
                try:
                    http.client.HTTPConnection("127.0.0.1", port, timeout=5).request(
                        "GET", "/healthz")
                    return proc, port
                except ConnectionRefusedError:
                    time.sleep(0.1)
    raise RuntimeError(f"the server did not start (exit {proc.wait()})")


def attack(opts: ServeOptions, name: str, png: bytes, *, requests: int, files: int,
           normal: bytes, threads: int) -> dict:
    """Peak memory of a fresh server while `requests` concurrent requests of `files` copies of
    `png` run, and the latency of a normal request sent 0.2 s after them."""
    proc, port = start_server(opts, threads=threads)
    try:
        post_detail(port, normal)  # warm-up: the model has run once
        before = proc_memory(proc.pid)
        body = multipart_body([(f"{name}-{i}.png", png) for i in range(files)])
        start = time.perf_counter()
        with ThreadPoolExecutor(requests + 1) as pool:
            attacks = [pool.submit(post_detail, port, body) for _ in range(requests)]
            time.sleep(0.2)
            normal_answer = pool.submit(post_detail, port, normal).result()
            answers = [a.result() for a in attacks]
        seconds = time.perf_counter() - start
        after = proc_memory(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"scenario": name, "png_bytes": len(png), "requests": requests, "files": files,
            "statuses": [status for status, _s, _d in answers],
            "detail": sorted({detail for _st, _s, detail in answers if detail}),
            "seconds": round(seconds, 2), "rss_before_mb": before["VmRSS"],
            "peak_rss_mb": after["VmHWM"], "rss_after_mb": after["VmRSS"],
            "normal_request": {"status": normal_answer[0],
                               "seconds": round(normal_answer[1], 3)}}


IDLE_HEAD = (b"POST /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000000\r\n"
             b"Content-Type: application/octet-stream\r\n\r\n")


def idle_connection(port: int) -> socket.socket | None:
    """The issue's attacker: the head of a large POST /api/info, read the answer, one body byte,
    then nothing. None when the server refused the connection."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=2)
        sock.sendall(IDLE_HEAD)
        answer = b""
        while b"\r\n\r\n" not in answer and (part := sock.recv(65536)):
            answer += part
        sock.sendall(b"x")
        sock.setblocking(False)
        return sock
    except OSError:
        return None


def is_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def idle_attackers(port: int, clients: int, stop: threading.Event, opened: list) -> None:
    """Keep `clients` idle connections open until `stop`: reopen each one the server closes."""
    socks: list[socket.socket] = []
    while not stop.is_set():
        socks = [s for s in socks if not (is_closed(s) and (s.close() or True))]
        while len(socks) < clients and not stop.is_set():
            sock = idle_connection(port)
            opened[0] += 1
            if sock is not None:
                socks.append(sock)
        stop.wait(0.1)
    for sock in socks:
        sock.close()


def idle_attack(opts: ServeOptions, normal: bytes, *, clients: int, seconds: float,
                threads: int) -> dict:
    """Normal requests and the server's RSS while `clients` idle connections are held open."""
    proc, port = start_server(opts, threads=threads)
    try:
        post_detail(port, normal)  # warm-up: the model has run once
        before = proc_memory(proc.pid)["VmRSS"]
        stop, opened = threading.Event(), [0]
        attackers = threading.Thread(target=idle_attackers, args=(port, clients, stop, opened))
        attackers.start()
        time.sleep(2.0)  # the attackers' connections are open
        answers, rss = [], []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            status, took, _detail = post_detail(port, normal)
            answers.append((status, took))
            rss.append(proc_memory(proc.pid)["VmRSS"])
            time.sleep(0.25)
        stop.set()
        attackers.join(timeout=30)
        time.sleep(3.0)
        after = proc_memory(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    took = np.array([t for _s, t in answers]) * 1000
    return {"scenario": f"{clients} idle clients (POST /api/info, Content-Length 100000000, "
                        f"one body byte)", "attack_seconds": seconds,
            "attack_connections_opened": opened[0], "normal_requests": len(answers),
            "normal_statuses": {str(k): int(v) for k, v in zip(*np.unique(
                [s for s, _t in answers], return_counts=True))},
            "normal_p50_ms": round(float(np.percentile(took, 50)), 1),
            "normal_max_ms": round(float(took.max()), 1),
            "all_200_within_1s": all(s == 200 and t < 1.0 for s, t in answers),
            "rss_before_mb": before, "rss_during_max_mb": max(rss),
            "rss_after_mb": after["VmRSS"], "peak_rss_mb": after["VmHWM"]}


def run_idle_attack(clients: int, seconds: float, threads: int) -> dict:
    name, data = upload_image()
    with tempfile.TemporaryDirectory() as tmp:
        opts = build_model_files(Path(tmp))
        result = idle_attack(opts, multipart_body([(name, data)]), clients=clients,
                             seconds=seconds, threads=threads)
    return {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "load_avg": os.getloadavg(), "server": "anostyle serve, default limits, subprocess",
            "results": [result]}


def run_attack(requests: int, files: int, threads: int) -> dict:
    name, data = upload_image()
    normal = multipart_body([(name, data)])
    scenarios = [("7000x7000 16-bit gray", zero_png("I;16", 7000, 7000)),
                 ("6000x4000 16-bit gray", zero_png("I;16", 6000, 4000)),
                 ("6000x4000 8-bit RGBA", zero_png("RGBA", 6000, 4000))]
    with tempfile.TemporaryDirectory() as tmp:
        opts = build_model_files(Path(tmp))
        results = [attack(opts, label, png, requests=requests, files=files, normal=normal,
                          threads=threads) for label, png in scenarios]
    return {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "load_avg": os.getloadavg(), "server": "anostyle serve, default limits, subprocess",
            "target_peak_rss_mb": 600, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100, help="requests per level")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch threads [min(4, cores), as serve]")
    parser.add_argument("--attack", nargs="?", const="memory", choices=("memory", "idle"),
                        help="memory: peak server memory under amplifying PNGs; idle: normal "
                             "requests while idle clients hold connections")
    parser.add_argument("--attack-requests", type=int, default=2)
    parser.add_argument("--attack-files", type=int, default=2)
    parser.add_argument("--idle-clients", type=int, default=100)
    parser.add_argument("--attack-seconds", type=float, default=20.0)
    args = parser.parse_args()
    threads = args.threads or min(4, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    start = time.perf_counter()
    if args.attack == "idle":
        if not 0 < args.idle_clients <= 1000 or not 0 < args.attack_seconds <= 300:
            parser.error("--idle-clients must be 1..1000 and --attack-seconds 1..300")
        results = run_idle_attack(args.idle_clients, args.attack_seconds, threads)
    elif args.attack:
        results = run_attack(args.attack_requests, args.attack_files, threads)
    else:
        results = run(args.requests, args.concurrency)
    results["bench_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
