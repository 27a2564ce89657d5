"""One self-contained HTML page (graphics/index.html) showing every figure and the summary table.

No internet is needed to view it: inline CSS, no scripts, images linked by relative paths, so the
folder can be zipped, moved or opened from a USB stick. Every piece of text that comes from
files (class and method names, file names, notes) is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from stylegan.errors import UserError
from stylegan.fileio import atomic_write_bytes

BASELINES = ("knn-pixels", "knn-colour")  # shown grey also in summaries without a role column
# anomaly.evaluation.evaluate.REFERENCE_ROLE (no import: light)
REFERENCE_ROLE = "reference (uses labels)"
REFERENCE_TEXT = (
    "The reference is a supervised classifier trained on the labels of the validation split "
    "(its setting chosen by cross-validation inside validation), scored on the same test images. "
    "The unsupervised detector is not required to beat it: it shows what the labels buy where "
    "labels exist. The unsupervised route is for what labels do not cover: rare or unseen "
    "anomalies, or no labels at all.")
KINDS = ("roc", "pr", "confusion", "violin", "report")  # per-method figures, in page order
KIND_TITLES = {"roc": "ROC", "pr": "Precision-recall", "confusion": "Confusion",
               "violin": "Scores by class", "report": "Classification report"}
DOWNLOADS = (".xlsx", ".json", ".csv")
_METHOD_FIGURE = re.compile(r"^(%s)_(.+)\.png$" % "|".join(KINDS))

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #1f2933; background: #f5f7fa; }
header { background: #243b53; color: white; padding: 18px 32px; }
header h1 { margin: 0; font-size: 1.6em; } header p { margin: 4px 0 0; opacity: 0.8; }
nav { padding: 8px 32px; background: #d9e2ec; } nav a { margin-right: 14px; color: #243b53; }
main { padding: 8px 32px 40px; }
section { background: white; border-radius: 8px; padding: 12px 20px 20px; margin: 18px 0;
          box-shadow: 0 1px 3px rgba(0,0,0,0.12); }
h2 { border-bottom: 2px solid #d9e2ec; padding-bottom: 4px; } h3 { margin: 18px 0 6px; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; flex: 1 1 420px; max-width: 640px; }
figure.wide { flex-basis: 100%; max-width: 1400px; }
figure img { width: 100%; border: 1px solid #d9e2ec; border-radius: 4px; background: white; }
figcaption { font-size: 0.85em; color: #52606d; word-break: break-all; }
table { border-collapse: collapse; font-size: 0.88em; }
th, td { border: 1px solid #d9e2ec; padding: 4px 8px; text-align: right; }
th { background: #e4ebf3; position: sticky; top: 0; } td.text { text-align: left; }
tr.baseline td { color: #7b8794; font-style: italic; } td.best { font-weight: bold; }
tr.reference td { color: #1d4e89; }
.table-wrap { overflow-x: auto; max-height: 70vh; }
ul.notes li { color: #8d2b0b; } code { background: #f0f4f8; padding: 1px 4px; }
"""


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _href(rel: Path) -> str:
    """A relative URL for a file below the graphics folder, escaped for an attribute."""
    return _esc(quote(rel.as_posix()))


def _figure(rel: Path, *, wide: bool = False) -> str:
    cls = ' class="wide"' if wide else ""
    return (f'<figure{cls}><a href="{_href(rel)}"><img src="{_href(rel)}" loading="lazy" '
            f'alt="{_esc(rel.as_posix())}"></a><figcaption>{_esc(rel.as_posix())}</figcaption>'
            f"</figure>")


def _section(anchor: str, title: str, body: str) -> tuple[str, str, str]:
    """(anchor, title, body HTML) of one page section; rendered by build_page."""
    return anchor, title, body


def _grid(figures: list[Path], *, wide: bool = False) -> str:
    return '<div class="grid">' + "".join(_figure(p, wide=wide) for p in figures) + "</div>"


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _esc(value)


