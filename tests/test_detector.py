"""The tuned detector: each new score against an independent reference and on a planted anomaly,
TTA invariance, `anostyle tune` (never reads test), detector.json round trip, `score --detector`
and `--model`, the policy check and the one-image judgement serve uses."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from sklearn.neighbors import NearestNeighbors

from anodata.prepare import PrepareOptions, prepare_dataset
from anomaly.methods import detector as det
from anomaly.methods import detector_scores as ds
from anomaly.methods import registry
from anomaly.cli import main
from anomaly.model.encoder_io import save_encoder
from anomaly.model.ano_model import AnoModel
from anomaly.evaluation.sheets import read_score_sheet
from encoder_helpers import one_thread  # noqa: F401 (autouse fixture)
from encoder_helpers import (random_head_encoder, sample_images, save_tiny_networks, tiny_networks,
                             write_folder)
from stylegan.dataset import ImageDataset
from stylegan.errors import UserError

NEW_METHODS = ["residual:mean", "residual:p99", "residual:smax:1", "izif:0.5", "dfeat-res:b8+b16",
               "knn-latent:3", "maha-latent", "knn-dfeat:b8:3", "maha-dfeat:b16",
               "izif-areafree:0.5"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------------------ pure functions


def test_residual_aggregations_match_numpy_and_scipy():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 16, 16)).astype(np.float32)
    t = torch.from_numpy(maps)
    assert np.allclose(ds.aggregate_residual(t, "mean"), maps.reshape(3, -1).mean(1), atol=1e-6)
    assert np.allclose(ds.aggregate_residual(t, "p99"),
                       np.percentile(maps.reshape(3, -1), 99, axis=1), atol=1e-6)
    for sigma in (1.0, 2.0):  # scipy 'mirror' = torch 'reflect'; truncate 3 = radius ceil(3 sigma)
        want = np.stack([gaussian_filter(m.astype(np.float64), sigma, mode="mirror", truncate=3.0)
                         for m in maps])
        assert np.allclose(ds.gaussian_smooth(t, sigma), want, atol=1e-5)
        assert np.allclose(ds.aggregate_residual(t, "smax", sigma),
                           want.reshape(3, -1).max(1), atol=1e-5)
    x, r = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    assert torch.allclose(ds.residual_map(x, r), ((x - r) ** 2).mean(1))


def test_smoothed_max_finds_a_small_planted_lesion_that_the_mean_misses():
    """Normals: diffuse residual 0.1 everywhere; the anomaly: a 3x3 patch of residual 1 on a
    quiet background (smaller mean residual than any normal)."""
    rng = np.random.default_rng(1)
    normals = 0.1 + 0.02 * rng.random((20, 32, 32))
    planted = 0.01 * rng.random((1, 32, 32))
    planted[0, 10:13, 20:23] = 1.0
    maps = torch.from_numpy(np.concatenate([normals, planted])).float()
    smax = ds.aggregate_residual(maps, "smax", 1.0).numpy()
    mean = ds.aggregate_residual(maps, "mean").numpy()
    assert smax.argmax() == 20 and (smax[20] > smax[:20]).all()
    assert mean[20] < mean[:20].min()  # the mean would rank it last


def _zone_reference(mask: np.ndarray, w: int) -> np.ndarray:
    """Border zone by brute force: some lesion pixel in the (2w + 1)^2 window within the image,
    and not all of them."""
    h, wd = mask.shape
    out = np.zeros_like(mask)
    for i in range(h):
        for j in range(wd):
            window = mask[max(0, i - w):i + w + 1, max(0, j - w):j + w + 1]
            out[i, j] = window.any() and not window.all()
    return out


def test_lesion_scores_against_numpy_references():
    maps = np.arange(16, dtype=np.float64).reshape(1, 4, 4)
    mask = np.zeros((1, 4, 4), bool)
    mask[0, :2, :2] = True  # residuals 0, 1, 4, 5 inside; the other 12 sum to 110
    t, m = torch.from_numpy(maps), torch.from_numpy(mask)
    assert ds.lesion_residual(t, m, "mean").item() == pytest.approx(2.5)
    assert ds.lesion_residual(t, m, "ratio").item() == pytest.approx(2.5 / (110 / 12))
    # 4 px: w = 1; the zone is the 3 x 3 top-left block (the corner pixel 0 is inside the
    # erosion: its window within the image is all lesion) -> 1, 2, 4, 5, 6, 8, 9, 10
    assert ds.lesion_residual(t, m, "edge").item() == pytest.approx(45 / 8)
    rng = np.random.default_rng(0)
    maps = rng.random((3, 64, 64))
    masks = np.zeros((3, 64, 64), bool)
    masks[0, 20:40, 10:35] = True
    masks[0, 38:50, 30:45] = True
    masks[1, 50:, 40:] = True  # a lesion cut by two edges
    masks[1, 5:9, 5:9] = True  # and a small second one
    t, m = torch.from_numpy(maps), torch.from_numpy(masks)
    for i in range(2):
        r, k = maps[i], masks[i]
        zone = _zone_reference(k, 3)  # 64 px: w = 3
        assert np.array_equal(ds.border_zone(m[i:i + 1], 3)[0].numpy(), zone)
        assert ds.lesion_residual(t, m, "mean")[i].item() == pytest.approx(r[k].mean())
        assert ds.lesion_residual(t, m, "edge")[i].item() == pytest.approx(r[zone].mean())
        assert ds.lesion_residual(t, m, "ratio")[i].item() == pytest.approx(
            r[k].mean() / r[~k].mean())
    # no lesion found: the whole image
    assert ds.lesion_residual(t, m, "mean")[2].item() == pytest.approx(maps[2].mean())
    assert ds.lesion_residual(t, m, "edge")[2].item() == pytest.approx(maps[2].mean())
    assert ds.lesion_residual(t, m, "ratio")[2].item() == 1.0
    full = torch.ones(1, 64, 64, dtype=torch.bool)
    assert ds.lesion_residual(t[:1], full, "ratio").item() == 1.0
    assert ds.lesion_residual(t[:1], full, "edge").item() == pytest.approx(maps[0].mean())


def test_knn_and_mahalanobis_against_references_and_a_planted_outlier():
    rng = np.random.default_rng(2)
    train = torch.from_numpy(rng.normal(size=(200, 6)) * [1, 2, 3, 1, 1, 5] + 3).float()
    space = ds.fit_space(train, dims=6, bank_size=150, seed=0)
    assert space.bank.shape == (150, 6)
    queries = torch.from_numpy(np.r_[rng.normal(size=(5, 6)) * [1, 2, 3, 1, 1, 5] + 3,
                                     [[3, 3, 3, 3, 12, 3]]]).float()  # last: 9 s.d. off on axis 5
    proj = space.project(queries)
    # k-NN: scikit-learn on the same projected points
    nn = NearestNeighbors(n_neighbors=4).fit(space.bank.numpy().astype(np.float64))
    want = nn.kneighbors(proj.numpy().astype(np.float64))[0].mean(axis=1)
    assert np.allclose(ds.knn_distance(proj, space.bank, 4).numpy(), want, atol=1e-5)
    # Mahalanobis with all axes: scipy with the inverse covariance of the standardised train set
    z = ((train - space.mean) / space.sd).double().numpy()
    inv = np.linalg.inv(np.cov(z, rowvar=False))
    zq = ((queries - space.mean) / space.sd).double().numpy()
    want = [scipy_mahalanobis(q, z.mean(0), inv) for q in zq]
    assert np.allclose(ds.mahalanobis(proj - (torch.from_numpy(z.mean(0)).float()
                                              @ space.components.T), space.eigenvalues),
                       want, rtol=1e-4)
    for scores in (ds.knn_distance(proj, space.bank, 4), ds.mahalanobis(proj, space.eigenvalues)):
        assert scores.argmax() == 5


def test_normalised_feature_residual_by_hand():
    res = [torch.tensor([[1.0, 4.0], [0.0, 0.0]]), torch.tensor([[9.0], [1.0]])]
    sd = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    # image 0: (1/1 + 4/4)/2 + 9/9 = 2; image 1: 0 + 1/9
    assert np.allclose(ds.normalised_feature_residual(res, sd), [2.0, 1 / 9])
    f, fr = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.allclose(ds.channel_residual(f, fr), ((f - fr) ** 2).mean((2, 3)))


def test_percentiles_and_rank_average():
    ref = np.array([1.0, 2.0, 3.0, 4.0])  # positions 12.5, 37.5, 62.5, 87.5
    assert np.allclose(ds.percentile_among([1.0, 2.5, 4.0, 0.0, 9.0], ref),
                       [12.5, 50.0, 87.5, 0.0, 100.0])
    assert np.allclose(ds.percentile_among([2.0], [1.0, 2.0, 2.0, 3.0]), [50.0])  # tie: mean
    assert np.allclose(ds.rank_average([np.array([2.5]), np.array([10.0])],
                                       [ref, np.array([0.0, 20.0])]), [(50.0 + 50.0) / 2])
    assert ds.weak_percentile(2.0, ref) == 50.0


def test_dihedral_views_are_the_eight_symmetries():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    views = ds.dihedral_views(x).reshape(8, 2, 3, 5, 5)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert torch.equal(views[0], x)
    moved = ds.dihedral_views(torch.rot90(x, 1, (2, 3)).flip(3)).reshape(8, 2, 3, 5, 5)
    key = {tuple(v.flatten().tolist()) for v in views}
    assert {tuple(v.flatten().tolist()) for v in moved} == key  # the same set of images


def test_method_names_parse_and_refuse():
    m = registry.parse("residual:smax:1.5")
    assert (m.family, m.agg, m.sigma) == ("residual", "smax", 1.5)
    assert registry.parse("knn-dfeat:b16:7").space == "dfeat:b16"
    assert registry.parse("dfeat-res:b8+b16+b32").layers == ("b8", "b16", "b32")
    assert registry.parse("izif:0.1").kappa == 0.1
    assert registry.parse("izif").system == "classic"
    assert registry.parse("maha-latent").system == "detector"
    m = registry.parse("lesion:edge")
    assert (m.family, m.agg, m.needs_rec) == ("lesion", "lesion-edge", True)
    assert registry.parse("lesion:ratio").system == "detector"
    for bad in ("residual:p50", "knn-latent:0", "knn-dfeat:b8", "dfeat-res:", "residual:smax:0",
                "lesion:max", "lesion"):
        with pytest.raises(UserError):
            registry.parse(bad)
    assert det.split_config_name("knn-latent:5@tta") == ("knn-latent:5", True)
    m = registry.parse("izif-areafree:0.5:b16")
    assert (m.family, m.kappa, m.layers, m.area_free, m.needs_bank) == (
        "izif-areafree", 0.5, ("b16",), True, True)
    assert not registry.parse("izif:1").needs_bank
    for bad in ("izif-areafree", "izif-areafree:1:b3", "izif-areafree:1e9"):
        with pytest.raises(UserError):
            registry.parse(bad)


def test_area_trend_and_area_free_scores_against_numpy():
    """The slope is cov(log a, log s) / var(log a) over the naevi with a lesion (closed form,
    not polyfit); an image without a lesion takes their median log area; a score of 0 is
    floored; a score that is exactly a power of the area becomes one constant."""
    rng = np.random.default_rng(0)
    areas = rng.uniform(0.05, 0.6, 50)
    areas[:4] = 0.0  # no lesion found: not in the fit
    scores = np.exp(rng.normal(0, 0.3, 50)) * np.where(areas > 0, areas, 1.0) ** 0.7
    trend = ds.fit_area_trend(scores, areas)
    la, ls = np.log(areas[4:]), np.log(scores[4:])
    slope = ((la - la.mean()) * (ls - ls.mean())).sum() / ((la - la.mean()) ** 2).sum()
    assert trend.slope == pytest.approx(slope) and trend.median_log_area == pytest.approx(
        np.median(la))
    got = ds.area_free(scores, areas, trend)
    assert np.allclose(got[4:], ls - slope * la)
    assert np.allclose(got[:4], np.log(scores[:4]) - slope * np.median(la))
    exact = ds.fit_area_trend(areas[4:] ** 0.7 * 3.0, areas[4:])
    assert exact.slope == pytest.approx(0.7)
    assert np.allclose(ds.area_free(areas[4:] ** 0.7 * 3.0, areas[4:], exact), np.log(3.0))
    assert ds.area_free(np.array([0.0]), np.array([0.5]), exact)[0] == pytest.approx(
        np.log(ds.AREA_SCORE_FLOOR) - 0.7 * np.log(0.5))
    assert np.isnan(ds.area_free(np.array([np.nan]), np.array([0.5]), exact)[0])
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2] = True
    assert ds.lesion_area(masks).tolist() == [0.5, 0.0]
    with pytest.raises(UserError, match="training naevi"):
        ds.fit_area_trend(np.ones(5), np.array([0.2, 0.2, 0.2, 0.0, 0.0]))


# ------------------------------------------------------------------------------ tiny model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny G/D/E; 40 G samples as naevi ('nv', a 'route' column for subgroups) and 16 noise
    images as 'mel', prepared at 16 px; test.zip is replaced by a folder, so reading it fails."""
    root = tmp_path_factory.mktemp("detector")
    G, D = tiny_networks()
    E = random_head_encoder(G)
    network = save_tiny_networks(root / "net.safetensors", G, D)
    encoder = root / "encoder-000010.safetensors"
    policy = {"resolution": 16, "channels": 3, "transform": "center-crop",
              "resize_filter": "box", "colour": "none", "colour_p": 6.0}
    save_encoder(encoder, E, extra={"training_options": {"kappa": 0.5, "feature_layer": "b8"},
                                    "preprocessing": policy})
    source = root / "source"
    write_folder(source / "nv", sample_images(G, 60, seed=1), prefix="nv")
    noise = np.random.RandomState(2).randint(0, 256, (16, 16, 16, 3)).astype(np.uint8)
    write_folder(source / "mel", noise, prefix="mel")
    prepared = root / "prepared"
    prepare_dataset(PrepareOptions(source=str(source), dest=str(prepared), normal=("nv",),
                                   resolution=16, workers=1, val=0.3, test=0.2))
    _add_route_column(prepared / "manifest.csv")
    (prepared / "test.zip").rename(prepared / "held-out.zip")
    (prepared / "test.zip").mkdir()  # reading "test.zip" as a zip now fails
    return {"root": root, "network": str(network), "encoder": str(encoder),
            "prepared": prepared, "G": G, "D": D, "E": E}


