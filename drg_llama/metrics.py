"""Metrics over a predicted distribution of DRG classes: top-k, F1, AUC, calibration, base/severity/MDC accuracy.

Pure functions over numpy arrays (torch tensors are accepted and moved to CPU). Every figure is cross-checked
against scikit-learn in ``tests/test_metrics.py``. Both classifier variants and the TF-IDF baseline report through
``compute_metrics`` so their ``metrics.json`` files compare key by key. These are the final, exact figures (test,
``evaluate``); what the classifier logs while it trains comes from torchmetrics (``models/loop_metrics.py``), checked
against these.

Example::

    from drg_llama.metrics import LabelInfo, compute_metrics
    metrics = compute_metrics(probs, gold, label_info=LabelInfo(base, severity_sets, mdc))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from drg_llama.drg import LabelSpace

#: Default number of equal-width confidence bins for the expected calibration error (Guo et al., 2017).
ECE_BINS = 15


@dataclass(frozen=True)
class LabelInfo:
    """What each class index means, so predictions can be scored at coarser levels than the exact DRG.

    Each sequence has one entry per class (the class index is the column of ``probs``). Values only need ``==``.
    """

    base_of_class: Sequence[Any]
    """Base DRG (family) of each class."""
    severity_of_class: Sequence[Any]
    """Allowed effective severities of each class, e.g. ``frozenset({"NONE", "CC"})``; lists are made frozensets."""
    mdc_of_class: Sequence[Any]
    """Major diagnostic category of each class."""
    weight_of_class: Sequence[float] | None = None
    """Optional CMS relative weight per class (NaN if unknown); adds ``weight_mae``, the mean absolute weight error."""


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor; bf16 has no numpy dtype
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() else x
        return x.numpy()
    return np.asarray(x)


def _as_objects(values: Sequence[Any]) -> np.ndarray:
    """1-D object array, turning list-like entries (severity sets) into frozensets so they compare by content."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        if isinstance(v, np.ndarray):
            v = v.tolist()
        out[i] = frozenset(v) if isinstance(v, list | tuple | set | frozenset) else v
    return out


def _check(probs: Any, gold: Any) -> tuple[np.ndarray, np.ndarray]:
    probs = _numpy(probs).astype(np.float64, copy=False)
    gold = _numpy(gold)
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape [N, C], got {probs.shape}.")
    if gold.ndim != 1 or gold.shape[0] != probs.shape[0]:
        raise ValueError(f"gold must have shape [N] with N = {probs.shape[0]}, got {gold.shape}.")
    if probs.shape[0] == 0:
        raise ValueError("No examples to score (N = 0).")
    if not np.issubdtype(gold.dtype, np.integer):
        raise ValueError(f"gold must hold integer class indices, got dtype {gold.dtype}.")
    if gold.min() < 0 or gold.max() >= probs.shape[1]:
        raise ValueError(f"gold class indices must lie in [0, {probs.shape[1]}), got {gold.min()}..{gold.max()}.")
    if not np.isfinite(probs).all():
        raise ValueError("probs contains NaN or infinite values.")
    return probs, gold.astype(np.int64)


def top_k_accuracy(probs: Any, gold: Any, k: int) -> float:
    """Fraction of examples whose gold class is among the k highest-scoring classes.

    Ties count against the gold class: a class scored equal to gold ranks ahead of it, so a model that gives many
    classes the same score (e.g. probability 0 for classes unseen in training) gets no credit by luck. With distinct
    scores this equals ``sklearn.metrics.top_k_accuracy_score``.
    """
    probs, gold = _check(probs, gold)
    gold_score = probs[np.arange(len(gold)), gold][:, None]  # [N, 1]
    rank = (probs > gold_score).sum(1) + (probs == gold_score).sum(1) - 1  # [N], 0 = best
    return float(np.mean(rank < k))


