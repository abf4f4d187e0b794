"""Analysis beyond top-k and F1: calibration, selective coding, payment impact, breakdowns, severity confusion.

Pure numpy functions, each tested on a hand-computed example in ``tests/test_analysis.py``. ``evaluate`` calls
:func:`analysis_report` and writes its sections into ``eval/metrics.json``; the notebooks and
``python -m drg_llama.report`` read them back through :mod:`drg_llama.plots`::

    python -m drg_llama.evaluate --run runs/two_label/version_0 --target-accuracy 0.95 --base-rate 6500

Definitions (also in the README):

* **Temperature scaling** (Guo et al., 2017) divides the log-probabilities over DRGs by one scalar T fitted on the
  validation split by minimising the negative log-likelihood. For single_label this equals scaling the logits; for
  two_label it scales the joint DRG scores. It never changes the ranking, so top-k, F1 and AUC are unchanged.
* **Selective coding**: a stay is coded automatically when its top-1 (calibrated) probability is at least a
  threshold. The threshold is the lowest one whose accepted validation stays reach the target accuracy; it is then
  applied to test, which reports the coverage (share coded automatically) and the accuracy on those stays.
* **Payment impact** uses the CMS relative weights of the label space's version (Table 5; v43/v43.1 ship them):
  per stay ``|w(pred) - w(gold)|``; case-mix index (CMI) = mean weight; dollars = weight x base rate.
* **Frequency bands**: DRGs sorted by training count; *head* = the most frequent DRGs that hold the first 50% of
  training stays, *torso* the next 30%, *tail* the rest and every DRG unseen in training.
* **Severity confusion**: each DRG maps to its *allowed severity set* (the severities its family admits for it),
  one of six labels ordered by severity: NONE (without CC/MCC), NONE|CC (without MCC), CC (with CC), CC|MCC
  (with CC/MCC), MCC (with MCC), ANY (no severity split). Rows are the gold DRG's set, columns the predicted
  DRG's. The diagonal share equals ``severity_acc`` of :func:`drg_llama.metrics.score_predictions` except for gold
  DRGs unseen in training: the matrix still places them by their own allowed set, ``severity_acc`` counts them as
  errors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from drg_llama.drg import SEVERITIES, LabelSpace
from drg_llama.metrics import ECE_BINS, expected_calibration_error, reliability_bins, with_unseen_class
from drg_llama.runs import json_ready

#: Illustrative base rate in USD per unit of relative weight. It is of the order of CMS's national operating
#: standardized amount for recent fiscal years, NOT an official figure: pass your hospital's blended rate.
DEFAULT_BASE_RATE = 6500.0
#: Default target accuracy for selective coding (about what a human coder is expected to reach).
DEFAULT_TARGET_ACCURACY = 0.95
#: Cumulative shares of training stays that close the head and the torso bands.
FREQUENCY_CUTS = (0.5, 0.8)
#: Note-length bands in words; the mean Brief Hospital Course is about 378 words (DRG-LLaMA).
LENGTH_EDGES = (0, 200, 400, 800)
#: Allowed-severity-set labels in severity order (rows and columns of the severity confusion matrix).
SEVERITY_SET_LABELS = ("NONE", "NONE|CC", "CC", "CC|MCC", "MCC", "ANY")
# Probabilities that underflowed to 0 in float32 still need a finite log for the temperature fit.
_LOG_FLOOR = 1e-300


# ----------------------------------------------------------------------------------------------------------------
# calibration


def _log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), _LOG_FLOOR, None))


def apply_temperature(probs: Any, temperature: float) -> np.ndarray:
    """Rescale a distribution over DRGs: softmax(log p / T). T > 1 softens, T < 1 sharpens, T = 1 is the identity.

    Args:
        probs: ``[N, D]`` probabilities (rows sum to 1).
        temperature: Positive scalar.

    Returns:
        ``[N, D]`` float64 probabilities with the same ranking in every row.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    probs = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0:
        return probs
    z = _log_probs(probs) / temperature  # [N, D]
    z -= z.max(1, keepdims=True)
    out = np.exp(z)
    return out / out.sum(1, keepdims=True)


def nll(probs: Any, gold: Any) -> float:
    """Mean negative log-likelihood of the gold classes (rows with gold -1 are skipped)."""
    probs, gold = np.asarray(probs, dtype=np.float64), np.asarray(gold)
    keep = gold >= 0
    if not keep.any():  # no validation split (drg_llama_2023), or only DRGs the model has no class for
        return math.nan
    return float(-_log_probs(probs[keep, gold[keep]]).mean())


