"""anodata.lesion: the lesion found without labels, on synthetic images with a known answer
and on the real photos of data/demo."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anodata.lesion import find_lesion, lesion_mask, otsu_threshold

SKIN = (200, 150, 130)
LESION = (110, 65, 50)
DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "images"


def _skin(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """Skin with mild noise: float [H, W, 3]."""
    img = np.empty((h, w, 3), np.float64)
    img[:] = SKIN
    return img + np.random.default_rng(seed).normal(0, 3, img.shape)


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.hypot(yy - cy, xx - cx) < r


def _u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("h,w", [(64, 64), (150, 200), (450, 600)])
def test_a_dark_disc_on_skin_is_found(h, w):
    img = _skin(h, w)
    truth = _disc(h, w, h * 0.45, w * 0.55, 0.2 * h)
    img[truth] = LESION
    mask = lesion_mask(_u8(img))
    assert mask.dtype == bool and mask.shape == (h, w)
    assert _iou(mask, truth) > 0.9


def test_holes_are_filled():
    img = _skin()
    truth = _disc(64, 64, 32, 32, 14)
    img[truth & ~_disc(64, 64, 32, 32, 6)] = LESION  # a ring with skin inside (regression)
    assert _iou(lesion_mask(_u8(img)), truth) > 0.9


def test_grey_images_are_read_too():
    img = _skin()
    truth = _disc(64, 64, 30, 34, 12)
    img[truth] = LESION
    grey = np.asarray(Image.fromarray(_u8(img)).convert("L"))
    assert _iou(lesion_mask(grey), truth) > 0.9


def test_a_lesion_cut_by_the_edge_is_found():
    img = _skin()
    truth = _disc(64, 64, 32, 58, 16)  # a third of it outside the right edge
    img[truth] = LESION
    assert _iou(lesion_mask(_u8(img)), truth) > 0.9


@pytest.mark.parametrize("case", ["larger and central", "same size, central"])
def test_of_two_lesions_the_central_larger_one_wins(case):
    img = _skin()
    central = _disc(64, 64, 33, 31, 11 if case == "larger and central" else 7)
    aside = _disc(64, 64, 9, 54, 7)  # near the top right corner
    img[central | aside] = LESION
    mask = lesion_mask(_u8(img))
    assert _iou(mask, central) > 0.9 and not (mask & aside).any()


def test_a_much_larger_lesion_beats_a_small_central_speck():
    img = _skin()
    speck = _disc(64, 64, 32, 32, 3)
    big = _disc(64, 64, 20, 14, 14)
    img[speck | big] = LESION
    mask = lesion_mask(_u8(img))
    assert _iou(mask, big) > 0.9 and not (mask & speck).any()


@pytest.mark.parametrize("radius,centre", [(30.0, (31.5, 31.5)), (40.0, (31.5, 31.5)),
                                           (34.0, (36.0, 28.0))])
def test_a_dark_circular_border_is_not_the_lesion(radius, centre):
    """A dermatoscope's vignette, whole or cut by the image edges, and its shaded rim."""
    img = _skin()
    truth = _disc(64, 64, 32, 32, 9)
    img[truth] = LESION
    yy, xx = np.mgrid[0:64, 0:64]
    dist = np.hypot(yy - centre[0], xx - centre[1])
    img *= np.clip(1.3 - 0.3 * (dist / radius) ** 4, 0, 1)[:, :, None]  # shading to the rim
    img[dist > radius] = (6, 5, 5)
    mask = lesion_mask(_u8(img))
    assert _iou(mask, truth) > 0.85 and not mask[dist > radius - 2].any()


def test_a_grey_rim_along_the_edges_is_not_the_lesion():
    """A vignette that is shaded but not black (above anodata.border.DARK) lies along the
    whole outline: its large area does not make it the lesion."""
    img = _skin()
    truth = _disc(64, 64, 32, 32, 6)
    img[truth] = LESION
    rim = ~_disc(64, 64, 31.5, 31.5, 26)
    img[rim] = (100, 70, 60)
    mask = lesion_mask(_u8(img))
    assert _iou(mask, truth) > 0.85 and not (mask & rim).any()


