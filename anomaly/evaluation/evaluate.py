"""`anostyle evaluate`: read the score sheets, compare methods, write figures and the summary.

The protocol (which classes, lesion groups and subgroups are compared:
anomaly/evaluation/protocol.py; metrics and tests: anomaly/evaluation/metrics.py; figures:
anomaly/evaluation/plots.py):
- Everything that is chosen is chosen on the VALIDATION split before the evaluated split is
  read: the decision threshold (youden / p95 / value), the threshold of "sensitivity at the
  specificity reached on validation normals", each baseline's configuration, the best baseline
  and, unless `primary` names it, the primary method (the best non-baseline method by
  validation AUC of the main comparison). The primary method is listed first; the other
  methods are exploratory.
- `split='val'` evaluates the validation split only: the test rows are dropped when the sheets
  are read, so nothing from test is computed, printed or written (use it for tuning).
- Confidence intervals resample lesions (the sheets' `group` column; stratified by class, see
  metrics.py). Without a `group` column each image is its own group and a note says so.
- Every method is compared with the best baseline on the same images by a paired test: the
  paired group bootstrap of the AUC difference, or DeLong's test when groups are absent. A
  method "earns its keep" when its AUC is higher, the two-sided p-value is below 0.05, and its
  own AUC's CI lies above 0.5 (beating a baseline that is itself at chance earns nothing).
- Subgroups (`by`): a subgroup restricts the NORMAL images to one value of a column and keeps
  every anomaly of the comparison ("normals" scope), so on HAM10000 `--by dx_type` shows
  histology-confirmed naevi vs all melanomas next to all naevi vs melanomas (every HAM10000
  melanoma is histology-confirmed, while many naevi are follow-up images). When the anomalies
  differ across the subgroup's values, a second row restricts both classes ("both" scope).
- A `reference.xlsx` (`anostyle reference`: a supervised classifier of the validation labels) is
  shown as a "reference (uses labels)" row: never primary, never a baseline, never judged by
  "earns its keep"; summary.json carries it under "reference" with the primary's paired AUC
  difference to it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from stylegan.errors import UserError
from stylegan.fileio import atomic_write_json

from anomaly.evaluation import baseline, metrics, plots, protocol, sheets
from anomaly.evaluation.protocol import DEFAULT_ANOMALY_CLASS, Comparison, ComparisonResult

SKIPPED_SHEETS = ("all_scores.xlsx", "summary.xlsx", "repeats.xlsx")
SKIPPED_PREFIXES = (".", "~$", "report_", "tsne")  # temporary/lock files, evaluate's own sheets
BASELINES = baseline.METHODS
REFERENCE = "reference"  # reference.xlsx of `anostyle reference`: a classifier of the val labels
REFERENCE_ROLE = "reference (uses labels)"
REFERENCE_NOTE = ("reference (uses labels): a supervised classifier trained on the validation "
                  "labels (its setting chosen by cross-validation inside validation); the "
                  "unsupervised detector is not required to beat it: where labels exist, this is "
                  "what they buy")
BASELINE_CHOICES = ("knn", "knn-pixels", "none")  # 'knn-pixels': the old name of 'knn'
SPLITS = ("test", "val")
SHEET_SPLITS = ("train", "val", "test")  # the split names `score` writes
SHARED_COLUMNS = ("group", "image")  # copied between sheets by (split, file)
ALPHA = 0.05
_GRID = baseline.BaselineGrid()  # the option field `baseline` hides the module in the class


@dataclass(frozen=True)
class EvaluateOptions:
    """Options of `anostyle evaluate` (saved in summary.json)."""

    scores_dir: Path
    outdir: Path
    normal_class: str | None = None  # None: the class of the rows labelled 0
    anomaly_class: str | None = None  # None: 'mel' when present, else pooled; 'all': pooled
    threshold: str = "youden"  # 'youden' | 'p95' | a number
    bootstrap: int = 1000  # bootstrap resamples for CIs and the paired test (0: none)
    seed: int = 0
    baseline: str = "knn"  # 'knn' (pixel and colour k-NN) | 'none'
    prepared: Path | None = None  # prepared dataset folder (for the baselines)
    split: str = "test"  # evaluated split: 'test', or 'val' (tuning: test is never read)
    primary: str | None = None  # None: best non-baseline method by validation AUC
    by: tuple[str, ...] = ()  # subgroup columns, 'COLUMN' or 'COLUMN:edge,edge'
    knn_sizes: tuple[int, ...] = _GRID.sizes
    knn_bins: tuple[int, ...] = _GRID.bins
    knn_k: tuple[int, ...] = _GRID.ks


@dataclass(frozen=True)
class Summary:
    """What `evaluate_scores` produced: one row per method x comparison, notes, files."""

    table: pd.DataFrame
    notes: tuple[str, ...]
    files: tuple[Path, ...]
    primary: str | None = None
    best_baseline: str | None = None
    subgroups: pd.DataFrame = field(default_factory=pd.DataFrame)
    split: str = "test"


# ------------------------------------------------------------------------------ one comparison


def _ci(cis: dict, key: str) -> tuple[float, float]:
    return cis.get(key, (math.nan, math.nan))


def evaluate_comparison(method: str, df: pd.DataFrame, comparison: Comparison,
                        options: EvaluateOptions) -> ComparisonResult | None:
    """Metrics of one comparison on `options.split`: AUC, AP and the validation-chosen
    operating points, each with a lesion-level CI. None when a class is missing."""
    rows = df[(df["split"] == options.split) & comparison.mask(df)]
    y, s = comparison.select(rows)
    if not (y == 1).any() or not (y == 0).any():
        return None
    y_val, s_val = comparison.select(df[df["split"] == "val"])
    where = f"Score sheet {method}.xlsx ({comparison.name})"
    threshold, rule, note = metrics.choose_threshold(
        metrics.parse_threshold(options.threshold), y_val, s_val, where=where)
    spec_threshold = (metrics.quantile_threshold(s_val[y_val == 0]) if (y_val == 0).any()
                      else math.nan)  # only a fixed threshold gets here without val normals
    groups = protocol.group_labels(rows)
    cis = metrics.bootstrap_cis(y, s, groups, n=options.bootstrap, seed=options.seed,
                                thresholds={"op": threshold, "valspec": spec_threshold})
    at = metrics.binary_metrics(y, s, threshold)
    at_spec = metrics.binary_metrics(y, s, spec_threshold)
    auc, ap = float(skm.roc_auc_score(y, s)), float(skm.average_precision_score(y, s))
    row = {"method": method, "role": "", "comparison": comparison.name,
           "normal_class": comparison.normal, "anomaly_classes": ",".join(comparison.anomalies),
           "split": options.split, "auc": auc, "auc_ci_low": _ci(cis, "auc")[0],
           "auc_ci_high": _ci(cis, "auc")[1], "average_precision": ap,
           "ap_ci_low": _ci(cis, "ap")[0], "ap_ci_high": _ci(cis, "ap")[1],
           "val_auc": metrics.roc_auc(y_val, s_val),
           "threshold": threshold, "threshold_rule": rule}
    for k in metrics.OPERATING_POINT:
        row[k] = float(at[k])
        row[f"{k}_ci_low"], row[f"{k}_ci_high"] = _ci(cis, f"op_{k}")
    row.update({
        "valspec_threshold": spec_threshold,
        "sens_at_val_spec": float(at_spec["sensitivity"]),
        "sens_at_val_spec_ci_low": _ci(cis, "valspec_sensitivity")[0],
        "sens_at_val_spec_ci_high": _ci(cis, "valspec_sensitivity")[1],
        "spec_at_val_spec": float(at_spec["specificity"]),
        "n_normal": int((y == 0).sum()), "n_anomaly": int((y == 1).sum()),
        "n_groups": int(len(np.unique(groups))) if groups is not None else int(len(y)),
        "ci_unit": "lesion" if groups is not None else "image",
        "n_val_normal": int((y_val == 0).sum()), "n_val_anomaly": int((y_val == 1).sum()),
        "note": note})
    fpr, tpr, _ = skm.roc_curve(y, s)
    precision, recall, _ = skm.precision_recall_curve(y, s)
    curves = {"fpr": fpr, "tpr": tpr, "pr_precision": precision, "pr_recall": recall,
              "counts": np.array([[at["tn"], at["fp"]], [at["fn"], at["tp"]]])}
    keys = (rows["split"].astype(str) + "/" + rows["file"].astype(str)).to_numpy()
    return ComparisonResult(method, comparison, row, y, s, keys, groups, note, curves)


def classification_table(result: ComparisonResult) -> pd.DataFrame:
    """sklearn classification report at the chosen threshold, as rows class/avg x metrics."""
    comp = result.comparison
    names = [comp.normal, comp.anomalies[0] if len(comp.anomalies) == 1 else "anomaly"]
    pred = (result.s >= result.row["threshold"]).astype(np.int64)
    report = skm.classification_report(result.y, pred, labels=[0, 1], target_names=names,
                                       output_dict=True, zero_division=0.0)
    rows = []
    for key, values in report.items():
        if key == "accuracy":
            values = {"precision": math.nan, "recall": math.nan, "f1-score": values,
                      "support": len(result.y)}
        rows.append({"comparison": comp.name, "class": key, "precision": values["precision"],
                     "recall": values["recall"], "f1": values["f1-score"],
                     "support": int(values["support"])})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ paired tests


def above_chance(row: dict) -> bool:
    """Whether a method's own AUC is shown to be above 0.5: its CI's lower end when there is one
    (beating a baseline that is itself at chance earns nothing), else the AUC."""
    low = row.get("auc_ci_low", math.nan)
    return bool(low > 0.5) if low is not None and math.isfinite(low) else \
        bool(row.get("auc", math.nan) > 0.5)


def paired_row(result: ComparisonResult, reference: ComparisonResult,
               options: EvaluateOptions) -> dict:
    """Paired comparison of `result` with `reference` on the images both scored."""
    common, ia, ib = np.intersect1d(result.keys, reference.keys, return_indices=True)
    if len(common) == 0:
        return {"vs_baseline": reference.method, "note": "no common images"}
    y = result.y[ia]
    if (y != reference.y[ib]).any():
        raise UserError(f"{result.method}.xlsx and {reference.method}.xlsx give the same image "
                        f"different classes; score all methods on one dataset.")
    groups = None if result.groups is None else result.groups[ia]
    res = metrics.paired_comparison(y, result.s[ia], reference.s[ib], groups,
                                    n=options.bootstrap, seed=options.seed)
    earns = bool(res.difference > 0 and res.p_value < ALPHA and above_chance(result.row))
    verdict = "" if result.method in BASELINES else "yes" if earns else "no"
    return {"vs_baseline": reference.method, "auc_diff": res.difference,
            "auc_diff_ci_low": res.ci_low, "auc_diff_ci_high": res.ci_high,
            "p_value": res.p_value, "paired_test": res.test, "n_paired": int(len(common)),
            "earns_keep": verdict}


# ------------------------------------------------------------------------------ subgroups


def _subgroup_row(method: str, y: np.ndarray, s: np.ndarray, groups, options, **label) -> dict:
    cis = metrics.bootstrap_cis(y, s, groups, n=options.bootstrap, seed=options.seed)
    low, high = _ci(cis, "auc")
    return {"method": method, **label, "auc": metrics.roc_auc(y, s), "auc_ci_low": low,
            "auc_ci_high": high, "n_normal": int((y == 0).sum()), "n_anomaly": int((y == 1).sum()),
            "n_groups": int(len(np.unique(groups))) if groups is not None else int(len(y))}


def subgroup_rows(result: ComparisonResult, df: pd.DataFrame, spec: str,
                  options: EvaluateOptions) -> list[dict]:
    """AUC with CI per subgroup value of one method's main comparison (see module docstring)."""
    column, edges = metrics.parse_by(spec)
    comp = result.comparison
    rows = df[(df["split"] == options.split) & comp.mask(df)].reset_index(drop=True)
    values, order, how = protocol.subgroup_labels(rows, column, edges)
    y, s = comp.select(rows)
    groups = protocol.group_labels(rows)
    normal_name, anomaly_name = comp.normal, "+".join(comp.anomalies)

    def sub(mask: np.ndarray, **label) -> dict | None:
        if not ((y[mask] == 1).any() and (y[mask] == 0).any()):
            return None
        g = None if groups is None else groups[mask]
        return _subgroup_row(result.method, y[mask], s[mask], g, options, by=column,
                             binning=how, **label)

    out = [sub(np.ones(len(y), bool), value="(all)", scope="all",
               comparison=f"{normal_name} vs {anomaly_name}")]
    for group in protocol.subgroups(values, y, order=order):
        value = group.value
        out.append(sub(group.normals, value=value, scope="normals",
                       comparison=f"{normal_name}[{column}={value}] vs {anomaly_name}"))
        if group.both is not None:
            out.append(sub(group.both, value=value, scope="both",
                           comparison=f"{normal_name} vs {anomaly_name}, both {column}={value}"))
    return [r for r in out if r is not None]


