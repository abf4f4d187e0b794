"""Assign MS-DRGs to new notes with a trained run: top-k DRG codes, titles and probabilities per note.

    python -m drg_llama.predict --run runs/two_label/version_0 --input notes.csv --output drgs.csv
    python -m drg_llama.predict --run runs/two_label/version_0 --input note/discharge.csv.gz --output drgs.parquet

The input is a CSV (optionally gzipped: recognised by its content, not its name) whose first line names the columns:
``text`` and an id column (``id``, ``note_id`` or ``hadm_id``; else the row number from 0). A MIMIC-IV discharge
file (it has ``note_type``) is recognised and each note's Brief Hospital Course is extracted first, as in training.
A malformed CSV (a stray quote, a row with too many or too few fields) stops with the line to fix; a note that
cannot be used (empty, bytes that are not UTF-8, no hospital course) is kept in its place with a ``skipped``
reason. The output (CSV or Parquet, by extension) has one row per input note, in input order, with integer DRG
codes; it carries ids and predictions, never the note text. Only the run folder is needed: no training data.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import sys
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from drg_llama.errors import USER_ERRORS, UserError, report_error
from drg_llama.runs import Run, replacing

ID_COLUMNS = ("id", "note_id", "hadm_id")
OUTPUT_SUFFIXES = (".csv", ".parquet")
_GZIP_MAGIC = b"\x1f\x8b"


class InputError(UserError):
    """An input file or an option that cannot be predicted on."""


# ----------------------------------------------------------------------------------------------------------------
# reading notes


@contextmanager
def _text_lines(path: Path):
    """The file as text lines, gunzipped when its first bytes say gzip; bad bytes kept as surrogates so each note
    can be judged on its own (as ``prepare`` does) instead of refusing the whole file."""
    with path.open("rb") as raw:
        gzipped = raw.read(2) == _GZIP_MAGIC
    opener = gzip.open if gzipped else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="") as stream:
            yield stream
    except (EOFError, zlib.error, gzip.BadGzipFile):
        raise InputError(f"{path} is a damaged gzip file (truncated or corrupt); copy it again") from None


def _is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_notes(path: str | Path) -> pd.DataFrame:
    """One row per note of a CSV of texts or a MIMIC discharge file, in file order: ``id``, ``text`` (the hospital
    course for a MIMIC file; None when skipped) and ``skipped`` (None, or the reason the note cannot be used).

    Raises:
        InputError: The file is missing, empty, damaged or malformed (named with the line to fix), or its first line
            is not a header with a ``text`` column. Messages never quote the file's content.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file; pass a CSV with a 'text' column")
    csv.field_size_limit(2**31 - 1)  # a long note is one field; the default limit (131,072 characters) is too low
    ids, texts = [], []
    with _text_lines(path) as stream:
        reader = csv.reader(stream, strict=True)
        header = _read_header(reader, path)
        text_at = header.index("text")
        id_at = next((header.index(c) for c in ID_COLUMNS if c in header), None)
        while True:
            line = reader.line_num + 1  # where the next record starts: the line to show
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                raise InputError(
                    f"{path}, line {line}: malformed CSV ({err}); a quote inside a note must be doubled and the "
                    "note quoted — fix that line in an editor"
                ) from None
            if not fields:
                continue  # a blank line between records
            if len(fields) != len(header):
                raise InputError(
                    f"{path}, line {line}: {len(fields)} fields where the header has {len(header)} (an unquoted comma "
                    "or a missing one?); fix that line in an editor"
                )
            note_id = fields[id_at] if id_at is not None else str(len(ids))
            ids.append(
                note_id if _is_utf8(note_id) else note_id.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            )
            texts.append(fields[text_at])
    if not ids:
        raise InputError(f"{path} has a header but no notes")
    mimic = "note_type" in header  # a MIMIC-IV discharge file: predict from the hospital course, as trained
    kept, skipped = zip(*(_usable_text(text, mimic) for text in texts))
    return pd.DataFrame({"id": ids, "text": list(kept), "skipped": list(skipped)})


def _read_header(reader, path: Path) -> list[str]:
    try:
        header = next(reader)
    except StopIteration:
        raise InputError(f"{path} is empty; give a CSV with a 'text' column") from None
    except csv.Error as err:
        raise InputError(f"{path}, line 1: malformed CSV header ({err}); fix it in an editor") from None
    header = [name.strip() for name in header]
    # The column names are not echoed: in a file without a header line they are the first note's words.
    if "text" not in header:
        raise InputError(
            f"{path} has no 'text' column in its first line ({len(header)} column(s)); the first line must be a header "
            "naming the columns: text, and id, note_id or hadm_id"
        )
    if not all(_is_utf8(name) for name in header):
        raise InputError(f"{path}: the header line has bytes that are not UTF-8; save the file as UTF-8")
    return header