def f1_scores(pred: Any, gold: Any, num_classes: int) -> dict[str, float]:
    """Macro-F1 over classes present in ``gold`` (DRG-LLaMA's choice), macro-F1 over all classes, and micro-F1.

    A class with no true and no predicted examples has F1 = 0 (scikit-learn's ``zero_division=0``), which is why
    ``macro_f1_all`` is lower than ``macro_f1_present`` whenever the split lacks some classes. Micro-F1 over all
    classes of a single-label task equals top-1 accuracy; it is reported for comparability.
    """
    pred = _numpy(pred).astype(np.int64)
    gold = _numpy(gold).astype(np.int64)
    tp = np.bincount(gold[pred == gold], minlength=num_classes)  # [C]
    n_pred = np.bincount(pred, minlength=num_classes)
    n_gold = np.bincount(gold, minlength=num_classes)
    denom = n_pred + n_gold  # = 2tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros(num_classes), where=denom > 0)  # [C]
    present = n_gold > 0
    return {
        "macro_f1_present": float(f1[present].mean()),
        "macro_f1_all": float(f1.mean()),
        "micro_f1": float(tp.sum() / len(gold)),
    }


def macro_auc(probs: Any, gold: Any, chunk: int = 256) -> tuple[float, int, int]:
    """Mean one-vs-rest ROC AUC over the classes present in ``gold``.

    A present class with no negatives (every example is that class) has no AUC and is skipped; so are classes absent
    from ``gold``. Each AUC is the Mann-Whitney statistic with average ranks for ties, as scikit-learn computes it.

    Returns:
        ``(macro_auc, classes_used, classes_skipped)``; ``macro_auc`` is NaN when no class can be scored.
    """
    probs, gold = _check(probs, gold)
    n = len(gold)
    n_pos = np.bincount(gold, minlength=probs.shape[1])  # [C]
    present = np.flatnonzero(n_pos > 0)
    usable = present[n_pos[present] < n]
    aucs = []
    for start in range(0, len(usable), chunk):  # chunks bound the [N, chunk] rank matrix
        cols = usable[start : start + chunk]
        ranks = rankdata(probs[:, cols], axis=0)  # [N, k], average ranks for ties
        is_pos = gold[:, None] == cols[None, :]  # [N, k]
        pos = n_pos[cols].astype(np.float64)
        rank_sum = (ranks * is_pos).sum(0)
        aucs.append((rank_sum - pos * (pos + 1) / 2) / (pos * (n - pos)))
    value = float(np.concatenate(aucs).mean()) if aucs else float("nan")
    return value, len(usable), len(present) - len(usable)


