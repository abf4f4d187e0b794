"""Sweep context length and model size: one ordinary training run per grid point, resumable, summed up in sweep.csv.

    python -m drg_llama.sweep --variant two_label --grid context=256,512,1024 --grid model=tiny,smollm2_135m
    python -m drg_llama.sweep --variant two_label --config configs/tiny.yaml --grid data.max_length=32,64 \\
        --out sweeps/demo --run_baseline false

Grid axes: ``context=N`` applies ``configs/context/N.yaml`` (or ``--data.max_length N`` when there is no such file),
``model=M`` applies ``configs/models/M.yaml``, ``lora=all_linear`` (any folder of ``configs/``: ``NAME=V`` applies
``configs/NAME/V.yaml``), any other ``dotted.key=v1,v2`` is passed as ``--dotted.key v``. Every other argument
(``--config``, dotted overrides) goes to ``python -m drg_llama.train`` for every point; the grid overlays come after
them, so the grid wins.

Each point trains into ``OUT/<point>/`` (``context-256_model-tiny``), an ordinary run directory that ``evaluate``,
``predict``, the notebooks and the report read. A point with ``test_metrics.json`` is finished and skipped; a point
with only ``checkpoints/last.ckpt`` resumes from it. ``OUT/sweep.csv`` has one row per finished point in ``OUT`` (so
several sweeps with different grids can share one folder): variant, model, decoder layers, parameter counts, context
length, epochs, LoRA targets, headline test metrics, the TF-IDF baseline's on the same token window, and wall time.

``--shard i/N`` trains only slice ``i`` of ``N`` (numbered from 1), so a job array spreads the points over GPUs or
nodes: the grid's points, in the order above (the last axis varies fastest), are dealt round robin, point ``k``
(from 0) to slice ``k % N + 1``. Every slice of one sweep must get the same grid, arguments and ``--out``::

    python -m drg_llama.sweep --grid context=256,512 --grid model=tiny,smollm2_135m --shard 1/2 --out sweeps/s
    python -m drg_llama.sweep --grid context=256,512 --grid model=tiny,smollm2_135m --shard 2/2 --out sweeps/s

A slice that is run again skips its finished points and resumes the others. Each slice ends by writing ``sweep.csv``
from every finished point of the whole grid (its own and the other slices'), so the slice that ends last leaves the
complete table; run any slice again to rebuild it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import lightning as L
import pandas as pd

from drg_llama.runs import read_config
from drg_llama.train import CONFIG_DIR

log = logging.getLogger("drg_llama.sweep")

#: Headline test metrics copied into sweep.csv.
HEADLINE = ("top1", "top5", "macro_f1_present", "macro_auc", "base_acc", "severity_acc", "ece")
#: The TF-IDF baseline's figures copied into sweep.csv (as ``baseline_<key>``), on the point's token window.
BASELINE_HEADLINE = ("top1", "top5", "macro_f1_present", "macro_auc")
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
                # the layers the model was built with (a null num_hidden_layers means the checkpoint's own count)
                "num_hidden_layers": _built_layers(pl_module),
            }
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / PARAMETERS_FILE).write_text(json.dumps(counts) + "\n")


def _built_layers(module: L.LightningModule) -> int | None:
    for sub in module.modules():
        layers = getattr(getattr(sub, "config", None), "num_hidden_layers", None)
        if layers is not None:
            return int(layers)
    return None


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
    if "." not in key and (CONFIG_DIR / key).is_dir():  # an overlay folder of configs/, e.g. lora=all_linear
        overlay = CONFIG_DIR / key / f"{value}.yaml"
        if not overlay.exists():
            known = ", ".join(sorted(p.stem for p in (CONFIG_DIR / key).glob("*.yaml")))
            raise SystemExit(f"error: no overlay {overlay}; choose one of {known}")
        return ["--config", str(overlay)]
    return [f"--{key}={value}"]


def point_name(point: dict[str, str]) -> str:
    """Directory name of a grid point, e.g. ``context-256_model-tiny`` (unsafe characters become ``-``)."""
    name = "_".join(f"{k}-{v}" for k, v in point.items()) or "default"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def parse_shard(spec: str) -> tuple[int, int]:
    """``"2/4"`` -> ``(2, 4)``: slice 2 of 4, slices numbered from 1; anything else stops with one sentence."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if match is None:
        raise SystemExit(f"error: --shard {spec!r} must look like i/N, slice i of N counted from 1 (e.g. 1/4)")
    index, count = int(match[1]), int(match[2])
    if count < 1:
        raise SystemExit(f"error: --shard {spec!r} asks for {count} slices; N must be at least 1")
    if not 1 <= index <= count:
        raise SystemExit(f"error: --shard {spec!r} names no slice: the {count} slices are numbered 1 to {count}")
    return index, count