def _add_route_column(path: Path) -> None:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for i, r in enumerate(rows):
        r["route"] = ("a" if i % 2 else "b") if r["class"] == "nv" else ""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def model(setup):
    return AnoModel.load(setup["network"], setup["encoder"], device="cpu")


@pytest.fixture(scope="module")
def bank(setup, model):
    needs = det.needs_of(NEW_METHODS, model)
    return det.bank_from_zip(model, setup["prepared"] / "train.zip", needs,
                             modes=("plain", "tta"), dims=8, batch=16)


def test_new_scores_agree_with_izif_and_rank_planted_anomalies(setup, model, bank):
    data = ImageDataset(setup["prepared"] / "val.zip")
    images = torch.from_numpy(np.stack([data[i][0] for i in range(len(data))]))
    labels = np.asarray(data.labels) != 0
    scorer = det.Scorer(model, [(m, False) for m in NEW_METHODS] + [("izif", False)], bank=bank)
    scores = scorer.score_batch(images)
    classic = model.score(images, ["izif"])["izif"]
    assert np.allclose(scores["izif"], classic, rtol=1e-5)
    assert np.allclose(scores["izif:0.5"], classic, rtol=1e-5)  # the encoder's kappa/layer: 0.5 b8
    x = torch.from_numpy(images.numpy().astype(np.float32) / 127.5 - 1)
    with torch.no_grad():
        _ws, rec = model.reconstruct(x)
    assert np.allclose(scores["residual:mean"], ((x - rec) ** 2).flatten(1).mean(1), rtol=1e-5)
    # planted anomalies (noise images as "mel") against G's samples as naevi: with random
    # networks the pixel residual and the D-feature densities separate them
    from sklearn.metrics import roc_auc_score

    for method in ("residual:mean", "residual:p99", "izif:0.5", "knn-dfeat:b8:3",
                   "maha-dfeat:b16"):
        assert roc_auc_score(labels, scores[method]) > 0.9, method


