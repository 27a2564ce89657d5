"""Evaluation of anomaly scores: ROC/AUC with bootstrap CI, PR, thresholds, confusion, violins.

Metrics follow the usual definitions (Fawcett 2006, "An introduction to ROC analysis"):
AUC = P(score of a random anomaly > score of a random normal) + 0.5 P(tie), computed by
scikit-learn on the test split; its 95% CI is the percentile interval of a stratified bootstrap
(normals and anomalies resampled separately, so every resample holds both classes).
Decision thresholds are chosen on the validation split only and then applied to test:
  youden  maximise Youden's J = TPR - FPR (Youden 1950) over validation scores,
  p95     the 95th percentile (linear interpolation) of validation normal scores,
  <value> a fixed number.
An image is called anomalous when score >= threshold (higher score = more anomalous).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import matplotlib as mpl
from matplotlib import ticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from scipy.stats import rankdata
from sklearn import metrics as skm

from stylegan.errors import UserError
from stylegan.fileio import atomic_path, atomic_write_json

from anomaly import baseline, sheets

SKIPPED_SHEETS = ("all_scores.xlsx", "summary.xlsx")
SKIPPED_PREFIXES = (".", "~$", "report_", "tsne")  # temporary/lock files, evaluate's own sheets
BASELINES = ("knn-pixels", "none")
DEFAULT_ANOMALY_CLASS = "mel"
SPECIFICITY_TARGET = 0.95


@dataclass(frozen=True)
class EvaluateOptions:
    """Options of `anostyle evaluate` (saved in summary.json)."""

    scores_dir: Path
    outdir: Path
    normal_class: str | None = None  # None: the class of the rows labelled 0
    anomaly_class: str | None = None  # None: 'mel' when present, else only pooled comparisons
    threshold: str = "youden"  # 'youden' | 'p95' | a number
    bootstrap: int = 1000  # bootstrap resamples for the AUC CI (0: no CI)
    seed: int = 0
    baseline: str = "knn-pixels"  # 'knn-pixels' | 'none'
    prepared: Path | None = None  # prepared dataset folder (for the baseline)


@dataclass(frozen=True)
class Summary:
    """What `evaluate_scores` produced: one row per method x comparison, notes, files."""

    table: pd.DataFrame
    notes: tuple[str, ...]
    files: tuple[Path, ...]


@dataclass(frozen=True)
class Comparison:
    """Normal class versus one or several anomaly classes."""

    name: str
    normal: str
    anomalies: tuple[str, ...]

    def select(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(y [M] with 1 = anomaly, scores [M]) of the rows of `df` in this comparison."""
        cls = df["class"].to_numpy()
        keep = (cls == self.normal) | np.isin(cls, self.anomalies)
        return np.isin(cls[keep], self.anomalies).astype(np.int64), df["score"].to_numpy()[keep]


# ------------------------------------------------------------------------------ metrics


