"""The one model object: `AnoModel.open(DIR)` opens a model folder with its detector and honours
the kappa and feature layer detector.json records (the encoder was trained with others);
`model.score` takes any method string, plain or of the detector's grammar, with the numbers of
the detector's own pass and of hand computations; `model.judge` answers what serve answers for
the same image and refuses a score that is not finite. A tiny 16 px network, encoder and a
hand-written detector.json made here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaly.methods import detector as det
from anomaly.methods import detector_scores as ds
from anomaly.app.model import ServeOptions, load_serve_model
from anomaly.model.encoder_io import save_encoder
from stylegan.fileio import sha256_file
from anomaly.model.ano_model import AnoModel, discriminator_features
from encoder_helpers import one_thread  # noqa: F401 (autouse fixture)
from encoder_helpers import (random_head_encoder, sample_images, save_tiny_networks, tiny_networks,
                             write_folder)
from stylegan.errors import UserError
from stylegan.imageutil import from_uint8

POLICY = {"resolution": 16, "channels": 3, "transform": "center-crop", "resize_filter": "box",
          "colour": "none", "colour_p": 6.0}
TRAINED = {"kappa": 0.5, "feature_layer": "b8"}  # the encoder's training options
RECORDED = {"kappa": 3.0, "feature_layer": "b16"}  # detector.json's: these must win
NORMALS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)  # the sampled naevi score about 0.07-0.2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """network.safetensors, encoder.safetensors (trained with kappa 0.5 at b8) and a detector
    whose one component is the plain izif, recorded with kappa 3 at b16; a few raw images."""
    root = tmp_path_factory.mktemp("open")
    G, D = tiny_networks()
    E = random_head_encoder(G)
    model_dir = root / "model"
    model_dir.mkdir()
    network = save_tiny_networks(model_dir / "network.safetensors", G, D)
    save_encoder(model_dir / "encoder.safetensors", E, extra={
        "training_options": TRAINED, "preprocessing": POLICY,
        "network": {"path": "network.safetensors", "sha256": sha256_file(network)}})
    det.Detector(components=(det.Component("izif", False),), combine="single",
                 threshold=0.3, threshold_rule="fixed", comparison="nv vs mel",
                 val_normals=NORMALS, selection={}, bank=None,
                 network_sha256=sha256_file(network),
                 encoder_sha256=sha256_file(model_dir / "encoder.safetensors"),
                 preprocessing=POLICY, **RECORDED).save(model_dir / "detector.json")
    images = root / "images"
    write_folder(images, sample_images(G, 3, seed=1), prefix="nv")
    noise = np.random.RandomState(2).randint(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    write_folder(images, noise, prefix="noise")
    return {"dir": model_dir, "images": sorted(images.glob("*.png"))}


def _izif_by_hand(model: AnoModel, path, *, kappa: float, layer: str) -> float:
    """izif of one image from its fitted pixels, G(E(x)) and D features, added up in numpy."""
    x = from_uint8(torch.from_numpy(model.fit(path)[None]))
    with torch.no_grad():
        _ws, rec = model.reconstruct(x)
        f, fr = (discriminator_features(model.D, t, layer).numpy() for t in (x, rec))
    x, rec = x.numpy().astype(np.float64), rec.numpy().astype(np.float64)
    return float(np.mean((x - rec) ** 2) + kappa * np.mean((f.astype(np.float64) - fr) ** 2))


def test_open_honours_the_detectors_recorded_kappa_and_layer(folder):
    model = AnoModel.open(folder["dir"], device="cpu")
    assert (model.kappa, model.feature_layer) == (3.0, "b16")
    assert model.detector is not None and model.detector.detector.method == "izif"
    plain = AnoModel.load(folder["dir"] / "network.safetensors",
                          folder["dir"] / "encoder.safetensors", device="cpu")
    assert (plain.kappa, plain.feature_layer) == (0.5, "b8") and plain.detector is None
    given = AnoModel.open(folder["dir"], device="cpu", kappa=0.25, feature_layer="b8")
    assert (given.kappa, given.feature_layer) == (0.25, "b8")  # an explicit argument wins
    # the detector's score is izif at the recorded kappa and layer, not the encoder's
    path = folder["images"][0]
    judged = model.judge(path)
    want = _izif_by_hand(model, path, kappa=3.0, layer="b16")
    assert judged.score == pytest.approx(want, rel=1e-4)
    assert abs(judged.score - _izif_by_hand(model, path, kappa=0.5, layer="b8")) > 1e-4 * want


def test_score_takes_any_method_string_with_the_detector_paths_numbers(folder):
    model = AnoModel.open(folder["dir"], device="cpu")
    paths = folder["images"]
    got = model.score(paths, methods="izif, Residual:Mean,izif:2:b8,sklearn:euclidean")
    assert list(got) == ["izif", "residual:mean", "izif:2:b8", "sklearn:euclidean"]
    batch = model.batch(paths)
    scorer = det.Scorer(model, [("residual:mean", False), ("izif:2:b8", False)])
    theirs = scorer.score_batch(batch)
    for name in ("residual:mean", "izif:2:b8"):
        assert got[name].dtype == np.float64 and got[name].shape == (len(paths),)
        np.testing.assert_allclose(got[name], theirs[name], rtol=1e-6, atol=1e-9)
    plain = model.score(paths, methods="izif,sklearn:euclidean")  # the plain methods' own pass
    np.testing.assert_allclose(got["izif"], plain["izif"], rtol=1e-5)
    np.testing.assert_allclose(got["sklearn:euclidean"], plain["sklearn:euclidean"], rtol=1e-5)
    for i, path in enumerate(paths):  # by hand: pixel MSE; izif:2:b8 at its own kappa and layer
        assert got["izif"][i] == pytest.approx(
            _izif_by_hand(model, path, kappa=3.0, layer="b16"), rel=1e-4)
        assert got["izif:2:b8"][i] == pytest.approx(
            _izif_by_hand(model, path, kappa=2.0, layer="b8"), rel=1e-4)
        assert got["residual:mean"][i] == pytest.approx(
            _izif_by_hand(model, path, kappa=0.0, layer="b8"), rel=1e-4)
    tta = model.score(paths, methods="residual:mean", tta=True)
    assert list(tta) == ["residual:mean@tta"] and np.all(np.isfinite(tta["residual:mean@tta"]))
    with pytest.raises(UserError, match="Unknown scoring method 'residual:median'"):
        model.score(paths, methods="izif,residual:median")


def test_judge_answers_what_serve_answers(folder):
    model = AnoModel.open(folder["dir"], device="cpu")
    served = load_serve_model(ServeOptions(None, None, None, model=str(folder["dir"]),
                                           device="cpu"))
    decisions = set()
    for path in folder["images"]:
        mine = model.judge(path)
        fitted = served.scorer.model.fit(path)
        s = served.scorer(fitted)
        answer = served.answer(s)
        assert s.score == pytest.approx(mine.score, rel=1e-6)
        assert answer["percentile"] == pytest.approx(mine.percentile, abs=1e-9)
        assert mine.percentile == pytest.approx(
            100 * np.sum(np.array(NORMALS) <= mine.score) / len(NORMALS))
        assert answer["decision"] == mine.decision == \
            ("anomalous" if mine.score >= 0.3 else "normal")
        assert (mine.threshold, mine.threshold_rule, mine.method) == (0.3, "fixed", "izif")
        decisions.add(mine.decision)
    assert decisions == {"normal", "anomalous"}  # both answers are checked


def test_judge_refuses_a_non_finite_score_and_a_model_without_detector(folder, monkeypatch):
    model = AnoModel.open(folder["dir"], device="cpu")
    path = folder["images"][0]
    for value in (float("nan"), float("inf"), float("-inf")):
        monkeypatch.setattr(model.detector, "score_batch", lambda batch, v=value: np.array([v]))
        with pytest.raises(ds.NonFiniteScore, match="gives no percentile and no decision"):
            model.judge(path)
    plain = AnoModel.load(folder["dir"] / "network.safetensors",
                          folder["dir"] / "encoder.safetensors", device="cpu")
    with pytest.raises(UserError, match="opened without a detector"):
        plain.judge(path)
