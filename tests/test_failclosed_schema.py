"""detector.json and checkpoint metadata are checked by one schema per file format (issue 19,
item 6): a wrong type, a non-finite or unsorted list, an unknown name or an inconsistent
combination is one sentence naming the file and the field; the shipped files still load."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from anomaly.methods.detector import Detector
from stylegan.errors import UserError

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "ham64-cpu"


@pytest.fixture(scope="module")
def shipped() -> dict:
    return json.loads((SHIPPED / "detector.json").read_text())


def rank_average(body: dict) -> dict:
    """The shipped detector turned into a valid two-component rank average."""
    body = copy.deepcopy(body)
    ref = body["val_normal_scores"]
    body["configuration"] = [{"method": "sklearn:manhattan", "tta": False, "reference": ref},
                             {"method": "residual:mean", "tta": False, "reference": ref}]
    body["combine"] = "rank-average"
    body["method"] = "rank-average(sklearn:manhattan + residual:mean)"
    return body


def load(tmp_path, body) -> Detector:
    path = tmp_path / "detector.json"
    path.write_text(json.dumps(body))
    return Detector.load(path)


def refused(tmp_path, body) -> str:
    with pytest.raises(UserError) as caught:
        load(tmp_path, body)
    text = str(caught.value)
    assert text.endswith(".") and "\n" not in text and "detector.json" in text, text
    return text


def test_the_shipped_detector_and_a_rank_average_load(tmp_path, shipped):
    det = load(tmp_path, shipped)
    assert det.threshold == shipped["threshold"] and det.combine == "single"
    assert det.val_normals == tuple(shipped["val_normal_scores"]) and det.tta is False
    assert det.extra["val_auc"] == shipped["val_auc"]
    avg = load(tmp_path, rank_average(shipped))
    assert [c.name for c in avg.components] == ["sklearn:manhattan", "residual:mean"]


@pytest.mark.parametrize("field, value, words", [
    ("threshold", True, "threshold"),
    ("threshold", "1070", "threshold"),
    ("tta", "false", "tta"),
    ("val_normal_scores", "12345", "val_normal_scores"),
    ("val_normal_scores", [3.0, 1.0, 2.0], "val_normal_scores: the validation scores must be "
                                          "sorted"),
    ("val_normal_scores", [], "val_normal_scores"),
    ("bank", 3, "bank"),
    ("bank", ["bank.safetensors"], "bank"),
    ("bank", {"x": 1}, "bank"),
    ("bank", "../elsewhere/bank.safetensors", "bank"),
    ("combine", "median", "combine"),
    ("kappa", -1.0, "kappa"),
    ("feature_layer", 8, "feature_layer"),
    ("network_sha256", "abc", "network_sha256"),
    ("configuration", [], "configuration"),
    ("configuration", [{"method": "sklearn:manhattan", "tta": "no"}], "configuration.0.tta"),
    ("configuration", [{"method": "sklearn:nosuch", "tta": False}], "configuration.0.method"),
    ("configuration", [{"method": "sklearn:manhattan", "tta": False},
                       {"method": "residual:mean", "tta": False}], "combine 'single' needs "
                                                                     "exactly one component"),
])
def test_a_bad_field_is_named(tmp_path, shipped, field, value, words):
    body = dict(shipped, **{field: value})
    if field == "configuration" and len(value) == 1:  # the method name follows the component
        body["method"] = value[0]["method"]
    assert words in refused(tmp_path, body)


def test_nan_in_a_rank_average_reference_and_mismatched_names(tmp_path, shipped):
    body = rank_average(shipped)
    body["configuration"][1]["reference"] = [1.0, float("nan"), 3.0]
    assert "configuration.1.reference.1" in refused(tmp_path, body)
    body = rank_average(shipped)
    body["configuration"][0]["reference"] = [3.0, 1.0]
    assert "the reference must be sorted" in refused(tmp_path, body)
    body = rank_average(shipped)
    del body["configuration"][1]["reference"]
    assert "each with its reference" in refused(tmp_path, body)
    body = rank_average(shipped)
    body["tta"] = True
    assert "tta True disagrees" in refused(tmp_path, body)
    body = dict(shipped, method="residual:mean")
    assert "disagrees with the configuration" in refused(tmp_path, body)


# ------------------------------------------------------------------------------ checkpoints


def metadata_of(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def rewrite(path, metadata) -> None:
    save_file(load_file(str(path)), str(path), metadata=metadata)


@pytest.fixture
def encoder_file(tmp_path):
    from encoder_helpers import tiny_encoder, tiny_networks

    from anomaly.model.encoder_io import save_encoder

    G, _D = tiny_networks()
    path = tmp_path / "encoder.safetensors"
    save_encoder(path, tiny_encoder(G), extra={"network": {"path": "net.safetensors",
                                                           "sha256": "0" * 64}})
    return path


@pytest.fixture
def network_file(tmp_path):
    from encoder_helpers import tiny_networks

    from stylegan.checkpoint import save_networks

    G, D = tiny_networks()
    return save_networks(tmp_path / "net", G_ema=G, D=D)


def _encoder_body(path) -> dict:
    return json.loads(metadata_of(path)["anostyle"])


@pytest.mark.parametrize("change, words", [
    (lambda m, b: m.pop("anostyle"), "anostyle"),
    (lambda m, b: m.update(anostyle="{not json"), "is not valid JSON"),
    (lambda m, b: m.update(format_version="one"), "format_version"),
    (lambda m, b: m.update(anostyle=json.dumps(dict(b, extra={"network": "net.safetensors"}))),
     "extra.network"),
    (lambda m, b: m.update(anostyle=json.dumps(dict(b, config=dict(b["config"],
                                                                    img_resolution="16")))),
     "img_resolution"),
    (lambda m, b: m.update(anostyle=json.dumps(dict(b, config=dict(b["config"],
                                                                    latent="zplus")))),
     "latent"),
    (lambda m, b: m.update(anostyle=json.dumps(dict(b, config=dict(b["config"], w_dim=10**9)))),
     "w_dim"),
    (lambda m, b: m.update(anostyle=json.dumps(dict(b, config=[1, 2]))), "config"),
    (lambda m, b: m.update(anostyle=json.dumps(
        dict(b, extra={"training_options": {"kappa": "nan"}}))), "kappa"),
])
def test_bad_encoder_metadata_is_one_sentence(encoder_file, change, words):
    from anomaly.model.encoder_io import load_encoder

    metadata = metadata_of(encoder_file)
    change(metadata, _encoder_body(encoder_file))
    rewrite(encoder_file, metadata)
    with pytest.raises(UserError) as caught:
        load_encoder(encoder_file)
    text = str(caught.value)
    assert words in text and "encoder.safetensors" in text and "\n" not in text, text


@pytest.mark.parametrize("change, words", [
    (lambda b: dict(b, configs=dict(b["configs"], G_ema=dict(b["configs"]["G_ema"],
                                                             img_resolution=63))),
     "img_resolution"),
    (lambda b: dict(b, configs=dict(b["configs"], G_ema=dict(b["configs"]["G_ema"],
                                                             architecture="dense"))),
     "architecture"),
    (lambda b: dict(b, configs=dict(b["configs"], G_ema=dict(b["configs"]["G_ema"],
                                                             use_noise="yes"))),
     "use_noise"),
    (lambda b: dict(b, configs="G"), "configs"),
    (lambda b: dict(b, extra=[]), "extra"),
])
def test_bad_network_metadata_is_one_sentence(network_file, change, words):
    from stylegan.checkpoint import load_network

    metadata = metadata_of(network_file)
    metadata["anostyle"] = json.dumps(change(json.loads(metadata["anostyle"])))
    rewrite(network_file, metadata)
    with pytest.raises(UserError) as caught:
        load_network(network_file)
    text = str(caught.value)
    assert words in text and "net.safetensors" in text and "\n" not in text, text


def test_the_shipped_checkpoints_still_load():
    from anomaly.model.encoder_io import load_encoder
    from stylegan.checkpoint import load_network

    nets = load_network(SHIPPED / "network.safetensors")
    assert nets["G_ema"].img_resolution == 64
    E, extra = load_encoder(SHIPPED / "encoder.safetensors")
    assert E.img_resolution == 64 and len(extra["network"]["sha256"]) == 64


def test_the_model_folder_policy_reader_uses_the_same_schemas(tmp_path, network_file):
    import shutil

    from anodata.modelpolicy import read_model_policy

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(network_file, folder / "network.safetensors")
    assert read_model_policy(folder).policy.resolution == 16
    metadata = metadata_of(folder / "network.safetensors")
    body = json.loads(metadata["anostyle"])
    body["configs"]["G_ema"]["img_resolution"] = "16"
    metadata["anostyle"] = json.dumps(body)
    rewrite(folder / "network.safetensors", metadata)
    with pytest.raises(UserError, match="img_resolution"):
        read_model_policy(folder)
    metadata["anostyle"] = json.dumps(dict(body, configs="G"))
    rewrite(folder / "network.safetensors", metadata)
    with pytest.raises(UserError, match="bad field configs"):
        read_model_policy(folder)