def _usable_text(text: str, mimic: bool) -> tuple[str | None, str | None]:
    """(text to predict from, None) or (None, why the note is skipped)."""
    if not _is_utf8(text):
        return None, "invalid_utf8"
    if mimic:
        from drg_llama.data.hospital_course import extract_bhc

        bhc = extract_bhc(text)
        if bhc is None or not bhc.text.strip():
            return None, "no_hospital_course"
        text = bhc.text
    if not text.strip():
        return None, "empty_text"
    return text, None


# ----------------------------------------------------------------------------------------------------------------
# predicting


def check_output(path: str | Path) -> Path:
    """The output path, checked before any inference: a .csv or .parquet file that can be written."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"--output {path}: name a .csv or .parquet file (not {path.suffix or 'no extension'})")
    if path.is_dir():
        raise InputError(f"--output {path} is a folder; name a .csv or .parquet file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}.probe-"):
            pass
    except OSError as err:
        raise InputError(f"cannot write to {path.parent} ({err.strerror}); choose another --output") from None
    return path


def classifier_top_k(run: Run, model, checkpoint: Path, texts: list[str], top_k: int) -> pd.DataFrame:
    """``drg_j``, ``title_j`` and ``prob_j`` (j = 1..k) per text, in order, with the run's calibration applied."""
    import lightning as L
    import torch

    from drg_llama.analysis import apply_temperature
    from drg_llama.drg import get_table
    from drg_llama.evaluate import top_k_table

    data = run.data_module(need_data=False)  # its tokenisation settings only: no data is read
    data.set_tokenizer(model.tokenizer)
    loader = data.texts_dataloader(texts)
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False)
    batches = trainer.predict(model, dataloaders=loader)
    rows = torch.cat([b["row"] for b in batches]).numpy()
    probs = torch.cat([b["probs"] for b in batches]).numpy()[np.argsort(rows)]
    # The temperature evaluate fitted on validation (1.0 if it has not run): calibrated probabilities, same ranking.
    probs = apply_temperature(probs, run.temperature(checkpoint))
    table = get_table(run.label_space.version)
    top = top_k_table(run.label_space, probs, top_k)
    out = {}
    for j in range(min(top_k, probs.shape[1])):
        codes = [int(c[j]) for c in top["top_drgs"]]
        out[f"drg_{j + 1}"] = pd.array(codes, dtype="Int64")
        out[f"title_{j + 1}"] = [table[c].title for c in codes]
        out[f"prob_{j + 1}"] = [float(p[j]) for p in top["top_probs"]]
    return pd.DataFrame(out)


def predict_file(
    run_dir: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    top_k: int = 5,
    *,
    checkpoint: str = "best",
    with_reasoning: bool = False,
) -> pd.DataFrame:
    """Predict every note of ``input_path`` and write ``output_path``; returns the written frame.

    Every option, the input file and the output path are checked before the model is loaded. Reasoner runs answer
    with one generated DRG per note (``drg_1``, ``title_1``, ``answer_status``, ``format_ok``); ``with_reasoning``
    adds their reasoning text, which may quote the note.
    """
    if top_k < 1:
        raise InputError(f"--top-k must be >= 1, not {top_k}")
    output_path = check_output(output_path)
    run = Run.open(run_dir)
    notes = read_notes(input_path)
    usable = notes["skipped"].isna()
    if not usable.any():
        raise InputError(f"no note in {input_path} has text to predict from ({len(notes)} skipped)")
    model, ckpt = run.load_model(checkpoint)
    texts = notes.loc[usable, "text"].tolist()
    if run.recipe == "reasoner":
        from drg_llama.evaluate_reasoner import reasoner_answers

        predicted = reasoner_answers(model, run.data_module(need_data=False), texts, with_reasoning)
    else:
        predicted = classifier_top_k(run, model, ckpt, texts, top_k)
    predicted.index = notes.index[usable]
    out = notes[["id"]].join(predicted)  # skipped notes keep their place, with empty prediction cells
    if not usable.all():
        out["skipped"] = notes["skipped"]
    with replacing(output_path) as tmp:
        if output_path.suffix.lower() == ".parquet":
            out.to_parquet(tmp, index=False)
        else:
            out.to_csv(tmp, index=False)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drg_llama.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run folder written by python -m drg_llama.train")
    parser.add_argument("--input", required=True, help="CSV with a text column, or a MIMIC discharge file")
    parser.add_argument("--output", required=True, help="output .csv or .parquet")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--checkpoint", default="best", help="best (the one training tested), last, or a .ckpt path")
    parser.add_argument("--with-reasoning", action="store_true", help="reasoner runs: keep the reasoning text")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    try:
        out = predict_file(
            args.run,
            args.input,
            args.output,
            args.top_k,
            checkpoint=args.checkpoint,
            with_reasoning=args.with_reasoning,
        )
    except USER_ERRORS as err:
        return report_error(err, args.debug)
    skipped = int(out["skipped"].notna().sum()) if "skipped" in out else 0
    note = " (see the 'skipped' column)" if skipped else ""
    print(f"predicted {len(out) - skipped} notes, skipped {skipped}{note} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