def test_lesion_scores_of_the_tiny_model_match_a_hand_computation(setup, model):
    """lesion:* from one pass equal the masked means of the squared residual of x and
    G(E(x)) under lesion_mask of each input, and are invariant to rotations with TTA."""
    from anodata.lesion import lesion_mask

    data = ImageDataset(setup["prepared"] / "val.zip")
    images = torch.from_numpy(np.stack([data[i][0] for i in range(len(data))]))
    methods = ["lesion:mean", "lesion:edge", "lesion:ratio"]
    scores = det.Scorer(model, [(m, False) for m in methods]).score_batch(images)
    x = torch.from_numpy(images.numpy().astype(np.float32) / 127.5 - 1)
    with torch.no_grad():
        _ws, rec = model.reconstruct(x)
    r = ((x - rec) ** 2).mean(1).numpy().astype(np.float64)  # [N, H, W]
    masks = [lesion_mask(a.transpose(1, 2, 0)) for a in images.numpy()]
    assert any(k.any() for k in masks)  # some inputs have a lesion, the test sees both paths
    for i, k in enumerate(masks):
        k = k if k.any() else np.ones_like(k)
        assert scores["lesion:mean"][i] == pytest.approx(r[i][k].mean(), rel=1e-5)
        want = 1.0 if k.all() else r[i][k].mean() / r[i][~k].mean()
        assert scores["lesion:ratio"][i] == pytest.approx(want, rel=1e-5)
    tta = det.Scorer(model, [(m, True) for m in methods])
    base = tta.score_batch(images[:6])
    moved = tta.score_batch(ds.dihedral_view(images[:6], 1))
    for name in base:
        assert np.allclose(moved[name], base[name], rtol=1e-4), name


