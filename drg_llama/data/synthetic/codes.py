"""What the sampler draws codes from, for one MS-DRG version: derived from the installed CMS-based tables.

Long-tail principal diagnoses come from drgpy's ``dxmap`` (every valid principal code of every DRG family, by MDC),
surgical procedures from its ``prmap`` (O.R. procedures of surgical families), CC/MCC levels from its ``ccmap``;
code titles from the ``drg`` package's CMS and Tuva lists. Built once per process and version, on first use.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from drg_llama.data.synthetic.vocabulary import vocabulary
from drg_llama.drg import msdrg_version, resolve_version
from drg_llama.drg.icd import cm_titles, pcs_titles
from drg_llama.drg.tables import definitions


@dataclass(frozen=True)
class CodeTables:
    """Code pools of one version, and the cumulative weights the sampler bisects."""

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


def cumulative(weights: Sequence[float]) -> tuple[float, ...]:
    """Running sums of ``weights`` (what ``pick_cum`` bisects)."""
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
def code_tables(drg_version: str) -> CodeTables:
    """Everything the sampler needs for one MS-DRG version, derived from the installed CMS-based tables."""
    version = resolve_version(drg_version)
    grouper_version = msdrg_version(version)
    raw = definitions(version)
    cm, pcs = cm_titles(), pcs_titles()
    words = vocabulary()
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
    tail_mdcs = tuple(m for m in sorted(words.mdc_tail) if m in tail_pdx)

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
    for entry in words.secondary:
        if entry["code"] in level:
            by_level[level[entry["code"]]].append(entry)
    return CodeTables(
        version=version,
        grouper_version=grouper_version,
        level=level,
        tail_pdx=tail_pdx,
        tail_mdcs=tail_mdcs,
        tail_mdc_cum=cumulative([words.mdc_tail[m]["weight"] for m in tail_mdcs]),
        surgical_pcs=surgical_pcs,
        tail_cc=tuple(c for c in tail_sdx if level[c] == "CC"),
        tail_mcc=tuple(c for c in tail_sdx if level[c] == "MCC"),
        cm_title=cm,
        pcs_title=pcs,
        principal_cum=cumulative([p["weight"] for p in words.principals]),
        secondary_by_level={k: tuple(v) for k, v in by_level.items()},
    )
