"""A prepared folder is complete or absent, readers refuse one that does not match its manifest, and every bad
input gets one sentence naming the file and what to do.

    pytest tests/test_prepare_safety.py
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from drg_llama.data import grouping, mimic, prepared
from drg_llama.data.__main__ import main
from drg_llama.data.csvfiles import DataError
from drg_llama.data.mimic import prepare
from drg_llama.errors import UserError

FIXTURE = Path(__file__).parent / "fixtures" / "mimic"
NOTE_COLUMNS = ["note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime", "storetime", "text"]
DRG_COLUMNS = ["subject_id", "hadm_id", "drg_type", "drg_code", "description", "drg_severity", "drg_mortality"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# --------------------------------------------------------------------------------------------------------------------
# Ctrl-C at any point
# --------------------------------------------------------------------------------------------------------------------

# Every stage of prepare, in order: an interrupt in any of them must leave the old folder (or none).
STAGES = [
    (mimic, "read_billed_labels"),
    (mimic, "_scan_notes"),
    (mimic, "group_stays"),
    (mimic, "_resolve"),
    (mimic, "_write_splits"),
    (mimic, "write_manifest"),
    (prepared, "file_record"),
]


def _interrupt(monkeypatch, module, name: str, after_calls: int = 0) -> None:
    real = getattr(module, name)
    calls = []

    def interrupted(*args, **kwargs):  # one Ctrl-C, at call number after_calls + 1
        calls.append(1)
        if len(calls) == after_calls + 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)


@pytest.fixture(scope="module")
def old_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("old") / "prepared"
    prepare(FIXTURE, out, max_words=500)
    return out


@pytest.mark.parametrize("module, name", STAGES, ids=[name for _, name in STAGES])
@pytest.mark.parametrize("had_folder", [True, False], ids=["over_old", "new"])
def test_ctrl_c_in_any_stage_leaves_the_old_folder_or_none(tmp_path, monkeypatch, old_folder, module, name,
                                                           had_folder):  # fmt: skip
    out = tmp_path / "prepared"
    if had_folder:
        shutil.copytree(old_folder, out)
    before = _snapshot(out) if had_folder else None
    _interrupt(monkeypatch, module, name)
    with pytest.raises(KeyboardInterrupt):
        prepare(FIXTURE, out, labels="grouped_or_billed", max_words=600)  # would write different files
    monkeypatch.undo()
    if had_folder:
        assert _snapshot(out) == before
        prepared.verify(out)
    else:
        assert not out.exists()
    assert _leftovers(tmp_path, "prepared") == []


@pytest.mark.parametrize("call", [1, 2])
def test_ctrl_c_between_the_renames_puts_the_old_folder_back(tmp_path, monkeypatch, old_folder, call):
    out = tmp_path / "prepared"
    shutil.copytree(old_folder, out)
    before = _snapshot(out)
    _interrupt(monkeypatch, prepared.os, "rename", after_calls=call - 1)  # 1: old aside, 2: new into place
    with pytest.raises(KeyboardInterrupt):
        prepare(FIXTURE, out, max_words=600)
    monkeypatch.undo()
    assert _snapshot(out) == before and _leftovers(tmp_path, "prepared") == []


def test_replacing_a_folder_keeps_nothing_of_the_old_one(tmp_path, old_folder):
    out = tmp_path / "prepared"
    shutil.copytree(old_folder, out)
    (out / "tokenized").mkdir()  # a cache the data module wrote into the old folder
    manifest = prepare(FIXTURE, out, max_words=600)
    assert manifest["max_words"] == 600 and not (out / "tokenized").exists()
    assert sorted(p.name for p in out.iterdir()) == ["dropped.csv", "manifest.json", *sorted(prepared.SPLIT_FILES)]
    assert _leftovers(tmp_path, "prepared") == []


# --------------------------------------------------------------------------------------------------------------------
# Readers check the folder against its manifest
# --------------------------------------------------------------------------------------------------------------------


def test_manifest_records_every_file(old_folder):
    manifest = json.loads((old_folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {*prepared.SPLIT_FILES, "dropped.csv"}
    assert sum(manifest["files"][f]["rows"] for f in prepared.SPLIT_FILES) == manifest["kept"]
    assert prepared.verify(old_folder) == manifest


def _rewrite_train_without_a_row(folder: Path) -> None:
    table = pq.read_table(folder / "train.parquet")
    pq.write_table(table.slice(1), folder / "train.parquet")


@pytest.mark.parametrize(
    "damage, message",
    [
        (_rewrite_train_without_a_row, r"train\.parquet: its size differs from manifest\.json"),
        (lambda f: (f / "test.parquet").unlink(), r"test\.parquet: is listed in manifest\.json but missing"),
        (lambda f: (f / "dropped.csv").write_text("hadm_id\n"), r"dropped\.csv: its size differs"),
        (lambda f: (f / "manifest.json").write_text("{"), r"manifest\.json: is not a readable manifest"),
        (
            lambda f: (f / "manifest.json").write_text(json.dumps({"drg_version": "v43"})),
            r"manifest\.json: lists no file checksums \(written by an older drg-llama\); re-run prepare",
        ),
    ],
    ids=["rows", "missing", "dropped_csv", "bad_json", "old_manifest"],
)
def test_readers_refuse_a_folder_that_does_not_match_its_manifest(tmp_path, old_folder, damage, message, capsys):
    folder = tmp_path / "prepared"
    shutil.copytree(old_folder, folder)
    damage(folder)
    with pytest.raises(DataError, match=message):
        mimic.prepared_stats(folder)
    from drg_llama.baseline import run_baseline
    from drg_llama.data.datamodule import DRGDataModule

    with pytest.raises(DataError, match=message):
        DRGDataModule(data_dir=str(folder), tokenizer=None).prepared_dir
    with pytest.raises(DataError, match=message):
        run_baseline(folder, tmp_path / "baseline")
    assert main(["stats", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_prepared_folder_reads_the_columns_and_first_rows_asked_for(old_folder):
    folder = prepared.PreparedFolder.open(old_folder, drg_version="43")
    first = folder.read("train", ["hadm_id", "drg_code"], limit=3)
    assert list(first.columns) == ["hadm_id", "drg_code"]  # no text unless asked for
    assert first.equals(folder.read("train", ["hadm_id", "drg_code"]).iloc[:3])
    assert folder.num_rows("train") == folder.manifest["files"]["train.parquet"]["rows"] > 3
    assert folder.drg_version == "v43" and folder.split_path("val") == old_folder / "val.parquet"
    with pytest.raises(UserError, match="split must be one of train, val, test"):
        folder.read("dev", ["hadm_id"])
    with pytest.raises(UserError, match="prepared with v43 but drg_version is v40; re-run prepare or set"):
        prepared.PreparedFolder.open(old_folder, drg_version="v40")


def test_same_size_edit_is_caught_by_the_checksum(tmp_path, old_folder):
    folder = tmp_path / "prepared"
    shutil.copytree(old_folder, folder)
    data = bytearray((folder / "dropped.csv").read_bytes())
    data[-2] = ord("X") if data[-2] != ord("X") else ord("Y")
    (folder / "dropped.csv").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"dropped\.csv: its SHA-256 differs from manifest\.json"):
        prepared.verify(folder)


# --------------------------------------------------------------------------------------------------------------------
# --out, --chunk-rows, --encoding: checked before any input is read
# --------------------------------------------------------------------------------------------------------------------


def _never_read(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("an input was read before the arguments were checked")

    monkeypatch.setattr(mimic, "read_billed_labels", fail)


def test_out_that_is_a_file(tmp_path, monkeypatch):
    _never_read(monkeypatch)
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(DataError, match=r"out: --out is a file; give a folder"):
        prepare(FIXTURE, tmp_path / "out")


def test_out_that_cannot_be_written(tmp_path, monkeypatch):
    _never_read(monkeypatch)
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match=r"file/out: cannot write beside --out .*choose a writable folder"):
        prepare(FIXTURE, tmp_path / "file" / "out")


def test_out_that_holds_other_files(tmp_path, monkeypatch):
    _never_read(monkeypatch)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"--out holds files but no manifest\.json; .* give a new or empty one"):
        prepare(FIXTURE, tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("rows", [0, -5])
def test_chunk_rows_must_be_positive(tmp_path, monkeypatch, rows, capsys):
    _never_read(monkeypatch)
    with pytest.raises(ValueError, match=f"--chunk-rows must be a positive number of notes per chunk, got {rows}"):
        prepare(FIXTURE, tmp_path / "out", chunk_rows=rows)
    args = ["prepare", "--mimic-root", str(FIXTURE), "--out", str(tmp_path / "o"), "--chunk-rows", str(rows)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --chunk-rows") and err.count("\n") == 1


def test_unknown_encoding(tmp_path, monkeypatch):
    _never_read(monkeypatch)
    with pytest.raises(ValueError, match="unknown --encoding 'latin-9000'"):
        prepare(FIXTURE, tmp_path / "out", encoding="latin-9000")


# --------------------------------------------------------------------------------------------------------------------
# Damaged files
# --------------------------------------------------------------------------------------------------------------------


def _write(path: Path, rows: list[dict], columns: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
    return path


def _note(hadm: int, text: str | None = None) -> dict:
    text = text or "Brief Hospital Course:\n" + " ".join(f"word{hadm}x{i}" for i in range(60)) + "\n\nDone:\nx"
    return dict(note_id=f"1-DS-{hadm}", subject_id=1, hadm_id=hadm, note_type="DS", note_seq=1, charttime="",
                storetime="", text=text)  # fmt: skip


def _drg(hadm: int, title: str = "HEART FAILURE & SHOCK W MCC") -> dict:
    return dict(subject_id=1, hadm_id=hadm, drg_type="HCFA", drg_code=291, description=title, drg_severity="",
                drg_mortality="")  # fmt: skip


def _root(tmp_path: Path, n: int = 3) -> Path:
    root = tmp_path / "root"
    _write(root / "note" / "discharge.csv", [_note(h) for h in range(1, n + 1)], NOTE_COLUMNS)
    _write(root / "hosp" / "drgcodes.csv", [_drg(h) for h in range(1, n + 1)], DRG_COLUMNS)
    return root


def _gzip_notes(root: Path, n_rows: int = 3) -> bytes:
    """discharge.csv replaced by discharge.csv.gz; returns its bytes."""
    plain = root / "note" / "discharge.csv"
    data = gzip.compress(plain.read_bytes(), mtime=0)
    plain.unlink()
    (root / "note" / "discharge.csv.gz").write_bytes(data)
    return data


@pytest.mark.parametrize("damage", ["truncated", "crc", "not_gzip"])
def test_corrupt_or_truncated_gzip(tmp_path, damage, capsys):
    root = _root(tmp_path, n=3000)  # large enough that the damage is met while the parser is reading rows
    data = _gzip_notes(root)
    damaged = {
        "truncated": data[: len(data) * 2 // 3],
        "crc": data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:],
        "not_gzip": b"subject_id,hadm_id\n1,2\n",
    }[damage]
    (root / "note" / "discharge.csv.gz").write_bytes(damaged)
    with pytest.raises(DataError, match=r"discharge\.csv\.gz: the gzip file is corrupt or truncated .*; copy or "):
        prepare(root, tmp_path / "out")
    assert main(["prepare", "--mimic-root", str(root), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_gzip_garbage_that_parses_as_a_bad_row_is_reported_as_a_damaged_file(tmp_path):
    """A damaged block can decompress to text with extra commas before gzip reaches its checksum."""
    root = _root(tmp_path, n=3000)
    plain = (root / "note" / "discharge.csv").read_bytes()
    # What a damaged block might decompress to: an extra field in row 2, then the stored checksum no longer fits.
    garbled = plain.replace(b"1-DS-2,1,2,", b"1-DS-2,1,2,,,", 1)
    data = bytearray(gzip.compress(garbled, mtime=0))
    data[-8:-4] = gzip.compress(plain, mtime=0)[-8:-4]  # the CRC of the undamaged text
    (root / "note" / "discharge.csv").unlink()
    (root / "note" / "discharge.csv.gz").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"discharge\.csv\.gz: the gzip file is corrupt or truncated \(CRC check"):
        prepare(root, tmp_path / "out")


def test_malformed_row_names_the_data_row_and_the_editor_line(tmp_path):
    # Each note spans 5 lines; the 3rd note has an unquoted extra field.
    notes = [_note(h, text=f"Brief Hospital Course:\nline a {h}\nline b\n\nDone:\nx") for h in (1, 2, 3)]
    path = _write(tmp_path / "root" / "note" / "discharge.csv", notes, NOTE_COLUMNS)
    lines = path.read_text().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("1-DS-3,"))
    lines[start] = lines[start].replace("1-DS-3,1,3,DS,", "1-DS-3,1,3,DS,extra,")
    path.write_text("\n".join(lines))
    _write(tmp_path / "root" / "hosp" / "drgcodes.csv", [_drg(h) for h in (1, 2, 3)], DRG_COLUMNS)
    with pytest.raises(DataError) as err:
        prepare(tmp_path / "root", tmp_path / "out")
    assert err.value.row == 3
    assert f"starting at line {start + 1}" in str(err.value) and start + 1 == 14
    assert "9 fields where the header has 8" in str(err.value) and "fix that line" in str(err.value)


def test_unterminated_quote_names_the_record(tmp_path):
    root = _root(tmp_path)
    path = root / "hosp" / "drgcodes.csv"
    path.write_text(path.read_text().rstrip("\n") + '\n1,4,HCFA,291,"HEART FAILURE & SHOCK W MCC,,\n')
    with pytest.raises(DataError, match=r"drgcodes\.csv, row 4: malformed CSV \(.*\) in the record starting at line 5"):
        prepare(root, tmp_path / "out")


# --------------------------------------------------------------------------------------------------------------------
# Encodings and titles
# --------------------------------------------------------------------------------------------------------------------


def test_latin1_notes_drop_with_a_hint_and_read_with_encoding(tmp_path):
    root = _root(tmp_path)
    path = root / "note" / "discharge.csv"
    text = path.read_text().replace("word2x5 ", "caf\u00e9 ", 1)
    path.write_bytes(text.encode("latin-1"))
    manifest = prepare(root, tmp_path / "a")
    dropped = pd.read_csv(tmp_path / "a" / "dropped.csv")
    assert manifest["dropped"]["invalid_utf8"] == 1 and dropped["hadm_id"].tolist() == [2]
    assert "not valid utf-8" in dropped["detail"][0] and "--encoding (e.g. --encoding latin-1)" in dropped["detail"][0]
    manifest = prepare(root, tmp_path / "b", encoding="latin-1")
    assert manifest["kept"] == 3 and manifest["encoding"] == "iso8859-1"
    texts = pd.read_parquet(tmp_path / "b" / "train.parquet")["text"].tolist()
    texts += pd.read_parquet(tmp_path / "b" / "test.parquet")["text"].tolist()
    texts += pd.read_parquet(tmp_path / "b" / "val.parquet")["text"].tolist()
    assert any("caf\u00e9" in t for t in texts)


def test_latin1_title_error_says_to_pass_encoding(tmp_path):
    root = _root(tmp_path)
    path = root / "hosp" / "drgcodes.csv"
    path.write_bytes(path.read_bytes().replace(b"SHOCK W MCC", b"SHOCK \xe9 MCC", 1))
    with pytest.raises(DataError, match=r"row 1: description has bytes that are not UTF-8; .* --encoding"):
        prepare(root, tmp_path / "out")


def test_title_with_junk_after_its_severity_phrase_is_not_a_match(tmp_path):
    root = _root(tmp_path)
    _write(root / "hosp" / "drgcodes.csv", [_drg(1), _drg(2, "HEART FAILURE & SHOCK W MCC XYZ"), _drg(3)], DRG_COLUMNS)
    manifest = prepare(root, tmp_path / "out")
    dropped = pd.read_csv(tmp_path / "out" / "dropped.csv")
    assert manifest["kept"] == 2 and dropped["reason"].tolist() == ["unmappable_title"]
    assert "W MCC XYZ" in dropped["detail"][0]


def test_no_leftovers_after_an_input_error(tmp_path):
    root = _root(tmp_path)
    (root / "hosp" / "drgcodes.csv").write_text("subject_id,hadm_id\n")
    with pytest.raises(DataError, match="missing column"):
        prepare(root, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, "out") == []
    assert os.listdir(tmp_path) == ["root"]


def test_grouping_tables_have_their_columns_checked(tmp_path):
    root = tmp_path / "root"
    shutil.copytree(FIXTURE, root)
    (root / "hosp" / "patients.csv").write_text("subject_id,sex\n1,M\n")
    with pytest.raises(
        DataError, match=r"patients\.csv: missing column\(s\) \['gender', 'anchor_age', 'anchor_year'\]"
    ):
        prepare(root, tmp_path / "out", labels="grouped")
    assert grouping.FILES["patients"] == ("subject_id", "gender", "anchor_age", "anchor_year")
