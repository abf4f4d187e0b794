"""Train the generative MS-DRG reasoner: SFT cold start on grounded rationales, then GRPO from the SFT adapter.

    python -m drg_llama.train --variant sft                                             # CPU demo, embedded data
    python -m drg_llama.train --variant grpo --model.init_adapter runs/sft/version_0    # GRPO from that SFT run
    python -m drg_llama.train --variant sft --config configs/tiny_reasoner.yaml         # seconds, for tests
    python -m drg_llama.train --variant grpo --print_config                             # the resolved configuration

``drg_llama.train`` hands ``--variant sft|grpo`` to :func:`main` here; ``configs/<variant>.yaml`` comes first and
later ``--config`` files and dotted overrides win (LightningCLI). The data module is the classifier's
``DRGDataModule`` (its prepared folder, row limits and label space); the reasoner reads the texts itself.

Each run writes to ``runs/<variant>/version_N/``: ``config.yaml``, ``metrics.csv`` (GRPO: reward, reward_std,
frac_reward_zero_std, per-reward means, completion length, truncated fraction, clip ratio, KL; every validation
check: ``val/<VAL_METRICS>`` of greedy answers on the same validation notes, ``val/reward_sampled`` with
``val_samples``, and for GRPO a check before the first step), ``checkpoints/``
(trainable tensors only), ``adapter/`` (LoRA, safetensors), ``label_space.json``, ``run.json``, ``reasoner.json``
(run type, stage, version, the SFT adapter it started from, rationale counts), ``test_metrics.json`` (the
classifier's layout) and, for GRPO, ``init_adapter/`` (a copy of that SFT adapter: the run folder stands alone) and
``reward_curve.png``.
"""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from drg_llama.data.datamodule import DRGDataModule
from drg_llama.models.reasoner import SUMMARY_METRICS, DRGReasoner
from drg_llama.runs import (
    ADAPTER_DIR,
    INIT_ADAPTER_DIR,
    REASONER_FILE,
    TEST_METRICS_FILE,
    read_checkpoint,
    record_run,
    tested_checkpoint,
    write_json,
)
from drg_llama.train import CONFIG_DIR

STAGES = ("sft", "grpo")


class ReasonerCLI(LightningCLI):
    """LightningCLI for ``DRGReasoner``: links the data module's label space and accepts ``--ckpt_path``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.label_space", "model.label_space", apply_on="instantiate")
        parser.add_argument("--ckpt_path", default=None, help="checkpoint to resume from")


def reasoner_args(variant: str, rest: list[str]) -> list[str]:
    """``configs/<variant>.yaml`` first, the user's arguments after it, the stage and label variant pinned last."""
    if variant not in STAGES:
        raise SystemExit(f"error: the reasoner trains {' or '.join(STAGES)}, not {variant!r}")
    config = CONFIG_DIR / f"{variant}.yaml"
    if not config.exists():
        raise SystemExit(f"error: {config} is missing; reinstall drg-llama")
    # The reasoner scores against a single-label space (one class per DRG); its answers are DRGs, not heads.
    return ["--config", str(config), *rest, f"--model.stage={variant}", "--data.variant=single_label"]


def adapter_folder(init_adapter: str | Path) -> Path:
    """The PEFT adapter folder ``--model.init_adapter`` names: an SFT run's ``adapter/``, or the folder itself."""
    folder = Path(init_adapter).expanduser()
    return folder / ADAPTER_DIR if (folder / ADAPTER_DIR / "adapter_config.json").is_file() else folder