def _ci(row: dict, key: str) -> str:
    """' [low, high]' of a CI stored as <key>_ci_low/<key>_ci_high, or ''."""
    low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)):
        return ""
    return f" [{_number(low)}, {_number(high)}]"


def _is_baseline(row: dict) -> bool:
    return str(row.get("role", "")).startswith("baseline") or row.get("method") in BASELINES


def _is_reference(row: dict) -> bool:
    return row.get("role") == REFERENCE_ROLE


def _html_table(head: tuple[str, ...], rows: list[dict], cells) -> str:
    """A table with one row per record; `cells(record)` gives (html text, css class) pairs."""
    lines = ["<div class=\"table-wrap\"><table><thead><tr>"
             + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        css = (' class="baseline"' if _is_baseline(r) else
               ' class="reference"' if _is_reference(r) else "")
        lines.append(f"<tr{css}>" + "".join(f'<td class="{c}">{t}</td>' for t, c in cells(r))
                     + "</tr>")
    lines.append("</tbody></table></div>")
    return "".join(lines)


def summary_table(rows: list[dict]) -> str:
    """Methods x comparisons: role, AUC and AP with CIs, paired test vs the best baseline;
    the best AUC of each comparison in bold."""
    best: dict[str, float] = {}
    for r in rows:
        if isinstance(r.get("auc"), (int, float)) and not _is_reference(r):
            best[r.get("comparison")] = max(best.get(r.get("comparison"), -1.0), r["auc"])
    head = ("method", "role", "comparison", "AUC [95% CI]", "AP [95% CI]",
            "vs best baseline: dAUC [95% CI]", "p", "test", "earns its keep", "n normal",
            "n anomaly", "n lesions", "CI unit")

    def cells(r: dict):
        is_best = r.get("auc") is not None and r.get("auc") == best.get(r.get("comparison"))
        diff = ""
        if isinstance(r.get("auc_diff"), (int, float)):
            diff = f"{r['auc_diff']:+.3f}{_ci(r, 'auc_diff')}"
        p = r.get("p_value")
        return [(_esc(r.get("method", "")), "text"), (_esc(r.get("role", "")), "text"),
                (_esc(r.get("comparison", "")), "text"),
                (f"{_number(r.get('auc'))}{_ci(r, 'auc')}", "best" if is_best else ""),
                (f"{_number(r.get('average_precision'))}{_ci(r, 'ap')}", ""),
                (diff, ""), (f"{p:.3g}" if isinstance(p, (int, float)) else "", ""),
                (_esc(r.get("paired_test") or ""), "text"),
                (_esc(r.get("earns_keep") or ""), "text"),
                *((_number(r.get(k)), "") for k in ("n_normal", "n_anomaly", "n_groups")),
                (_esc(r.get("ci_unit", "")), "text")]
    return _html_table(head, rows, cells)


def operating_table(rows: list[dict]) -> str:
    """The validation-chosen operating points measured on the evaluated split, with CIs."""
    head = ("method", "comparison", "threshold", "rule", "sensitivity", "specificity",
            "precision", "F1", "val-normal 95th pct.", "sens. there", "spec. there")

    def cells(r: dict):
        return [(_esc(r.get("method", "")), "text"), (_esc(r.get("comparison", "")), "text"),
                (_number(r.get("threshold"), 4), ""), (_esc(r.get("threshold_rule", "")), "text"),
                *((f"{_number(r.get(k))}{_ci(r, k)}", "") for k in
                  ("sensitivity", "specificity", "precision", "f1")),
                (_number(r.get("valspec_threshold"), 4), ""),
                (f"{_number(r.get('sens_at_val_spec'))}{_ci(r, 'sens_at_val_spec')}", ""),
                (_number(r.get("spec_at_val_spec")), "")]
    return _html_table(head, rows, cells)


def subgroup_table(rows: list[dict]) -> str:
    """AUC with CI per subgroup; scope 'normals' restricts only the normal images."""
    head = ("method", "role", "by", "value", "scope", "comparison", "AUC [95% CI]", "n normal",
            "n anomaly", "n lesions")

    def cells(r: dict):
        return [*((_esc(r.get(k, "")), "text") for k in
                  ("method", "role", "by", "value", "scope", "comparison")),
                (f"{_number(r.get('auc'))}{_ci(r, 'auc')}", ""),
                *((_number(r.get(k)), "") for k in ("n_normal", "n_anomaly", "n_groups"))]
    return _html_table(head, rows, cells)


def _load_summary(folder: Path) -> dict:
    path = folder / "summary.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); re-run `anostyle evaluate`.") from None
    return data if isinstance(data, dict) else {}


