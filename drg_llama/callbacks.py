"""What training writes into a run folder besides its checkpoints (the layout is ``drg_llama.runs``').

    python -m drg_llama.train --variant two_label                     # every callback below, for every recipe
    python -m drg_llama.train --variant two_label --run_baseline false

* ``RunLogger`` (``trainer.logger`` of the shipped configs) writes ``metrics.csv`` and keeps it across a resume.
* ``RunRecord`` (added to every run by ``drg_llama.train``) writes, once the run is tested: ``label_space.json``,
  ``run.json``, ``test_metrics.json``, ``adapter/`` and, for a run that started from an adapter, ``init_adapter/``
  (the run folder stands alone); for a reasoner run also ``reasoner.json``.
* ``BaselineComparison`` (``--run_baseline``, on by default) trains the TF-IDF + logistic-regression baseline on
  the same rows into ``baseline/``.
* ``RewardCurve`` (``configs/grpo.yaml``) draws ``reward_curve.png`` from ``metrics.csv``.

Each writes on rank 0; what must run on every rank (the run folder's name, saving the last weights, gathering FSDP
shards) runs on every rank first.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

from drg_llama.models.reasoner import DRGReasoner
from drg_llama.runs import (
    ADAPTER_DIR,
    BASELINE_DIR,
    INIT_ADAPTER_DIR,
    METRICS_FILE,
    REASONER_FILE,
    REWARD_CURVE_FILE,
    TEST_METRICS_FILE,
    record_run,
    tested_checkpoint,
    write_json,
)


class RunLogger(CSVLogger):
    """Lightning's ``CSVLogger``, except that a resumed run keeps the ``metrics.csv`` rows of its earlier steps.

    Lightning's CSV writer deletes ``metrics.csv`` when it opens a run folder that has one, and offers no option to
    keep it. After ``keep_history(before_step)`` the rows logged before that step are read back first; rows from the
    checkpoint's step on (steps that are trained again after the resume) are left out.
    """

    def __init__(
        self,
        save_dir: str,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ):
        super().__init__(save_dir, name, version, prefix, flush_logs_every_n_steps)
        self._history_before: int | None = None

    def keep_history(self, before_step: int) -> None:
        """Keep the existing rows with ``step < before_step`` (call before training starts: the resumed step)."""
        self._history_before = before_step

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._history_before is None:
            return super().experiment
        metrics_file = Path(self.log_dir) / METRICS_FILE
        rows = []
        if metrics_file.is_file():
            with metrics_file.open(newline="") as fh:
                rows = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]
        before, self._history_before = self._history_before, None
        writer = super().experiment  # opening the folder deletes metrics.csv; its rows are read already
        for row in rows:
            step = int(float(row.pop("step", 0)))
            if step < before:
                writer.log_metrics(row, step)
        return writer


def recipe_and_variant(module: L.LightningModule) -> tuple[str, str]:
    """``("reasoner", "sft" | "grpo")`` or ``("classifier", "single_label" | "two_label")``."""
    if isinstance(module, DRGReasoner):
        return "reasoner", module.hparams.stage
    return "classifier", module.label_space.variant


class RunRecord(L.Callback):
    """When the run has been tested: its classes, record, test metrics and adapter, so the folder stands alone.

    The tested checkpoint is the one ``trainer.test`` loaded (the best on validation), else the last weights.
    """

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = Path(trainer.log_dir)  # a collective under DDP: every rank asks
        callback = trainer.checkpoint_callback
        best = callback.best_model_path if callback is not None else ""
        picked_on_val = bool(best) and trainer.ckpt_path == best
        tested = tested_checkpoint(trainer, best if picked_on_val else "")  # every rank: saving is a collective
        # A collective under FSDP (each rank holds a shard of every tensor): all ranks gather, rank 0 writes.
        whole_weights = trainer.strategy.lightning_module_state_dict()
        if not trainer.is_global_zero:
            return
        data = trainer.datamodule
        recipe, variant = recipe_and_variant(pl_module)
        run = record_run(
            run_dir,
            recipe=recipe,
            variant=variant,
            label_space=pl_module.label_space,
            tested_checkpoint=tested,
            selected_on="val" if picked_on_val else "last",
            data_dir=data.prepared_dir,
            train_codes=data.split_frame("train")["drg_code"].to_numpy(),
        )
        report = {
            "split": "test",
            "variant": variant,
            "drg_version": pl_module.label_space.version,
            "checkpoint": run.record["tested_checkpoint"],
            "metrics": pl_module.last_eval["metrics"],
        }
        write_json(run_dir / TEST_METRICS_FILE, report)
        pl_module.save_adapter(str(run_dir / ADAPTER_DIR), whole_weights)
        init_adapter = getattr(pl_module, "init_adapter", None)
        if init_adapter is not None:
            # The adapter merged into the base travels with the run, so the run folder stands alone.
            shutil.copytree(init_adapter, run_dir / INIT_ADAPTER_DIR, dirs_exist_ok=True)
        if recipe == "reasoner":
            marker = {
                "run_type": recipe,
                "stage": variant,
                "drg_version": pl_module.label_space.version,
                "init_adapter": pl_module.hparams.init_adapter,
                "rationale": data.rationale,
                "rationale_counts": data.rationale_counts,
            }
            write_json(run_dir / REASONER_FILE, marker)


class BaselineComparison(L.Callback):
    """The TF-IDF + logistic-regression baseline on the run's rows and classes, into ``baseline/``.

    Args:
        enabled: Train it (set by ``--run_baseline``).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        run_dir = Path(trainer.log_dir)  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        from drg_llama.baseline import run_baseline

        data = trainer.datamodule
        run_baseline(
            data.prepared_dir,
            run_dir / BASELINE_DIR,
            label_space=pl_module.label_space,
            limit_train=data.limits["train"],
            limit_eval=data.limits["test"],
            # the same words the model reads: a longer context is then no advantage of one side
            text_window=data.visible_text,
            text_window_name=f"{data.truncation} {data.max_length} tokens of the model's tokenizer",
        )


class RewardCurve(L.Callback):
    """``reward_curve.png``: a GRPO run's rewards and collapse monitors from its ``metrics.csv`` (``plots``)."""

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = Path(trainer.log_dir)  # a collective under DDP: every rank asks
        if not trainer.is_global_zero or not (run_dir / METRICS_FILE).is_file():
            return
        import matplotlib.pyplot as plt
        import pandas as pd

        from drg_llama.plots import reward_curve

        fig = reward_curve(pd.read_csv(run_dir / METRICS_FILE))
        if fig is not None:
            fig.savefig(run_dir / REWARD_CURVE_FILE)
            plt.close(fig)


__all__ = ["BaselineComparison", "RewardCurve", "RunLogger", "RunRecord", "recipe_and_variant"]
