"""The evaluation protocol: WHAT is compared, shared by `tune`, `evaluate` and the baselines.

How a comparison is measured (AUC, CIs, lesion bootstrap, paired tests, thresholds) lives in
anomaly/evaluation/metrics.py; this module decides which rows are set against which:

- The normal class: the one given, or the single class whose rows carry label 0.
- The comparisons: the main one (normal vs the anomaly class: the given one, else 'mel' when
  present; 'all', or no 'mel', pools every other class), then the pooled one (normal vs rest)
  when it differs, then normal vs each other class, largest first.
- Lesion groups: the `group` column (an empty cell: the image is its own group), the unit the
  bootstrap resamples; None without the column.
- Subgroups of a comparison by the values of a column: the "normals" scope keeps that value's
  normals and every anomaly; the "both" scope keeps that value's rows of both classes, offered
  only when some of the anomalies hold the value and some do not. A subgroup with fewer than
  `minimum` normals is not counted by a worst-case rule.

Shape letters: M rows of the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from stylegan.errors import UserError

from anomaly.evaluation import metrics

DEFAULT_ANOMALY_CLASS = "mel"
ALL_ANOMALIES = "all"  # anomaly class meaning: normal vs every other class


@dataclass(frozen=True)
class Comparison:
    """Normal class versus one or several anomaly classes."""

    name: str
    normal: str
    anomalies: tuple[str, ...]

    def mask(self, df: pd.DataFrame) -> np.ndarray:
        """Rows of `df` in this comparison."""
        cls = df["class"].to_numpy()
        return (cls == self.normal) | np.isin(cls, self.anomalies)

    def labels(self, df: pd.DataFrame) -> np.ndarray:
        """y [M], 1 = anomaly, of the rows of `df` in this comparison."""
        return np.isin(df["class"].to_numpy()[self.mask(df)], self.anomalies).astype(np.int64)

    def select(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(y [M] with 1 = anomaly, scores [M]) of the rows of `df` in this comparison."""
        return self.labels(df), df["score"].to_numpy(dtype=np.float64)[self.mask(df)]


@dataclass(frozen=True)
class ComparisonResult:
    """Everything measured for one method and comparison on the evaluated split."""

    method: str
    comparison: Comparison
    row: dict
    y: np.ndarray  # [M] 1 = anomaly
    s: np.ndarray  # [M] scores
    keys: np.ndarray  # [M] 'split/file' of each row, to pair methods
    groups: np.ndarray | None  # [M] lesion ids, None without a group column
    note: str = ""
    curves: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ classes


def resolve_normal_class(frames: Iterable[pd.DataFrame], normal: str | None, *,
                         where: str) -> str:
    """The given normal class (checked), or the one class whose rows carry label 0.

    `where` names the rows in an error, e.g. 'the score sheets'.
    """
    frames = list(frames)
    if normal is not None:
        found = sorted({c for df in frames for c in df["class"]})
        if normal not in found:
            raise UserError(f"--normal-class {normal!r} does not occur in {where}; classes "
                            f"found: {', '.join(found)}.")
        return normal
    zero = sorted({c for df in frames for c in df.loc[df["label"] == 0, "class"]})
    if len(zero) != 1:
        raise UserError(f"{where[:1].upper()}{where[1:]} label {len(zero)} classes as normal "
                        f"({', '.join(zero) or 'none'}); pass --normal-class NAME.")
    return zero[0]


def anomaly_classes(rows: pd.DataFrame, normal: str) -> list[str]:
    """Every class of `rows` but the normal one, the largest first (then by name)."""
    sizes = rows.loc[rows["class"] != normal, "class"].value_counts()
    return sorted(sizes.index, key=lambda c: (-sizes[c], c))