def fit_temperature(probs: Any, gold: Any) -> float:
    """Temperature T minimising the NLL of ``softmax(log p / T)`` on held-out rows.

    Rows whose gold DRG is not a class (gold -1: unseen in training) have no finite likelihood at any T and are
    left out. The NLL is convex in the inverse temperature 1/T, so a bounded 1-D search over 1/T in [0.05, 20]
    finds the optimum.

    Args:
        probs: ``[N, D]`` validation probabilities.
        gold: ``[N]`` gold class indices (-1 allowed).

    Returns:
        The fitted temperature (1.0 when no row has a known gold class).
    """
    probs, gold = np.asarray(probs, dtype=np.float64), np.asarray(gold)
    keep = gold >= 0
    if not keep.any():
        return 1.0
    z = _log_probs(probs[keep])  # [M, D]
    z_gold = z[np.arange(len(z)), gold[keep]]  # [M]

    def loss(beta: float) -> float:
        scaled = beta * z
        peak = scaled.max(1)
        return float(np.mean(peak + np.log(np.exp(scaled - peak[:, None]).sum(1)) - beta * z_gold))

    result = minimize_scalar(loss, bounds=(0.05, 20.0), method="bounded", options={"xatol": 1e-6})
    return float(1.0 / result.x)


def calibration_report(
    test_probs: Any, test_gold: Any, val_probs: Any, val_gold: Any, n_bins: int = ECE_BINS
) -> dict[str, Any]:
    """Fit T on validation; ECE, NLL and reliability bins on test before and after scaling.

    Returns:
        ``temperature``, ``n_fit`` (validation rows used), ``val_nll_before/after``, ``nll_before/after``,
        ``ece_before/after`` and ``bins_before/after`` (lists of reliability bins; see ``metrics.reliability_bins``).
    """
    test_probs, test_gold = np.asarray(test_probs, dtype=np.float64), np.asarray(test_gold)
    val_probs, val_gold = np.asarray(val_probs, dtype=np.float64), np.asarray(val_gold)
    temperature = fit_temperature(val_probs, val_gold)
    out: dict[str, Any] = {
        "temperature": temperature,
        "fitted_on": "val",
        "n_fit": int((val_gold >= 0).sum()),
        "val_nll_before": nll(val_probs, val_gold),
        "val_nll_after": nll(apply_temperature(val_probs, temperature), val_gold),
    }
    for tag, probs in (("before", test_probs), ("after", apply_temperature(test_probs, temperature))):
        padded, gold = with_unseen_class(probs, test_gold)
        out[f"nll_{tag}"] = nll(probs, test_gold)
        out[f"ece_{tag}"] = expected_calibration_error(padded, gold, n_bins)
        out[f"bins_{tag}"] = reliability_bins(padded, gold, n_bins)
    return out


# ----------------------------------------------------------------------------------------------------------------
# selective coding


def coverage_accuracy_curve(confidence: Any, correct: Any, points: int = 100) -> list[dict[str, float]]:
    """Accuracy of the most confident stays as a function of the share of stays accepted (coverage).

    Stays are sorted by confidence, highest first (stable, so ties keep input order); at coverage c the first
    ``ceil(c * N)`` stays are accepted.

    Args:
        confidence: ``[N]`` top-1 probabilities.
        correct: ``[N]`` whether the top-1 DRG is right.
        points: Coverages ``1/points, 2/points, ..., 1``.

    Returns:
        One dict per coverage: ``coverage`` (exact share accepted), ``accuracy``, ``threshold`` (lowest accepted
        confidence).
    """
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    n = len(confidence)
    if n == 0:
        return []
    order = np.argsort(-confidence, kind="stable")
    hits = np.cumsum(correct[order])  # [N]
    curve = []
    for m in sorted({max(1, math.ceil(n * i / points)) for i in range(1, points + 1)}):
        curve.append(
            {"coverage": m / n, "accuracy": float(hits[m - 1] / m), "threshold": float(confidence[order[m - 1]])}
        )
    return curve


