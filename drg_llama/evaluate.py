"""Evaluate a trained run on a split: ``DIR/eval/metrics.json`` and ``DIR/eval/predictions.parquet``.

    python -m drg_llama.evaluate --run runs/two_label/version_0 --split test
    python -m drg_llama.evaluate --run runs/two_label/version_0 --split val --checkpoint last
    python -m drg_llama.evaluate --run runs/two_label/version_0 --target-accuracy 0.9 --base-rate 7000

Predictions carry ids, the gold DRG and the top-k DRGs with probabilities — never note text. ``metrics.json`` also
holds calibration (temperature fitted on validation, saved as ``DIR/calibration.json`` for ``predict``), selective
coding, payment impact, breakdowns and the severity confusion matrix (see ``drg_llama.analysis``).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import yaml

from drg_llama.analysis import DEFAULT_BASE_RATE, DEFAULT_TARGET_ACCURACY, analysis_report, save_calibration


class RunError(ValueError):
    """A run directory that cannot be evaluated (missing files, wrong layout)."""


def load_run(run_dir: str | Path, checkpoint: str = "best"):
    """Rebuild the model (with its trained weights) and the data module of a run directory.

    Args:
        run_dir: A directory written by ``python -m drg_llama.train``.
        checkpoint: ``best`` (chosen on validation), ``last``, or a path to a ``.ckpt`` file.

    Returns:
        ``(model, datamodule, checkpoint_path)``.
    """
    from drg_llama.data.datamodule import DRGDataModule
    from drg_llama.models.classifier import DRGClassifier

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    ckpt = _checkpoint_path(run_dir, checkpoint)
    # Checkpoints hold only trainable tensors; the frozen base is rebuilt. For a random-init backbone (tests,
    # benchmarks) that rebuild must draw the same weights as training did, so seed as the training run did.
    L.seed_everything(config.get("seed_everything") or 0, verbose=False)
    # Checkpoints hold only trainable tensors by design (on_load_checkpoint checks they are all there), so
    # Lightning's list of frozen base keys "not in the checkpoint" is expected, not a problem.
    warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
    model = DRGClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
    data_args = dict(config.get("data") or {})
    data_args.pop("label_space", None)
    data = DRGDataModule(**data_args)
    if data.label_space.drgs != model.label_space.drgs:
        raise RunError(
            f"the data module's classes ({data.label_space.num_classes}) differ from the checkpoint's "
            f"({model.label_space.num_classes}); was the prepared folder changed after training?"
        )
    data.set_tokenizer(model.tokenizer)
    return model, data, ckpt


def read_run_config(run_dir: str | Path) -> dict:
    """The resolved ``config.yaml`` a training run saved, or a clear error when the folder is not a run."""
    config_path = Path(run_dir) / "config.yaml"
    if not config_path.exists():
        raise RunError(f"{run_dir} has no config.yaml; pass a directory written by python -m drg_llama.train")
    return yaml.safe_load(config_path.read_text())


def _checkpoint_path(run_dir: Path, checkpoint: str) -> str:
    if checkpoint not in ("best", "last"):
        if not Path(checkpoint).exists():
            raise RunError(f"checkpoint {checkpoint} does not exist")
        return checkpoint
    folder = run_dir / "checkpoints"
    if checkpoint == "last":
        path = folder / "last.ckpt"
    else:
        recorded = run_dir / "test_metrics.json"
        path = Path(json.loads(recorded.read_text())["checkpoint"]) if recorded.exists() else None
        if path is None or not path.exists():
            candidates = sorted(p for p in folder.glob("*.ckpt") if p.name != "last.ckpt")
            path = candidates[-1] if candidates else folder / "last.ckpt"
    if not path.exists():
        raise RunError(f"no {checkpoint} checkpoint in {folder}")
    return str(path)


def top_k_table(space, probs: np.ndarray, k: int) -> pd.DataFrame:
    """Top-k DRG codes and probabilities per row (list columns)."""
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]  # [N, k]
    codes = np.asarray(space.drgs)[top]
    return pd.DataFrame(
        {
            "pred_drg": codes[:, 0],
            "top_drgs": list(codes),
            "top_probs": list(np.take_along_axis(probs, top, axis=1).astype(np.float32)),
        }
    )


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    checkpoint: str = "best",
    top_k: int = 10,
    target_accuracy: float = DEFAULT_TARGET_ACCURACY,
    base_rate: float = DEFAULT_BASE_RATE,
    *,
    with_reasoning: bool = False,
) -> dict:
    """Score a run on ``split`` and write ``eval/metrics.json`` + ``eval/predictions.parquet``.

    Reasoner runs (``--variant sft|grpo``) go to ``drg_llama.evaluate_reasoner`` (greedy generation; the analysis
    sections need probabilities and are left out); ``with_reasoning`` adds their reasoning text to the predictions.

    Beyond ``metrics``, the report holds the sections of :func:`drg_llama.analysis.analysis_report`; the
    temperature and the selective-coding threshold are fitted on the validation split.
    """
    import lightning as L

    from drg_llama.evaluate_reasoner import evaluate_reasoner_run, is_reasoner_run

    if is_reasoner_run(run_dir):
        return evaluate_reasoner_run(run_dir, split, checkpoint, with_reasoning=with_reasoning)
    if split not in ("val", "test"):
        raise RunError(f"split must be 'val' or 'test', got {split!r}")
    model, data, ckpt = load_run(run_dir, checkpoint)
    data.setup("test" if split == "test" else "validate")
    loader = data.test_dataloader() if split == "test" else data.val_dataloader()
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False)
    trainer.test(model, dataloaders=loader, verbose=False)
    result = model.last_eval
    frame = data.split_frame(split).reset_index(drop=True)
    rows = result["row"]
    predictions = pd.concat(
        [
            frame.loc[rows, ["hadm_id", "subject_id"]].reset_index(drop=True),
            pd.DataFrame({"gold_drg": frame.loc[rows, "drg_code"].to_numpy()}),
            top_k_table(model.label_space, result["probs"], top_k),
        ],
        axis=1,
    )
    out = Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    predictions.to_parquet(out / f"predictions_{split}.parquet" if split != "test" else out / "predictions.parquet")
    report = {
        "split": split,
        "variant": model.label_space.variant,
        "drg_version": model.label_space.version,
        "checkpoint": ckpt,
        "decode": model.hparams.decode,
        "metrics": result["metrics"],
    }
    report.update(
        _analysis_sections(model, data, trainer, result, split, Path(run_dir), ckpt, target_accuracy, base_rate)
    )
    (out / ("metrics.json" if split == "test" else f"metrics_{split}.json")).write_text(json.dumps(report, indent=2))
    return report


def _analysis_sections(model, data, trainer, result, split, run_dir, ckpt, target_accuracy, base_rate) -> dict:
    """Calibration, selective coding, payment, breakdowns (drg_llama.analysis); saves the fitted temperature."""
    val = result
    if split != "val":  # temperature and threshold are fitted on validation, never on the split they are judged on
        data.setup("validate")
        trainer.test(model, dataloaders=data.val_dataloader(), verbose=False)
        val = model.last_eval
    frame = data.split_frame(split).loc[result["row"]]
    sections = analysis_report(
        model.label_space,
        result["probs"],
        result["gold"],
        frame["drg_code"].to_numpy(),
        frame["n_words"].to_numpy(),
        data.split_frame("train")["drg_code"].to_numpy(),
        val_probs=val["probs"],
        val_gold=val["gold"],
        target_accuracy=target_accuracy,
        base_rate=base_rate,
    )
    calibration = sections["calibration"]
    save_calibration(run_dir, calibration["temperature"], ckpt, n_fit=calibration["n_fit"])
    return sections


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drg_llama.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory written by python -m drg_llama.train")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--checkpoint", default="best", help="best (on validation), last, or a .ckpt path")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument(
        "--target-accuracy", type=float, default=DEFAULT_TARGET_ACCURACY, help="selective-coding target on val"
    )
    parser.add_argument(
        "--base-rate",
        type=float,
        default=DEFAULT_BASE_RATE,
        help=f"USD per unit of CMS relative weight (default {DEFAULT_BASE_RATE:.0f}, illustrative: give your own)",
    )
    parser.add_argument("--with-reasoning", action="store_true", help="reasoner runs: keep the reasoning text")
    args = parser.parse_args(argv)
    try:
        report = evaluate_run(
            args.run,
            args.split,
            args.checkpoint,
            args.top_k,
            args.target_accuracy,
            args.base_rate,
            with_reasoning=args.with_reasoning,
        )
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    m = report["metrics"]
    print(
        f"{args.split}: n={int(m['n'])} top1={m['top1']:.3f} top5={m['top5']:.3f} "
        f"macro_f1={m['macro_f1_present']:.3f} macro_auc={m['macro_auc']:.3f} -> {Path(args.run) / 'eval'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
