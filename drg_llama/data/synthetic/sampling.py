"""One stay's codes and the facts its note is written from; the label comes later, from the grouper.

A principal diagnosis comes either from the curated list of common inpatient problems (``principals.yaml``, with
hand-written lay names and procedures) or from a long tail: an MDC, then a DRG family of that MDC, then any valid
principal code of that family. Secondary diagnoses are drawn for a target severity (none / CC / MCC) from the CMS
CC/MCC lists, plus non-CC chronic conditions; surgical long-tail stays get an O.R. procedure that CMS lists for a
surgical DRG family of the same MDC. Conditions that are NOT coded are mentioned only negated or as past history.

Every draw comes from the ``random.Random`` passed in, in a fixed order: the same seed gives the same stays.
"""

from __future__ import annotations

import bisect
import functools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from drg_llama.data.synthetic.codes import CodeTables
from drg_llama.data.synthetic.vocabulary import vocabulary

# Mixture of principal-diagnosis sources. The curated head gives the realistic top of the distribution (sepsis,
# heart failure, ...); the long tail gives coverage of rare DRGs.
_P_CURATED = 0.58
_P_TAIL_SURGICAL = 0.3
_SEVERITY_TARGET = (("NONE", 0.38), ("CC", 0.32), ("MCC", 0.30))

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

# Chronic conditions that a coded acute problem already covers (a chronic "CAD" beside a coded MI).
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

_TITLE_DROP = re.compile(
    r",? (?:initial encounter|subsequent encounter)(?: for [a-z ]+fracture)?|\[[^\]]*\]|\b[Uu]nspecified\b ?|"
    r",? not elsewhere classified|,? NEC\b|,? NOS\b"
)


@dataclass
class Stay:
    """The coded facts of one stay, and what its note says beyond them."""

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


def weighted(rng: random.Random, pairs: Sequence[tuple[object, float]]):
    """One item of ``(item, weight)`` pairs, drawn in proportion to the weights (one ``rng.random()``)."""
    total = sum(w for _, w in pairs)
    x = rng.random() * total
    for item, w in pairs:
        x -= w
        if x <= 0:
            return item
    return pairs[-1][0]


def pick_cum(rng: random.Random, cum: Sequence[float]) -> int:
    """Index drawn in proportion to the weights whose running sums are ``cum``."""
    return min(bisect.bisect_left(cum, rng.random() * cum[-1]), len(cum) - 1)


def lay_name(title: str) -> str:
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


def sample_stay(rng: random.Random, tables: CodeTables, sex: str) -> Stay:
    """Codes and the facts the text is written from; the label comes later from the grouper."""
    stay = _curated_principal(rng, tables, sex) if rng.random() < _P_CURATED else _tail_principal(rng, tables, sex)
    _add_severity(rng, tables, stay, sex)
    _add_chronic(rng, tables, stay)
    _add_uncoded_mentions(rng, tables, stay)
    return stay


def _curated_principal(rng: random.Random, tables: CodeTables, sex: str) -> Stay:
    """A principal problem of the curated list, with its procedure and the diagnoses that come with it."""
    principals = vocabulary().principals
    while True:
        principal = principals[pick_cum(rng, tables.principal_cum)]
        if principal.get("sex", sex) == sex:
            break
    chosen = weighted(rng, [(entry, entry["weight"]) for entry in principal["codes"]])
    stay = Stay(pdx=chosen["code"], pdx_name=rng.choice(chosen["names"]), principal=principal, mdc_tail=None)
    # The principal's own template text rules some concepts out ("serial troponins negative" for chest
    # discomfort), so they are never coded alongside it.
    stay.concepts.update((principal["concept"], *principal.get("blocks", ())))
    for option in principal["procedures"]:
        if rng.random() < option["probability"]:
            stay.procs.append((option["codes"], option["words"]))
            break
    for extra in principal.get("extra_diagnoses", ()):
        code, name = extra["code"], extra["name"]
        if code == "Z370" or rng.random() < 0.9:
            course = "" if code == "Z370" else f"Underlying {name}, followed by the primary oncology team."
            stay.sdx.append((code, name, course))
            if code[0] == "C":
                break
    return stay


def _tail_principal(rng: random.Random, tables: CodeTables, sex: str) -> Stay:
    """Any valid principal code of an MDC's DRG families, and for some surgical stays an O.R. procedure."""
    while True:
        mdc = tables.tail_mdcs[pick_cum(rng, tables.tail_mdc_cum)]
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
    stay = Stay(pdx=code, pdx_name=lay_name(title), principal=None, mdc_tail=mdc)
    surg = tables.surgical_pcs.get(mdc)
    if surg and rng.random() < _P_TAIL_SURGICAL:
        pcs_codes = surg[rng.randrange(len(surg))]
        pcs = pcs_codes[rng.randrange(len(pcs_codes))]
        stay.procs.append(((pcs,), _pcs_words(tables.pcs_title[pcs])))
    return stay


