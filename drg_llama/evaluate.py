"""Score a trained run on a prepared split: ``metrics.json`` and ``predictions.parquet`` under ``DIR/eval/``.

    python -m drg_llama.evaluate --run runs/two_label/version_0                       # its own test split
    python -m drg_llama.evaluate --run runs/two_label/version_0 --split val --checkpoint last
    python -m drg_llama.evaluate --run runs/two_label/version_0 --data hospital_prepared --split all
    python -m drg_llama.evaluate --run runs/two_label/version_0 --target-accuracy 0.9 --base-rate 7000

Everything comes from the run folder (model, label space, tokenisation settings) plus the prepared data to score:
the run's own (``DIR/eval/``) or, with ``--data``, any other prepared folder of the same MS-DRG version
(``DIR/eval/<folder name>/``), e.g. a model trained on MIMIC-IV scored on a hospital's own notes. ``--split all``
scores every row of such a folder. DRGs outside the run's label space count as errors and are listed in
``outside_label_space``.

Predictions carry ids, the gold DRG and the top-k DRGs with probabilities, never note text. For classifier runs
``metrics.json`` also holds calibration (a temperature fitted on the validation split of the scored data; for the
run's own data it is saved as ``DIR/calibration.json`` for ``predict``), selective coding, payment impact,
breakdowns and the severity confusion matrix (``drg_llama.analysis``). Reasoner runs (``--variant sft|grpo``) are
scored by greedy generation (``drg_llama.evaluate_reasoner``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from drg_llama.analysis import DEFAULT_BASE_RATE, DEFAULT_TARGET_ACCURACY, analysis_report
from drg_llama.errors import USER_ERRORS, report_error
from drg_llama.runs import EVAL_SPLITS, Run, RunError, replacing, write_json


def top_k_table(space, probs: np.ndarray, k: int) -> pd.DataFrame:
    """Top-k DRG codes and probabilities per row (list columns)."""
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # [N, k]
    codes = np.asarray(space.drgs)[top]
    return pd.DataFrame(
        {
            "pred_drg": codes[:, 0],
            "top_drgs": list(codes),
            "top_probs": list(np.take_along_axis(probs, top, axis=1).astype(np.float32)),
        }
    )


def outside_label_space(space, gold_codes) -> dict[str, Any]:
    """Scored rows whose gold DRG is not a class of the run (they count as errors), by DRG."""
    codes = pd.Series(np.asarray(gold_codes, dtype=np.int64))
    outside = codes[~codes.isin(space.drgs)].value_counts().sort_index()
    return {"rows": int(outside.sum()), "drgs": {int(code): int(n) for code, n in outside.items()}}


def check_options(split: str, top_k: int, target_accuracy: float, base_rate: float, data_dir) -> None:
    """Every option, checked before the model is loaded (a bad one must not cost a pass over the data)."""
    if split not in EVAL_SPLITS:
        raise RunError(f"--split must be one of {', '.join(EVAL_SPLITS)}, not {split!r}")
    if split == "all" and data_dir is None:
        raise RunError(
            "--split all scores the training rows too; use it with --data on a folder the run was not trained on"
        )
    if top_k < 1:
        raise RunError(f"--top-k must be >= 1, not {top_k}")
    if not 0 < target_accuracy <= 1:
        raise RunError(f"--target-accuracy must be in (0, 1], not {target_accuracy}")
    if not base_rate > 0:
        raise RunError(f"--base-rate is USD per unit of CMS weight and must be > 0, not {base_rate}")


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    checkpoint: str = "best",
    top_k: int = 10,
    target_accuracy: float = DEFAULT_TARGET_ACCURACY,
    base_rate: float = DEFAULT_BASE_RATE,
    *,
    data_dir: str | Path | None = None,
    with_reasoning: bool = False,
) -> dict:
    """Score a run on ``split`` and write its ``metrics.json`` and ``predictions.parquet``; returns the report.

    Args:
        run_dir: A run folder written by ``python -m drg_llama.train``.
        split: ``test``, ``val``, or ``all`` (every row of ``data_dir``).
        checkpoint: ``best`` (the one training tested), ``last``, or a ``.ckpt`` path.
        top_k: DRGs per prediction row.
        target_accuracy: Selective-coding target (classifier runs).
        base_rate: USD per unit of CMS relative weight (classifier runs).
        data_dir: Another prepared folder to score; default the run's own data.
        with_reasoning: Reasoner runs: add the reasoning text to the predictions (it may quote the note).
    """
    check_options(split, top_k, target_accuracy, base_rate, data_dir)
    run = Run.open(run_dir)
    data = run.data_module(data_dir)
    # The folder (manifest, version, splits) and the rows to score are checked before the model is built.
    if split != "all" and not len(data.split_frame(split)):
        raise RunError(f"{data.prepared_dir / split}.parquet has no rows (drg_llama_2023 has no val); score test")
    model, ckpt = run.load_model(checkpoint)
    if run.recipe == "reasoner":
        if split == "all":
            raise RunError("--split all scores classifier runs; score a reasoner run with --split test or val")
        from drg_llama.evaluate_reasoner import evaluate_reasoner

        predictions, report = evaluate_reasoner(model, data, split, with_reasoning=with_reasoning)
        report["variant"] = run.variant
    else:
        own_data = data_dir is None
        predictions, report = _evaluate_classifier(
            run, model, ckpt, data, split, top_k, target_accuracy, base_rate, own_data
        )
    report = {
        "split": split,
        "data": str(Path(data_dir).resolve()) if data_dir is not None else "the run's own data",
        "checkpoint": run.relative(ckpt),
        **report,
        "outside_label_space": outside_label_space(run.label_space, predictions["gold_drg"]),
    }
    metrics_path, predictions_path = run.eval_files(split, data_dir)
    predictions_path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(predictions_path) as tmp:
        predictions.to_parquet(tmp, index=False)
    write_json(metrics_path, report)
    return report


def _scored(model, data, trainer, split: str) -> dict[str, np.ndarray]:
    """Probabilities, gold indices and rows of one split (empty arrays for an empty split)."""
    if not len(data.split_frame(split)):
        width = model.label_space.num_classes
        return {"probs": np.zeros((0, width)), "gold": np.zeros(0, np.int64), "row": np.zeros(0, np.int64)}
    trainer.test(model, dataloaders=data.eval_dataloader(split), verbose=False)
    return model.last_eval


def _evaluate_classifier(run, model, ckpt, data, split, top_k, target_accuracy, base_rate, own_data):
    """Predictions frame and report of a classifier run; the fitted temperature is saved for the run's own data
    (``predict`` applies it), never for other data."""
    import lightning as L

    from drg_llama.metrics import score_predictions

    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False)
    data.set_tokenizer(model.tokenizer)
    splits = ("train", "val", "test") if split == "all" else (split,)
    parts = [(_scored(model, data, trainer, s), data.split_frame(s)) for s in splits]
    probs = np.concatenate([scored["probs"] for scored, _ in parts])
    gold = np.concatenate([scored["gold"] for scored, _ in parts])
    frame = pd.concat([f.loc[scored["row"]] for scored, f in parts], ignore_index=True)
    predictions = pd.concat(
        [
            frame[["hadm_id", "subject_id"]],
            pd.DataFrame({"gold_drg": frame["drg_code"].to_numpy()}),
            top_k_table(model.label_space, probs, top_k),
        ],
        axis=1,
    )
    report = {
        "variant": model.label_space.variant,
        "drg_version": model.label_space.version,
        "decode": model.hparams.decode,
        "metrics": score_predictions(model.label_space, probs, gold),
    }
    # The temperature and the selective-coding threshold are fitted on validation, never on the rows they are judged
    # on; with --split all every row is judged, so there is nothing left to fit on.
    if split == "all":
        return predictions, report
    val = parts[0][0] if split == "val" else _scored(model, data, trainer, "val")
    train_codes = run.train_codes()
    if train_codes is None:  # a run folder from before run.json: its own training rows, as then
        train_codes = data.split_frame("train")["drg_code"].to_numpy()
    report.update(
        analysis_report(
            model.label_space,
            probs,
            gold,
            frame["drg_code"].to_numpy(),
            frame["n_words"].to_numpy(),
            train_codes,
            val_probs=val["probs"],
            val_gold=val["gold"],
            target_accuracy=target_accuracy,
            base_rate=base_rate,
        )
    )
    if own_data:
        calibration = report["calibration"]
        run.save_temperature(calibration["temperature"], ckpt, n_fit=calibration["n_fit"])
    return predictions, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drg_llama.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run folder written by python -m drg_llama.train")
    parser.add_argument("--data", default=None, help="another prepared folder to score (default: the run's own data)")
    parser.add_argument("--split", default="test", choices=EVAL_SPLITS, help="all: every row of --data")
    parser.add_argument("--checkpoint", default="best", help="best (the one training tested), last, or a .ckpt path")
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
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    try:
        report = evaluate_run(
            args.run,
            args.split,
            args.checkpoint,
            args.top_k,
            args.target_accuracy,
            args.base_rate,
            data_dir=args.data,
            with_reasoning=args.with_reasoning,
        )
    except USER_ERRORS as err:
        return report_error(err, args.debug)
    m = report["metrics"]
    outside = report["outside_label_space"]["rows"]
    print(
        f"{args.split}: n={int(m['n'])} top1={m['top1']:.3f} top5={m['top5']:.3f} "
        f"macro_f1={m['macro_f1_present']:.3f} macro_auc={m['macro_auc']:.3f}"
        + (f" ({outside} rows with a DRG outside the run's classes, counted as errors)" if outside else "")
        + f" -> {Run.open(args.run).eval_files(args.split, args.data)[0].parent}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
