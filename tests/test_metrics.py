"""Metrics equal scikit-learn's (and torchmetrics' ECE) on random data, and match hand-computed small cases.

Run: pytest tests/test_metrics.py
"""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score, top_k_accuracy_score
from torchmetrics.functional.classification import multiclass_calibration_error

from drg_llama.metrics import (
    LabelInfo,
    compute_metrics,
    expected_calibration_error,
    macro_auc,
    reliability_bins,
    top_k_accuracy,
)


def _random_case(seed: int, n: int = 400, c: int = 30):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)) * 2
    gold = rng.integers(0, c - 5, size=n)  # the last 5 classes never occur in gold
    logits[np.arange(n), gold] += rng.normal(1.0, 1.0, size=n)  # some signal, so metrics are not trivial
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, gold


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_sklearn_on_random_data(seed):
    probs, gold = _random_case(seed)
    c = probs.shape[1]
    m = compute_metrics(probs, gold)
    pred = probs.argmax(1)
    present = np.unique(gold)
    for k in (1, 5, 10):
        assert m[f"top{k}"] == pytest.approx(top_k_accuracy_score(gold, probs, k=k, labels=np.arange(c)), abs=1e-6)
    sk_present = f1_score(gold, pred, labels=present, average="macro", zero_division=0)
    sk_all = f1_score(gold, pred, labels=np.arange(c), average="macro", zero_division=0)
    sk_micro = f1_score(gold, pred, labels=np.arange(c), average="micro", zero_division=0)
    assert m["macro_f1_present"] == pytest.approx(sk_present, abs=1e-6)
    assert m["macro_f1_all"] == pytest.approx(sk_all, abs=1e-6)
    assert m["micro_f1"] == pytest.approx(sk_micro, abs=1e-6)
    sk_auc = np.mean([roc_auc_score(gold == k, probs[:, k]) for k in present])
    assert m["macro_auc"] == pytest.approx(sk_auc, abs=1e-6)
    assert m["auc_classes"] == len(present) and m["auc_classes_skipped"] == 0
    tm_ece = multiclass_calibration_error(torch.tensor(probs), torch.tensor(gold), num_classes=c, n_bins=15, norm="l1")
    assert m["ece"] == pytest.approx(float(tm_ece), abs=1e-6)
    assert m["n"] == len(gold) and m["num_classes"] == c and m["classes_present"] == len(present)


def test_auc_with_ties_equals_sklearn():
    rng = np.random.default_rng(3)
    probs = rng.integers(0, 4, size=(200, 6)).astype(float)  # heavy ties
    gold = rng.integers(0, 6, size=200)
    auc, used, skipped = macro_auc(probs, gold)
    assert auc == pytest.approx(np.mean([roc_auc_score(gold == k, probs[:, k]) for k in range(6)]), abs=1e-9)
    assert (used, skipped) == (6, 0)


