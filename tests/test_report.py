"""HTML report: every PNG linked (also in sub-folders), all text escaped, no external resources."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from anomaly.evaluation import report
from stylegan.errors import UserError

EVIL = '<script>alert("x")</script>'


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.scripts = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.scripts += tag == "script"
        self.links += [v for k, v in attrs if k in ("href", "src") and v and not v.startswith("#")]

    def handle_data(self, data):
        self.text.append(data)


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(path)


@pytest.fixture
def graphics(tmp_path) -> Path:
    g = tmp_path / "graphics"
    names = ["roc_all.png", "tsne_latent.png", "extra plot.png", "heatmaps/ISIC_1 (mel).png",
             "heatmaps/deep/x&y.png", f"roc_{'izif'}.png", "pr_izif.png", "violin_izif.png",
             "confusion_izif.png", "report_izif.png", "roc_knn-pixels.png"]
    for name in names:
        _png(g / name)
    (g / ".roc_tmp.png.123.tmp").write_bytes(b"partial")  # an atomic write in progress
    rows = [{"method": "izif", "comparison": f"nv vs {EVIL}", "auc": 0.9, "auc_ci_low": 0.8,
             "auc_ci_high": 0.95, "average_precision": 0.7, "threshold": 0.123456,
             "threshold_rule": "youden (val)", "sensitivity": 0.8, "specificity": 0.7,
             "precision": 0.6, "f1": 0.65, "sens_at_val_spec": 0.4, "n_normal": 10,
             "n_anomaly": 5},
            {"method": "knn-pixels", "comparison": f"nv vs {EVIL}", "auc": 0.6,
             "auc_ci_low": None, "auc_ci_high": None}]
    (g / "summary.json").write_text(json.dumps({"options": {"normal_class": EVIL},
                                                "rows": rows, "notes": [EVIL]}))
    (g / "summary.xlsx").write_bytes(b"x")
    return g


def test_every_png_is_linked(graphics):
    page = report.write_report(report.ReportOptions(graphics))
    assert page == graphics / "index.html"
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    linked = {unquote(link) for link in parser.links}
    pngs = {p.relative_to(graphics).as_posix() for p in graphics.rglob("*.png")}
    assert len(pngs) == 11 and pngs <= linked
    for link in linked:  # relative, resolvable, no internet
        assert not re.match(r"^[a-z]+:", link) and not link.startswith("/")
        assert (graphics / link).is_file()
    assert "summary.xlsx" in linked


def test_text_is_escaped_and_page_is_self_contained(graphics):
    page = report.write_report(report.ReportOptions(graphics, title=f"Run {EVIL}"))
    text = page.read_text(encoding="utf-8")
    parser = _Links()
    parser.feed(text)
    assert parser.scripts == 0 and "<script" not in text
    assert "&lt;script&gt;" in text
    assert EVIL in "".join(parser.text)  # shown to the reader as plain text
    assert "http://" not in text and "https://" not in text and "<link" not in text


def test_page_order_and_summary(graphics):
    text = report.write_report(report.ReportOptions(graphics)).read_text(encoding="utf-8")
    order = [text.index(s) for s in ('id="summary"', 'id="overview"', 'id="method-izif"',
                                     'id="method-knn-pixels"', 'id="tsne"', 'id="folder-heatmaps"',
                                     'id="downloads"')]
    assert order == sorted(order)
    section = text[text.index('id="method-izif"'):text.index('id="method-knn-pixels"')]
    kinds = [section.index(f"{k}_izif.png") for k in ("roc", "pr", "confusion", "violin", "report")]
    assert kinds == sorted(kinds)
    assert "0.900 [0.800, 0.950]" in text and "0.1235" in text


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--graphics"):
        report.write_report(report.ReportOptions(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No figures found" in report.write_report(report.ReportOptions(empty)).read_text()


def test_report_command(graphics):
    from click.testing import CliRunner

    from anomaly.cli import main

    result = CliRunner().invoke(main, ["report", "--graphics", str(graphics), "--title", "Run 1"])
    assert result.exit_code == 0, result.output
    assert "index.html" in result.output and (graphics / "index.html").is_file()
    bad = CliRunner().invoke(main, ["report", "--graphics", str(graphics / "missing")])
    assert bad.exit_code == 1 and "--graphics" in bad.output and "Traceback" not in bad.output


def test_summary_shows_primary_pairs_operating_points_and_subgroups(tmp_path):
    g = tmp_path / "g"
    g.mkdir()
    rows = [{"method": "izif", "role": "primary", "comparison": "nv vs mel", "auc": 0.81,
             "auc_ci_low": 0.75, "auc_ci_high": 0.86, "average_precision": 0.6, "ap_ci_low": 0.5,
             "ap_ci_high": 0.7, "auc_diff": 0.052, "auc_diff_ci_low": 0.011,
             "auc_diff_ci_high": 0.09, "p_value": 0.012, "paired_test": "group bootstrap",
             "earns_keep": "yes", "threshold": 1.5, "threshold_rule": "youden (val)",
             "sensitivity": 0.7, "sensitivity_ci_low": 0.61, "sensitivity_ci_high": 0.79,
             "valspec_threshold": 2.25, "sens_at_val_spec": 0.4, "n_groups": 77,
             "ci_unit": "lesion"},
            {"method": "knn-pixels", "role": "baseline (best on val)", "comparison": "nv vs mel",
             "auc": 0.758}]
    subgroups = [{"method": "izif", "role": "primary", "by": "dx_type", "value": EVIL,
                  "scope": "normals", "comparison": "nv[dx_type=histo] vs mel", "auc": 0.7,
                  "auc_ci_low": 0.6, "auc_ci_high": 0.8, "n_normal": 5, "n_anomaly": 4,
                  "n_groups": 8}]
    (g / "summary.json").write_text(json.dumps({"split": "test", "primary": "izif",
                                                "best_baseline": "knn-pixels", "rows": rows,
                                                "subgroups": subgroups, "notes": []}))
    text = report.write_report(report.ReportOptions(g)).read_text(encoding="utf-8")
    assert "Primary method: <b>izif</b>" in text and "Best baseline (on validation): <b>knn-pixels"\
        in text
    assert "+0.052 [0.011, 0.090]" in text and "0.012" in text and "group bootstrap" in text
    assert "0.700 [0.610, 0.790]" in text and "2.2500" in text  # operating point with its CI
    assert "nv[dx_type=histo] vs mel" in text and "&lt;script&gt;" in text and "<script" not in text
    assert text.index(">izif<") < text.index(">knn-pixels<")
    assert '<tr class="baseline">' in text
