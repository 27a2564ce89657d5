"""The web application of `anostyle serve` and the code that starts it.

Why FastAPI on uvicorn: uvicorn is a production ASGI server (HTTP/1.1 through h11, keep-alive
timeouts, a connection limit that answers 503 instead of queueing without bound, clean
shutdown on Ctrl-C), so the page can stay up on a lab server without a separate web server
in front; FastAPI (on Starlette) hands us the raw request stream, so uploads are parsed in
memory and cut off at the size limit instead of being spooled to temporary files, returns JSON
errors by default, and ships an in-process test client for the API tests. Flask + waitress
would serve as well, but its request parsing spools large uploads to disk and its test
client does not exercise the streaming path.

Routes (nothing else is served; no static folder, no directory listing, no API docs page):
  GET  /            the page (page.html: inline CSS/JS, no external resources)
  GET  /healthz     {"status": "ok"} for monitoring
  GET  /api/info    model resolution, kappa, feature layer, threshold and rule, upload limits
  POST /api/score   multipart/form-data, one or more files in the field 'image' (repeat the
                    field for several; at most --max-files). Answers {"results": [one object
                    per file, in order]} with name, width, height, resolution, score,
                    pixel_term, feature_term, kappa, feature_layer, percentile,
                    percentile_note, reference_count, decision, threshold, threshold_rule,
                    comparison, and images {input, reconstruction, residual} as PNG data URLs
                    (left out with ?images=false). A request is all or nothing: one bad file
                    answers a 4xx {"detail": message naming the file} and scores nothing.
Inference runs under one lock (one image at a time through the networks); decoding runs in
at most two threads at once, outside the lock.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import socket
import threading
from importlib import resources
from typing import Callable, Sequence

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.middleware.trustedhost import TrustedHostMiddleware

from anomaly.app.model import ServeModel, ServeOptions, load_serve_model
from anomaly.app.uploads import Upload, UploadError, UploadLimits, fit_upload, read_uploads
from stylegan.errors import UserError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
DECODE_THREADS = 2
CONNECTION_LIMIT = 64  # uvicorn answers 503 beyond this many open connections + tasks
SECURITY_HEADERS = (  # on every response; the page replaces the CSP with its own
    ("content-security-policy", "default-src 'none'; frame-ancestors 'none'"),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cross-origin-resource-policy", "same-origin"),
    ("cache-control", "no-store"),
)


# ----------------------------------------------------------------------------------------------
# The page and its Content-Security-Policy


def page_and_policy() -> tuple[str, str]:
    """page.html and a CSP that allows exactly its one inline <style> and <script> (by hash)."""
    page = resources.files("anomaly.app").joinpath("page.html").read_text(encoding="utf-8")
    hashes = {}
    for tag in ("style", "script"):
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
        assert len(blocks) == 1, f"page.html must hold exactly one inline <{tag}>"
        digest = base64.b64encode(hashlib.sha256(blocks[0].encode("utf-8")).digest()).decode()
        hashes[tag] = f"'sha256-{digest}'"
    policy = (f"default-src 'none'; script-src {hashes['script']}; style-src {hashes['style']}; "
              f"img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
              f"frame-ancestors 'none'")
    return page, policy


class SecurityHeaders:
    """ASGI middleware: SECURITY_HEADERS on every HTTP response (kept where a route set one)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS
                         if k.encode() not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# ----------------------------------------------------------------------------------------------
# The application


def png_data_url(image_hwc: np.ndarray) -> str:
    """uint8 [H, W, C] (C = 1 or 3) -> 'data:image/png;base64,...'."""
    array = image_hwc[:, :, 0] if image_hwc.shape[2] == 1 else image_hwc
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Inference:
    """Fits and scores uploads: decoding in at most DECODE_THREADS threads, networks under
    one lock."""

    def __init__(self, model: ServeModel, limits: UploadLimits):
        self.model, self.limits = model, limits
        self.lock = threading.Lock()
        self.decoding = threading.BoundedSemaphore(DECODE_THREADS)

    def __call__(self, uploads: Sequence[Upload], *, images: bool) -> list[dict]:
        scorer = self.model.scorer
        fitted = []
        for upload in uploads:  # all checked before any inference: all or nothing
            with self.decoding:
                fitted.append(fit_upload(upload, policy=scorer.policy,
                                         max_pixels=self.limits.max_pixels))
        with self.lock:
            scores = [scorer(image) for image, _size in fitted]
        results = []
        for upload, (_image, (width, height)), s in zip(uploads, fitted, scores):
            result = {"name": upload.name, "width": width, "height": height,
                      "resolution": scorer.resolution, "score": s.score,
                      "pixel_term": s.pixel_term, "feature_term": s.feature_term,
                      "kappa": scorer.kappa, "feature_layer": scorer.feature_layer,
                      **self.model.judge(s.score)}
            if images:
                result["images"] = {"input": png_data_url(s.image),
                                    "reconstruction": png_data_url(s.reconstruction),
                                    "residual": png_data_url(s.residual)}
            results.append(result)
        return results


