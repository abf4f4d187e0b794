"""Scoring and answering with a reasoner run (``--variant sft|grpo``): what ``evaluate`` and ``predict`` call.

    python -m drg_llama.evaluate --run runs/grpo/version_0 --split test
    python -m drg_llama.predict --run runs/grpo/version_0 --input notes.csv --output drgs.csv --with-reasoning

``drg_llama.runs`` loads the model (a run is a reasoner run when its ``run.json`` says so). Metrics follow the
classifier's ``metrics.json`` layout (``top1`` = Pass@1 greedy) plus the generation metrics (format-valid and
invalid-DRG fractions, Pass@1 sampled, Maj@k, Pass@k). Predictions carry ids and answers; the reasoning text
(it may quote the note) is written only when asked (``with_reasoning=True`` / ``--with-reasoning``).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd


def evaluate_reasoner(model, data, split: str = "test", with_reasoning: bool = False) -> tuple[pd.DataFrame, dict]:
    """Generate on ``split`` of ``data``: the predictions frame and the report (the classifier's layout).

    Args:
        model: A ``DRGReasoner`` from ``Run.load_model``.
        data: The ``ReasonerDataModule`` to score (``Run.data_module``).
        split: ``val`` or ``test``.
        with_reasoning: Add the greedy reasoning text to the predictions (it may quote the note).
    """
    import lightning as L

    from drg_llama.models.rewards import majority_vote

    data.set_tokenizer(model.tokenizer)
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False)
    trainer.test(model, dataloaders=data.eval_dataloader(split), verbose=False)
    result = model.last_eval
    frame = data.split_frame(split)
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
        predictions["sampled_drgs"] = [[-1 if p.drg is None else p.drg for p in s] for s in result["sampled"]]
        predictions["majority_drg"] = pd.array([majority_vote([p.drg for p in s]) for s in result["sampled"]], "Int64")
    if with_reasoning:
        predictions["reasoning"] = [p.reasoning for p in result["greedy"]]
    report = {"drg_version": model.version, "decode": "greedy", "metrics": result["metrics"]}
    return predictions, report


def reasoner_answers(model, data, texts: Sequence[str], with_reasoning: bool = False) -> pd.DataFrame:
    """The greedy answer to every text, one row each in order: ``drg_1``, ``title_1``, ``answer_status``,
    ``format_ok`` (+ ``reasoning`` when asked; it may quote the note).

    Args:
        model: A ``DRGReasoner`` from ``Run.load_model``.
        data: The run's ``ReasonerDataModule`` (``Run.data_module``): its prompt settings render the texts.
        texts: Notes to answer.
        with_reasoning: Add the reasoning text (it may quote the note).
    """
    import torch

    from drg_llama.drg import get_table
    from drg_llama.drg.answers import parse_answer

    data.set_tokenizer(model.tokenizer)
    answers = []
    with torch.no_grad():
        for batch in data.texts_dataloader(texts):
            greedy, _ = model.generate(batch["prompt_ids"], batch["prompt_mask"])
            answers += [parse_answer(text, model.version) for text in greedy]
    table = get_table(model.version)
    out = pd.DataFrame(
        {
            "drg_1": pd.array([a.drg for a in answers], dtype="Int64"),
            "title_1": [table[a.drg].title if a.drg is not None else None for a in answers],
            "answer_status": [a.status for a in answers],
            "format_ok": [a.format_ok for a in answers],
        }
    )
    if with_reasoning:
        out["reasoning"] = [a.reasoning for a in answers]
    return out


__all__ = ["evaluate_reasoner", "reasoner_answers"]