# ------------------------------------------------------------------------------ the command


def evaluate_scores(options: EvaluateOptions) -> Summary:
    """Evaluate every `<method>.xlsx` of `options.scores_dir`; figures and summary to outdir."""
    options = _checked(options)
    notes: list[str] = []
    if options.baseline != "none":
        grid = baseline.BaselineGrid(options.knn_sizes, options.knn_bins, options.knn_k)
        notes += baseline.baseline_sheets(options.scores_dir, options.prepared, grid,
                                          anomaly_class=options.anomaly_class
                                          or DEFAULT_ANOMALY_CLASS,
                                          normal_class=options.normal_class)
    frames = load_score_sheets(options.scores_dir, split=options.split)
    shared = SHARED_COLUMNS + tuple(metrics.parse_by(b)[0] for b in options.by)
    lacking = {m: [c for c in shared if c not in df.columns] for m, df in frames.items()}
    frames = share_columns(frames, shared)
    notes += [f"{m}.xlsx: column(s) {', '.join(c for c in cols if c in frames[m].columns)} "
              f"taken from the other score sheets (matched by split and file)"
              for m, cols in lacking.items() if any(c in frames[m].columns for c in cols)]
    _check_by(frames, options.by)
    normal = protocol.resolve_normal_class(frames.values(), options.normal_class,
                                           where="the score sheets")
    comparisons = {m: protocol.build_comparisons(df[df["split"] == options.split], normal,
                                                 options.anomaly_class,
                                                 where=f"{options.split} images in {m}.xlsx")
                   for m, df in frames.items()}
    primary, best_baseline, selection_notes = select_on_validation(frames, comparisons, options)
    notes += selection_notes
    main = next(iter(comparisons.values()), [None])[0]
    if options.anomaly_class is None and main is not None:
        notes.append(f"the main comparison is {main.name}"
                     + ("" if DEFAULT_ANOMALY_CLASS in main.anomalies else
                        f" (no class '{DEFAULT_ANOMALY_CLASS}', the default anomaly class; "
                        f"pass --anomaly-class NAME to compare the normals with one class)"))
    notes += _group_notes(frames)
    if options.split == "val":
        notes.append("validation-only evaluation (test rows were not read); the operating "
                     "points are chosen and measured on the same validation images")
    results: dict[str, list[ComparisonResult]] = {}
    for method in _ordered(frames, primary, best_baseline):
        found = [r for c in comparisons[method]
                 if (r := evaluate_comparison(method, frames[method], c, options))]
        if not found:
            raise UserError(f"Score sheet {method}.xlsx has no {options.split} images of both the "
                            f"normal class '{normal}' and another class; score the "
                            f"{options.split} split.")
        results[method] = found
        notes += [r.note for r in found if r.note]
    table = _table(results, primary, best_baseline, options)
    subgroups = pd.DataFrame([r for m, rs in results.items() for spec in options.by
                              for r in subgroup_rows(rs[0], frames[m], spec, options)])
    if len(subgroups):
        subgroups.insert(1, "role", subgroups["method"].map(
            table.drop_duplicates("method").set_index("method")["role"]))
    reference = reference_entry(results, primary, options)
    if reference is not None:
        notes.append(REFERENCE_NOTE)
    files = _figures(frames, results, options)
    files += write_summary(table, options, notes, primary=primary, best_baseline=best_baseline,
                           subgroups=subgroups, reference=reference)
    return Summary(table=table, notes=tuple(notes), files=tuple(files), primary=primary,
                   best_baseline=best_baseline, subgroups=subgroups, split=options.split)


