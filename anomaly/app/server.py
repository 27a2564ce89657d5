"""The web application of `anostyle serve` and the code that starts it.

Why FastAPI on uvicorn: uvicorn is a production ASGI server (HTTP/1.1 through h11, keep-alive
timeouts, clean shutdown on Ctrl-C; its connection limit is replaced here, see 'connections'
below), so the page can stay up on a lab server without a separate web server
in front; FastAPI (on Starlette) hands us the raw request stream, so uploads are parsed in
memory and cut off at the size limit instead of being spooled to temporary files, returns JSON
errors by default, and ships an in-process test client for the API tests. Flask + waitress
would serve as well, but its request parsing spools large uploads to disk and its test
client does not exercise the streaming path.

Routes (nothing else is served; no static folder, no directory listing, no API docs page):
  GET  /            the page (page.html: inline CSS/JS, no external resources)
  GET  /healthz     {"status": "ok"} for monitoring (needs no token)
  GET  /login       with a token: a form that sets the session cookie (POST /login)
  GET  /api/info    model name and resolution, method, kappa, feature layer, threshold and
                    rule, limits
  POST /api/score   multipart/form-data, one or more files in the field 'image' (repeat the
                    field for several; at most --max-files). Answers {"results": [one object
                    per file, in order]} with name (the client's file name), model, width,
                    height, resolution, method, score, pixel_term, feature_term, kappa,
                    feature_layer, percentile, percentile_note, reference_count, decision,
                    threshold, threshold_rule, comparison, warnings, and images {input,
                    reconstruction, residual} as PNG data URLs (left out with ?images=false).
                    method is 'izif' or the tuned detector's (`serve --model DIR`); a detector
                    has no izif terms and settings (pixel_term, feature_term, kappa,
                    feature_layer are null) and, when it computes no reconstruction, null
                    reconstruction and residual. A request is all or nothing: one bad file
                    answers a 4xx {"detail": one sentence naming the file} and scores nothing;
                    a score that is not a finite number is a 500, never a decision.

Fail closed, off loopback too:
  login        with a token (--token / ANOSTYLE_TOKEN; required off loopback unless --no-auth),
               every route but /healthz and /login needs 'Authorization: Bearer <token>' or the
               session cookie the login form sets (HttpOnly, SameSite=Strict); comparisons are
               constant-time;
  Host         only the names in --allowed-hosts (loopback names when bound to loopback), against
               DNS rebinding; a POST's Origin must be this scheme://host exactly (so an https page
               cannot post to an http server, nor another site to this one);
  time         request headers within --header-timeout (a connection that drips them is closed),
               the body within --request-timeout, and decoding + scoring within what is left of
               it (503 after); whatever the route, a connection whose request is not answered
               within --request-timeout + REQUEST_GRACE is closed (timed_protocol);
  connections  every error answer (4xx, 5xx) closes its connection, and so does an answer given
               before the request's body was read; at most REQUEST_LIMIT requests are answered
               at once, counted once their body has arrived (Admission: a client that sends a
               request head and then nothing holds no place); at most CONNECTION_LIMIT open
               connections, a new one beyond closing the one that waited longest without a
               request being answered; bytes of upload bodies being received at once are
               bounded (uploads.BodyBudget: BODY_BUDGET_UPLOADS x --max-upload-mb), 503 beyond;
  memory       decoded bytes per request (--max-decoded-mb) and decoding memory across requests
               (uploads.DecodeBudget: 8 bytes x --max-pixels) are bounded; an image that
               would need more (e.g. 24 megapixels with transparency) is refused.
Inference runs under one lock (one image at a time through the networks); decoding runs outside
it, in the DecodeBudget.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import math
import os
import re
import socket
import threading
import time
from importlib import resources
from typing import Callable, Sequence
from urllib.parse import parse_qs

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from anomaly.app.access import LOOPBACK_NAMES, AccessOptions
from anomaly.app.model import ServeModel, ServeOptions, load_serve_model
from anomaly.app.uploads import (BodyBudget, BodyBudgetFull, DecodeBudget, Upload, UploadError,
                                 UploadLimits, fit_upload, read_headers, read_uploads)
from stylegan.errors import UserError

DECODE_BYTES_PER_PIXEL = 8  # decoding budget: 8 bytes x --max-pixels (192 MB at 24 MP)
SMALL_DECODE = 16 * 2**20  # images estimated below this decode in a lane of their own
SESSION_COOKIE = "anostyle_session"
LOGIN_BODY_BYTES = 4096
REQUEST_LIMIT = 64  # requests whose body has arrived, answered at once; 503 beyond
CONNECTION_LIMIT = 512  # open connections; beyond, the longest-waiting one without a request
#                         being answered is closed (503 for the newcomer when all are busy)
BODY_BUDGET_UPLOADS = 16  # bytes of upload bodies in flight: this many times --max-upload-mb
REQUEST_GRACE = 2.0  # s after --request-timeout before the connection itself is closed
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
    """ASGI middleware: SECURITY_HEADERS on every HTTP response (kept where a route set one),
    and 'connection: close' on every error answer (status >= 400): the rest of a request that
    was refused is never read, so its connection must not stay open waiting for it."""

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
                if message["status"] >= 400 and b"connection" not in present:
                    extra.append((b"connection", b"close"))
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


class Refusal(Exception):
    """A request the server cannot answer with a result (5xx): status and one sentence."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _time_limit(seconds: float) -> Refusal:
    return Refusal(503, f"Scoring took longer than the server's limit of {seconds:g} s (a busy "
                        f"server or large images); try again with fewer or smaller images.")