def selective_threshold(confidence: Any, correct: Any, target: float) -> float | None:
    """Lowest confidence threshold whose accepted stays (confidence >= threshold) reach ``target`` accuracy.

    Stays with equal confidence are accepted or refused together (a threshold cannot split them), so the candidate
    thresholds are the distinct confidence values. Among those that reach the target, the lowest (largest coverage)
    wins.

    Returns:
        The threshold, or None when no threshold reaches the target.
    """
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    if len(confidence) == 0:
        return None
    values, inverse = np.unique(-confidence, return_inverse=True)  # ascending -conf = descending confidence
    hits = np.cumsum(np.bincount(inverse, weights=correct))  # accepted hits when cutting at each distinct value
    counts = np.cumsum(np.bincount(inverse))
    reached = np.flatnonzero(hits / counts >= target - 1e-12)
    return float(-values[reached[-1]]) if len(reached) else None


def selective_at(confidence: Any, correct: Any, threshold: float | None) -> dict[str, float | None]:
    """Coverage and accuracy of the stays with confidence >= ``threshold`` (None accepts nothing)."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    accepted = confidence >= threshold if threshold is not None else np.zeros(len(confidence), dtype=bool)
    n = int(accepted.sum())
    return {
        "coverage": float(n / len(confidence)) if len(confidence) else 0.0,
        "accuracy": float(correct[accepted].mean()) if n else None,
        "n_auto": n,
    }


def selective_report(
    test_probs: Any, test_gold: Any, val_probs: Any, val_gold: Any, target: float = DEFAULT_TARGET_ACCURACY
) -> dict[str, Any]:
    """Pick the threshold on validation, report it on test, plus the test coverage-accuracy curve.

    Confidence is the top-1 probability of the (already calibrated) distributions passed in.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target accuracy must be in (0, 1], got {target}")
    val_probs, test_probs = np.asarray(val_probs), np.asarray(test_probs)
    val_conf, val_ok = val_probs.max(1), val_probs.argmax(1) == np.asarray(val_gold)
    test_conf, test_ok = test_probs.max(1), test_probs.argmax(1) == np.asarray(test_gold)
    threshold = selective_threshold(val_conf, val_ok, target)
    val = selective_at(val_conf, val_ok, threshold)
    test = selective_at(test_conf, test_ok, threshold)
    return {
        "target_accuracy": target,
        "threshold": threshold,
        "val_coverage": val["coverage"],
        "val_accuracy": val["accuracy"],
        "test_coverage": test["coverage"],
        "test_accuracy": test["accuracy"],
        "test_n_auto": test["n_auto"],
        "curve": coverage_accuracy_curve(test_conf, test_ok),
    }


# ----------------------------------------------------------------------------------------------------------------
# payment impact


def payment_impact(
    pred_weight: Any, gold_weight: Any, base_rate: float = DEFAULT_BASE_RATE
) -> dict[str, float | int | None]:
    """What top-1 errors do to payment, from the CMS relative weights of the predicted and gold DRGs.

    Stays where either weight is unknown (NaN) are left out and counted in ``n_unknown_weight``.

    Args:
        pred_weight: ``[N]`` relative weight of the predicted DRG.
        gold_weight: ``[N]`` relative weight of the gold DRG.
        base_rate: USD per unit of relative weight.

    Returns:
        ``weight_mae`` (mean |w_pred - w_gold| per stay), ``cmi_gold``, ``cmi_pred``, ``cmi_error``
        (cmi_pred - cmi_gold), ``cmi_error_rel`` (over cmi_gold), ``dollars_at_risk`` (base_rate x sum |error|:
        gross over- plus under-payment), ``dollars_over`` and ``dollars_under`` (its two parts), ``dollars_net``
        (base_rate x sum error), ``dollars_at_risk_per_stay``, ``base_rate``, ``n``, ``n_unknown_weight``.
    """
    pred_weight = np.asarray(pred_weight, dtype=np.float64)
    gold_weight = np.asarray(gold_weight, dtype=np.float64)
    known = np.isfinite(pred_weight) & np.isfinite(gold_weight)
    error = pred_weight[known] - gold_weight[known]  # [M]
    n = int(known.sum())
    out: dict[str, float | int | None] = {
        "base_rate": float(base_rate),
        "n": n,
        "n_unknown_weight": int((~known).sum()),
    }
    if n == 0:
        keys = ("weight_mae", "cmi_gold", "cmi_pred", "cmi_error", "cmi_error_rel", "dollars_at_risk")
        return out | dict.fromkeys(keys + ("dollars_over", "dollars_under", "dollars_net", "dollars_at_risk_per_stay"))
    cmi_gold, cmi_pred = float(gold_weight[known].mean()), float(pred_weight[known].mean())
    return out | {
        "weight_mae": float(np.abs(error).mean()),
        "cmi_gold": cmi_gold,
        "cmi_pred": cmi_pred,
        "cmi_error": cmi_pred - cmi_gold,
        "cmi_error_rel": (cmi_pred - cmi_gold) / cmi_gold if cmi_gold else None,
        "dollars_at_risk": float(base_rate * np.abs(error).sum()),
        "dollars_over": float(base_rate * error[error > 0].sum()),
        "dollars_under": float(-base_rate * error[error < 0].sum()),
        "dollars_net": float(base_rate * error.sum()),
        "dollars_at_risk_per_stay": float(base_rate * np.abs(error).mean()),
    }