def _role(method: str, primary: str | None, best_baseline: str | None) -> str:
    if method == REFERENCE:
        return REFERENCE_ROLE
    if method == primary:
        return "primary"
    if method in BASELINES:
        return "baseline (best on val)" if method == best_baseline else "baseline"
    return "exploratory"


def _ordered(frames: dict, primary: str | None, best_baseline: str | None) -> list[str]:
    """Primary first, then exploratory methods, then the best baseline, then other baselines."""
    rank = {"primary": 0, "exploratory": 1, "baseline (best on val)": 2, "baseline": 3,
            REFERENCE_ROLE: 4}
    return sorted(frames, key=lambda m: rank[_role(m, primary, best_baseline)])


def _table(results: dict[str, list[ComparisonResult]], primary: str | None,
           best_baseline: str | None, options: EvaluateOptions) -> pd.DataFrame:
    """One row per method x comparison with its role and paired test against the best baseline."""
    rows = []
    reference = {r.comparison.name: r for r in results.get(best_baseline, [])}
    for method, found in results.items():
        for res in found:
            row = dict(res.row, role=_role(method, primary, best_baseline))
            ref = reference.get(res.comparison.name)
            if ref is not None and method not in (best_baseline, REFERENCE):
                row.update(paired_row(res, ref, options))
            rows.append(row)
    return pd.DataFrame(rows)