class Inference:
    """Fits and scores uploads: decoding within a DecodeBudget, networks under one lock, the
    whole request before a monotonic deadline."""

    def __init__(self, model: ServeModel, limits: UploadLimits, *, model_name: str,
                 timeout: float):
        self.model, self.limits = model, limits
        self.model_name, self.timeout = model_name, timeout
        self.lock = threading.Lock()
        capacity = max(limits.max_pixels * DECODE_BYTES_PER_PIXEL, SMALL_DECODE)
        self.budget = DecodeBudget(capacity, small=SMALL_DECODE)

    def __call__(self, uploads: Sequence[Upload], *, images: bool, deadline: float
                 ) -> list[dict]:
        scorer = self.model.scorer
        headers = read_headers(list(uploads), self.limits, draft_size=scorer.resolution)
        for upload, header in zip(uploads, headers):
            if not self.budget.admits(header.work_bytes):
                raise UploadError(413, f"'{upload.name}' would need about "
                                       f"{header.work_bytes / 2**20:.0f} MB of memory to decode "
                                       f"({header.width}x{header.height} with transparency or "
                                       f"16-bit colour), over the server's budget of "
                                       f"{self.budget.capacity / 2**20:.0f} MB; send it as JPEG "
                                       f"or as an 8-bit PNG without transparency.")
        fitted = []
        for upload, header in zip(uploads, headers):  # all checked before any inference
            try:
                with self.budget.hold(header.work_bytes, deadline=deadline):
                    fitted.append(fit_upload(upload, policy=scorer.policy,
                                             max_pixels=self.limits.max_pixels))
            except TimeoutError:
                raise _time_limit(self.timeout) from None
        if not self.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise _time_limit(self.timeout)
        try:
            scores = []
            for upload, (image, _size) in zip(uploads, fitted):
                if time.monotonic() > deadline:
                    raise _time_limit(self.timeout)
                scores.append(checked_score(scorer(image), upload.name))
        finally:
            self.lock.release()
        return [self.result(upload, size, s, images=images)
                for upload, (_image, size), s in zip(uploads, fitted, scores)]

    def result(self, upload: Upload, size: tuple[int, int], s, *, images: bool) -> dict:
        scorer = self.model.scorer
        result = {"name": upload.name, "model": self.model_name, "width": size[0],
                  "height": size[1], "resolution": scorer.resolution, "method": s.method,
                  "score": s.score, "pixel_term": s.pixel_term, "feature_term": s.feature_term,
                  "kappa": scorer.kappa, "feature_layer": scorer.feature_layer,
                  **self.model.answer(s), "warnings": list(self.model.notes)}
        if images:
            pictures = {"input": s.image, "reconstruction": s.reconstruction,
                        "residual": s.residual}
            result["images"] = {k: None if v is None else png_data_url(v)
                                for k, v in pictures.items()}
        return result


