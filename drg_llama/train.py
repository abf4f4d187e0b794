"""Train an MS-DRG classifier, pick the best checkpoint on validation, evaluate it on test, compare with baselines.

    python -m drg_llama.train --variant two_label                     # embedded default: synthetic corpus + SmolLM2
    python -m drg_llama.train --variant single_label --config configs/models/tiny.yaml
    python -m drg_llama.train --variant two_label --data.data_dir prepared/ --config configs/paper/drg_llama_2023.yaml
    python -m drg_llama.train --variant two_label --print_config      # the resolved configuration
    python -m drg_llama.train --variant two_label --ckpt_path last    # resume the newest run of this variant

``--variant`` selects ``configs/<variant>.yaml``; later ``--config`` files and dotted overrides win (LightningCLI).
``--config configs/NAME.yaml`` finds the shipped config from any folder. Each run writes to
``runs/<variant>/version_N/`` (the layout is ``drg_llama.runs``'): ``config.yaml`` (resolved), ``run.json``,
``metrics.csv``, ``checkpoints/`` (trainable tensors only), ``adapter/`` (LoRA + score head as safetensors),
``label_space.json``, ``test_metrics.json`` and ``baseline/metrics.json`` (TF-IDF + logistic regression on the same
splits). A bad option or data folder stops with one line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from drg_llama.data.datamodule import DRGDataModule
from drg_llama.drg import VARIANTS
from drg_llama.errors import USER_ERRORS, report_error
from drg_llama.models.classifier import DRGClassifier
from drg_llama.runs import ADAPTER_DIR, TEST_METRICS_FILE, read_checkpoint, record_run, tested_checkpoint, write_json

log = logging.getLogger("drg_llama.train")

_PACKAGE = Path(__file__).resolve().parent
# Installed from a wheel, the YAML files ship inside the package (drg_llama/configs); in a source checkout they are
# the repository's configs/ beside it. Either way they are found from any working directory.
CONFIG_DIR = next((d for d in (_PACKAGE / "configs", _PACKAGE.parent / "configs") if d.is_dir()), _PACKAGE / "configs")
# Generative variants, trained by drg_llama.train_reasoner (SFT cold start, then GRPO).
GENERATIVE_VARIANTS = ("sft", "grpo")


class DRGLightningCLI(LightningCLI):
    """LightningCLI that hands the data module's label space to the model and accepts ``--ckpt_path``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.label_space", "model.label_space", apply_on="instantiate")
        parser.add_argument("--ckpt_path", default=None, help="checkpoint to resume from, or 'last'")
        parser.add_argument("--run_baseline", default=True, type=bool, help="also train the TF-IDF baseline")


def shipped_config(path: str) -> str:
    """``path`` if it exists, else the shipped config it names (``configs/models/tiny.yaml`` or ``models/tiny.yaml``).

    So the README's ``--config configs/...`` commands work from any folder, including after a wheel install.
    """
    if Path(path).exists():
        return path
    name = path.removeprefix("configs/")
    return str(CONFIG_DIR / name) if (CONFIG_DIR / name).is_file() else path


def _variant_args(argv: list[str]) -> tuple[str, list[str]]:
    """Pull ``--variant X`` out of argv and put ``configs/X.yaml`` first, so user overlays win."""
    variant = "two_label"
    rest: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--variant" and i + 1 < len(argv):
            variant, i = argv[i + 1], i + 2
        elif argv[i].startswith("--variant="):
            variant, i = argv[i].split("=", 1)[1], i + 1
        elif argv[i] == "--config" and i + 1 < len(argv):
            rest += ["--config", shipped_config(argv[i + 1])]
            i += 2
        elif argv[i].startswith("--config="):
            rest.append("--config=" + shipped_config(argv[i].split("=", 1)[1]))
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    if variant in GENERATIVE_VARIANTS:
        return variant, rest  # the reasoner's own CLI (drg_llama.train_reasoner) puts configs/<variant>.yaml first
    if variant not in VARIANTS:
        raise SystemExit(f"error: unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    config = CONFIG_DIR / f"{variant}.yaml"
    if not config.exists():
        raise SystemExit(f"error: {config} is missing; reinstall drg-llama")
    return variant, ["--config", str(config), *rest, f"--data.variant={variant}"]


def _resolve_last(cli: DRGLightningCLI) -> str | None:
    """``--ckpt_path last``: the newest ``last.ckpt`` of this variant's runs (resuming writes into that run)."""
    ckpt = cli.config.get("ckpt_path")
    if ckpt != "last":
        return ckpt
    logger = cli.trainer.logger
    root = Path(logger.save_dir) / logger.name
    candidates = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise SystemExit(f"error: --ckpt_path last found no last.ckpt under {root}; start a fresh run instead")
    return str(candidates[-1])


def _keep_metrics_history(trainer, step: int) -> None:
    """Carry a resumed run's earlier metrics.csv rows (before the checkpoint's ``step``) into the reopened logger.

    Lightning's CSV writer deletes an existing metrics.csv when it opens the run directory again.
    """
    import csv

    metrics_file = Path(trainer.logger.log_dir) / "metrics.csv"
    if not trainer.is_global_zero or not metrics_file.exists():
        return
    with metrics_file.open(newline="") as fh:
        rows = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]
    writer = trainer.logger.experiment  # opening it deletes the file; the rows are already read
    writer.metrics[:0] = [row for row in rows if int(row.get("step", 0)) < step]


