"""Every number of the method grammar is bounded (issue 19, item 5): SIGMA of residual:smax, K
of knn, kappa of izif (also the plain izif's kappa), the D layers; a name out of bounds is one
sentence on the command line and in detector.json, before anything is allocated."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from anomaly.methods import detector as det
from anomaly.methods import registry
from anomaly.cli import main
from anomaly.model.ano_model import resolve_izif
from stylegan.errors import UserError

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "ham64-cpu"


@pytest.mark.parametrize("name, words", [
    ("residual:smax:1e7", "SIGMA 1e+07 must lie in (0, 64]"),
    ("residual:smax:0", "SIGMA 0 must lie"),
    ("residual:smax:" + "9" * 400, "SIGMA inf must lie"),
    ("knn-latent:0", "K 0 must lie in [1, 1000]"),
    ("knn-latent:1001", "K 1001 must lie"),
    ("knn-latent:" + "9" * 5000, "must lie in [1, 1000]"),
    ("knn-dfeat:b8:5000", "K 5000 must lie"),
    ("izif:1e7", "kappa 1e+07 must lie in [0, 1e+06]"),
    ("izif:1e400", "kappa inf must lie"),
    ("dfeat-res:b8+b8", "each once"),
    ("dfeat-res:b8+b16+b32+b64+b128+b256+b512+b1024+b2048", "it names 9 layers"),
    ("dfeat-res:b12", "the layer b12 is not a D block"),
    ("maha-dfeat:b" + "8" * 5000, "is not a D block"),
])
def test_numbers_out_of_bounds_are_refused(name, words):
    with pytest.raises(UserError) as refused:
        registry.parse(name)
    text = str(refused.value)
    assert words in text and text.count(". ") == 0 and text.endswith("."), text


def test_numbers_at_the_bounds_are_accepted():
    assert registry.parse("residual:smax:64").sigma == 64.0
    assert registry.parse("knn-latent:1000").k == 1000
    assert registry.parse("izif:1e6:b16").kappa == 1e6
    assert registry.parse("dfeat-res:b8+b16+b32+b64").layers == ("b8", "b16", "b32", "b64")


def test_sigma_is_held_to_half_the_model_resolution():
    model = SimpleNamespace(resolution=16, kappa=0.0, feature_layer="b8", D=None)
    assert det.needs_of(["residual:smax:8"], model).aggs == {("smax", 8.0)}
    with pytest.raises(UserError, match=r"half of the model's 16 px images; give SIGMA <= 8\."):
        det.needs_of(["residual:smax:8.5"], model)


@pytest.mark.parametrize("kappa", [float("nan"), float("inf"), -1.0, 2e6, "1e30"])
def test_the_plain_izif_kappa_is_bounded(kappa):
    with pytest.raises(UserError, match="must be a number in"):
        resolve_izif(kappa if kappa != "1e30" else None, None, scored_with={},
                     trained={"kappa": kappa})
    assert resolve_izif(None, None, scored_with={}, trained={"kappa": "1e6"})[0] == 1e6


def test_bounds_hold_in_detector_json(tmp_path):
    body = json.loads((SHIPPED / "detector.json").read_text())
    body["configuration"][0]["method"] = body["method"] = "residual:smax:1e7"
    (tmp_path / "detector.json").write_text(json.dumps(body))
    with pytest.raises(UserError) as refused:
        det.Detector.load(tmp_path / "detector.json")
    text = str(refused.value)
    assert "configuration.0.method" in text and "SIGMA 1e+07" in text and "\n" not in text


def test_bounds_hold_on_the_command_line(tmp_path):
    result = CliRunner().invoke(main, ["score", "--model", str(SHIPPED), "--data",
                                       str(tmp_path / "val.zip"), "--methods",
                                       "residual:smax:1e7", "--outdir", str(tmp_path / "out"),
                                       "--device", "cpu"])
    assert result.exit_code == 1 and "SIGMA 1e+07 must lie in (0, 64]" in result.output
    assert "Traceback" not in result.output
