"""Tests of MIMIC-IV preparation: sections of the fixture, drop reasons, manifest, splits, bad input, stats, CLI.

    pytest tests/test_mimic.py

The fixture under tests/fixtures/mimic/ is hand-written in MIMIC-IV's layout; each of its admissions exercises one
header variant or one drop reason (listed in EXPECTED_DROPS / EXPECTED_KEPT below).
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from drg_llama.data.__main__ import main
from drg_llama.data.grouping import GROUPED_REASONS
from drg_llama.data.mimic import DROP_REASONS, DataError, prepare
from drg_llama.data.splits import SPLITS

FIXTURE = Path(__file__).parent / "fixtures" / "mimic"
NOTE_COLUMNS = ["note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime", "storetime", "text"]
DRG_COLUMNS = ["subject_id", "hadm_id", "drg_type", "drg_code", "description", "drg_severity", "drg_mortality"]

EXPECTED_KEPT = {
    20000001: 291,  # "Brief Hospital Course:" ... "Medications on Admission:"
    20000002: 292,  # "BRIEF HOSPITAL COURSE:" ... "DISCHARGE MEDICATIONS:"
    20000003: 871,  # "Hospital Course:" ... "Discharge Disposition:"
    20000004: 194,  # CRLF, "  Brief   Hospital<TAB>Course :" ... "CONDITION AT DISCHARGE:"
    20000005: 291,  # "# problem" paragraphs, ACTIVE/CHRONIC/TRANSITIONAL ISSUES, "MICU Course:"
    20000006: 193,  # two notes, the addendum has no course: note_seq 1 used
    20000007: 872,  # two notes with a course: note_seq 2 used
    20000008: 690,  # text on the header line, ends at a generic "Physical Therapy Recommendations:"
    20000009: 603,  # course runs to the end of the note
    20000010: 291,  # two HCFA titles (two versions) mapping to the same DRG, plus APR rows
}
EXPECTED_DROPS = {
    20000101: "no_note",
    20000102: "no_drg_row",
    20000103: "no_hcfa_row",
    20000104: "conflicting_drgs",
    20000105: "unmappable_title",
    20000106: "error_drg",
    20000107: "subject_mismatch",
    20000108: "empty_text",  # empty note
    20000109: "empty_text",  # header with an empty section
    20000110: "no_hospital_course",
    20000111: "too_short",
    20000112: "too_long",  # 744 words, max_words=500 below
    20000113: "duplicate_text",  # same course as 20000001
    20000114: "invalid_utf8",
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare(FIXTURE, out, max_words=500)
    return out


def _load(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(out / f"{s}.parquet").assign(split=s) for s in SPLITS])


# --------------------------------------------------------------------------------------------------------------------
# The fixture: every reason, every header variant
# --------------------------------------------------------------------------------------------------------------------


def test_fixture_every_admission_is_kept_or_dropped_with_its_reason(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    dropped = pd.read_csv(prepared / "dropped.csv")
    data = _load(prepared)
    assert dict(zip(dropped["hadm_id"], dropped["reason"])) == EXPECTED_DROPS
    assert dict(zip(data["hadm_id"], data["drg_code"])) == EXPECTED_KEPT
    assert manifest["input_admissions"] == len(EXPECTED_KEPT) + len(EXPECTED_DROPS) == 24
    assert manifest["kept"] + sum(manifest["dropped"].values()) == manifest["input_admissions"]
    assert set(manifest["dropped"]) == set(DROP_REASONS)
    assert all(manifest["dropped"][r] >= 1 for r in DROP_REASONS if r not in {"rare_class", *GROUPED_REASONS})
    assert manifest["splits"] == {s: int((data["split"] == s).sum()) for s in SPLITS}
    assert manifest["n_classes"] == len(set(EXPECTED_KEPT.values())) == 8
    assert manifest["admissions_with_several_notes"] == 2
    assert manifest["bhc_header_rule"] == {"brief_hospital_course": 9, "hospital_course": 1}
    for name in ("discharge", "drgcodes"):
        info = manifest["input_files"][name]
        assert info["bytes"] == Path(info["path"]).stat().st_size and len(info["sha256"]) == 64
    assert dropped["subject_id"].notna().all()


def test_fixture_sections_start_and_end_where_they_should(prepared):
    text = _load(prepared).set_index("hadm_id")["text"]
    for t in text:
        assert "Medications on Admission" not in t and "Discharge Medications" not in t.title()
        assert "\r" not in t and not t.startswith((" ", "\n")) and "Pertinent Results" not in t
    problems = text[20000005]
    for inside in ("# Acute on chronic systolic heart failure:", "#Atrial fibrillation:", "MICU Course:",
                   "CHRONIC ISSUES:", "TRANSITIONAL ISSUES:", "- Recheck chem 7 in one week"):  # fmt: skip
        assert inside in problems
    assert text[20000001].endswith("his dry weight is 82 kg.")
    assert "left upper lobe" in text[20000006]  # note_seq 1: the addendum has no course
    assert "REVISED" in text[20000007]  # note_seq 2 wins when both have one
    assert text[20000008].startswith("Ms. ___ with a history of recurrent urinary tract infections\npresented")
    assert text[20000008].endswith("seven days of therapy.")
    assert text[20000009].endswith("primary care doctor in one week.")
    assert text[20000004].startswith("Mr. ___ presented with productive cough")
    assert text[20000004].endswith("five day course of cefpodoxime.")


def test_output_schema_and_labels(prepared):
    data = _load(prepared)
    assert str(data["hadm_id"].dtype) == "int64" and str(data["subject_id"].dtype) == "int64"
    row = data.set_index("hadm_id").loc[20000008]
    assert row["drg_code"] == 690 and row["base_drg"] == 689 and row["mdc"] == "11"
    assert list(row["allowed_severities"]) == ["NONE", "CC"]
    assert row["source_title"] == "KIDNEY & URINARY TRACT INFECTIONS W/O MCC"
    assert row["drg_title"].lower() == "kidney and urinary tract infections without mcc"
    assert row["n_words"] == len(row["text"].split())
    hf = data.set_index("hadm_id").loc[20000002]
    assert list(hf["allowed_severities"]) == ["CC"] and hf["base_drg"] == 291
    assert set(data["bhc_rule"]) == {"brief_hospital_course", "hospital_course"}


def test_no_note_text_in_dropped_csv_or_manifest(prepared):
    notes = pd.read_csv(FIXTURE / "note" / "discharge.csv", dtype=str, keep_default_na=False, encoding="latin-1")
    shingles = set()
    for note in notes["text"]:
        words = note.split()
        shingles.update(" ".join(words[i : i + 4]) for i in range(len(words) - 3))
    shingles -= {"Brief Hospital Course:", "no discharge note for"}  # too generic to be patient text
    for path in (prepared / "dropped.csv", prepared / "manifest.json"):
        words = path.read_text().split()
        leaked = {" ".join(words[i : i + 4]) for i in range(len(words) - 3)} & shingles
        assert not leaked, f"{path.name} contains note text: {sorted(leaked)[:3]}"


def test_chunk_boundaries_do_not_change_the_result(tmp_path, prepared):
    # Chunks of 2 notes put the two notes of 20000006/20000007 in different chunks.
    prepare(FIXTURE, tmp_path, max_words=500, chunk_rows=2)
    for name in (*(f"{s}.parquet" for s in SPLITS), "dropped.csv"):
        a = pd.read_parquet(prepared / name) if name.endswith("parquet") else pd.read_csv(prepared / name)
        b = pd.read_parquet(tmp_path / name) if name.endswith("parquet") else pd.read_csv(tmp_path / name)
        pd.testing.assert_frame_equal(a, b)


def test_gzipped_inputs_and_explicit_paths(tmp_path):
    for sub, name in (("note", "discharge"), ("hosp", "drgcodes")):
        (tmp_path / "root" / sub).mkdir(parents=True)
        data = (FIXTURE / sub / f"{name}.csv").read_bytes()
        (tmp_path / "root" / sub / f"{name}.csv.gz").write_bytes(gzip.compress(data))
    a = prepare(tmp_path / "root", tmp_path / "a", max_words=500)
    b = prepare(
        None,
        tmp_path / "b",
        discharge=FIXTURE / "note" / "discharge.csv",
        drgcodes=FIXTURE / "hosp" / "drgcodes.csv",
        max_words=500,
    )
    assert a["kept"] == b["kept"] == len(EXPECTED_KEPT) and a["dropped"] == b["dropped"]
    assert a["input_files"]["discharge"]["path"].endswith("discharge.csv.gz")


# --------------------------------------------------------------------------------------------------------------------
# Splits on a generated corpus
# --------------------------------------------------------------------------------------------------------------------

_TITLES = {
    291: "HEART FAILURE & SHOCK W MCC",
    292: "HEART FAILURE & SHOCK W CC",
    871: "SEPTICEMIA OR SEVERE SEPSIS W/O MV >96 HOURS W MCC",
    194: "SIMPLE PNEUMONIA & PLEURISY W CC",
    690: "KIDNEY & URINARY TRACT INFECTIONS W/O MCC",
    603: "CELLULITIS W/O MCC",
    378: "GASTROINTESTINAL HEMORRHAGE W CC",
    683: "RENAL FAILURE W CC",
}


def _write_csv(path: Path, rows: list[dict], columns: list[str], *, sep: str = ",", gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows, columns=columns)
    frame.to_csv(path, index=False, sep=sep, quoting=csv.QUOTE_MINIMAL, compression="gzip" if gz else None)
    return path


def _corpus(root: Path, class_sizes: dict[int, int], adm_per_patient: int = 3, seed: int = 0) -> Path:
    """MIMIC-layout files with unique random courses, ``class_sizes[drg]`` admissions per DRG."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(500)]
    notes, drgs, hadm = [], [], 30_000_000
    for code, size in class_sizes.items():
        for _ in range(size):
            hadm += 1
            subject = 11_000_000 + int(rng.integers(0, max(1, sum(class_sizes.values()) // adm_per_patient)))
            course = " ".join(rng.choice(vocab, size=60))
            text = f"Chief Complaint:\nx\n \nBrief Hospital Course:\n{course}\n \nDischarge Medications:\nnone\n"
            notes.append(dict(note_id=f"{subject}-DS-{hadm}", subject_id=subject, hadm_id=hadm, note_type="DS",
                              note_seq=1, charttime="", storetime="", text=text))  # fmt: skip
            drgs.append(dict(subject_id=subject, hadm_id=hadm, drg_type="HCFA", drg_code=code,
                             description=_TITLES[code], drg_severity="", drg_mortality=""))  # fmt: skip
    _write_csv(root / "note" / "discharge.csv.gz", notes, NOTE_COLUMNS, gz=True)
    _write_csv(root / "hosp" / "drgcodes.csv.gz", drgs, DRG_COLUMNS, gz=True)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    sizes = {291: 120, 292: 60, 871: 40, 194: 30, 690: 20, 603: 7, 378: 2, 683: 1}
    return _corpus(tmp_path_factory.mktemp("corpus"), sizes)


def test_patient_split_no_patient_in_two_splits(corpus, tmp_path):
    manifest = prepare(corpus, tmp_path / "a")
    data = _load(tmp_path / "a")
    assert manifest["kept"] == 280 and manifest["input_admissions"] == 280
    assert data.groupby("subject_id")["split"].nunique().max() == 1
    patients = data.groupby("split")["subject_id"].nunique()
    fractions = patients / patients.sum()
    assert abs(fractions["train"] - 0.8) < 0.02 and abs(fractions["val"] - 0.1) < 0.02
    again = prepare(corpus, tmp_path / "b")
    assert again["splits"] == manifest["splits"]
    pd.testing.assert_frame_equal(_load(tmp_path / "a"), _load(tmp_path / "b"))
    other = _load(tmp_path / "c") if prepare(corpus, tmp_path / "c", seed=1) else None
    assert not other.set_index("hadm_id")["split"].equals(data.set_index("hadm_id")["split"])


def test_drg_llama_2023_split_is_stratified_without_validation(corpus, tmp_path):
    manifest = prepare(corpus, tmp_path, split="drg_llama_2023")
    data = _load(tmp_path)
    assert manifest["seed"] == 42 and manifest["splits"]["val"] == 0 and "none" in manifest["validation_split"]
    assert pd.read_parquet(tmp_path / "val.parquet").empty
    assert manifest["dropped"]["rare_class"] == 1  # DRG 683 has one case
    assert manifest["kept"] == 279 and manifest["splits"]["test"] == 28  # ceil(0.1 * 279)
    dropped = pd.read_csv(tmp_path / "dropped.csv")
    assert dropped.loc[dropped["reason"] == "rare_class", "detail"].str.contains("683").all()
    counts = pd.crosstab(data["drg_code"], data["split"])
    assert (counts["train"] >= 1).all()
    share = counts["test"] / counts.sum(axis=1)
    big = counts.sum(axis=1) >= 20
    assert ((share[big] - 0.1).abs() <= 0.05).all()  # every sizeable class keeps its 10% share


# --------------------------------------------------------------------------------------------------------------------
# Bad input: a clear DataError naming the file (and row), or a drop with a reason
# --------------------------------------------------------------------------------------------------------------------


def _note_row(hadm: int, subject: int = 12_000_001, text: str | None = None, **extra) -> dict:
    text = text or "Brief Hospital Course:\n" + " ".join(f"word{i}" for i in range(60)) + "\n"
    return dict(note_id=f"{subject}-DS-1", subject_id=subject, hadm_id=hadm, note_type="DS", note_seq=1,
                charttime="", storetime="", text=text) | extra  # fmt: skip


def _drg_row(hadm: int, subject: int = 12_000_001, title: str = _TITLES[291]) -> dict:
    return dict(subject_id=subject, hadm_id=hadm, drg_type="HCFA", drg_code=291, description=title,
                drg_severity="", drg_mortality="")  # fmt: skip


def _root(tmp_path: Path, notes: list[dict], drgs: list[dict], **kwargs) -> Path:
    _write_csv(tmp_path / "root" / "note" / "discharge.csv", notes, NOTE_COLUMNS, **kwargs)
    _write_csv(tmp_path / "root" / "hosp" / "drgcodes.csv", drgs, DRG_COLUMNS)
    return tmp_path / "root"


def test_missing_columns_are_named(tmp_path):
    root = _root(tmp_path, [_note_row(1)], [_drg_row(1)])
    frame = pd.read_csv(root / "hosp" / "drgcodes.csv").drop(columns=["description", "drg_type"])
    frame.to_csv(root / "hosp" / "drgcodes.csv", index=False)
    with pytest.raises(DataError, match=r"drgcodes\.csv: missing column\(s\) \['drg_type', 'description'\]"):
        prepare(root, tmp_path / "out")


def test_wrong_delimiter_says_so(tmp_path):
    root = _root(tmp_path, [_note_row(1)], [_drg_row(1)], sep="\t")
    with pytest.raises(DataError, match=r"discharge\.csv: missing column.*tab/semicolon/pipe-separated"):
        prepare(root, tmp_path / "out")


@pytest.mark.parametrize("bad", ["abc", "", "12.5"])
def test_non_numeric_hadm_id_names_file_and_row(tmp_path, bad):
    root = _root(tmp_path, [_note_row(1), _note_row(2), _note_row(bad)], [_drg_row(1)])
    with pytest.raises(DataError, match=r"discharge\.csv, row 3: hadm_id is .*expected an integer") as err:
        prepare(root, tmp_path / "out")
    assert err.value.row == 3 and err.value.file.endswith("discharge.csv")


def test_empty_file_and_header_only_file(tmp_path):
    root = _root(tmp_path, [_note_row(1)], [_drg_row(1)])
    (root / "hosp" / "drgcodes.csv").write_bytes(b"")
    with pytest.raises(DataError, match=r"drgcodes\.csv: file is empty"):
        prepare(root, tmp_path / "out")
    (root / "hosp" / "drgcodes.csv").write_text(",".join(DRG_COLUMNS) + "\n")
    manifest = prepare(root, tmp_path / "out")  # no rows is valid input: the one note has no DRG row
    assert manifest["input_admissions"] == 1 and manifest["dropped"]["no_drg_row"] == 1


def test_non_utf8_bytes(tmp_path):
    root = _root(tmp_path, [_note_row(1), _note_row(2)], [_drg_row(1), _drg_row(2)])
    path = root / "note" / "discharge.csv"
    path.write_bytes(path.read_bytes().replace(b"word7 ", b"w\xe9rd7 ", 1))  # in the note text: a drop
    manifest = prepare(root, tmp_path / "out")
    dropped = pd.read_csv(tmp_path / "out" / "dropped.csv")
    assert manifest["kept"] == 1 and dropped.to_dict("records")[0]["reason"] == "invalid_utf8"
    drg_path = root / "hosp" / "drgcodes.csv"
    drg_path.write_bytes(drg_path.read_bytes().replace(b"SHOCK W MCC", b"SHOCK \xff MCC", 2))  # in a title: error
    with pytest.raises(DataError, match=r"drgcodes\.csv, row 1: description has bytes that are not UTF-8"):
        prepare(root, tmp_path / "out")


def test_giant_note_is_dropped_as_too_long(tmp_path):
    giant = "Brief Hospital Course:\n" + "word " * 100_000 + "\nDischarge Medications:\nnone"
    root = _root(tmp_path, [_note_row(1), _note_row(2, text=giant)], [_drg_row(1), _drg_row(2)])
    manifest = prepare(root, tmp_path / "out")
    assert manifest["kept"] == 1 and manifest["dropped"]["too_long"] == 1
    detail = pd.read_csv(tmp_path / "out" / "dropped.csv")["detail"][0]
    assert detail == "100000 words > max_words 10000"


def test_malformed_csv_row(tmp_path):
    root = _root(tmp_path, [_note_row(1)], [_drg_row(1)])
    with open(root / "hosp" / "drgcodes.csv", "a") as f:
        f.write("12000001,2,HCFA,291,TITLE,,,extra,fields\n")
    with pytest.raises(
        DataError,
        match=r"drgcodes\.csv, row 2: malformed CSV: 9 fields where the header has 7 "
        r"\(starting at line 3\)",
    ):
        prepare(root, tmp_path / "out")


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(DataError, match=r"discharge\.csv\.gz: file not found"):
        prepare(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="unknown split"):
        prepare(FIXTURE, tmp_path / "out", split="random")
    with pytest.raises(ValueError, match="v43"):
        prepare(FIXTURE, tmp_path / "out", drg_version="v7")


# --------------------------------------------------------------------------------------------------------------------
# CLI and stats
# --------------------------------------------------------------------------------------------------------------------


def test_cli_prepare_and_stats(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prepare", "--mimic-root", str(FIXTURE), "--out", str(out), "--max-words", "500"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "24 admissions: 10 kept, 14 dropped; 8 classes" in printed and "duplicate_text" in printed
    assert "notes: " in captured.err and "diuresed" not in captured.err + printed  # progress bars show counts only

    assert main(["stats", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "10 admissions, 8 classes" in printed
    assert "291      2    1     0      3" in printed  # DRG 291: train, val, test, total
    assert "10   79   94  105  107" in printed  # course words: n, p50, p90, p99, max

    assert main(["stats", str(FIXTURE)]) == 0
    printed = capsys.readouterr().out
    assert "discharge notes            25" in printed and "HCFA rows                  24" in printed
    assert "hospital_course            1" in printed


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert main(["prepare", "--mimic-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "discharge.csv.gz: file not found" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------------------------
# Round trip with the synthetic corpus
# --------------------------------------------------------------------------------------------------------------------


def test_synth_prepare_round_trip(tmp_path):
    synthetic = pytest.importorskip("drg_llama.data.synthetic")
    synthetic.synthesize(tmp_path / "raw", 300, 0, "v43", progress=False)
    manifest = prepare(tmp_path / "raw", tmp_path / "prepared")
    assert manifest["input_admissions"] == 300
    assert manifest["kept"] + sum(manifest["dropped"].values()) == 300
    assert manifest["kept"] >= 250, manifest["dropped"]
    data = _load(tmp_path / "prepared")
    assert len(data) == manifest["kept"] and data.groupby("subject_id")["split"].nunique().max() == 1


@pytest.mark.slow
def test_prepare_scale_benchmark_runs_small(capsys):
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "prepare_scale.py"
    spec = importlib.util.spec_from_file_location("prepare_scale", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--n", "400"])  # exits if ours and the reference disagree
    assert result["kept"] > 300 and result["ours"]["peak_rss_mb"] > 0 and result["reference"]["wall_s"] > 0
    assert "| ours / reference |" in capsys.readouterr().out