def test_hand_computed_example():
    # 4 examples, 3 classes; class 2 never occurs in gold.
    probs = np.array(
        [
            [0.7, 0.2, 0.1],  # gold 0, pred 0
            [0.6, 0.3, 0.1],  # gold 1, pred 0
            [0.2, 0.5, 0.3],  # gold 1, pred 1
            [0.1, 0.3, 0.6],  # gold 0, pred 2
        ]
    )
    gold = np.array([0, 1, 1, 0])
    m = compute_metrics(probs, gold, ks=(1, 2))
    assert m["top1"] == 0.5
    assert m["top2"] == 0.75  # example 4: gold 0 is ranked third
    # class 0: tp 1, fp 1, fn 1 -> F1 1/2; class 1: tp 1, fp 0, fn 1 -> 2/3; class 2: tp 0, fp 1 -> 0.
    assert m["macro_f1_present"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["macro_f1_all"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert m["micro_f1"] == 0.5
    # class 0: positives {0.7, 0.1}, negatives {0.6, 0.2}: pairs won 2 of 4 -> 0.5.
    # class 1: positives {0.3, 0.5}, negatives {0.2, 0.3}: 0.3 beats 0.2, ties 0.3, 0.5 beats both -> 3.5/4.
    assert m["macro_auc"] == pytest.approx((0.5 + 3.5 / 4) / 2)
    assert (m["auc_classes"], m["auc_classes_skipped"]) == (2, 0)


def test_ece_hand_example():
    probs = np.array(
        [
            [0.40, 0.35, 0.25],  # conf 0.40, correct
            [0.90, 0.05, 0.05],  # conf 0.90, correct
            [0.80, 0.10, 0.10],  # conf 0.80, wrong
            [0.10, 0.70, 0.20],  # conf 0.70, correct
            [0.60, 0.30, 0.10],  # conf 0.60, wrong
        ]
    )
    gold = np.array([0, 0, 1, 1, 2])
    # Two bins: [0, 0.5) holds one example (acc 1, conf 0.4); [0.5, 1] holds four (acc 0.5, conf 0.75).
    assert expected_calibration_error(probs, gold, n_bins=2) == pytest.approx(1 / 5 * 0.6 + 4 / 5 * 0.25)
    bins = reliability_bins(probs, gold, n_bins=2)
    assert [b["count"] for b in bins] == [1, 4]
    assert bins[1]["confidence"] == pytest.approx(0.75) and bins[1]["accuracy"] == 0.5
    # A confidence of exactly 1 lands in the last bin; empty bins are kept.
    one_hot = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert expected_calibration_error(one_hot, np.array([0, 1]), n_bins=15) == pytest.approx(0.5)
    assert len(reliability_bins(one_hot, np.array([0, 1]))) == 15
    assert math.isnan(reliability_bins(one_hot, np.array([0, 1]))[0]["accuracy"])


def test_ties_count_against_gold():
    # Unseen classes get probability 0: gold tied with three other zeros is not "in the top 3".
    probs = np.array([[1.0, 0.0, 0.0, 0.0, 0.0]])
    assert top_k_accuracy(probs, np.array([3]), k=3) == 0.0
    assert top_k_accuracy(probs, np.array([3]), k=5) == 1.0


def test_label_info_accuracies():
    # Classes: 0 = 291 {MCC}, 1 = 292 {CC}, 2 = 293 {NONE}, 3 = 871 {MCC}, 4 = 872 {NONE, CC}.
    info = LabelInfo(
        base_of_class=[291, 291, 291, 871, 871],
        severity_of_class=[["MCC"], ["CC"], ["NONE"], ["MCC"], ["CC", "NONE"]],
        mdc_of_class=["05", "05", "05", "18", "18"],
        weight_of_class=[1.3, 0.9, 0.7, 1.9, 1.0],
    )
    pred = np.array([0, 1, 3, 4, 0])
    gold = np.array([0, 2, 0, 4, 3])
    probs = np.eye(5)[pred] * 0.9 + 0.02  # top-1 = pred
    m = compute_metrics(probs, gold, label_info=info)
    assert m["base_acc"] == pytest.approx(3 / 5)  # wrong: pred 871 for 291, pred 291 for 871
    assert m["severity_acc"] == pytest.approx(4 / 5)  # wrong only where pred {CC} vs gold {NONE}
    assert m["mdc_acc"] == pytest.approx(3 / 5)
    assert m["weight_mae"] == pytest.approx((0 + 0.2 + 0.6 + 0 + 0.6) / 5)
    # A class without a weight (NaN) drops those examples from weight_mae instead of making it NaN.
    nan_info = LabelInfo(info.base_of_class, info.severity_of_class, info.mdc_of_class, [1.3, 0.9, 0.7, 1.9, np.nan])
    assert compute_metrics(probs, gold, label_info=nan_info)["weight_mae"] == pytest.approx((0 + 0.2 + 0.6 + 0.6) / 4)


def test_single_class_split_skips_auc_and_torch_inputs_work():
    probs = torch.softmax(torch.randn(6, 4), -1).to(torch.bfloat16)
    m = compute_metrics(probs, torch.zeros(6, dtype=torch.long))
    assert math.isnan(m["macro_auc"]) and m["auc_classes_skipped"] == 1 and m["auc_classes"] == 0


@pytest.mark.parametrize(
    "probs, gold, message",
    [
        (np.ones(3), np.zeros(3, dtype=int), r"shape \[N, C\]"),
        (np.ones((3, 2)), np.zeros(2, dtype=int), r"shape \[N\]"),
        (np.ones((2, 2)), np.array([0, 2]), "must lie in"),
        (np.ones((2, 2)), np.array([0.0, 1.0]), "integer class indices"),
        (np.full((2, 2), np.nan), np.array([0, 1]), "NaN"),
        (np.ones((0, 2)), np.zeros(0, dtype=int), "N = 0"),
    ],
)
def test_bad_input_is_a_clear_error(probs, gold, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(probs, gold)


def test_loop_metrics_equal_metrics_py_and_sum_over_batches():
    """The torchmetrics the classifier logs during validation give metrics.py's values (AUROC within its binning),
    also when the split arrives in batches and holds gold DRGs unseen in training (-1: a miss)."""
    import torch

    from drg_llama.drg import LabelSpace
    from drg_llama.metrics import score_predictions
    from drg_llama.models.loop_metrics import DRGEpochMetrics

    space = LabelSpace.build("v43", "two_label", [291, 292, 293, 871, 872, 190, 191, 192, 637, 638, 639])
    rng = np.random.default_rng(0)
    n, d = 400, space.num_classes
    probs = rng.dirichlet(np.full(d, 0.3), size=n)  # [N, D], no ties
    gold = rng.integers(-1, d, size=n)  # -1: unseen in training
    gold[:3] = [0, 1, 2]
    expected = score_predictions(space, probs, gold)
    loop = DRGEpochMetrics(space)
    for start in range(0, n, 64):
        loop.update(torch.tensor(probs[start : start + 64]), torch.tensor(gold[start : start + 64]))
    got = loop.compute()
    for key in ("top1", "top5", "top10", "macro_f1_present", "ece", "base_acc", "severity_acc"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    assert got["macro_auc"] == pytest.approx(expected["macro_auc"], abs=2e-3)
    loop.reset()
    loop.update(torch.tensor(probs[:10]), torch.tensor(gold[:10]))
    assert loop.compute()["top1"] == pytest.approx(score_predictions(space, probs[:10], gold[:10])["top1"])


def test_loop_metrics_on_a_full_label_space_in_deterministic_mode():
    """Softmax over all 772 v43 DRGs puts most probabilities near 0: the log-probability bins keep AUROC within
    1e-3. Deterministic mode (Trainer(deterministic=True)) made torchmetrics' binned AUROC ask for 94 GB here."""
    import torch

    from drg_llama.drg import LabelSpace, get_table
    from drg_llama.metrics import score_predictions
    from drg_llama.models.loop_metrics import DRGEpochMetrics

    space = LabelSpace.build("v43", "single_label", list(get_table("v43").codes))
    gen = torch.Generator().manual_seed(0)
    gold = torch.randint(0, 60, (300,), generator=gen)  # 60 DRGs present, as in a small validation split
    logits = torch.randn(300, space.num_classes, generator=gen) * 3
    logits[torch.arange(300), gold] += 4  # informative scores: AUC well above 0.5
    probs = logits.softmax(-1)
    expected = score_predictions(space, probs.numpy().astype(np.float64), gold.numpy())
    metric = DRGEpochMetrics(space)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for start in range(0, 300, 32):
            metric.update(probs[start : start + 32], gold[start : start + 32])
        got = metric.compute()
    finally:
        torch.use_deterministic_algorithms(was)
    assert got["macro_auc"] == pytest.approx(expected["macro_auc"], abs=1e-3)
    assert got["top5"] == pytest.approx(expected["top5"]) and got["ece"] == pytest.approx(expected["ece"], abs=1e-6)
