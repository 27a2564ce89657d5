"""`anostyle serve --model DIR` / `--detector JSON`: the tuned detector answers through the app's
test client with the numbers of `AnoModel.open(DIR).judge`, the decision flips exactly at
detector.json's threshold, the percentile counts its validation naevi at or below, a detector
that cannot score is a 500, a D-feature density answers with the input picture only, the page
hides what a detector lacks, and flags of the wrong mode are refused in one sentence."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from test_app import client_for, decode_data_url, png_bytes, post_images
from test_detector import _model_dir, setup, tuned  # noqa: F401 (fixtures)
from test_failclosed_serve import fake_uvicorn

from anomaly.methods import detector as det
from anomaly.app import server as app_server
from anomaly.app.model import ServeOptions, ServeScorer, load_serve_model
from anomaly.cli import main
from anomaly.model.ano_model import AnoModel
from encoder_helpers import one_thread  # noqa: F401 (autouse fixture)
from stylegan.errors import UserError
from stylegan.imageutil import from_uint8, to_uint8


def serve_options(**given) -> ServeOptions:
    return ServeOptions(**{"network": None, "encoder": None, "summary": None, "device": "cpu",
                           **given})


def raw_images(setup) -> list[tuple[str, bytes]]:  # noqa: F811
    """Three naevi and two noise 'melanomas' as written before `prepare`, and a 40 x 30
    noise photo that the policy must crop and resize."""
    source = setup["root"] / "source"
    files = sorted((source / "nv").glob("*.png"))[:3] + sorted((source / "mel").glob("*.png"))[:2]
    noise = np.random.default_rng(5).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    return [(f.name, f.read_bytes()) for f in files] + [("photo.png", png_bytes(noise))]


def write_detector(folder: Path, name: str, **changes) -> Path:
    """A variant of the folder's tuned detector.json (same files' sha256 and policy)."""
    body = {**json.loads((folder / "detector.json").read_text()), **changes}
    path = folder / name
    path.write_text(json.dumps(body))
    return path


def single(method: str, threshold: float, normals: list[float]) -> dict:
    """detector.json fields of a one-configuration detector without TTA."""
    return {"method": method, "combine": "single", "tta": False,
            "configuration": [{"method": method, "tta": False}], "threshold": threshold,
            "threshold_rule": "fixed", "val_normal_scores": sorted(normals)}


@pytest.fixture(scope="module")
def folder(setup, tuned):  # noqa: F811
    return _model_dir(setup, tuned, "serve-model")


# ----------------------------------------------------------------------------------------------
# Numbers


def shipped_like(folder: Path) -> Path:
    """A rank average of residual:mean with and without TTA, as models/ham64-cpu ships."""
    refs = {True: [0.05, 0.1, 0.2, 0.3], False: [0.04, 0.1, 0.25, 0.3]}
    configuration = [{"method": "residual:mean", "tta": tta, "reference": refs[tta]}
                     for tta in (True, False)]
    return write_detector(folder, "shipped-like.json", configuration=configuration,
                          method="rank-average(residual:mean@tta + residual:mean)",
                          combine="rank-average", tta=True, threshold=50.0,
                          val_normal_scores=[10.0, 30.0, 50.0, 50.0, 70.0])


@pytest.mark.parametrize("which", ["tuned", "shipped-like"])
def test_model_dir_answers_like_the_detectors_judgement(setup, folder, which):  # noqa: F811
    """Score, percentile and decision of a raw upload equal `judge` on the same raw image; the
    percentile is recounted from detector.json; pictures are the detector's reconstruction."""
    path = folder / "detector.json" if which == "tuned" else shipped_like(folder)
    served = load_serve_model(serve_options(model=str(folder), detector=None if which == "tuned"
                                            else str(path)))
    body = json.loads(path.read_text())
    model = AnoModel.open(folder, detector=str(path), device="cpu")
    normals = np.array(body["val_normal_scores"])
    client = client_for(served)
    assert client.get("/api/info").json()["method"] == body["method"]
    decisions = set()
    for name, data in raw_images(setup):
        r = post_images(client, (name, data)).json()["results"][0]
        want = model.judge(data)
        assert r["score"] == pytest.approx(want.score, rel=1e-6, abs=1e-6), name
        assert r["percentile"] == pytest.approx(want.percentile, abs=1e-9)
        assert r["percentile"] == pytest.approx(100 * np.sum(normals <= r["score"]) / len(normals))
        assert (r["decision"], r["method"]) == (want.decision, body["method"])
        decisions.add(r["decision"])
        assert (r["threshold"], r["threshold_rule"], r["comparison"], r["reference_count"]) == \
            (body["threshold"], body["threshold_rule"], body["comparison"], len(normals))
        assert (r["pixel_term"], r["feature_term"], r["kappa"], r["feature_layer"]) == \
            (None, None, None, None)
        images = r["images"]
        fitted = model.fit(data)  # [C, H, W]
        assert np.array_equal(decode_data_url(images["input"]), fitted.transpose(1, 2, 0))
        if model.detector.scorer.needs.rec:
            with torch.no_grad():
                _ws, rec = model.reconstruct(from_uint8(torch.from_numpy(fitted[None])))
            assert np.array_equal(decode_data_url(images["reconstruction"]), to_uint8(rec)[0])
        else:
            assert images["reconstruction"] is None and images["residual"] is None
    assert decisions == {"normal", "anomalous"}  # naevi and noise: both answers are checked


