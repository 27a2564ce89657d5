"""Scores checked against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anomaly.methods import registry, scores
from stylegan.errors import UserError


def _pair():
    # Two 1x2x2 images; reconstructions differ by known amounts.
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])  # [2, 1, 2, 2]
    x_rec = torch.tensor([[[[0.0, 1.0], [2.0, 1.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    return x, x_rec


def test_izif_by_hand_and_kappa_weighting():
    x, x_rec = _pair()
    feat = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])  # [2, 3]
    feat_rec = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    # image 0: pixel MSE = (3-1)^2 / 4 = 1; feature MSE = 9 / 3 = 3
    # image 1: pixel MSE = 4 * 1 / 4 = 1; feature MSE = 9 / 3 = 3
    assert torch.allclose(scores.izif_score(x, x_rec, feat, feat_rec), torch.tensor([4.0, 4.0]))
    assert torch.allclose(scores.izif_score(x, x_rec, feat, feat_rec, kappa=0.5),
                          torch.tensor([2.5, 2.5]))
    assert torch.allclose(scores.izif_score(x, x_rec, feat, feat_rec, kappa=0.0),
                          torch.tensor([1.0, 1.0]))


def test_izif_terms_match_numpy_and_every_izif_user_adds_them_the_same_way():
    """izif_terms against a numpy hand computation; the training loss (fit.izif_loss), the
    projection loss and izif_score all come from those terms (no feature term without features)."""
    from anomaly.model.fit import izif_loss

    rng = np.random.default_rng(0)
    x, rec = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 3, 4, 4))
    f, fr = rng.normal(size=(2, 5, 2, 2)), rng.normal(size=(2, 5, 2, 2))
    want_r = ((x - rec) ** 2).reshape(2, -1).mean(axis=1)
    want_d = ((f - fr) ** 2).reshape(2, -1).mean(axis=1)
    t = [torch.tensor(a, dtype=torch.float32) for a in (x, rec, f, fr)]
    a_r, a_d = scores.izif_terms(*t)
    np.testing.assert_allclose(a_r.numpy(), want_r, rtol=1e-5)
    np.testing.assert_allclose(a_d.numpy(), want_d, rtol=1e-5)
    np.testing.assert_allclose(scores.izif_score(*t, kappa=2.5).numpy(), want_r + 2.5 * want_d,
                               rtol=1e-5)
    loss = izif_loss(*t, kappa=2.5)
    assert float(loss["loss"]) == pytest.approx(float(np.mean(want_r + 2.5 * want_d)), rel=1e-5)
    np.testing.assert_allclose(scores.izif_score(t[0], t[1], None, None, kappa=9.0).numpy(),
                               want_r, rtol=1e-5)
    assert float(izif_loss(*t, kappa=0.0)["feature"]) == 0.0


def test_izif_accepts_spatial_features():
    x, x_rec = _pair()
    feat = torch.zeros(2, 2, 2, 2)
    feat_rec = torch.zeros(2, 2, 2, 2)
    feat_rec[1, 0, 0, 0] = 4.0  # one element of eight: 16 / 8 = 2
    assert torch.allclose(scores.izif_score(x, x_rec, feat, feat_rec), torch.tensor([1.0, 3.0]))


def test_torch_euclidean_by_hand_and_agrees_with_sklearn():
    x, x_rec = _pair()
    expected = np.array([2.0, 2.0])  # sqrt(4) and sqrt(4 * 1)
    assert np.allclose(scores.torch_euclidean(x, x_rec).numpy(), expected, atol=0, rtol=1e-7)
    assert np.allclose(scores.sklearn_distance(x, x_rec, "euclidean"), expected, rtol=1e-12)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 8, 8, generator=gen), torch.randn(5, 3, 8, 8, generator=gen)
    assert np.allclose(scores.torch_euclidean(a, b).numpy(),
                       scores.sklearn_distance(a, b, "euclidean"), rtol=1e-5)


def test_sklearn_metrics_by_hand():
    x = np.array([[1.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    y = np.array([[0.0, 1.0, 0.0], [1.0, 2.0, 1.0]])
    assert np.allclose(scores.sklearn_distance(x, y, "cityblock"), [2.0, 2.0])
    assert np.allclose(scores.sklearn_distance(x, y, "sqeuclidean"), [2.0, 4.0])
    assert np.allclose(scores.sklearn_distance(x, y, "chebyshev"), [1.0, 2.0])
    assert np.allclose(scores.sklearn_distance(x, y, "cosine"),
                       [1.0, 1.0 - (1 + 4 + 3) / (math.sqrt(14) * math.sqrt(6))])


@pytest.mark.parametrize("metric", scores.SKLEARN_METRICS)
def test_every_offered_metric_runs(metric):
    gen = np.random.default_rng(0)
    a, b = gen.random((3, 2, 4, 4)), gen.random((3, 2, 4, 4))
    out = scores.sklearn_distance(a, b, metric)
    assert out.shape == (3,) and np.isfinite(out).all() and (out > 0).all()
    same = scores.sklearn_distance(a, a, metric)
    assert np.allclose(same, 0.0, atol=1e-6)  # nan_euclidean's expansion leaves ~sqrt(eps)


def test_unknown_or_meaningless_metric_is_a_user_error():
    with pytest.raises(UserError, match="euclidean"):
        scores.sklearn_distance(np.zeros((1, 2)), np.zeros((1, 2)), "nope")
    with pytest.raises(UserError, match="boolean"):
        scores.sklearn_distance(np.zeros((1, 2)), np.zeros((1, 2)), "jaccard")


def test_latent_distance_w_and_wplus():
    w_avg = torch.tensor([1.0, 1.0])
    w = torch.tensor([[4.0, 5.0], [1.0, 1.0]])  # distances 5 and 0
    assert torch.allclose(scores.latent_distance(w, w_avg), torch.tensor([5.0, 0.0]))
    # W+ with equal rows scores like W; unequal rows: RMS of per-style distances 3 and 4.
    assert torch.allclose(scores.latent_distance(w.unsqueeze(1).repeat(1, 6, 1), w_avg),
                          torch.tensor([5.0, 0.0]))
    wplus = torch.tensor([[[4.0, 1.0], [1.0, 5.0]]])  # [1, 2, 2]
    assert torch.allclose(scores.latent_distance(wplus, w_avg),
                          torch.tensor([math.sqrt((9 + 16) / 2)]))


def test_parse_methods_and_registry():
    assert [s.name for s in registry.parse_list(" izif, SKLEARN:cosine,izif,latent,")] == [
        "izif", "sklearn:cosine", "latent"]
    assert registry.parse("izif").needs_features and not registry.parse("izif").needs_latents
    assert registry.parse("latent").needs_latents and not registry.parse("latent").needs_rec
    assert registry.parse("sklearn:l1").needs_rec
    assert scores.method_filename("sklearn:cosine") == "sklearn-cosine"
    with pytest.raises(UserError, match="--methods"):
        registry.parse_list("izif,bogus")
    with pytest.raises(UserError, match="empty"):
        registry.parse_list(" , ")
    with pytest.raises(UserError, match="mahalanobis"):
        registry.parse_list("sklearn:mahalanobis")


def test_score_table_streams_batches():
    table = scores.ScoreTable(["izif", "latent"])
    table.add({"izif": torch.tensor([1.0, 2.0]), "latent": np.array([3.0, 4.0])},
              files=["a.png", "b.png"], classes=["nv", "mel"], splits=["val", "val"],
              labels=[0, 1])
    table.add({"izif": torch.tensor([5.0]), "latent": torch.tensor([6.0])},
              files=["c.png"], classes=["bkl"], splits=["test"], labels=[2])
    assert len(table) == 3
    frames = table.frames()
    assert list(frames) == ["izif", "latent"]
    df = frames["latent"]
    assert list(df.columns) == ["score", "label", "file", "class", "split"]
    assert df["score"].tolist() == [3.0, 4.0, 6.0]
    assert df["label"].tolist() == [0, 1, 1]  # label 2 (bkl) is an anomaly
    assert df["class"].tolist() == ["nv", "mel", "bkl"]
    with pytest.raises(ValueError):
        table.add({"izif": torch.tensor([1.0])}, files=["d"], classes=["nv"], splits=["val"],
                  labels=[0])
