"""Peak memory and wall time of ``prepare`` against a read-everything pandas reference, on a large MIMIC-shaped corpus.

    python benchmarks/prepare_scale.py --n 300000                 # the issue's scale (several GB of disk in --workdir)
    python benchmarks/prepare_scale.py --n 2000 --corpus replicate  # a quick run

Both implementations run the same steps on the same files — read notes and drgcodes, extract the Brief Hospital
Course with ``extract_bhc``, map HCFA titles with ``map_title``, choose one note per admission, drop short, long and
duplicate courses, split by patient, write train/val/test Parquet and checksum the inputs — each in its own
subprocess, which reports its own peak RSS (``ru_maxrss``) and wall time. The reference is what a notebook does:
``pd.read_csv`` of the whole file, then ``Series.map`` and ``groupby``. The run checks that both keep the same
admissions, then prints the ratios. Target: ours <= 1/3 of the reference's peak memory in no more than its time.

Corpus: ``--corpus synth`` uses ``drg_llama.data.synthetic.synthesize``; ``--corpus replicate`` (the fallback used
before the generator existed) copies the hand-written fixture notes of tests/fixtures/mimic/, each with fresh ids, a
unique sentence in its course (so the duplicate check does not drop them) and a lab block padding the note to about
7.5 kB, MIMIC-IV-Note's mean (~2.5 GB over ~331k notes). ``auto`` picks synth when it is importable.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "mimic"
NOTE_COLUMNS = ["note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime", "storetime", "text"]
DRG_COLUMNS = ["subject_id", "hadm_id", "drg_type", "drg_code", "description", "drg_severity", "drg_mortality"]
_LAB_LINE = "___ 07:10AM BLOOD WBC-9.8 RBC-4.12 Hgb-12.1 Hct-37.0 MCV-90 MCH-29.4 MCHC-32.7 RDW-14.1 Plt ___\n"


def replicate_corpus(root: Path, n: int, seed: int = 0) -> None:
    """Write ``n`` admissions in MIMIC layout by replicating the fixture's usable notes (see the module docstring)."""
    import random

    import pandas as pd

    from drg_llama.data.hospital_course import extract_bhc

    rng = random.Random(seed)
    notes = pd.read_csv(FIXTURE / "note" / "discharge.csv", dtype=str, keep_default_na=False, encoding="latin-1")
    drgs = pd.read_csv(FIXTURE / "hosp" / "drgcodes.csv", dtype=str, keep_default_na=False)
    hcfa = drgs[drgs["drg_type"] == "HCFA"].drop_duplicates("hadm_id").set_index("hadm_id")["description"]
    templates = []
    for _, row in notes.iterrows():
        bhc = extract_bhc(row["text"])
        if (
            bhc is not None
            and row["hadm_id"] in hcfa
            and 40 < len(bhc.text.split()) < 500
            and "\xe9" not in row["text"]
        ):
            templates.append((row["text"].replace("\r\n", "\n"), bhc.text, hcfa[row["hadm_id"]]))
    (root / "note").mkdir(parents=True, exist_ok=True)
    (root / "hosp").mkdir(parents=True, exist_ok=True)
    with (
        gzip.open(root / "note" / "discharge.csv.gz", "wt", compresslevel=1, newline="") as nf,
        gzip.open(root / "hosp" / "drgcodes.csv.gz", "wt", compresslevel=1, newline="") as df,
    ):
        note_writer, drg_writer = csv.writer(nf), csv.writer(df)
        note_writer.writerow(NOTE_COLUMNS)
        drg_writer.writerow(DRG_COLUMNS)
        for i in range(n):
            text, course, title = templates[i % len(templates)]
            hadm, subject = 20_000_000 + i, 10_000_000 + rng.randrange(max(1, n // 3))
            unique = f"{course}\nOn day {i} the {rng.choice(['morning', 'evening'])} labs were stable."
            padding = _LAB_LINE * rng.randint(40, 100)
            text = text.replace(course, unique).replace("Pertinent Results:\n", "Pertinent Results:\n" + padding, 1)
            note_writer.writerow([f"{subject}-DS-{i}", subject, hadm, "DS", 1, "", "", text])
            drg_writer.writerow([subject, hadm, "HCFA", "", title, "", ""])
            drg_writer.writerow([subject, hadm, "APR", "194", "HEART FAILURE", "3", "2"])


def run_ours(raw: Path, out: Path) -> dict:
    from drg_llama.data.mimic import prepare

    manifest = prepare(raw, out)
    return {"kept": manifest["kept"], "splits": manifest["splits"]}


def run_reference(raw: Path, out: Path) -> dict:
    """The read-everything implementation of the same steps (patient split, default word limits, seed 0)."""
    import hashlib

    import numpy as np
    import pandas as pd

    from drg_llama.data import mimic
    from drg_llama.data.hospital_course import extract_bhc
    from drg_llama.data.splits import SPLITS
    from drg_llama.drg import ERROR_DRGS, map_title

    discharge, drgcodes = mimic.find_inputs(raw)
    notes = pd.read_csv(discharge)
    drg = pd.read_csv(drgcodes)

    hcfa = drg[drg["drg_type"] == "HCFA"].copy()
    mapping = {t: map_title(t, "v43") for t in hcfa["description"].unique()}
    hcfa["drg"] = hcfa["description"].map(lambda t: mapping[t].drg if mapping[t].ok else np.nan)
    labels = hcfa.groupby("hadm_id").agg(
        drg=("drg", "first"), n=("drg", "nunique"), bad=("drg", lambda d: d.isna().any())
    )
    labels = labels[~labels["bad"] & (labels["n"] == 1) & ~labels["drg"].isin(list(ERROR_DRGS))]

    bhc = notes["text"].map(extract_bhc)
    notes["course"] = bhc.map(lambda b: None if b is None else b.text)
    notes["n_words"] = notes["course"].map(lambda t: len(t.split()) if isinstance(t, str) else 0)
    notes["ok"] = (notes["n_words"] > mimic.DEFAULT_MIN_WORDS) & (notes["n_words"] <= mimic.DEFAULT_MAX_WORDS)
    notes = notes.sort_values(["hadm_id", "ok", "note_seq"]).drop_duplicates("hadm_id", keep="last")
    data = notes[notes["ok"]].join(labels, on="hadm_id", how="inner")
    data = data.sort_values("hadm_id").drop_duplicates("course", keep="first")

    subjects = np.unique(data["subject_id"])
    order = np.random.default_rng(0).permutation(len(subjects))
    n_small = round(0.1 * len(subjects))
    names = np.empty(len(subjects), dtype=object)
    names[order[: len(subjects) - 2 * n_small]] = "train"
    names[order[len(subjects) - 2 * n_small : len(subjects) - n_small]] = "val"
    names[order[len(subjects) - n_small :]] = "test"
    data["split"] = names[np.searchsorted(subjects, data["subject_id"])]
    out.mkdir(parents=True, exist_ok=True)
    columns = ["hadm_id", "subject_id", "note_id", "course", "drg", "n_words"]
    for name in SPLITS:
        data.loc[data["split"] == name, columns].to_parquet(out / f"{name}.parquet")
    for path in (discharge, drgcodes):
        hashlib.sha256(path.read_bytes()).hexdigest()
    return {"kept": int(len(data)), "splits": {s: int((data["split"] == s).sum()) for s in SPLITS}}


def _child(kind: str, raw: Path, out: Path) -> None:
    start = time.perf_counter()
    result = (run_ours if kind == "ours" else run_reference)(raw, out)
    result["wall_s"] = time.perf_counter() - start
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB
    print(json.dumps(result))


def _measure(kind: str, raw: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "_child", kind, str(raw), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300_000, help="admissions in the corpus (default: 300000)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    parser.add_argument("--corpus", choices=["auto", "synth", "replicate"], default="auto", help="corpus source")
    parser.add_argument("--workdir", type=Path, help="where the corpus and outputs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (reused by a later run with --workdir)")
    args = parser.parse_args(argv)

    corpus = args.corpus
    if corpus == "auto":
        try:
            import drg_llama.data.synthetic  # noqa: F401

            corpus = "synth"
        except ImportError:
            corpus = "replicate"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="prepare_scale-"))
    raw = workdir / f"raw-{corpus}-{args.n}-{args.seed}"
    try:
        if not (raw / "hosp" / "drgcodes.csv.gz").is_file():
            start = time.perf_counter()
            if corpus == "synth":
                from drg_llama.data.synthetic import synthesize

                synthesize(raw, args.n, args.seed, "v43", progress=False)
            else:
                replicate_corpus(raw, args.n, args.seed)
            print(f"corpus: {corpus}, {args.n} admissions, written in {time.perf_counter() - start:.0f} s")
        size = sum(p.stat().st_size for p in raw.rglob("*.csv*"))
        print(f"corpus at {raw}: {size / 1e6:.0f} MB compressed", flush=True)
        ours = _measure("ours", raw, workdir / "out-ours")
        print(f"ours: {ours}", flush=True)
        ref = _measure("reference", raw, workdir / "out-reference")
        print(f"reference: {ref}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if ours["kept"] != ref["kept"] or ours["splits"] != ref["splits"]:
        raise SystemExit(f"outputs differ: ours {ours} vs reference {ref}")
    result = {
        "n": args.n,
        "corpus": corpus,
        "kept": ours["kept"],
        "ours": {k: round(ours[k], 1) for k in ("wall_s", "peak_rss_mb")},
        "reference": {k: round(ref[k], 1) for k in ("wall_s", "peak_rss_mb")},
        "memory_ratio": round(ours["peak_rss_mb"] / ref["peak_rss_mb"], 3),
        "time_ratio": round(ours["wall_s"] / ref["wall_s"], 3),
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }
    buf = io.StringIO()
    buf.write("| | wall (s) | peak RSS (MB) |\n|---|---|---|\n")
    for name in ("ours", "reference"):
        buf.write(f"| {name} | {result[name]['wall_s']} | {result[name]['peak_rss_mb']} |\n")
    buf.write(f"| ours / reference | {result['time_ratio']} | {result['memory_ratio']} |\n")
    print(buf.getvalue())
    ok = result["memory_ratio"] <= 1 / 3 and result["time_ratio"] <= 1.0
    print(f"target (memory <= 1/3, time <= 1): {'met' if ok else 'NOT met'}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
