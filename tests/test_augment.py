"""ADA augmentation pipeline and p controller: exact transforms, statistics, gradients, state."""

from __future__ import annotations

import math

import pytest
import torch

import torch.nn.functional as F

from stylegan.augment import (
    AdaController,
    AugmentConfig,
    AugmentPipe,
    _draw_geometric,
    _resample,
    ada_adjustment,
)

OFF = {name: 0.0 for name in ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac",
                              "brightness", "contrast", "lumaflip", "hue", "saturation")}


def only(**on) -> AugmentConfig:
    """A config with every transform off except those given."""
    return AugmentConfig(**{**OFF, **on})


def images(n: int = 8, c: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=gen) * 2 - 1


def reflect_index(i: torch.Tensor, size: int) -> torch.Tensor:
    """Symmetric reflection (the border pixel repeats), as grid_sample's reflection padding."""
    m = i % (2 * size)
    return torch.where(m >= size, 2 * size - 1 - m, m)


def shifted(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """x[..., y - dy, x - dx] with symmetric reflection at the borders."""
    h, w = x.shape[-2:]
    rows = reflect_index(torch.arange(h) - dy, h)
    cols = reflect_index(torch.arange(w) - dx, w)
    return x[..., rows, :][..., cols]


# ----------------------------------------------------------------------------------------------
# AugmentPipe


def test_p_zero_is_exact_identity():
    x = images()
    pipe = AugmentPipe(AugmentConfig())  # every 'bgc' transform on, p = 0
    assert float(pipe.p) == 0.0
    state = torch.get_rng_state()
    assert pipe(x) is x
    assert torch.equal(torch.get_rng_state(), state)  # not even a random draw


def test_no_drawn_transform_skips_resampling():
    x = images()
    pipe = AugmentPipe(AugmentConfig(), p=1e-12)  # nothing is drawn, in practice
    torch.manual_seed(0)
    assert pipe(x) is x


def test_xflip_flips_exactly_half_of_the_images():
    x = images(n=32)
    torch.manual_seed(0)
    y = AugmentPipe(only(xflip=1.0), p=1.0)(x)
    flipped = 0
    for xi, yi in zip(x, y):  # bit for bit: the sampling grid hits pixel centres exactly
        if torch.equal(yi, xi):
            continue
        assert torch.equal(yi, xi.flip(-1))
        flipped += 1
    # As the official pipeline: a chosen image flips with probability 1/2.
    assert 8 <= flipped <= 24


def test_rotate90_is_a_pixel_permutation():
    x = images(n=24)
    torch.manual_seed(1)
    y = AugmentPipe(only(rotate90=1.0), p=1.0)(x)
    quarters = set()
    for xi, yi in zip(x, y):
        matches = [k for k in range(4) if torch.equal(yi, torch.rot90(xi, k, dims=(1, 2)))]
        assert len(matches) == 1
        quarters.add(matches[0])
    assert quarters == {0, 1, 2, 3}


def test_integer_translation_preserves_values_up_to_reflection():
    size = 16
    x = images(n=12, size=size)
    torch.manual_seed(2)
    y = AugmentPipe(only(xint=1.0), p=1.0)(x)
    max_shift = round(0.125 * size)
    found = []
    for xi, yi in zip(x, y):
        matches = [(dx, dy) for dx in range(-max_shift, max_shift + 1)
                   for dy in range(-max_shift, max_shift + 1)
                   if torch.equal(yi, shifted(xi, dx, dy))]
        assert len(matches) == 1, "output is not an integer shift of the input"
        found.append(matches[0])
        # Every output value is one of the input values of that channel.
        assert all(torch.isin(yi[c], xi[c]).all() for c in range(3))
    assert sum(f != (0, 0) for f in found) >= 8


def test_brightness_shifts_the_mean_by_the_drawn_amount():
    x = images(n=512, size=4)
    torch.manual_seed(3)
    y = AugmentPipe(only(brightness=1.0), p=1.0)(x)
    delta = y - x  # one constant per image
    b = delta.flatten(1).mean(dim=1)  # [N]
    torch.testing.assert_close(delta, b[:, None, None, None].expand_as(delta), atol=1e-6, rtol=0)
    torch.testing.assert_close(y.flatten(1).mean(1) - x.flatten(1).mean(1), b, atol=1e-6, rtol=0)
    assert b.std().item() == pytest.approx(0.2, rel=0.1)  # brightness_std
    assert abs(b.mean().item()) < 0.03


def test_contrast_scales_by_lognormal():
    x = images(n=512, size=4)
    torch.manual_seed(4)
    y = AugmentPipe(only(contrast=1.0), p=1.0)(x)
    scale = (y.flatten(1) / x.flatten(1)).median(dim=1).values  # [N]
    torch.testing.assert_close(y, x * scale[:, None, None, None], atol=1e-5, rtol=1e-5)
    assert torch.log2(scale).std().item() == pytest.approx(0.5, rel=0.1)  # contrast_std


def test_lumaflip_reflects_along_the_luma_axis():
    grey = torch.full([1, 3, 2, 2], 0.4)
    chroma = torch.tensor([0.3, -0.3, 0.0])[None, :, None, None].expand(1, 3, 2, 2)
    x = torch.cat([grey, chroma, grey + chroma])
    batch = x.repeat(8, 1, 1, 1)  # 8 copies of the 3 test colours, each image decides alone
    flipped_value = torch.cat([-grey, chroma, -grey + chroma]).repeat(8, 1, 1, 1)
    torch.manual_seed(0)
    y = AugmentPipe(only(lumaflip=1.0), p=1.0)(batch)
    flips = 0
    for yi, xi, fi in zip(y, batch, flipped_value):
        if torch.equal(yi, xi):
            continue
        torch.testing.assert_close(yi, fi)  # luma changes sign, the orthogonal colour is kept
        flips += 1
    torch.testing.assert_close(y[1::3], batch[1::3])  # pure chroma: flip or not, the same
    assert 4 <= flips <= 14


def test_hue_and_saturation_keep_luma():
    x = images(n=16, size=4)
    v = torch.ones(3) / math.sqrt(3)
    luma = torch.einsum("nchw,c->nhw", x, v)
    chroma = x - luma[:, None] * v[None, :, None, None]
    torch.manual_seed(5)
    y = AugmentPipe(only(hue=1.0), p=1.0)(x)
    y_luma = torch.einsum("nchw,c->nhw", y, v)
    y_chroma = y - y_luma[:, None] * v[None, :, None, None]
    torch.testing.assert_close(y_luma, luma, atol=1e-5, rtol=0)
    torch.testing.assert_close(y_chroma.norm(dim=1), chroma.norm(dim=1), atol=1e-5, rtol=0)
    assert not torch.allclose(y, x, atol=1e-3)

    torch.manual_seed(6)
    y = AugmentPipe(only(saturation=1.0), p=1.0)(x)
    y_luma = torch.einsum("nchw,c->nhw", y, v)
    y_chroma = y - y_luma[:, None] * v[None, :, None, None]
    torch.testing.assert_close(y_luma, luma, atol=1e-5, rtol=0)
    s = (y_chroma.flatten(1).norm(dim=1) / chroma.flatten(1).norm(dim=1))  # [N]
    torch.testing.assert_close(y_chroma, chroma * s[:, None, None, None], atol=1e-5, rtol=1e-5)


def test_geometric_only_stays_in_input_range_and_full_pipe_is_sane():
    x = images(n=16, size=32)
    torch.manual_seed(7)
    cfg = AugmentConfig.preset("bg", interpolation="bilinear")
    y = AugmentPipe(cfg, p=1.0)(x)
    assert y.min() >= x.min() - 1e-6 and y.max() <= x.max() + 1e-6  # convex combinations
    torch.manual_seed(7)
    y = AugmentPipe(AugmentConfig(), p=1.0)(x)
    assert torch.isfinite(y).all()
    assert y.abs().quantile(0.5) < 1.5 and y.abs().max() < 30


def test_shape_dtype_device_and_seeded_reproducibility():
    x = images(n=4, size=16).double()
    pipe = AugmentPipe(AugmentConfig(), p=0.7)
    torch.manual_seed(8)
    y = pipe(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    torch.manual_seed(8)
    assert torch.equal(pipe(x), y)
    assert not torch.equal(pipe(x), y)


def test_gradients_flow_to_the_input():
    x = images(n=4, size=16).requires_grad_(True)
    torch.manual_seed(9)
    y = AugmentPipe(AugmentConfig(), p=1.0)(x)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_gradcheck_and_double_backward(interpolation):
    # R1 takes the gradient of D(augment(x)) w.r.t. x and back-propagates it: needs 2nd order.
    pipe = AugmentPipe(AugmentConfig(interpolation=interpolation), p=1.0)

    def augment(x):
        torch.manual_seed(10)  # the same random transform at every evaluation
        return pipe(x)

    x = images(n=2, size=4).double().requires_grad_(True)
    assert torch.autograd.gradcheck(augment, (x,))
    assert torch.autograd.gradgradcheck(augment, (x,))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_resample_matches_affine_grid_reference(mode):
    # Non-square, non-power-of-two: our grid equals F.affine_grid's up to float rounding.
    n, h, w = 6, 12, 20
    torch.manual_seed(14)
    g_inv = _draw_geometric(AugmentConfig(), 1.0, n, h, w)
    x = torch.randn(n, 3, h, w)
    to_unit = torch.diag(torch.tensor([2 / w, 2 / h, 1.0], dtype=torch.float64))
    from_unit = torch.diag(torch.tensor([w / 2, h / 2, 1.0], dtype=torch.float64))
    theta = (to_unit @ g_inv @ from_unit)[:, :2].float()
    grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
    ref = F.grid_sample(x, grid, mode=mode, padding_mode="reflection", align_corners=False)
    torch.testing.assert_close(_resample(x, g_inv, mode), ref, atol=1e-4, rtol=0)
    assert not torch.allclose(ref, x, atol=0.1)


def test_rotation_probability_is_p_despite_two_rotations():
    cfg, n, p = only(rotate=1.0), 20000, 0.5
    torch.manual_seed(11)
    g_inv = _draw_geometric(cfg, p, n, 16, 16)
    rotated = ~torch.isclose(g_inv, torch.eye(3, dtype=torch.float64)).flatten(1).all(dim=1)
    assert rotated.double().mean().item() == pytest.approx(p, abs=0.015)
    # Each of the two rotations alone happens with 1 - sqrt(1 - p) ~ 0.293.
    g_inv = _draw_geometric(only(xflip=1.0), p, n, 16, 16)
    flipped = (g_inv[:, 0, 0] < 0).double().mean().item()
    assert flipped == pytest.approx(p / 2, abs=0.015)


def test_one_channel_and_unsupported_channels():
    x = images(n=64, c=1, size=4)
    torch.manual_seed(12)
    y = AugmentPipe(AugmentConfig.preset("color"), p=1.0)(x)  # hue / saturation skipped
    ratio = (y - y.flatten(1).mean(1)[:, None, None, None]) / (
        x - x.flatten(1).mean(1)[:, None, None, None])
    gain = ratio.flatten(1).median(dim=1).values
    torch.testing.assert_close(ratio, gain[:, None, None, None].expand_as(ratio), atol=1e-3,
                               rtol=1e-3)  # per image y = a x + b
    assert (gain < 0).any()  # the luma flip negates a grey image
    with pytest.raises(ValueError):
        AugmentPipe(AugmentConfig.preset("color"), p=1.0)(images(n=16, c=2, size=4))
    assert AugmentPipe(AugmentConfig.preset("bg"), p=1.0)(images(n=4, c=2)).shape == (4, 2, 16, 16)


def test_config_presets_and_validation():
    assert AugmentConfig.preset("bgc") == AugmentConfig()
    blit = AugmentConfig.preset("blit")
    assert (blit.xflip, blit.rotate90, blit.xint, blit.scale, blit.hue) == (1, 1, 1, 0, 0)
    assert AugmentConfig.preset("color").any_geometric is False
    with pytest.raises(ValueError):
        AugmentConfig.preset("bgcfnc")
    with pytest.raises(ValueError):
        AugmentConfig(scale_std=-1.0)
    with pytest.raises(ValueError):
        AugmentConfig(interpolation="nearest")


def test_state_dict_holds_p():
    pipe = AugmentPipe(p=0.25)
    assert list(pipe.state_dict()) == ["p"]
    other = AugmentPipe()
    other.load_state_dict(pipe.state_dict())
    assert float(other.p) == 0.25


# ----------------------------------------------------------------------------------------------
# AdaController


def test_controller_step_is_the_official_speed():
    ada = AdaController(32)  # target 0.6, interval 4, kimg 500
    assert ada.step == pytest.approx(32 * 4 / 500_000)  # 2.56e-4 per adjustment
    assert ada_adjustment(0.9, 0.6, batch_size=32, interval=4, kimg=500) == pytest.approx(2.56e-4)
    assert ada_adjustment(0.1, 0.6, batch_size=32, interval=4, kimg=500) == pytest.approx(-2.56e-4)
    assert ada_adjustment(0.6, 0.6, batch_size=32, interval=4, kimg=500) == 0.0


def test_controller_moves_up_and_saturates_after_500_kimg():
    ada = AdaController(32)
    positive = torch.ones(32, 1)
    for _ in range(3):
        ada.update(positive)
    assert ada.p == 0.0 and ada.r_t is None  # not yet a full interval
    ada.update(positive)
    assert ada.r_t == 1.0 and ada.p == pytest.approx(2.56e-4)
    # 0 -> 1 takes 1 / 2.56e-4 = 3906.25 adjustments = 500 kimg.
    for _ in range(3905 * 4):
        ada.update(positive)
    assert ada.p == pytest.approx(3906 * 2.56e-4) and ada.p < 1
    for _ in range(4 * 4):
        ada.update(positive)
    assert ada.p == 1.0  # clamped


def test_controller_moves_down_never_below_zero():
    ada = AdaController(16, target=0.6, interval=2, kimg=1, p=0.05)  # step 32 / 1000 = 0.032
    logits = torch.tensor([1.0, 1.0, -1.0, 0.0] * 4)  # mean sign 0.25 < 0.6
    ada.update(logits)
    ada.update(logits)
    assert ada.r_t == pytest.approx(0.25)
    assert ada.p == pytest.approx(0.05 - 0.032)
    ada.update(logits)
    ada.update(logits)
    assert ada.p == 0.0


def test_controller_counts_images_not_calls():
    # Gradient accumulation: an iteration may arrive in chunks; only the image count matters.
    whole, chunked = AdaController(8, interval=1, kimg=1), AdaController(8, interval=1, kimg=1)
    logits = torch.tensor([3.0, 2.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0])  # mean sign 0.75
    whole.update(logits)
    chunked.update(logits[:4])
    assert chunked.r_t is None
    chunked.update(logits[4:])
    assert whole.r_t == chunked.r_t == pytest.approx(0.75)
    assert whole.p == chunked.p == pytest.approx(8 / 1000)


def test_controller_state_round_trip_mid_interval():
    torch.manual_seed(13)
    batches = [torch.randn(16) + 1.5 for _ in range(10)]  # r_t ~ 0.9 > target
    straight = AdaController(16, kimg=1)
    for b in batches:
        straight.update(b)
    first = AdaController(16, kimg=1)
    for b in batches[:6]:
        first.update(b)
    state = first.state_dict()
    assert all(v is None or isinstance(v, float) for v in state.values())
    resumed = AdaController(16, kimg=1)
    resumed.load_state_dict(state)
    for b in batches[6:]:
        resumed.update(b)
    assert resumed.state_dict() == pytest.approx(straight.state_dict())
    assert resumed.p > 0


def test_controller_p_setter_clamps():
    ada = AdaController(4)
    ada.p = 1.7
    assert ada.p == 1.0
    ada.p = -0.2
    assert ada.p == 0.0