def test_area_free_scores_of_the_tiny_model_match_a_hand_computation(setup, model):
    """izif-areafree from one pass and a bank equals log izif:0.5 minus the bank's slope times
    the log lesion area of each input (anodata.lesion.lesion_mask), with the slope refitted
    here from the training images' own izif:0.5 and areas; TTA keeps it rotation-invariant; the
    bank keeps the trend through save, load and subset."""
    from anodata.lesion import lesion_mask

    method = "izif-areafree:0.5"
    bank = det.bank_from_zip(model, setup["prepared"] / "train.zip",
                             det.needs_of([method], model), modes=("plain", "tta"), batch=16)
    train = ImageDataset(setup["prepared"] / "train.zip")
    train_images = torch.from_numpy(np.stack([train[i][0] for i in range(len(train))]))

    def izif_and_area(images):
        base = det.Scorer(model, [("izif:0.5", False)]).score_batch(images)["izif:0.5"]
        area = np.array([lesion_mask(a.transpose(1, 2, 0)).mean() for a in images.numpy()])
        return base, area

    base, area = izif_and_area(train_images)
    found = area > 0
    assert found.sum() >= 3  # enough lesions for a trend
    la, ls = np.log(area[found]), np.log(base[found])
    slope = ((la - la.mean()) * (ls - ls.mean())).sum() / ((la - la.mean()) ** 2).sum()
    assert bank.trends[(method, "plain")].slope == pytest.approx(slope, rel=1e-6)
    data = ImageDataset(setup["prepared"] / "val.zip")
    images = torch.from_numpy(np.stack([data[i][0] for i in range(len(data))]))
    got = det.Scorer(model, [(method, False)], bank=bank).score_batch(images)[method]
    vbase, varea = izif_and_area(images)
    median = np.median(la)
    want = np.log(vbase) - slope * np.where(varea > 0, np.log(np.where(varea > 0, varea, 1)),
                                            median)
    assert np.allclose(got, want, rtol=1e-6)
    tta = det.Scorer(model, [(method, True)], bank=bank)
    assert np.allclose(tta.score_batch(ds.dihedral_view(images[:6], 3))[method + "@tta"],
                       tta.score_batch(images[:6])[method + "@tta"], rtol=1e-4)
    path = det.Bank(trends=dict(bank.trends)).save(setup["root"] / "trend-bank.safetensors")
    loaded = det.Bank.load(path).subset([(method, True)])
    assert loaded.trends == {(method, "tta"): bank.trends[(method, "tta")]}
    with pytest.raises(UserError, match="no area trend"):
        det.Scorer(model, [(method, False)], bank=det.Bank()).score_batch(images[:2])
    flat = torch.full((4, 3, 16, 16), 170, dtype=torch.uint8)  # no lesion in any of them
    with pytest.warns(UserWarning, match="without a size trend"):
        empty = det.build_bank(model, [flat], det.needs_of([method], model), modes=("plain",))
    assert empty.trends[(method, "plain")] == ds.AreaTrend(0.0, 0.0)