def test_a_detector_is_served_through_the_models_judge(setup, folder, monkeypatch):  # noqa: F811
    """serve --model answers with the percentile and decision of AnoModel.judge, one call per
    upload, not with a computation of its own: a judgement altered here is what it serves."""
    real, calls = AnoModel.judge, []

    def altered(self, image):
        judged = real(self, image)
        calls.append(judged)
        flipped = "normal" if judged.decision == "anomalous" else "anomalous"
        return dataclasses.replace(judged, percentile=12.5, decision=flipped)

    monkeypatch.setattr(AnoModel, "judge", altered)
    served = load_serve_model(serve_options(model=str(folder)))
    results = post_images(client_for(served), *raw_images(setup)[:2]).json()["results"]
    assert len(calls) == len(results) == 2
    for r, judged in zip(results, calls):
        assert r["score"] == judged.score and r["percentile"] == 12.5
        assert r["decision"] != judged.decision and r["threshold"] == judged.threshold


def test_decision_flips_exactly_at_the_threshold(setup, folder):  # noqa: F811
    """residual:mean as a one-configuration detector: its score is the mean squared residual
    of the fitted image (checked by hand), >= threshold is anomalous, one ulp above is normal;
    --detector overrides the folder's detector.json."""
    name, data = raw_images(setup)[0]
    model = AnoModel.open(folder, device="cpu")
    x = from_uint8(torch.from_numpy(model.fit(data)[None]))
    with torch.no_grad():
        _ws, rec = model.reconstruct(x)
    s = float((x - rec).square().mean())
    for threshold, decision in ((s * (1 - 1e-4), "anomalous"), (s * (1 + 1e-4), "normal")):
        path = write_detector(folder, "flip.json",
                              **single("residual:mean", threshold, [s - 2, s - 1, s - 1e-3]))
        served = load_serve_model(serve_options(model=str(folder), detector=str(path)))
        r = post_images(client_for(served), (name, data)).json()["results"][0]
        assert r["score"] == pytest.approx(s, rel=1e-6)
        assert (r["method"], r["decision"], r["percentile"]) == ("residual:mean", decision, 100.0)
        assert isinstance(served.scorer, ServeScorer)
    exact = r["score"]  # the served score itself: at the threshold is anomalous
    for threshold, decision in ((exact, "anomalous"), (float(np.nextafter(exact, np.inf)),
                                                       "normal")):
        path = write_detector(folder, "flip.json", **single(
            "residual:mean", threshold, [exact - 1, exact, exact, exact + 1]))
        served = load_serve_model(serve_options(model=str(folder), detector=str(path)))
        r = post_images(client_for(served), (name, data)).json()["results"][0]
        assert (r["score"], r["threshold"], r["decision"]) == (exact, threshold, decision)
        assert r["percentile"] == 75.0  # 3 of 4 validation naevi <= score (ties count)


