"""Metric formulas checked on hand-made logits and error tables (values worked out by hand in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from tokenlab.eval.metrics import (
    ALEXNET_ERRORS,
    COLLAPSE_SHARE,
    class_balance,
    corruption_scores,
    expected_calibration_error,
    mce,
    nll,
    relative_mce,
    retention,
    topk_accuracy,
)


def test_topk_accuracy_hand_made():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    targets = torch.tensor([0, 2, 0, 1])
    # top-1 hits: row 0 only -> 1/4; top-2 adds row 1 (2 is second) -> 2/4; k=5 > K=3 counts as K -> 4/4
    assert topk_accuracy(logits, targets, ks=(1, 2, 5)) == {1: 0.25, 2: 0.5, 5: 1.0}


def test_nll_matches_formula():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    targets = torch.tensor([0, 0])
    # p = 1/2 and 3/4 -> NLL = -(log 0.5 + log 0.75) / 2
    assert nll(logits, targets) == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2)


def test_ece_hand_made_bins():
    # confidences 0.9 (correct), 0.9 (wrong), 0.6 (correct) with 2 bins [0, .5], (.5, 1]
    # all in bin 2: conf = 0.8, acc = 2/3 -> ECE = |2/3 - 0.8| = 0.1333...
    def two_class(p: float) -> list[float]:
        return [math.log(p), math.log(1 - p)]

    logits = torch.tensor([two_class(0.9), two_class(0.9), two_class(0.6)])
    targets = torch.tensor([0, 1, 0])
    rel = expected_calibration_error(logits, targets, n_bins=2)
    assert rel.counts == [0, 3]
    assert rel.ece == pytest.approx(abs(2 / 3 - 0.8), abs=1e-6)
    assert math.isnan(rel.accuracy[0]) and rel.accuracy[1] == pytest.approx(2 / 3)
    # 10 bins: 0.9 -> bin (0.8, 0.9], 0.6 -> bin (0.5, 0.6]
    rel10 = expected_calibration_error(logits, targets, n_bins=10)
    # bin 0.9: conf .9, acc .5 -> 2/3 * .4; bin 0.6: conf .6, acc 1 -> 1/3 * .4 ; total .4
    assert rel10.ece == pytest.approx(0.4, abs=1e-6)
    assert rel10.to_dict()["accuracy"][0] is None


def test_ece_perfectly_calibrated_is_zero():
    logits = torch.tensor([[10.0, -10.0]] * 4)
    assert expected_calibration_error(logits, torch.zeros(4, dtype=torch.long)).ece == pytest.approx(0, abs=1e-6)


def test_mce_and_relative_mce_hand_table():
    errors = {"fog": {1: 0.2, 2: 0.4}, "snow": {1: 0.5, 2: 0.7}}
    ref = {"fog": {1: 0.4, 2: 0.6}, "snow": {1: 0.6, 2: 0.6}}
    value, ce = mce(errors, ref)
    # CE_fog = 0.6 / 1.0 ; CE_snow = 1.2 / 1.2
    assert ce == pytest.approx({"fog": 0.6, "snow": 1.0})
    assert value == pytest.approx(0.8)
    rel, rce = relative_mce(errors, clean_error=0.1, reference=ref, reference_clean_error=0.2)
    # rCE_fog = (0.1 + 0.3) / (0.2 + 0.4) ; rCE_snow = (0.4 + 0.6) / (0.4 + 0.4)
    assert rce == pytest.approx({"fog": 0.4 / 0.6, "snow": 1.0 / 0.8})
    assert rel == pytest.approx((0.4 / 0.6 + 1.25) / 2)


def test_mce_against_alexnet_scalar_reference():
    errors = {"fog": {s: ALEXNET_ERRORS["fog"] for s in range(1, 6)}, "saturate": {1: 0.3}}
    value, ce = mce(errors)  # AlexNet itself scores CE = 1; saturate has no reference and is left out
    assert value == pytest.approx(1.0) and list(ce) == ["fog"]


def test_mce_errors():
    with pytest.raises(ValueError, match="no corruption in common"):
        mce({"saturate": {1: 0.1}})
    with pytest.raises(KeyError, match="lacks severities"):
        mce({"fog": {3: 0.1}}, {"fog": {1: 0.2}})


def test_error_free_reference_leaves_the_corruption_out_of_mce(caplog):
    # An easy validation set: the reference makes no error under fog, so CE_fog is undefined; the other
    # corruptions still give an mCE, and a reference with no error anywhere gives none (a warning, no crash).
    acc = {"fog": {1: 0.9}, "snow": {1: 0.5}}
    ref = {"fog": {1: 0.0}, "snow": {1: 0.25}}
    value, ce = mce({c: {s: 1 - a for s, a in sev.items()} for c, sev in acc.items()}, ref)
    assert list(ce) == ["snow"] and value == pytest.approx(2.0)
    assert "fog" in caplog.text
    s = corruption_scores(acc, clean_accuracy=1.0, reference={"fog": {1: 0.0}, "snow": {1: 0.0}},
                          reference_clean_error=0.0, reference_name="base")  # fmt: skip
    assert s.mce is None and s.relative_mce is None and s.robust_accuracy == pytest.approx(0.7)


def test_retention_and_scores():
    assert retention(0.4, 0.8) == 0.5
    assert math.isnan(retention(0.4, 0.0))
    acc = {"fog": {1: 0.8, 2: 0.6}, "snow": {1: 0.4, 2: 0.2}}
    ref = {"fog": {1: 0.4, 2: 0.6}, "snow": {1: 0.6, 2: 0.6}}
    s = corruption_scores(acc, clean_accuracy=0.9, reference=ref, reference_clean_error=0.2, reference_name="base")
    assert s.per_corruption == pytest.approx({"fog": 0.7, "snow": 0.3})
    assert s.per_severity == pytest.approx({1: 0.6, 2: 0.4})
    assert s.robust_accuracy == pytest.approx(0.5)
    assert s.retention == pytest.approx(0.5 / 0.9)
    # errors fog .2/.4 snow .6/.8: CE_fog = .6/1.0, CE_snow = 1.4/1.2
    assert s.mce == pytest.approx((0.6 + 1.4 / 1.2) / 2)
    assert s.relative_mce is not None and s.reference == "base"
    with pytest.raises(ValueError, match="empty accuracy table"):
        corruption_scores({}, 0.5)


def test_class_balance_collapsed_predictor():
    # balanced set, 4 classes x 3 images; the model says class 2 for 11 of 12 images and class 0 once (right)
    targets = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    preds = torch.tensor([0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    b = class_balance(preds, targets, 4)
    # top-1 = 4/12; per class: 1/3, 0, 3/3, 0 -> balanced (1/3 + 1) / 4 = 1/3
    assert b.per_class_accuracy == pytest.approx([1 / 3, 0.0, 1.0, 0.0])
    assert b.balanced_accuracy == pytest.approx(1 / 3)
    assert b.prediction_counts == [1, 0, 11, 0]
    assert (b.majority_class, b.majority_rate, b.majority_true_rate) == (2, pytest.approx(11 / 12), 0.25)
    # H = -(1/12 log 1/12 + 11/12 log 11/12) / log 4
    h = -(1 / 12 * math.log(1 / 12) + 11 / 12 * math.log(11 / 12)) / math.log(4)
    assert b.prediction_entropy == pytest.approx(h) and b.prediction_entropy < 0.25
    assert b.collapsed and b.majority_rate > COLLAPSE_SHARE
    assert b.confusion == [[1, 0, 2, 0], [0, 0, 3, 0], [0, 0, 3, 0], [0, 0, 3, 0]]  # rows true, columns predicted


def test_class_balance_unbalanced_honest_predictor():
    # 8 of 10 images are class 0; a perfect model predicts class 0 for 80 % of them and is not collapsed
    targets = torch.tensor([0] * 8 + [1, 2])
    b = class_balance(targets.clone(), targets, 3)
    assert b.balanced_accuracy == 1.0 and b.majority_rate == pytest.approx(0.8) and not b.collapsed
    # a model that always says class 0 has the same majority class and 80 % top-1, but balanced accuracy 1/3;
    # the set itself is that unbalanced, so it is not flagged as a collapse
    always0 = class_balance(torch.zeros(10, dtype=torch.long), targets, 3)
    assert always0.balanced_accuracy == pytest.approx(1 / 3) and always0.prediction_entropy == 0.0
    assert always0.majority_rate == 1.0 and always0.majority_true_rate == pytest.approx(0.8)
    assert not always0.collapsed


def test_class_balance_uniform_and_absent_classes():
    # each of 3 classes predicted once: entropy 1; class 2 never appears in the targets -> None, left out of the mean
    b = class_balance(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]), 3)
    assert b.prediction_entropy == pytest.approx(1.0)
    assert b.per_class_accuracy == [1.0, 0.5, None] and b.balanced_accuracy == pytest.approx(0.75)
    assert not b.collapsed
    assert class_balance(torch.tensor([0, 0]), torch.tensor([0, 0]), 1).prediction_entropy == 0.0
    with pytest.raises(ValueError, match="outside"):
        class_balance(torch.tensor([3]), torch.tensor([0]), 3)
    with pytest.raises(ValueError, match="no samples"):
        class_balance(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 3)
    with pytest.raises(ValueError, match="one shape"):
        class_balance(torch.tensor([0, 1]), torch.tensor([0]), 3)
