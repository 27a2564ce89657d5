"""The supervised reference's classifier: L2 logistic regression on standardised features, its
inverse regularisation C chosen by lesion-grouped cross-validation INSIDE the training rows.

`fit_logistic` receives the validation split's features, labels and lesion ids only; nothing
else reaches it, so the held-out split cannot influence C or the weights. The folds are
`StratifiedGroupKFold` (one lesion never sits on both sides of a fold; class balance kept), the
criterion is the pooled out-of-fold ROC AUC, and ties go to the smaller C (stronger
regularisation). The out-of-fold scores of the chosen C are returned as honest validation scores
(each image scored by a model that never saw its lesion).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from anomaly.evaluation.metrics import roc_auc
from stylegan.errors import UserError

MAX_ITER = 2000


@dataclass(frozen=True)
class FittedReference:
    """A fitted classifier and how its one setting was chosen (cross-validation inside the
    training rows). `model.decision_function(inputs)` gives the anomaly logit."""

    model: object
    setting: str  # the name of the chosen setting, e.g. 'C' or 'epochs'
    value: float
    cv_auc: dict[float, float]  # setting value -> pooled out-of-fold AUC
    oof_scores: np.ndarray  # [N] out-of-fold anomaly logit of each training row, chosen value
    folds: int

    def score(self, inputs) -> np.ndarray:
        """Anomaly score (the logit of the anomaly class) of each row: [M]."""
        return np.asarray(self.model.decision_function(inputs), dtype=np.float64)


def make_classifier(c: float, *, seed: int = 0) -> Pipeline:
    """StandardScaler + L2 logistic regression with inverse regularisation `c`."""
    return make_pipeline(StandardScaler(),
                         LogisticRegression(C=c, max_iter=MAX_ITER, random_state=seed))


def grouped_folds(y: np.ndarray, groups: np.ndarray, folds: int, *,
                  seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, held-out rows) of `folds` lesion-grouped, class-stratified folds."""
    n_groups = min(len(np.unique(groups[y == k])) for k in (0, 1))
    if n_groups < folds:
        raise UserError(f"The validation split has only {n_groups} lesions of one class, fewer "
                        f"than the {folds} cross-validation folds; use fewer folds.")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y, groups))


def fit_logistic(features: np.ndarray, y: np.ndarray, groups: np.ndarray, *,
                 cs: tuple[float, ...], folds: int = 5, seed: int = 0) -> FittedReference:
    """Choose C by grouped cross-validation on (features, y, groups), then refit on all rows."""
    x = np.asarray(features, dtype=np.float64)  # [N, D]
    y = np.asarray(y, dtype=np.int64)
    assert x.ndim == 2 and len(x) == len(y) == len(groups), (x.shape, len(y), len(groups))
    splits = grouped_folds(y, np.asarray(groups), folds, seed=seed)
    oof = {c: np.zeros(len(y)) for c in cs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for train, held in splits:
            for c in cs:
                model = make_classifier(c, seed=seed).fit(x[train], y[train])
                oof[c][held] = model.decision_function(x[held])
        cv_auc = {c: roc_auc(y, oof[c]) for c in cs}
        best = max(cs, key=lambda c: (cv_auc[c], -c))
        final = make_classifier(best, seed=seed).fit(x, y)
    return FittedReference(final, "C", best, cv_auc, oof[best], folds)
