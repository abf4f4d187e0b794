"""Errors a user can fix: one line, exit status 2, the traceback only with --debug, never a word of note text."""

import pytest

from drg_llama.data.__main__ import main as data_main
from drg_llama.errors import UserError, report_error

#: Stands for patient text: it must never reach an error message.
MARKER = "Zebulon Quixote-Marchbanks"


def test_report_error_is_one_line_unless_debugging(capsys):
    assert report_error(UserError("notes.csv, line 3: malformed CSV"), debug=False) == 2
    assert capsys.readouterr().err == "error: notes.csv, line 3: malformed CSV\n"
    with pytest.raises(UserError):
        report_error(UserError("shown with its traceback"), debug=True)


def test_prepare_does_not_quote_a_header_less_notes_file(tmp_path, capsys):
    """Without a header line, the first note was printed as the "found columns" of the error."""
    root = tmp_path / "mimic"
    (root / "note").mkdir(parents=True)
    (root / "hosp").mkdir()
    (root / "note" / "discharge.csv").write_text(f"1-DS-1,1,1,DS,1,2180-01-01,2180-01-01,{MARKER} was admitted\n")
    (root / "hosp" / "drgcodes.csv").write_text(
        "subject_id,hadm_id,drg_type,drg_code,description,drg_severity,drg_mortality\n"
        "1,1,HCFA,291,HEART FAILURE & SHOCK W MCC,,\n"
    )
    assert data_main(["prepare", "--mimic-root", str(root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err  # a progress bar of the DRG file comes first
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "discharge.csv" in last and "missing column" in last
    assert MARKER not in err and "was admitted" not in err