def reference_entry(results: dict[str, list[ComparisonResult]], primary: str | None,
                    options: EvaluateOptions) -> dict | None:
    """summary.json's "reference": the reference's main comparison (AUC with CI, its validation
    AUC = cross-validated) and the primary's paired AUC difference to it; None without one."""
    if REFERENCE not in results:
        return None
    ref = results[REFERENCE][0]
    entry = {k: _json_value(ref.row[k]) for k in (
        "comparison", "split", "auc", "auc_ci_low", "auc_ci_high", "val_auc", "n_normal",
        "n_anomaly", "n_groups", "ci_unit")}
    entry.update(method=REFERENCE, role=REFERENCE_ROLE, primary_minus_reference=None)
    mine = [r for r in results.get(primary, []) if r.comparison.name == ref.comparison.name]
    if not mine:
        return entry
    common, ia, ib = np.intersect1d(mine[0].keys, ref.keys, return_indices=True)
    if len(common) and (mine[0].y[ia] == ref.y[ib]).all():
        groups = None if mine[0].groups is None else mine[0].groups[ia]
        res = metrics.paired_comparison(mine[0].y[ia], mine[0].s[ia], ref.s[ib], groups,
                                        n=options.bootstrap, seed=options.seed)
        entry["primary_minus_reference"] = {
            "primary": primary, "auc_diff": _json_value(res.difference),
            "ci_low": _json_value(res.ci_low), "ci_high": _json_value(res.ci_high),
            "p_value": _json_value(res.p_value), "test": res.test, "n_paired": int(len(common))}
    return entry


