"""`anostyle adapt`: a tuned model folder for a new collection in one command.

On tiny CPU networks: the folder it writes loads through `AnoModel.open` and scores like
`score --model` (1e-6); a run killed at any step continues with the same command and does not
redo the finished steps; the training steps warm-start from the parent; a collection without
normals in train or val, an existing --dest, other options over an unfinished run and a
--prepared folder of another policy are refused in one sentence; the simpler tuning rules of a
small validation split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import anomaly.adapt as adapt_mod
from anomaly.adapt import AdaptOptions, adapt, tuning_rule
from anomaly.cli import main
from anomaly.model.encoder_io import save_encoder
from anomaly.model.ano_model import AnoModel
from encoder_helpers import one_thread  # noqa: F401 (autouse fixture)
from encoder_helpers import (random_head_encoder, sample_images, save_tiny_networks, tiny_networks,
                             write_folder)
from stylegan.errors import UserError

GRID = "residual:mean,sklearn:manhattan,knn-latent:3"
POLICY = {"resolution": 16, "channels": 3, "transform": "center-crop", "resize_filter": "box",
          "colour": "none", "colour_p": 6.0}


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A tiny parent model folder (network + encoder recording a 16 px policy + a detector.json
    naming its configuration) and a raw collection: 60 G samples as 'nevus', 40 noise images
    as 'melanoma'."""
    root = tmp_path_factory.mktemp("adapt")
    G, D = tiny_networks()
    E = random_head_encoder(G)
    folder = root / "parent"
    folder.mkdir()
    save_tiny_networks(folder / "network.safetensors", G, D)
    save_encoder(folder / "encoder.safetensors", E.eval(),
                 extra={"training_options": {"kappa": 0.5, "feature_layer": "b8"},
                        "preprocessing": POLICY})
    (folder / "detector.json").write_text(json.dumps(
        {"method": "residual:p99", "configuration": [{"method": "residual:p99", "tta": False}]}))
    source = root / "source"
    write_folder(source / "nevus", sample_images(G, 60, seed=1), prefix="nv")
    noise = np.random.RandomState(2).randint(0, 256, (40, 16, 16, 3)).astype(np.uint8)
    write_folder(source / "melanoma", noise, prefix="mel")
    return {"root": root, "folder": folder, "source": source}


def options(parent, dest: Path, **changes) -> AdaptOptions:
    values = dict(model=str(parent["folder"]), dest=str(dest), source=str(parent["source"]),
                  normal=("nevus",), anomaly_class="melanoma", val=0.3, test=0.2, grid=GRID,
                  bootstrap=20, workers=1, batch=16, device="cpu")
    values.update(changes)
    return AdaptOptions(**values)


