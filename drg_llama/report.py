"""Write a self-contained HTML report of runs (and a sweep): the notebooks' tables and figures on one page.

    python -m drg_llama.report --runs runs/two_label/version_0 runs/single_label/version_0 --out report.html
    python -m drg_llama.report --runs sweeps/two_label --sweep sweeps/two_label --out sweep_report.html

``--runs`` takes run directories or folders holding them. The error-analysis sections need ``eval/metrics.json``
(``python -m drg_llama.evaluate --run DIR``); runs without it appear in the comparison only. Figures are PNGs
embedded as base64 and the page references no URL, so it opens offline. It carries metrics only: no note text, no
admission ids.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from drg_llama import plots

#: (anchor, heading) of every section, in page order; each is always written, with a note when it has no data.
SECTIONS = (
    ("comparison", "Runs compared"),
    ("sweep", "Sweep: context length and model size"),
    ("calibration", "Calibration"),
    ("selective", "Selective coding"),
    ("payment", "Payment impact"),
    ("breakdowns", "Breakdowns: MDC, DRG frequency, note length"),
    ("severity", "Severity confusion"),
    ("mdc", "Confusions by MDC"),
    ("definitions", "Definitions"),
)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; } h3 { margin-bottom: 0.3em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.wide { overflow-x: auto; } .note { color: #666; font-size: 0.9em; } nav a { margin-right: 1em; }
"""

_DEFINITIONS = """
<ul>
<li><b>top-k</b>: share of test stays whose coded DRG is among the k most probable; <b>macro-F1</b> over DRGs present
in the test split; <b>macro-AUC</b>: one-vs-rest, averaged over present DRGs; <b>base / severity acc</b>: the predicted
DRG has the coded DRG's family / allowed severity set. DRGs unseen in training count as errors.</li>
<li><b>ECE</b>: expected calibration error over 15 equal-width confidence bins. <b>Temperature scaling</b> divides the
log-probabilities over DRGs by one T fitted on validation; it never changes the ranking.</li>
<li><b>Selective coding</b>: stays whose calibrated top-1 probability reaches a threshold are coded automatically; the
threshold is the lowest one reaching the target accuracy on validation, and coverage/accuracy are measured on test.</li>
<li><b>Payment impact</b>: CMS relative weights of the run's MS-DRG version (Table 5).
Dollars = weight error x base rate; the default base rate (6,500 USD) is illustrative, not an official CMS figure:
pass your own with <code>--base-rate</code> to <code>python -m drg_llama.evaluate</code>.</li>
<li><b>Frequency bands</b>: DRGs sorted by training count; head = those holding the first 50% of training stays, torso
the next 30%, tail the rest and DRGs unseen in training. <b>Length bands</b>: words of the hospital course.</li>
<li><b>Severity confusion</b>: each DRG maps to its allowed severity set (NONE = without CC/MCC, NONE|CC = without MCC,
CC = with CC, CC|MCC = with CC/MCC, MCC = with MCC, ANY = no split); rows coded, columns predicted.</li>
</ul>
"""


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(
        index=False, escape=True, border=0, formatters=dict.fromkeys(frame.columns, plots.format_value)
    )