def auc_from_ranks(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC (ties count one half) for each row: pos [B, P], neg [B, Q] -> [B]."""
    pos, neg = np.atleast_2d(pos), np.atleast_2d(neg)
    p, q = pos.shape[1], neg.shape[1]
    ranks = rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # [B, P + Q], average ties
    return (ranks[:, :p].sum(axis=1) - p * (p + 1) / 2) / (p * q)


def bootstrap_auc_ci(y: np.ndarray, s: np.ndarray, *, n: int, seed: int,
                     level: float = 0.95, chunk: int = 250) -> tuple[float, float]:
    """Percentile CI of the ROC AUC from `n` stratified bootstrap resamples (NaN when n == 0)."""
    pos, neg = s[y == 1], s[y == 0]
    if n <= 0 or len(pos) == 0 or len(neg) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    aucs = []
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        pos_b = pos[rng.integers(0, len(pos), size=(b, len(pos)))]  # [b, P]
        neg_b = neg[rng.integers(0, len(neg), size=(b, len(neg)))]  # [b, Q]
        aucs.append(auc_from_ranks(pos_b, neg_b))
    low, high = np.percentile(np.concatenate(aucs), [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def youden_threshold(y: np.ndarray, s: np.ndarray) -> float:
    """The score that maximises TPR - FPR when `score >= threshold` is called anomalous."""
    fpr, tpr, thresholds = skm.roc_curve(y, s, drop_intermediate=False)
    j = (tpr - fpr)[1:]  # the first point (threshold +inf) flags nothing
    return float(thresholds[1:][int(np.argmax(j))])


def p95_threshold(normal_scores: np.ndarray) -> float:
    """95th percentile (linear interpolation) of normal scores."""
    return float(np.percentile(normal_scores, 95))


def sensitivity_at_specificity(y: np.ndarray, s: np.ndarray,
                               specificity: float = SPECIFICITY_TARGET) -> float:
    """Highest TPR among ROC points whose specificity is at least `specificity`."""
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    return float(tpr[fpr <= 1 - specificity + 1e-12].max())


def binary_metrics(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, precision, F1 (and counts) of `score >= threshold`."""
    pred = (s >= threshold).astype(np.int64)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {
        "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
        "specificity": tn / (tn + fp) if tn + fp else math.nan,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "f1": skm.f1_score(y, pred, labels=[0, 1], zero_division=0.0),
        "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn),
    }


def parse_threshold(text: str) -> str | float:
    """'youden', 'p95' or a finite number."""
    rule = str(text).strip().lower()
    if rule in ("youden", "p95"):
        return rule
    try:
        value = float(rule)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"--threshold '{text}' is not understood; use youden, p95 or a number.")
    return value


def choose_threshold(rule: str | float, y_val: np.ndarray, s_val: np.ndarray, *,
                     where: str) -> tuple[float, str, str]:
    """(threshold, rule used, note) from VALIDATION labels and scores only."""
    if isinstance(rule, float):
        return rule, "fixed", ""
    if not (y_val == 0).any():
        raise UserError(f"{where} has no validation rows of the normal class, so the "
                        f"'{rule}' threshold cannot be chosen; score the val split too or pass "
                        f"--threshold VALUE.")
    if rule == "youden" and (y_val == 1).any():
        return youden_threshold(y_val, s_val), "youden (val)", ""
    note = ""
    if rule == "youden":
        note = (f"{where}: no validation anomalies for Youden's J, fell back to the 95th "
                f"percentile of validation normal scores")
    return p95_threshold(s_val[y_val == 0]), "p95 (val)", note


# ------------------------------------------------------------------------------ one comparison


@dataclass(frozen=True)
class ComparisonResult:
    """Everything measured for one method and comparison (test curves, val threshold)."""

    method: str
    comparison: Comparison
    row: dict
    y_test: np.ndarray
    s_test: np.ndarray
    note: str = ""
    curves: dict = field(default_factory=dict)


def evaluate_comparison(method: str, df: pd.DataFrame, comparison: Comparison,
                        options: EvaluateOptions) -> ComparisonResult | None:
    """Metrics of one comparison: AUC + CI, AP, val threshold applied to test. None if empty."""
    y_test, s_test = comparison.select(df[df["split"] == "test"])
    if not (y_test == 1).any() or not (y_test == 0).any():
        return None
    y_val, s_val = comparison.select(df[df["split"] == "val"])
    where = f"Score sheet {method}.xlsx ({comparison.name})"
    threshold, rule, note = choose_threshold(parse_threshold(options.threshold), y_val, s_val,
                                             where=where)
    low, high = bootstrap_auc_ci(y_test, s_test, n=options.bootstrap, seed=options.seed)
    fpr, tpr, _ = skm.roc_curve(y_test, s_test)
    precision, recall, _ = skm.precision_recall_curve(y_test, s_test)
    at = binary_metrics(y_test, s_test, threshold)
    row = {
        "method": method, "comparison": comparison.name, "normal_class": comparison.normal,
        "anomaly_classes": ",".join(comparison.anomalies),
        "auc": float(skm.roc_auc_score(y_test, s_test)), "auc_ci_low": low, "auc_ci_high": high,
        "average_precision": float(skm.average_precision_score(y_test, s_test)),
        "threshold": threshold, "threshold_rule": rule,
        **{k: float(at[k]) for k in ("sensitivity", "specificity", "precision", "f1")},
        "sens_at_95_spec": sensitivity_at_specificity(y_test, s_test),
        "n_test_normal": int((y_test == 0).sum()), "n_test_anomaly": int((y_test == 1).sum()),
        "n_val_normal": int((y_val == 0).sum()), "n_val_anomaly": int((y_val == 1).sum()),
        "note": note,
    }
    curves = {"fpr": fpr, "tpr": tpr, "pr_precision": precision, "pr_recall": recall,
              "counts": np.array([[at["tn"], at["fp"]], [at["fn"], at["tp"]]])}
    return ComparisonResult(method, comparison, row, y_test, s_test, note, curves)


