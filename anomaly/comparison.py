"""The records of an evaluation: which classes a comparison sets against each other
(`Comparison`) and everything measured for one method and comparison (`ComparisonResult`);
anomaly.evaluate computes them and anomaly.plots draws them.

Shape letters: M rows of the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


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

    def select(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(y [M] with 1 = anomaly, scores [M]) of the rows of `df` in this comparison."""
        rows = df[self.mask(df)]
        return (np.isin(rows["class"].to_numpy(), self.anomalies).astype(np.int64),
                rows["score"].to_numpy(dtype=np.float64))


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
