"""`anostyle serve` through the framework's test client and a real loopback server: izif numbers
equal the library's, percentile and decision from a crafted sheet and summary, every bad input
a 4xx with a message, no file written, security headers, and a bounded load test."""

from __future__ import annotations

import base64
import builtins
import dataclasses
import hashlib
import http.client
import io
import json
import os
import re
import select
import socket
import struct
import tempfile
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from anomaly.app import server as app_server
from anomaly.app import uploads as app_uploads
from anomaly.app.access import LOOPBACK_NAMES
from anodata.policy import Preprocessing
from anomaly.app.model import (Decision, Reference, ServeModel, ServeOptions, izif_serve_model,
                               load_decision, load_reference, load_serve_model)
from anomaly.model.ano_model import (AnoModel, discriminator_features, reconstruct_batch,
                                     resolve_izif)
from anomaly.app.server import BackgroundServer, create_app, upload_limits
from anomaly.cli import main
from anomaly.model.encoder import Encoder, EncoderConfig
from anomaly.model.encoder_io import save_encoder
from stylegan.fileio import sha256_file
from anomaly.evaluation.evaluate import EvaluateOptions, write_summary
from anodata.reader import read_fitted
from anomaly.model.reconstruct import residual_images
from anomaly.methods.scores import izif_score
from anomaly.evaluation.sheets import write_score_sheet
from encoder_helpers import one_thread  # noqa: F401 (autouse fixture)
from encoder_helpers import random_head_encoder, sample_images, save_tiny_networks, tiny_networks
from stylegan.errors import UserError
from stylegan.fileio import atomic_write_json
from stylegan.imageutil import from_uint8, to_uint8
from stylegan.networks import Discriminator, DiscriminatorConfig, Generator, GeneratorConfig

KAPPA, LAYER = 0.5, "b8"  # what score.json records; the encoder was trained with 2.0 / b16


def png_bytes(image_hwc: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_hwc).save(buf, format="PNG")
    return buf.getvalue()


def direct_izif(nets: dict, data: bytes) -> dict:
    """The izif score computed with the library functions, as `anostyle score` does."""
    G, D, E = nets["G"], nets["D"], nets["E"]
    fitted = read_fitted(data, "x.png", Preprocessing(resolution=G.img_resolution,
                                                      channels=G.img_channels))
    x = from_uint8(torch.from_numpy(fitted[None]))
    with torch.no_grad():
        _ws, rec = reconstruct_batch(G, E, x)
        feat, feat_rec = (discriminator_features(D, t, LAYER) for t in (x, rec))
        score = float(izif_score(x, rec, feat, feat_rec, kappa=KAPPA)[0])
    return {"score": score, "pixel": float((x - rec).square().mean()),
            "feature": float((feat - feat_rec).square().mean()), "fitted": fitted,
            "rec": to_uint8(rec)[0], "residual": residual_images(x, rec)[0]}


