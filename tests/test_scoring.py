"""`anostyle score` and `anostyle tsne` end to end on tiny networks and a tiny prepared dataset."""

from __future__ import annotations

import csv
import json
import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from anomaly.cli import main
from anomaly.model.encoder_io import save_encoder
from anomaly.model.ano_model import discriminator_features
from anomaly.methods.scores import izif_score
from anomaly.evaluation.sheets import read_score_sheet
from encoder_helpers import (random_head_encoder, sample_images, save_tiny_networks, tiny_networks,
                             write_folder)
from stylegan.imageutil import from_uint8
from anodata.prepare import PrepareOptions, prepare_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    G, D = tiny_networks()
    E = random_head_encoder(G)
    network = save_tiny_networks(root / "net.safetensors", G, D)
    encoder = root / "encoder-000010.safetensors"
    save_encoder(encoder, E, extra={"training_options": {"kappa": 0.5, "feature_layer": "b8"}})
    source = root / "source"
    write_folder(source / "nv", sample_images(G, 30, seed=1), prefix="nv")
    noise = np.random.RandomState(2).randint(0, 256, (12, 16, 16, 3)).astype(np.uint8)
    write_folder(source / "mel", noise, prefix="mel")
    prepared = root / "prepared"
    prepare_dataset(PrepareOptions(source=str(source), dest=str(prepared), normal=("nv",),
                                   resolution=16, workers=1, val=0.3, test=0.4))
    return {"G": G, "D": D, "E": E, "network": str(network), "encoder": str(encoder),
            "prepared": prepared, "root": root}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def zip_image(path: Path, name: str) -> torch.Tensor:
    with zipfile.ZipFile(path) as zf:
        arr = np.array(Image.open(BytesIO(zf.read(name))).convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1)[None]  # [1, C, H, W] uint8


def test_score_writes_sheets_with_values_equal_to_the_library(setup):
    out, heat = setup["root"] / "scores", setup["root"] / "heatmaps"
    p = setup["prepared"]
    r = run("score", "--network", setup["network"], "--encoder", setup["encoder"],
            "--data", p / "val.zip", "--data", p / "test.zip", "--outdir", out,
            "--heatmaps", heat, "--num-heatmaps", 3, "--batch", 5, "--device", "cpu")
    assert r.exit_code == 0, r.output
    n_val = len(json.loads(zipfile.ZipFile(p / "val.zip").read("dataset.json"))["labels"])
    n_test = len(json.loads(zipfile.ZipFile(p / "test.zip").read("dataset.json"))["labels"])
    for name in ("izif", "sklearn-euclidean", "sklearn-manhattan", "sklearn-cosine",
                 "torch-euclidean", "latent"):
        df = read_score_sheet(out / f"{name}.xlsx")
        assert list(df.columns[:5]) == ["score", "label", "file", "class", "split"]
        assert len(df) == n_val + n_test
        assert set(df["split"]) == {"val", "test"}
        assert (df["label"] == (df["class"] == "mel").astype(int)).all()
        assert np.isfinite(df["score"]).all()
    izif = read_score_sheet(out / "izif.xlsx")
    row = izif[izif["split"] == "test"].iloc[0]
    x = from_uint8(zip_image(p / "test.zip", row["file"]))
    G, D, E = setup["G"], setup["D"], setup["E"]
    with torch.no_grad():
        rec = G.synthesis(E(x), noise_mode="const")
        want = izif_score(x, rec, discriminator_features(D, x, "b8"),
                          discriminator_features(D, rec, "b8"), kappa=0.5)  # encoder's kappa
    assert row["score"] == pytest.approx(float(want), rel=1e-5)
    te = read_score_sheet(out / "torch-euclidean.xlsx")
    sk = read_score_sheet(out / "sklearn-euclidean.xlsx")
    np.testing.assert_allclose(te["score"], sk["score"], rtol=1e-4)
    info = json.loads((out / "score.json").read_text())
    assert Path(info["prepared"]) == p.resolve() and info["kappa"] == 0.5
    assert info["images"] == n_val + n_test
    # traceability: the original image (source stem) and group of every row, from manifest.csv
    with open(p / "manifest.csv", newline="") as f:
        manifest = {(r["split"], r["file"]): r for r in csv.DictReader(f)}
    assert list(izif.columns[5:7]) == ["image", "group"]
    for _i, r in izif.iterrows():
        m = manifest[r["split"], r["file"]]
        assert r["image"] == Path(m["source"]).stem and str(r["group"]) == m["group"]
    worst = izif[izif["split"] == "test"].nlargest(3, "score")["image"].tolist()
    panels = sorted(heat.glob("*.png"))
    assert len(panels) == 6  # image and feature residual for each of the 3 worst test images
    assert panels[0].name.startswith(f"01_{worst[0]}_")  # named after the original image


def test_tsne_writes_plot_and_sheet(setup):
    p, out = setup["prepared"], setup["root"] / "graphics"
    r = run("tsne", "--network", setup["network"], "--encoder", setup["encoder"], "--data",
            p / "val.zip", "--data", p / "test.zip", "--outdir", out, "--perplexity", 5,
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert Image.open(out / "tsne.png").size[0] > 100
    sheet = __import__("pandas").read_excel(out / "tsne.xlsx")
    assert len(sheet) > 10 and {"nv", "mel"} <= set(sheet["class"])


def test_score_errors_are_one_sentence(setup):
    r = run("score", "--network", setup["network"], "--encoder", setup["encoder"], "--data",
            setup["root"] / "missing.zip", "--outdir", setup["root"] / "x")
    assert r.exit_code == 1 and "does not exist" in r.output and "Traceback" not in r.output
    r = run("score", "--network", setup["encoder"], "--encoder", setup["encoder"], "--data",
            setup["prepared"] / "val.zip", "--outdir", setup["root"] / "x")
    assert r.exit_code == 1 and "--encoder" in r.output
    r = run("score", "--network", setup["network"], "--encoder", setup["encoder"], "--data",
            setup["prepared"] / "val.zip", "--methods", "izif,sklearn:nonsense",
            "--outdir", setup["root"] / "x")
    assert r.exit_code == 1 and "nonsense" in r.output
