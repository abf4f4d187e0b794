"""Tables and figures from run directories, shared by the notebooks and ``python -m drg_llama.report``.

Loading functions read only the JSON/CSV files that ``train``, ``evaluate`` and ``sweep`` write (ids and metrics,
never note text); figure functions take what the loaders return and give a matplotlib ``Figure``::

    from drg_llama import plots
    runs = plots.find_runs(["runs/"])
    table = plots.runs_table(runs)
    plots.headline_bars(table).savefig("headline.png")

Figures are only saved or shown by the caller; without a display matplotlib falls back to its Agg backend.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

#: Metric key -> column label of the comparison tables and charts.
HEADLINE = {
    "top1": "top-1",
    "top5": "top-5",
    "macro_f1_present": "macro-F1",
    "macro_auc": "macro-AUC",
    "base_acc": "base acc",
    "severity_acc": "severity acc",
}


# ----------------------------------------------------------------------------------------------------------------
# loading


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories (those with ``test_metrics.json``) at or below each path, sorted, without duplicates."""
    found: set[Path] = set()
    for path in map(Path, paths):
        if (path / "test_metrics.json").is_file():
            found.add(path.resolve())
        elif path.is_dir():
            found.update(p.parent.resolve() for p in path.rglob("test_metrics.json"))
        else:
            raise FileNotFoundError(f"{path} is not a run directory or a folder of runs")
    return sorted(found)


def run_name(run_dir: str | Path) -> str:
    """Short name of a run: its last two path parts (``two_label/version_0``, ``sweep/context-256``)."""
    parts = Path(run_dir).parts
    return "/".join(parts[-2:])


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_report(run_dir: str | Path) -> dict[str, Any]:
    """The evaluation report of a run: ``eval/metrics.json`` if ``evaluate`` ran, else ``test_metrics.json``.

    The analysis sections (``calibration``, ``selective``, ``payment``, ``breakdowns``, ``severity_confusion``,
    ``mdc_confusion``, ``top_confusions``) exist only in the first case.
    """
    run_dir = Path(run_dir)
    report = _read_json(run_dir / "eval" / "metrics.json") or _read_json(run_dir / "test_metrics.json")
    if not report:
        raise FileNotFoundError(f"{run_dir} has neither eval/metrics.json nor test_metrics.json")
    return report


def has_analysis(report: dict[str, Any]) -> bool:
    """Whether a report holds the sections written by ``python -m drg_llama.evaluate``."""
    return "calibration" in report


def runs_table(run_dirs: Sequence[str | Path], baselines: bool = True) -> pd.DataFrame:
    """Headline test metrics, one row per run, plus each run's TF-IDF baseline and majority class when present.

    Columns: ``run``, ``system`` (the variant, ``tf-idf + logreg`` or ``majority class``), ``n``, the
    :data:`HEADLINE` keys and ``ece``.
    """
    rows = []
    for run_dir in map(Path, run_dirs):
        report = load_report(run_dir)
        name = run_name(run_dir)
        systems = [(report.get("variant", "?"), report["metrics"])]
        baseline = _read_json(run_dir / "baseline" / "metrics.json")
        if baselines and baseline:
            systems += [("tf-idf + logreg", baseline["metrics"]), ("majority class", baseline["majority_class"])]
        for system, metrics in systems:
            n = metrics.get("n")
            row = {"run": name, "system": system, "n": int(n) if n is not None else None}
            row |= {key: _number(metrics.get(key)) for key in (*HEADLINE, "ece")}
            rows.append(row)
    return pd.DataFrame(rows, columns=["run", "system", "n", *HEADLINE, "ece"])


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def load_sweep(path: str | Path) -> pd.DataFrame:
    """``sweep.csv`` of a sweep folder (or the CSV itself), as written by ``python -m drg_llama.sweep``."""
    path = Path(path)
    csv = path / "sweep.csv" if path.is_dir() else path
    if not csv.is_file():
        raise FileNotFoundError(f"{csv} does not exist; run python -m drg_llama.sweep first")
    return pd.read_csv(csv)