def _checked(options: EvaluateOptions) -> EvaluateOptions:
    metrics.parse_threshold(options.threshold)
    for spec in options.by:
        metrics.parse_by(spec)
    if options.bootstrap < 0:
        raise UserError(f"--bootstrap {options.bootstrap} is negative; use 0 (no CI) or e.g. 1000.")
    if options.baseline not in BASELINE_CHOICES:
        raise UserError(f"--baseline '{options.baseline}' is unknown; use knn or none.")
    if options.split not in SPLITS:
        raise UserError(f"--split '{options.split}' is unknown; use test or val.")
    if not Path(options.scores_dir).is_dir():
        raise UserError(f"--scores {options.scores_dir} is not a folder; give the folder that "
                        f"`anostyle score` wrote.")
    return replace(options, scores_dir=Path(options.scores_dir), outdir=Path(options.outdir),
                   prepared=None if options.prepared is None else Path(options.prepared),
                   by=tuple(options.by))


def load_score_sheets(scores_dir: Path, *, split: str = "test") -> dict[str, pd.DataFrame]:
    """Every `<method>.xlsx` (method = file stem) except the combined sheets; baselines last.

    With split='val' only validation rows are kept, so nothing downstream can read test.
    """
    paths = [p for p in sorted(Path(scores_dir).glob("*.xlsx"))
             if p.name not in SKIPPED_SHEETS and not p.name.startswith(SKIPPED_PREFIXES)]
    if not paths:
        raise UserError(f"{scores_dir} holds no score sheets (<method>.xlsx); run `anostyle "
                        f"score` first or point --scores at its output folder.")
    paths.sort(key=lambda p: (p.stem in BASELINES, p.stem))
    keep = ("val",) if split == "val" else ("val", "test")
    frames = {}
    for p in paths:
        df = checked_rows(sheets.read_score_sheet(p), p.name, keep=keep)
        frames[p.stem] = df[df["split"].isin(keep)].reset_index(drop=True)
    return frames


