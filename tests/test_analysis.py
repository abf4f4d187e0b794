"""drg_llama.analysis on hand-computed examples: temperature, selective coding, payment, bands, severity confusion."""

import json
import math

import numpy as np
import pytest

from drg_llama.analysis import (
    analysis_report,
    apply_temperature,
    breakdown,
    calibration_report,
    confusion_matrix,
    coverage_accuracy_curve,
    fit_temperature,
    frequency_bands,
    length_band,
    nll,
    payment_impact,
    selective_at,
    selective_report,
    selective_threshold,
    severity_set_label,
    top_confusions,
)
from drg_llama.drg import DRGFacts, LabelSpace, Severity
from drg_llama.metrics import score_predictions

# ----------------------------------------------------------------------------------------------------------------
# calibration


def test_apply_temperature_by_hand():
    probs = np.array([[0.5, 0.25, 0.25]])
    # T = 0.5 squares the probabilities before renormalising: [0.25, 0.0625, 0.0625] / 0.375
    np.testing.assert_allclose(apply_temperature(probs, 0.5), [[2 / 3, 1 / 6, 1 / 6]])
    np.testing.assert_allclose(apply_temperature(probs, 1.0), probs)
    softened = apply_temperature(probs, 4.0)
    assert softened[0, 0] < 0.5 and softened.argmax() == 0 and softened.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(probs, 0.0)


def test_fit_temperature_matches_the_closed_form():
    # Every row says class 0 with p = 0.9 and is right 60% of the time. The NLL is lowest when the scaled
    # probability equals 0.6: 0.9^b / (0.9^b + 0.1^b) = 0.6  <=>  9^b = 1.5  <=>  T = 1/b = ln 9 / ln 1.5.
    probs = np.tile([0.9, 0.1], (10, 1))
    gold = np.array([0] * 6 + [1] * 4)
    assert fit_temperature(probs, gold) == pytest.approx(math.log(9) / math.log(1.5), rel=1e-4)
    # rows with an unseen gold DRG (-1) are left out of the fit (and of the NLL)
    assert fit_temperature(np.vstack([probs, [[0.5, 0.5]]]), np.append(gold, -1)) == pytest.approx(
        math.log(9) / math.log(1.5), rel=1e-4
    )
    assert nll([[0.5, 0.5], [0.9, 0.1]], [0, -1]) == pytest.approx(math.log(2))
    assert fit_temperature(probs, np.full(10, -1)) == 1.0