# ----------------------------------------------------------------------------------------------------------------
# breakdowns


def frequency_bands(train_codes: Sequence[int], cuts: tuple[float, float] = FREQUENCY_CUTS) -> dict[int, str]:
    """Band of every DRG seen in training: head, torso or tail by cumulative share of training stays.

    DRGs are sorted by count (ties by code); a DRG is *head* if the stays of the DRGs before it cover less than
    ``cuts[0]`` of training, *torso* if less than ``cuts[1]``, else *tail*. DRGs missing from the result (unseen in
    training) are tail too: use ``bands.get(code, "tail")``.
    """
    codes, counts = np.unique(np.asarray(train_codes, dtype=np.int64), return_counts=True)
    order = np.lexsort((codes, -counts))  # by count desc, then code
    before = np.concatenate([[0], np.cumsum(counts[order])[:-1]]) / counts.sum()  # share covered before each DRG
    bands = {}
    for code, share in zip(codes[order], before):
        bands[int(code)] = "head" if share < cuts[0] else "torso" if share < cuts[1] else "tail"
    return bands


def length_band(n_words: Any, edges: Sequence[int] = LENGTH_EDGES) -> np.ndarray:
    """Label of each note's word-count band, e.g. ``"<200"``, ``"200-399"``, ``"400-799"``, ``">=800"``."""
    n_words = np.asarray(n_words)
    labels = [f"<{edges[1]}"] + [f"{a}-{b - 1}" for a, b in zip(edges[1:-1], edges[2:])] + [f">={edges[-1]}"]
    index = np.searchsorted(np.asarray(edges[1:]), n_words, side="right")  # 0 .. len(edges) - 1
    return np.asarray(labels, dtype=object)[index]


def breakdown(groups: Any, correct: Any, order: Sequence[Any] | None = None, **per_row: Any) -> list[dict[str, Any]]:
    """Per-group size and top-1 accuracy, plus the mean of every extra per-row array given by keyword.

    Args:
        groups: ``[N]`` group label of each stay.
        correct: ``[N]`` top-1 correctness.
        order: Group order of the output (groups absent from the data are skipped); default sorted labels.
        **per_row: ``[N]`` arrays (e.g. ``top5=...``, ``weight_error=...``) averaged per group, NaN ignored.

    Returns:
        ``[{"group", "n", "top1", <key>...}]``.
    """
    groups = np.asarray(groups, dtype=object)
    correct = np.asarray(correct, dtype=np.float64)
    present = set(groups.tolist())
    labels = [g for g in order if g in present] if order is not None else sorted(present, key=str)
    rows = []
    for label in labels:
        mask = groups == label
        row = {"group": label, "n": int(mask.sum()), "top1": float(correct[mask].mean())}
        for key, values in per_row.items():
            chosen = np.asarray(values, dtype=np.float64)[mask]
            row[key] = float(np.nanmean(chosen)) if np.isfinite(chosen).any() else None
        rows.append(row)
    return rows


def severity_set_label(allowed: Any) -> str:
    """Label of an allowed severity set: ``{"NONE", "CC"}`` -> ``"NONE|CC"``; all three -> ``"ANY"``."""
    names = {getattr(s, "value", s) for s in allowed}
    if not names:
        return "?"
    if len(names) == len(SEVERITIES):
        return "ANY"
    return "|".join(s.value for s in SEVERITIES if s.value in names)


