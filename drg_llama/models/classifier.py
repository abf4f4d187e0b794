"""``DRGClassifier``: one LightningModule for the single_label and two_label MS-DRG classifiers.

The label space decides everything variant-specific:

* ``single_label``: the score layer has one output per DRG; loss = cross-entropy.
* ``two_label``: the score layer has ``n_base + 3`` outputs (base DRG, then NONE/CC/MCC); loss = cross-entropy over
  bases + ``severity_weight`` x partial-label NLL, -log sum_{s in allowed(gold)} p(s). The allowed set is what the
  gold DRG admits (872 -> {NONE, CC}), so a "without MCC" stay is not forced to pick NONE or CC.

Both variants turn outputs into one distribution over DRGs (``LabelSpace.drg_log_probs``: softmax, or the joint
decoder), so validation/test log the same metrics. ``decode="argmax"`` scores DRG-LLaMA's independent-argmax
decode instead (top-1 only is meaningful there; it is a point prediction).

Checkpoints hold only trainable tensors (LoRA + score head); the frozen base is rebuilt from the backbone config.
Trained with ``python -m drg_llama.train --variant two_label``.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from drg_llama.drg import LabelSpace
from drg_llama.metrics import score_predictions
from drg_llama.models.backbone import (
    BackboneConfig,
    build_classifier_backbone,
    check_trainable_tensors,
    check_training_setup,
    keep_trainable_tensors,
    pooled_logits,
    save_adapter,
)
from drg_llama.models.loop_metrics import DRGEpochMetrics
from drg_llama.models.packing import is_packed, packed_logits

#: The epoch metrics logged as ``val/<key>`` (torchmetrics) and ``test/<key>`` (metrics.py).
LOGGED_METRICS = ("top1", "top5", "top10", "macro_f1_present", "macro_auc", "ece", "base_acc", "severity_acc")


def partial_label_nll(severity_logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Mean of -log sum_{s in allowed} p(s) over the batch.

    Args:
        severity_logits: [B, 3] logits over NONE, CC, MCC.
        allowed: [B, 3] bool, the severities the gold DRG admits (at least one per row).
    """
    log_p = severity_logits.float().log_softmax(-1)  # [B, 3]
    masked = log_p.masked_fill(~allowed, float("-inf"))
    return -(masked.logsumexp(-1)).mean()


