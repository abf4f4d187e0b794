"""The run folder: what training writes, and the one place ``evaluate``, ``predict`` and ``export`` read it back.

A run folder stands alone. Every path recorded inside it is relative to it, and the classes, the calibration and
the checkpoints travel with it, so a copy on another machine (no cache, no training data) predicts exactly as the
original. Nothing here resolves a path against the working directory or re-derives the label space from data.

Layout of ``runs/<variant>/version_N/``::

    config.yaml          the resolved training configuration (LightningCLI; model and data by class_path)
    run.json             recipe (classifier | reasoner), variant, the tested checkpoint (relative to the folder),
                         whether it was picked on validation, the DRG counts of the training rows
    label_space.json     the classes (LabelSpace.to_dict)
    checkpoints/         best-*.ckpt (on val/top1) and last.ckpt: trainable tensors only
    adapter/             LoRA (+ score head) as safetensors, PEFT layout
    init_adapter/        GRPO runs: the SFT adapter they started from (merged into the base before training)
    test_metrics.json    test metrics of the tested checkpoint
    calibration.json     the temperature ``evaluate`` fitted on validation; ``predict`` applies it
    eval/                metrics.json + predictions.parquet (``_val`` for validation); eval/<folder>/ for other data
    metrics.csv, baseline/, reasoner.json, reward_curve.png

Checkpoints are opened with ``torch.load(weights_only=True)``: a checkpoint is data, and a file that needs the full
unpickler to load (it could run code) is refused.

    from drg_llama.runs import Run
    run = Run.open("runs/two_label/version_0")
    model, checkpoint = run.load_model("best")
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from drg_llama.drg import LabelSpace
from drg_llama.errors import UserError

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
LABEL_SPACE_FILE = "label_space.json"
TEST_METRICS_FILE = "test_metrics.json"
CALIBRATION_FILE = "calibration.json"
REASONER_FILE = "reasoner.json"
METRICS_FILE = "metrics.csv"
BASELINE_DIR = "baseline"
REWARD_CURVE_FILE = "reward_curve.png"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
ADAPTER_DIR = "adapter"
INIT_ADAPTER_DIR = "init_adapter"
EVAL_DIR = "eval"
RECIPES = ("classifier", "reasoner")
#: The splits ``evaluate`` scores; ``all`` is their concatenation (for data the run was not trained on).
EVAL_SPLITS = ("test", "val", "all")


class RunError(UserError):
    """A run folder (or a checkpoint in it) that cannot be used, named with what to do."""


# ----------------------------------------------------------------------------------------------------------------
# Writing files: complete or absent, JSON without NaN


def json_ready(value: Any) -> Any:
    """numpy scalars to Python, tuples to lists, NaN/inf to None, recursively: strict JSON every reader accepts."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@contextmanager