def checked_rows(df: pd.DataFrame, name: str, *, keep: tuple[str, ...]) -> pd.DataFrame:
    """A score sheet's rows fit to evaluate: split names as `score` writes them (lower case),
    some rows of the `keep` splits, and each (split, file) once. Split names in another case or
    with spaces, a sheet without such rows and an image listed twice with different scores or
    labels are refused; exact repeats are dropped with a warning giving their count."""
    odd = sorted({s for s in df["split"] if s not in SHEET_SPLITS
                  and s.strip().lower() in SHEET_SPLITS})
    if odd:
        raise UserError(f"{name} names the split(s) {', '.join(repr(s) for s in odd)}; the split "
                        f"column must read {', '.join(SHEET_SPLITS)} in lower case, as "
                        f"`anostyle score` writes it.")
    if not df["split"].isin(keep).any():
        found = sorted(set(df["split"])) or ["none: the sheet is empty"]
        raise UserError(f"{name} holds no {' or '.join(keep)} rows (splits found: "
                        f"{', '.join(found)}); score the prepared {keep[-1]}.zip into it.")
    repeated = df.duplicated(["split", "file"], keep=False)
    if repeated.any():
        differing = df[repeated].groupby(["split", "file"])[["score", "label", "class"]] \
            .nunique().max(axis=1) > 1
        if differing.any():
            split, file = differing[differing].index[0]
            raise UserError(f"{name} lists {split}/{file} more than once with different scores "
                            f"or labels ({int(differing.sum())} such images); score each image "
                            f"once.")
        dropped = int(df.duplicated(["split", "file"]).sum())
        warnings.warn(f"{name} lists {dropped} row(s) again with the same split and file; the "
                      f"repeats are dropped, so each image counts once", UserWarning,
                      stacklevel=3)
        df = df.drop_duplicates(["split", "file"]).reset_index(drop=True)
    return df


def share_columns(frames: dict[str, pd.DataFrame], columns: tuple[str, ...]
                  ) -> dict[str, pd.DataFrame]:
    """Give every sheet the listed columns that another sheet has, matched by (split, file)."""
    columns = tuple(dict.fromkeys(columns))
    parts = [df[["split", "file", *[c for c in columns if c in df.columns]]]
             for df in frames.values() if any(c in df.columns for c in columns)]
    if not parts:
        return frames
    known = pd.concat(parts, ignore_index=True).groupby(["split", "file"], sort=False).first()
    out = {}
    for method, df in frames.items():
        missing = [c for c in columns if c in known.columns and c not in df.columns]
        out[method] = (df.merge(known[missing], left_on=["split", "file"], right_index=True,
                                how="left") if missing else df)
    return out


def _check_by(frames: dict[str, pd.DataFrame], by: tuple[str, ...]) -> None:
    for spec in by:
        column = metrics.parse_by(spec)[0]
        if not any(column in df.columns for df in frames.values()):
            found = sorted({c for df in frames.values() for c in df.columns} -
                           set(sheets.SCORE_COLUMNS))
            raise UserError(f"--by {column}: no score sheet has a column '{column}' (extra "
                            f"columns found: {', '.join(found) or 'none'}); score a dataset "
                            f"prepared with that metadata column.")


def _group_notes(frames: dict[str, pd.DataFrame]) -> list[str]:
    without = [m for m, df in frames.items() if "group" not in df.columns]
    if not without:
        return []
    return [f"no group column in {', '.join(f'{m}.xlsx' for m in without)}: each image is its "
            f"own group, so CIs are image-level and paired comparisons use DeLong's test"]


def select_on_validation(frames: dict[str, pd.DataFrame], comparisons: dict[str, list],
                         options: EvaluateOptions) -> tuple[str | None, str | None, list[str]]:
    """(primary method, best baseline, notes), from validation rows only (main comparison)."""
    val_auc = {}
    for method, df in frames.items():
        if comparisons[method]:
            y, s = comparisons[method][0].select(df[df["split"] == "val"])
            val_auc[method] = metrics.roc_auc(y, s)
    notes = []
    methods = [m for m in frames if m not in BASELINES and m != REFERENCE]
    if options.primary is not None:
        if options.primary not in frames:
            raise UserError(f"--primary '{options.primary}' has no score sheet in "
                            f"{options.scores_dir}; methods found: {', '.join(frames)}.")
        if options.primary == REFERENCE:
            raise UserError("--primary reference: the supervised reference uses the labels and "
                            "cannot be the primary method; name an unsupervised method.")
        primary = options.primary
        notes.append(f"primary method {primary}: given by --primary")
    else:
        primary, how = _best(methods, val_auc)
        if primary is not None:
            notes.append(f"primary method {primary}: {how}")
    best_baseline, how = _best([m for m in frames if m in BASELINES], val_auc)
    if best_baseline is not None:
        notes.append(f"best baseline {best_baseline}: {how}")
    return primary, best_baseline, notes