def checked_score(s, name: str):
    """`s` when its score and its terms (those it has) are finite numbers; a Refusal (500)
    otherwise: a detector that cannot score must never answer 'normal'."""
    terms = [v for v in (s.pixel_term, s.feature_term) if v is not None]
    if all(math.isfinite(v) for v in (s.score, *terms)):
        return s
    raise Refusal(500, f"The model gave a non-finite score for '{name}', so it gives no "
                       f"decision; its network or encoder file is damaged: tell the operator "
                       f"of this server.")


# ----------------------------------------------------------------------------------------------
# Login, Host names, Origin


def host_name(host: str | None) -> str:
    """'Example.org:8000' -> 'example.org'; '[::1]:80' -> '[::1]'."""
    host = (host or "").strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def same_origin(origin: str | None, host: str | None, scheme: str) -> bool:
    """True unless the browser says the request comes from another origin (CSRF): the Origin
    must be exactly `scheme`://`host`, so an https page cannot post to an http server."""
    if origin is None:
        return True  # not a browser, or a same-origin GET
    return host is not None and origin.rstrip("/").lower() == f"{scheme}://{host}".lower()


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class Login:
    """The token and the session value derived from it; constant-time checks."""

    def __init__(self, token: str):
        self._token = _digest(token)
        self.session = hmac.new(token.encode(), b"anostyle-session", "sha256").hexdigest()

    def token_ok(self, given: str) -> bool:
        return hmac.compare_digest(_digest(given), self._token)

    def session_ok(self, given: str) -> bool:
        return hmac.compare_digest(_digest(given), _digest(self.session))

    def allows(self, headers: dict[str, str]) -> bool:
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value and self.token_ok(value.strip()):
            return True
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == SESSION_COOKIE and self.session_ok(value):
                return True
        return False


