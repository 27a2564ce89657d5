"""Simulated acquisition shifts (anodata/shifts.py): zoom both ways against hand-built images,
the painted border, exposure, the parser and the seeded per-class halves."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from anodata.shifts import Shift, parse_shifts, shifted_halves, zoom


def _stripes(w: int = 40, h: int = 30) -> Image.Image:
    """Column index encoded in red, row index in green: where a pixel came from is readable."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[..., 0] = np.arange(w)[None, :] * 6
    a[..., 1] = np.arange(h)[:, None] * 8
    return Image.fromarray(a)


def test_zoom_in_is_the_enlarged_centre_crop():
    img = _stripes()
    out = np.asarray(zoom(img, 2.0)).astype(int)
    assert out.shape == (30, 40, 3)
    # 2x: the centre 20 x 15 (columns 10..29, rows 7.5..22.5) fills the frame; pixel j of the
    # output samples source column 10 + (j + 0.5) / 2 - 0.5
    want_col = (10 + (np.arange(40) + 0.5) / 2 - 0.5) * 6
    assert np.abs(out[15, 3:-3, 0] - want_col[3:-3]).max() <= 2
    want_row = (7.5 + (np.arange(30) + 0.5) / 2 - 0.5) * 8
    assert np.abs(out[3:-3, 20, 1] - want_row[3:-3]).max() <= 2


def test_zoom_out_shrinks_the_image_and_mirrors_it_into_the_margin():
    a = np.zeros((40, 40, 3), dtype=np.uint8)
    a[:, :20] = 200  # left half bright, right half dark
    out = np.asarray(zoom(Image.fromarray(a), 0.5)).astype(int)
    assert out.shape == (40, 40, 3)
    # shrunk to 20 x 20 in columns/rows 10..29: bright in 10..19, dark in 20..29
    assert (out[:, 11:19] > 190).all() and (out[:, 21:29] < 10).all()
    # reflected margins (no flat frame): out[10 - k] = out[10 + k], out[29 + k] = out[29 - k]
    assert (out[:, 2:9] > 190).all() and (out[:, 30:37] < 10).all()
    assert np.array_equal(out[:, :10], out[:, 20:10:-1])
    assert np.array_equal(out[:, 30:], out[:, 28:18:-1])
    assert np.array_equal(out[:10], out[20:10:-1]) and np.array_equal(out[30:], out[28:18:-1])
    grey = Image.fromarray(a[..., 0])
    assert np.asarray(zoom(grey, 0.75)).shape == (40, 40)
    assert np.array_equal(np.asarray(zoom(grey, 1.0)), a[..., 0])


def test_border_and_exposure():
    img = Image.fromarray(np.full((60, 80, 3), 180, dtype=np.uint8))
    painted = np.asarray(Shift("border", 1.0).apply(img)).astype(int)
    assert (painted[0, 0] == [8, 6, 6]).all() and (painted[30, 40] == 180).all()
    assert (painted[30, 0] == [8, 6, 6]).all()  # outside the centred 60 px circle
    darker = np.asarray(Shift("exposure", 0.5).apply(img))
    assert (darker == 90).all()


def test_parse_shifts_names_and_refuses():
    shifts = parse_shifts("border:1, exposure:0.7,zoom:0.75,zoom:1.33,zoom:1.33")
    assert [s.name for s in shifts] == ["border:1", "exposure:0.7", "zoom:0.75", "zoom:1.33"]
    for bad in ("zoom", "zoom:-1", "zoom:0", "blur:2", ""):
        with pytest.raises(ValueError):
            parse_shifts(bad)


def test_shifted_halves_are_seeded_and_per_class():
    labels = np.array([0] * 11 + [1] * 6, dtype=bool)
    a = shifted_halves(labels, 0.5, seed=3)
    assert a.dtype == bool and a[~labels].sum() == round(5.5) and a[labels].sum() == 3
    assert np.array_equal(a, shifted_halves(labels, 0.5, seed=3))
    assert not np.array_equal(a, shifted_halves(labels, 0.5, seed=4))
    assert shifted_halves(labels, 0.0).sum() == 0 and shifted_halves(labels, 1.0).all()


def test_the_acquisition_bench_counts_the_squares_that_framing_cuts_down():
    """bench/acquisition.py's square_cut_down: a lesion whose square asks for more than the
    policy's lesion_max_side (here 1.875 short sides) is counted, a small one is not; a zoom
    in makes the small one's square larger but not past the limit."""
    from anodata.policy import Preprocessing, wanted_side
    from bench import acquisition as bench

    def photo(radius):
        yy, xx = np.mgrid[0:120, 0:160]
        img = np.full((120, 160, 3), 200, np.uint8)
        img[np.hypot(xx - 80, yy - 60) < radius] = (90, 60, 50)
        return Image.fromarray(img)

    mask = np.zeros((80, 100), bool)
    mask[20:60, 0:100] = True
    assert wanted_side(mask) == pytest.approx(100 * 1.5 / 80)
    images, y = [photo(50), photo(20), photo(20)], np.array([0, 0, 1])
    policy = Preprocessing(resolution=32, framing="lesion")
    got = bench.cut_down(images, policy, y)
    assert got["normal"]["share"] == 0.5 and got["anomaly"]["share"] == 0.0
    assert got["normal"]["n"] == 2 and got["anomaly"]["median_side"] == pytest.approx(
        40 * 1.5 / 120, abs=0.03)
    wide = bench.cut_down(images, Preprocessing(resolution=32, framing="lesion",
                                                lesion_max_side=2.0), y)
    assert wide["normal"]["share"] == 0.0
    zoomed = bench.cut_down([zoom(img, 1.33) for img in images], policy, y)
    assert zoomed["anomaly"]["median_side"] == pytest.approx(1.33 * 0.5, abs=0.04)
