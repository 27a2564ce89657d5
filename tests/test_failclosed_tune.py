"""`tune` writes its output as one unit and detector.json pins its bank (issue 19, item 4): a run
killed at any step leaves the older output folder as it was, and a bank from another run
beside detector.json is refused in one sentence instead of changing the scores."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_detector import run, setup  # noqa: F401 (the tiny model and prepared data)

from anomaly.methods import detector as det
from anomaly.model.ano_model import AnoModel
from stylegan import fileio
from stylegan.errors import UserError


def tune(setup, out, grid, dims=8):  # noqa: F811
    return run("tune", "--network", setup["network"], "--encoder", setup["encoder"],
               "--data", setup["prepared"] / "val.zip", "--outdir", out, "--grid", grid,
               "--tta", "off", "--bootstrap", 0, "--dims", dims, "--batch", 16,
               "--device", "cpu", "--combine", 0)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


def _kill(*_args, **_kwargs):
    raise Killed()


@pytest.fixture(scope="module")
def first(setup):  # noqa: F811
    out = setup["root"] / "unit"
    r = tune(setup, out, "knn-latent:1")
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("step", ["bank", "detector", "tune.json", "swap"])
def test_a_kill_at_any_step_leaves_the_older_output(setup, first, monkeypatch, step):  # noqa: F811
    before = snapshot(first)
    assert set(before) == {"tune.xlsx", "tune.json", "detector.json", "bank.safetensors"}
    target = {"bank": (det.Bank, "save"), "detector": (det.Detector, "save"),
              "tune.json": ("anomaly.scoring.tune.atomic_write_json", None),
              "swap": ("stylegan.fileio.replace_folder", None)}[step]
    if target[1] is None:
        monkeypatch.setattr(target[0], _kill)
    else:
        monkeypatch.setattr(*target, _kill)
    with pytest.raises(Killed):
        tune(setup, first, "knn-latent:3,maha-latent")
    assert snapshot(first) == before  # no file of the killed run beside the older ones
    leftovers = [p.name for p in first.parent.iterdir() if p.name.startswith(".unit.")]
    assert leftovers == []


def test_a_kill_between_the_two_renames_is_undone_by_the_next_run(first, tmp_path,
                                                                   monkeypatch):
    out = tmp_path / "unit"
    shutil.copytree(first, out)
    before = snapshot(out)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) >= 2:  # killed once the older output is aside: nothing runs after
            raise Killed()
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(Killed):
        fileio.replace_folder(tmp_path / "new", out)
    monkeypatch.undo()
    assert not out.exists()  # never a mixed folder: the older output waits aside, whole
    with fileio.output_folder(out, owned=before) as unit:
        assert snapshot(out) == before  # the next run put it back before starting
        (unit / "tune.json").write_text("{}")
    assert snapshot(out) == {"tune.json": b"{}"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unit"]


def test_an_output_folder_with_other_files_is_refused(setup, tmp_path):  # noqa: F811
    (tmp_path / "network.safetensors").write_bytes(b"weights")
    r = tune(setup, tmp_path, "knn-latent:1")
    assert r.exit_code == 1 and "holds files this command does not write (network" \
        in r.output and r.output.count("\n") == 1
    assert (tmp_path / "network.safetensors").read_bytes() == b"weights"


def test_a_bank_from_another_run_is_refused(setup, tmp_path):  # noqa: F811
    model = AnoModel.load(setup["network"], setup["encoder"], device="cpu")
    a, b = tmp_path / "a", tmp_path / "b"
    for out, dims in ((a, 8), (b, 4)):
        r = tune(setup, out, "knn-latent:1", dims=dims)
        assert r.exit_code == 0, r.output
    scorer = det.load_detector(model, a / "detector.json")
    assert len(scorer.detector.bank_sha256) == 64
    (a / "bank.safetensors").write_bytes((b / "bank.safetensors").read_bytes())
    with pytest.raises(UserError) as refused:
        det.load_detector(model, a / "detector.json")
    text = str(refused.value)
    assert "was tuned with another bank than the bank.safetensors beside it" in text
    assert text.count(". ") == 0 and "\n" not in text


def test_a_bank_without_the_space_a_detector_needs_is_refused(setup, tmp_path):  # noqa: F811
    """An older detector.json (no bank_sha256) beside a bank of another configuration: one
    sentence, not KeyError ('latent', 'plain')."""
    import json

    model = AnoModel.load(setup["network"], setup["encoder"], device="cpu")
    a, b = tmp_path / "a", tmp_path / "b"
    assert tune(setup, a, "knn-latent:1").exit_code == 0
    assert tune(setup, b, "knn-dfeat:b8:1").exit_code == 0
    body = json.loads((a / "detector.json").read_text())
    del body["bank_sha256"]
    (a / "detector.json").write_text(json.dumps(body))
    (a / "bank.safetensors").write_bytes((b / "bank.safetensors").read_bytes())
    with pytest.raises(UserError, match=r"its bank bank\.safetensors holds no latent \(plain\) "
                                        r"for knn-latent:1; copy the bank"):
        det.load_detector(model, a / "detector.json")