def build_comparisons(rows: pd.DataFrame, normal: str, anomaly_class: str | None, *,
                      where: str) -> list[Comparison]:
    """Main (normal vs the anomaly class), pooled (normal vs rest) when it differs, then normal
    vs each other class; the first is the main comparison (see the module docstring).

    `rows` are the rows of one split; `where` names them in an error, e.g. 'validation images'.
    """
    others = anomaly_classes(rows, normal)
    target = anomaly_class
    if target is None:
        target = DEFAULT_ANOMALY_CLASS if DEFAULT_ANOMALY_CLASS in others else ALL_ANOMALIES
    if target != ALL_ANOMALIES and target not in others:
        raise UserError(f"--anomaly-class {target!r} has no {where}; classes there: "
                        f"{', '.join(others) or 'none'} (or '{ALL_ANOMALIES}').")
    pooled = Comparison(f"{normal} vs rest", normal, tuple(others))
    each = [Comparison(f"{normal} vs {c}", normal, (c,)) for c in others if c != target]
    if target == ALL_ANOMALIES:
        return [pooled, *each]
    main = Comparison(f"{normal} vs {target}", normal, (target,))
    return [main, *([pooled] if len(others) > 1 else []), *each]


def is_pooled(comparison: Comparison) -> bool:
    """Whether `comparison` sets the normals against every other class (normal vs rest)."""
    return comparison.name == f"{comparison.normal} vs rest"


# ------------------------------------------------------------------------------ groups


def group_labels(df: pd.DataFrame) -> np.ndarray | None:
    """Lesion id of each row (`group` column; an empty cell: the image alone), or None."""
    if "group" not in df.columns:
        return None
    raw = df["group"]
    empty = raw.isna() | (raw.astype(str).str.strip() == "")
    return raw.astype(str).where(~empty, "image:" + df["file"].astype(str)).to_numpy()


# ------------------------------------------------------------------------------ subgroups


def subgroup_labels(df: pd.DataFrame, column: str, edges: tuple[float, ...] | None
                    ) -> tuple[np.ndarray, list[str], str]:
    """Subgroup label of each row, the labels in display order, and how they were made.

    Numbers are binned at `edges`; without edges, a numeric column of more than 8 values is
    binned at its terciles. Otherwise each text value is a subgroup ('missing' for an empty
    cell), in sorted order.
    """
    raw = df[column]
    numeric = pd.to_numeric(raw, errors="coerce")
    if edges is None and numeric.notna().sum() == raw.notna().sum() \
            and raw.dropna().nunique() > 8:
        edges = metrics.auto_edges(numeric.to_numpy(dtype=np.float64)) or None
    if edges is not None:
        if numeric.notna().sum() == 0:
            raise UserError(f"--by {column}:... needs numbers, but column '{column}' holds text; "
                            f"drop the bin edges to group by its values.")
        labels = metrics.bin_labels(numeric.to_numpy(dtype=np.float64), edges)
        order = list(metrics.bin_labels(np.r_[-np.inf, np.asarray(edges), np.nan], edges))
        return labels, [v for v in dict.fromkeys(order) if v in set(labels)], \
            f"bins at {', '.join(f'{e:g}' for e in edges)}"
    text = raw.astype(str).where(raw.notna() & (raw.astype(str).str.strip() != ""), "missing")
    return text.to_numpy(dtype=object), sorted(set(text), key=str), "values"


@dataclass(frozen=True)
class Subgroup:
    """One value of a subgroup column within a comparison's rows."""

    value: str
    normals: np.ndarray  # bool [M]: the value's normals and every anomaly ("normals" scope)
    both: np.ndarray | None  # bool [M]: the value's rows ("both" scope), None when not offered
    n_normal: int  # normals holding the value
    counted: bool  # n_normal >= the minimum: a worst-case rule counts this subgroup


def subgroups(values: np.ndarray, y: np.ndarray, *, order: Sequence[str] | None = None,
              minimum: int = 1) -> list[Subgroup]:
    """The subgroups of a comparison's rows (values [M], y [M] with 1 = anomaly): one per value
    held by some normal, in `order` (default: sorted); see the module docstring."""
    values, y = np.asarray(values, dtype=object), np.asarray(y)
    assert values.shape == y.shape, (values.shape, y.shape)
    normal, anomaly = y == 0, y == 1
    held = set(values[normal])
    order = sorted(held) if order is None else [v for v in order if v in held]
    out = []
    for value in order:
        here = values == value
        n_normal = int((here & normal).sum())
        differ = (here & anomaly).any() and (anomaly & ~here).any()
        out.append(Subgroup(value, here | anomaly, here if differ else None, n_normal,
                            n_normal >= minimum))
    return out


def small_subgroups(found: Iterable[Subgroup]) -> list[str]:
    """'value (n normals)' of each subgroup with too few normals to be counted."""
    return [f"{s.value} ({s.n_normal})" for s in found if not s.counted]
