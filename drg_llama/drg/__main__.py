"""Inspect the MS-DRG tables from the command line.

python -m drg_llama.drg versions
python -m drg_llama.drg show --version v43
python -m drg_llama.drg lookup 291 --version v43
python -m drg_llama.drg map "HEART FAILURE & SHOCK W MCC" --version v43
"""

from __future__ import annotations

import argparse
import collections
import sys

from drg_llama.drg import SEVERITIES, SplitPattern, UnknownDRGError, UnknownVersionError, get_table, map_title
from drg_llama.drg.tables import available_versions


def _show(version: str) -> None:
    table = get_table(version)
    drgs = list(table)
    patterns = collections.Counter(f.pattern for f in table.families)
    mdcs = {d.mdc for d in drgs if d.mdc}
    print(f"MS-DRG {table.version}")
    n_surgical = sum(d.surgical for d in drgs)
    print(f"  DRGs:      {len(drgs)} ({n_surgical} surgical, {len(drgs) - n_surgical} medical)")
    print(f"  MDCs:      {len(mdcs - {'PRE'})} (+ pre-MDC)" if "PRE" in mdcs else f"  MDCs:      {len(mdcs)}")
    print(f"  weights:   {sum(d.weight is not None for d in drgs)} DRGs with a CMS relative weight")
    print(f"  families:  {len(table.families)}")
    labels = {
        SplitPattern.MCC_CC_NONE: "with MCC / with CC / without CC/MCC",
        SplitPattern.MCC_VS_REST: "with MCC / without MCC",
        SplitPattern.CCMCC_VS_NONE: "with CC/MCC / without CC/MCC",
        SplitPattern.NO_SPLIT: "no split",
    }
    for pattern, label in labels.items():
        print(f"    {patterns[pattern]:4d}  {label}")


def _lookup(code: int, version: str) -> None:
    table = get_table(version)
    drg = table[code]
    family = table.family(code)
    print(f"DRG {drg.code:03d} ({table.version}): {drg.title}")
    print(f"  MDC {drg.mdc or '-'}, {drg.type}")
    if drg.weight is not None:
        print(f"  relative weight {drg.weight:.4f}, GMLOS {drg.gmlos}, AMLOS {drg.amlos}")
    else:
        print("  relative weight: not published in the installed data for this version")
    print(f"  family (base {family.base:03d}, {family.pattern.value}):")
    for member in family.members:
        sevs = "/".join(s.value for s in SEVERITIES if s in table.allowed_severities(member))
        marker = "*" if member == drg.code else " "
        print(f"   {marker}{member:03d}  severities {{{sevs}}}  {table[member].title}")


def _map(title: str, version: str) -> int:
    result = map_title(title, version)
    if result.ok:
        print(f"{result.drg:03d}  {get_table(version)[result.drg].title}   ({result.detail})")
        return 0
    print(f"not mapped: {result.reason}: {result.detail}")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drg_llama.drg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("versions", help="list the MS-DRG versions with an installed table")
    for name, help_ in (("show", "summarise a version"), ("lookup", "describe one DRG"), ("map", "map a title")):
        p = sub.add_parser(name, help=help_)
        if name == "lookup":
            p.add_argument("code", type=int)
        if name == "map":
            p.add_argument("title")
        p.add_argument("--version", default="v43", help="MS-DRG version (default v43 = FY2026)")
    args = parser.parse_args(argv)
    try:
        if args.command == "versions":
            print(" ".join(available_versions()))
        elif args.command == "show":
            _show(args.version)
        elif args.command == "lookup":
            _lookup(args.code, args.version)
        else:
            return _map(args.title, args.version)
    except (UnknownVersionError, UnknownDRGError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