def _add_severity(rng: random.Random, tables: CodeTables, stay: Stay, sex: str) -> None:
    """CC and MCC secondary diagnoses for a target severity (the grouper decides what they do)."""
    mix = stay.principal.get("severity_mix") if stay.principal is not None else None
    target = weighted(rng, tuple(zip(("NONE", "CC", "MCC"), mix)) if mix else _SEVERITY_TARGET)
    n_cc = {"NONE": 0, "CC": weighted(rng, ((1, 0.7), (2, 0.25), (3, 0.05))), "MCC": rng.choice((0, 0, 1, 2))}
    n_mcc = weighted(rng, ((1, 0.85), (2, 0.15))) if target == "MCC" else 0
    for lvl, count in (("MCC", n_mcc), ("CC", n_cc[target])):
        for _ in range(count):
            _add_secondary(rng, tables, stay, lvl, sex)


def _add_chronic(rng: random.Random, tables: CodeTables, stay: Stay) -> None:
    """Chronic non-CC conditions: affirmed, coded, and irrelevant to severity."""
    n_chronic = weighted(rng, ((0, 0.1), (1, 0.2), (2, 0.25), (3, 0.2), (4, 0.15), (5, 0.1)))
    for entry in rng.sample(vocabulary().chronic, n_chronic):
        concept, code, names = entry["concept"], entry["code"], entry["names"]
        blocked = _CHRONIC_CONFLICTS.get(concept, {concept}) | {concept}
        if blocked & stay.concepts or code == stay.pdx or code in tables.level:
            continue
        if any(n.lower() in stay.pdx_name.lower() for n in names):  # "depression" beside a major depression
            continue
        stay.concepts.add(concept)
        stay.chronic.append((code, rng.choice(names), entry["plan"]))


def _add_uncoded_mentions(rng: random.Random, tables: CodeTables, stay: Stay) -> None:
    """Conditions that are mentioned but not coded: negated, or in the past."""
    secondary = vocabulary().secondary
    stay.concepts |= _coded_concepts(stay)
    coded = stay.concepts
    negatable = [e for e in secondary if e["negated"] and e["concept"] not in coded]
    n_neg = weighted(rng, ((0, 0.12), (1, 0.45), (2, 0.3), (3, 0.13)))
    seen: set[str] = set()
    for entry in rng.sample(negatable, min(n_neg, len(negatable))):
        if entry["concept"] in seen:
            continue
        seen.add(entry["concept"])
        stay.negated.append(rng.choice(entry["negated"]))
    historical = [e for e in secondary if e["history"] and e["concept"] not in coded and e["concept"] not in seen]
    n_hist = weighted(rng, ((0, 0.35), (1, 0.45), (2, 0.2)))
    for entry in rng.sample(historical, min(n_hist, len(historical))):
        stay.history.append(rng.choice(entry["history"]))
        history_code = entry.get("history_code")
        if history_code and history_code not in tables.level and rng.random() < 0.7:
            stay.chronic.append((history_code, "", ""))


def _coded_concepts(stay: Stay) -> set[str]:
    """Concepts of the vocabulary that the stay's codes or condition names already cover.

    Long-tail codes carry no concept of their own; matching by ICD category and by name keeps the note from
    negating what is coded ("no evidence of pneumonia" beside a coded pseudomonas pneumonia).
    """
    codes = {stay.pdx} | {c for c, _, _ in stay.sdx} | {c for c, _, _ in stay.chronic}
    categories = {c[:3] for c in codes}
    names = " | ".join([stay.pdx_name] + [n for _, n, _ in stay.sdx]).lower()
    found = set()
    for entry in vocabulary().secondary:
        if entry["code"][:3] in categories or any(n.lower() in names for n in entry["names"] if len(n) > 3):
            found.add(entry["concept"])
    return found


@functools.lru_cache(maxsize=1)
def _secondary_by_code() -> dict[str, dict]:
    return {e["code"]: e for e in vocabulary().secondary}


def _add_secondary(rng: random.Random, tables: CodeTables, stay: Stay, lvl: str, sex: str) -> None:
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
            for extra in entry.get("extra_codes", ()):
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
    stay.sdx.append((code, lay_name(title), course))


def claim(stay: Stay, version: int, age: int, sex: str, status: int) -> dict:
    """The stay as an msdrg claim (every diagnosis present on admission)."""
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