def reliability_bins(probs: Any, gold: Any, n_bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Equal-width bins of top-1 confidence with their count, mean confidence and accuracy (a reliability diagram).

    Bin i covers ``[i/n_bins, (i+1)/n_bins)``; a confidence of exactly 1 falls in the last bin (as torchmetrics).
    Empty bins are kept with count 0 and NaN means so the list always has ``n_bins`` entries.
    """
    probs, gold = _check(probs, gold)
    confidence = probs.max(1)  # [N]
    correct = (probs.argmax(1) == gold).astype(np.float64)  # [N]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)  # [N]
    count = np.bincount(index, minlength=n_bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(index, weights=correct, minlength=n_bins)
    bins = []
    for i in range(n_bins):
        c = int(count[i])
        bins.append(
            {
                "lower": float(edges[i]),
                "upper": float(edges[i + 1]),
                "count": c,
                "confidence": float(conf_sum[i] / c) if c else float("nan"),
                "accuracy": float(acc_sum[i] / c) if c else float("nan"),
            }
        )
    return bins


def expected_calibration_error(probs: Any, gold: Any, n_bins: int = ECE_BINS) -> float:
    """Σ_bins (count / N) · |accuracy − mean confidence| over ``reliability_bins``."""
    bins = reliability_bins(probs, gold, n_bins)
    n = sum(b["count"] for b in bins)
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


def compute_metrics(
    probs: Any,
    gold: Any,
    label_info: LabelInfo | None = None,
    *,
    ks: Sequence[int] = (1, 5, 10),
    n_bins: int = ECE_BINS,
) -> dict[str, float]:
    """All headline metrics of a predicted distribution over DRG classes, as a flat dict with stable keys.

    Args:
        probs: ``[N, C]`` probabilities over the C classes of the label space (rows should sum to 1 for ECE).
        gold: ``[N]`` gold class indices.
        label_info: Per-class base DRG, severity set and MDC; adds ``base_acc``, ``severity_acc``, ``mdc_acc``
            (and ``weight_mae`` when weights are given, over examples whose gold and predicted weights are known).
            Scored on the top-1 prediction. ``severity_acc`` asks
            whether the predicted DRG admits the same severity set as the gold one, which is DRG-LLaMA's
            CC/MCC-label accuracy up to its merging of "with CC" and "with CC/MCC".
        ks: Cut-offs for ``top{k}`` keys.
        n_bins: Bins for ``ece``.

    Returns:
        ``n``, ``num_classes``, ``classes_present``, ``top1``/``top5``/``top10``, ``macro_f1_present``,
        ``macro_f1_all``, ``micro_f1``, ``macro_auc``, ``auc_classes``, ``auc_classes_skipped``, ``ece``, and the
        ``label_info`` keys above. Values are Python floats (counts too, for a uniform type); ``macro_auc`` may be NaN.
    """
    probs, gold = _check(probs, gold)
    n, num_classes = probs.shape
    pred = probs.argmax(1)  # [N]
    out: dict[str, float] = {
        "n": float(n),
        "num_classes": float(num_classes),
        "classes_present": float(len(np.unique(gold))),
    }
    for k in ks:
        out[f"top{k}"] = top_k_accuracy(probs, gold, k)
    out.update(f1_scores(pred, gold, num_classes))
    auc, used, skipped = macro_auc(probs, gold)
    out.update({"macro_auc": auc, "auc_classes": float(used), "auc_classes_skipped": float(skipped)})
    out["ece"] = expected_calibration_error(probs, gold, n_bins)
    if label_info is not None:
        columns = {
            "base_acc": label_info.base_of_class,
            "severity_acc": label_info.severity_of_class,
            "mdc_acc": label_info.mdc_of_class,
        }
        for key, values in columns.items():
            if len(values) != num_classes:
                raise ValueError(f"label_info for {key[:-4]} has {len(values)} entries, expected {num_classes}.")
            table = _as_objects(values)
            out[key] = float(np.mean(table[pred] == table[gold]))
        if label_info.weight_of_class is not None:
            weight = np.asarray(label_info.weight_of_class, dtype=np.float64)
            if weight.shape != (num_classes,):
                raise ValueError(f"label_info weights have shape {weight.shape}, expected ({num_classes},).")
            error = np.abs(weight[pred] - weight[gold])  # [N]; NaN where a class has no weight
            known = np.isfinite(error)
            out["weight_mae"] = float(error[known].mean()) if known.any() else float("nan")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Scoring against a label space (shared by the classifier, evaluate and the baseline)


def with_unseen_class(probs: np.ndarray, gold_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Score gold index -1 (a DRG unseen in training) as a miss, never drop it.

    Such rows get one extra class column of probability 0 as their gold class, so every metric counts them wrong.

    Returns:
        ``(probs, gold_index)``, widened by one column when any gold index is -1.
    """
    gold_index = np.asarray(gold_index)
    unseen = gold_index < 0
    if not unseen.any():
        return probs, gold_index
    probs = np.concatenate([probs, np.zeros((len(probs), 1), dtype=probs.dtype)], axis=1)
    return probs, np.where(unseen, probs.shape[1] - 1, gold_index)


def label_info(space: LabelSpace) -> LabelInfo:
    """Per-class base DRG, severity set, MDC and CMS weight (the label space's ``class_facts``) for coarse metrics."""
    facts = space.class_facts
    return LabelInfo(facts.base, facts.severities, facts.mdc, facts.weight)


def score_predictions(space: LabelSpace, probs: np.ndarray, gold_index: np.ndarray) -> dict[str, float]:
    """Metrics over the label space's DRG classes; gold index -1 counts as an error (see ``with_unseen_class``)."""
    info = label_info(space)
    n_unseen = int((np.asarray(gold_index) < 0).sum())
    probs, gold_index = with_unseen_class(probs, gold_index)
    if n_unseen:
        info = LabelInfo(
            [*info.base_of_class, -1],
            [*info.severity_of_class, frozenset()],
            [*info.mdc_of_class, "?"],
            [*info.weight_of_class, math.nan] if info.weight_of_class is not None else None,
        )
    metrics = compute_metrics(probs, gold_index, info)
    metrics["unseen_gold"] = float(n_unseen)
    return metrics
