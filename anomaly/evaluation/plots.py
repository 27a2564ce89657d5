"""Every evaluation figure: ROC, PR, confusion, violins, classification-report tables, and the
shared figure style that methods/heatmap.py and tsne.py use. Figures only: the numbers come in
computed.

Figures are drawn on bare matplotlib Figures (Agg canvas, no pyplot state) and saved atomically.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Iterator, Sequence

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import ticker
from matplotlib.figure import Figure

from anomaly.evaluation.protocol import ComparisonResult
from stylegan.fileio import atomic_path


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
            prevalence = results[0].y.mean()
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
        axes[2].set_ylabel("true class")
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
        ax.set_xlabel("class")
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


def plot_roc_all(primary: dict[str, Sequence[ComparisonResult]], path: Path, *,
                 baselines: Sequence[str] = (), split: str = "test") -> None:
    """Every method's ROC for the main comparisons (one panel each); baselines dashed grey."""
    names = list(dict.fromkeys(r.comparison.name for rs in primary.values() for r in rs))
    with new_figure(path, ncols=max(len(names), 1), figsize=(6.2 * max(len(names), 1), 6.0),
                    squeeze=False) as (fig, axes):
        colours = dict(zip(primary, sns.color_palette("colorblind", max(len(primary), 1))))
        for ax, name in zip(axes[0], names):
            ax.plot([0, 1], [0, 1], ls="--", lw=1, color="0.6")
            runs = [(m, r) for m, rs in primary.items() for r in rs if r.comparison.name == name]
            for method, res in sorted(runs, key=lambda t: -t[1].row["auc"]):  # best first
                baseline = method in baselines
                ax.plot(res.curves["fpr"], res.curves["tpr"], lw=1.6 if baseline else 2.2,
                        ls="--" if baseline else "-", color="0.35" if baseline else colours[method],
                        label=f"{method}: {_roc_label(res.row).split(': ', 1)[1]}")
            _style_unit_axes(ax, "False positive rate (1 - specificity)",
                             "True positive rate (sensitivity)")
            ax.legend(loc="lower right", fontsize="x-small")
            ax.set_title(f"ROC, all methods: {name} ({split})")