def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def adapted(parent):
    """One full run through the CLI, its output kept."""
    dest = parent["root"] / "models" / "mine"
    r = CliRunner().invoke(main, [
        "adapt", "--model", str(parent["folder"]), "--dest", str(dest),
        "--source", str(parent["source"]), "--normal", "nevus", "--anomaly-class", "melanoma",
        "--val", "0.3", "--test", "0.2", "--grid", GRID, "--bootstrap", "20", "--workers", "1",
        "--batch", "16", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return {"dest": dest, "output": r.output}


def test_the_folder_is_complete_and_says_how_it_was_made(parent, adapted):
    dest = adapted["dest"]
    names = {p.name for p in dest.iterdir()}
    assert {"network.safetensors", "encoder.safetensors", "detector.json", "splits.csv",
            "tune.xlsx", "README.md", "adapt.json", "evaluation"} <= names
    assert not dest.with_name("mine.adapt-work").exists()  # the work folder is gone
    lines = adapted["output"].splitlines()
    for i, step in enumerate(adapt_mod.STEPS, 1):  # one line per step with its time
        assert any(line.startswith(f"[{i}/6] {step}: done in") for line in lines), step
    record = json.loads((dest / "adapt.json").read_text())
    parent_sha = record["parent"]["network_sha256"]
    card = (dest / "README.md").read_text()
    assert parent_sha in card and "read **once**" in card and "anostyle adapt" in card
    assert "| nevus | 30 | 18 | 12 |" in card  # images per split and class
    splits = pd.read_csv(dest / "splits.csv")
    assert list(splits.columns) == ["group", "split"] and len(splits) == 100
    detector = json.loads((dest / "detector.json").read_text())
    assert detector["comparison"] == "nevus vs melanoma"
    assert detector["method"] in GRID.split(",")  # 18 anomalies: no TTA, no rank average
    assert ("bank.safetensors" in names) == bool(detector["bank"])
    summary = json.loads((dest / "evaluation" / "summary.json").read_text())
    assert summary["primary"] == "detector" and summary["split"] == "test"


def test_the_folder_scores_like_score_model(parent, adapted, tmp_path):
    """AnoModel.open(DEST) judges the prepared test images with the numbers `score --model
    DEST` writes (1e-6)."""
    dest = adapted["dest"]
    data = tmp_path / "data"
    r = CliRunner().invoke(main, ["prepare", "--model", str(dest), "--source",
                                  str(parent["source"]), "--normal", "nevus", "--splits-from",
                                  str(dest / "splits.csv"), "--dest", str(data), "--workers", "1"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "scores"
    r = CliRunner().invoke(main, ["score", "--model", str(dest), "--data", str(data / "test.zip"),
                                  "--methods", "residual:mean", "--outdir", str(out),
                                  "--device", "cpu"])
    assert r.exit_code == 0, r.output
    sheet = pd.read_excel(out / "detector.xlsx")
    model = AnoModel.open(dest, device="cpu")
    from stylegan.dataset import ImageDataset

    dataset = ImageDataset(str(data / "test.zip"))
    names = [Path(n).name for n in dataset.names]
    images = torch.stack([torch.from_numpy(dataset[i][0]) for i in range(len(dataset))])
    mine = model.detector.score_batch(images)
    by_file = dict(zip(sheet["file"].map(lambda f: Path(str(f)).name), sheet["score"]))
    assert len(names) == 12 + 16 == len(by_file)  # the test naevi and melanomas of adapt
    np.testing.assert_allclose(mine, [by_file[n] for n in names], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("killed_at", adapt_mod.STEPS)
def test_a_killed_run_continues_from_the_last_finished_step(parent, adapted, tmp_path,
                                                            monkeypatch, killed_at):
    dest = tmp_path / "again"
    calls: list[str] = []
    originals = {name: getattr(adapt_mod, f"_step_{name}") for name in adapt_mod.STEPS}

    def spy(name):
        def step(*args, **kwargs):
            calls.append(name)
            if name == killed_at and calls.count(name) == 1:
                raise KeyboardInterrupt  # a kill in the middle of the step
            return originals[name](*args, **kwargs)
        return step

    for name in adapt_mod.STEPS:
        monkeypatch.setattr(adapt_mod, f"_step_{name}", spy(name))
    with pytest.raises(KeyboardInterrupt):
        adapt(options(parent, dest), echo=quiet)
    assert not dest.exists()  # never half-written
    adapt(options(parent, dest), echo=quiet)
    k = adapt_mod.STEPS.index(killed_at)
    assert calls == list(adapt_mod.STEPS[:k + 1]) + list(adapt_mod.STEPS[k:])
    first = json.loads((adapted["dest"] / "detector.json").read_text())
    again = json.loads((dest / "detector.json").read_text())
    assert again["method"] == first["method"] and again["threshold"] == first["threshold"]


@pytest.mark.slow
def test_training_steps_warm_start_and_continue_after_a_kill(parent, tmp_path, monkeypatch):
    """--kimg/--encoder-kimg: the GAN resumes from the parent network, the encoder starts from
    the parent's weights; a kill inside encoder training resumes from its last checkpoint."""
    import anomaly.model.fit as fit_mod

    dest = tmp_path / "trained"
    opts = options(parent, dest, kimg=0.004, encoder_kimg=0.048, read_test=False)
    real_step = fit_mod._step
    seen = {"n": 0}

    def dying_step(run, x):
        seen["n"] += 1
        if seen["n"] == 2:  # after the first checkpoint (snap: a sixth of 3 iterations = 1)
            raise KeyboardInterrupt
        return real_step(run, x)

    monkeypatch.setattr(fit_mod, "_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        adapt(opts, echo=quiet)
    work = dest.with_name("trained.adapt-work")
    assert (work / "encoder" / "encoder-000001.safetensors").is_file()
    options_json = json.loads((work / "encoder" / "encoder_options.json").read_text())
    init = work / "encoder" / options_json["options"]["init"]  # relative to the encoder's folder
    assert init.resolve() == (parent["folder"] / "encoder.safetensors").resolve()
    adapt(opts, echo=quiet)
    record = json.loads((dest / "adapt.json").read_text())
    assert record["steps"]["gan"]["trained"] and record["steps"]["encoder"]["trained"]
    assert not record["steps"]["test"]["read"]
    resumed = json.loads((dest / "encoder_options.json").read_text())
    assert resumed["start_iter"] == 1  # continued, not started again
    AnoModel.open(dest, device="cpu")


def test_refusals_are_one_sentence(parent, adapted, tmp_path):
    with pytest.raises(UserError, match="already exists"):
        adapt(options(parent, adapted["dest"]), echo=quiet)
    with pytest.raises(UserError, match="give --encoder-kimg too"):
        adapt(options(parent, tmp_path / "a", kimg=1.0), echo=quiet)
    with pytest.raises(UserError, match="either as --source .* or as --prepared"):
        adapt(options(parent, tmp_path / "b", prepared=str(tmp_path)), echo=quiet)
    # Every nevus in test: no normals in train (a CSV split column).
    labels = tmp_path / "labels.csv"
    files = sorted(p.stem for p in parent["source"].rglob("*.png"))
    pd.DataFrame({"image": files, "dx": ["nevus" if f.startswith("nv") else "melanoma"
                                         for f in files],
                  "split": ["test" if f.startswith("nv") else "val" for f in files]}
                 ).to_csv(labels, index=False)
    with pytest.raises(UserError, match="no normal images in its train split"):
        adapt(options(parent, tmp_path / "c", labels=str(labels), id_column="image",
                      label_column="dx", split_column="split"), echo=quiet)
    # The work folder of that run holds other options than a new one.
    with pytest.raises(UserError, match="unfinished adapt run with other options"):
        adapt(options(parent, tmp_path / "c"), echo=quiet)


def test_prepared_with_another_policy_is_refused(parent, tmp_path):
    data = tmp_path / "other"
    r = CliRunner().invoke(main, ["prepare", "--source", str(parent["source"]), "--normal",
                                  "nevus", "--dest", str(data), "--resolution", "16",
                                  "--colour", "shades-of-gray", "--workers", "1"])
    assert r.exit_code == 0, r.output
    with pytest.raises(UserError, match="not prepared with the parent model's policy"):
        adapt(options(parent, tmp_path / "d", source=None, prepared=str(data)), echo=quiet)


def _manifest(folder: Path, n_normal: int, n_anomaly: int, routes: list[str] | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"file": f"n{i}.png", "class": "nevus", "label": "0", "split": "val", "group": "",
             "route": (routes or ["a"])[i % len(routes or ["a"])]} for i in range(n_normal)]
    rows += [{"file": f"m{i}.png", "class": "melanoma", "label": "1", "split": "val",
              "group": "", "route": "a"} for i in range(n_anomaly)]
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder


def test_small_validation_splits_get_simpler_rules(parent, tmp_path):
    opts = options(parent, tmp_path / "x", anomaly_class="melanoma", select="worst:route")
    rule, notes = tuning_rule(opts, _manifest(tmp_path / "tiny", 40, 8))
    assert rule == {"grid": "residual:p99", "select": "auc", "tta": "off", "combine": 0}
    assert "parent's configuration" in notes[0]
    rule, notes = tuning_rule(opts, _manifest(tmp_path / "few", 30, 20, ["a", "b"]))  # 15 + 15
    assert (rule["tta"], rule["combine"], rule["select"]) == ("off", 0, "auc")
    assert len(notes) == 2 and "fewer than two values of route" in notes[1]
    rule, notes = tuning_rule(opts, _manifest(tmp_path / "many", 60, 40, ["a", "b"]))
    assert (rule["tta"], rule["combine"], rule["select"], notes) == ("both", 3, "worst:route",
                                                                     [])


def test_help_names_every_step():
    """The CLI help names every step (a reader finds the workflow in --help)."""
    r = CliRunner().invoke(main, ["adapt", "--help"])
    assert r.exit_code == 0
    for word in ("prepare", "fine-tune", "validation", "--no-test", "--minutes"):
        assert word in r.output
