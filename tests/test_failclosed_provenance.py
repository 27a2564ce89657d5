"""Provenance without the absolute folders of the machine that made a file (issue 19, item 10):
tune records its inputs relative to the output folder, with the sha256 of val.zip and
train.zip; the shipped detector.json holds no absolute path."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "ham64-cpu"
ABSOLUTE = re.compile(r"^(/|[A-Za-z]:[\\/]|\\\\)")


def strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, str):
        yield value


def test_the_shipped_detector_records_no_absolute_path():
    body = json.loads((SHIPPED / "detector.json").read_text())
    assert [s for s in strings(body) if ABSOLUTE.match(s)] == []
    # relative to the model folder, and the very files the detector pairs with
    from stylegan.fileio import sha256_file

    assert body["tune"]["outdir"] == "."
    assert sha256_file(SHIPPED / body["tune"]["network"]) == body["network_sha256"]
    assert sha256_file(SHIPPED / body["tune"]["encoder"]) == body["encoder_sha256"]
    options = json.loads((SHIPPED / "encoder_options.json").read_text())["options"]
    assert [s for s in strings(options) if ABSOLUTE.match(s)] == [] and options["outdir"] == "."
    assert sha256_file(SHIPPED / options["network"]) == body["network_sha256"]


def test_tune_records_inputs_relative_to_its_output_folder(tmp_path):
    from anomaly.scoring.tune import TuneOptions, provenance

    data = tmp_path / "prepared" / "val.zip"
    data.parent.mkdir()
    data.write_bytes(b"val")
    (data.parent / "train.zip").write_bytes(b"train")
    network = tmp_path / "models" / "net.safetensors"
    network.parent.mkdir()
    network.write_bytes(b"net")
    outdir = tmp_path / "runs" / "tuned"
    record = provenance(TuneOptions(data=str(data), outdir=str(outdir), network=str(network),
                                    encoder=str(network)), outdir)
    assert record["data"] == "../../prepared/val.zip"
    assert record["train"] == "../../prepared/train.zip"
    assert record["network"] == record["encoder"] == "../../models/net.safetensors"
    assert record["outdir"] == "." and record["model"] is None
    assert (outdir / record["network"]).resolve() == network.resolve()
    assert record["data_sha256"] == hashlib.sha256(b"val").hexdigest()
    assert record["train_sha256"] == hashlib.sha256(b"train").hexdigest()
    assert [s for s in strings(record) if ABSOLUTE.match(s)] == []