def plot_reward_curve(metrics_csv: str | Path, out_png: str | Path, window: int = 5) -> Path | None:
    """A GRPO run at a glance, from its ``metrics.csv``, saved as a PNG.

    Left: the mean reward per step, its moving average, the exact/format reward means and, when the run validated,
    the held-out reward on the same validation notes at each check (step 0 = before GRPO): of greedy answers and,
    with ``val_samples``, of answers sampled at the training temperature with the same seed each check. Right:
    what shows mode collapse or reward hacking before the reward does: per-token entropy, distinct answers per
    prompt / G and the KL to the SFT policy (moving averages).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    logged = pd.read_csv(metrics_csv)
    if "train/reward" not in logged:
        return None
    frame = logged.dropna(subset=["train/reward"]).reset_index(drop=True)
    steps = frame["step"].to_numpy() + 1

    def smooth(column: str):
        return frame[column].rolling(window, min_periods=1).mean()

    fig, (ax, mon) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=120)
    ax.plot(steps, frame["train/reward"], "o", ms=3, alpha=0.45, label="mean reward of the step")
    ax.plot(steps, smooth("train/reward"), "-", lw=2, label=f"moving average ({window} steps)")
    for column, name in (("train/rewards/exact", "exact DRG"), ("train/rewards/format", "format")):
        if column in frame:
            ax.plot(steps, smooth(column), "--", lw=1, label=name)
    # Held-out curves: the same validation notes after 0 (the SFT policy), n, 2n… optimizer steps.
    held_out_curves = (
        ("val/reward_greedy", "s-", "black", "held-out reward, greedy"),
        ("val/reward_sampled", "o--", "white", "held-out reward, sampled as in training"),
    )
    for column, style, face, name in held_out_curves:
        if column in logged and logged[column].notna().any():
            held_out = logged.dropna(subset=[column])
            x, y = held_out["val/optimizer_steps"], held_out[column]
            ax.plot(x, y, style, color="black", mfc=face, ms=5, lw=1.5, label=name)
    ax.set_title("reward", fontsize=9)
    monitors = (
        ("train/entropy", "entropy (nats/token)"),
        ("train/group_distinct", "distinct answers / G"),
        ("train/kl", "KL to SFT policy"),
    )
    for column, name in monitors:
        if column in frame and frame[column].notna().any():
            mon.plot(steps, smooth(column), lw=1.5, label=name)
    mon.set_title(f"collapse monitors (moving average, {window} steps)", fontsize=9)
    for axis in (ax, mon):
        axis.set_xlabel("GRPO step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)


def main(argv: list[str], variant: str) -> dict:
    """Train the reasoner for ``variant`` (sft or grpo), test it greedily and write the run's artifacts.

    Args:
        argv: Arguments without ``--variant`` (``drg_llama.train`` strips it).
        variant: ``sft`` or ``grpo``.

    Returns:
        ``{"<variant> (last)": test metrics}``.
    """
    args = reasoner_args(variant, list(argv))
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    cli = ReasonerCLI(
        DRGReasoner,
        DRGDataModule,
        run=False,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": f"python -m drg_llama.train --variant {variant}"},
    )
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    model.attach_data(data)
    ckpt_path = cli.config.get("ckpt_path")
    if ckpt_path:
        read_checkpoint(ckpt_path)  # a missing, truncated or foreign file: one line now, not a traceback later
    if variant == "grpo" and trainer.limit_val_batches and not ckpt_path:
        # Step 0 of the held-out curve: the SFT policy on the validation notes, before any GRPO update.
        trainer.validate(model, verbose=False)
    # The reasoner serves its own loaders (prompts from the texts); the data module only supplies folder and limits.
    trainer.fit(model, ckpt_path=ckpt_path, weights_only=True)
    trainer.test(model, verbose=False)
    metrics = model.last_eval["metrics"]
    run_dir = Path(trainer.log_dir)
    last = tested_checkpoint(trainer)  # every rank; reasoner runs test their last weights
    if trainer.is_global_zero:
        marker = {
            "run_type": "reasoner",
            "stage": variant,
            "drg_version": model.version,
            "init_adapter": model.hparams.init_adapter,
            "rationale": model.hparams.rationale,
            "rationale_counts": model.rationale_counts,
        }
        write_json(run_dir / REASONER_FILE, marker)
        if model.hparams.init_adapter:
            # The SFT adapter merged into the base travels with the run, so the run folder stands alone.
            shutil.copytree(adapter_folder(model.hparams.init_adapter), run_dir / INIT_ADAPTER_DIR, dirs_exist_ok=True)
        run = record_run(
            run_dir,
            recipe="reasoner",
            variant=variant,
            label_space=model.label_space,
            tested_checkpoint=last,
            selected_on="last",
            data_dir=data.prepared_dir,
            train_codes=data.split_frame("train")["drg_code"].to_numpy(),
        )
        report = {
            "split": "test",
            "variant": variant,
            "drg_version": model.version,
            "checkpoint": run.record["tested_checkpoint"],
            "decode": "greedy",
            "metrics": metrics,
        }
        write_json(run_dir / TEST_METRICS_FILE, report)
        model.save_adapter(str(run_dir / ADAPTER_DIR))
        if variant == "grpo" and (run_dir / "metrics.csv").exists():
            plot_reward_curve(run_dir / "metrics.csv", run_dir / "reward_curve.png")
        cells = " ".join(
            f"{k}={metrics[k]:.3f}" for k in SUMMARY_METRICS if k in metrics and not math.isnan(metrics[k])
        )
        print(f"\n{variant} test (greedy, n={int(metrics['n'])}): {cells}\nrun directory: {run_dir}")
    return {f"{variant} (last)": metrics}