def payment_table(payment: dict[str, Any]) -> pd.DataFrame:
    """Payment impact as a two-column table (figure, value) with readable labels."""
    labels = {
        "n": "stays with known weights",
        "weight_mae": "mean |relative-weight error| per stay",
        "cmi_gold": "case-mix index, coded",
        "cmi_pred": "case-mix index, predicted",
        "cmi_error": "CMI error (predicted - coded)",
        "cmi_error_rel": "CMI error, relative",
        "base_rate": "base rate (USD per unit weight)",
        "dollars_at_risk": "dollars at risk (over + under), USD",
        "dollars_over": "overpayment, USD",
        "dollars_under": "underpayment, USD",
        "dollars_net": "net payment error, USD",
        "dollars_at_risk_per_stay": "dollars at risk per stay, USD",
    }
    values = pd.Series([payment.get(key) for key in labels], dtype=object)  # object: counts stay integers
    return pd.DataFrame({"figure": list(labels.values()), "value": values})


def breakdown_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """A breakdown section (list of per-group dicts) as a DataFrame."""
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------
# figures


def headline_bars(table: pd.DataFrame, metrics: Sequence[str] = tuple(HEADLINE)) -> plt.Figure:
    """Grouped bars: one group per metric, one bar per (run, system)."""
    labels = [f"{r.run} · {r.system}" for r in table.itertuples()]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(metrics) + 0.4 * len(labels)), 4))
    width = 0.8 / max(1, len(labels))
    x = np.arange(len(metrics))
    for i, (label, (_, row)) in enumerate(zip(labels, table.iterrows())):
        values = [row[m] if not pd.isna(row[m]) else 0.0 for m in metrics]
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=label)
    ax.set_xticks(x, [HEADLINE.get(m, m) for m in metrics])
    ax.set_ylim(0, 1)
    ax.set_ylabel("test split")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Headline metrics across runs")
    fig.tight_layout()
    return fig


def sweep_lines(
    sweep: pd.DataFrame, x: str = "context_length", metrics: Sequence[str] = ("top1", "top5", "macro_f1_present")
) -> plt.Figure:
    """Metrics against ``x`` (``context_length`` or ``parameters``), one line per setting of everything else.

    The other settings are those of the sweep's columns that vary among ``model``, ``num_hidden_layers``,
    ``context_length``, ``max_epochs`` and ``lora_target_modules`` (older sweep.csv files have only the first).
    """
    setting = [c for c in SETTING_COLUMNS if c in sweep and c != x and sweep[c].nunique(dropna=False) > 1]
    if x == "parameters":
        setting = [c for c in setting if c not in ("model", "num_hidden_layers")]  # they set the size itself
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        groups = sweep.groupby(setting, sort=True) if setting else [((), sweep)]
        for key, group in groups:
            key = key if isinstance(key, tuple) else (key,)
            group = group.sort_values(x)
            label = ", ".join(f"{SETTING_NAMES.get(c, c)}={v}" for c, v in zip(setting, key)) or "all points"
            ax.plot(group[x], group[metric], marker="o", label=label)
        if x == "parameters":
            ax.set_xscale("log")
        else:
            ax.set_xticks(sorted(sweep[x].unique()))
        ax.set_xlabel("context length (tokens)" if x == "context_length" else "parameters")
        ax.set_title(HEADLINE.get(metric, metric))
        ax.set_ylim(0, 1)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"Sweep: metrics vs {'context length' if x == 'context_length' else 'model size'}")
    fig.tight_layout()
    return fig


#: sweep.csv columns that describe a point's setting, and their short names in legends.
SETTING_COLUMNS = ("model", "num_hidden_layers", "context_length", "max_epochs", "lora_target_modules")
SETTING_NAMES = {
    "num_hidden_layers": "layers",
    "context_length": "tokens",
    "max_epochs": "epochs",
    "lora_target_modules": "LoRA",
}