def _overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """10 classes; gold is drawn from softmax(logits), but the model reports softmax(4 * logits): over-confident."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 0.3, (n, 10))
    logits[np.arange(n), rng.integers(0, 10, n)] += rng.uniform(0, 6, n)  # a confident margin on one class
    true = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    gold = (true.cumsum(1) < rng.random((n, 1))).sum(1).clip(0, 9)
    probs = np.exp(4 * logits)
    return probs / probs.sum(1, keepdims=True), gold


def test_temperature_scaling_lowers_ece_of_an_overconfident_model():
    val_probs, val_gold = _overconfident(3000, seed=0)
    test_probs, test_gold = _overconfident(3000, seed=1)
    report = calibration_report(test_probs, test_gold, val_probs, val_gold)
    assert report["temperature"] == pytest.approx(4, rel=0.1)  # the over-confidence factor, recovered
    assert report["ece_before"] > 0.15
    assert report["ece_after"] < 0.03
    assert report["nll_after"] < report["nll_before"] and report["val_nll_after"] < report["val_nll_before"]
    assert len(report["bins_before"]) == len(report["bins_after"]) == 15
    # the ranking never changes
    assert (apply_temperature(test_probs, report["temperature"]).argmax(1) == test_probs.argmax(1)).all()


# ----------------------------------------------------------------------------------------------------------------
# selective coding


def test_coverage_accuracy_curve_by_hand():
    curve = coverage_accuracy_curve([0.6, 0.9, 0.7, 0.8], [1, 1, 0, 1], points=4)
    assert [p["coverage"] for p in curve] == [0.25, 0.5, 0.75, 1.0]
    assert [p["accuracy"] for p in curve] == pytest.approx([1.0, 1.0, 2 / 3, 0.75])
    assert [p["threshold"] for p in curve] == [0.9, 0.8, 0.7, 0.6]


def test_selective_threshold_by_hand():
    conf, ok = [0.9, 0.8, 0.7, 0.6], [1, 1, 0, 1]
    assert selective_threshold(conf, ok, 0.75) == 0.6  # all four: 3/4
    assert selective_threshold(conf, ok, 0.9) == 0.8  # the top two: 2/2 (top three: 2/3)
    assert selective_threshold(conf, ok, 1.0) == 0.8
    assert selective_threshold([0.5, 0.5], [0, 0], 0.5) is None
    # tied confidences are accepted together: at 0.9 accuracy is 1/2, at 0.5 it is 2/3
    assert selective_threshold([0.9, 0.9, 0.5], [1, 0, 1], 0.6) == 0.5
    assert selective_at(conf, ok, 0.8) == {"coverage": 0.5, "accuracy": 1.0, "n_auto": 2}
    assert selective_at(conf, ok, None) == {"coverage": 0.0, "accuracy": None, "n_auto": 0}


def test_selective_threshold_reaches_its_target_on_validation():
    val_probs, val_gold = _overconfident(2000, seed=2)
    test_probs, test_gold = _overconfident(2000, seed=3)
    for target in (0.7, 0.8, 0.95):
        report = selective_report(test_probs, test_gold, val_probs, val_gold, target)
        assert report["threshold"] is not None
        assert report["val_accuracy"] >= target
        assert 0 < report["val_coverage"] < 1
        assert report["test_coverage"] == pytest.approx(report["val_coverage"], abs=0.1)  # same distribution
        assert report["curve"][-1]["coverage"] == 1.0
    with pytest.raises(ValueError, match="target"):
        selective_report(test_probs, test_gold, val_probs, val_gold, 1.5)


# ----------------------------------------------------------------------------------------------------------------
# payment


def test_payment_on_two_stays_by_hand():
    # v43 weights: 291 HF with MCC 1.2838, 292 HF with CC 0.8490, 871 sepsis with MCC 1.9425, 872 without 1.0233
    gold_w, pred_w = DRGFacts.of([291, 872], "v43").weight, DRGFacts.of([292, 871], "v43").weight
    np.testing.assert_allclose(gold_w, [1.2838, 1.0233])
    np.testing.assert_allclose(pred_w, [0.8490, 1.9425])
    out = payment_impact(pred_w, gold_w, base_rate=6000)
    # errors: 0.8490 - 1.2838 = -0.4348 (under), 1.9425 - 1.0233 = +0.9192 (over)
    assert out["n"] == 2 and out["n_unknown_weight"] == 0
    assert out["weight_mae"] == pytest.approx((0.4348 + 0.9192) / 2)
    assert out["cmi_gold"] == pytest.approx((1.2838 + 1.0233) / 2)
    assert out["cmi_pred"] == pytest.approx((0.8490 + 1.9425) / 2)
    assert out["cmi_error"] == pytest.approx(0.2422)
    assert out["cmi_error_rel"] == pytest.approx(0.2422 / 1.15355)
    assert out["dollars_at_risk"] == pytest.approx(6000 * 1.3540)
    assert out["dollars_over"] == pytest.approx(6000 * 0.9192)
    assert out["dollars_under"] == pytest.approx(6000 * 0.4348)
    assert out["dollars_net"] == pytest.approx(6000 * 0.4844)
    assert out["dollars_at_risk_per_stay"] == pytest.approx(6000 * 0.677)


def test_payment_skips_unknown_weights():
    out = payment_impact([1.0, np.nan], [2.0, 1.0], base_rate=100)
    assert out["n"] == 1 and out["n_unknown_weight"] == 1 and out["dollars_at_risk"] == pytest.approx(100)
    assert payment_impact([np.nan], [1.0])["weight_mae"] is None
    assert np.isnan(DRGFacts.of([291], "v42").weight[0])  # only v43/v43.1 ship CMS weights


# ----------------------------------------------------------------------------------------------------------------
# breakdowns and confusions


def test_frequency_bands_by_hand():
    # 10 training stays: 101 x5, 102 x3, 103 x1, 104 x1
    bands = frequency_bands([101] * 5 + [102] * 3 + [103, 104])
    # shares covered *before* each DRG: 0 (head), 0.5 (torso: not < 0.5), 0.8 and 0.9 (tail)
    assert bands == {101: "head", 102: "torso", 103: "tail", 104: "tail"}
    assert bands.get(999, "tail") == "tail"  # unseen in training


def test_length_band_edges():
    labels = length_band([0, 199, 200, 399, 400, 799, 800, 5000]).tolist()
    assert labels == ["<200", "<200", "200-399", "200-399", "400-799", "400-799", ">=800", ">=800"]


def test_breakdown_by_hand():
    rows = breakdown(["b", "a", "a"], [1, 1, 0], extra=[3.0, 1.0, np.nan])
    assert rows == [
        {"group": "a", "n": 2, "top1": 0.5, "extra": 1.0},
        {"group": "b", "n": 1, "top1": 1.0, "extra": 3.0},
    ]
    assert [r["group"] for r in breakdown(["x", "y"], [1, 0], order=("y", "z", "x"))] == ["y", "x"]


def test_severity_labels_and_confusions():
    assert severity_set_label({"NONE", "CC"}) == "NONE|CC"
    assert severity_set_label({Severity.MCC}) == "MCC"
    assert severity_set_label({"MCC", "CC", "NONE"}) == "ANY"
    labels = ["NONE", "CC", "MCC"]
    assert confusion_matrix(["CC", "CC", "MCC", "?"], ["CC", "NONE", "MCC", "CC"], labels) == [
        [0, 0, 0],
        [1, 1, 0],
        [0, 0, 1],
    ]
    assert top_confusions([291, 291, 871, 5], [292, 292, 872, 5], k=1) == [{"gold": 291, "pred": 292, "count": 2}]


def test_analysis_report_on_four_stays():
    space = LabelSpace.build("v43", "two_label", [291, 871])  # classes 291 292 293 871 872
    assert space.drgs == (291, 292, 293, 871, 872)
    probs = np.array(
        [
            [0.70, 0.10, 0.10, 0.05, 0.05],  # 291, right
            [0.60, 0.20, 0.10, 0.05, 0.05],  # 291, gold 292: severity over-coded
            [0.05, 0.05, 0.10, 0.20, 0.60],  # 872, right
            [0.10, 0.10, 0.10, 0.60, 0.10],  # 871, gold 190 (not a class: -1)
        ]
    )
    gold = np.array([0, 1, 4, -1])
    report = analysis_report(
        space,
        probs,
        gold,
        gold_codes=[291, 292, 872, 190],
        n_words=[100, 300, 500, 900],
        train_codes=[291, 291, 292, 872],
        val_probs=probs[:3],
        val_gold=gold[:3],
        base_rate=1000,
    )
    json.dumps(report, allow_nan=False)  # standard JSON
    pay = report["payment"]
    w190 = DRGFacts.of([190], "v43").weight[0]
    assert pay["n"] == 4
    assert pay["weight_mae"] == pytest.approx((0 + (1.2838 - 0.8490) + 0 + abs(1.9425 - w190)) / 4)
    sev = report["severity_confusion"]
    diagonal = sum(sev["counts"][i][i] for i in range(len(sev["labels"])))
    # 190 (COPD with MCC) is not a class, but its severity set is known: MCC, as predicted 871's. severity_acc
    # counts every unseen gold DRG as an error; on the three seen stays both agree (2 of 3).
    assert diagonal == 3
    assert score_predictions(space, probs[:3], gold[:3])["severity_acc"] == pytest.approx(2 / 3)
    assert sev["counts"][sev["labels"].index("CC")][sev["labels"].index("MCC")] == 1  # 292 coded, 291 predicted
    bands = {r["group"]: r for r in report["breakdowns"]["frequency_band"]}
    # training shares before each DRG: 291 0 (head), 292 0.5 and 872 0.75 (torso); 190 is unseen (tail)
    assert bands["head"]["n"] == 1 and bands["torso"]["n"] == 2 and bands["tail"]["n"] == 1
    lengths = [r["group"] for r in report["breakdowns"]["length_band"]]
    assert lengths == ["<200", "200-399", "400-799", ">=800"]
    mdc = {r["group"]: r for r in report["breakdowns"]["mdc"]}
    assert mdc["05"]["n"] == 2 and mdc["05"]["top1"] == 0.5 and mdc["04"]["mdc_acc"] == 0.0  # 190 is MDC 04
    assert report["top_confusions"][0]["count"] == 1
    assert report["selective"]["threshold"] is not None and report["calibration"]["n_fit"] == 3