def write_summary_json(outdir: Path, scores_dir: Path | None, rows: list[dict]) -> Path:
    """summary.json exactly as `anostyle evaluate` writes it."""
    write_summary(pd.DataFrame(rows), EvaluateOptions(scores_dir=scores_dir, outdir=outdir), [])
    return outdir / "summary.json"


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Tiny G/D/E saved with the project's writers, an izif.xlsx and score.json built around the
    score s of `png` (half of the val naevi below it), and a summary whose first izif threshold
    lies just below s. Margins of 1e-3 keep the thresholds clear of float round-off."""
    root = tmp_path_factory.mktemp("serve")
    G, D = tiny_networks()
    E = random_head_encoder(G)
    network = save_tiny_networks(root / "net.safetensors", G, D)
    encoder = root / "encoder-000010.safetensors"
    save_encoder(encoder, E, extra={"training_options": {"kappa": 2.0, "feature_layer": "b16"},
                                    "network": {"path": str(network),
                                                "sha256": sha256_file(network)}})
    out = {"G": G, "D": D, "E": E, "network": str(network), "encoder": str(encoder), "root": root}
    out["png"] = png_bytes(sample_images(G, 1, seed=11)[0])
    s = direct_izif(out, out["png"])["score"]
    scores = root / "scores"
    val_nv = [s - 3, s - 2, s - 1, s - 1e-3, s + 1e-3, s + 2, s + 3, s + 4]  # 4 of 8 <= s
    frame = pd.DataFrame({
        "score": val_nv + [s - 9, s - 8] + [s - 7] * 3,  # val melanoma and test naevi: ignored
        "label": [0] * 8 + [1, 1] + [0] * 3,
        "file": [f"f{i}.png" for i in range(13)],
        "class": ["nv"] * 8 + ["mel"] * 2 + ["nv"] * 3,
        "split": ["val"] * 10 + ["test"] * 3})
    write_score_sheet(frame, scores / "izif.xlsx")
    atomic_write_json(scores / "score.json", {"options": {}, "kappa": KAPPA,
                                              "feature_layer": LAYER})
    row = {"comparison": "nv vs mel", "threshold_rule": "youden (val)"}
    out["summary"] = str(write_summary_json(root / "graphics", scores, [
        {**row, "method": "knn-pixels", "threshold": -100.0},
        {**row, "method": "izif", "threshold": s - 1e-3},
        {**row, "method": "izif", "comparison": "nv vs rest", "threshold": s + 50}]))
    out["scores"], out["s"] = scores, s
    return out


def options(nets: dict, **changes) -> ServeOptions:
    base = {"network": nets["network"], "encoder": nets["encoder"], "summary": nets["summary"],
            "device": "cpu"}
    return ServeOptions(**{**base, **changes})


@pytest.fixture(scope="module")
def model(nets) -> ServeModel:
    return load_serve_model(options(nets))


def client_for(model: ServeModel, **limits) -> TestClient:
    base = dataclasses.asdict(upload_limits(ServeOptions("n", "e", "s")))
    return TestClient(create_app(model, app_uploads.UploadLimits(**{**base, **limits})))


@pytest.fixture(scope="module")
def client(model) -> TestClient:
    return client_for(model)


def post_images(client: TestClient, *files: tuple[str, bytes], **kwargs):
    return client.post("/api/score", files=[("image", (n, d, "image/png")) for n, d in files],
                       **kwargs)


def decode_data_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


# ----------------------------------------------------------------------------------------------
# Numbers


def test_png_score_equals_library_izif(nets, client):
    response = post_images(client, ("lesion <b>1</b>.png", nets["png"]))
    assert response.status_code == 200, response.text
    (r,) = response.json()["results"]
    expected = direct_izif(nets, nets["png"])
    assert r["score"] == pytest.approx(expected["score"], rel=1e-6, abs=1e-9)
    assert r["pixel_term"] == pytest.approx(expected["pixel"], rel=1e-6)
    assert r["feature_term"] == pytest.approx(expected["feature"], rel=1e-6)
    assert r["score"] == pytest.approx(r["pixel_term"] + KAPPA * r["feature_term"], rel=1e-6)
    assert (r["kappa"], r["feature_layer"]) == (KAPPA, LAYER)  # score.json over the encoder's
    assert r["method"] == "izif"
    assert r["name"] == "lesion <b>1</b>.png"  # returned as given; the page shows it as text
    assert (r["width"], r["height"], r["resolution"]) == (16, 16, 16)
    # 4 of the 8 val naevi are below s; val melanoma and test rows (all below s) do not count
    assert (r["percentile"], r["reference_count"], r["percentile_note"]) == (50.0, 8, "")
    # the first izif row of summary.json (not knn-pixels', not the second izif row's)
    assert (r["decision"], r["threshold"], r["threshold_rule"], r["comparison"]) == \
        ("anomalous", nets["s"] - 1e-3, "youden (val)", "nv vs mel")
    images = {k: decode_data_url(v) for k, v in r["images"].items()}
    assert np.array_equal(images["input"], expected["fitted"].transpose(1, 2, 0))
    assert np.array_equal(images["reconstruction"], expected["rec"])
    assert np.array_equal(images["residual"], expected["residual"])


def test_jpeg_is_fitted_like_prepare(nets, client, ham_dir):
    data = sorted((ham_dir / "images").glob("*.jpg"))[0].read_bytes()
    response = client.post("/api/score?images=false",
                           files={"image": ("ISIC.jpg", data, "image/jpeg")})
    assert response.status_code == 200, response.text
    (r,) = response.json()["results"]
    assert "images" not in r and (r["width"], r["height"]) == (200, 150)
    assert r["score"] == pytest.approx(direct_izif(nets, data)["score"], rel=1e-6)


def test_several_files_in_one_request_keep_their_order(nets, client, ham_dir):
    jpg = sorted((ham_dir / "images").glob("*.jpg"))[1].read_bytes()
    response = post_images(client, ("b.jpg", jpg), ("a.png", nets["png"]))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["name"] for r in results] == ["b.jpg", "a.png"]
    assert results[0]["score"] == pytest.approx(direct_izif(nets, jpg)["score"], rel=1e-6)
    assert results[1]["score"] == pytest.approx(nets["s"], rel=1e-6)


def test_decision_is_score_at_or_above_threshold(nets, client, model):
    s = post_images(client, ("x.png", nets["png"])).json()["results"][0]["score"]
    for threshold, decision in ((s, "anomalous"), (float(np.nextafter(s, np.inf)), "normal")):
        at = dataclasses.replace(model.decision, threshold=threshold)
        r = post_images(client_for(izif_serve_model(model.scorer.model, at, model.reference)),
                        ("x.png", nets["png"])).json()["results"][0]
        assert (r["score"], r["threshold"], r["decision"]) == (s, threshold, decision)


def test_gray_network_scores_colour_uploads_as_luma(ham_dir):
    """A 1-channel network: the upload is decoded to luma as `prepare --channels 1` does."""
    torch.manual_seed(0)
    small = {"img_resolution": 16, "img_channels": 1, "channel_base": 256, "channel_max": 32}
    G = Generator(GeneratorConfig(z_dim=16, w_dim=16, mapping_layers=2, **small)).eval()
    D = Discriminator(DiscriminatorConfig(**small)).eval()
    E = Encoder(EncoderConfig(num_ws=G.num_ws, w_dim=16, **small), w_avg=G.mapping.w_avg).eval()
    model = izif_serve_model(AnoModel(G, D, E, kappa=1.0, feature_layer="b8",
                                      policy=Preprocessing()),
                             Decision(0.0, "fixed", "nv vs mel", "summary.json"),
                             Reference(None, None, "no sheet", {}))
    data = sorted((ham_dir / "images").glob("*.jpg"))[2].read_bytes()
    (r,) = post_images(client_for(model), ("g.jpg", data)).json()["results"]
    fitted = read_fitted(data, "g.jpg", Preprocessing(resolution=16, channels=1))  # [1, 16, 16]
    x = from_uint8(torch.from_numpy(fitted[None].copy()))
    with torch.no_grad():
        rec = G.synthesis(E(x), noise_mode="const")
        feat, feat_rec = (discriminator_features(D, t, "b8") for t in (x, rec))
    assert r["score"] == pytest.approx(float(izif_score(x, rec, feat, feat_rec)[0]), rel=1e-6)
    assert np.array_equal(decode_data_url(r["images"]["input"]), fitted[0])  # a gray PNG
    assert decode_data_url(r["images"]["residual"]).shape == (16, 16, 3)
    assert r["decision"] == "anomalous" and r["percentile"] is None


def judged_at(served: ServeModel, score: float, monkeypatch):
    """AnoModel.judge of the served model when its izif detector scores `score`."""
    model = served.scorer.model
    monkeypatch.setattr(model.detector, "score_batch", lambda batch: np.array([score]))
    return model.judge(np.zeros((model.channels, model.resolution, model.resolution), np.uint8))


def test_percentile_counts_scores_at_or_below(model, monkeypatch):
    ref = Reference(np.array([1.0, 2.0, 2.0, 3.0]), "izif.xlsx", "", {})
    served = izif_serve_model(model.scorer.model, model.decision, ref)
    assert [judged_at(served, v, monkeypatch).percentile
            for v in (0.5, 1.0, 2.0, 2.5, 3.0, 9.0)] == [0.0, 25.0, 75.0, 75.0, 100.0, 100.0]
    omitted = izif_serve_model(model.scorer.model, model.decision,
                               Reference(None, None, "why", {}))
    assert judged_at(omitted, 1.0, monkeypatch).percentile is None


def test_izif_mode_answers_through_ano_model_judge(nets, model, monkeypatch):
    """The izif mode's percentile, decision, threshold and rule are AnoModel.judge's: a judge
    answering other numbers than summary.json and izif.xlsx give shows up in the JSON."""
    from anomaly.methods.detector import Judgement
    from anomaly.model.ano_model import AnoModel as Model

    served = izif_serve_model(model.scorer.model, model.decision, model.reference)
    judged = served.scorer.model
    assert judged.detector.detector.method == "izif" and judged is not model.scorer.model
    assert judged.detector.detector.val_normals == tuple(model.reference.scores)
    real, calls = Model.judge, []

    def judge(self, image):
        calls.append(self)
        j = real(self, image)
        return Judgement(j.score, 12.5, "normal", 1e9, "sentinel rule", j.method)

    monkeypatch.setattr(Model, "judge", judge)
    (r,) = post_images(client_for(served), ("x.png", nets["png"])).json()["results"]
    assert calls == [judged]
    assert (r["percentile"], r["decision"], r["threshold"], r["threshold_rule"]) == \
        (12.5, "normal", 1e9, "sentinel rule")
    assert r["score"] == pytest.approx(nets["s"], rel=1e-6) and r["method"] == "izif"


def test_a_missing_reference_omits_the_percentile_with_its_note(nets, model):
    note = "percentile omitted: no izif.xlsx in nowhere (the scores folder summary.json records)"
    served = izif_serve_model(model.scorer.model, model.decision, Reference(None, None, note, {}))
    path = nets["root"] / "x.png"
    path.write_bytes(nets["png"])
    judged = served.scorer.model.judge(path)
    assert judged.percentile is None and judged.score == pytest.approx(nets["s"], rel=1e-6)
    assert (judged.decision, judged.threshold) == ("anomalous", nets["s"] - 1e-3)
    (r,) = post_images(client_for(served), ("x.png", nets["png"])).json()["results"]
    assert (r["percentile"], r["percentile_note"], r["reference_count"]) == (None, note, 0)
    assert r["decision"] == "anomalous" and r["pixel_term"] > 0 and r["feature_term"] > 0


# ----------------------------------------------------------------------------------------------
# Loading: summary, reference, kappa / feature layer


def test_summary_rows_and_errors(nets, tmp_path):
    decision, recorded = load_decision(nets["summary"])
    assert (decision.threshold, decision.rule, decision.comparison) == \
        (nets["s"] - 1e-3, "youden (val)", "nv vs mel")  # first izif row, not knn
    assert recorded["scores_dir"] == str(nets["scores"])
    bad = tmp_path / "summary.json"
    cases = [(None, "does not exist"), ("{not json", "is not valid JSON"),
             (json.dumps({"rows": [{"method": "knn-pixels", "threshold": 1}]}), "has no izif row"),
             (json.dumps({"rows": [{"method": "izif", "threshold": None}]}), "is not a finite")]
    for text, message in cases:
        if text is not None:
            bad.write_text(text)
        with pytest.raises(UserError, match=message):
            load_decision(bad)


def test_reference_default_folder_and_notes(nets, tmp_path):
    ref = load_reference(None, {"scores_dir": str(nets["scores"])})  # what summary.json records
    assert ref.count == 8 and ref.scored_with == {"kappa": KAPPA, "feature_layer": LAYER}
    assert load_reference(str(nets["scores"] / "izif.xlsx"), {}).count == 8  # the sheet itself
    assert "records no scores folder" in load_reference(None, {}).note
    missing = load_reference(None, {"scores_dir": str(tmp_path)})
    assert missing.scores is None and "no izif.xlsx in" in missing.note
    with pytest.raises(UserError, match="holds no izif.xlsx"):
        load_reference(str(tmp_path), {})
    write_score_sheet(pd.DataFrame({"score": [1.0], "label": [0], "file": ["a"], "class": ["nv"],
                                    "split": ["test"]}), tmp_path / "izif.xlsx")
    assert "has no validation naevi" in load_reference(str(tmp_path), {}).note


def test_without_reference_the_percentile_is_omitted(nets, tmp_path):
    summary = write_summary_json(tmp_path, tmp_path / "nowhere", [
        {"method": "izif", "comparison": "nv vs mel", "threshold": 1e9,
         "threshold_rule": "p95 (val)"}])
    model = load_serve_model(options(nets, summary=str(summary)))
    assert model.scorer.kappa == 2.0 and model.scorer.feature_layer == "b16"  # encoder's
    r = post_images(client_for(model), ("x.png", nets["png"])).json()["results"][0]
    assert r["percentile"] is None and "no izif.xlsx in" in r["percentile_note"]
    assert r["decision"] == "normal" and r["threshold_rule"] == "p95 (val)"


def test_izif_options_priority():
    scored, trained = {"kappa": 0.5, "feature_layer": "b8"}, {"kappa": 2.0, "feature_layer": "b16"}
    assert resolve_izif(None, None, scored_with=scored, trained=trained) == (0.5, "b8", [])
    assert resolve_izif(None, None, scored_with={}, trained=trained) == (2.0, "b16", [])
    assert resolve_izif(None, None, scored_with={}, trained={}) == (1.0, "b8", [])
    kappa, layer, notes = resolve_izif(0.0, "b16", scored_with=scored, trained=trained)
    assert (kappa, layer, len(notes)) == (0.0, "b16", 2) and "--kappa 0.0 differs" in notes[0]


def test_bad_files_fail_before_serving(nets, tmp_path):
    cases = [({"network": str(tmp_path / "x.pkl")}, "--network .* does not exist"),
             ({"encoder": nets["network"]}, "is a network checkpoint, not an encoder"),
             ({"summary": str(tmp_path / "s.json")}, "--summary .* does not exist"),
             ({"feature_layer": "b64"}, "--feature-layer 'b64' is not a layer"),
             ({"max_pixels": 0}, "--max-pixels 0 is out of range")]
    for change, message in cases:
        with pytest.raises(UserError, match=message):
            load_serve_model(options(nets, **change).check())


# ----------------------------------------------------------------------------------------------
# Bad input: always a 4xx with a JSON message


def multipart(*parts: tuple[str, str | None, bytes], boundary: str = "XbOuNdArY",
              end: bool = True) -> tuple[bytes, dict]:
    """A hand-made multipart/form-data body: parts (field, filename or None, bytes)."""
    body = b""
    for field, filename, data in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"'
                                                      if filename is not None else "")
        body += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                 f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode() if end else b""
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose data holds a single row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * (1 + 3 * 8))) + chunk(b"IEND", b""))


def bad_requests(png: bytes) -> list[tuple[str, dict, int, str]]:
    """(case, request kwargs, status, message fragment)."""
    body, headers = multipart(("image", "a.png", png), end=False)
    cases = [
        ("empty request", {}, 400, "Empty request"),
        ("empty multipart body", {"content": b"", "headers": multipart()[1]}, 400, "Empty request"),
        ("wrong field", {"files": {"file": ("a.png", png, "image/png")}}, 400,
         "field 'image' (this request used the field 'file')"),
        ("text instead of a file", dict(zip(("content", "headers"),
                                            multipart(("image", None, b"abc")))), 400,
         "must hold a file"),
        ("no file at all", dict(zip(("content", "headers"), multipart())), 400,
         "holds no file in the field 'image'"),
        ("JSON body", {"json": {"image": "x"}}, 415, "not as application/json"),
        ("no boundary", {"content": b"x", "headers": {"content-type": "multipart/form-data"}},
         400, "no boundary"),
        ("unfinished body", {"content": body, "headers": headers}, 400, "incomplete"),
        ("empty file", {"files": {"image": ("e.png", b"", "image/png")}}, 400,
         "'e.png' is an empty file"),
        ("not an image", {"files": {"image": ("notes.png", b"hello world", "image/png")}}, 415,
         "'notes.png' is not a PNG, JPEG, BMP or TIFF image"),
        ("truncated image", {"files": {"image": ("cut.png", png[:60], "image/png")}}, 422,
         "'cut.png' cannot be used"),
        ("header over the pixel limit", {"files": {"image": ("big.png",
                                                             png_with_header_size(10000, 10000),
                                                             "image/png")}}, 413,
         "10000x10000 = 100.0 megapixels, over the server's limit of 24 megapixels"),
        ("decompression bomb", {"files": {"image": ("bomb.png",
                                                    png_with_header_size(100000, 100000),
                                                    "image/png")}}, 413,
         "more pixels than the server's limit"),
        ("too many files", {"files": [("image", (f"{i}.png", png, "image/png"))
                                      for i in range(17)]}, 413, "At most 16 images"),
        ("cross-site upload", {"files": {"image": ("a.png", png, "image/png")},
                               "headers": {"origin": "https://evil.example"}}, 403,
         "Cross-site uploads are refused"),
    ]
    return cases


def test_bad_inputs_answer_4xx_with_a_message(nets, client, monkeypatch):
    decoded = []
    real = app_uploads.read_fitted
    monkeypatch.setattr(app_uploads, "read_fitted",
                        lambda *a, **k: decoded.append(1) or real(*a, **k))
    for case, kwargs, status, message in bad_requests(nets["png"]):
        decoded.clear()
        response = client.post("/api/score", **kwargs)
        assert response.status_code == status, (case, response.text)
        assert message in response.json()["detail"], (case, response.json())
        if "pixel" in message or "bomb" in case:
            assert not decoded, f"{case}: pixels were decoded before the header check"
    ok = post_images(client, ("fine.png", nets["png"]))  # the server still works
    assert ok.status_code == 200


@pytest.mark.filterwarnings("ignore:.*:UserWarning")  # PIL's notes on the broken TIFF tags
def test_mangled_images_never_cause_a_server_error(nets, model, ham_dir):
    """Truncated and bit-flipped PNG, JPEG, BMP and TIFF files: each 200 or 4xx, never 500."""
    client = TestClient(client_for(model).app, raise_server_exceptions=False)
    image = np.asarray(Image.open(sorted((ham_dir / "images").glob("*.jpg"))[0]))[:48, :64]
    rng = np.random.default_rng(0)
    statuses = set()
    for kind in ("PNG", "JPEG", "BMP", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format=kind)
        good = buf.getvalue()
        variants = [good[:n] for n in (8, 30, len(good) // 3, len(good) - 5)]
        for _ in range(8):
            mangled = bytearray(good)
            for at in rng.integers(0, min(len(good), 400), 4):  # headers live at the start
                mangled[at] ^= int(rng.integers(1, 256))
            variants.append(bytes(mangled))
        for data in variants:
            r = client.post("/api/score?images=false",
                            files={"image": (f"m.{kind.lower()}", data)})
            assert r.status_code == 200 or 400 <= r.status_code < 500, (kind, r.text)
            assert r.status_code == 200 or r.json()["detail"].startswith("'m."), r.text
            statuses.add(r.status_code)
    assert {415, 422} <= statuses


def test_pixel_and_size_limits_are_configurable(nets, model):
    small = client_for(model, max_pixels=255, max_bytes=4000)
    r = post_images(small, ("x.png", nets["png"]))  # 16 x 16 = 256 pixels
    assert r.status_code == 413 and "16x16 = 0.0 megapixels" in r.json()["detail"]
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    r = post_images(small, ("noise.png", png_bytes(noise)))
    assert r.status_code == 413 and "larger than the server's limit" in r.json()["detail"]


def test_oversized_body_refused_before_reading(nets, model):
    small = client_for(model, max_bytes=4000)
    body, headers = multipart(("image", "n.png", b"\0" * 5000))
    r = small.post("/api/score", content=body, headers=headers)
    assert r.status_code == 413 and "larger than the server's limit" in r.json()["detail"]


def test_chunked_upload_is_cut_off_while_streaming(model):
    """No Content-Length: the real server answers 413 once 4000 bytes have arrived, while the
    client is still sending (it would send 100 kB)."""
    app = create_app(model, app_uploads.UploadLimits(max_bytes=4000, max_files=4,
                                                     max_pixels=10**6))
    with BackgroundServer(app) as server, socket.create_connection(
            ("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /api/score HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: "
                     b"chunked\r\nContent-Type: multipart/form-data; boundary=B\r\n\r\n")
        sent = 0
        for i in range(100):
            data = (b"--B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x\"\r\n\r\n"
                    if i == 0 else b"\0" * 1000)
            sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
            sent += len(data)
            if select.select([sock], [], [], 0.2)[0]:
                break
        answer = b""
        while not answer.endswith(b"}") and (part := sock.recv(65536)):
            answer += part
    head, _, payload = answer.decode("latin-1").partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413"), head
    assert "larger than the server's limit" in json.loads(payload)["detail"]
    assert 4000 < sent <= 5100, sent


def test_nothing_is_written_to_disk(nets, client, tmp_path, monkeypatch):
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir(), tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    for var in ("TMPDIR", "TEMP", "TMP"):
        monkeypatch.setenv(var, str(tmp))
    writes = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            writes.append(file)
        return real_open(file, mode, *args, **kwargs)

    def spy_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            writes.append(path)
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    noise = np.random.default_rng(1).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    big = png_bytes(noise)  # ~1.5 MB: more than a spooled temporary file keeps in memory
    assert len(big) > 1_200_000
    r = post_images(client, ("../../etc/passwd.png", big), ("x.png", nets["png"]))
    assert r.status_code == 200 and r.json()["results"][0]["name"] == "../../etc/passwd.png"
    assert post_images(client, ("bad.png", b"nope")).status_code == 415
    assert writes == [] and list(cwd.iterdir()) == [] and list(tmp.iterdir()) == []


def test_display_names_are_cleaned():
    assert app_uploads.display_name("../a\tb\x00.png".encode()) == "../ab.png"
    assert app_uploads.display_name("naevus-é.jpg".encode()) == "naevus-é.jpg"
    assert app_uploads.display_name(b"\xff.png") == "\xff.png"  # not UTF-8: Latin-1
    assert app_uploads.display_name(b"x" * 500) == "x" * app_uploads.MAX_NAME_CHARS
    assert app_uploads.display_name(b"\r\n") == "unnamed"
    assert app_uploads.display_name(b"a%22b%0A%0dc.png") == 'a"bc.png'  # HTML form encoding


# ----------------------------------------------------------------------------------------------
# The page, headers, routes


def test_page_policy_and_routes(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    script = re.search(r"<script>(.*?)</script>", page.text, flags=re.DOTALL).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in policy and "default-src 'none'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    for forbidden in ("http://", "https://", "innerHTML", "outerHTML", "eval(", "document.write",
                      "insertAdjacentHTML", "new Function", " style="):
        assert forbidden not in page.text, forbidden
    for path in ("/docs", "/redoc", "/openapi.json", "/static/", "/anomaly/app/", "/page.html",
                 "/../README.md"):
        r = client.get(path)
        assert r.status_code == 404 and r.json() == {"detail": "Not Found"}, path
        assert r.headers["x-content-type-options"] == "nosniff", path
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/api/score").status_code == 405
    info = client.get("/api/info").json()
    assert (info["max_upload_bytes"], info["max_files"], info["max_pixels"]) == \
        (20 * 2**20, 16, 24_000_000)
    assert info["field"] == "image" and info["kappa"] == KAPPA and info["method"] == "izif"
    assert "/" not in json.dumps(
        {k: v for k, v in info.items() if k != "threshold_rule"})  # no file-system paths


def test_only_loopback_host_names_when_bound_to_loopback(model):
    app = create_app(model, upload_limits(ServeOptions("n", "e", "s")),
                     allowed_hosts=LOOPBACK_NAMES)
    assert TestClient(app, base_url="http://127.0.0.1:8000").get("/healthz").status_code == 200
    assert TestClient(app, base_url="http://rebound.example").get("/healthz").status_code == 400


# ----------------------------------------------------------------------------------------------
# The command, the real server, load


def test_cli_loads_once_then_serves(nets, monkeypatch):
    served, threads = [], []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)

    class FakeServer:
        def run(self, sockets):
            served.append(sockets[0].getsockname())
            sockets[0].close()

    monkeypatch.setattr(app_server, "uvicorn_server", lambda app, **kw: FakeServer())
    result = CliRunner().invoke(main, ["serve", "--network", nets["network"], "--encoder",
                                       nets["encoder"], "--summary", nets["summary"], "--port",
                                       "0", "--threads", "1", "--device", "cpu"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert served[0][0] == "127.0.0.1" and threads == [1]
    assert f"AnoStyle serving http://127.0.0.1:{served[0][1]}/" in result.output
    assert "izif kappa 0.5 (b8)" in result.output and "8 validation naevi" in result.output
    result = CliRunner().invoke(main, ["serve", "--network", "missing.pkl", "--encoder",
                                       nets["encoder"], "--summary", nets["summary"]])
    assert result.exit_code == 1 and "--network missing.pkl does not exist" in result.output
    assert not served[1:]


def test_busy_port_is_a_user_error():
    with app_server.bind_socket("127.0.0.1", 0) as sock:
        sock.listen()
        with pytest.raises(UserError, match=r"cannot listen on --host 127.0.0.1 --port \d+"):
            app_server.bind_socket("127.0.0.1", sock.getsockname()[1])


class CountingScorer:
    """Wraps a scorer and records the largest number of calls running at once."""

    def __init__(self, scorer):
        self.scorer, self.running, self.most = scorer, 0, 0
        self.guard = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.scorer, name)

    def __call__(self, fitted):
        with self.guard:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            return self.scorer(fitted)
        finally:
            with self.guard:
                self.running -= 1


def raw_post(port: int, body: bytes, headers: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/api/score?images=false", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_load_on_a_real_server(nets, model):
    """200 requests, 8 at a time, against uvicorn on loopback: no error, one inference at a
    time, every score equal to the library's."""
    counting = CountingScorer(model.scorer)
    app = create_app(dataclasses.replace(model, scorer=counting),
                     upload_limits(ServeOptions("n", "e", "s")), allowed_hosts=("127.0.0.1",))
    body, headers = multipart(("image", "x.png", nets["png"]))
    with BackgroundServer(app) as server:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: raw_post(server.port, body, headers), range(200)))
        status, payload = raw_post(server.port, b"junk", headers)  # still 4xx, never 500
    assert status == 400 and ("malformed" in payload["detail"]
                              or "incomplete" in payload["detail"]), payload
    assert [s for s, _ in answers] == [200] * 200
    scores = {a["results"][0]["score"] for _, a in answers}
    assert len(scores) == 1 and scores.pop() == pytest.approx(nets["s"], rel=1e-6)
    assert counting.most == 1