def confusion_matrix(gold: Sequence[Any], pred: Sequence[Any], labels: Sequence[Any]) -> list[list[int]]:
    """Counts ``[i][j]`` of stays with gold label ``labels[i]`` and predicted ``labels[j]`` (others ignored)."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for g, p in zip(gold, pred):
        if g in index and p in index:
            matrix[index[g], index[p]] += 1
    return matrix.tolist()


def top_confusions(gold: Sequence[int], pred: Sequence[int], k: int = 10) -> list[dict[str, int]]:
    """The k most frequent (gold DRG, predicted DRG) error pairs with their counts."""
    pairs: dict[tuple[int, int], int] = {}
    for g, p in zip(gold, pred):
        if g != p:
            pairs[(int(g), int(p))] = pairs.get((int(g), int(p)), 0) + 1
    ranked = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:k]
    return [{"gold": g, "pred": p, "count": c} for (g, p), c in ranked]


# ----------------------------------------------------------------------------------------------------------------
# everything evaluate writes


def analysis_report(
    space: LabelSpace,
    probs: Any,
    gold: Any,
    gold_codes: Sequence[int],
    n_words: Sequence[int],
    train_codes: Sequence[int],
    *,
    val_probs: Any,
    val_gold: Any,
    target_accuracy: float = DEFAULT_TARGET_ACCURACY,
    base_rate: float = DEFAULT_BASE_RATE,
    n_bins: int = ECE_BINS,
) -> dict[str, Any]:
    """The sections ``evaluate`` adds to ``metrics.json``: calibration, selective, payment, breakdowns, severity.

    Args:
        space: The run's label space (columns of ``probs``).
        probs: ``[N, D]`` probabilities of the scored split (uncalibrated).
        gold: ``[N]`` gold class indices, -1 for a DRG that is not a class.
        gold_codes: ``[N]`` gold DRG codes (known even when the class is not).
        n_words: ``[N]`` note lengths in words.
        train_codes: DRG codes of the training rows (for the frequency bands).
        val_probs: ``[M, D]`` validation probabilities (uncalibrated) for the temperature and the threshold.
        val_gold: ``[M]`` validation gold class indices.
        target_accuracy: Selective-coding target.
        base_rate: USD per unit of relative weight.
        n_bins: Reliability bins.

    Returns:
        A JSON-ready dict (NaN written as None).
    """
    probs, gold = np.asarray(probs, dtype=np.float64), np.asarray(gold)
    val_probs, val_gold = np.asarray(val_probs, dtype=np.float64), np.asarray(val_gold)
    gold_codes = np.asarray(gold_codes, dtype=np.int64)
    calibration = calibration_report(probs, gold, val_probs, val_gold, n_bins)
    temperature = calibration["temperature"]
    selective = selective_report(
        apply_temperature(probs, temperature),
        gold,
        apply_temperature(val_probs, temperature),
        val_gold,
        target_accuracy,
    )

    drgs = np.asarray(space.drgs, dtype=np.int64)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :5]  # [N, 5]
    pred_codes = drgs[top[:, 0]]  # [N]
    correct = pred_codes == gold_codes
    top5 = (drgs[top] == gold_codes[:, None]).any(1)
    # Predictions are classes; a gold DRG may be unseen in training (not a class) and still has its own facts.
    pred, gold_facts = space.class_facts.take(top[:, 0]), space.facts(gold_codes)
    weight_error = np.abs(pred.weight - gold_facts.weight)  # [N], NaN where unknown
    payment = payment_impact(pred.weight, gold_facts.weight, base_rate)
    payment["drg_version"] = space.version

    gold_mdc, pred_mdc = gold_facts.mdc, pred.mdc
    bands = frequency_bands(train_codes)
    band = np.array([bands.get(int(c), "tail") for c in gold_codes], dtype=object)
    lengths = length_band(n_words)
    extra = {"top5": top5, "weight_error": weight_error}
    mdcs = sorted(set(gold_mdc.tolist()) | set(pred_mdc.tolist()))
    gold_sev = [severity_set_label(s) for s in gold_facts.severities]
    pred_sev = [severity_set_label(s) for s in pred.severities]
    return json_ready(
        {
            "calibration": calibration,
            "selective": selective,
            "payment": payment,
            "breakdowns": {
                "mdc": breakdown(gold_mdc, correct, mdc_acc=gold_mdc == pred_mdc, **extra),
                "frequency_band": breakdown(band, correct, order=("head", "torso", "tail"), **extra),
                "length_band": breakdown(lengths, correct, order=length_band(LENGTH_EDGES).tolist(), **extra),
                "frequency_cuts": list(FREQUENCY_CUTS),
            },
            "severity_confusion": {
                "labels": list(SEVERITY_SET_LABELS),
                "counts": confusion_matrix(gold_sev, pred_sev, SEVERITY_SET_LABELS),
            },
            "mdc_confusion": {"labels": mdcs, "counts": confusion_matrix(gold_mdc, pred_mdc, mdcs)},
            "top_confusions": top_confusions(gold_codes, pred_codes),
        }
    )