def sweep_depth_lines(sweep: pd.DataFrame, metrics: Sequence[str] = ("top1", "macro_f1_present")) -> plt.Figure:
    """Metrics against decoder layers, one line per context length, the TF-IDF baseline dashed in the same colour.

    Solid lines are the sweep's main grid (the most common epochs and LoRA targets); points trained longer or with
    other LoRA targets are drawn as labelled markers, so a depth x context x epochs sweep reads in one figure.
    """
    frame = sweep.dropna(subset=["num_hidden_layers"])
    main_epochs = frame["max_epochs"].mode().iloc[0]
    main_lora = frame["lora_target_modules"].mode().iloc[0]
    main = frame[(frame["max_epochs"] == main_epochs) & (frame["lora_target_modules"] == main_lora)]
    extra = frame.drop(main.index)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    colours = dict(zip(sorted(frame["context_length"].unique()), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, metric in zip(axes[0], metrics):
        for context, group in main.groupby("context_length", sort=True):
            group = group.sort_values("num_hidden_layers")
            colour = colours[context]
            ax.plot(group["num_hidden_layers"], group[metric], marker="o", color=colour, label=f"{context} tokens")
            baseline = group[f"baseline_{metric}"].dropna()
            if len(baseline):  # the same notes and token window at every depth: one value per context
                ax.axhline(baseline.mean(), color=colour, linestyle="--", linewidth=1)
        for row in extra.itertuples():
            lora = "" if row.lora_target_modules == main_lora else ", LoRA on all linear layers"
            label = f"{row.context_length} tokens, {row.max_epochs} epochs{lora}"
            marker = "*" if row.max_epochs != main_epochs else "D"
            ax.plot(
                [row.num_hidden_layers],
                [getattr(row, metric)],
                marker,
                ms=11,
                color=colours[row.context_length],
                markeredgecolor="black",
                label=label,
            )
        ax.set_xscale("log", base=2)
        layers = sorted(frame["num_hidden_layers"].unique())
        ax.set_xticks(layers, [str(int(d)) for d in layers])
        ax.set_xlabel("decoder layers kept")
        ax.set_title(f"{HEADLINE.get(metric, metric)} (test)")
        ax.grid(alpha=0.3)
    axes[0][-1].plot([], [], "--", color="grey", linewidth=1, label="TF-IDF on the same tokens")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"Sweep: LLM by decoder layers and context ({int(main_epochs)} epoch(s) unless marked)")
    fig.tight_layout()
    return fig


def reliability_diagram(calibration: dict[str, Any]) -> plt.Figure:
    """Accuracy against confidence per bin, before and after temperature scaling, with the diagonal."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for tag, marker in (("before", "o"), ("after", "s")):
        bins = [b for b in calibration[f"bins_{tag}"] if b["count"]]
        ece = calibration[f"ece_{tag}"]
        label = f"{tag} (ECE {ece:.3f})" if tag == "before" else f"T={calibration['temperature']:.2f} (ECE {ece:.3f})"
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker=marker, label=label)
    ax.set_xlabel("mean top-1 confidence in bin")
    ax.set_ylabel("accuracy in bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Reliability diagram (test)")
    fig.tight_layout()
    return fig


def coverage_accuracy(selective: dict[str, Any]) -> plt.Figure:
    """The test coverage-accuracy curve, the target accuracy and the point the validation threshold gives."""
    curve = selective["curve"]
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([p["coverage"] for p in curve], [p["accuracy"] for p in curve], label="test")
    ax.axhline(
        selective["target_accuracy"], color="grey", linestyle=":", label=f"target {selective['target_accuracy']:.2f}"
    )
    if selective.get("threshold") is not None and selective.get("test_accuracy") is not None:
        ax.plot(
            [selective["test_coverage"]],
            [selective["test_accuracy"]],
            "o",
            color="crimson",
            label=f"threshold {selective['threshold']:.3f} (from val)",
        )
    ax.set_xlabel("coverage (share of stays coded automatically)")
    ax.set_ylabel("accuracy of those stays")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("Selective coding")
    fig.tight_layout()
    return fig


def payment_bars(payment: dict[str, Any]) -> plt.Figure:
    """Over-, under- and net payment error in USD at the report's base rate."""
    keys = ("dollars_over", "dollars_under", "dollars_net")
    values = [payment.get(k) or 0.0 for k in keys]
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    ax.bar(["overpayment", "underpayment", "net"], values, color=["tab:red", "tab:blue", "tab:grey"])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("USD")
    ax.set_title(f"Payment impact over {payment.get('n', 0)} stays at {payment.get('base_rate', 0):,.0f} USD/weight")
    fig.tight_layout()
    return fig


def breakdown_bars(rows: list[dict[str, Any]], title: str, metric: str = "top1") -> plt.Figure:
    """Accuracy per group with the group size written above each bar."""
    fig, ax = plt.subplots(figsize=(max(4.6, 0.45 * len(rows) + 1.5), 3.4))
    groups = [str(r["group"]) for r in rows]
    values = [r[metric] if r.get(metric) is not None else 0.0 for r in rows]
    bars = ax.bar(groups, values)
    for bar, row in zip(bars, rows):
        ax.annotate(
            f"n={row['n']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7
        )
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(HEADLINE.get(metric, metric))
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=90 if len(rows) > 8 else 0)
    fig.tight_layout()
    return fig


