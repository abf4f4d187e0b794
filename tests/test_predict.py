"""drg_llama.predict: every note accounted for in input order, malformed files named by line, options checked first.

Reading is tested without a model; the rest uses the session's tiny two_label run (conftest ``tiny_runs``).
"""

import gzip
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from drg_llama import predict
from drg_llama.predict import InputError, predict_file, read_notes

#: Stands for patient text: it must never reach an error message, a log line or an output file.
MARKER = "Zebulon Quixote-Marchbanks"


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


# ----------------------------------------------------------------------------------------------------------------
# reading notes


def test_notes_are_read_in_order_with_skips_in_place(tmp_path):
    path = write(
        tmp_path / "notes.csv",
        '\ufeffid,text\nn1,"first note, with a comma"\nn2,"  "\n\nn3,"a ""quoted"" word\non two lines"\n',
    )
    notes = read_notes(path)
    assert notes["id"].tolist() == ["n1", "n2", "n3"]  # a BOM and a blank line between records are fine
    assert notes["skipped"].fillna("").tolist() == ["", "empty_text", ""]
    assert notes.loc[2, "text"] == 'a "quoted" word\non two lines'


def test_a_bad_byte_skips_that_note_only(tmp_path):
    # prepare drops just the admission with a latin-1 byte; predict refused the whole file and named a wrong position
    path = write(tmp_path / "notes.csv", b"id,text\na,caf\xe9 au lait\nb,heart failure\n")
    notes = read_notes(path)
    assert notes["skipped"].fillna("").tolist() == ["invalid_utf8", ""] and notes.loc[1, "text"] == "heart failure"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # A stray quote swallowed the next note: 2 notes in, "predicted 1", exit 0.
        ('id,text\na,"note one with "a quote" inside"\nb,"note two"\n', r"line 2: malformed CSV"),
        ('id,text\na,note one\nb,"note two never closed\n', r"line 3: malformed CSV"),
        ("id,text\na,note one\nb,note two,extra\nc,note three\n", r"line 3: 3 fields where the header has 2"),
        ("id,text\na\n", r"line 2: 1 fields where the header has 2"),
        ("", "is empty"),
        ("id,text\n", "has a header but no notes"),
    ],
)
def test_malformed_csv_names_the_line(tmp_path, content, message):
    with pytest.raises(InputError, match=message):
        read_notes(write(tmp_path / "notes.csv", content))


def test_a_file_without_a_header_line_is_not_quoted(tmp_path):
    path = write(tmp_path / "notes.csv", f"1,{MARKER} was admitted with chest pain\n2,another note\n")
    with pytest.raises(InputError, match="no 'text' column in its first line") as err:
        read_notes(path)
    assert MARKER not in str(err.value) and "chest pain" not in str(err.value)


def test_gzip_is_recognised_by_content_and_damage_is_named(tmp_path):
    csv_text = "id,text\na,heart failure\n"
    packed = gzip.compress(csv_text.encode())
    assert read_notes(write(tmp_path / "notes.csv.gz", packed))["id"].tolist() == ["a"]
    assert read_notes(write(tmp_path / "plain.gz", csv_text))["id"].tolist() == ["a"]  # misnamed: not gzip
    assert read_notes(write(tmp_path / "packed.csv", packed))["id"].tolist() == ["a"]  # gzip without .gz
    damaged = {"truncated.csv.gz": packed[: len(packed) // 2], "corrupt.csv.gz": packed[:10] + b"x" * 40}
    for name, content in damaged.items():
        with pytest.raises(InputError, match="is a damaged gzip file"):
            read_notes(write(tmp_path / name, content))


def test_mimic_discharge_notes_are_cut_to_the_hospital_course(tmp_path):
    frame = pd.DataFrame(
        {
            "note_id": ["1-DS-1", "2-DS-1"],
            "hadm_id": ["1", "2"],
            "note_type": ["DS", "DS"],
            "text": ["Brief Hospital Course:\nTreated for pneumonia.\n\nDischarge Medications:\nnone", "no course"],
        }
    )
    frame.to_csv(tmp_path / "discharge.csv", index=False)
    notes = read_notes(tmp_path / "discharge.csv")
    assert notes["text"].fillna("").tolist() == ["Treated for pneumonia.", ""]
    assert notes["skipped"].fillna("").tolist() == ["", "no_hospital_course"]


# ----------------------------------------------------------------------------------------------------------------
# options and the output path: checked before the model is loaded


@pytest.mark.parametrize(
    ("output", "top_k", "message"),
    [
        ("out.csv", -1, "--top-k must be >= 1"),
        ("out.csv", 0, "--top-k must be >= 1"),
        ("out.xlsx", 5, r"name a \.csv or \.parquet file \(not \.xlsx\)"),
        ("folder.csv", 5, "is a folder"),
        ("a_file/out.csv", 5, "cannot write to"),
    ],
)
def test_bad_options_stop_before_inference(tmp_path, monkeypatch, output, top_k, message):
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "a_file").write_text("a file, not a folder")
    notes = write(tmp_path / "notes.csv", "id,text\na,heart failure\n")

    def no_run(*args, **kwargs):
        raise AssertionError("the run was opened before the options were checked")

    monkeypatch.setattr(predict.Run, "open", no_run)
    with pytest.raises(InputError, match=message):
        predict_file("any_run", notes, tmp_path / output, top_k)


# ----------------------------------------------------------------------------------------------------------------
# with a trained run


def test_output_keeps_input_order_and_integer_codes(tiny_runs, tmp_path):
    run_dir, _ = tiny_runs["two_label"]
    notes = write(tmp_path / "notes.csv", "id,text\na,sepsis\nb,\nc,heart failure\nd, \n")
    out = predict_file(run_dir, notes, tmp_path / "pred.csv", top_k=2)
    assert out["id"].tolist() == ["a", "b", "c", "d"]  # skipped notes stay where they were
    assert out["skipped"].tolist()[1::2] == ["empty_text", "empty_text"] and out["skipped"][::2].isna().all()
    lines = (tmp_path / "pred.csv").read_text().splitlines()
    assert lines[0].split(",")[:4] == ["id", "drg_1", "title_1", "prob_1"]
    first_code = lines[1].split(",")[1]
    assert first_code.isdigit(), lines[1]  # 872, never 872.0
    parquet = predict_file(run_dir, notes, tmp_path / "pred.parquet", top_k=2)
    written = pd.read_parquet(tmp_path / "pred.parquet")
    assert str(written["drg_1"].dtype) == "Int64" and written["drg_1"].isna().tolist() == [False, True, False, True]
    assert parquet["id"].tolist() == ["a", "b", "c", "d"]


def test_predict_cli_errors_are_one_line_without_note_text(tiny_runs, tmp_path):
    """A separate process, as a user runs it: one line on stderr, exit status 2, no traceback, no note text."""
    run_dir, _ = tiny_runs["two_label"]
    cases = {
        "swallowed note": f'id,text\na,"{MARKER} said "no" twice"\nb,"second"\n',
        "no header": f"1,{MARKER} was admitted\n",
        "ragged": f"id,text\na,{MARKER},x\n",
    }
    for name, content in cases.items():
        path = write(tmp_path / f"{name}.csv", content)
        args = ["--run", str(run_dir), "--input", str(path), "--output", str(tmp_path / "o.csv")]
        proc = subprocess.run(
            [sys.executable, "-m", "drg_llama.predict", *args], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, (name, proc.stderr)
        assert MARKER not in proc.stderr + proc.stdout, name
        assert not (tmp_path / "o.csv").exists(), name