class DRGClassifier(L.LightningModule):
    """LoRA-adapted LLaMA/Qwen sequence classifier over MS-DRGs.

    Args:
        backbone: Which model to load and how to adapt it (LoRA rank, dtype, quantisation...).
        label_space: The classes; linked from the data module (``data.label_space``), never set by hand.
        severity_weight: Weight w of the severity partial-label loss in two_label (DRG-LLaMA used 0.5).
        decode: ``joint`` (distribution over valid DRGs) or ``argmax`` (DRG-LLaMA's independent heads; two_label).
        learning_rate: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: Fraction of the training steps with linear warm-up.
        schedule: Decay after warm-up: ``cosine`` or ``linear`` (to zero).
    """

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        label_space: LabelSpace | dict | None = None,
        severity_weight: float = 0.5,
        decode: Literal["joint", "argmax"] = "joint",
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.05,
        schedule: Literal["cosine", "linear"] = "cosine",
    ):
        super().__init__()
        if label_space is None:
            raise ValueError("DRGClassifier needs a label space; it comes from the data module (data.label_space).")
        if isinstance(label_space, dict):  # reloading from a checkpoint's hyper-parameters
            label_space = LabelSpace.from_dict(label_space)
        if decode not in ("joint", "argmax"):
            raise ValueError(f"decode must be 'joint' or 'argmax', got {decode!r}")
        if schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule must be 'cosine' or 'linear', got {schedule!r}")
        backbone = backbone or BackboneConfig()
        if isinstance(backbone, dict):
            backbone = BackboneConfig(**backbone)
        self.backbone_config = backbone
        self.label_space = label_space
        self.save_hyperparameters({**self._plain_hparams(locals()), "label_space": label_space.to_dict()})
        self.model, self.tokenizer = build_classifier_backbone(backbone, label_space.num_outputs)
        self.model.train()  # from_pretrained returns eval mode, which would silently disable LoRA dropout
        # Checkpoints carry only the trainable tensors; the frozen base is rebuilt from the config on load.
        self.strict_loading = False
        self._eval_outputs: list[dict[str, torch.Tensor]] = []
        # Validation is scored by torchmetrics (per-class counts summed over ranks), test by metrics.py on the
        # gathered probabilities; the keys and, but for the binned AUROC, the values agree (tests/test_metrics.py).
        self.val_metrics = DRGEpochMetrics(label_space)
        self._val_batches = 0

    @staticmethod
    def _plain_hparams(args: dict[str, Any]) -> dict[str, Any]:
        keep = ("severity_weight", "decode", "learning_rate", "weight_decay", "warmup_ratio", "schedule")
        return {"backbone": asdict(args["backbone"]), **{k: args[k] for k in keep}}

    @property
    def variant(self) -> str:
        return self.label_space.variant

    # ----------------------------------------------------------------------------------------------------------
    # forward and loss

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
        num_sequences: int | None = None,
    ) -> torch.Tensor:
        """Raw outputs [B, num_outputs] from each sequence's pooled state (``backbone.pooling``).

        Padded batch: ``input_ids``/``attention_mask`` [B, T]. Packed batch (``drg_llama.models.packing``):
        ``input_ids``/``position_ids``/``seq_ids`` [R, T] and ``num_sequences`` N; the output is then [N, C].
        """
        if seq_ids is not None:
            return packed_logits(
                self.model, input_ids, position_ids, seq_ids, num_sequences, self.backbone_config.pooling
            )
        return pooled_logits(self.model, input_ids, attention_mask, self.backbone_config.pooling)

    def batch_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Outputs [N, num_outputs] for a padded or packed batch, one row per note in label order."""
        if is_packed(batch):
            return self(
                batch["input_ids"],
                position_ids=batch["position_ids"],
                seq_ids=batch["seq_ids"],
                num_sequences=batch["labels"].shape[0],
            )
        return self(batch["input_ids"], batch["attention_mask"])

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = logits.float()
        if self.variant == "single_label":
            loss = F.cross_entropy(logits, batch["labels"], ignore_index=-1)
            return {"loss": loss}
        base_logits, severity_logits = self.label_space.split_logits(logits)
        base_loss = F.cross_entropy(base_logits, batch["base_labels"], ignore_index=-1)
        severity_loss = partial_label_nll(severity_logits, batch["severity_mask"].bool())
        loss = base_loss + self.hparams.severity_weight * severity_loss
        return {"loss": loss, "base_loss": base_loss, "severity_loss": severity_loss}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self.loss(self.batch_logits(batch), batch)
        size = batch["labels"].shape[0]  # notes, also for packed batches
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=size)
        for name in ("base_loss", "severity_loss"):
            if name in losses:
                self.log(f"train/{name}", losses[name], batch_size=size)
        return losses["loss"]

    # ----------------------------------------------------------------------------------------------------------
    # evaluation: collect the distribution over DRGs, score once per epoch over the whole split

    def drg_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Distribution over the label space's DRGs [B, D] under the configured decode."""
        if self.hparams.decode == "argmax":
            codes = self.label_space.argmax_decode(logits)
            onehot = torch.zeros(len(codes), self.label_space.num_classes, device=logits.device)
            onehot[torch.arange(len(codes)), [self.label_space.index(c) for c in codes]] = 1.0
            return onehot
        return self.label_space.drg_log_probs(logits.float()).exp()

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        logits = self.batch_logits(batch)
        has_label = batch["labels"] >= 0
        if has_label.any():
            sub = {k: batch[k][has_label] for k in ("labels", "base_labels", "severity_mask")}  # per-note keys
            self.log(f"{stage}/loss", self.loss(logits[has_label], sub)["loss"], batch_size=int(has_label.sum()))
        probs = self.drg_probs(logits).float()  # [N, D]
        if stage == "val":  # counts synchronised across ranks at the epoch's end; nothing gathered
            self.val_metrics.update(probs, batch["labels"])
            self._val_batches += 1
        else:  # test: the whole split's probabilities, for metrics.json and the predictions file
            self._eval_outputs.append({"probs": probs, "gold": batch["labels"], "row": batch["row"]})

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Distribution over DRGs and row ids of one batch (``Trainer.predict``)."""
        logits = self.batch_logits(batch)
        return {"probs": self.drg_probs(logits).float().cpu(), "row": batch["row"].cpu()}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def gathered_eval_outputs(self) -> dict[str, np.ndarray]:
        """Probabilities, gold indices and row ids of the epoch, from all ranks, ordered by row."""
        local = {k: torch.cat([o[k] for o in self._eval_outputs]) for k in ("probs", "gold", "row")}
        self._eval_outputs.clear()
        if self.trainer is not None and self.trainer.world_size > 1:
            local = _gather_ragged(self, local)
        order = torch.argsort(local["row"])
        out = {k: v[order].cpu().numpy() for k, v in local.items()}
        # A distributed sampler pads the last batch by repeating rows; keep each row once.
        _, first = np.unique(out["row"], return_index=True)
        return {k: v[first] for k, v in out.items()}

    def _log_epoch_metrics(self, stage: str, metrics: dict[str, float]) -> None:
        for key in LOGGED_METRICS:
            if key in metrics and not math.isnan(metrics[key]):
                # Every rank holds the same values (synchronised or gathered); sync_dist averages identical values
                # (a no-op) and keeps the key on every rank, which ModelCheckpoint's monitor needs.
                self.log(f"{stage}/{key}", metrics[key], prog_bar=key == "top1", sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self._val_batches and not self.trainer.sanity_checking:
            self._log_epoch_metrics("val", self.val_metrics.compute())
        self.val_metrics.reset()
        self._val_batches = 0

    def on_test_epoch_end(self) -> None:
        if not self._eval_outputs:
            return
        outputs = self.gathered_eval_outputs()
        metrics = score_predictions(self.label_space, outputs["probs"], outputs["gold"])
        self.last_eval = {"stage": "test", "metrics": metrics, **outputs}
        self._log_epoch_metrics("test", metrics)

    # ----------------------------------------------------------------------------------------------------------
    # optimisation

    def setup(self, stage: str) -> None:
        check_training_setup(self.trainer, self, self.backbone_config, stage, generative=False)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.hparams.warmup_ratio * total)
        cosine = self.hparams.schedule == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1 + math.cos(math.pi * progress)) if cosine else 1.0 - progress

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------------------------------------
    # checkpoints: trainable tensors only

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep_trainable_tensors(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_trainable_tensors(self, checkpoint)

    def save_adapter(self, folder: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the LoRA adapter + score head as safetensors (PEFT layout).

        Args:
            folder: Output folder.
            state_dict: This module's full state dict (keys ``model.…``) when its own tensors are not whole: under
                FSDP each rank holds a shard, so every rank calls ``trainer.strategy.lightning_module_state_dict()``
                and rank 0 passes the gathered result here. None saves the module's own tensors.
        """
        save_adapter(self, "model", folder, state_dict)


def _gather_ragged(module: L.LightningModule, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """all_gather for per-rank tensors of different lengths (pad to the longest, then trim)."""
    n = torch.tensor([local["row"].shape[0]], device=module.device)
    sizes = module.all_gather(n).flatten().tolist()
    longest = max(sizes)
    out = {}
    for key, value in local.items():
        pad = longest - value.shape[0]
        if pad:
            value = torch.cat([value, value.new_zeros((pad, *value.shape[1:]))])
        gathered = module.all_gather(value.to(module.device))  # [world, longest, ...]
        out[key] = torch.cat([gathered[r, : sizes[r]] for r in range(len(sizes))]).cpu()
    return out


__all__ = ["DRGClassifier", "partial_label_nll"]
