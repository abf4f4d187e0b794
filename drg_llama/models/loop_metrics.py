"""The metrics the classifier logs while it trains (``val/...``), as torchmetrics that synchronise across ranks.

Validation runs every epoch (or more often), so it should not gather every probability ``[N, C]`` from every rank
as the final test does. torchmetrics keep per-class counts instead, which DDP/FSDP ranks sum at the end of the
epoch: top-k accuracy, macro-F1 over the DRGs present in the split (DRG-LLaMA's choice), macro one-vs-rest AUROC
over the DRGs with positives and negatives, expected calibration error, and base-DRG and severity accuracy of the
top-1 DRG. The keys equal ``metrics.compute_metrics``'s, and so do the values, except AUROC, which is binned here
(``AUROC_THRESHOLDS`` thresholds: within about 1e-3 of the exact value) so its state does not grow with the split.
The final ``metrics.json`` (test, ``evaluate``) comes from ``metrics.py`` on the gathered probabilities.

A gold DRG unseen in training (index -1) counts as a miss, as in ``metrics.with_unseen_class``: it becomes one extra
class whose probability is 0.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassCalibrationError,
    MulticlassF1Score,
    MulticlassStatScores,
)

from drg_llama.metrics import ECE_BINS, label_info

#: Thresholds of the binned AUROC: a constant-size state ([thresholds, classes, 2, 2]) whatever the split's size.
AUROC_THRESHOLDS = 200
_SEVERITY_BITS = {"NONE": 1, "CC": 2, "MCC": 4}


class DRGLoopMetrics(nn.Module):
    """Accumulates one evaluation epoch over a label space's DRG classes; ``compute`` returns the logged values.

    Args:
        space: The run's ``LabelSpace``.
        ks: Top-k cut-offs (those above the number of classes are left out).
    """

    def __init__(self, space, ks: tuple[int, ...] = (1, 5, 10)):
        super().__init__()
        classes = space.num_classes + 1  # + the "unseen in training" column
        self.classes = classes
        self.top_k = nn.ModuleDict(
            {f"top{k}": MulticlassAccuracy(classes, top_k=k, average="micro") for k in ks if k <= classes}
        )
        self.f1 = MulticlassF1Score(classes, average=None)
        self.auroc = MulticlassAUROC(classes, average=None, thresholds=AUROC_THRESHOLDS)
        self.support = MulticlassStatScores(classes, average=None)
        self.ece = MulticlassCalibrationError(classes, n_bins=ECE_BINS, norm="l1")
        self.base_acc, self.severity_acc = MeanMetric(), MeanMetric()
        info = label_info(space)
        bases = [*info.base_of_class, -1]  # the unseen column matches no predicted class
        severities = [sum(_SEVERITY_BITS[s] for s in sev) for sev in info.severity_of_class] + [0]
        self.register_buffer("base_of_class", torch.tensor(np.asarray(bases, dtype=np.int64)), persistent=False)
        self.register_buffer("severity_of_class", torch.tensor(severities, dtype=torch.long), persistent=False)

    def update(self, probs: torch.Tensor, gold: torch.Tensor) -> None:
        """``probs`` [N, D] over the space's DRGs, ``gold`` [N] class indices (-1: a DRG unseen in training)."""
        probs = torch.cat([probs.float(), probs.new_zeros(len(probs), 1, dtype=torch.float32)], dim=1)  # [N, D+1]
        gold = torch.where(gold < 0, self.classes - 1, gold)  # [N]
        for metric in (*self.top_k.values(), self.f1, self.auroc, self.support, self.ece):
            metric.update(probs, gold)
        pred = probs.argmax(-1)  # [N]
        self.base_acc.update((self.base_of_class[pred] == self.base_of_class[gold]).float())
        self.severity_acc.update((self.severity_of_class[pred] == self.severity_of_class[gold]).float())

    def compute(self) -> dict[str, float]:
        """Synchronised over ranks; keys as ``metrics.compute_metrics``."""
        out = {name: float(metric.compute()) for name, metric in self.top_k.items()}
        support = self.support.compute()[:, 4]  # [C] gold examples per class (tp + fn)
        present = support > 0
        out["macro_f1_present"] = float(self.f1.compute()[present].mean())
        scorable = present & (support < support.sum())  # AUROC needs positives and negatives
        auroc = self.auroc.compute()[scorable]
        out["macro_auc"] = float(auroc.mean()) if len(auroc) else float("nan")
        out["ece"] = float(self.ece.compute())
        out["base_acc"], out["severity_acc"] = float(self.base_acc.compute()), float(self.severity_acc.compute())
        return out

    def reset(self) -> None:
        for metric in (*self.top_k.values(), self.f1, self.auroc, self.support, self.ece, self.base_acc):
            metric.reset()
        self.severity_acc.reset()


__all__ = ["AUROC_THRESHOLDS", "DRGLoopMetrics"]