def shard_points(points: list[dict[str, str]], shard: tuple[int, int] | None) -> list[dict[str, str]]:
    """The points of slice ``i`` of ``N``: point ``k`` (from 0, grid order) goes to slice ``k % N + 1``.

    Round robin keeps the slices within one point of each other in size, and the assignment depends only on the grid
    and ``N``, so every job of an array computes the same partition without talking to the others.
    """
    if shard is None:
        return points
    index, count = shard
    return points[index - 1 :: count]


def grid_points(grid: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Every point of the grid: the product of its axes, the last axis varying fastest."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, values)) for values in itertools.product(*(v for _, v in grid))]


def run_sweep(
    variant: str,
    grid: list[tuple[str, list[str]]],
    train_args: list[str],
    out: str | Path,
    shard: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """Train every grid point (of the slice) not finished yet, then write and return ``OUT/sweep.csv``.

    Args:
        variant: ``single_label`` or ``two_label``.
        grid: Axes from :func:`parse_grid`; the points are their product, in the order given.
        train_args: Arguments for every point (``--config`` files, dotted overrides).
        out: Sweep folder; each point trains into ``OUT/<point>/``.
        shard: ``(i, N)`` from :func:`parse_shard` to train only slice ``i`` of ``N``; None trains every point.
            ``sweep.csv`` always covers every finished point of the whole grid.
    """
    from drg_llama.train import main as train_main

    out = Path(out).resolve()
    points = grid_points(grid)
    mine = shard_points(points, shard)
    if shard is not None:
        log.info("sweep: slice %d/%d trains %d of the grid's %d points", *shard, len(mine), len(points))
    for point in mine:
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
        resumed = last.exists()  # asked before training, which writes last.ckpt
        if resumed:
            log.info("sweep: %s resumes from %s", name, last)
            args += ["--ckpt_path", str(last)]
        start = time.perf_counter()
        train_main(args)
        record = {
            "point": point,
            "wall_seconds": round(time.perf_counter() - start, 2),
            "resumed": resumed,
            "shard": None if shard is None else f"{shard[0]}/{shard[1]}",
        }
        write_atomically(run_dir / POINT_FILE, json.dumps(record, indent=2) + "\n")
    return write_sweep_table(out, finished_points(out, [point_name(p) for p in points]), variant)


def finished_points(out: Path, names: list[str]) -> list[str]:
    """``names`` (this grid, in its order), then every other point folder in ``out`` (earlier sweeps), sorted."""
    others = sorted(p.parent.name for p in out.glob(f"*/{POINT_FILE}") if p.parent.name not in names)
    return [*names, *others]


def write_sweep_table(out: Path, names: list[str], variant: str) -> pd.DataFrame:
    """Write ``OUT/sweep.csv`` from every finished point among ``names`` (atomically) and return it.

    Slices of a sharded sweep end at different times and each writes the table. A slice that read the folder just
    before another slice finished a point would overwrite that slice's newer table with an older one, so after each
    write the table is read again from the run folders and written again if anything changed meanwhile. Every slice
    writes after its last change to the folder, so the last write of all holds every finished point.
    """
    frame = sweep_table(out, names, variant)
    while True:
        write_atomically(out / "sweep.csv", frame.to_csv(index=False))
        again = sweep_table(out, names, variant)
        if again.equals(frame):
            return frame
        frame = again


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
            "num_hidden_layers": params.get("num_hidden_layers", backbone.get("num_hidden_layers")),
            "parameters": params.get("parameters"),
            "trainable_parameters": params.get("trainable_parameters"),
            "context_length": config["data"]["max_length"],
            "max_epochs": (config.get("trainer") or {}).get("max_epochs"),
            "lora_target_modules": "+".join(backbone.get("lora_target_modules") or []),
        }
        row |= {key: metrics.get(key) for key in HEADLINE}
        row |= {f"baseline_{key}": baseline.get(key) for key in BASELINE_HEADLINE}
        row["wall_seconds"] = point.get("wall_seconds")
        row["run_dir"] = str(run_dir)
        rows.append(row)
    return pd.DataFrame(rows)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` complete or not at all: a temporary file beside it, then a rename over it.

    The temporary name is unique across processes and machines: slices on two nodes may share a process id.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    parser.add_argument(
        "--shard", default=None, help="i/N: train only slice i of N (from 1) of the grid, e.g. one job of an array"
    )
    args, train_args = parser.parse_known_args(argv)
    grid = parse_grid(args.grid)
    shard = None if args.shard is None else parse_shard(args.shard)
    frame = run_sweep(args.variant, grid, train_args, args.out or f"sweeps/{args.variant}", shard)
    print(frame.drop(columns=["run_dir"], errors="ignore").to_string(index=False))
    print(f"\nsweep table: {Path(args.out or f'sweeps/{args.variant}') / 'sweep.csv'}")
    return frame


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