def classification_table(result: ComparisonResult) -> pd.DataFrame:
    """sklearn classification report at the chosen threshold, as rows class/avg x metrics."""
    comp = result.comparison
    names = [comp.normal, comp.anomalies[0] if len(comp.anomalies) == 1 else "anomaly"]
    pred = (result.s_test >= result.row["threshold"]).astype(np.int64)
    report = skm.classification_report(result.y_test, pred, labels=[0, 1], target_names=names,
                                       output_dict=True, zero_division=0.0)
    rows = []
    for key, values in report.items():
        if key == "accuracy":
            values = {"precision": math.nan, "recall": math.nan, "f1-score": values,
                      "support": len(result.y_test)}
        rows.append({"comparison": comp.name, "class": key, "precision": values["precision"],
                     "recall": values["recall"], "f1": values["f1-score"],
                     "support": int(values["support"])})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ figures


def plot_style() -> dict:
    """rcParams of every AnoStyle figure (seaborn whitegrid; user text is never parsed as math)."""
    return {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.85),
            "text.parse_math": False, "figure.dpi": 100, "savefig.dpi": 150,
            "axes.titleweight": "bold", "legend.frameon": True}


@contextlib.contextmanager
def new_figure(path: str | os.PathLike, *, nrows: int = 1, ncols: int = 1,
               figsize: tuple[float, float] = (6.4, 5.2), squeeze: bool = True,
               **subplot_kw) -> Iterator:
    """Yield (figure, axes) drawn in the AnoStyle style; saved atomically as PNG on exit.

    Uses a bare matplotlib Figure (Agg canvas), so no pyplot state and no GUI backend.
    """
    with mpl.rc_context(plot_style()):
        fig = Figure(figsize=figsize, layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=squeeze, **subplot_kw)
        yield fig, axes
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", facecolor="white")


def class_palette(classes: Sequence[str], normal: str | None) -> dict[str, tuple]:
    """A fixed colour per class: the normal class blue, the others from 'colorblind' by name.

    Colours depend only on the set of class names, so a class looks the same in every figure.
    """
    colours = sns.color_palette("colorblind", 10)
    others = sorted(c for c in set(classes) if c != normal)
    palette = {c: colours[1 + i % 9] for i, c in enumerate(others)}
    if normal is not None:
        palette[normal] = colours[0]
    return palette


def _ci_text(row: dict) -> str:
    """' [low, high]' of the AUC CI, or '' without bootstrap."""
    if math.isnan(row["auc_ci_low"]):
        return ""
    return f" [{row['auc_ci_low']:.3f}, {row['auc_ci_high']:.3f}]"


def _roc_label(row: dict) -> str:
    return f"{row['comparison']}: AUC {row['auc']:.3f}{_ci_text(row)}"


