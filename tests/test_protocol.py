"""The evaluation protocol on small hand-made frames: classes, comparisons, groups, subgroups.

Every expected value is written by hand from the frames below.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from anomaly.evaluation import metrics, protocol
from anomaly.evaluation.protocol import Comparison
from stylegan.errors import UserError


def _rows(classes: str) -> pd.DataFrame:
    """One row per letter-coded class: n = nv (label 0), m = mel, b = bkl, c = bcc."""
    names = {"n": "nv", "m": "mel", "b": "bkl", "c": "bcc"}
    return pd.DataFrame({"class": [names[c] for c in classes],
                         "label": [int(c != "n") for c in classes],
                         "file": [f"{i}.png" for i in range(len(classes))],
                         "score": np.arange(len(classes), dtype=np.float64)})


# ------------------------------------------------------------------------------ classes


def test_normal_class_is_the_one_labelled_0_or_the_given_one():
    a, b = _rows("nnm"), _rows("nbc")
    assert protocol.resolve_normal_class([a, b], None, where="the score sheets") == "nv"
    assert protocol.resolve_normal_class([a, b], "bkl", where="the score sheets") == "bkl"
    with pytest.raises(UserError, match=r"--normal-class 'ak' does not occur in the score "
                                        r"sheets; classes found: bcc, bkl, mel, nv\."):
        protocol.resolve_normal_class([a, b], "ak", where="the score sheets")
    two = b.assign(label=[0, 0, 1])  # nv and bkl both labelled normal
    with pytest.raises(UserError, match=r"^The validation data label 2 classes as normal "
                                        r"\(bkl, nv\); pass --normal-class NAME\.$"):
        protocol.resolve_normal_class([two], None, where="the validation data")


def test_comparisons_main_pooled_then_each_class_largest_first():
    rows = _rows("nnnnmmbbbc")  # others by size: bkl 3, mel 2, bcc 1

    def names(frame, anomaly_class):
        return [c.name for c in protocol.build_comparisons(frame, "nv", anomaly_class,
                                                           where="test images")]
    assert names(rows, None) == ["nv vs mel", "nv vs rest", "nv vs bkl", "nv vs bcc"]
    assert names(rows, "bcc") == ["nv vs bcc", "nv vs rest", "nv vs bkl", "nv vs mel"]
    assert names(rows, "all") == ["nv vs rest", "nv vs bkl", "nv vs mel", "nv vs bcc"]
    no_mel = rows[rows["class"] != "mel"]
    assert names(no_mel, None) == ["nv vs rest", "nv vs bkl", "nv vs bcc"]
    assert names(rows[rows["class"].isin(["nv", "mel"])], None) == ["nv vs mel"]  # no pooled
    main, pooled = protocol.build_comparisons(rows, "nv", None, where="test images")[:2]
    assert main == Comparison("nv vs mel", "nv", ("mel",))
    assert pooled == Comparison("nv vs rest", "nv", ("bkl", "mel", "bcc"))
    assert protocol.is_pooled(pooled) and not protocol.is_pooled(main)
    with pytest.raises(UserError, match=r"--anomaly-class 'vasc' has no test images; classes "
                                        r"there: bkl, mel, bcc \(or 'all'\)\."):
        names(rows, "vasc")


def test_a_comparison_selects_its_rows_labels_and_scores():
    rows = _rows("nmbnc")  # scores 0, 1, 2, 3, 4
    comp = Comparison("nv vs mel", "nv", ("mel",))
    np.testing.assert_array_equal(comp.mask(rows), [True, True, False, True, False])
    np.testing.assert_array_equal(comp.labels(rows), [0, 1, 0])
    y, s = comp.select(rows)
    np.testing.assert_array_equal(y, [0, 1, 0])
    np.testing.assert_array_equal(s, [0.0, 1.0, 3.0])
    y, s = Comparison("nv vs rest", "nv", ("mel", "bkl", "bcc")).select(rows)
    np.testing.assert_array_equal(y, [0, 1, 1, 0, 1])
    np.testing.assert_array_equal(s, [0.0, 1.0, 2.0, 3.0, 4.0])


# ------------------------------------------------------------------------------ groups


def test_group_labels_give_an_image_without_a_lesion_its_own_group():
    rows = _rows("nnnnmm").assign(group=["L1", "L1", "", None, " ", "L2"])
    assert protocol.group_labels(rows).tolist() == [
        "L1", "L1", "image:2.png", "image:3.png", "image:4.png", "L2"]
    assert protocol.group_labels(_rows("nm")) is None


# ------------------------------------------------------------------------------ subgroups


# a comparison's rows: six naevi (three follow_up, two histo, one consensus), three melanomas
VALUES = np.array(["follow_up", "follow_up", "follow_up", "histo", "histo", "consensus",
                   "histo", "histo", "histo"], dtype=object)
Y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1])
SCORES = np.array([0.1, 0.5, 0.9, 0.2, 0.3, 0.8, 0.7, 0.6, 0.95])


def test_subgroups_keep_one_value_of_the_normals_and_every_anomaly():
    found = protocol.subgroups(VALUES, Y, minimum=2)
    assert [g.value for g in found] == ["consensus", "follow_up", "histo"]  # sorted
    assert [g.n_normal for g in found] == [1, 3, 2]
    assert [g.counted for g in found] == [False, True, True]  # consensus: 1 < 2 normals
    masks = {g.value: g.normals.astype(int).tolist() for g in found}
    assert masks == {"consensus": [0, 0, 0, 0, 0, 1, 1, 1, 1],
                     "follow_up": [1, 1, 1, 0, 0, 0, 1, 1, 1],
                     "histo": [0, 0, 0, 1, 1, 0, 1, 1, 1]}
    assert all(g.both is None for g in found)  # every melanoma is histo: no "both" scope
    assert protocol.small_subgroups(found) == ["consensus (1)"]
    # AUC per subgroup by hand (pairs melanoma > naevus of the value):
    # follow_up naevi 0.1, 0.5, 0.9: 0.7 and 0.6 beat two, 0.95 beats three: 7 / 9
    # histo naevi 0.2, 0.3: every melanoma beats both: 1; consensus 0.8: only 0.95: 1 / 3
    aucs = {g.value: metrics.roc_auc(Y[g.normals], SCORES[g.normals]) for g in found}
    assert aucs == pytest.approx({"consensus": 1 / 3, "follow_up": 7 / 9, "histo": 1.0})
    worst = min(aucs[g.value] for g in found if g.counted)  # tune's worst-case rule
    assert worst == pytest.approx(7 / 9)  # consensus (1 / 3) is below the minimum
    assert protocol.small_subgroups(protocol.subgroups(VALUES, Y, minimum=1)) == []


def test_both_scope_when_the_anomalies_differ_across_values():
    values = VALUES.copy()
    values[6] = "follow_up"  # one melanoma is now follow_up
    values[8] = "dermoscopy"  # a value held by a melanoma only: no subgroup
    found = {g.value: g for g in protocol.subgroups(values, Y)}
    assert sorted(found) == ["consensus", "follow_up", "histo"]
    assert found["follow_up"].both.astype(int).tolist() == [1, 1, 1, 0, 0, 0, 1, 0, 0]
    assert found["histo"].both.astype(int).tolist() == [0, 0, 0, 1, 1, 0, 0, 1, 0]
    assert found["consensus"].both is None  # no consensus melanoma
    ordered = protocol.subgroups(values, Y, order=["histo", "unseen", "follow_up", "consensus"])
    assert [g.value for g in ordered] == ["histo", "follow_up", "consensus"]


def test_subgroup_labels_of_text_and_binned_numbers():
    rows = pd.DataFrame({"dx_type": ["histo", None, "follow_up", " ", "histo"],
                         "age": [35.0, 40.0, 59.0, 60.0, np.nan]})
    labels, order, how = protocol.subgroup_labels(rows, "dx_type", None)
    assert labels.tolist() == ["histo", "missing", "follow_up", "missing", "histo"]
    assert order == ["follow_up", "histo", "missing"] and how == "values"
    labels, order, how = protocol.subgroup_labels(rows, "age", (40.0, 60.0))
    assert labels.tolist() == ["<40", "[40, 60)", "[40, 60)", ">=60", "missing"]
    assert order == ["<40", "[40, 60)", ">=60", "missing"] and how == "bins at 40, 60"
    with pytest.raises(UserError, match="holds text"):
        protocol.subgroup_labels(rows, "dx_type", (1.0,))