def _group_pngs(folder: Path) -> dict[str, list[Path]]:
    """Relative PNG paths grouped: 'overview', 'method:<m>', 'tsne', '<subfolder>', 'other'."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*.png")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue  # temporary files of atomic writes, hidden folders
        match = _METHOD_FIGURE.match(rel.name) if len(rel.parts) == 1 else None
        if len(rel.parts) > 1:
            key = rel.parts[0]
        elif rel.name == "roc_all.png":
            key = "overview"
        elif "tsne" in rel.name.lower():
            key = "tsne"
        elif match:
            key = f"method:{match.group(2)}"
        else:
            key = "other"
        groups.setdefault(key, []).append(rel)
    return groups


def _method_section(method: str, figures: list[Path]) -> tuple[str, str, str]:
    order = {k: i for i, k in enumerate(KINDS)}
    figures = sorted(figures, key=lambda p: order[_METHOD_FIGURE.match(p.name).group(1)])
    body = "".join(_figure(p, wide=p.name.startswith("confusion_")) for p in figures)
    return _section(f"method-{method}", f"Method: {method}", f'<div class="grid">{body}</div>')


def _downloads(folder: Path) -> tuple[str, str, str] | None:
    files = sorted(p.relative_to(folder) for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in DOWNLOADS
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        return None
    items = "".join(f'<li><a href="{_href(p)}">{_esc(p.as_posix())}</a></li>' for p in files)
    return _section("downloads", "Sheets and data", f"<ul>{items}</ul>")


def _summary_section(summary: dict) -> tuple[str, str, str] | None:
    rows = [r for r in summary.get("rows", []) if isinstance(r, dict)]
    if not rows:
        return None
    split = summary.get("split") or "test"
    body = (f"<p>Evaluated split: <b>{_esc(split)}</b>. Primary method: "
            f"<b>{_esc(summary.get('primary') or 'none')}</b> (declared or chosen on validation "
            f"before {_esc(split)} was read); other methods are exploratory. Best baseline "
            f"(on validation): <b>{_esc(summary.get('best_baseline') or 'none')}</b>. A method "
            f"earns its keep when its AUC is higher than the best baseline's and the two-sided "
            f"paired p-value is below 0.05, and its own AUC's 95% CI lies above 0.5.</p>")
    methods = [r for r in rows if not _is_reference(r)]
    body += summary_table(methods) if methods else ""
    body += _reference_part([r for r in rows if _is_reference(r)], summary.get("reference"))
    body += "<h3>Operating points (thresholds chosen on validation)</h3>" + operating_table(rows)
    subgroups = [r for r in summary.get("subgroups", []) or [] if isinstance(r, dict)]
    if subgroups:
        body += ("<h3>Subgroups</h3><p>Scope 'normals': only the normal images are restricted "
                 "to the value, every anomaly stays; 'both': both classes restricted.</p>"
                 + subgroup_table(subgroups))
    notes = [n for n in summary.get("notes", []) if n]
    if notes:
        body += '<h3>Notes</h3><ul class="notes">' + "".join(
            f"<li>{_esc(n)}</li>" for n in notes) + "</ul>"
    options = summary.get("options") or {}
    if isinstance(options, dict) and options:
        body += "<h3>Options</h3><p>" + ", ".join(
            f"<code>{_esc(k)} = {_esc(v)}</code>" for k, v in options.items()) + "</p>"
    body += (f"<p>{_esc(split.capitalize())} split; CIs resample lesions when the sheets carry "
             f"a group column (see 'CI unit'). Bold: best AUC of a comparison (the reference "
             f"left out). Grey rows: baselines; blue rows: the reference (uses labels).</p>")
    return _section("summary", "Summary", body)


def _reference_part(rows: list[dict], entry) -> str:
    """The reference's rows apart from the methods and baselines, with what they mean."""
    if not rows:
        return ""
    body = f"<h3>Reference (uses labels)</h3><p>{_esc(REFERENCE_TEXT)}</p>"
    diff = entry.get("primary_minus_reference") if isinstance(entry, dict) else None
    if isinstance(diff, dict) and isinstance(diff.get("auc_diff"), (int, float)):
        low, high, p = diff.get("ci_low"), diff.get("ci_high"), diff.get("p_value")
        ci = (f" [{_number(low)}, {_number(high)}]" if isinstance(low, (int, float))
              and isinstance(high, (int, float)) else "")
        body += (f"<p>Primary ({_esc(diff.get('primary'))}) minus reference, same images: "
                 f"AUC {diff['auc_diff']:+.3f}{ci}"
                 + (f", p = {p:.3g}" if isinstance(p, (int, float)) else "") + ".</p>")
    return body + summary_table(rows)