def _format_row(name: str, metrics: dict) -> str:
    cells = []
    for key in ("top1", "top5", "macro_f1_present", "macro_auc", "base_acc", "severity_acc"):
        value = metrics.get(key, math.nan)
        cells.append(f"{value:8.3f}" if isinstance(value, float) and not math.isnan(value) else f"{'-':>8}")
    return f"{name:<28}" + "".join(cells)


def comparison_table(rows: dict[str, dict]) -> str:
    """Plain-text table of headline test metrics, one row per system."""
    header = f"{'test split':<28}" + "".join(f"{h:>8}" for h in ("top1", "top5", "mF1", "mAUC", "base", "sev"))
    return "\n".join([header, "-" * len(header), *(_format_row(k, v) for k, v in rows.items())])


def main(argv: list[str] | None = None) -> dict:
    """Run the training job; returns the test metrics of the LLM, the baseline and the majority class.

    A bad option or data folder stops with one line (``error: ...``, exit status 2); ``--debug`` shows the traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        variant, args = _variant_args(argv)
        if variant in GENERATIVE_VARIANTS:
            from drg_llama.train_reasoner import main as train_reasoner

            return train_reasoner(args, variant)
        return _train_classifier(variant, args)
    except USER_ERRORS as err:
        raise SystemExit(report_error(err, debug)) from None


def _train_classifier(variant: str, args: list[str]) -> dict:
    # sys.argv stays untouched on purpose: DDP re-launches this module with it on the other ranks, and each rank
    # expands --variant the same way. LightningCLI warns about args + sys.argv; here that is intended.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    cli = DRGLightningCLI(
        DRGClassifier,
        DRGDataModule,
        run=False,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "python -m drg_llama.train"},
    )
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    data.set_tokenizer(model.tokenizer)
    ckpt_path = _resolve_last(cli)
    if ckpt_path is not None:
        checkpoint = read_checkpoint(ckpt_path)  # a missing, truncated or foreign file: one line, not a traceback
        # Resuming continues the same run directory rather than opening a new version.
        run_folder = Path(ckpt_path).parent.parent.name
        if run_folder.startswith("version_") and run_folder.removeprefix("version_").isdigit():
            trainer.logger._version = int(run_folder.removeprefix("version_"))  # CSVLogger names the folder from it
            _keep_metrics_history(trainer, checkpoint["global_step"])

    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    # With no validation split (drg_llama_2023) nothing is picked: the last weights are tested, never a test-picked one.
    trainer.test(model, datamodule=data, ckpt_path=best or None, verbose=False, weights_only=True)

    run_dir = Path(trainer.log_dir)  # a collective under DDP: every rank must ask
    name = f"{variant} (best on val)" if best else f"{variant} (last; no validation)"
    results = {name: model.last_eval["metrics"]}
    tested = tested_checkpoint(trainer, best)  # every rank
    # A collective under FSDP (each rank holds a shard of every tensor): all ranks gather, rank 0 writes.
    whole_weights = trainer.strategy.lightning_module_state_dict()
    if trainer.is_global_zero:
        run = record_run(
            run_dir,
            recipe="classifier",
            variant=variant,
            label_space=model.label_space,
            tested_checkpoint=tested,
            selected_on="val" if best else "last",
            data_dir=data.prepared_dir,
            train_codes=data.split_frame("train")["drg_code"].to_numpy(),
        )
        write_json(
            run_dir / TEST_METRICS_FILE,
            {
                "split": "test",
                "variant": variant,
                "checkpoint": run.record["tested_checkpoint"],
                "metrics": results[name],
            },
        )
        model.save_adapter(str(run_dir / ADAPTER_DIR), whole_weights)
        if cli.config.get("run_baseline", True):
            from drg_llama.baseline import run_baseline

            baseline = run_baseline(
                data.prepared_dir,
                run_dir / "baseline",
                label_space=model.label_space,
                limit_train=data.limits["train"],
                limit_eval=data.limits["test"],
                # the same words the model reads: a longer context is then no advantage of one side
                text_window=data.visible_text,
                text_window_name=f"{data.truncation} {data.max_length} tokens of the model's tokenizer",
            )
            results["tf-idf + logistic regression"] = baseline["metrics"]
            results["majority class"] = baseline["majority_class"]
        print()
        print(comparison_table(results))
        print(f"\nrun directory: {run_dir}")
    return results


if __name__ == "__main__":
    main()