def test_a_training_naevus_is_its_own_nearest_bank_point(setup, model, bank):
    """The bank holds every training image here (fewer than bank_size): with k = 1 a training
    image's k-NN distance is ~0 in every learned space, a noise image's is not."""
    train = ImageDataset(setup["prepared"] / "train.zip")
    images = torch.from_numpy(np.stack([train[i][0] for i in range(5)]))
    noise = torch.from_numpy(np.random.RandomState(9).randint(0, 256, (5, 3, 16, 16))
                             .astype(np.uint8))
    configs = [("knn-latent:1", t) for t in (False, True)] + [("knn-dfeat:b8:1", t)
                                                            for t in (False, True)]
    scorer = det.Scorer(model, configs, bank=bank)
    own, far = scorer.score_batch(images), scorer.score_batch(noise)
    for name in own:
        assert own[name].max() < 1e-3 * far[name].min(), name


def test_dfeat_res_normalisation_finds_a_planted_residual_on_a_quiet_channel():
    """Channel 0 varies a lot on training naevi (sd 10), channel 1 hardly (sd 0.1). Normals
    reconstruct with residual proportional to the spread; the anomaly has a small absolute
    residual on channel 1, which only the normalised score flags."""
    rng = np.random.default_rng(3)
    normals = torch.from_numpy(np.c_[rng.uniform(50, 100, 20), rng.uniform(0.005, 0.01, 20)])
    planted = torch.tensor([[10.0, 1.0]], dtype=torch.float64)
    res = torch.cat([normals, planted]).float()  # [21, 2] channel residuals
    score = ds.normalised_feature_residual([res], [torch.tensor([10.0, 0.1])]).numpy()
    assert score.argmax() == 20
    assert res.mean(dim=1).argmin() == 20  # the plain mean ranks it last


def test_tta_scores_are_invariant_to_rotations_and_flips(setup, model, bank):
    data = ImageDataset(setup["prepared"] / "val.zip")
    images = torch.from_numpy(np.stack([data[i][0] for i in range(6)]))
    scorer = det.Scorer(model, [(m, True) for m in NEW_METHODS + ["izif", "latent"]], bank=bank)
    base = scorer.score_batch(images)
    for view in (1, 3, 4, 6):
        moved = scorer.score_batch(ds.dihedral_view(images, view))
        for name, value in base.items():
            assert np.allclose(moved[name], value, rtol=1e-4, atol=1e-6), (name, view)
    plain = det.Scorer(model, [("residual:mean", False)]).score_batch(images)["residual:mean"]
    moved = det.Scorer(model, [("residual:mean", False)]).score_batch(
        ds.dihedral_view(images, 1))["residual:mean"]
    assert not np.allclose(plain, moved)  # without TTA the score does depend on orientation


@pytest.fixture(scope="module")
def tuned(setup):
    """`anostyle tune` with the files it opens recorded by an audit hook."""
    opened: list[str] = []
    recording = {"on": True}

    def hook(event, args):
        if recording["on"] and event == "open" and args and isinstance(args[0], (str, Path)):
            opened.append(str(args[0]))

    sys.addaudithook(hook)
    out = setup["root"] / "tuned"
    grid = ",".join(NEW_METHODS + ["izif"])
    r = run("tune", "--network", setup["network"], "--encoder", setup["encoder"],
            "--data", setup["prepared"] / "val.zip", "--outdir", out, "--grid", grid,
            "--by", "route", "--bootstrap", 50, "--dims", 8, "--batch", 16,
            "--device", "cpu", "--combine", 3)
    recording["on"] = False
    assert r.exit_code == 0, r.output
    return {"out": out, "opened": opened, "output": r.output}


def test_tune_never_reads_test(setup, tuned):
    assert any(p.endswith("val.zip") for p in tuned["opened"])
    assert any(p.endswith("train.zip") for p in tuned["opened"])
    assert not [p for p in tuned["opened"] if "test.zip" in p or "held-out" in p]
    r = run("tune", "--network", setup["network"], "--encoder", setup["encoder"],
            "--data", setup["prepared"] / "held-out-test.zip", "--outdir", setup["root"] / "x")
    assert r.exit_code != 0 and "validation data only" in r.output


def test_tune_table_and_detector_json(setup, tuned):
    import pandas as pd

    table = pd.read_excel(tuned["out"] / "tune.xlsx")
    from anomaly.scoring.tune import combination_pairs

    singles = table[table["method"] != "rank-average"]
    assert len(singles) == 2 * (len(NEW_METHODS) + 1)  # x {plain, TTA}
    top3 = singles.sort_values("select", ascending=False, kind="stable")["configuration"][:3]
    pairs = combination_pairs(list(top3), set(singles["configuration"]))
    assert len(pairs) >= 3 and len(table) == len(singles) + len(pairs)
    assert {"configuration", "auc", "auc_low", "auc_high", "select", "n_normal", "n_anomaly",
            "auc[route=a]", "auc[route=b]"} <= set(table.columns)
    assert (table["select"] == table["auc"]).all()
    assert table["select"].is_monotonic_decreasing
    body = json.loads((tuned["out"] / "detector.json").read_text())
    assert body["format"] == "anostyle-detector" and body["version"] == 1
    assert table["chosen"].sum() == 1
    chosen = table[table["chosen"]].iloc[0]
    assert body["method"] == chosen["configuration"]
    assert chosen["select"] >= table["select"].max() - 0.01  # the default --tolerance
    within = table[table["select"] >= table["select"].max() - 0.01]
    assert chosen["passes"] == within["passes"].min()
    assert body["selection"] == {"rule": "auc", "value": pytest.approx(chosen["select"]),
                                 "tolerance": 0.01,
                                 "best_value": pytest.approx(table.loc[0, "select"])}
    assert body["val_normal_scores"] == sorted(body["val_normal_scores"])
    assert len(body["val_normal_scores"]) == chosen["n_normal"]
    assert body["preprocessing"]["resolution"] == 16
    loaded = det.Detector.load(tuned["out"] / "detector.json")
    assert json.loads(json.dumps(loaded.to_dict())) == body  # round trip
    if body["bank"]:
        assert (tuned["out"] / body["bank"]).stat().st_size <= 1_000_000


