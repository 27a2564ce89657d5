"""End to end: headless Debian Chromium (driven by Playwright, never `playwright install`) opens the
page of a real uvicorn server on loopback, uploads images and reads the score, percentile and
decision the page shows; a hostile file name stays text; the page runs under its own CSP."""

from __future__ import annotations

import http.client
import io
import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

from anomaly.app.model import ServeOptions, load_serve_model
from anomaly.app.access import LOOPBACK_NAMES
from anomaly.app.server import BackgroundServer, create_app, upload_limits
from anomaly.model.encoder_io import save_encoder
from anomaly.evaluation.evaluate import EvaluateOptions, write_summary
from anomaly.evaluation.sheets import write_score_sheet
from encoder_helpers import one_thread  # noqa: F401 (autouse fixture)
from encoder_helpers import sample_images, save_tiny_networks, tiny_encoder, tiny_networks

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
HOSTILE_NAME = '<img src=x onerror="window.injected=1">.png'

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason=f"{CHROMIUM} is absent; `make browser` installs Debian's "
                                       f"chromium")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real server for tiny networks; 4 val naevi all score below any image (percentile 100),
    threshold 1e9 (every image 'normal')."""
    root = tmp_path_factory.mktemp("browser")
    G, D = tiny_networks()
    E = tiny_encoder(G)
    network = save_tiny_networks(root / "net.safetensors", G, D)
    save_encoder(root / "encoder.safetensors", E)
    write_score_sheet(pd.DataFrame({"score": [-4.0, -3.0, -2.0, -1.0], "label": [0] * 4,
                                    "file": list("abcd"), "class": ["nv"] * 4,
                                    "split": ["val"] * 4}), root / "scores" / "izif.xlsx")
    write_summary(pd.DataFrame([{"method": "izif", "comparison": "nv vs mel", "threshold": 1e9,
                                 "threshold_rule": "p95 (val)"}]),
                  EvaluateOptions(scores_dir=root / "scores", outdir=root), [])
    opts = ServeOptions(str(network), str(root / "encoder.safetensors"),
                        str(root / "summary.json"), device="cpu")
    app = create_app(load_serve_model(opts), upload_limits(opts), allowed_hosts=LOOPBACK_NAMES)
    buf = io.BytesIO()
    Image.fromarray(sample_images(G, 1, seed=4)[0]).save(buf, format="PNG")
    with BackgroundServer(app) as running:
        yield running, buf.getvalue()


def api_score(port: int, name: str, data: bytes) -> dict:
    body = (b'--B\r\nContent-Disposition: form-data; name="image"; filename="' + name.encode()
            + b'"\r\n\r\n' + data + b"\r\n--B--\r\n")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/api/score?images=false", body=body,
                     headers={"content-type": "multipart/form-data; boundary=B"})
        return json.loads(conn.getresponse().read())["results"][0]
    finally:
        conn.close()


def test_upload_in_chromium_shows_the_score(server):
    running, png = server
    expected = api_score(running.port, "lesion.png", png)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            messages = []
            page.on("console", lambda m: messages.append(m.text))
            page.goto(running.url + "/")
            page.wait_for_selector("#info p:has-text('Decision threshold')", timeout=20_000)
            page.set_input_files("#file", [
                {"name": "lesion.png", "mimeType": "image/png", "buffer": png},
                {"name": HOSTILE_NAME, "mimeType": "image/png", "buffer": b"not an image"}])
            page.wait_for_selector(".card .score", timeout=30_000)
            page.wait_for_selector(".card .error", timeout=30_000)
            shown = page.locator(".card .score").inner_text()
            percentile = page.locator(".card .percentile").inner_text()
            decision = page.locator(".card .decision").inner_text()
            titles = page.locator(".card h2").all_inner_texts()
            error = page.locator(".card .error").inner_text()
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
            injected = page.evaluate("window.injected === undefined")
        finally:
            browser.close()
    assert float(shown) == pytest.approx(expected["score"], rel=1e-5)
    assert percentile == "100.0 % of 4 validation naevi" and decision == "normal"
    assert sorted(titles) == sorted(["lesion.png", HOSTILE_NAME])  # the name is text, not markup
    assert error == f"'{HOSTILE_NAME}' is not a PNG, JPEG, BMP or TIFF image."
    assert widths == [16, 16, 16] and injected  # input, reconstruction, residual; no <img> added
    assert not [m for m in messages if "Content Security Policy" in m], messages
