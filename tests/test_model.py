"""The one inference model (anomaly.model.ano_model.AnoModel) and the recorded preprocessing policy,
on real HAM10000 photos from data/demo/ and tiny networks."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sklearn.metrics import pairwise

from anodata.policy import Preprocessing, fit_array
from anomaly.app.model import Decision, Reference, izif_serve_model
from anomaly.app.server import create_app, upload_limits
from anomaly.app.model import ServeOptions
from anomaly.cli import main
from anomaly.model.encoder_io import load_encoder, save_encoder
from anomaly.model.fit import FitOptions, fit_encoder
from anomaly.model.ano_model import AnoModel
from anomaly.methods.scores import SKLEARN_METRICS, izif_score, latent_distance, pixel_distance
from anomaly.evaluation.sheets import read_score_sheet
from encoder_helpers import one_thread  # noqa: F401 (autouse fixture)
from encoder_helpers import tiny_encoder, tiny_networks
from stylegan.checkpoint import save_networks
from stylegan.imageutil import from_uint8
from stylegan.options import recorded_preprocessing

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
POLICY = {"transform": "pad", "resize_filter": "lanczos"}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """20 demo photos (16 nv, 4 mel) prepared at 16 px with pad + lanczos; a tiny network saved
    as train-gan saves it (policy read beside train.zip); an encoder trained 2 iterations."""
    root = tmp_path_factory.mktemp("model")
    with open(DEMO / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    pick = [r for r in rows if r["dx"] == "nv"][:16] + [r for r in rows if r["dx"] == "mel"][:4]
    source = root / "raw"
    source.mkdir()
    for r in pick:
        shutil.copy(DEMO / "images" / f"{r['image_id']}.jpg", source)
    with open(root / "meta.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(pick)
    prepared = root / "prepared"
    r = run("prepare", "--source", source, "--labels", root / "meta.csv", "--label-column", "dx",
            "--group-column", "lesion_id", "--normal", "nv", "--dest", prepared,
            "--resolution", 16, "--transform", "pad", "--resize-filter", "lanczos",
            "--val", 0.25, "--test", 0.25, "--workers", 1)
    assert r.exit_code == 0, r.output
    G, D = tiny_networks()
    policy = recorded_preprocessing(str(prepared / "train.zip"))  # what train-gan records
    network = save_networks(root / "net.safetensors", G=G, D=D, G_ema=G,
                            extra={"preprocessing": policy})
    fit_encoder(FitOptions(network=str(network), data=str(prepared / "train.zip"),
                           outdir=str(root / "enc"), iters=2, batch=2, snap=0, workers=0,
                           device="cpu", kappa=0.5), echo=lambda _m: None)
    encoder = sorted((root / "enc").glob("encoder-*.safetensors"))[-1]
    return {"root": root, "source": source, "prepared": prepared, "network": str(network),
            "encoder": str(encoder), "policy": policy}


def test_policy_is_recorded_in_prepare_json_network_and_encoder(setup):
    info = json.loads((setup["prepared"] / "prepare.json").read_text())
    want = Preprocessing(resolution=16, **POLICY).to_dict()
    assert info["preprocessing"] == want and setup["policy"] == want
    _E, extra = load_encoder(setup["encoder"])
    assert extra["preprocessing"] == want
    model = AnoModel.load(setup["network"], setup["encoder"], device="cpu")
    assert model.policy == Preprocessing(resolution=16, **POLICY)
    assert model.kappa == 0.5  # the encoder's training kappa


def test_raw_upload_to_serve_scores_like_the_prepared_zip(setup):
    """The izif of a raw photo uploaded to serve equals its score in the prepared zip (1e-5),
    because serve fits it by the recorded pad + lanczos policy, not by the defaults."""
    out = setup["root"] / "scores"
    r = run("score", "--network", setup["network"], "--encoder", setup["encoder"], "--data",
            setup["prepared"] / "test.zip", "--outdir", out, "--methods", "izif",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    sheet = read_score_sheet(out / "izif.xlsx")
    model = AnoModel.load(setup["network"], setup["encoder"], device="cpu")
    serve = izif_serve_model(model, Decision(0.0, "fixed", "nv vs mel", "summary.json"),
                             Reference(None, None, "no sheet", {}))
    limits = upload_limits(ServeOptions("n", "e", "s"))
    client = TestClient(create_app(serve, limits))
    for _i, row in sheet.iterrows():
        data = (setup["source"] / f"{row['image']}.jpg").read_bytes()
        response = client.post("/api/score", files=[("image", ("x.jpg", data, "image/jpeg"))])
        assert response.status_code == 200, response.text
        served = response.json()["results"][0]["score"]
        assert served == pytest.approx(row["score"], rel=1e-5, abs=1e-7)
    # and the recorded policy matters: the defaults fit these photos differently
    data = (setup["source"] / f"{sheet['image'].iloc[0]}.jpg").read_bytes()
    default = fit_array(data, ".jpg", Preprocessing(resolution=16))
    assert not np.array_equal(default, model.fit(data))


def test_score_computes_every_method_from_one_forward_pass(setup):
    model = AnoModel.load(setup["network"], setup["encoder"], device="cpu")
    paths = sorted(setup["source"].glob("*.jpg"))[:3]
    scores = model.score([str(p) for p in paths], "izif,latent,sklearn:cosine,torch-euclidean")
    x = from_uint8(torch.from_numpy(np.stack([model.fit(p) for p in paths])))
    with torch.no_grad():
        ws = model.E(x)
        rec = model.G.synthesis(ws, noise_mode="const")
        want = izif_score(x, rec, model.features(x), model.features(rec), kappa=0.5)
    np.testing.assert_allclose(scores["izif"], want.numpy(), rtol=1e-6)
    np.testing.assert_allclose(scores["latent"], latent_distance(ws, model.G.mapping.w_avg),
                               rtol=1e-6)
    np.testing.assert_allclose(scores["sklearn:cosine"], pairwise.paired_cosine_distances(
        x.flatten(1).double().numpy(), rec.flatten(1).double().numpy()), rtol=1e-9)
    single = model.score(paths[1].read_bytes(), "izif")["izif"]  # bytes: same fit as a path
    assert single.shape == (1,) and single[0] == pytest.approx(scores["izif"][1], rel=1e-6)


def test_reconstructions_are_named_after_the_original_images(setup):
    out = setup["root"] / "generated_img"
    r = run("reconstruct", "--network", setup["network"], "--encoder", setup["encoder"],
            "--source", setup["prepared"] / "test.zip", "--outdir", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    with open(setup["prepared"] / "manifest.csv", newline="") as f:
        want = {Path(m["source"]).stem + ".png" for m in csv.DictReader(f) if m["split"] == "test"}
    assert {p.name for p in out.glob("*.png")} == want
    assert all(re.fullmatch(r"ISIC_\d{7}\.png", name) for name in want)


@pytest.mark.parametrize("metric", SKLEARN_METRICS)
def test_pixel_distance_equals_scikit_learn(metric):
    g = torch.Generator().manual_seed(0)
    x, rec = torch.rand(5, 3, 4, 4, generator=g) * 2 - 1, torch.rand(5, 3, 4, 4, generator=g)
    rec[0] = 0  # a zero image: cosine's edge case
    a, b = x.flatten(1).double().numpy(), rec.flatten(1).double().numpy()
    if metric in pairwise.PAIRED_DISTANCES:
        want = pairwise.paired_distances(a, b, metric=metric)
    else:
        want = np.array([pairwise.pairwise_distances(a[i:i + 1], b[i:i + 1], metric=metric)[0, 0]
                         for i in range(len(a))])
    np.testing.assert_allclose(pixel_distance(x, rec, metric), want, rtol=1e-12, atol=1e-12)


def test_readme_detector_example_runs_on_the_shipped_model():
    """The README's detector example, as written, on models/ham64-cpu and a demo photo: its
    answer is the detector's own score of the fitted image, with a consistent decision."""
    text = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- detector-example -->\s*```python\n(.*?)```", text, re.S).group(1)
    for path in ("models/ham64-cpu", "data/demo/images/ISIC_0024326.jpg"):
        assert f'"{path}"' in code, path
        code = code.replace(f'"{path}"', repr(str(ROOT / path)))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    answer, model = namespace["answer"], namespace["model"]
    detector = model.detector
    fitted = model.fit(ROOT / "data/demo/images/ISIC_0024326.jpg")
    want = float(detector.score_batch(torch.from_numpy(fitted[None]))[0])
    assert answer.score == pytest.approx(want, rel=1e-9)
    assert answer.decision == ("anomalous" if want >= answer.threshold else "normal")
    assert 0 <= answer.percentile <= 100 and answer.method == detector.detector.method


def test_a_model_without_recorded_policy_warns_and_uses_the_defaults(tmp_path):
    G, D = tiny_networks()
    network = save_networks(tmp_path / "net.safetensors", G=G, D=D, G_ema=G)
    encoder = tmp_path / "enc.safetensors"
    save_encoder(encoder, tiny_encoder(G))
    model = AnoModel.load(network, encoder, device="cpu")
    with pytest.warns(UserWarning, match="records the preprocessing"):
        policy = model.policy
    assert policy == Preprocessing(resolution=16)