def test_worst_subgroup_rule(setup, tuned):
    import pandas as pd

    out = setup["root"] / "tuned-worst"
    r = run("tune", "--network", setup["network"], "--encoder", setup["encoder"],
            "--data", setup["prepared"] / "val.zip", "--outdir", out,
            "--grid", "residual:mean,residual:p99,knn-latent:3", "--tta", "off",
            "--select", "worst:route", "--min-subgroup", 2, "--bootstrap", 0, "--dims", 8,
            "--device", "cpu", "--combine", 0)
    assert r.exit_code == 0, r.output
    table = pd.read_excel(out / "tune.xlsx")
    want = table[["auc[route=a]", "auc[route=b]"]].min(axis=1)
    assert np.allclose(table["select"], want)
    body = json.loads((out / "detector.json").read_text())
    assert body["method"] == table.loc[want.idxmax(), "configuration"]
    r = run("tune", "--network", setup["network"], "--encoder", setup["encoder"],
            "--data", setup["prepared"] / "val.zip", "--outdir", out, "--grid", "residual:mean",
            "--select", "worst:nosuch", "--device", "cpu")
    assert r.exit_code != 0 and "'nosuch' is not in the manifest" in r.output


def test_simplest_configuration_within_tolerance_is_chosen():
    import pandas as pd

    from anomaly.scoring.tune import _with_cost, select_row

    table = _with_cost(pd.DataFrame({
        "configuration": ["residual:mean", "residual:mean@tta", "izif:1",
                          "rank-average(residual:mean + izif:1)"],
        "components": [None, None, None, "residual:mean + izif:1"],
        "select": [0.700, 0.720, 0.705, 0.730]}))
    assert table["passes"].tolist() == [1, 8, 1, 1]
    assert table["n_components"].tolist() == [1, 1, 1, 2]
    pick = lambda tol: select_row(table, tol)["configuration"]  # noqa: E731
    assert pick(0.0) == "rank-average(residual:mean + izif:1)"  # the best, whatever it costs
    assert pick(0.01) == "rank-average(residual:mean + izif:1)"  # nothing cheaper is near
    assert pick(0.026) == "izif:1"  # one pass and one score, the better of the two
    assert pick(1.0) == "izif:1"
    tie = table.assign(select=[0.7, 0.7, 0.7, 0.7])
    assert select_row(tie, 0.0)["configuration"] == "residual:mean"  # grid order on ties


def test_combination_pairs_add_their_one_pass_counterparts():
    from anomaly.scoring.tune import combination_pairs

    available = {"a", "a@tta", "b", "b@tta", "c@tta"}
    assert combination_pairs(["a@tta", "b@tta", "a"], available) == [
        ("a@tta", "b@tta"), ("a", "b"), ("a@tta", "a"), ("b@tta", "a")]
    # no counterpart when a component has no plain configuration, or both are one method
    assert combination_pairs(["c@tta", "a@tta"], available) == [("c@tta", "a@tta")]
    assert combination_pairs(["a", "b"], available) == [("a", "b")]


def _model_dir(setup, tuned, name="model") -> Path:
    folder = setup["root"] / name
    folder.mkdir(exist_ok=True)
    shutil.copy(setup["network"], folder / "network.safetensors")
    shutil.copy(setup["encoder"], folder / "encoder.safetensors")
    for f in ("detector.json", "bank.safetensors"):
        if (tuned["out"] / f).exists():
            shutil.copy(tuned["out"] / f, folder / f)
    return folder