def test_detector_with_network_and_encoder_flags(setup, folder):  # noqa: F811
    """--detector JSON with --network/--encoder (no --model) serves the same numbers."""
    name, data = raw_images(setup)[1]
    by_folder = post_images(client_for(load_serve_model(serve_options(model=str(folder)))),
                            (name, data)).json()["results"][0]
    served = load_serve_model(serve_options(network=setup["network"], encoder=setup["encoder"],
                                            detector=str(folder / "detector.json")))
    r = post_images(client_for(served), (name, data)).json()["results"][0]
    assert (r["score"], r["percentile"], r["decision"], r["method"]) == \
        (by_folder["score"], by_folder["percentile"], by_folder["decision"], by_folder["method"])


# ----------------------------------------------------------------------------------------------
# Fail closed


def test_non_finite_detector_score_is_a_500_never_normal(setup, folder):  # noqa: F811
    """The encoder's weights set to infinity: NaN residuals; the answer is a 500, no decision."""
    path = write_detector(folder, "nan.json", **single("residual:mean", 1e9, [0.0, 1.0]))
    broken = load_serve_model(serve_options(model=str(folder), detector=str(path)))
    with torch.no_grad():
        broken.scorer.model.E.head.weight.fill_(float("inf"))
    client = TestClient(client_for(broken).app, raise_server_exceptions=False)
    r = post_images(client, ("lesion.png", raw_images(setup)[0][1]))
    assert r.status_code == 500, r.text
    assert "non-finite score for 'lesion.png'" in r.json()["detail"]
    assert "normal" not in r.text and "decision" not in r.json()


def test_infinite_component_of_a_rank_average_is_a_500(setup, folder, monkeypatch):  # noqa: F811
    """A rank average would map +inf to a finite percentile (100): the detector gives NaN, and
    serve refuses it."""
    body = json.loads((folder / "detector.json").read_text())
    two = [{"method": m, "tta": False, "reference": [0.0, 1.0, 2.0]}
           for m in ("residual:mean", "residual:p99")]
    path = write_detector(folder, "rank.json", method="rank-average(residual:mean + "
                          "residual:p99)", combine="rank-average", tta=False, configuration=two,
                          threshold=1e9, val_normal_scores=body["val_normal_scores"])
    served = load_serve_model(serve_options(model=str(folder), detector=str(path)))
    real = det.method_scores

    def infinite_p99(method, *args, **kwargs):
        scores = real(method, *args, **kwargs)
        return np.full_like(scores, np.inf) if method == "residual:p99" else scores

    monkeypatch.setattr(det, "method_scores", infinite_p99)
    batch = served.scorer.model.batch(served.scorer.model.fit(raw_images(setup)[0][1])[None])
    # the percentile of +inf would be a finite 100; the detector makes it NaN (no decision)
    assert np.isnan(served.scorer.detector.score_batch(batch)).all()
    client = TestClient(client_for(served).app, raise_server_exceptions=False)
    r = post_images(client, ("x.png", raw_images(setup)[0][1]))
    assert r.status_code == 500 and "decision" not in r.json(), r.text


def test_checked_score_checks_only_the_terms_it_has():
    from anomaly.app.model import ImageScore

    image = np.zeros((4, 4, 3), dtype=np.uint8)
    ok = ImageScore(1.5, None, None, image, None, None, "knn-latent:5")
    assert app_server.checked_score(ok, "a.png") is ok
    for bad in (ImageScore(float("nan"), None, None, image, None, None, "knn-latent:5"),
                ImageScore(1.5, float("inf"), 0.0, image, None, None, "izif")):
        with pytest.raises(app_server.Refusal, match="non-finite score for 'a.png'"):
            app_server.checked_score(bad, "a.png")


# ----------------------------------------------------------------------------------------------
# A detector without reconstruction