def _style_unit_axes(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def plot_roc(results: Sequence[ComparisonResult], path: Path, title: str) -> None:
    """ROC curves of every comparison; the first (primary) drawn bold with its operating point."""
    with new_figure(path, figsize=(6.6, 6.2)) as (fig, ax):
        ax.plot([0, 1], [0, 1], ls="--", lw=1, color="0.6", label="chance")
        colours = sns.color_palette("colorblind", max(len(results), 1))
        for i, res in enumerate(results):
            c = res.curves
            ax.plot(c["fpr"], c["tpr"], lw=2.4 if i == 0 else 1.3, color=colours[i],
                    label=_roc_label(res.row), alpha=1.0 if i == 0 else 0.85)
        if results:
            row = results[0].row
            ax.plot(1 - row["specificity"], row["sensitivity"], "o", ms=8, mfc="white",
                    mec=colours[0], mew=2,
                    label=f"threshold {row['threshold']:.4g} ({row['threshold_rule']})")
        _style_unit_axes(ax, "False positive rate (1 - specificity)",
                         "True positive rate (sensitivity)")
        ax.legend(loc="lower right", fontsize="x-small")
        ax.set_title(title)


def plot_pr(results: Sequence[ComparisonResult], path: Path, title: str) -> None:
    """Precision-recall curves with average precision; dotted line: prevalence of the primary."""
    with new_figure(path, figsize=(6.6, 6.2)) as (fig, ax):
        colours = sns.color_palette("colorblind", max(len(results), 1))
        for i, res in enumerate(results):
            c = res.curves
            ax.step(c["pr_recall"], c["pr_precision"], where="post", lw=2.4 if i == 0 else 1.3,
                    color=colours[i],
                    label=f"{res.row['comparison']}: AP {res.row['average_precision']:.3f}")
        if results:
            prevalence = results[0].y_test.mean()
            ax.axhline(prevalence, ls=":", color=colours[0], lw=1.2,
                       label=f"prevalence {prevalence:.3f} ({results[0].row['comparison']})")
        _style_unit_axes(ax, "Recall (sensitivity)", "Precision")
        ax.legend(loc="lower left", fontsize="x-small")
        ax.set_title(title)


def plot_confusion(result: ComparisonResult, test: pd.DataFrame, path: Path, title: str) -> None:
    """Counts, row-normalised matrix, and the share of each class called anomalous."""
    comp, row = result.comparison, result.row
    anomaly = comp.anomalies[0] if len(comp.anomalies) == 1 else "anomaly"
    counts = result.curves["counts"]  # [2, 2]: rows true, columns predicted (normal, anomaly)
    shares = counts / counts.sum(axis=1, keepdims=True)
    ticks = [f"normal ({comp.normal})", f"anomaly ({anomaly})"]
    per_class = _flag_rates(test, row["threshold"], comp.normal)
    height = max(4.2, 0.45 * len(per_class) + 1.6)
    with new_figure(path, ncols=3, figsize=(13, height),
                    gridspec_kw={"width_ratios": [1, 1, 0.75]}) as (fig, axes):
        sns.heatmap(counts, annot=True, fmt="d", cmap="Blues", cbar=False, ax=axes[0],
                    xticklabels=ticks, yticklabels=ticks, square=True, annot_kws={"size": 13})
        sns.heatmap(shares, annot=True, fmt=".1%", cmap="Blues", vmin=0, vmax=1, cbar=False,
                    ax=axes[1], xticklabels=ticks, yticklabels=ticks, square=True,
                    annot_kws={"size": 13})
        for ax, sub in zip(axes[:2], ("counts", "row-normalised")):
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(f"{comp.name}: {sub}")
        sns.heatmap(per_class[["flagged"]], annot=per_class[["text"]].to_numpy(), fmt="",
                    cmap="Reds", vmin=0, vmax=1, cbar=False, ax=axes[2],
                    xticklabels=["called anomalous"], yticklabels=per_class.index)
        axes[2].set_ylabel("true class (test)")
        axes[2].tick_params(axis="y", rotation=0)
        axes[2].set_title("every class")
        fig.suptitle(f"{title}\nthreshold {row['threshold']:.4g} ({row['threshold_rule']}): "
                     f"sensitivity {row['sensitivity']:.3f}, specificity {row['specificity']:.3f}",
                     fontweight="bold")


def _flag_rates(test: pd.DataFrame, threshold: float, normal: str) -> pd.DataFrame:
    """Per test class: share and count of images with score >= threshold; normal class first."""
    flagged = test.assign(flag=test["score"] >= threshold).groupby("class")["flag"].agg(
        ["mean", "sum", "size"])
    order = [normal] + sorted((c for c in flagged.index if c != normal),
                              key=lambda c: -flagged.loc[c, "size"])
    flagged = flagged.loc[[c for c in order if c in flagged.index]]
    text = [f"{m:.1%} ({int(s)}/{int(n)})" for m, s, n in flagged.to_numpy()]
    return pd.DataFrame({"flagged": flagged["mean"].to_numpy(dtype=float), "text": text},
                        index=flagged.index)


def _class_order(test: pd.DataFrame, normal: str) -> list[str]:
    medians = test.groupby("class")["score"].median()
    others = sorted((c for c in medians.index if c != normal), key=lambda c: medians[c])
    return ([normal] if normal in medians.index else []) + others


def plot_violin(test: pd.DataFrame, normal: str, threshold: float, path: Path, title: str) -> None:
    """Scores of every test class as violins (normal first, others by median); threshold line."""
    order = _class_order(test, normal)
    counts = test["class"].value_counts()
    scores = test["score"].to_numpy()
    log = bool((scores > 0).all() and scores.max() / scores.min() >= 100)
    palette = class_palette(order, normal)
    with new_figure(path, figsize=(max(6.4, 1.1 * len(order) + 2.5), 5.2)) as (fig, ax):
        sns.violinplot(data=test, x="class", y="score", hue="class", order=order,
                       hue_order=order, palette=palette, cut=0, inner="quart", density_norm="width",
                       log_scale=log, legend=False, ax=ax, linewidth=1)
        sns.stripplot(data=test, x="class", y="score", order=order, color="0.15", size=2,
                      alpha=0.35, jitter=0.25, ax=ax)
        ax.axhline(threshold, color="crimson", ls="--", lw=1.4, label=f"threshold {threshold:.4g}")
        ax.set_xticks(range(len(order)), [f"{c}\n(n={counts[c]})" for c in order])
        if log:  # plain numbers instead of mathtext powers of ten
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("class (test split)")
        ax.set_ylabel("anomaly score" + (" (log scale)" if log else ""))
        ax.legend(loc="upper left", fontsize="small")
        ax.set_title(title + (" - log scale" if log else ""))


def plot_report(table: pd.DataFrame, path: Path, title: str) -> None:
    """The classification report of one comparison drawn as a table."""
    cells = [[_fmt(v) for v in r] for r in
             table[["precision", "recall", "f1", "support"]].itertuples(index=False, name=None)]
    with new_figure(path, figsize=(6.8, 0.36 * (len(cells) + 1) + 0.9)) as (fig, ax):
        ax.axis("off")
        tab = ax.table(cellText=cells, rowLabels=table["class"].tolist(),
                       colLabels=["precision", "recall", "F1", "support"], bbox=[0.25, 0, 0.75, 1],
                       cellLoc="center", colColours=["#dde4ee"] * 4)
        tab.auto_set_font_size(False)
        tab.set_fontsize(10)
        for (r, _), cell in tab.get_celld().items():
            if r == 0:
                cell.set_text_props(fontweight="bold")
        ax.set_title(title)


def _fmt(value) -> str:
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return "" if value is None or math.isnan(value) else f"{value:.3f}"


def plot_roc_all(primary: dict[str, Sequence[ComparisonResult]], path: Path) -> None:
    """Every method's ROC for the main comparisons (one panel each); baselines dashed grey."""
    names = list(dict.fromkeys(r.comparison.name for rs in primary.values() for r in rs))
    with new_figure(path, ncols=max(len(names), 1), figsize=(6.2 * max(len(names), 1), 6.0),
                    squeeze=False) as (fig, axes):
        colours = dict(zip(primary, sns.color_palette("colorblind", max(len(primary), 1))))
        for ax, name in zip(axes[0], names):
            ax.plot([0, 1], [0, 1], ls="--", lw=1, color="0.6")
            runs = [(m, r) for m, rs in primary.items() for r in rs if r.comparison.name == name]
            for method, res in sorted(runs, key=lambda t: -t[1].row["auc"]):  # best first
                baseline = method in BASELINES
                ax.plot(res.curves["fpr"], res.curves["tpr"], lw=1.6 if baseline else 2.2,
                        ls="--" if baseline else "-", color="0.35" if baseline else colours[method],
                        label=f"{method}: {_roc_label(res.row).split(': ', 1)[1]}")
            _style_unit_axes(ax, "False positive rate (1 - specificity)",
                             "True positive rate (sensitivity)")
            ax.legend(loc="lower right", fontsize="x-small")
            ax.set_title(f"ROC, all methods: {name} (test)")


# ------------------------------------------------------------------------------ the command


def evaluate_scores(options: EvaluateOptions) -> Summary:
    """Evaluate every `<method>.xlsx` of `options.scores_dir`; figures and summary to outdir."""
    options = _checked(options)
    notes: list[str] = []
    if options.baseline == "knn-pixels":
        notes += _ensure_baseline(options)
    frames = load_score_sheets(options.scores_dir)
    normal = resolve_normal_class(frames, options.normal_class)
    files: list[Path] = []
    rows, primary = [], {}
    for method, df in frames.items():
        comparisons = build_comparisons(df, normal, options.anomaly_class, method=method)
        results = [r for c in comparisons if (r := evaluate_comparison(method, df, c, options))]
        if not results:
            raise UserError(f"Score sheet {method}.xlsx has no test images of both the normal "
                            f"class '{normal}' and another class; score the test split.")
        notes += [r.note for r in results if r.note]
        files += _method_outputs(method, df, results, options.outdir)
        rows += [r.row for r in results]
        primary[method] = [r for r in results if r.comparison.name in
                           (results[0].comparison.name, f"{normal} vs rest")]
    files.append(options.outdir / "roc_all.png")
    plot_roc_all(primary, files[-1])
    table = pd.DataFrame(rows)
    files += write_summary(table, options, notes)
    return Summary(table=table, notes=tuple(notes), files=tuple(files))


def _checked(options: EvaluateOptions) -> EvaluateOptions:
    parse_threshold(options.threshold)
    if options.bootstrap < 0:
        raise UserError(f"--bootstrap {options.bootstrap} is negative; use 0 (no CI) or e.g. 1000.")
    if options.baseline not in BASELINES:
        raise UserError(f"--baseline '{options.baseline}' is unknown; use "
                        f"{' or '.join(BASELINES)}.")
    if not Path(options.scores_dir).is_dir():
        raise UserError(f"--scores {options.scores_dir} is not a folder; give the folder that "
                        f"`anostyle score` wrote.")
    return replace(options, scores_dir=Path(options.scores_dir), outdir=Path(options.outdir),
                   prepared=None if options.prepared is None else Path(options.prepared))


def load_score_sheets(scores_dir: Path) -> dict[str, pd.DataFrame]:
    """Every `<method>.xlsx` (method = file stem) except the combined sheets; baseline last."""
    paths = [p for p in sorted(Path(scores_dir).glob("*.xlsx"))
             if p.name not in SKIPPED_SHEETS and not p.name.startswith(SKIPPED_PREFIXES)]
    if not paths:
        raise UserError(f"{scores_dir} holds no score sheets (<method>.xlsx); run `anostyle "
                        f"score` first or point --scores at its output folder.")
    paths.sort(key=lambda p: (p.stem in BASELINES, p.stem))
    return {p.stem: sheets.read_score_sheet(p) for p in paths}


def resolve_normal_class(frames: dict[str, pd.DataFrame], normal: str | None) -> str:
    """The given normal class (checked), or the one class whose rows carry label 0."""
    found = sorted({c for df in frames.values() for c in df["class"]})
    if normal is not None:
        if normal not in found:
            raise UserError(f"--normal-class '{normal}' does not occur in the score sheets; "
                            f"classes found: {', '.join(found)}.")
        return normal
    zero = sorted({c for df in frames.values() for c in df.loc[df["label"] == 0, "class"]})
    if len(zero) != 1:
        raise UserError(f"The score sheets label {len(zero)} classes as normal "
                        f"({', '.join(zero) or 'none'}); pass --normal-class NAME.")
    return zero[0]


def build_comparisons(df: pd.DataFrame, normal: str, anomaly_class: str | None, *,
                      method: str) -> list[Comparison]:
    """Primary (normal vs anomaly class), pooled (normal vs rest), then each other class."""
    test = df[df["split"] == "test"]
    sizes = test.loc[test["class"] != normal, "class"].value_counts()
    others = sorted(sizes.index, key=lambda c: (-sizes[c], c))
    if anomaly_class is not None and anomaly_class not in others:
        raise UserError(f"--anomaly-class '{anomaly_class}' has no test images in {method}.xlsx; "
                        f"test classes: {', '.join(others) or 'none'}.")
    target = anomaly_class or (DEFAULT_ANOMALY_CLASS if DEFAULT_ANOMALY_CLASS in others else None)
    comparisons = []
    if target is not None:
        comparisons.append(Comparison(f"{normal} vs {target}", normal, (target,)))
    if len(others) > 1 or target is None:
        comparisons.append(Comparison(f"{normal} vs rest", normal, tuple(others)))
    comparisons += [Comparison(f"{normal} vs {c}", normal, (c,)) for c in others if c != target]
    return comparisons


def _method_outputs(method: str, df: pd.DataFrame, results: list[ComparisonResult],
                    outdir: Path) -> list[Path]:
    """All figures of one method plus its classification-report sheet."""
    first = results[0]
    test = df[df["split"] == "test"]
    tables = [classification_table(r) for r in results]
    kinds = ("roc", "pr", "confusion", "violin", "report")
    paths = {k: outdir / f"{k}_{method}.png" for k in kinds}
    plot_roc(results, paths["roc"], f"ROC - {method} (test)")
    plot_pr(results, paths["pr"], f"Precision-recall - {method} (test)")
    plot_confusion(first, test, paths["confusion"], f"Confusion - {method} (test)")
    plot_violin(test, first.comparison.normal, first.row["threshold"], paths["violin"],
                f"Scores by class - {method} (test)")
    plot_report(tables[0], paths["report"],
                f"Classification report - {method}\n{first.comparison.name} (test), "
                f"threshold {first.row['threshold']:.4g}")
    sheet = sheets.write_frames({"report": pd.concat(tables, ignore_index=True)},
                                outdir / f"report_{method}.xlsx", float_format="0.000")
    return [*paths.values(), sheet]


def write_summary(table: pd.DataFrame, options: EvaluateOptions, notes: list[str]) -> list[Path]:
    """summary.xlsx (table + options) and summary.json (options, rows, notes)."""
    config = sheets.config_dict(options)
    xlsx = sheets.write_frames(
        {"summary": table, "options": pd.DataFrame({"option": list(config),
                                                    "value": [str(v) for v in config.values()]}),
         "notes": pd.DataFrame({"note": notes})},
        options.outdir / "summary.xlsx", float_format="0.0000",
        column_formats={"threshold": "General"})  # thresholds live on the score's own scale
    rows = [{k: _json_value(v) for k, v in r.items()} for r in table.to_dict("records")]
    json_path = options.outdir / "summary.json"
    atomic_write_json(json_path, {"options": config, "rows": rows, "notes": notes})
    return [xlsx, json_path]


def _json_value(value):
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _ensure_baseline(options: EvaluateOptions) -> list[str]:
    """Compute knn-pixels.xlsx into the scores folder (reused while newer than the dataset)."""
    return baseline.baseline_sheet(options.scores_dir, options.prepared)


def format_summary(summary: Summary) -> str:
    """A short plain-text table of the summary for the terminal."""
    lines = [f"{'method':<18} {'comparison':<22} {'AUC [95% CI]':<24} {'sens':>6} {'spec':>6}"]
    for r in summary.table.to_dict("records"):
        lines.append(f"{r['method']:<18} {r['comparison']:<22} {r['auc']:.3f}{_ci_text(r):<18} "
                     f"{r['sensitivity']:>6.3f} {r['specificity']:>6.3f}")
    lines += [f"note: {n}" for n in summary.notes]
    lines.append(f"wrote {len(summary.files)} files to {summary.files[-1].parent}")
    return "\n".join(lines)
