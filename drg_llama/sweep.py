"""Sweep context length and model size: one ordinary training run per grid point, resumable, summed up in sweep.csv.

    python -m drg_llama.sweep --variant two_label --grid context=256,512,1024 --grid model=tiny,smollm2_135m
    python -m drg_llama.sweep --variant two_label --config configs/tiny.yaml --grid data.max_length=32,64 \\
        --out sweeps/demo --run_baseline false

Grid axes: ``context=N`` applies ``configs/context/N.yaml`` (or ``--data.max_length N`` when there is no such file),
``model=M`` applies ``configs/models/M.yaml``, any other ``dotted.key=v1,v2`` is passed as ``--dotted.key v``. Every
other argument (``--config``, dotted overrides) goes to ``python -m drg_llama.train`` for every point; the grid
overlays come after them, so the grid wins.

Each point trains into ``OUT/<point>/`` (``context-256_model-tiny``), an ordinary run directory that ``evaluate``,
``predict``, the notebooks and the report read. A point with ``test_metrics.json`` is finished and skipped; a point
with only ``checkpoints/last.ckpt`` resumes from it. ``OUT/sweep.csv`` has one row per point: variant, model,
parameter count, context length, headline test metrics and wall time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import re
import time
from pathlib import Path

import lightning as L
import pandas as pd

from drg_llama.runs import read_config
from drg_llama.train import CONFIG_DIR

log = logging.getLogger("drg_llama.sweep")

#: Headline test metrics copied into sweep.csv.
HEADLINE = ("top1", "top5", "macro_f1_present", "macro_auc", "base_acc", "severity_acc", "ece")
POINT_FILE = "sweep_point.json"
PARAMETERS_FILE = "parameters.json"


class ParameterCount(L.Callback):
    """Writes ``parameters.json`` (total and trainable parameter counts of the built model) into the run directory."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = Path(trainer.log_dir)  # a collective under DDP: every rank asks
        if trainer.is_global_zero:
            params = list(pl_module.parameters())
            counts = {
                "parameters": sum(p.numel() for p in params),
                "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
            }
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / PARAMETERS_FILE).write_text(json.dumps(counts) + "\n")


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``["context=256,512", "model=tiny"]`` -> ``[("context", ["256", "512"]), ("model", ["tiny"])]``."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not items:
            raise SystemExit(f"error: --grid {spec!r} must look like key=v1,v2 (e.g. context=256,512)")
        if key in {k for k, _ in axes}:
            raise SystemExit(f"error: grid axis {key!r} given twice")
        axes.append((key.strip(), items))
    return axes


def axis_args(key: str, value: str) -> list[str]:
    """Training arguments for one grid value (see the module docstring for the axes)."""
    if key == "context":
        overlay = CONFIG_DIR / "context" / f"{value}.yaml"
        if overlay.exists():
            return ["--config", str(overlay)]
        if not value.isdigit():
            raise SystemExit(f"error: context={value!r} is not a number of tokens")
        return [f"--data.max_length={value}"]
    if key == "model":
        overlay = Path(value) if value.endswith((".yaml", ".yml")) else CONFIG_DIR / "models" / f"{value}.yaml"
        if not overlay.exists():
            known = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.yaml")))
            raise SystemExit(f"error: no model overlay {overlay}; choose one of {known} or give a .yaml path")
        return ["--config", str(overlay)]
    return [f"--{key}={value}"]