def test_d_feature_density_answers_with_the_input_picture_only(setup):  # noqa: F811
    out = setup["root"] / "tuned-serve-d"
    r = CliRunner().invoke(main, [str(a) for a in (
        "tune", "--network", setup["network"], "--encoder", setup["encoder"], "--data",
        setup["prepared"] / "val.zip", "--outdir", out, "--grid", "maha-dfeat:b8", "--tta",
        "off", "--bootstrap", 0, "--dims", 8, "--device", "cpu")])
    assert r.exit_code == 0, r.output
    folder = _model_dir(setup, {"out": out}, "serve-model-d")
    served = load_serve_model(serve_options(model=str(folder)))
    name, data = raw_images(setup)[3]
    (res,) = post_images(client_for(served), (name, data)).json()["results"]
    want = AnoModel.open(folder, device="cpu").judge(data)
    assert res["method"] == "maha-dfeat:b8" and served.scorer.detector.scorer.last_forward is None
    assert (res["score"], res["percentile"], res["decision"]) == \
        (pytest.approx(want.score, rel=1e-6, abs=1e-6), want.percentile, want.decision)
    assert res["images"]["reconstruction"] is None and res["images"]["residual"] is None
    fitted = served.scorer.model.fit(data)
    assert np.array_equal(decode_data_url(res["images"]["input"]), fitted.transpose(1, 2, 0))


# ----------------------------------------------------------------------------------------------
# The command line


def run_serve(monkeypatch, *args) -> tuple[object, list]:
    """`anostyle serve ARGS --threads 1 --device cpu` with uvicorn replaced: (click result,
    addresses it would have served)."""
    served = fake_uvicorn(monkeypatch)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    args = [*map(str, args), "--threads", "1", "--device", "cpu"]
    return CliRunner().invoke(main, ["serve", *args]), served


def test_cli_serves_the_model_folder(folder, monkeypatch):
    result, served = run_serve(monkeypatch, "--model", folder, "--port", 0)
    assert result.exit_code == 0, result.output
    body = json.loads((folder / "detector.json").read_text())
    (line,) = [s for s in result.output.splitlines() if "AnoStyle serving" in s]
    assert f"AnoStyle serving http://127.0.0.1:{served[0][1]}/ - 16 px, detector " \
           f"{body['method']}, threshold {body['threshold']:.6g}" in line
    assert f"{len(body['val_normal_scores'])} validation naevi" in line


def test_cli_refusals_are_one_sentence(setup, folder, tmp_path, monkeypatch):  # noqa: F811
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("network.safetensors", "encoder.safetensors"):
        shutil.copy(folder / f, bare / f)
    summary = tmp_path / "summary.json"
    summary.write_text("{}")
    cases = [
        (("--model", bare), "--model " + str(bare) + " holds no detector.json; run `anostyle "
                                                     "tune`"),
        (("--model", folder, "--summary", summary), "--summary only applies to the izif mode"),
        (("--model", folder, "--scores", tmp_path, "--kappa", 1),
         "--scores, --kappa only apply to the izif mode"),
        (("--detector", folder / "detector.json", "--network", setup["network"]),
         "--encoder is missing; --detector needs --network and --encoder, or --model DIR"),
        (("--network", setup["network"],), "--encoder and --summary are missing; give "
                                           "--network, --encoder and --summary (izif), or "
                                           "--model DIR"),
        ((), "--network, --encoder and --summary are missing"),
        (("--model", folder, "--detector", tmp_path / "none.json"),
         "--detector " + str(tmp_path / "none.json") + " does not exist"),
    ]
    for args, message in cases:
        result, served = run_serve(monkeypatch, *args)
        assert result.exit_code == 1 and not served, (args, result.output)
        assert message in result.output, (args, result.output)
        assert result.output.count("\n") == 1 and "Traceback" not in result.output, result.output
        assert result.output.rstrip().endswith(".")


def test_resolve_keeps_explicit_files_over_the_folders(setup, folder):  # noqa: F811
    opts = serve_options(model=str(folder), network=setup["network"]).resolve()
    assert (opts.network, opts.encoder, opts.detector) == \
        (setup["network"], str(folder / "encoder.safetensors"), str(folder / "detector.json"))
    assert opts.resolve() == opts  # idempotent: run_server and load_serve_model both resolve
    with pytest.raises(UserError, match="is not a folder"):
        serve_options(model=str(folder / "nothing")).resolve()