def replacing(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` (same suffix); when the block ends without error it becomes
    ``target``. A crash leaves the old ``target`` (or nothing), never a half-written file or folder."""
    target = Path(target)
    tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}{target.suffix}")
    try:
        yield tmp
        os.replace(tmp, target)  # atomic; a folder only replaces an empty folder or nothing
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented strict JSON (NaN as null), atomically; creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(json_ready(data), indent=2, allow_nan=False) + "\n")
    return path


def read_json(path: Path) -> dict:
    """A JSON object from a run folder, or a RunError naming the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path} is missing; pass a run folder written by python -m drg_llama.train") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise RunError(f"{path} is not valid JSON ({type(err).__name__}); restore it from the training run") from None
    if not isinstance(data, dict):
        raise RunError(f"{path} does not hold a JSON object; restore it from the training run")
    return data


def read_config(folder: str | Path) -> dict[str, Any]:
    """A run's ``config.yaml`` with ``model`` and ``data`` as their settings, or a RunError naming the file.

    The training CLI saves each as ``{class_path, init_args}``; folders written before it did hold the settings
    directly. Either way ``config["model"]`` is the model's settings (``backbone``, ...).
    """
    config_path = Path(folder) / CONFIG_FILE
    if not config_path.is_file():
        raise RunError(f"{folder} has no {CONFIG_FILE}; pass a run folder written by python -m drg_llama.train")
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise RunError(f"{config_path} is not valid YAML{where}; restore it from the training run") from None
    except UnicodeDecodeError:
        raise RunError(f"{config_path} is not UTF-8 text; restore it from the training run") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise RunError(f"{config_path} has no model section; restore it from the training run")
    for section in ("model", "data"):
        value = config.get(section)
        if isinstance(value, dict) and "class_path" in value:
            config[section] = value.get("init_args") or {}
    return config


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def read_checkpoint(path: str | Path) -> dict:
    """Load a Lightning checkpoint with the safe unpickler, or raise a RunError that says what is wrong with it.

    Only tensors, numbers, strings and containers load (``weights_only=True``); a file that needs more (a tampered
    or foreign pickle) is refused rather than run.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint {path} does not exist; pass --checkpoint best, last or the path of a .ckpt file")
    if path.stat().st_size == 0:
        raise RunError(f"checkpoint {path} is empty (0 bytes): it was never written completely; use another one")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Weights only" in str(err):
            raise RunError(
                f"checkpoint {path} holds Python objects that a safe load refuses (it could run code); "
                "drg-llama opens checkpoints with weights_only=True: use a checkpoint written by drg-llama"
            ) from None
        raise RunError(
            f"{path} is not a PyTorch checkpoint (it cannot be unpickled); use a .ckpt from training"
        ) from None
    except Exception:  # a damaged archive fails anywhere in the unpickler (KeyError, EOFError, RuntimeError...)
        raise RunError(
            f"checkpoint {path} is truncated or not a PyTorch checkpoint; copy it again or use another"
        ) from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= set(checkpoint):
        raise RunError(
            f"{path} is not a drg-llama checkpoint (no state_dict and hyper_parameters); use one from training"
        )
    return checkpoint


def _backbone_dict(backbone: dict[str, Any] | None, source: Path) -> dict[str, Any]:
    """A backbone configuration in one normal form (YAML lists and checkpoint tuples compare equal)."""
    from drg_llama.models.backbone import BackboneConfig

    try:
        return asdict(BackboneConfig(**(backbone or {})))
    except (TypeError, ValueError) as err:
        raise RunError(f"{source} describes no base model drg-llama can build ({err}); restore it") from None


# ----------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class Run:
    """A run folder opened for reading: its configuration, record and label space (checked when opened).

    Attributes:
        folder: The run folder.
        config: ``config.yaml`` as a dict, ``model`` and ``data`` as their settings (``read_config``).
        record: ``run.json`` (or, for a folder written before it existed, the same facts read from older files).
        label_space: The run's classes, from ``label_space.json``.
    """

    folder: Path
    config: dict[str, Any]
    record: dict[str, Any]
    label_space: LabelSpace

    @classmethod
    def open(cls, folder: str | Path) -> Run:
        """Read a run folder's configuration, record and label space; a RunError says what is missing or broken."""
        folder = Path(folder)
        if not folder.is_dir():
            raise RunError(f"{folder} is not a folder; pass a run folder written by python -m drg_llama.train")
        config = read_config(folder)
        record = read_json(folder / RUN_FILE) if (folder / RUN_FILE).is_file() else _record_from_older_files(folder)
        if record.get("recipe") not in RECIPES:
            raise RunError(f"{folder / RUN_FILE} names no recipe ({' or '.join(RECIPES)}); restore it from training")
        if record["recipe"] == "reasoner" and "max_new_tokens" in config["model"]:
            raise RunError(
                f"{folder} is a reasoner run written before the reasoner's settings were grouped (model.generation, "
                f"model.grpo, model.rewards, data.max_note_tokens...); train it again with python -m drg_llama.train"
            )
        space_path = folder / LABEL_SPACE_FILE
        space = read_json(space_path)
        try:
            label_space = LabelSpace.from_dict(space)
        except (KeyError, TypeError, ValueError) as err:
            raise RunError(f"{space_path} is not a label space ({err}); restore it from the training run") from None
        return cls(folder, config, record, label_space)

    # ------------------------------------------------------------------------------------------------------------
    # what the run is

    @property
    def recipe(self) -> str:
        """``classifier`` (single_label / two_label) or ``reasoner`` (sft / grpo)."""
        return self.record["recipe"]

    @property
    def variant(self) -> str:
        """``single_label``, ``two_label``, ``sft`` or ``grpo``."""
        return self.record.get("variant") or self.label_space.variant

    @property
    def backbone(self) -> dict[str, Any]:
        """The base model configuration (``model.backbone`` of config.yaml), in normal form."""
        return _backbone_dict(self.config["model"].get("backbone"), self.folder / CONFIG_FILE)

    def train_codes(self) -> np.ndarray | None:
        """DRG code of every training row the model saw (from the recorded counts); None for older run folders."""
        counts = self.record.get("train_drg_counts")
        if not counts:
            return None
        return np.repeat(np.array([int(c) for c in counts], dtype=np.int64), [int(n) for n in counts.values()])

    def path(self, recorded: str) -> Path:
        """A path recorded in the run (relative to the folder, or absolute when training put it outside)."""
        path = Path(recorded)
        return path if path.is_absolute() else self.folder / path

    def relative(self, path: str | Path) -> str:
        """``path`` as recorded in the run: relative to the folder when inside it (so a copy still finds it)."""
        path = Path(path)
        try:
            return path.resolve().relative_to(self.folder.resolve()).as_posix()
        except ValueError:
            return str(path.resolve())

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints and the model

    def checkpoint_path(self, which: str = "best") -> Path:
        """The checkpoint file for ``best`` (the one training tested), ``last``, or a path given by the user.

        ``best`` and ``last`` are looked up in this folder only, never relative to the working directory.
        """
        if which == "last":
            path = self.folder / CHECKPOINT_DIR / LAST_CHECKPOINT
        elif which == "best":
            tested = self.record.get("tested_checkpoint")
            if not tested:
                raise RunError(
                    f"{self.folder / RUN_FILE} names no tested checkpoint (training did not finish); "
                    "pass --checkpoint last or the path of a .ckpt file"
                )
            path = self.path(tested)
        else:
            path = Path(which)
        if not path.is_file():
            raise RunError(
                f"checkpoint {path} does not exist; pass --checkpoint best, last or the path of a .ckpt file"
            )
        return path

    def read_checkpoint(self, which: str = "best") -> tuple[dict, Path]:
        """The checkpoint's contents, after checking it was trained for this run's classes and base model."""
        path = self.checkpoint_path(which)
        checkpoint = read_checkpoint(path)
        hparams = checkpoint["hyper_parameters"]
        if hparams.get("label_space") != self.label_space.to_dict():
            raise RunError(
                f"checkpoint {path} was trained for other classes than {self.folder / LABEL_SPACE_FILE}; "
                "it belongs to another run"
            )
        if _backbone_dict(hparams.get("backbone"), path) != self.backbone:
            raise RunError(
                f"checkpoint {path} was trained on another base model than {self.folder / CONFIG_FILE} names "
                f"({self.backbone['name_or_path']}); it belongs to another run"
            )
        return checkpoint, path

    def load_model(self, which: str = "best"):
        """The trained model (``DRGClassifier`` or ``DRGReasoner``, by recipe) in eval mode, and its checkpoint path.

        Checkpoints hold only the trainable tensors; the frozen base is rebuilt from the run's configuration.
        """
        import lightning as L

        checkpoint, path = self.read_checkpoint(which)
        if self.recipe == "reasoner":
            from drg_llama.models.reasoner import DRGReasoner as model_class
        else:
            from drg_llama.models.classifier import DRGClassifier as model_class
        accepted = inspect.signature(model_class.__init__).parameters
        kwargs = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted}
        if self.recipe == "reasoner" and kwargs.get("init_adapter"):
            kwargs["init_adapter"] = str(self._init_adapter(kwargs["init_adapter"]))
        # A random-init backbone (tests, benchmarks) must draw the same frozen weights as training did.
        L.seed_everything(self.config.get("seed_everything") or 0, verbose=False)
        model = model_class(**kwargs)
        try:
            model.on_load_checkpoint(checkpoint)  # fails when trainable tensors are missing
            model.load_state_dict(checkpoint["state_dict"], strict=False)  # frozen base tensors are not in it
        except RuntimeError as err:
            reason = str(err).strip().splitlines()[0][:200]
            raise RunError(
                f"checkpoint {path} does not fit the model of {self.folder / CONFIG_FILE} ({reason})"
            ) from None
        model.eval()
        return model, path

    def _init_adapter(self, recorded: str) -> Path:
        """The SFT adapter a GRPO run started from: the copy inside the run, else where training found it."""
        inside = self.folder / INIT_ADAPTER_DIR
        if (inside / "adapter_config.json").is_file():
            return inside
        if Path(recorded).exists():
            return Path(recorded)
        raise RunError(
            f"{self.folder} started from the SFT adapter {recorded}, which is neither here nor in "
            f"{inside}; copy the SFT run's adapter/ folder to {inside}"
        )

    # ------------------------------------------------------------------------------------------------------------
    # data

    def data_module(self, data_dir: str | Path | None = None, *, need_data: bool = True):
        """The run's data module (``DRGDataModule``, or ``ReasonerDataModule`` for a reasoner run) with its
        tokenisation or prompt settings and label space; nothing is read yet.

        Args:
            data_dir: A prepared folder to score instead of the run's own data; all its rows are used (the run's
                row limits apply to its own data only).
            need_data: False when only the tokenisation settings are wanted (``predict``): the run's own data
                folder may then be absent.
        """
        if self.recipe == "reasoner":
            from drg_llama.data.reasoner import ReasonerDataModule as data_class
        else:
            from drg_llama.data.datamodule import DRGDataModule as data_class

        accepted = inspect.signature(data_class.__init__).parameters
        args = {k: v for k, v in (self.config.get("data") or {}).items() if k in accepted and k != "label_space"}
        args["drg_version"] = self.label_space.version
        if "variant" in accepted:
            args["variant"] = self.label_space.variant
        if data_dir is not None:
            args.update(data_dir=str(data_dir), limit_train=None, limit_val=None, limit_test=None)
        elif args.get("data_dir") is not None:
            # config.yaml keeps the folder as typed (maybe relative to where training ran); run.json has it resolved.
            recorded = self.record.get("data_dir")
            if need_data and (not recorded or not Path(recorded).is_dir()):
                raise RunError(
                    f"{self.folder} was trained on {args['data_dir']}, which is not here; pass --data with a prepared "
                    "folder to score"
                )
            args["data_dir"] = recorded or args["data_dir"]
        data = data_class(**args)
        data.use_label_space(self.label_space)
        return data

    # ------------------------------------------------------------------------------------------------------------
    # calibration and evaluation files

    def temperature(self, checkpoint: str | Path) -> float:
        """The temperature ``evaluate`` fitted for ``checkpoint``; 1.0 (no scaling) if none was fitted for it."""
        import warnings

        path = self.folder / CALIBRATION_FILE
        if not path.is_file():
            return 1.0
        saved = read_json(path)
        if Path(saved.get("checkpoint", "")).name != Path(checkpoint).name:
            warnings.warn(
                f"{path} was fitted for {saved.get('checkpoint')}, not {Path(checkpoint).name}; using uncalibrated "
                "probabilities (re-run python -m drg_llama.evaluate to refit)",
                stacklevel=2,
            )
            return 1.0
        temperature = saved.get("temperature")
        if not isinstance(temperature, int | float) or not temperature > 0:
            raise RunError(f"{path} holds no positive temperature; delete it or re-run python -m drg_llama.evaluate")
        return float(temperature)

    def save_temperature(self, temperature: float, checkpoint: str | Path, **facts: Any) -> Path:
        """Write ``calibration.json``: the temperature ``predict`` applies to ``checkpoint``'s probabilities."""
        record = {"temperature": temperature, "checkpoint": self.relative(checkpoint), **facts}
        return write_json(self.folder / CALIBRATION_FILE, record)

    def eval_files(self, split: str, data_dir: str | Path | None = None) -> tuple[Path, Path]:
        """``(metrics.json, predictions.parquet)`` paths for ``split`` of the run's data or of ``data_dir``."""
        folder = self.folder / EVAL_DIR
        if data_dir is not None:
            folder = folder / Path(data_dir).resolve().name
        suffix = "" if split == "test" else f"_{split}"
        return folder / f"metrics{suffix}.json", folder / f"predictions{suffix}.parquet"


def _record_from_older_files(folder: Path) -> dict[str, Any]:
    """What ``run.json`` holds, for a run folder written before it existed.

    Such folders recorded the tested checkpoint relative to the working directory of training; only its file name is
    trusted, looked up in this folder's checkpoints/, so a copy never loads another run's weights.
    """
    tested = read_json(folder / TEST_METRICS_FILE).get("checkpoint") if (folder / TEST_METRICS_FILE).is_file() else None
    reasoner = (folder / REASONER_FILE).is_file()
    return {
        "recipe": "reasoner" if reasoner else "classifier",
        "variant": read_json(folder / REASONER_FILE).get("stage") if reasoner else None,
        "tested_checkpoint": f"{CHECKPOINT_DIR}/{Path(tested).name}" if tested else None,
    }


def tested_checkpoint(trainer, best: str = "") -> str:
    """The checkpoint holding the weights training tested: ``best`` (picked on validation) if given, else the last.

    With checkpointing turned off the last weights are saved now, since evaluate and predict need them. Every rank
    must call this (saving is a collective under DDP).
    """
    callback = trainer.checkpoint_callback
    tested = best or (callback.last_model_path if callback else "")
    if not tested:
        tested = str(Path(trainer.log_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT)
        trainer.save_checkpoint(tested)
    return tested


def record_run(
    folder: str | Path,
    *,
    recipe: str,
    variant: str,
    label_space: LabelSpace,
    tested_checkpoint: str | Path,
    selected_on: str,
    data_dir: str | Path,
    train_codes: Sequence[int],
) -> Run:
    """Write ``label_space.json`` and ``run.json`` at the end of training; returns the run, opened.

    Args:
        folder: The run folder.
        recipe: ``classifier`` or ``reasoner``.
        variant: ``single_label``, ``two_label``, ``sft`` or ``grpo``.
        label_space: The run's classes.
        tested_checkpoint: The checkpoint whose test metrics ``test_metrics.json`` holds (``best`` from now on).
        selected_on: How it was chosen: ``val`` (best on validation) or ``last`` (no validation, or a reasoner).
        data_dir: The prepared folder trained on (resolved, so evaluate finds it from any working directory).
        train_codes: The DRG code of every training row (for the frequency bands of evaluate's breakdowns).
    """
    import drg_llama

    folder = Path(folder)
    write_json(folder / LABEL_SPACE_FILE, label_space.to_dict())
    codes, counts = np.unique(np.asarray(train_codes, dtype=np.int64), return_counts=True)
    draft = Run(folder, {}, {}, label_space)
    record = {
        "recipe": recipe,
        "variant": variant,
        "drg_version": label_space.version,
        "tested_checkpoint": draft.relative(tested_checkpoint),
        "selected_on": selected_on,
        "data_dir": str(Path(data_dir).resolve()),
        "train_drg_counts": {int(c): int(n) for c, n in zip(codes, counts)},
        "drg_llama_version": drg_llama.__version__,
    }
    write_json(folder / RUN_FILE, record)
    return Run.open(folder)


__all__ = [
    "EVAL_SPLITS",
    "RECIPES",
    "Run",
    "RunError",
    "json_ready",
    "read_checkpoint",
    "read_config",
    "record_run",
    "replacing",
    "tested_checkpoint",
    "write_json",
]
