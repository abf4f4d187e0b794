"""The metrics the classifier logs while it trains (``val/...``): one torchmetrics ``Metric`` of summed counts.

Validation runs every epoch (or more often), so it should not gather every probability ``[N, C]`` from every rank
as the final test does. ``DRGEpochMetrics`` keeps counts instead, which torchmetrics sums over DDP/FSDP ranks when
the epoch ends: top-k hits, per-class true positives / predictions / gold examples (macro-F1 over the DRGs present
in the split, DRG-LLaMA's choice), per-class histograms of the log-probability of positives and negatives (macro
one-vs-rest AUROC over the DRGs with both), confidence/accuracy per calibration bin (ECE), and base-DRG and severity
hits of the top-1 DRG. The keys equal ``metrics.compute_metrics``'s, and so do the values, except AUROC, which is
computed from ``AUROC_BINS`` bins of log-probability (tied within a bin; within about 1e-3 of the exact value).
The final ``metrics.json`` (test, ``evaluate``) comes from ``metrics.py`` on the gathered probabilities.

Why not torchmetrics' own MulticlassAUROC/F1Score: with ``Trainer(deterministic=True)`` their ``bincount`` falls back
to a ``[N*C*T, 4*C*T]`` comparison that asked for 94 GB on a 300-class validation (found in the test suite). Every
update here is a sum over rows of one-hot tensors: deterministic on every device, memory ``[rows, C]`` per chunk.

A gold DRG unseen in training (index -1) counts as a miss, as in ``metrics.with_unseen_class``: it becomes one extra
class whose probability is 0.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric

from drg_llama.metrics import ECE_BINS, label_info

#: Bins of log-probability for AUROC, over [LOG_PROB_FLOOR, 0]: AUROC only needs each class's ranking, and
#: log-probability spreads the mass that plain probabilities pile up near 0 over a thousand classes.
AUROC_BINS = 400
LOG_PROB_FLOOR = -30.0
_SEVERITY_BITS = {"NONE": 1, "CC": 2, "MCC": 4}
_ROWS_PER_CHUNK_ELEMENTS = 1 << 23  # rows x classes x bins per one-hot chunk (~64 MB as int64)


class DRGEpochMetrics(Metric):
    """Counts of one evaluation epoch over a label space's DRG classes; ``compute`` returns the logged values.

    Args:
        space: The run's ``LabelSpace``.
        ks: Top-k cut-offs (those above the number of classes are left out).
    """

    full_state_update = False

    def __init__(self, space, ks: tuple[int, ...] = (1, 5, 10)):
        super().__init__()
        classes = space.num_classes + 1  # + the "unseen in training" column
        self.classes = classes
        self.ks = tuple(k for k in ks if k <= classes)
        info = label_info(space)
        bases = np.asarray([*info.base_of_class, -1], dtype=np.int64)  # the unseen column matches no prediction
        severities = [sum(_SEVERITY_BITS[s] for s in sev) for sev in info.severity_of_class] + [0]
        self.register_buffer("base_of_class", torch.from_numpy(bases), persistent=False)
        self.register_buffer("severity_of_class", torch.tensor(severities), persistent=False)
        counts = {
            "rows": (),
            "top_k_hits": (len(self.ks),),
            "true_positives": (classes,),
            "predicted": (classes,),
            "gold": (classes,),
            "positive_hist": (classes, AUROC_BINS),
            "negative_hist": (classes, AUROC_BINS),
            "bin_count": (ECE_BINS,),
            "bin_confidence": (ECE_BINS,),
            "bin_correct": (ECE_BINS,),
            "base_hits": (),
            "severity_hits": (),
        }
        for name, shape in counts.items():
            dtype = torch.float64 if name == "bin_confidence" else torch.long
            self.add_state(name, default=torch.zeros(shape, dtype=dtype), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, gold: torch.Tensor) -> None:
        """``probs`` [N, D] over the space's DRGs, ``gold`` [N] class indices (-1: a DRG unseen in training)."""
        probs = torch.cat([probs.float(), probs.new_zeros(len(probs), 1, dtype=torch.float32)], dim=1)  # [N, C]
        gold = torch.where(gold < 0, self.classes - 1, gold).long()  # [N]
        n, c = probs.shape
        self.rows += n
        gold_score = probs.gather(1, gold[:, None])  # [N, 1]
        rank = (probs > gold_score).sum(1) + (probs == gold_score).sum(1) - 1  # [N]; ties count against gold
        self.top_k_hits += torch.stack([(rank < k).sum() for k in self.ks])
        pred = probs.argmax(1)  # [N]
        gold_hot = torch.nn.functional.one_hot(gold, c)  # [N, C]
        pred_hot = torch.nn.functional.one_hot(pred, c)
        self.true_positives += (gold_hot * pred_hot).sum(0)
        self.predicted += pred_hot.sum(0)
        self.gold += gold_hot.sum(0)
        self.base_hits += (self.base_of_class[pred] == self.base_of_class[gold]).sum()
        self.severity_hits += (self.severity_of_class[pred] == self.severity_of_class[gold]).sum()
        confidence = probs.max(1).values  # [N]
        ece_bin = (confidence * ECE_BINS).long().clamp(max=ECE_BINS - 1)  # [N]; confidence 1 -> last bin
        ece_hot = torch.nn.functional.one_hot(ece_bin, ECE_BINS)  # [N, bins]
        self.bin_count += ece_hot.sum(0)
        self.bin_confidence += (ece_hot * confidence[:, None].double()).sum(0)
        self.bin_correct += (ece_hot * (pred == gold)[:, None]).sum(0)
        log_prob = probs.clamp(min=1e-30).log().clamp(min=LOG_PROB_FLOOR)  # [N, C]
        auroc_bin = ((log_prob - LOG_PROB_FLOOR) / -LOG_PROB_FLOOR * AUROC_BINS).long().clamp(max=AUROC_BINS - 1)
        step = max(1, _ROWS_PER_CHUNK_ELEMENTS // (c * AUROC_BINS))
        for start in range(0, n, step):  # chunks bound the [rows, C, bins] one-hot
            hot = torch.nn.functional.one_hot(auroc_bin[start : start + step], AUROC_BINS)  # [n', C, bins]
            positive = gold_hot[start : start + step, :, None]  # [n', C, 1]
            self.positive_hist += (hot * positive).sum(0)
            self.negative_hist += (hot * (1 - positive)).sum(0)

    def compute(self) -> dict[str, float]:
        """Synchronised over ranks; keys as ``metrics.compute_metrics``."""
        rows = self.rows.double().clamp(min=1)
        out = {f"top{k}": float(hits / rows) for k, hits in zip(self.ks, self.top_k_hits)}
        denom = (self.predicted + self.gold).double()
        f1 = torch.where(denom > 0, 2 * self.true_positives / denom.clamp(min=1), torch.zeros_like(denom))  # [C]
        present = self.gold > 0
        out["macro_f1_present"] = float(f1[present].mean()) if present.any() else float("nan")
        out["macro_auc"] = _macro_auroc(self.positive_hist.double(), self.negative_hist.double())
        count = self.bin_count.double()
        gap = (self.bin_correct.double() - self.bin_confidence).abs()  # per bin: count * |accuracy - confidence|
        out["ece"] = float(gap.sum() / count.sum().clamp(min=1))
        out["base_acc"] = float(self.base_hits / rows)
        out["severity_acc"] = float(self.severity_hits / rows)
        return out


def _macro_auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Mean over classes with positives and negatives of the Mann-Whitney AUC of binned scores (ties count half).

    Args:
        positive: ``[C, bins]`` how many gold-class rows fell in each bin of that class's score (ascending).
        negative: ``[C, bins]`` the same for the other rows.
    """
    n_pos, n_neg = positive.sum(1), negative.sum(1)  # [C]
    below = negative.cumsum(1) - negative  # [C, bins] negatives strictly below each bin
    wins = (positive * (below + 0.5 * negative)).sum(1)  # [C]
    scorable = (n_pos > 0) & (n_neg > 0)
    if not scorable.any():
        return float("nan")
    return float((wins[scorable] / (n_pos[scorable] * n_neg[scorable])).mean())


__all__ = ["AUROC_BINS", "DRGEpochMetrics"]
