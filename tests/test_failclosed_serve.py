"""`anostyle serve` fails closed (issue 15): a score that is not a number is an error, never
'normal'; a mismatched encoder is refused; off loopback a token is needed and the Host and
Origin are checked; slow clients are cut off; memory of decoding is bounded; every refusal is
one sentence."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import shutil
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from test_app import (client_for, multipart, nets, options, png_bytes,  # noqa: F401 (fixture)
                      post_images)

from anomaly.app import server as app_server
from anomaly.app import uploads as app_uploads
from anomaly.app.access import AccessOptions
from anomaly.app.model import ServeOptions, load_serve_model
from anomaly.app.server import BackgroundServer, create_app, default_hosts, upload_limits
from anomaly.cli import main
from anomaly.model.encoder_io import load_encoder, save_encoder
from encoder_helpers import one_thread  # noqa: F401 (autouse fixture)
from stylegan.errors import UserError

TOKEN = "correct-horse-battery-staple-42"


@pytest.fixture(scope="module")
def model(nets):  # noqa: F811
    return load_serve_model(options(nets))


def one_sentence(text: str) -> bool:
    return text.endswith(".") and ". " not in text.rstrip(".") and "\n" not in text


# ----------------------------------------------------------------------------------------------
# Item 1: a detector that cannot score never says 'normal'


def test_non_finite_score_is_an_error_never_normal(nets):  # noqa: F811
    """Damage the load check cannot see (here: the loaded encoder's weights set to infinity)
    makes the score NaN; it used to answer 'decision': 'normal'. Now: a 500 with one sentence
    and no decision."""
    model = load_serve_model(options(nets))
    with torch.no_grad():
        model.scorer.model.E.head.weight.fill_(float("inf"))
    client = TestClient(client_for(model).app, raise_server_exceptions=False)
    r = post_images(client, ("lesion.png", nets["png"]))
    assert r.status_code == 500, r.text
    detail = r.json()["detail"]
    assert "non-finite score for 'lesion.png'" in detail and one_sentence(detail), detail
    assert "normal" not in r.text and "decision" not in r.json()


# ----------------------------------------------------------------------------------------------
# Item 2: the encoder must belong to the network


def test_serve_refuses_an_encoder_of_another_network(nets, tmp_path):  # noqa: F811
    E, extra = load_encoder(nets["encoder"])
    other = tmp_path / "encoder-other.safetensors"
    save_encoder(other, E, extra={**extra, "network": {"path": "/runs/b/net.safetensors",
                                                       "sha256": "ab" * 32}})
    with pytest.raises(UserError, match=r"was trained for another network \(net.safetensors, "
                                        r"sha256 abababababab\)"):
        load_serve_model(options(nets, encoder=str(other)))
    allowed = load_serve_model(options(nets, encoder=str(other), allow_mismatch=True))
    r = post_images(client_for(allowed), ("x.png", nets["png"]))
    assert r.status_code == 200
    (warning,) = r.json()["results"][0]["warnings"]
    assert warning.startswith("--allow-mismatch: --encoder encoder-other.safetensors")


def test_answer_shape(nets, model):  # noqa: F811
    client = TestClient(create_app(model, upload_limits(ServeOptions("n", "e", "s")),
                                   model_name="net.safetensors + enc.safetensors"))
    r = post_images(client, ("naevus 1.png", nets["png"]), params={"images": "false"})
    (result,) = r.json()["results"]
    assert result["name"] == "naevus 1.png" and result["model"] == \
        "net.safetensors + enc.safetensors"
    assert {"score", "percentile", "decision", "threshold", "warnings"} <= set(result)
    assert result["decision"] in ("normal", "anomalous") and "images" not in result


def test_images_flag_is_one_sentence(nets, model):  # noqa: F811
    client = client_for(model)
    r = post_images(client, ("x.png", nets["png"]), params={"images": "maybe"})
    assert r.status_code == 400
    assert r.json() == {"detail": "The query parameter 'images' must be true or false, not "
                                  "'maybe'."}
    assert post_images(client, ("x.png", nets["png"]), params={"images": "0"}).status_code == 200


# ----------------------------------------------------------------------------------------------
# Item 4: login, Host, Origin


def test_exposed_server_needs_a_token_or_no_auth():
    with pytest.raises(UserError, match=r"--host 0.0.0.0 exposes the page .* --no-auth"):
        AccessOptions().resolve("0.0.0.0", environ={})
    with pytest.raises(UserError, match="has 5 characters; use at least 16"):
        AccessOptions(token="short").resolve("0.0.0.0", environ={})
    assert AccessOptions().resolve("0.0.0.0", environ={"ANOSTYLE_TOKEN": TOKEN}).token == TOKEN
    assert AccessOptions(no_auth=True).resolve("0.0.0.0", environ={}).token is None
    assert AccessOptions().resolve("127.0.0.1", environ={}).token is None  # loopback: no login
    with pytest.raises(UserError, match="contradict"):
        AccessOptions(token=TOKEN, no_auth=True).resolve("0.0.0.0", environ={})
    hosts = default_hosts("0.0.0.0")
    assert socket.gethostname().lower() in hosts and "evil.example" not in hosts


def test_token_for_the_api_and_a_login_form_for_the_page(nets, model):  # noqa: F811
    app = create_app(model, upload_limits(ServeOptions("n", "e", "s")), token=TOKEN,
                     allowed_hosts=("testserver",))
    client = TestClient(app, follow_redirects=False)
    r = post_images(client, ("x.png", nets["png"]))
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert one_sentence(r.json()["detail"]) and "Authorization: Bearer" in r.json()["detail"]
    wrong = post_images(client, ("x.png", nets["png"]),
                        headers={"authorization": "Bearer " + TOKEN[:-1] + "x"})
    assert wrong.status_code == 401
    ok = post_images(client, ("x.png", nets["png"]), headers={"authorization": "Bearer " + TOKEN})
    assert ok.status_code == 200 and ok.json()["results"][0]["score"] == pytest.approx(nets["s"])
    assert client.get("/api/info").status_code == 401
    assert client.get("/healthz").status_code == 200  # monitoring needs no token
    page = client.get("/")
    assert page.status_code == 303 and page.headers["location"] == "login"
    form = client.get("/login")
    assert form.status_code == 200 and 'name="token"' in form.text
    assert "form-action 'self'" in form.headers["content-security-policy"]
    bad = client.post("/login", data={"token": "guess-guess-guess-guess"})
    assert bad.status_code == 401 and "Wrong token" in bad.text and not bad.cookies
    good = client.post("/login", data={"token": TOKEN})
    assert good.status_code == 303 and good.headers["location"] == "./"
    cookie = good.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and TOKEN.lower() not in cookie
    session = good.cookies[app_server.SESSION_COOKIE]
    client.cookies.set(app_server.SESSION_COOKIE, session)
    assert client.get("/").status_code == 200
    assert post_images(client, ("x.png", nets["png"])).status_code == 200
    forged = post_images(client, ("x.png", nets["png"]),
                         headers={"origin": "http://testserver.evil.example"})
    assert forged.status_code == 403


def test_host_and_origin_are_checked_off_loopback(nets, model):  # noqa: F811
    """The reported bypass: Host evil.example with a matching Origin used to score."""
    app = create_app(model, upload_limits(ServeOptions("n", "e", "s")),
                     allowed_hosts=("lab.example",))
    evil = TestClient(app, base_url="http://evil.example")
    r = post_images(evil, ("x.png", nets["png"]), headers={"origin": "http://evil.example"})
    assert r.status_code == 400 and "host name 'evil.example'" in r.json()["detail"]
    lab = TestClient(app, base_url="http://lab.example:8000")
    ok = post_images(lab, ("x.png", nets["png"]), headers={"origin": "http://lab.example:8000"})
    assert ok.status_code == 200
    https = post_images(lab, ("x.png", nets["png"]),
                        headers={"origin": "https://lab.example:8000"})
    assert https.status_code == 403 and "Cross-site" in https.json()["detail"]
    assert app_server.same_origin("https://lab.example", "lab.example", "https")
    assert not app_server.same_origin("null", "lab.example", "http")


def fake_uvicorn(monkeypatch) -> list:
    """Replace uvicorn by a server that records the address it would serve and returns at
    once; the list it returns fills with those addresses."""
    served: list = []

    class FakeServer:
        def run(self, sockets):
            served.append(sockets[0].getsockname())
            sockets[0].close()

    monkeypatch.setattr(app_server, "uvicorn_server", lambda app, **kw: FakeServer())
    return served


def test_cli_refuses_an_exposed_server_without_login(nets, monkeypatch):  # noqa: F811
    served = fake_uvicorn(monkeypatch)
    monkeypatch.delenv("ANOSTYLE_TOKEN", raising=False)
    base = ["serve", "--network", nets["network"], "--encoder", nets["encoder"], "--summary",
            nets["summary"], "--port", "0", "--threads", "1", "--device", "cpu"]
    result = CliRunner().invoke(main, [*base, "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "needs a login: give --token" in result.output
    assert not served
    result = CliRunner().invoke(main, [*base, "--host", "0.0.0.0", "--no-auth",
                                       "--allowed-hosts", "lab.example"])
    assert result.exit_code == 0, result.output
    assert "warning: --no-auth with --host 0.0.0.0" in result.output
    assert "host names accepted: lab.example" in result.output
    monkeypatch.setenv("ANOSTYLE_TOKEN", TOKEN)
    result = CliRunner().invoke(main, [*base, "--host", "0.0.0.0"])
    assert result.exit_code == 0 and "login: token required" in result.output


# ----------------------------------------------------------------------------------------------
# Item 5: slow clients; the per-request time limit


def read_answer(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes (or `limit` s pass), and when it closed."""
    start, answer = time.monotonic(), b""
    sock.settimeout(limit)
    try:
        while part := sock.recv(65536):
            answer += part
    except (TimeoutError, ConnectionResetError):
        pass
    return answer, time.monotonic() - start


def drip(sock: socket.socket, data: bytes, *, every: float, stop: threading.Event) -> None:
    for byte in data:
        if stop.is_set():
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return
        stop.wait(every)


def test_headers_sent_a_byte_at_a_time_are_cut_off(model):
    app = create_app(model, upload_limits(ServeOptions("n", "e", "s")))
    with BackgroundServer(app, header_timeout=1.0) as server, socket.create_connection(
            ("127.0.0.1", server.port), timeout=10) as sock:
        stop = threading.Event()
        head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100 + b"\r\n\r\n"
        sender = threading.Thread(target=drip, args=(sock, head), kwargs={"every": 0.2,
                                                                            "stop": stop})
        sender.start()
        answer, seconds = read_answer(sock, 5.0)
        stop.set()
        sender.join()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"did not arrive within the server's limit of 1 s" in answer
    assert seconds < 2.0, seconds


def test_a_body_sent_a_byte_at_a_time_is_cut_off(nets, model):  # noqa: F811
    app = create_app(model, upload_limits(ServeOptions("n", "e", "s")), request_timeout=1.5)
    body, headers = multipart(("image", "x.png", nets["png"]))
    head = (f"POST /api/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            f"{headers['content-type']}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with BackgroundServer(app) as server, socket.create_connection(
            ("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        stop = threading.Event()
        sender = threading.Thread(target=drip, args=(sock, body), kwargs={"every": 0.1,
                                                                            "stop": stop})
        sender.start()
        answer, seconds = read_answer(sock, 6.0)
        stop.set()
        sender.join()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    detail = json.loads(answer.split(b"\r\n\r\n", 1)[1])["detail"]
    assert "did not arrive within the server's limit of 1.5 s" in detail and one_sentence(detail)
    assert seconds < 3.0, seconds


def test_scoring_past_the_time_limit_is_a_503(nets, model):  # noqa: F811
    class SlowScorer:
        def __init__(self, scorer):
            self.scorer = scorer

        def __getattr__(self, name):
            return getattr(self.scorer, name)

        def __call__(self, fitted):
            time.sleep(0.4)
            return self.scorer(fitted)

    slow = dataclasses.replace(model, scorer=SlowScorer(model.scorer))
    app = create_app(slow, upload_limits(ServeOptions("n", "e", "s")), request_timeout=1.0)
    start = time.monotonic()
    r = post_images(TestClient(app), *[(f"{i}.png", nets["png"]) for i in range(6)])
    assert r.status_code == 503 and r.headers["retry-after"] == "10"
    assert "longer than the server's limit of 1 s" in r.json()["detail"]
    assert time.monotonic() - start < 2.0  # stopped at the limit, not after all 6 images


# ----------------------------------------------------------------------------------------------
# Item 3: decoded bytes per request, decode memory across requests


def test_decoded_bytes_are_capped_per_request_before_decoding(nets, model, monkeypatch):  # noqa: F811
    decoded = []
    real = app_uploads.read_fitted
    monkeypatch.setattr(app_uploads, "read_fitted",
                        lambda *a, **k: decoded.append(1) or real(*a, **k))
    zeros = png_bytes(np.full((1500, 1500, 3), 128, np.uint8))  # 6.4 MB decoded, ~7 kB file
    client = client_for(model, max_decoded_bytes=16 * 2**20)
    assert post_images(client, ("a.png", zeros), ("b.png", zeros)).status_code == 200
    decoded.clear()
    r = post_images(client, *[(f"{i}.png", zeros) for i in range(3)])
    assert r.status_code == 413 and not decoded
    assert r.json()["detail"] == ("These 3 images decode to 19 MB, over the server's limit of "
                                  "16 MB per request; send fewer or smaller images (or JPEG) per "
                                  "request.")


def test_jpeg_decoded_bytes_count_the_dct_reduction():
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000)).save(buf, format="JPEG")
    upload = app_uploads.Upload("big.jpg", buf.getvalue())
    full = app_uploads.read_header(upload, max_pixels=10**8)
    reduced = app_uploads.read_header(upload, max_pixels=10**8, draft_size=64)
    assert full.decoded_bytes == 4000 * 3000 * 3
    assert reduced.decoded_bytes == 500 * 375 * 3  # 1/8 in the DCT domain, both sides >= 64


def test_decode_budget_bounds_bytes_in_flight():
    budget = app_uploads.DecodeBudget(100, small=10, small_lanes=2)
    in_flight, most, guard = [0], [0], threading.Lock()

    def work(cost):
        with budget.hold(cost, deadline=time.monotonic() + 10):
            with guard:
                in_flight[0] += cost
                most[0] = max(most[0], in_flight[0])
            time.sleep(0.02)
            with guard:
                in_flight[0] -= cost

    threads = [threading.Thread(target=work, args=(c,)) for c in [60, 50, 40, 100, 30] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] <= 100 and in_flight[0] == 0
    with budget.hold(100, deadline=time.monotonic() + 1):  # the large lane is full ...
        with budget.hold(10, deadline=time.monotonic() + 1):  # ... a small image still runs
            pass
        with pytest.raises(TimeoutError):
            with budget.hold(20, deadline=time.monotonic() + 0.1):
                pass


# ----------------------------------------------------------------------------------------------
# The page's CSV of a batch (run in node: the page's own functions)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_page_csv_of_a_batch():
    page = app_server.page_and_policy()[0]
    script = re.search(r"<script>(.*?)</script>", page, flags=re.DOTALL).group(1)
    functions = "".join(re.search(rf"(function {name}\(.*?\n}}\n)", script, flags=re.DOTALL)
                        .group(1) for name in ("csvField", "csvTable"))
    columns = re.search(r"(const CSV_COLUMNS = \[.*?\];)", script, flags=re.DOTALL).group(1)
    detector = "rank-average(residual:mean@tta + residual:mean)"
    rows = [{"file": 'lesion "1", left.jpg', "result": {
                "model": "net + enc", "method": "izif", "score": 0.25, "pixel_term": 0.2,
                "feature_term": 0.1, "percentile": 87.5, "decision": "anomalous",
                "threshold": 0.2, "threshold_rule": "youden (val)", "comparison": "nv vs mel"}},
            {"file": "=HYPERLINK(1).png", "error": "'=HYPERLINK(1).png' is not a PNG, JPEG, "
                                                  "BMP or TIFF image."},
            {"file": "d.png", "result": {  # a detector: null izif terms, empty cells
                "model": "ham64-cpu", "method": detector, "score": 61.5, "pixel_term": None,
                "feature_term": None, "percentile": 50.0, "decision": "normal",
                "threshold": 70.25, "threshold_rule": "youden (val)",
                "comparison": "nv vs mel"}}]
    program = (columns + functions + "process.stdout.write(csvTable(" + json.dumps(rows)
               + "));")
    out = subprocess.run(["node", "-e", program], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    parsed = list(csv.reader(io.StringIO(out)))
    assert parsed[0] == ["file", "model", "method", "score", "pixel_term", "feature_term",
                         "percentile", "decision", "threshold", "threshold_rule", "comparison",
                         "error"]
    assert parsed[1] == ['lesion "1", left.jpg', "net + enc", "izif", "0.25", "0.2", "0.1",
                         "87.5", "anomalous", "0.2", "youden (val)", "nv vs mel", ""]
    assert parsed[2][0] == "'=HYPERLINK(1).png" and parsed[2][3] == ""
    assert parsed[2][11] == "'=HYPERLINK(1).png' is not a PNG, JPEG, BMP or TIFF image."
    assert parsed[3] == ["d.png", "ham64-cpu", detector, "61.5", "", "", "50", "normal",
                         "70.25", "youden (val)", "nv vs mel", ""]


def test_image_over_the_decode_budget_is_refused_from_its_header(nets, model, monkeypatch):  # noqa: F811
    """16 megapixels with transparency would need ~198 MiB to decode, over the 183 MiB budget
    of the default 24-megapixel limit: refused before decoding (its PNG is ~60 kB)."""
    from PIL import Image
    import io

    decoded = []
    real = app_uploads.read_fitted
    monkeypatch.setattr(app_uploads, "read_fitted",
                        lambda *a, **k: decoded.append(1) or real(*a, **k))
    buf = io.BytesIO()
    Image.new("RGBA", (4000, 4000)).save(buf, format="PNG")
    r = post_images(client_for(model), ("clear.png", buf.getvalue()))
    assert r.status_code == 413 and not decoded
    assert r.json()["detail"].startswith("'clear.png' would need about 198 MB of memory to "
                                         "decode (4000x4000 with transparency or 16-bit colour), "
                                         "over the server's budget of 183 MB")


@pytest.mark.parametrize("command", ["reconstruct", "project", "tsne"])
def test_commands_refuse_an_encoder_of_another_network(nets, tmp_path, command):  # noqa: F811
    """Every command that pairs an encoder with a network checks the pairing in AnoModel.load;
    --allow-mismatch lets it through with a printed warning."""
    from anomaly.cli import main
    from anomaly.model.encoder_io import load_encoder, save_encoder

    E, extra = load_encoder(nets["encoder"])
    other = tmp_path / "encoder-other.safetensors"
    save_encoder(other, E, extra={**extra, "network": {"path": "/runs/b/net.safetensors",
                                                       "sha256": "ab" * 32}})
    src = tmp_path / "in"
    src.mkdir()
    (src / "x.png").write_bytes(nets["png"])
    args = {"reconstruct": ["--source", str(src), "--outdir", str(tmp_path / "out")],
            "project": ["--source", str(src), "--outdir", str(tmp_path / "out"), "--steps", "1"],
            "tsne": ["--data", str(src), "--outdir", str(tmp_path / "out")]}[command]
    base = [command, "--network", nets["network"], "--encoder", str(other), *args]
    refused = CliRunner().invoke(main, base)
    assert refused.exit_code != 0 and "was trained for another network" in refused.output
    assert "Traceback" not in refused.output
    if command == "reconstruct":  # the override goes through, with the warning
        with pytest.warns(UserWarning, match="--allow-mismatch: --encoder encoder-other"):
            allowed = CliRunner().invoke(main, [*base, "--allow-mismatch"])
        assert allowed.exit_code == 0, allowed.output
