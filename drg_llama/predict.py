"""Assign MS-DRGs to new notes with a trained run: top-k DRG codes, titles and probabilities per note.

    python -m drg_llama.predict --run runs/two_label/version_0 --input notes.csv --output drgs.csv
    python -m drg_llama.predict --run runs/two_label/version_0 --input note/discharge.csv.gz --output drgs.parquet

The input is a CSV (optionally gzipped) with a ``text`` column and an id column (``id``, ``note_id`` or
``hadm_id``; else the row number). A MIMIC-IV discharge file (it has ``note_type``) is recognised and each note's
Brief Hospital Course is extracted first, as in training; notes without one are reported, not silently dropped.
The output (CSV or Parquet, by extension) carries ids and predictions, never the note text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from drg_llama.analysis import apply_temperature, load_temperature
from drg_llama.evaluate import RunError, load_run, top_k_table

ID_COLUMNS = ("id", "note_id", "hadm_id")


class InputError(ValueError):
    """An input file that cannot be predicted on."""


def read_notes(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(notes to predict: id + text, skipped: id + reason) from a CSV of texts or a MIMIC discharge file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise InputError(f"{path} is empty; give a CSV with a 'text' column") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not a readable CSV: {err}") from None
    if "text" not in frame.columns:
        raise InputError(f"{path} has no 'text' column (columns: {', '.join(frame.columns)})")
    if frame.empty:
        raise InputError(f"{path} has a header but no notes")
    id_column = next((c for c in ID_COLUMNS if c in frame.columns), None)
    ids = frame[id_column] if id_column else pd.Series(range(len(frame)), dtype=str).astype(str)
    texts = frame["text"]
    skipped: list[tuple[str, str]] = []
    if "note_type" in frame.columns:  # a MIMIC-IV discharge file: predict from the hospital course, as trained
        from drg_llama.data.mimic import extract_bhc

        courses = []
        for note_id, text in zip(ids, texts):
            bhc = extract_bhc(text)
            if bhc is None or not bhc.text.strip():
                skipped.append((note_id, "no_hospital_course"))
            courses.append(bhc.text if bhc is not None else "")
        texts = pd.Series(courses)
    notes = pd.DataFrame({"id": ids.to_numpy(), "text": texts.to_numpy()})
    empty = notes["text"].str.strip() == ""
    skipped += [(i, "empty_text") for i in notes.loc[empty, "id"] if i not in {s[0] for s in skipped}]
    return notes[~empty].reset_index(drop=True), pd.DataFrame(skipped, columns=["id", "reason"])


def predict_file(
    run_dir: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    top_k: int = 5,
    *,
    with_reasoning: bool = False,
) -> pd.DataFrame:
    """Predict every note of ``input_path`` and write ``output_path``; returns the written frame.

    Reasoner runs answer with one generated DRG per note (``drg_llama.evaluate_reasoner``); ``with_reasoning`` adds
    their reasoning text, which may quote the note.
    """
    import lightning as L
    import torch

    from drg_llama.drg import get_table
    from drg_llama.evaluate_reasoner import is_reasoner_run, predict_reasoner_file

    if is_reasoner_run(run_dir):
        return predict_reasoner_file(run_dir, input_path, output_path, with_reasoning)

    notes, skipped = read_notes(input_path)
    if notes.empty:
        raise InputError(f"no note in {input_path} has text to predict from ({len(skipped)} skipped)")
    model, data, ckpt = load_run(run_dir)
    loader = data.texts_dataloader(notes["text"].tolist(), list(range(len(notes))))
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=True)
    batches = trainer.predict(model, dataloaders=loader)
    rows = torch.cat([b["row"] for b in batches]).numpy()
    probs = torch.cat([b["probs"] for b in batches]).numpy()
    probs = probs[np.argsort(rows)]
    # The temperature evaluate fitted on validation (1.0 if it has not run): calibrated probabilities, same ranking.
    probs = apply_temperature(probs, load_temperature(run_dir, ckpt))
    table = get_table(model.label_space.version)
    top = top_k_table(model.label_space, probs, top_k)
    out = pd.DataFrame({"id": notes["id"]})
    for j in range(min(top_k, probs.shape[1])):
        out[f"drg_{j + 1}"] = [int(codes[j]) for codes in top["top_drgs"]]
        out[f"title_{j + 1}"] = [table[int(codes[j])].title for codes in top["top_drgs"]]
        out[f"prob_{j + 1}"] = [float(p[j]) for p in top["top_probs"]]
    return write_predictions(out, skipped, output_path)


def write_predictions(predicted: pd.DataFrame, skipped: pd.DataFrame, output_path: str | Path) -> pd.DataFrame:
    """Append the skipped notes (id + reason) and write CSV or Parquet by the file's extension."""
    out = predicted
    if not skipped.empty:
        out = pd.concat([predicted, skipped.rename(columns={"reason": "skipped"})], ignore_index=True)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    if output_path.suffix == ".parquet":
        out.to_parquet(output_path, index=False)
    else:
        out.to_csv(output_path, index=False)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drg_llama.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory written by python -m drg_llama.train")
    parser.add_argument("--input", required=True, help="CSV with a text column, or a MIMIC discharge file")
    parser.add_argument("--output", required=True, help="output .csv or .parquet")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--with-reasoning", action="store_true", help="reasoner runs: keep the reasoning text")
    args = parser.parse_args(argv)
    try:
        out = predict_file(args.run, args.input, args.output, args.top_k, with_reasoning=args.with_reasoning)
    except (InputError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    skipped = int(out["drg_1"].isna().sum()) if "drg_1" in out else 0
    print(f"predicted {len(out) - skipped} notes ({skipped} skipped, see the 'skipped' column) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
