"""A score that is not a finite number never becomes a result (issue 19, items 2 and 3): the
Python API's judge refuses it as serve does (no percentile, no decision), and `score`,
`reconstruct` and `tune` refuse in one sentence naming how many images were non-finite, leaving
no sheet behind. The model: a tiny network with an encoder whose weights are scaled by 1e30
(finite in float32, so the load checks pass; its codes overflow), recorded by sha256 in its
detector.json as the loader expects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from anodata.prepare import PrepareOptions, prepare_dataset
from anomaly.methods import detector as det
from anomaly.methods import detector_scores as ds
from anomaly.app.model import ServeOptions, load_serve_model
from anomaly.cli import main
from anomaly.model.ano_model import AnoModel
from anomaly.model.encoder_io import save_encoder
from stylegan.fileio import sha256_file
from encoder_helpers import one_thread  # noqa: F401 (autouse fixture)
from stylegan.dataset import ImageDataset
from encoder_helpers import (random_head_encoder, sample_images, save_tiny_networks, tiny_networks,
                             write_folder)

POLICY = {"resolution": 16, "channels": 3, "transform": "center-crop", "resize_filter": "box",
          "colour": "none", "colour_p": 6.0}
SENTENCE = ("The model gave a non-finite score (nan) for {image}, so it gives no percentile and "
            "no decision; its network or encoder weights overflow or are damaged: check or "
            "replace those files.")


def model_folder(folder, G, D, E) -> None:
    """network.safetensors, encoder.safetensors (recording the network's sha256) and a
    one-configuration detector.json (recording both files' sha256) in `folder`."""
    network = save_tiny_networks(folder / "network.safetensors", G, D)
    save_encoder(folder / "encoder.safetensors", E, extra={
        "training_options": {"kappa": 0.5, "feature_layer": "b8"}, "preprocessing": POLICY,
        "network": {"path": "network.safetensors", "sha256": sha256_file(network)}})
    det.Detector(components=(det.Component("residual:mean", False),), combine="single",
                 threshold=0.5, threshold_rule="fixed", comparison="nv vs mel",
                 val_normals=(0.1, 0.2, 0.3, 0.4), selection={}, bank=None,
                 network_sha256=sha256_file(network),
                 encoder_sha256=sha256_file(folder / "encoder.safetensors"),
                 preprocessing=POLICY, kappa=0.5, feature_layer="b8").save(
        folder / "detector.json")


@pytest.fixture(scope="module")
def overflow(tmp_path_factory):
    """A sound model folder, the same with the encoder's weights x 1e30, prepared data."""
    root = tmp_path_factory.mktemp("overflow")
    G, D = tiny_networks()
    E = random_head_encoder(G)
    (root / "sound").mkdir()
    model_folder(root / "sound", G, D, E)
    with torch.no_grad():
        for p in E.parameters():
            p.mul_(1e30)
    (root / "broken").mkdir()
    model_folder(root / "broken", G, D, E)
    source = root / "source"
    write_folder(source / "nv", sample_images(G, 12, seed=1), prefix="nv")
    noise = np.random.RandomState(2).randint(0, 256, (6, 16, 16, 3)).astype(np.uint8)
    write_folder(source / "mel", noise, prefix="mel")
    prepare_dataset(PrepareOptions(source=str(source), dest=str(root / "prepared"),
                                   normal=("nv",), resolution=16, workers=1, val=0.5, test=0.2))
    image = sorted((source / "nv").glob("*.png"))[0]
    return {"root": root, "sound": root / "sound", "broken": root / "broken", "image": image,
            "prepared": root / "prepared"}


# ----------------------------------------------------------------------------------------------
# Item 2: one rule for every entry point


def test_the_python_api_gives_no_decision_on_a_non_finite_score(overflow):
    """AnoModel.open(DIR).judge(img) answered score=nan, percentile=100, decision='normal';
    now it raises NonFiniteScore (a UserError: one sentence), as serve answers a 500."""
    sound = AnoModel.open(overflow["sound"], device="cpu")
    judged = sound.judge(overflow["image"])
    assert np.isfinite(judged.score) and judged.decision in ("normal", "anomalous")
    broken = AnoModel.open(overflow["broken"], device="cpu")
    assert np.isnan(broken.detector.score_batch(broken.batch(overflow["image"]))).all()
    with pytest.raises(ds.NonFiniteScore) as refused:
        broken.judge(overflow["image"])
    assert str(refused.value) == SENTENCE.format(image=f"'{overflow['image']}'")
    with pytest.raises(ds.NonFiniteScore, match=r"for the image, so it gives no percentile"):
        broken.judge(broken.fit(overflow["image"]))  # a fitted array: no name


def test_serve_model_judge_follows_the_same_rule(overflow):
    served = load_serve_model(ServeOptions(None, None, None, model=str(overflow["sound"]),
                                           device="cpu"))
    judged = served.scorer.model  # serve answers through its AnoModel.judge
    fitted = judged.fit(overflow["image"])
    judged.detector.score_batch = lambda batch: np.array([0.25])
    assert served.answer(served.scorer(fitted))["percentile"] == 50.0
    for value in (float("nan"), float("inf"), float("-inf")):
        judged.detector.score_batch = lambda batch, v=value: np.array([v])
        with pytest.raises(ds.NonFiniteScore, match="gives no percentile and no decision"):
            judged.judge(fitted)
        assert np.isnan(served.scorer(fitted).score)  # which serve refuses (checked_score)
    with pytest.raises(ds.NonFiniteScore):
        ds.weak_percentile(float("nan"), np.array([0.1, 0.2]))
    assert ds.decide(0.5, 0.5) == "anomalous" and ds.decide(0.49, 0.5) == "normal"


# ----------------------------------------------------------------------------------------------
# Item 3: batch commands refuse NaN results and leave no sheet


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused_in_one_sentence(result, start: str) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    (line,) = [line for line in result.output.splitlines() if start in line]
    sentence = line[line.index(start):]
    assert sentence.endswith(".") and ". " not in sentence, sentence
    return sentence


def test_score_refuses_non_finite_scores_and_writes_no_sheet(overflow, tmp_path):
    out = tmp_path / "scored"
    r = run("score", "--model", overflow["broken"], "--data", overflow["prepared"] / "val.zip",
            "--methods", "izif,residual:mean", "--outdir", out, "--device", "cpu")
    n = len(ImageDataset(overflow["prepared"] / "val.zip"))
    sentence = refused_in_one_sentence(r, f"{n} of {n} images got a non-finite score")
    assert "from izif, residual:mean, detector, so score wrote no sheet" in sentence
    assert not list(out.glob("*.xlsx")) and not (out / "score.json").exists()
    sound = run("score", "--model", overflow["sound"], "--data",
                overflow["prepared"] / "val.zip", "--methods", "izif", "--outdir", out,
                "--device", "cpu")
    assert sound.exit_code == 0 and (out / "detector.xlsx").exists(), sound.output


def test_reconstruct_refuses_non_finite_reconstructions(overflow, tmp_path):
    out = tmp_path / "rec"
    source = overflow["image"].parent
    r = run("reconstruct", "--model", overflow["broken"], "--source", source, "--outdir", out,
            "--device", "cpu")
    n = len(list(source.glob("*.png")))
    sentence = refused_in_one_sentence(r, f"{n} of {n} images got a non-finite reconstruction")
    assert "mean MSE" not in r.output and "so reconstruct wrote no reconstruction.csv" in sentence
    assert not out.exists() or not list(out.iterdir())
    sound = run("reconstruct", "--model", overflow["sound"], "--source", source, "--outdir",
                out, "--device", "cpu")
    assert sound.exit_code == 0 and (out / "reconstruction.csv").exists(), sound.output


def test_tune_refuses_non_finite_scores_without_a_traceback(overflow, tmp_path):
    out = tmp_path / "tuned"
    r = run("tune", "--model", overflow["broken"], "--data", overflow["prepared"] / "val.zip",
            "--outdir", out, "--grid", "residual:mean,izif", "--tta", "off", "--bootstrap", 10,
            "--combine", 0, "--device", "cpu")
    sentence = refused_in_one_sentence(r, "images got a non-finite score")
    assert "from residual:mean, izif, so tune wrote no tune.xlsx or detector.json" in sentence
    assert not out.exists() or not list(out.iterdir())
