"""Bounded memory in decoding (issue 15, item 3): the 16-bit and alpha conversions work in
blocks of rows and give exactly the pixels of the plain formulas."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from stylegan.imageio import ImageRejected, open_image, to_8bit


def test_sixteen_bit_in_blocks_equals_value_shifted_by_8():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (600, 37), dtype=np.uint16)  # 600 rows: three blocks
    for raw in ("I;16", "I;16B"):
        img = Image.frombytes(raw, (37, 600), values.astype("<u2" if raw == "I;16" else ">u2")
                              .tobytes())
        out = np.asarray(to_8bit(img, 1))
        np.testing.assert_array_equal(out, (values.astype(np.int64) >> 8).astype(np.uint8))
    wide = Image.fromarray(values.astype(np.int32))  # mode 'I'
    np.testing.assert_array_equal(np.asarray(to_8bit(wide, 1)), values >> 8)
    with pytest.raises(ImageRejected, match="do not fit 16 bits"):
        to_8bit(Image.fromarray(np.full((3, 3), 70000, np.int32)), 1)


def test_alpha_in_blocks_equals_rounded_product():
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (530, 21, 4), dtype=np.uint8)
    expected = ((rgba[..., :3].astype(np.int64) * rgba[..., 3:] + 127) // 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(to_8bit(Image.fromarray(rgba, "RGBA"), 3)),
                                  expected)
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    expected_la = (rgba[..., :1].astype(np.int64) * rgba[..., 3:] + 127) // 255
    np.testing.assert_array_equal(np.asarray(to_8bit(la, 3)),
                                  np.repeat(expected_la, 3, axis=2).astype(np.uint8))


def test_sixteen_bit_png_round_trip():
    values = np.arange(256 * 300, dtype=np.uint32).reshape(300, 256).astype(np.uint16) * 3
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    out = np.asarray(to_8bit(open_image(buf.getvalue()), 1))
    np.testing.assert_array_equal(out, values >> 8)