def confusion_heatmap(
    confusion: dict[str, Any], title: str, xlabel: str = "predicted", ylabel: str = "coded"
) -> plt.Figure:
    """Counts of a confusion section (``labels`` + ``counts``) as an annotated heatmap (rows = gold)."""
    labels, counts = confusion["labels"], np.asarray(confusion["counts"])
    size = max(3.6, 0.42 * len(labels) + 1.8)
    fig, ax = plt.subplots(figsize=(size + 0.8, size))
    image = ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    if len(labels) <= 16:
        peak = counts.max() if counts.size else 0
        for i, j in zip(*np.nonzero(counts)):
            ax.text(
                j,
                i,
                counts[i, j],
                ha="center",
                va="center",
                fontsize=7,
                color="white" if counts[i, j] > peak / 2 else "black",
            )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def reward_curve(logged: pd.DataFrame, window: int = 5) -> plt.Figure | None:
    """A GRPO run at a glance, from its ``metrics.csv`` (``pd.read_csv``); None when it logged no reward.

    Left: the mean reward per step, its moving average, the exact/format reward means and, when the run validated,
    the held-out reward on the same validation notes at each check (step 0 = before GRPO): of greedy answers and,
    with ``val_samples``, of answers sampled at the training temperature with the same seed each check. Right:
    what shows mode collapse or reward hacking before the reward does: per-token entropy, distinct answers per
    prompt / G and the KL to the SFT policy (moving averages).
    """
    if "train/reward" not in logged:
        return None
    frame = logged.dropna(subset=["train/reward"]).reset_index(drop=True)
    steps = frame["step"].to_numpy() + 1

    def smooth(column: str):
        return frame[column].rolling(window, min_periods=1).mean()

    fig, (ax, mon) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=120)
    ax.plot(steps, frame["train/reward"], "o", ms=3, alpha=0.45, label="mean reward of the step")
    ax.plot(steps, smooth("train/reward"), "-", lw=2, label=f"moving average ({window} steps)")
    for column, name in (("train/rewards/exact", "exact DRG"), ("train/rewards/format", "format")):
        if column in frame:
            ax.plot(steps, smooth(column), "--", lw=1, label=name)
    # Held-out curves: the same validation notes after 0 (the SFT policy), n, 2n… optimizer steps.
    held_out_curves = (
        ("val/reward_greedy", "s-", "black", "held-out reward, greedy"),
        ("val/reward_sampled", "o--", "white", "held-out reward, sampled as in training"),
    )
    for column, style, face, name in held_out_curves:
        if column in logged and logged[column].notna().any():
            held_out = logged.dropna(subset=[column])
            x, y = held_out["val/optimizer_steps"], held_out[column]
            ax.plot(x, y, style, color="black", mfc=face, ms=5, lw=1.5, label=name)
    ax.set_title("reward", fontsize=9)
    monitors = (
        ("train/entropy", "entropy (nats/token)"),
        ("train/group_distinct", "distinct answers / G"),
        ("train/kl", "KL to SFT policy"),
    )
    for column, name in monitors:
        if column in frame and frame[column].notna().any():
            mon.plot(steps, smooth(column), lw=1.5, label=name)
    mon.set_title(f"collapse monitors (moving average, {window} steps)", fontsize=9)
    for axis in (ax, mon):
        axis.set_xlabel("GRPO step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_png_base64(fig: plt.Figure, dpi: int = 100) -> str:
    """PNG bytes of a figure, base64-encoded (for ``<img src="data:image/png;base64,...">``); closes the figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def format_value(value: Any) -> str:
    """A table cell: floats with 3 decimals (large ones with thousands separators), None/NaN as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float | np.floating):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3f}"
    return str(value)
