"""dataset.json that does not describe its dataset is refused with one sentence (issue 15,
item 6), and training a GAN on a handful of images warns."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from stylegan.dataset import ImageDataset
from stylegan.errors import UserError
from stylegan.options import TrainFlags, few_images_warning, run_from_flags


def write_zip(path, labels, names=("a.png", "b.png")) -> str:
    with zipfile.ZipFile(path, "w") as z:
        for name in names:
            img = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
            with z.open(name, "w") as f:
                img.save(f, format="PNG")
        z.writestr("dataset.json", json.dumps({"labels": labels}))
    return str(path)


@pytest.mark.parametrize("labels, message", [
    ({"a.png": 0}, "has 'labels' of type dict"),
    ("a.png 0", "has 'labels' of type str"),
    ([[1, 2, 3]], "has the label entry [1, 2, 3], not a [name, label] pair"),
    ([["a.png", 0], "b.png"], 'has the label entry "b.png", not a [name, label] pair'),
    ([["a.png", 0], ["b.png", 1], ["c.png", 1]], "lists 1 image that the dataset does not hold "
                                                 "(first: c.png)"),
    ([["a.png", 0], ["b.png", 1], ["../../evil.png", 1]], "names '../../evil.png', which lies "
                                                          "outside the dataset"),
    ([["a.png", 0], ["b.png", 1], ["a.png", 1]], "lists a.png twice"),
])
def test_bad_labels_are_one_sentence(tmp_path, labels, message):
    path = write_zip(tmp_path / "d.zip", labels)
    with pytest.raises(UserError) as refused:
        ImageDataset(path)
    text = str(refused.value)
    assert message in text and text.endswith(".") and "\n" not in text, text


def test_good_labels_still_load(tmp_path):
    dataset = ImageDataset(write_zip(tmp_path / "d.zip", [["a.png", 0], ["b.png", 1]]))
    assert dataset.labels.tolist() == [0, 1]
    assert ImageDataset(write_zip(tmp_path / "n.zip", None)).has_labels is False
    unlabelled = ImageDataset(write_zip(tmp_path / "u.zip", {"x": 1}), use_labels=False)
    assert len(unlabelled) == 2  # train-gan ignores labels


def test_train_gan_on_one_image_warns(tmp_path, monkeypatch):
    import stylegan.train

    data = write_zip(tmp_path / "one.zip", None, names=("only.png",))
    (tmp_path / "one.zip").unlink()
    with zipfile.ZipFile(tmp_path / "one.zip", "w") as z:
        with z.open("only.png", "w") as f:
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(f, format="PNG")
    echoed, trained = [], []
    monkeypatch.setattr(stylegan.train, "train", lambda opts, **kw: trained.append(opts))
    run_from_flags(TrainFlags(outdir=str(tmp_path / "runs"), data=data, cfg="cpu"),
                   echo=echoed.append)
    assert len(trained) == 1  # it warns, then trains as asked
    warning = next(line for line in echoed if line.startswith("warning:"))
    assert "holds only 1 image;" in warning
    assert few_images_warning(5000, "x.zip") == ()