def point_name(point: dict[str, str]) -> str:
    """Directory name of a grid point, e.g. ``context-256_model-tiny`` (unsafe characters become ``-``)."""
    name = "_".join(f"{k}-{v}" for k, v in point.items()) or "default"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def run_sweep(variant: str, grid: list[tuple[str, list[str]]], train_args: list[str], out: str | Path) -> pd.DataFrame:
    """Train every grid point not finished yet, then write and return ``OUT/sweep.csv``.

    Args:
        variant: ``single_label`` or ``two_label``.
        grid: Axes from :func:`parse_grid`; the points are their product, in the order given.
        train_args: Arguments for every point (``--config`` files, dotted overrides).
        out: Sweep folder; each point trains into ``OUT/<point>/``.
    """
    from drg_llama.train import main as train_main

    out = Path(out).resolve()
    keys = [k for k, _ in grid]
    points = [dict(zip(keys, values)) for values in itertools.product(*(v for _, v in grid))]
    for point in points:
        name = point_name(point)
        run_dir = out / name
        if (run_dir / "test_metrics.json").exists():
            log.info("sweep: %s finished, skipped", name)
            continue
        args = ["--variant", variant, *train_args]
        for key, value in point.items():
            args += axis_args(key, value)
        # The logger's version is the point's name (a string is used as the directory name as is), so the run lands
        # in OUT/<point>/ and a resume from its last.ckpt writes into the same directory.
        args += [
            f"--trainer.logger.init_args.save_dir={out}",
            "--trainer.logger.init_args.name=",
            f"--trainer.logger.init_args.version={name}",
            "--trainer.callbacks+=drg_llama.sweep.ParameterCount",
        ]
        last = run_dir / "checkpoints" / "last.ckpt"
        if last.exists():
            log.info("sweep: %s resumes from %s", name, last)
            args += ["--ckpt_path", str(last)]
        start = time.perf_counter()
        train_main(args)
        record = {"point": point, "wall_seconds": round(time.perf_counter() - start, 2), "resumed": last.exists()}
        (run_dir / POINT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    frame = sweep_table(out, [point_name(p) for p in points], variant)
    frame.to_csv(out / "sweep.csv", index=False)
    return frame


def sweep_table(out: Path, names: list[str], variant: str) -> pd.DataFrame:
    """One row per finished point from the files of its run directory (unfinished points are left out)."""
    rows = []
    for name in names:
        run_dir = out / name
        test_path = run_dir / "test_metrics.json"
        if not test_path.exists():
            continue
        config = read_config(run_dir)
        point = _read_json(run_dir / POINT_FILE)
        params = _read_json(run_dir / PARAMETERS_FILE)
        metrics = json.loads(test_path.read_text())["metrics"]
        baseline = _read_json(run_dir / "baseline" / "metrics.json").get("metrics", {})
        backbone = config["model"]["backbone"]
        row = {
            "point": name,
            "variant": variant,
            "model": point.get("point", {}).get("model", backbone.get("name_or_path")),
            "parameters": params.get("parameters"),
            "trainable_parameters": params.get("trainable_parameters"),
            "context_length": config["data"]["max_length"],
        }
        row |= {key: metrics.get(key) for key in HEADLINE}
        row["baseline_top1"] = baseline.get("top1")
        row["wall_seconds"] = point.get("wall_seconds")
        row["run_dir"] = str(run_dir)
        rows.append(row)
    return pd.DataFrame(rows)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Parse the command line, run the sweep and print where sweep.csv is."""
    parser = argparse.ArgumentParser(
        prog="python -m drg_llama.sweep",
        description=__doc__.splitlines()[0],
        epilog="Other arguments (--config FILE, --data.x V, ...) go to python -m drg_llama.train for every point.",
    )
    parser.add_argument("--variant", default="two_label", choices=("single_label", "two_label"))
    parser.add_argument("--grid", action="append", default=[], help="axis=v1,v2 (context, model or a dotted key)")
    parser.add_argument("--out", default=None, help="sweep folder (default sweeps/<variant>)")
    args, train_args = parser.parse_known_args(argv)
    grid = parse_grid(args.grid)
    frame = run_sweep(args.variant, grid, train_args, args.out or f"sweeps/{args.variant}")
    print(frame.drop(columns=["run_dir"], errors="ignore").to_string(index=False))
    print(f"\nsweep table: {Path(args.out or f'sweeps/{args.variant}') / 'sweep.csv'}")
    return frame


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