def test_score_with_the_detector_reproduces_the_tuned_scores(setup, tuned):
    folder = _model_dir(setup, tuned)
    out = setup["root"] / "scored"
    r = run("score", "--model", folder, "--data", setup["prepared"] / "val.zip",
            "--methods", "izif,residual:p99", "--tta", "--outdir", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    sheet = read_score_sheet(out / "detector.xlsx")
    body = json.loads((folder / "detector.json").read_text())
    normals = np.sort(sheet.loc[sheet["class"] == "nv", "score"].to_numpy())
    assert np.allclose(normals, body["val_normal_scores"], rtol=1e-5, atol=1e-8)
    assert {"izif@tta.xlsx", "residual-p99@tta.xlsx"} <= {p.name for p in out.glob("*.xlsx")}
    info = json.loads((out / "score.json").read_text())
    assert info["detector"]["method"] == body["method"] and info["tta"] is True
    # one image, as serve calls it: the same score, its percentile and decision
    model = AnoModel.open(folder, device="cpu")
    data = ImageDataset(setup["prepared"] / "val.zip")
    row = sheet[sheet["file"] == data.names[0]].iloc[0]
    judged = model.judge(data[0][0])
    assert judged.score == pytest.approx(row["score"], rel=1e-5)
    assert judged.percentile == pytest.approx(ds.weak_percentile(judged.score, normals), abs=1e-9)
    assert judged.decision == ("anomalous" if judged.score >= body["threshold"] else "normal")


def test_model_dir_for_reconstruct_and_tsne(setup, tuned):
    folder = _model_dir(setup, tuned, "model2")
    r = run("reconstruct", "--model", folder, "--source", setup["prepared"] / "val.zip",
            "--outdir", setup["root"] / "rec", "--device", "cpu")
    assert r.exit_code == 0, r.output
    r = run("tsne", "--model", folder, "--data", setup["prepared"] / "val.zip",
            "--outdir", setup["root"] / "tsne", "--perplexity", 5, "--device", "cpu")
    assert r.exit_code == 0, r.output
    r = run("score", "--model", setup["root"] / "nothing", "--data",
            setup["prepared"] / "val.zip", "--outdir", setup["root"] / "y")
    assert r.exit_code != 0 and "is not a folder" in r.output


def test_score_refuses_other_preprocessing_and_missing_bank(setup, tuned):
    other = setup["root"] / "other"
    other.mkdir()
    shutil.copy(setup["prepared"] / "val.zip", other / "val.zip")
    shutil.copy(setup["prepared"] / "manifest.csv", other / "manifest.csv")
    info = json.loads((setup["prepared"] / "prepare.json").read_text())
    info["preprocessing"]["colour"] = "shades-of-gray"
    (other / "prepare.json").write_text(json.dumps(info))
    r = run("score", "--network", setup["network"], "--encoder", setup["encoder"], "--data",
            other / "val.zip", "--methods", "izif", "--outdir", setup["root"] / "z",
            "--device", "cpu")
    assert r.exit_code != 0
    assert "prepared with another preprocessing" in r.output and "colour" in r.output
    assert r.output.count("\n") == 1  # one sentence, no traceback
    r = run("score", "--network", setup["network"], "--encoder", setup["encoder"], "--data",
            setup["prepared"] / "val.zip", "--methods", "knn-latent:3", "--outdir",
            setup["root"] / "z", "--device", "cpu")
    assert r.exit_code != 0 and "--train" in r.output
    r = run("score", "--network", setup["network"], "--encoder", setup["encoder"], "--data",
            setup["prepared"] / "val.zip", "--methods", "izif-areafree:0.5", "--outdir",
            setup["root"] / "z", "--device", "cpu")
    assert r.exit_code != 0 and "--train" in r.output and "area trend" in r.output


def test_score_builds_the_area_trend_from_train(setup, model):
    """`score --methods izif-areafree:0.5 --train train.zip` gives the Scorer's scores with the
    bank built from the same training images."""
    out = setup["root"] / "areafree-scores"
    r = run("score", "--network", setup["network"], "--encoder", setup["encoder"], "--data",
            setup["prepared"] / "val.zip", "--methods", "izif-areafree:0.5", "--train",
            setup["prepared"] / "train.zip", "--outdir", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    sheet = read_score_sheet(out / "izif-areafree-0.5.xlsx")  # ":" is not in file names
    method = "izif-areafree:0.5"
    bank = det.bank_from_zip(model, setup["prepared"] / "train.zip",
                             det.needs_of([method], model), modes=("plain",))
    data = ImageDataset(setup["prepared"] / "val.zip")
    images = torch.from_numpy(np.stack([data[i][0] for i in range(len(data))]))
    want = det.Scorer(model, [(method, False)], bank=bank).score_batch(images)[method]
    assert np.allclose(sheet["score"].to_numpy(), want, rtol=1e-5)


def test_detector_for_other_networks_is_refused(setup, tuned):
    G, D = tiny_networks(seed=5)
    other = save_tiny_networks(setup["root"] / "other-net.safetensors", G, D)
    model = AnoModel.load(other, setup["encoder"], device="cpu")
    with pytest.raises(UserError, match="another network"):
        det.load_detector(model, tuned["out"] / "detector.json")


def test_tune_without_encoder_for_d_feature_densities(setup):
    out = setup["root"] / "tuned-d"
    r = run("tune", "--network", setup["network"], "--data", setup["prepared"] / "val.zip",
            "--outdir", out, "--grid", "knn-dfeat:b8:1,maha-dfeat:b8", "--tta", "off",
            "--bootstrap", 0, "--dims", 8, "--device", "cpu")
    assert r.exit_code == 0, r.output
    body = json.loads((out / "detector.json").read_text())
    assert body["encoder_sha256"] is None and body["bank"] == "bank.safetensors"
    r = run("tune", "--network", setup["network"], "--data", setup["prepared"] / "val.zip",
            "--outdir", out, "--grid", "residual:mean", "--device", "cpu")
    assert r.exit_code != 0 and "--encoder is missing" in r.output


def test_small_subgroups_are_named_for_the_worst_case_rule():
    import pandas as pd

    from anomaly.scoring.tune import small_subgroups

    rows = pd.DataFrame({"class": ["nv"] * 25 + ["mel"] * 30,
                         "dx_type": ["follow_up"] * 21 + ["histo"] * 4 + ["histo"] * 30})
    assert small_subgroups(rows, "nv", "dx_type", 20) == ["histo (4)"]
    assert small_subgroups(rows, "nv", "dx_type", 4) == []


# ------------------------------------------------------------------------------ +shifts rule


def test_selection_with_shifts_is_the_min_over_routes_and_shifts():
    import pandas as pd

    from anomaly.scoring.tune import _with_cost, parse_select, select_row, selection_value

    assert parse_select("worst:dx_type+shifts") == ("dx_type", True)
    assert parse_select("auc+shifts") == (None, True)
    assert parse_select("worst:route") == ("route", False) and parse_select("auc") == (None, False)
    for bad in ("worst:", "worst:a+b", "shifts", "auc+shift"):
        with pytest.raises(UserError, match="is not understood"):
            parse_select(bad)
    # a score that separates the routes best but collapses under a zoom loses to one that holds
    table = pd.DataFrame({"configuration": ["residual:mean", "residual:smax:1", "izif:1"],
                          "components": [None, None, None],
                          "worst_route": [0.74, 0.70, 0.72],
                          "auc[shift=zoom:1.33]": [0.65, 0.69, 0.73],
                          "auc[shift=exposure:0.7]": [0.74, 0.71, 0.71]})
    shifts = ["auc[shift=zoom:1.33]", "auc[shift=exposure:0.7]"]
    table["select"] = [selection_value(r["worst_route"], {c: r[c] for c in shifts})
                       for _, r in table.iterrows()]
    assert table["select"].tolist() == [0.65, 0.69, 0.71]
    table = _with_cost(table)
    assert select_row(table, 0.0)["configuration"] == "izif:1"
    assert select_row(table.assign(select=table["worst_route"]), 0.0)["configuration"] \
        == "residual:mean"  # what the routes alone would choose
    assert np.isnan(selection_value(0.7, {"zoom:2": float("nan")}))
    assert selection_value(0.7, {}) == 0.7


@pytest.fixture(scope="module")
def tuned_shifts(setup):
    out = setup["root"] / "tuned-shifts"
    r = run("tune", "--network", setup["network"], "--encoder", setup["encoder"],
            "--data", setup["prepared"] / "val.zip", "--outdir", out,
            "--grid", "residual:mean,residual:smax:1,knn-latent:3", "--tta", "off",
            "--select", "worst:route+shifts", "--shifts", "zoom:1,exposure:0.5,zoom:0.75",
            "--min-subgroup", 2, "--bootstrap", 0, "--dims", 8, "--device", "cpu",
            "--combine", 2, "--seed", 5)
    assert r.exit_code == 0, r.output
    return out, r.output


def test_tune_with_shifts_takes_the_min_and_records_the_shifts(setup, tuned_shifts):
    import pandas as pd

    out, output = tuned_shifts
    table = pd.read_excel(out / "tune.xlsx")
    shift_cols = ["auc[shift=zoom:1]", "auc[shift=exposure:0.5]", "auc[shift=zoom:0.75]"]
    assert set(shift_cols) <= set(table.columns)
    routes = table[["auc[route=a]", "auc[route=b]"]].min(axis=1)
    assert np.allclose(table["select"], np.minimum(routes, table[shift_cols].min(axis=1)))
    # zoom:1 shifts nothing: the raw images decoded and fitted again give the cached quantities
    assert np.allclose(table["auc[shift=zoom:1]"], table["auc"], atol=1e-9)
    assert not np.allclose(table["auc[shift=exposure:0.5]"], table["auc"])
    assert (table["method"] == "rank-average").sum() >= 1
    body = json.loads((out / "detector.json").read_text())
    sel = body["selection"]
    assert sel["rule"] == "worst:route+shifts"
    assert sel["shifts"]["shifts"] == ["zoom:1", "exposure:0.5", "zoom:0.75"]
    assert sel["shifts"]["share"] == 0.5 and sel["shifts"]["seed"] == 5
    val = [r for r in csv.DictReader(open(setup["prepared"] / "manifest.csv"))
           if r["split"] == "val"]
    n_nv, n_mel = (sum(r["class"] == c for r in val) for c in ("nv", "mel"))
    assert sel["shifts"]["shifted_normals"] == round(n_nv / 2)
    assert sel["shifts"]["shifted_anomalies"] == round(n_mel / 2)
    assert f"for {body['comparison']}" in output and body["comparison"] == "nv vs mel"
    tune_json = json.loads((out / "tune.json").read_text())
    assert tune_json["comparison"] == "nv vs mel" and tune_json["selection"] == sel


def test_tune_with_shifts_refuses_missing_raw_images(setup, tmp_path):
    r = run("tune", "--network", setup["network"], "--encoder", setup["encoder"],
            "--data", setup["prepared"] / "val.zip", "--outdir", tmp_path / "o",
            "--grid", "residual:mean", "--tta", "off", "--select", "auc+shifts",
            "--images", tmp_path, "--bootstrap", 0, "--device", "cpu")
    assert r.exit_code != 0 and "give --images" in r.output
    r = run("tune", "--network", setup["network"], "--encoder", setup["encoder"],
            "--data", setup["prepared"] / "val.zip", "--outdir", tmp_path / "o",
            "--grid", "residual:mean", "--select", "auc+shifts", "--shifts", "blur:2",
            "--device", "cpu")
    assert r.exit_code != 0 and "--shifts" in r.output and "is not a shift" in r.output
