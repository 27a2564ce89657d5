"""End to end through the numbered scripts at tiny scale (32 px, a fraction of a kimg)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_numbered_scripts_run_the_whole_pipeline(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), RES="32", KIMG="0.016", TICK="0.008", RESUME="",
               ENCODER_KIMG="0.032", BOOTSTRAP="50", DEVICE="cpu", WORKERS="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", str(REPO / "scripts" / "run_all.sh")], env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for step in range(1, 9):
        assert f"== 0{step} " in result.stdout
    assert "== 10 adapt" in result.stdout  # your own collection: the shipped model, adapted
    adapted = tmp_path / "models" / "adapted"
    assert {"detector.json", "README.md", "splits.csv"} <= {p.name for p in adapted.iterdir()}
    assert json.loads((adapted / "evaluation" / "summary.json").read_text())["primary"] \
        == "detector"
    dataset = tmp_path / "datasets" / "demo-32"
    n_test = len(json.loads(zipfile.ZipFile(dataset / "test.zip").read("dataset.json"))["labels"])
    assert len(list((tmp_path / "generated_img").rglob("*_residual.png"))) == n_test
    scores = tmp_path / "scores"
    for method in ("izif", "sklearn-euclidean", "sklearn-manhattan", "sklearn-cosine",
                   "torch-euclidean", "latent", "knn-pixels", "all_scores", "reference"):
        assert (scores / f"{method}.xlsx").is_file(), method
    graphics = tmp_path / "graphics"
    summary = json.loads((graphics / "summary.json").read_text())
    text = json.dumps(summary)
    assert "knn-pixels" in text and "izif" in text
    # the supervised reference (the `reference` extra is installed with the tests) has its row
    assert summary["reference"]["role"] == "reference (uses labels)"
    assert 0.0 <= summary["reference"]["auc"] <= 1.0
    html = (graphics / "index.html").read_text()
    pngs = [p.relative_to(graphics).as_posix() for p in graphics.rglob("*.png")]
    assert "tsne.png" in pngs and any(p.startswith("heatmaps/") for p in pngs)
    assert all(p in html for p in pngs)
    assert "reference (uses labels)" in html