def _best(candidates: list[str], val_auc: dict[str, float]) -> tuple[str | None, str]:
    """The candidate with the highest validation AUC (first on ties), and how it was chosen."""
    if not candidates:
        return None, ""
    scored = [m for m in candidates if math.isfinite(val_auc.get(m, math.nan))]
    if not scored:
        fallback = "izif" if "izif" in candidates else candidates[0]
        return fallback, ("no validation anomalies to compare AUCs, so taken by name "
                          "(pass --primary to choose)")
    best = max(scored, key=lambda m: (val_auc[m], -candidates.index(m)))
    return best, f"highest validation AUC ({val_auc[best]:.3f}), chosen before test was read"


def _figures(frames: dict[str, pd.DataFrame], results: dict[str, list[ComparisonResult]],
             options: EvaluateOptions) -> list[Path]:
    files = []
    for method, found in results.items():
        files += _method_outputs(method, frames[method], found, options.outdir, options.split)
    main_names = {rs[0].comparison.name for rs in results.values()}
    curves = {m: [r for r in rs if r.comparison.name in main_names
                  or protocol.is_pooled(r.comparison)] for m, rs in results.items()}
    files.append(options.outdir / "roc_all.png")
    plots.plot_roc_all(curves, files[-1], baselines=BASELINES, split=options.split)
    return files


def _method_outputs(method: str, df: pd.DataFrame, results: list[ComparisonResult],
                    outdir: Path, split: str) -> list[Path]:
    """All figures of one method plus its classification-report sheet."""
    first = results[0]
    rows = df[df["split"] == split]
    tables = [classification_table(r) for r in results]
    kinds = ("roc", "pr", "confusion", "violin", "report")
    paths = {k: outdir / f"{k}_{method}.png" for k in kinds}
    plots.plot_roc(results, paths["roc"], f"ROC - {method} ({split})")
    plots.plot_pr(results, paths["pr"], f"Precision-recall - {method} ({split})")
    plots.plot_confusion(first, rows, paths["confusion"], f"Confusion - {method} ({split})")
    plots.plot_violin(rows, first.comparison.normal, first.row["threshold"], paths["violin"],
                      f"Scores by class - {method} ({split})")
    plots.plot_report(tables[0], paths["report"],
                      f"Classification report - {method}\n{first.comparison.name} ({split}), "
                      f"threshold {first.row['threshold']:.4g}")
    sheet = sheets.write_frames({"report": pd.concat(tables, ignore_index=True)},
                                outdir / f"report_{method}.xlsx", float_format="0.000")
    return [*paths.values(), sheet]


def write_summary(table: pd.DataFrame, options: EvaluateOptions, notes: list[str], *,
                  primary: str | None = None, best_baseline: str | None = None,
                  subgroups: pd.DataFrame | None = None,
                  reference: dict | None = None) -> list[Path]:
    """summary.xlsx (summary, subgroups, options, notes) and summary.json (the same)."""
    config = sheets.config_dict(options)
    subgroups = pd.DataFrame() if subgroups is None else subgroups
    header = pd.DataFrame({"item": ["evaluated split", "primary method", "best baseline"],
                           "value": [options.split, primary or "", best_baseline or ""]})
    frames = {"summary": table, "choices": header}
    if len(subgroups):
        frames["subgroups"] = subgroups
    frames["options"] = pd.DataFrame({"option": list(config),
                                      "value": [str(v) for v in config.values()]})
    frames["notes"] = pd.DataFrame({"note": notes})
    xlsx = sheets.write_frames(frames, options.outdir / "summary.xlsx", float_format="0.0000",
                               column_formats={"threshold": "General",
                                               "valspec_threshold": "General",
                                               "p_value": "0.0000E+00"})
    json_path = options.outdir / "summary.json"
    atomic_write_json(json_path, {"options": config, "split": options.split,
                                  "primary": primary, "best_baseline": best_baseline,
                                  "reference": reference, "rows": _records(table), "subgroups": _records(subgroups),
                                  "notes": notes})
    return [xlsx, json_path]


def _records(table: pd.DataFrame) -> list[dict]:
    return [{k: _json_value(v) for k, v in r.items()} for r in table.to_dict("records")]


def _json_value(value):
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _ci_text(row: dict, key: str = "auc") -> str:
    low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    if low is None or high is None or (isinstance(low, float) and math.isnan(low)):
        return ""
    return f" [{low:.3f}, {high:.3f}]"