def _same_origin(origin: str | None, host: str | None) -> bool:
    """True unless the browser says the request comes from another site (CSRF)."""
    if origin is None:
        return True  # not a browser, or a same-origin GET
    return host is not None and origin.split("://", 1)[-1].rstrip("/").lower() == host.lower()


def create_app(model: ServeModel, limits: UploadLimits, *,
               allowed_hosts: Sequence[str] | None = None) -> FastAPI:
    """The ASGI application. `allowed_hosts`: Host header names accepted (None: any)."""
    app = FastAPI(title="AnoStyle", docs_url=None, redoc_url=None, openapi_url=None)
    page, policy = page_and_policy()
    inference = Inference(model, limits)

    @app.exception_handler(UploadError)
    async def upload_error(_request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, _exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": "Internal error of the server; see its log."},
                            status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"content-security-policy": policy})

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/api/info")
    def info() -> dict:
        return {**model.info(), "field": "image", "max_upload_bytes": limits.max_bytes,
                "max_files": limits.max_files, "max_pixels": limits.max_pixels}

    @app.post("/api/score")
    async def score(request: Request, images: bool = True) -> dict:
        if not _same_origin(request.headers.get("origin"), request.headers.get("host")):
            raise UploadError(403, "Cross-site uploads are refused; use the page of this server.")
        uploads = await read_uploads(request.headers.get("content-type"),
                                     request.headers.get("content-length"), request.stream(),
                                     limits)
        return {"results": await run_in_threadpool(inference, uploads, images=images)}

    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.add_middleware(SecurityHeaders)
    return app


# ----------------------------------------------------------------------------------------------
# Starting the server


def upload_limits(opts: ServeOptions) -> UploadLimits:
    return UploadLimits(max_bytes=int(opts.max_upload_mb * 2**20), max_files=opts.max_files,
                        max_pixels=opts.max_pixels)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port); a busy port or unknown host is a UserError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on --host {host} --port {port} ({exc.strerror or exc}); "
                        f"choose a free --port or another --host.") from None
    return sock


def uvicorn_server(app, *, log_level: str = "info"):
    """A uvicorn Server for `app` (HTTP/1.1 via h11, no websockets, no lifespan events)."""
    import uvicorn

    config = uvicorn.Config(app, http="h11", loop="asyncio", ws="none", lifespan="off",
                            log_level=log_level, limit_concurrency=CONNECTION_LIMIT,
                            timeout_keep_alive=5, server_header=False, proxy_headers=False)
    return uvicorn.Server(config)


def run_server(opts: ServeOptions, *, announce: Callable[[str], None] = print) -> None:
    """Load the model once, then serve until interrupted (Ctrl-C)."""
    import torch

    opts = opts.check()
    torch.set_num_threads(opts.threads or min(4, os.cpu_count() or 1))
    model = load_serve_model(opts)
    loopback = opts.host in LOOPBACK_NAMES
    app = create_app(model, upload_limits(opts),
                     allowed_hosts=LOOPBACK_NAMES if loopback else None)
    sock = bind_socket(opts.host, opts.port)
    port = sock.getsockname()[1]
    info = model.info()
    announce(f"AnoStyle serving http://{opts.host}:{port}/ - {info['resolution']} px, izif "
             f"kappa {info['kappa']:g} ({info['feature_layer']}), threshold "
             f"{info['threshold']:.6g} ({info['threshold_rule']}, {info['comparison']}), "
             f"{info['reference_count']} validation naevi")
    for note in [info["percentile_note"], *info["notes"]]:
        if note:
            announce(f"note: {note}")
    if not loopback:
        announce(f"warning: --host {opts.host} makes the page reachable from other machines; "
                 f"it has no login, so keep it behind a firewall or a reverse proxy with auth.")
    uvicorn_server(app).run(sockets=[sock])


class BackgroundServer:
    """uvicorn serving `app` on a free loopback port in a daemon thread (tests, benchmarks)."""

    def __init__(self, app, *, host: str = "127.0.0.1", log_level: str = "warning"):
        self.app, self.host, self.log_level = app, host, log_level
        self.port = 0
        self._server = self._thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        sock = bind_socket(self.host, 0)
        self.port = sock.getsockname()[1]
        self._server = uvicorn_server(self.app, log_level=self.log_level)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        daemon=True)
        self._thread.start()
        for _ in range(1000):
            if self._server.started or not self._thread.is_alive():
                break
            threading.Event().wait(0.01)
        if not self._server.started:
            self.__exit__()
            raise RuntimeError(f"uvicorn did not start on {self.url}")
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
