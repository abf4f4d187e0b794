"""Train an MS-DRG model: the classifier (single_label, two_label) or the generative reasoner (sft, then grpo).

    python -m drg_llama.train --variant two_label                     # embedded default: synthetic corpus + SmolLM2
    python -m drg_llama.train --variant single_label --config configs/models/tiny.yaml
    python -m drg_llama.train --variant two_label --data.data_dir prepared/ --config configs/paper/drg_llama_2023.yaml
    python -m drg_llama.train --variant sft                           # the reasoner's SFT cold start (CPU demo)
    python -m drg_llama.train --variant grpo --model.init_adapter runs/sft/version_0    # GRPO from that SFT run
    python -m drg_llama.train --variant two_label --print_config      # the resolved configuration
    python -m drg_llama.train --variant grpo --ckpt_path last         # resume the newest run of this variant

``--variant`` selects ``configs/<variant>.yaml``; later ``--config`` files and dotted overrides win (LightningCLI).
``--config configs/NAME.yaml`` finds the shipped config from any folder. The YAML's ``class_path`` picks the model
(``DRGClassifier`` or ``DRGReasoner``) and its data module (``DRGDataModule`` or ``ReasonerDataModule``), whose
label space is handed to the model. Every recipe then runs the same way: train (``--validate_before_fit`` first
scores the untrained model: step 0 of the GRPO held-out curves), test the checkpoint picked on validation (the last
weights when none is picked), and write ``runs/<variant>/version_N/`` through the callbacks of
``drg_llama.callbacks`` (the layout is ``drg_llama.runs``'): ``config.yaml`` (resolved), ``run.json``,
``metrics.csv``, ``checkpoints/`` (trainable tensors only), ``adapter/`` (LoRA [+ score head] as safetensors),
``label_space.json``, ``test_metrics.json``, ``baseline/metrics.json`` (TF-IDF + logistic regression on the same
rows; ``--run_baseline false`` skips it) and, for reasoner runs, ``reasoner.json``, ``init_adapter/`` (the SFT
adapter a GRPO run started from) and ``reward_curve.png``.

**Resume.** ``--ckpt_path last`` takes the newest ``last.ckpt`` of the variant's runs; a checkpoint inside a run
folder's ``checkpoints/`` continues that run folder, whose ``metrics.csv`` keeps the rows logged before it. A bad
option or data folder stops with one line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import math
import re
import sys
import warnings
from pathlib import Path

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from drg_llama.callbacks import BaselineComparison, RunLogger, RunRecord
from drg_llama.errors import USER_ERRORS, UserError, report_error
from drg_llama.runs import BASELINE_DIR, CHECKPOINT_DIR, LAST_CHECKPOINT, read_checkpoint

_PACKAGE = Path(__file__).resolve().parent
# Installed from a wheel, the YAML files ship inside the package (drg_llama/configs); in a source checkout they are
# the repository's configs/ beside it. Either way they are found from any working directory.
CONFIG_DIR = next((d for d in (_PACKAGE / "configs", _PACKAGE.parent / "configs") if d.is_dir()), _PACKAGE / "configs")
#: What ``--variant`` selects: ``configs/<variant>.yaml``, whose class_paths pick the recipe.
VARIANTS = ("two_label", "single_label", "sft", "grpo")


class DRGLightningCLI(LightningCLI):
    """One LightningCLI for every recipe: the YAML's ``class_path`` picks model and data module.

    It hands the data module's label space to the model, adds ``--ckpt_path``, ``--validate_before_fit`` and the
    baseline comparison (``--run_baseline``), records every run (``RunRecord``), and makes a resumed run continue its
    run folder.

    Args:
        args: Command-line arguments, ``--config configs/<variant>.yaml`` first.
        prog: The command shown in ``--help``.
    """

    def __init__(self, args: list[str], prog: str = "python -m drg_llama.train"):
        self.resume_step: int | None = None
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=args,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [RunRecord()]},
            parser_kwargs={"prog": prog},
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.label_space", "model.init_args.label_space", apply_on="instantiate")
        parser.add_argument("--ckpt_path", default=None, help="checkpoint to resume from, or 'last'")
        parser.add_argument(
            "--validate_before_fit", default=False, type=bool, help="score the model once before training starts"
        )
        parser.add_argument("--run_baseline", default=True, type=bool, help="also train the TF-IDF baseline")
        parser.add_lightning_class_args(BaselineComparison, "baseline")
        parser.link_arguments("run_baseline", "baseline.enabled")

    def before_instantiate_classes(self) -> None:
        """Resolve ``--ckpt_path`` (``last``: the newest run's) and point the logger at the run folder it resumes."""
        ckpt_path = self.config.get("ckpt_path")
        if not ckpt_path:
            return
        logger = self.config.trainer.get("logger")
        logger_args = logger.init_args if isinstance(logger, Namespace) and "init_args" in logger else None
        if ckpt_path == "last":
            ckpt_path = newest_last_checkpoint(logger_args)
        checkpoint = read_checkpoint(ckpt_path)  # a missing, truncated or foreign file: one line, not a traceback
        started_from = checkpoint["hyper_parameters"].get("init_adapter")
        given = self.config.model.init_args.get("init_adapter")
        if started_from and (not given or str(Path(given).expanduser().resolve()) != started_from):
            # The adapter is merged into the base weights, which the checkpoint does not hold.
            raise UserError(f"{ckpt_path} trained on top of {started_from}; pass --model.init_adapter {started_from}")
        self.resume_step = int(checkpoint.get("global_step", 0))
        self.config.ckpt_path = str(ckpt_path)
        folder = Path(ckpt_path).parent
        if folder.name == CHECKPOINT_DIR and logger_args is not None:
            continue_run_folder(logger_args, folder.parent)

    def after_instantiate_classes(self) -> None:
        if self.resume_step is not None and isinstance(self.trainer.logger, RunLogger):
            self.trainer.logger.keep_history(before_step=self.resume_step)


def _logger_root(logger_args: Namespace) -> Path:
    return Path(logger_args.save_dir) / (logger_args.get("name") or "")


def _version_folder(version: int | str) -> str:
    return version if isinstance(version, str) else f"version_{version}"


def newest_last_checkpoint(logger_args: Namespace | None) -> Path:
    """``--ckpt_path last``: the ``last.ckpt`` of the logger's version, or the newest one under its root."""
    if logger_args is None or "save_dir" not in logger_args:
        raise UserError(
            "--ckpt_path last looks for the newest run of trainer.logger, and this configuration has no CSV logger; "
            "pass the checkpoint's path instead"
        )
    root = _logger_root(logger_args)
    version = logger_args.get("version")
    folders = _version_folder(version) if version is not None else "*"
    candidates = sorted(root.glob(f"{folders}/{CHECKPOINT_DIR}/{LAST_CHECKPOINT}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UserError(f"--ckpt_path last found no {LAST_CHECKPOINT} under {root}; start a fresh run instead")
    return candidates[-1]


def continue_run_folder(logger_args: Namespace, run_folder: Path) -> None:
    """Make the logger write into ``run_folder`` (its version folder, under the same root when it is there)."""
    if run_folder.parent.resolve() != _logger_root(logger_args).resolve():
        logger_args.save_dir, logger_args.name = str(run_folder.parent), ""
    logger_args.version = run_folder.name


def shipped_config(path: str) -> str:
    """``path`` if it exists, else the shipped config it names (``configs/models/tiny.yaml`` or ``models/tiny.yaml``).

    So the README's ``--config configs/...`` commands work from any folder, including after a wheel install.
    """
    if Path(path).exists():
        return path
    name = path.removeprefix("configs/")
    return str(CONFIG_DIR / name) if (CONFIG_DIR / name).is_file() else path


def variant_args(argv: list[str]) -> tuple[str, list[str]]:
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
    if variant not in VARIANTS:
        raise SystemExit(f"error: unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    config = CONFIG_DIR / f"{variant}.yaml"
    if not config.exists():
        raise SystemExit(f"error: {config} is missing; reinstall drg-llama")
    return variant, ["--config", str(config), *nested_nulls(rest)]


_NESTED_KEY = re.compile(r"--(model|data)\.(?!init_args\.)(\w+)\.(\w+)")


def nested_nulls(args: list[str]) -> list[str]:
    """``--model.backbone.tokenizer null`` given as ``--model.backbone {"tokenizer": null}``.

    With ``class_path`` jsonargparse (4.53) re-parses an override of a setting inside a group from the text
    ``--tokenizer=None``, so a null arrives as the string "None"; a one-key mapping sets None and keeps the group's
    other settings.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        key, sep, value = args[i].partition("=")
        if not sep and i + 1 < len(args):
            value = args[i + 1]
        match = _NESTED_KEY.fullmatch(key)
        if match and value == "null":
            out += [f"--{match[1]}.{match[2]}", json.dumps({match[3]: None})]
            i += 1 if sep else 2
        else:
            out.append(args[i])
            i += 1
    return out


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


def _user_error(err: BaseException) -> BaseException | None:
    """The user error behind ``err``: jsonargparse wraps what a class raises while the CLI instantiates it."""
    while err is not None:
        if isinstance(err, USER_ERRORS):
            return err
        err = err.__cause__ or err.__context__
    return None


def main(argv: list[str] | None = None) -> dict:
    """Run the training job; returns the test metrics of the model and, when trained, the baseline and majority class.

    A bad option or data folder stops with one line (``error: ...``, exit status 2); ``--debug`` shows the traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        variant, args = variant_args(argv)
        return train(variant, args)
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        raise SystemExit(report_error(user_error, debug)) from None


def train(variant: str, args: list[str]) -> dict:
    """Fit, test and record one run of ``variant`` (``args``: ``--config configs/<variant>.yaml`` first)."""
    # sys.argv stays untouched on purpose: DDP re-launches this module with it on the other ranks, and each rank
    # expands --variant the same way. LightningCLI warns about args + sys.argv; here that is intended.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    cli = DRGLightningCLI(args, prog=f"python -m drg_llama.train --variant {variant}")
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    data.set_tokenizer(model.tokenizer)
    ckpt_path = cli.config.get("ckpt_path")
    if cli.config.get("validate_before_fit") and trainer.limit_val_batches and not ckpt_path:
        trainer.validate(model, datamodule=data, verbose=False)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    callback = trainer.checkpoint_callback
    best = callback.best_model_path if callback is not None else ""
    # With no validation split (drg_llama_2023) nothing is picked: the last weights are tested, never a test-picked one.
    trainer.test(model, datamodule=data, ckpt_path=best or None, verbose=False, weights_only=True)
    if best:
        name = f"{variant} (best on val)"
    elif callback is not None and callback.monitor is not None:
        name = f"{variant} (last; no validation)"
    else:
        name = f"{variant} (last)"
    results = {name: model.last_eval["metrics"]}
    run_dir = Path(trainer.log_dir)  # a collective under DDP: every rank must ask
    if trainer.is_global_zero:
        baseline = run_dir / BASELINE_DIR / "metrics.json"
        if cli.config.run_baseline and baseline.is_file():
            written = json.loads(baseline.read_text())
            results["tf-idf + logistic regression"] = written["metrics"]
            results["majority class"] = written["majority_class"]
        print()
        print(comparison_table(results))
        print(f"\nrun directory: {run_dir}")
    return results


if __name__ == "__main__":
    main()