def _img(fig, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{plots.figure_png_base64(fig)}">'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _find_sweep(run_dirs: Sequence[Path]) -> Path | None:
    """A sweep.csv in the parent folder of any run (runs of a sweep live in OUT/<point>/)."""
    for run_dir in run_dirs:
        if (run_dir.parent / "sweep.csv").is_file():
            return run_dir.parent
    return None


def build_report(run_paths: Sequence[str | Path], sweep: str | Path | None = None) -> str:
    """The report as one HTML string.

    Args:
        run_paths: Run directories or folders of runs.
        sweep: A sweep folder or its ``sweep.csv``; default: found beside the runs, if any.
    """
    run_dirs = plots.find_runs(run_paths)
    if not run_dirs:
        raise FileNotFoundError(f"no run directory (with test_metrics.json) under {', '.join(map(str, run_paths))}")
    sweep = Path(sweep) if sweep is not None else _find_sweep(run_dirs)
    reports = {plots.run_name(d): plots.load_report(d) for d in run_dirs}
    analysed = {name: r for name, r in reports.items() if plots.has_analysis(r)}
    missing = sorted(set(reports) - set(analysed))
    body: dict[str, list[str]] = {anchor: [] for anchor, _ in SECTIONS}

    table = plots.runs_table(run_dirs)
    body["comparison"] += [_table(table), _img(plots.headline_bars(table), "headline metrics across runs")]

    if sweep is None:
        body["sweep"].append(_note("No sweep given: run python -m drg_llama.sweep and pass --sweep DIR."))
    else:
        frame = plots.load_sweep(sweep)
        body["sweep"] += [_table(frame.drop(columns=["run_dir"], errors="ignore"))]
        if frame.empty:
            body["sweep"].append(_note("The sweep has no finished point yet."))
        else:
            if "num_hidden_layers" in frame and frame["num_hidden_layers"].nunique() > 1:
                body["sweep"].append(_img(plots.sweep_depth_lines(frame), "metrics against decoder layers"))
            body["sweep"] += [
                _img(plots.sweep_lines(frame, "context_length"), "metrics against context length"),
                _img(plots.sweep_lines(frame, "parameters"), "metrics against model size"),
            ]

    if missing:
        text = f"Not evaluated yet (run python -m drg_llama.evaluate --run DIR): {', '.join(missing)}."
        for anchor in ("calibration", "selective", "payment", "breakdowns", "severity", "mdc"):
            body[anchor].append(_note(text))
    for name, report in analysed.items():
        head = f"<h3>{html.escape(name)} ({html.escape(str(report.get('variant')))})</h3>"
        cal, sel, pay = report["calibration"], report["selective"], report["payment"]
        body["calibration"] += [
            head,
            _table(
                pd.DataFrame(
                    [
                        {"": "before", "ECE": cal["ece_before"], "NLL": cal["nll_before"]},
                        {"": f"after (T = {cal['temperature']:.3f})", "ECE": cal["ece_after"], "NLL": cal["nll_after"]},
                    ]
                )
            ),
            _img(plots.reliability_diagram(cal), f"reliability diagram of {name}"),
        ]
        body["selective"] += [
            head,
            _table(
                pd.DataFrame(
                    [
                        {
                            "target accuracy": sel["target_accuracy"],
                            "threshold (val)": sel["threshold"],
                            "val coverage": sel["val_coverage"],
                            "val accuracy": sel["val_accuracy"],
                            "test coverage": sel["test_coverage"],
                            "test accuracy": sel["test_accuracy"],
                        }
                    ]
                )
            ),
            _img(plots.coverage_accuracy(sel), f"coverage-accuracy curve of {name}"),
        ]
        if sel["threshold"] is None:
            body["selective"].append(_note("No threshold reaches the target accuracy on validation."))
        body["payment"] += [head, _table(plots.payment_table(pay)), _img(plots.payment_bars(pay), f"payment of {name}")]
        bd = report["breakdowns"]
        body["breakdowns"] += [head]
        for key, title in (
            ("mdc", "by MDC of the coded DRG"),
            ("frequency_band", "by DRG frequency band"),
            ("length_band", "by note length (words)"),
        ):
            body["breakdowns"] += [
                f"<h4>{title}</h4>",
                _table(plots.breakdown_table(bd[key])),
                _img(plots.breakdown_bars(bd[key], f"top-1 {title}"), f"top-1 {title}"),
            ]
        body["severity"] += [
            head,
            _img(plots.confusion_heatmap(report["severity_confusion"], "Allowed severity set"), f"severity of {name}"),
        ]
        body["mdc"] += [
            head,
            _img(plots.confusion_heatmap(report["mdc_confusion"], "MDC"), f"MDC confusion of {name}"),
            "<h4>Most frequent DRG confusions</h4>",
            _table(pd.DataFrame(report["top_confusions"], columns=["gold", "pred", "count"])),
        ]
    body["definitions"].append(_DEFINITIONS)

    nav = " ".join(f'<a href="#{a}">{html.escape(h)}</a>' for a, h in SECTIONS)
    sections = "\n".join(
        f'<section id="{a}"><h2>{html.escape(h)}</h2>\n' + "\n".join(body[a]) + "</section>" for a, h in SECTIONS
    )
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>drg-llama report</title><style>{_CSS}</style></head><body>\n"
        f"<h1>drg-llama report</h1><p class='note'>{len(run_dirs)} run(s), written {stamp} by "
        f"python -m drg_llama.report. Metrics only: no note text, no admission ids.</p>\n<nav>{nav}</nav>\n"
        f"{sections}\n</body></html>\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drg_llama.report", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="run directories or folders of runs")
    parser.add_argument("--sweep", default=None, help="sweep folder or sweep.csv (default: beside the runs)")
    parser.add_argument("--out", default="report.html")
    args = parser.parse_args(argv)
    try:
        page = build_report(args.runs, args.sweep)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    print(f"report: {out} ({len(page) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