def test_hair_is_not_the_lesion():
    img = _skin()
    truth = _disc(64, 64, 32, 32, 10)
    img[truth] = LESION
    hair = np.zeros((64, 64), bool)
    for x0, slope in ((5, 0.3), (26, 0.2), (45, -0.1), (58, -0.4)):  # long lines, 1 px wide
        rows = np.arange(64)
        hair[rows, np.clip(np.rint(x0 + slope * rows).astype(int), 0, 63)] = True
    img[hair] = (40, 30, 25)
    mask = lesion_mask(_u8(img))
    # a few hair pixels where a line joins the lesion stay (84 without the opening)
    assert _iou(mask, truth) > 0.9 and (mask & hair & ~truth).sum() <= 20


def test_uniform_skin_has_no_lesion():
    mask, reason = find_lesion(_u8(_skin()))
    assert mask is None and reason == "no dark region"
    assert not lesion_mask(_u8(_skin())).any()
    faint = _skin()
    faint[_disc(64, 64, 32, 32, 10)] *= 0.95  # 5% darker: not told from the skin
    assert find_lesion(_u8(faint)) == (None, "no dark region")


def test_a_lesion_filling_the_image_and_a_dark_image_are_refused():
    img = _skin()
    img[~_disc(64, 64, 32, 32, 2) & ~(np.mgrid[0:64, 0:64][1] < 3)] = LESION  # all but specks
    assert find_lesion(_u8(img)) == (None, "lesion fills the image")
    assert find_lesion(np.full((64, 64, 3), 5, np.uint8)) == (None, "the image is dark")


def test_otsu_threshold_maximises_the_between_class_variance_by_brute_force():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(70, 10, 300), rng.normal(170, 20, 700)]).clip(0, 255)
    values = np.floor(values)
    best, best_t = -1.0, None
    for t in range(255):  # classes {v <= t} and {v > t}, by hand
        low, high = values[values <= t], values[values > t]
        if len(low) == 0 or len(high) == 0:
            continue
        between = len(low) * len(high) / len(values) ** 2 * (low.mean() - high.mean()) ** 2
        if between > best:
            best, best_t = between, t
    assert int(otsu_threshold(values)) == best_t


def test_real_demo_photos_have_a_central_lesion_found():
    paths = sorted(DEMO.glob("*.jpg"))[:50]
    found = central = 0
    for path in paths:
        mask = lesion_mask(np.asarray(Image.open(path).convert("RGB")))
        h, w = mask.shape
        found += bool(mask.any())
        central += bool(mask[h // 2 - 3:h // 2 + 4, w // 2 - 3:w // 2 + 4].any())
    assert len(paths) == 50 and found >= 45 and central >= 42


def test_it_is_fast_at_64_px():
    img = _skin()
    img[_disc(64, 64, 32, 32, 10)] = LESION
    img = _u8(img)
    lesion_mask(img)
    start = time.perf_counter()
    for _ in range(20):
        lesion_mask(img)
    assert (time.perf_counter() - start) / 20 < 0.01  # about 1 ms on one idle core


def test_the_luminance_is_that_of_the_shades_of_gray_image():
    """The fused colour constancy + luminance equals anodata.policy's shades_of_gray followed
    by BT.601 weights, to its rounding."""
    from anodata.lesion import _luminance
    from anodata.policy import shades_of_gray

    rng = np.random.default_rng(5)
    img = (rng.random((20, 30, 3)) * np.array([200, 150, 100])).astype(np.uint8)  # a warm cast
    want = shades_of_gray(img).astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    got = _luminance(img)
    assert np.abs(got - want).max() <= 0.6 and np.ptp(got - want) > 0.01  # rounding only
    grey = img[:, :, 0]
    np.testing.assert_array_equal(_luminance(grey), grey.astype(np.float32))
