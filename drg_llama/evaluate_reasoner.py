"""Evaluate and predict with a reasoner run (``--variant sft|grpo``); ``evaluate`` and ``predict`` dispatch here.

    python -m drg_llama.evaluate --run runs/grpo/version_0 --split test
    python -m drg_llama.predict --run runs/grpo/version_0 --input notes.csv --output drgs.csv --with-reasoning

A run directory is a reasoner run when it holds ``reasoner.json`` (written by ``train_reasoner``). Metrics follow the
classifier's ``metrics.json`` layout (``top1`` = Pass@1 greedy) plus the generation metrics (format-valid and
invalid-DRG fractions, Pass@1 sampled, Maj@k, Pass@k). Predictions carry ids and answers; the reasoning text
(it may quote the note) is written only when asked (``with_reasoning=True`` / ``--with-reasoning``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd

from drg_llama.train_reasoner import RUN_MARKER


def is_reasoner_run(run_dir: str | Path) -> bool:
    """True when ``run_dir`` was written by the reasoner's training entry."""
    return (Path(run_dir) / RUN_MARKER).is_file()


def load_reasoner_run(run_dir: str | Path, checkpoint: str = "last"):
    """Rebuild a reasoner (frozen base + its SFT adapter when it had one + trained LoRA) and its data module.

    Args:
        run_dir: A reasoner run directory.
        checkpoint: ``last`` (also what ``best`` means here: reasoner runs keep the last step) or a ``.ckpt`` path.

    Returns:
        ``(model, datamodule, checkpoint_path)``.
    """
    from drg_llama.data.datamodule import DRGDataModule
    from drg_llama.evaluate import RunError, read_run_config
    from drg_llama.models.reasoner import DRGReasoner

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    ckpt = Path(checkpoint) if checkpoint not in ("best", "last") else run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        raise RunError(f"no checkpoint {ckpt}")
    # Checkpoints hold only trainable tensors by design (on_load_checkpoint checks they are all there), so
    # Lightning's list of frozen base keys "not in the checkpoint" is expected, not a problem.
    warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
    model = DRGReasoner.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=False)
    data_args = dict(config.get("data") or {})
    data_args.pop("label_space", None)
    data = DRGDataModule(**data_args)
    model.attach_data(data)
    return model, data, str(ckpt)


def evaluate_reasoner_run(
    run_dir: str | Path,
    split: str = "test",
    checkpoint: str = "last",
    samples: int | None = None,
    with_reasoning: bool = False,
) -> dict:
    """Generate on ``split`` and write ``eval/metrics.json`` + ``eval/predictions.parquet`` (classifier layout).

    Args:
        run_dir: Reasoner run directory.
        split: ``val`` or ``test``.
        checkpoint: ``last`` or a ``.ckpt`` path.
        samples: k sampled answers per note for Pass@1 (sampled), Maj@k, Pass@k; default the run's ``eval_samples``.
        with_reasoning: Add the greedy reasoning text to the predictions (it may quote the note).
    """
    import lightning as L

    from drg_llama.evaluate import RunError

    if split not in ("val", "test"):
        raise RunError(f"split must be 'val' or 'test', got {split!r}")
    model, data, ckpt = load_reasoner_run(run_dir, checkpoint)
    if samples is not None:
        model.hparams.eval_samples = samples
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False)
    trainer.test(model, dataloaders=model._loader(split, train=False), verbose=False)
    result = model.last_eval
    frame = model.split_frame(split).drop(columns=["text"])
    rows = [r["row"] for r in result["rows"]]
    predictions = pd.DataFrame(
        {
            "hadm_id": frame.loc[rows, "hadm_id"].to_numpy(),
            "subject_id": frame.loc[rows, "subject_id"].to_numpy(),
            "gold_drg": frame.loc[rows, "drg_code"].to_numpy(),
            "pred_drg": pd.array([p.drg for p in result["greedy"]], dtype="Int64"),
            "answer_status": [p.status for p in result["greedy"]],
            "format_ok": [p.format_ok for p in result["greedy"]],
        }
    )
    if result["sampled"] is not None:
        from drg_llama.models.rewards import majority_vote

        predictions["sampled_drgs"] = [[-1 if p.drg is None else p.drg for p in s] for s in result["sampled"]]
        predictions["majority_drg"] = pd.array([majority_vote([p.drg for p in s]) for s in result["sampled"]], "Int64")
    if with_reasoning:
        predictions["reasoning"] = [p.reasoning for p in result["greedy"]]
    out = Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if split == "test" else f"_{split}"
    predictions.to_parquet(out / f"predictions{suffix}.parquet")
    report = {
        "split": split,
        "variant": json.loads((Path(run_dir) / RUN_MARKER).read_text())["stage"],
        "drg_version": model.version,
        "checkpoint": ckpt,
        "decode": "greedy",
        "metrics": result["metrics"],
    }
    (out / f"metrics{suffix}.json").write_text(json.dumps(report, indent=2))
    return report


def predict_reasoner_file(
    run_dir: str | Path, input_path: str | Path, output_path: str | Path, with_reasoning: bool = False
) -> pd.DataFrame:
    """Answer every note of ``input_path`` greedily and write ``output_path`` (ids, DRG, title, answer status).

    Columns: ``id``, ``drg_1``, ``title_1``, ``answer_status``, ``format_ok`` (+ ``reasoning`` when asked); notes
    that could not be read are listed with a ``skipped`` reason, as for the classifier.
    """
    import torch

    from drg_llama.drg import get_table
    from drg_llama.models.reasoner import build_prompts, left_pad
    from drg_llama.models.rewards import parse_answer
    from drg_llama.predict import InputError, read_notes, write_predictions

    notes, skipped = read_notes(input_path)
    if notes.empty:
        raise InputError(f"no note in {input_path} has text to predict from ({len(skipped)} skipped)")
    model, _, _ = load_reasoner_run(run_dir)
    model.eval()
    prompts = build_prompts(
        model.tokenizer, notes["text"].tolist(), model.parts, model.hparams.max_note_tokens, model.hparams.truncation
    )
    size = model.hparams.eval_batch_size
    answers = []
    with torch.no_grad():
        for start in range(0, len(prompts), size):
            ids, mask = left_pad(prompts[start : start + size], model.tokenizer.pad_token_id)
            greedy, _ = model.generate(ids, mask)
            answers += [parse_answer(text, model.version) for text in greedy]
    table = get_table(model.version)
    out = pd.DataFrame(
        {
            "id": notes["id"],
            "drg_1": pd.array([a.drg for a in answers], dtype="Int64"),
            "title_1": [table[a.drg].title if a.drg is not None else None for a in answers],
            "answer_status": [a.status for a in answers],
            "format_ok": [a.format_ok for a in answers],
        }
    )
    if with_reasoning:
        out["reasoning"] = [a.reasoning for a in answers]
    return write_predictions(out, skipped, output_path)


__all__ = ["evaluate_reasoner_run", "is_reasoner_run", "load_reasoner_run", "predict_reasoner_file"]