async def _send_json(send, status: int, detail: str, extra_headers=()) -> None:
    body = JSONResponse({"detail": detail}).body
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *extra_headers]})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """ASGI middleware: Host names, then the token (except for /healthz and /login)."""

    OPEN_PATHS = ("/healthz", "/login")

    def __init__(self, app, *, login: Login | None, allowed_hosts: Sequence[str] | None):
        self.app, self.login = app, login
        self.allowed = None if allowed_hosts is None else {host_name(h) for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        host = host_name(headers.get("host"))
        if self.allowed is not None and "*" not in self.allowed and host not in self.allowed:
            return await _send_json(send, 400, f"This server does not answer to the host name "
                                               f"'{host[:80]}'; use one of its allowed names "
                                               f"(--allowed-hosts).")
        if self.login is None or scope["path"] in self.OPEN_PATHS \
                or self.login.allows(headers):
            return await self.app(scope, receive, send)
        if scope["method"] in ("GET", "HEAD") and scope["path"] == "/":
            response = RedirectResponse("login", status_code=303)
            return await response(scope, receive, send)
        await _send_json(send, 401, "This server needs its token: send 'Authorization: Bearer "
                                    "<token>', or log in on its page.",
                         [(b"www-authenticate", b'Bearer realm="anostyle"')])


class Admission:
    """ASGI middleware: at most `limit` requests at once, each counted from when its body has
    arrived (at once for a request without a body) until it is answered; beyond, a 503. A
    client that sends a request head and then nothing never holds a place: the connection's
    time limits (timed_protocol) cut it off instead."""

    def __init__(self, app, *, limit: int):
        self.app, self.limit, self.active = app, limit, 0  # one event loop: no lock needed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held = False

        def take() -> None:
            nonlocal held
            if held:
                return
            if self.active >= self.limit:
                raise Refusal(503, f"The server is answering {self.limit} requests already; "
                                   f"try again in a few seconds.")
            self.active += 1
            held = True

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                take()  # the body is complete: from now on the request costs memory and time
            return message

        headers = dict(scope.get("headers", []))
        try:
            if headers.get(b"content-length", b"0").strip() in (b"", b"0") \
                    and b"transfer-encoding" not in headers:
                try:
                    take()
                except Refusal as exc:
                    return await _send_json(send, 503, exc.message, [(b"retry-after", b"10")])
            await self.app(scope, counted_receive, send)
        finally:
            if held:
                self.active -= 1


LOGIN_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>AnoStyle - log in</title></head>
<body><h1>AnoStyle</h1><p>{message}</p>
<form method="post" action="login"><label>Token <input name="token" type="password"
autocomplete="current-password" autofocus required></label> <button>Log in</button></form>
</body></html>
"""
LOGIN_POLICY = ("default-src 'none'; form-action 'self'; base-uri 'none'; "
                "frame-ancestors 'none'")


def login_routes(app: FastAPI, login: Login, *, timeout: float) -> None:
    """GET /login (the form) and POST /login (token -> session cookie, redirect to the page)."""

    def form(message: str, status: int) -> HTMLResponse:
        return HTMLResponse(LOGIN_PAGE.format(message=message), status_code=status,
                            headers={"content-security-policy": LOGIN_POLICY})

    @app.get("/login", response_class=HTMLResponse)
    def login_form() -> HTMLResponse:
        return form("This server needs its token.", 200)

    @app.post("/login")
    async def login_post(request: Request):
        if not same_origin(request.headers.get("origin"), request.headers.get("host"),
                           request.url.scheme):
            raise UploadError(403, "Cross-site logins are refused; use the page of this server.")
        body = b""
        try:
            async with asyncio.timeout(timeout):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > LOGIN_BODY_BYTES:
                        raise UploadError(413, "The login form is too large.")
        except TimeoutError:
            raise UploadError(408, f"The login form did not arrive within {timeout:g} s."
                              ) from None
        given = parse_qs(body.decode("latin-1")).get("token", [""])[0]
        if not login.token_ok(given):
            await asyncio.sleep(0.5)  # slows guessing down
            return form("Wrong token; try again.", 401)
        response = RedirectResponse("./", status_code=303)
        response.set_cookie(SESSION_COOKIE, login.session, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")
        return response


# ----------------------------------------------------------------------------------------------
# The application


def _flag(value: str, name: str) -> bool:
    """A boolean query parameter: true/false, 1/0, yes/no; anything else one sentence."""
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if value.lower() not in words:
        raise UploadError(400, f"The query parameter '{name}' must be true or false, not "
                               f"'{value[:40]}'.")
    return words[value.lower()]


def create_app(model: ServeModel, limits: UploadLimits, *,
               allowed_hosts: Sequence[str] | None = None, token: str | None = None,
               request_timeout: float = 60.0, model_name: str = "AnoStyle model") -> FastAPI:
    """The ASGI application.

    allowed_hosts: Host header names accepted (None: any; '*' in it: any).
    token: the login token (None: no login). request_timeout: seconds for the body, decoding
    and scoring of one request.
    """
    app = FastAPI(title="AnoStyle", docs_url=None, redoc_url=None, openapi_url=None)
    page, policy = page_and_policy()
    inference = Inference(model, limits, model_name=model_name, timeout=request_timeout)
    bodies = BodyBudget(BODY_BUDGET_UPLOADS * limits.max_bytes)
    login = None if token is None else Login(token)

    @app.exception_handler(UploadError)
    async def upload_error(_request: Request, exc: UploadError) -> JSONResponse:
        # close: the rest of a refused body (a slow or oversized upload) is never read
        return JSONResponse({"detail": exc.message}, status_code=exc.status,
                            headers={"connection": "close"})

    @app.exception_handler(Refusal)
    async def refusal(_request: Request, exc: Refusal) -> JSONResponse:
        headers = {"connection": "close", **({"retry-after": "10"} if exc.status == 503 else {})}
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body"))
        return JSONResponse({"detail": f"The request's {where or 'input'} is invalid "
                                       f"({first.get('msg', 'unknown reason')})."},
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

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
        return {**model.info(), "model": model_name, "field": "image",
                "max_upload_bytes": limits.max_bytes, "max_files": limits.max_files,
                "max_pixels": limits.max_pixels, "max_decoded_bytes": limits.max_decoded_bytes,
                "request_timeout": request_timeout}

    @app.post("/api/score")
    async def score(request: Request, images: str = "true") -> dict:
        deadline = time.monotonic() + request_timeout
        want_images = _flag(images, "images")
        if not same_origin(request.headers.get("origin"), request.headers.get("host"),
                           request.url.scheme):
            raise UploadError(403, "Cross-site uploads are refused; use the page of this server.")
        try:
            async with asyncio.timeout(request_timeout):
                uploads = await read_uploads(request.headers.get("content-type"),
                                             request.headers.get("content-length"),
                                             request.stream(), limits, budget=bodies)
        except BodyBudgetFull:
            raise Refusal(503, f"The server is receiving {bodies.capacity / 2**20:g} MB of "
                               f"other uploads; try again in a few seconds.") from None
        except TimeoutError:
            raise UploadError(408, f"The upload did not arrive within the server's limit of "
                                   f"{request_timeout:g} s; send it again over a faster "
                                   f"connection, or fewer images at once.") from None
        return {"results": await run_in_threadpool(inference, uploads, images=want_images,
                                                   deadline=deadline)}

    if login is not None:
        login_routes(app, login, timeout=request_timeout)
    app.add_middleware(Admission, limit=REQUEST_LIMIT)  # inside Gate: a 401 takes no place
    app.add_middleware(Gate, login=login, allowed_hosts=allowed_hosts)
    app.add_middleware(SecurityHeaders)
    return app


# ----------------------------------------------------------------------------------------------
# Starting the server


def upload_limits(opts: ServeOptions, access: AccessOptions | None = None) -> UploadLimits:
    access = access or AccessOptions()
    return UploadLimits(max_bytes=int(opts.max_upload_mb * 2**20), max_files=opts.max_files,
                        max_pixels=opts.max_pixels,
                        max_decoded_bytes=int(access.max_decoded_mb * 2**20))


def default_hosts(host: str) -> tuple[str, ...]:
    """Host names accepted when --allowed-hosts is not given: loopback names when bound to
    loopback, else this machine's name, its full name and the bound address (if specific)."""
    if host in LOOPBACK_NAMES:
        return LOOPBACK_NAMES
    names = {socket.gethostname(), socket.getfqdn()}
    if host not in ("0.0.0.0", "::", "[::]", ""):
        names.add(host)
    return tuple(sorted(n.lower() for n in names if n)) + LOOPBACK_NAMES


def model_name(opts: ServeOptions) -> str:
    """The name answers carry: the network and encoder file names (resolved options), after
    the model folder's name with --model."""
    files = f"{os.path.basename(opts.network)} + {os.path.basename(opts.encoder)}"
    if opts.model is None:
        return files
    return f"{os.path.basename(os.path.normpath(opts.model))}: {files}"


def describe(info: dict) -> str:
    """The score, threshold and reference of the startup line, from ServeModel.info()."""
    score = (f"izif kappa {info['kappa']:g} ({info['feature_layer']})"
             if info["method"] == "izif" else f"detector {info['method']}")
    return (f"{score}, threshold {info['threshold']:.6g} ({info['threshold_rule']}, "
            f"{info['comparison']}), {info['reference_count']} validation naevi")


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


def timed_protocol(*, header_timeout: float, request_timeout: float,
                   connection_limit: int):
    """uvicorn's h11 protocol with limits on every connection, whatever the route:
      headers   the request line and headers within `header_timeout` of the connection opening
                (or of its previous answer), else a 408 and the connection is closed;
      request   the whole request answered within `request_timeout` + REQUEST_GRACE of its
                headers, else the connection is closed (after a 408 or 503 when nothing was
                answered yet); the routes' own limits answer before, with their own sentence;
      body      after an answer, a request whose body was not read to its end closes the
                connection (uvicorn would discard the rest for as long as the client sends it);
      count     at most `connection_limit` connections: a new one beyond closes the one that has
                waited longest without a request being answered (idle, or still sending its
                head or body), or gets a 503 when every connection is being answered.
    uvicorn itself only limits idle keep-alive time, and its limit_concurrency counts open
    connections, which clients that send nothing can fill."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._timer, self._phase, self._since = None, None, time.monotonic()
            self._arm("headers")
            if len(self.connections) > connection_limit:
                self._make_room()

        def answering(self) -> bool:
            """A complete request whose answer is being made."""
            return (self.conn.their_state in (h11.DONE, h11.MUST_CLOSE)
                    and self.conn.our_state in (h11.SEND_RESPONSE, h11.SEND_BODY))

        def _make_room(self) -> None:
            waiting = [c for c in self.connections if c is not self
                       and not c.transport.is_closing() and not c.answering()]
            if waiting:
                min(waiting, key=lambda c: c._since)._close_with(None)
            else:
                self._close_with((503, "The server is answering as many connections as it "
                                       "takes; try again in a few seconds."))

        def _arm(self, phase: str | None) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._phase = None, phase
            if phase is not None:
                seconds = header_timeout if phase == "headers" else request_timeout + REQUEST_GRACE
                self._timer = self.loop.call_later(seconds, self._too_slow)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._phase == "headers" and self.conn.their_state is not h11.IDLE:
                self._arm("request")  # the request head has arrived

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing():
                return
            ours, theirs = self.conn.our_state, self.conn.their_state
            if theirs is h11.IDLE:  # ready for the next request
                self._since = time.monotonic()
                self._arm("headers")
            elif ours is h11.DONE and theirs is not h11.DONE:  # answered before its body came
                self._close_with(None)
            elif ours is h11.SEND_RESPONSE:  # a pipelined request has begun
                self._arm("request")

        def connection_lost(self, exc) -> None:
            self._arm(None)
            super().connection_lost(exc)

        def _too_slow(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if self._phase == "headers":
                if self.conn.their_state is h11.IDLE:
                    self._close_with((408, f"The request headers did not arrive within the "
                                           f"server's limit of {header_timeout:g} s."))
            elif self.cycle is None or not self.cycle.response_started:
                complete = self.conn.their_state in (h11.DONE, h11.MUST_CLOSE)
                self._close_with((503, f"The answer took longer than the server's limit of "
                                       f"{request_timeout:g} s; try again.") if complete else
                                 (408, f"The request did not arrive within the server's limit "
                                       f"of {request_timeout:g} s."))
            else:  # answering, but the client does not read the answer
                self._close_with(None)

        def _close_with(self, answer: tuple[int, str] | None) -> None:
            """Close the connection, after writing `answer` (status, sentence) if given; the
            request being handled (if any) sees a disconnect and writes nothing more."""
            self._arm(None)
            if self.cycle is not None:
                self.cycle.disconnected = True
            if answer is not None:
                status, detail = answer
                body = json.dumps({"detail": detail}).encode()
                reason = {408: b"Request Timeout", 503: b"Service Unavailable"}[status]
                self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                                     b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
                                     % (status, reason, len(body), body))
            self.transport.close()

    return TimedProtocol


def uvicorn_server(app, *, log_level: str = "info",
                   header_timeout: float = AccessOptions.header_timeout,
                   request_timeout: float = AccessOptions.request_timeout,
                   proxy: str | None = None):
    """A uvicorn Server for `app` (HTTP/1.1 via h11, no websockets, no lifespan events), with
    the connection limits of timed_protocol (uvicorn's own limit_concurrency is off).

    proxy: address(es) whose X-Forwarded-Proto/For are trusted (None: none).
    """
    import uvicorn

    protocol = timed_protocol(header_timeout=header_timeout, request_timeout=request_timeout,
                              connection_limit=CONNECTION_LIMIT)
    config = uvicorn.Config(app, http=protocol, loop="asyncio",
                            ws="none", lifespan="off", log_level=log_level,
                            limit_concurrency=None, timeout_keep_alive=5,
                            server_header=False, proxy_headers=proxy is not None,
                            forwarded_allow_ips=proxy)
    return uvicorn.Server(config)


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """glibc only: serve every allocation of `threshold` bytes or more with mmap, so that a
    decoded image's buffers go back to the system when freed. glibc's default threshold grows
    to 32 MB after the first large free, after which decoded images land in (per-thread) heap
    arenas that stay resident. Returns False where mallopt is unavailable."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def run_server(opts: ServeOptions, access: AccessOptions | None = None, *,
               announce: Callable[[str], None] = print) -> None:
    """Load the model once, then serve until interrupted (Ctrl-C)."""
    import torch

    opts = opts.check().resolve()
    access = (access or AccessOptions()).resolve(opts.host)
    torch.set_num_threads(opts.threads or min(4, os.cpu_count() or 1))
    return_freed_memory()
    model = load_serve_model(opts)
    hosts = access.allowed_hosts or default_hosts(opts.host)
    app = create_app(model, upload_limits(opts, access), allowed_hosts=hosts,
                     token=access.token, request_timeout=access.request_timeout,
                     model_name=model_name(opts))
    sock = bind_socket(opts.host, opts.port)
    port = sock.getsockname()[1]
    info = model.info()
    announce(f"AnoStyle serving http://{opts.host}:{port}/ - {info['resolution']} px, "
             f"{describe(info)}")
    for note in [info["percentile_note"], *info["notes"]]:
        if note:
            announce(f"note: {note}")
    announce(f"login: {'token required' if access.token else 'none'}; host names accepted: "
             f"{', '.join(hosts)}")
    if access.no_auth and opts.host not in LOOPBACK_NAMES:
        announce(f"warning: --no-auth with --host {opts.host}: anyone who reaches this port can "
                 f"use the page; keep it behind a firewall or a reverse proxy with a login.")
    uvicorn_server(app, header_timeout=access.header_timeout,
                   request_timeout=access.request_timeout, proxy=access.proxy).run(sockets=[sock])


class BackgroundServer:
    """uvicorn serving `app` on a free loopback port in a daemon thread (tests, benchmarks)."""

    def __init__(self, app, *, host: str = "127.0.0.1", log_level: str = "warning",
                 header_timeout: float = AccessOptions.header_timeout,
                 request_timeout: float = AccessOptions.request_timeout):
        self.app, self.host, self.log_level = app, host, log_level
        self.header_timeout, self.request_timeout = header_timeout, request_timeout
        self.port = 0
        self._server = self._thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        sock = bind_socket(self.host, 0)
        self.port = sock.getsockname()[1]
        self._server = uvicorn_server(self.app, log_level=self.log_level,
                                      header_timeout=self.header_timeout,
                                      request_timeout=self.request_timeout)
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