# ----------------------------------------------------------------------------------------------
# The page (run in node: the page's own functions on a minimal DOM)


DOM = """
class Node {
  constructor(tag) { this.tag = tag; this.children = []; this.className = "";
                     this.textContent = ""; }
  append(...nodes) { this.children.push(...nodes); }
  remove() { this.removed = true; }
  replaceChildren(...nodes) { this.children = nodes; }
  querySelector(sel) { return this.children.find((c) => c.className === sel.slice(1)); }
}
const document = { createElement: (tag) => new Node(tag), getElementById: () => box };
const box = new Node("section");
function texts(node) { return [node.textContent, ...node.children.flatMap(texts)]
  .filter((t) => t !== ""); }
function tags(node, tag) { return (node.tag === tag ? [node] : [])
  .concat(node.children.flatMap((c) => tags(c, tag))); }
"""


def run_page(calls: str) -> dict:
    page = app_server.page_and_policy()[0]
    script = re.search(r"<script>(.*?)</script>", page, flags=re.DOTALL).group(1)
    functions = "".join(re.search(rf"(function {name}\(.*?\n}}\n)", script, flags=re.DOTALL)
                        .group(1) for name in ("el", "fmt", "isIzif", "figure", "showInfo",
                                               "showResult"))
    out = subprocess.run(["node", "-e", DOM + functions + calls], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return json.loads(out)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_page_shows_the_method_and_hides_null_terms():
    method = "rank-average(residual:mean@tta + residual:mean)"
    common = {"resolution": 16, "percentile": 62.5, "reference_count": 8, "decision": "normal",
              "threshold": 70.25, "threshold_rule": "youden (val)", "comparison": "nv vs mel",
              "width": 40, "height": 30}
    detector = {**common, "method": method, "score": 61.5, "pixel_term": None,
                "feature_term": None, "kappa": None, "feature_layer": None,
                "images": {"input": "data:image/png;base64,AA", "reconstruction": None,
                           "residual": None}}
    izif = {**common, "method": "izif", "score": 0.3, "pixel_term": 0.2, "feature_term": 0.2,
            "kappa": 0.5, "feature_layer": "b8",
            "images": {k: "data:image/png;base64,AA" for k in ("input", "reconstruction",
                                                                "residual")}}
    info = {"model": "ham64-cpu", "resolution": 16, "channels": 3, "method": method,
            "kappa": None, "feature_layer": None, "threshold": 70.25,
            "threshold_rule": "youden (val)", "comparison": "nv vs mel", "reference_count": 8,
            "percentile_note": "", "notes": [], "max_upload_bytes": 2**20, "max_pixels": 1e6}
    shown = run_page(
        "const out = {};"
        "for (const [key, r] of Object.entries(" + json.dumps({"detector": detector,
                                                               "izif": izif}) + ")) {"
        "  const card = new Node('article'); card.append(new Node('h2'));"
        "  const status = new Node('p'); status.className = 'status'; card.append(status);"
        "  showResult(card, r);"
        "  out[key] = {texts: texts(card), figures: tags(card, 'figure').length}; }"
        "showInfo(" + json.dumps(info) + "); out.info = texts(box);"
        "process.stdout.write(JSON.stringify(out));")
    d, z = shown["detector"], shown["izif"]
    assert d["figures"] == 1 and z["figures"] == 3
    assert "method" in d["texts"] and method in d["texts"] and "score" in d["texts"]
    assert "61.5000" in d["texts"] and "62.5 % of 8 validation naevi" in d["texts"]
    assert not any("term" in t or "null" in t or "undefined" in t for t in d["texts"]), d
    assert {"izif score", "pixel term", "feature term", "0.20000 (x 0.500)"} <= set(z["texts"])
    assert any(f"score of the tuned detector {method}." in t for t in shown["info"])
    assert not any("null" in t or "undefined" in t for t in shown["info"]), shown["info"]
