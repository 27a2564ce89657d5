"""Untrusted JSON (dataset.json, detector.json, prepare.json, checkpoint metadata) within limits
(issue 19, item 7): a 5,000-digit number, an integer beyond int64 or arrays nested 100,000 deep
are one sentence, not ValueError / OverflowError / RecursionError."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from stylegan.errors import UserError
from stylegan.fileio import MAX_JSON_DEPTH, UntrustedJSONError, loads_untrusted

HUGE_DIGITS = "9" * 5000
DEEP = "[" * 100_000 + "]" * 100_000


def test_limits_of_the_loader():
    assert loads_untrusted('{"a": [1, 2.5, "[[[{{{"], "b": -9223372036854775808}') == \
        {"a": [1, 2.5, "[[[{{{"], "b": -2**63}
    assert loads_untrusted(str(2**63 - 1)) == 2**63 - 1
    nested = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert loads_untrusted(nested.encode()) == json.loads(nested)
    for text, words in [(HUGE_DIGITS, "5000 digits"), (str(10**30), "beyond the 64-bit range"),
                        (str(2**63), "beyond the 64-bit range"),
                        ("[" + "1" * 300 + ".5]", "a number of 302 characters"),
                        (DEEP, f"deeper than {MAX_JSON_DEPTH} levels"),
                        ("[" * 65 + "]" * 65, "deeper than"), ("{x", "not valid JSON"),
                        (b"\xff", "not UTF-8")]:
        with pytest.raises(UntrustedJSONError, match=words):
            loads_untrusted(text)


def write_zip(path, dataset_json: str) -> str:
    with zipfile.ZipFile(path, "w") as z:
        for name in ("a.png", "b.png"):
            with z.open(name, "w") as f:
                Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(f, format="PNG")
        z.writestr("dataset.json", dataset_json)
    return str(path)


@pytest.mark.parametrize("label, words", [(HUGE_DIGITS, "5000 digits"),
                                          (str(10**30), "beyond the 64-bit range"),
                                          (DEEP, "deeper than")])
def test_dataset_json_labels_beyond_the_limits(tmp_path, label, words):
    from stylegan.dataset import ImageDataset

    path = write_zip(tmp_path / "d.zip", '{"labels": [["a.png", 0], ["b.png", %s]]}' % label)
    with pytest.raises(UserError) as refused:
        ImageDataset(path)
    text = str(refused.value)
    assert words in text and "dataset.json" in text and "\n" not in text, text


@pytest.mark.parametrize("value, words", [(HUGE_DIGITS, "5000 digits"), (DEEP, "deeper than")])
def test_detector_and_prepare_json_beyond_the_limits(tmp_path, value, words):
    from anodata.policy import read_prepare_json
    from anomaly.methods.detector import Detector

    body = '{"format": "anostyle-detector", "version": 1, "tune": %s}' % value
    (tmp_path / "detector.json").write_text(body)
    with pytest.raises(UserError, match=words):
        Detector.load(tmp_path / "detector.json")
    (tmp_path / "prepare.json").write_text('{"options": %s}' % value)
    with pytest.raises(UserError, match=words):
        read_prepare_json(tmp_path / "train.zip")
