"""Numbers of the StyleGAN2 losses checked against values derived by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stylegan.losses import (
    d_logistic_loss,
    ema_beta,
    g_nonsaturating_loss,
    lazy_regularization_adjust,
    path_length_penalty,
    r1_penalty,
    style_mixing_ws,
    update_ema,
)

LN2 = math.log(2.0)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_g_nonsaturating_loss_values():
    # softplus(-0) = ln 2, softplus(-ln 3) = ln(4/3), softplus(ln 3) = ln 4.
    logits = torch.tensor([0.0, math.log(3.0), -math.log(3.0)])
    expected = (LN2 + math.log(4 / 3) + math.log(4.0)) / 3
    assert g_nonsaturating_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_d_logistic_loss_values():
    real = torch.tensor([[2.0], [0.0]])
    fake = torch.tensor([[-1.0], [3.0], [0.5]])
    expected = (softplus(-1.0) + softplus(3.0) + softplus(0.5)) / 3 + (softplus(-2.0) + LN2) / 2
    assert d_logistic_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    # A perfect D (large real, very negative fake logits) has a loss near zero.
    assert d_logistic_loss(torch.full([4], 30.0), torch.full([4], -30.0)).item() < 1e-12


def test_r1_penalty_linear_discriminator():
    # logits_i = sum(w * x_i) -> d logits.sum() / d x_i = w for every sample: penalty = |w|^2.
    torch.manual_seed(0)
    w = torch.randn(3, 4, 5)
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    logits = (x * w).flatten(1).sum(dim=1, keepdim=True)  # [N, 1], like D's output
    penalty = r1_penalty(logits, x)
    assert penalty.shape == (2,)
    torch.testing.assert_close(penalty, w.square().sum().expand(2))


def test_r1_penalty_quadratic_keeps_graph():
    # logits_i = a |x_i|^2 / 2 -> grad = a x_i, penalty = a^2 |x_i|^2, d penalty / d a = 2a|x|^2.
    a = torch.tensor(3.0, requires_grad=True)
    x = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]], requires_grad=True)  # [2, 1, 1, 2]
    logits = 0.5 * a * x.square().flatten(1).sum(dim=1)
    penalty = r1_penalty(logits, x)
    torch.testing.assert_close(penalty, torch.tensor([9.0 * 5.0, 9.0 * 1.0]))
    penalty.sum().backward()  # needs create_graph=True
    assert a.grad.item() == pytest.approx(2 * 3.0 * (5.0 + 1.0))


def test_path_length_penalty_linear_map():
    # images = A ws (linear, known Jacobian); with noise y: grad_ws = A^T y.
    torch.manual_seed(1)
    n, k, d, c, h, w = 3, 2, 4, 1, 2, 3
    a = torch.randn(c * h * w, k * d).requires_grad_(True)  # "G weights"
    ws = torch.randn(n, k, d, requires_grad=True)
    images = (ws.flatten(1) @ a.T).reshape(n, c, h, w)
    torch.manual_seed(7)
    penalty, new_mean = path_length_penalty(images, ws, torch.tensor(0.5), decay=0.1)

    torch.manual_seed(7)
    y = torch.randn(n, c, h, w) / math.sqrt(h * w)
    grads = (y.flatten(1) @ a.detach()).reshape(n, k, d)  # A^T y per sample
    lengths = grads.square().sum(dim=2).mean(dim=1).sqrt()
    mean = 0.5 + 0.1 * (lengths.mean() - 0.5)
    torch.testing.assert_close(new_mean, mean)
    torch.testing.assert_close(penalty, (lengths - mean).square())
    assert not new_mean.requires_grad
    assert penalty.requires_grad  # create_graph=True: the penalty trains G (here A)


def test_path_length_penalty_scaled_identity():
    # images = s * ws laid out as one K x D channel: grad = s * y, length = sqrt(sum (s y)^2 / K).
    torch.manual_seed(3)
    s, k, d = 2.0, 4, 4
    ws = torch.randn(1, k, d, requires_grad=True)
    images = (s * ws).reshape(1, 1, k, d)
    torch.manual_seed(11)
    penalty, new_mean = path_length_penalty(images, ws, 0.0, decay=1.0)
    torch.manual_seed(11)
    y = torch.randn(1, 1, k, d) / math.sqrt(k * d)
    length = math.sqrt((s * y).square().sum().item() / k)
    assert new_mean.item() == pytest.approx(length, rel=1e-5)  # decay 1: mean = lengths.mean()
    assert penalty.item() == pytest.approx(0.0, abs=1e-10)


def test_lazy_regularization_adjust_numbers():
    lr, betas = lazy_regularization_adjust(0.0025, (0.0, 0.99), 16)
    assert lr == pytest.approx(0.0025 * 16 / 17)
    assert betas[0] == 0.0
    assert betas[1] == pytest.approx(0.99 ** (16 / 17))
    assert betas[1] == pytest.approx(0.990585, abs=1e-6)
    lr4, betas4 = lazy_regularization_adjust(0.002, (0.5, 0.9), 4)
    assert lr4 == pytest.approx(0.0016)
    assert betas4 == pytest.approx((0.5**0.8, 0.9**0.8))
    with pytest.raises(ValueError):
        lazy_regularization_adjust(0.002, (0.0, 0.99), 0)


def test_ema_beta_examples():
    # No rampup: half-life of 10 kimg, batch 32 -> 0.5 ** (32 / 10000).
    assert ema_beta(32, 10.0, 0, None) == pytest.approx(0.5 ** 0.0032)
    # Rampup 0.05 at 40 kimg: min(10000, 2000) = 2000 images -> 0.5 ** (32 / 2000).
    assert ema_beta(32, 10.0, 40_000, 0.05) == pytest.approx(0.5 ** 0.016)
    # Rampup no longer limits once cur_nimg * rampup exceeds ema_nimg.
    assert ema_beta(32, 10.0, 1_000_000, 0.05) == pytest.approx(0.5 ** 0.0032)
    # At the very start with rampup the EMA just copies the weights.
    assert ema_beta(32, 10.0, 0, 0.05) == 0.0


def test_update_ema_lerps_params_and_copies_buffers():
    src, ema = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        src.weight.copy_(torch.tensor([1.0, 3.0]))
        ema.weight.copy_(torch.tensor([5.0, -1.0]))
        src.bias.copy_(torch.tensor([0.0, 0.0]))
        ema.bias.copy_(torch.tensor([2.0, 4.0]))
    src.running_mean.copy_(torch.tensor([7.0, 8.0]))
    update_ema(ema, src, 0.25)
    # ema = p + 0.25 (ema - p)
    torch.testing.assert_close(ema.weight.data, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(ema.bias.data, torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(ema.running_mean, torch.tensor([7.0, 8.0]))
    torch.testing.assert_close(src.weight.data, torch.tensor([1.0, 3.0]))  # source untouched


def test_update_ema_rejects_different_modules():
    with pytest.raises(AssertionError):
        update_ema(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), 0.5)


def _mapping(z: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    return (z[:, None, :] + 100.0).expand(-1, 5, -1)  # [N, 5, Z]; easy to recognise


def test_style_mixing_keeps_head_replaces_tail():
    torch.manual_seed(0)
    z = torch.randn(3, 4)
    ws = torch.zeros(3, 5, 4)
    cutoffs = []
    for _ in range(50):
        out = style_mixing_ws(_mapping, ws, z, None, 1.0)
        assert out.shape == ws.shape
        replaced = (out != 0).all(dim=2).all(dim=0)  # [K]
        cutoff = int((~replaced).sum())
        assert torch.equal(out[:, :cutoff], ws[:, :cutoff])
        assert (out[:, cutoff:] > 90).all()  # mapping of fresh latents
        assert not torch.allclose(out[:, cutoff], _mapping(z, None)[:, cutoff])  # fresh z
        cutoffs.append(cutoff)
    assert set(cutoffs) == {1, 2, 3, 4}  # uniform in [1, K - 1]
    assert torch.equal(ws, torch.zeros(3, 5, 4))  # input untouched


def test_style_mixing_probability_and_seed():
    z, ws = torch.randn(2, 4), torch.zeros(2, 5, 4)
    torch.manual_seed(5)
    mixed = [bool((style_mixing_ws(_mapping, ws, z, None, 0.3) != 0).any()) for _ in range(400)]
    assert 0.22 < sum(mixed) / 400 < 0.38
    assert style_mixing_ws(_mapping, ws, z, None, 0.0) is ws
    torch.manual_seed(9)
    first = style_mixing_ws(_mapping, ws, z, None, 0.9)
    torch.manual_seed(9)
    torch.testing.assert_close(style_mixing_ws(_mapping, ws, z, None, 0.9), first)