def format_summary(summary: Summary) -> str:
    """A short plain-text table of the summary for the terminal (primary first)."""
    lines = [f"evaluated split: {summary.split}; primary: {summary.primary}; best baseline: "
             f"{summary.best_baseline}",
             f"{'method':<18} {'role':<12} {'comparison':<16} {'AUC [95% CI]':<24} {'sens':>6} "
             f"{'spec':>6}  {'vs best baseline: dAUC, p':<26}"]
    for r in summary.table.to_dict("records"):
        paired = ""
        if isinstance(r.get("auc_diff"), float) and math.isfinite(r["auc_diff"]):
            paired = f"{r['auc_diff']:+.3f}, p={r['p_value']:.3g}"
            paired += f" (earns its keep: {r['earns_keep']})" if r["earns_keep"] else ""
        lines.append(f"{r['method']:<18} {r['role'].split(' ')[0]:<12} {r['comparison']:<16} "
                     f"{r['auc']:.3f}{_ci_text(r):<18} {r['sensitivity']:>6.3f} "
                     f"{r['specificity']:>6.3f}  {paired}")
    lines += [f"note: {n}" for n in summary.notes]
    lines.append(f"wrote {len(summary.files)} files to {summary.files[-1].parent}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ repeat runs


def repeat_table(score_dirs: list[Path], *, normal_class: str | None = None,
                 anomaly_class: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-run AUCs, mean ± s.d. per method) of the main comparison over repeat score folders.

    Each folder is one repeat run (e.g. another seed); a method's validation and test AUC are
    computed in every folder that has its sheet. s.d. uses ddof 1 (NaN for one run).
    """
    if len(score_dirs) < 1:
        raise UserError("Give at least one --scores folder.")
    runs = []
    for folder in score_dirs:
        if not Path(folder).is_dir():
            raise UserError(f"--scores {folder} is not a folder; give the folders that "
                            f"`anostyle score` wrote for each repeat run.")
        frames = load_score_sheets(Path(folder))
        normal = protocol.resolve_normal_class(frames.values(), normal_class,
                                               where="the score sheets")
        for method, df in frames.items():
            main = protocol.build_comparisons(df[df["split"] == "test"], normal, anomaly_class,
                                              where=f"test images in {method}.xlsx")[0]
            row = {"run": str(folder), "method": method, "comparison": main.name}
            for split in ("val", "test"):
                row[f"{split}_auc"] = metrics.roc_auc(*main.select(df[df["split"] == split]))
            runs.append(row)
    per_run = pd.DataFrame(runs)
    stats = per_run.groupby(["method", "comparison"], sort=False).agg(
        n_runs=("run", "size"), val_auc_mean=("val_auc", "mean"), val_auc_sd=("val_auc", "std"),
        test_auc_mean=("test_auc", "mean"), test_auc_sd=("test_auc", "std")).reset_index()
    stats = stats.sort_values("val_auc_mean", ascending=False, kind="stable")  # val decides order
    return per_run, stats.reset_index(drop=True)


def write_repeats(score_dirs: list[Path], outdir: Path, *, normal_class: str | None = None,
                  anomaly_class: str | None = None) -> tuple[pd.DataFrame, list[Path]]:
    """repeats.xlsx (summary, runs) and repeats.json in `outdir`; returns (summary, files)."""
    per_run, stats = repeat_table(score_dirs, normal_class=normal_class,
                                  anomaly_class=anomaly_class)
    outdir = Path(outdir)
    xlsx = sheets.write_frames({"repeats": stats, "runs": per_run}, outdir / "repeats.xlsx",
                               float_format="0.0000")
    json_path = outdir / "repeats.json"
    atomic_write_json(json_path, {"score_dirs": [str(d) for d in score_dirs],
                                  "summary": _records(stats), "runs": _records(per_run)})
    return stats, [xlsx, json_path]


def _mean_sd(row: dict, key: str) -> str:
    """'mean ± s.d.' of a repeat-table entry (no s.d. for a single run)."""
    mean, sd = row[f"{key}_mean"], row[f"{key}_sd"]
    return f"{mean:.3f} ± {sd:.3f}" if math.isfinite(sd) else f"{mean:.3f}"


def format_repeats(stats: pd.DataFrame) -> str:
    """mean ± s.d. per method, ordered by validation AUC."""
    lines = [f"{'method':<18} {'comparison':<16} {'runs':>4}  {'val AUC':<16} {'test AUC':<16}"]
    for r in stats.to_dict("records"):
        lines.append(f"{r['method']:<18} {r['comparison']:<16} {r['n_runs']:>4}  "
                     f"{_mean_sd(r, 'val_auc'):<16} {_mean_sd(r, 'test_auc'):<16}")
    return "\n".join(lines)