def build_page(folder: Path, title: str) -> str:
    """The HTML text of the report for `folder`."""
    summary = _load_summary(folder)
    groups = _group_pngs(folder)
    methods = list(dict.fromkeys(
        [str(r.get("method")) for r in summary.get("rows", []) if isinstance(r, dict)]
        + sorted(k.split(":", 1)[1] for k in groups if k.startswith("method:"))))
    sections = [_summary_section(summary)]
    if "overview" in groups:
        sections.append(_section("overview", "All methods compared",
                                 _grid(groups.pop("overview"), wide=True)))
    sections += [_method_section(m, groups.pop(f"method:{m}")) for m in methods
                 if f"method:{m}" in groups]
    for key, heading in (("tsne", "Latent space (t-SNE)"), ("other", "Other figures")):
        if key in groups:
            sections.append(_section(key, heading, _grid(groups.pop(key))))
    sections += [_section(f"folder-{sub}", sub.replace("_", " ").capitalize(), _grid(groups[sub]))
                 for sub in sorted(groups)]  # sub-folders such as heatmaps/
    sections.append(_downloads(folder))
    sections = [s for s in sections if s is not None]
    nav = "".join(f'<a href="#{_esc(quote(a))}">{_esc(t)}</a>' for a, t, _ in sections)
    main = "".join(f'<section id="{_esc(a)}"><h2>{_esc(t)}</h2>{body}</section>'
                   for a, t, body in sections) or "<p>No figures found.</p>"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{_esc(title)}</h1><p>{_esc(folder.resolve().name)} - generated "
            f"{stamp} by AnoStyle</p></header><nav>{nav}</nav><main>{main}</main></body></html>\n")


@dataclass(frozen=True)
class ReportOptions:
    """Options of `anostyle report`."""

    graphics_dir: str | os.PathLike = "graphics"  # the folder `anostyle evaluate` wrote
    title: str = "AnoStyle results"


def write_report(options: ReportOptions) -> Path:
    """Write `<graphics_dir>/index.html` showing every PNG below the folder; returns its path."""
    folder = Path(options.graphics_dir)
    if not folder.is_dir():
        raise UserError(f"--graphics {folder} is not a folder; give the folder `anostyle "
                        f"evaluate --outdir` wrote.")
    page = folder / "index.html"
    atomic_write_bytes(page, build_page(folder, options.title).encode("utf-8"))
    return page
