"""The run folder (drg_llama.runs): it stands alone, never loads another run's weights, refuses unsafe checkpoints.

Most tests work on copies of the session's tiny runs (conftest ``tiny_runs``); none changes the originals.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from drg_llama import evaluate
from drg_llama.drg import LabelSpace
from drg_llama.evaluate import evaluate_run
from drg_llama.predict import predict_file
from drg_llama.runs import Run, RunError, read_checkpoint, replacing, write_json

NOTES = {"id": ["a", "b", "c"], "text": ["sepsis with acute kidney injury", "heart failure", "pneumonia, COPD"]}


@pytest.fixture
def notes(tmp_path) -> Path:
    path = tmp_path / "notes.csv"
    pd.DataFrame(NOTES).to_csv(path, index=False)
    return path


def copy_run(run_dir: Path, to: Path) -> Path:
    return Path(shutil.copytree(run_dir, to))


def best_checkpoint(run_dir: Path) -> Path:
    return run_dir / json.loads((run_dir / "run.json").read_text())["tested_checkpoint"]


def prepared_folder(cache) -> Path:
    return next(Path(cache).glob("synthetic/*/prepared"))


# ----------------------------------------------------------------------------------------------------------------
# files: strict JSON, complete or absent


def test_write_json_is_strict_and_leaves_no_partial_file(tmp_path):
    path = write_json(tmp_path / "sub" / "m.json", {"auc": float("nan"), "n": np.int64(3), "t": (1, 2)})
    assert json.loads(path.read_text()) == {"auc": None, "n": 3, "t": [1, 2]}
    with pytest.raises(ZeroDivisionError), replacing(path) as tmp:
        tmp.write_text("half")
        1 / 0
    assert json.loads(path.read_text())["n"] == 3  # the old file survives a failed write
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.json"]  # and no temporary file is left


def test_saved_temperature_is_read_back_for_its_checkpoint_only(tmp_path):
    run = Run(tmp_path, {}, {}, LabelSpace.build("v43", "single_label", [291, 292]))
    assert run.temperature("checkpoints/best-epoch=0-step=6.ckpt") == 1.0  # evaluate has not run
    run.save_temperature(1.7, tmp_path / "checkpoints" / "best-epoch=0-step=6.ckpt", n_fit=40)
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved["n_fit"] == 40 and saved["checkpoint"] == "checkpoints/best-epoch=0-step=6.ckpt"  # relative
    assert run.temperature("elsewhere/best-epoch=0-step=6.ckpt") == 1.7
    with pytest.warns(UserWarning, match="fitted for"):
        assert run.temperature("last.ckpt") == 1.0


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: checked, and loaded with the safe unpickler


class _Payload:
    """Unpickling this creates a file: stands for any code a checkpoint received from someone else could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_malicious_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": _Payload(marker)}, path)
    with pytest.raises(RunError, match="safe load refuses"):
        read_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what every load did before: the payload runs
    assert marker.exists()


def test_broken_checkpoints_are_named(tiny_runs, tmp_path):
    real = best_checkpoint(tiny_runs["two_label"][0])
    cases = {
        "missing.ckpt": (None, "does not exist"),
        "empty.ckpt": (b"", "is empty"),
        "truncated.ckpt": (real.read_bytes()[: real.stat().st_size // 2], "truncated or not a PyTorch checkpoint"),
        "text.ckpt": (b"hello, not a checkpoint\n", "not a PyTorch checkpoint"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(RunError, match=message) as err:
            read_checkpoint(path)
        assert str(path) in str(err.value)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.ckpt")
    with pytest.raises(RunError, match="not a drg-llama checkpoint"):
        read_checkpoint(tmp_path / "foreign.ckpt")


def test_a_checkpoint_of_another_run_is_refused(tiny_runs, tmp_path):
    run_dir = copy_run(tiny_runs["two_label"][0], tmp_path / "run")
    best = best_checkpoint(run_dir)
    shutil.copy(best_checkpoint(tiny_runs["single_label"][0]), best)  # other classes
    with pytest.raises(RunError, match="trained for other classes than .*label_space.json"):
        Run.open(run_dir).load_model()
    checkpoint = torch.load(best_checkpoint(tiny_runs["two_label"][0]), weights_only=True)
    checkpoint["hyper_parameters"]["backbone"]["lora_r"] = 8  # another base model / adapter shape
    torch.save(checkpoint, best)
    with pytest.raises(RunError, match="trained on another base model than .*config.yaml"):
        Run.open(run_dir).load_model()


# ----------------------------------------------------------------------------------------------------------------
# a copied run stands alone


def test_a_copy_predicts_and_evaluates_alone(tiny_runs, cache, notes, tmp_path, monkeypatch):
    """A copy in another folder, with an empty cache (so no training data) predicts as the original does, and scores
    a copy of the prepared data exactly as the original scores the original."""
    original = tiny_runs["two_label"][0]
    data = shutil.copytree(prepared_folder(cache), tmp_path / "data_copy", ignore=shutil.ignore_patterns("tokenized"))
    expected = predict_file(original, notes, tmp_path / "expected.csv")
    expected_report = evaluate_run(original, data_dir=prepared_folder(cache))

    copy = copy_run(original, tmp_path / "elsewhere" / "run")
    empty_cache = tmp_path / "empty_cache"
    monkeypatch.setenv("DRG_LLAMA_CACHE", str(empty_cache))
    monkeypatch.chdir(tmp_path / "elsewhere")
    pd.testing.assert_frame_equal(predict_file("run", notes, tmp_path / "copy.csv"), expected)
    report = evaluate_run("run", data_dir=data)
    assert report["metrics"] == expected_report["metrics"] and report["metrics"]["n"] > 0
    assert not empty_cache.exists()  # nothing was synthesised, converted or tokenised into the cache
    assert (copy / "eval" / "data_copy" / "metrics.json").is_file()


def test_another_run_at_the_recorded_path_is_never_loaded(tiny_runs, notes, tmp_path, monkeypatch):
    """The reported bug: the best checkpoint was stored relative to the working directory of training, so a copy
    used from a folder holding another run at that path silently predicted with the other run's weights."""
    original = tiny_runs["two_label"][0]
    expected = predict_file(original, notes, tmp_path / "expected.csv")
    # Another run at the very path the original recorded when it trained (runs/two_label/version_0/...), with
    # other weights.
    workdir = tmp_path / "workdir"
    other = copy_run(original, workdir / "runs" / "two_label" / "version_0")
    checkpoint = torch.load(best_checkpoint(other), weights_only=True)
    checkpoint["state_dict"] = {k: torch.randn_like(v) for k, v in checkpoint["state_dict"].items()}
    torch.save(checkpoint, best_checkpoint(other))
    copy = copy_run(original, tmp_path / "copy")
    monkeypatch.chdir(workdir)
    assert predict_file(copy, notes, tmp_path / "copy.csv").equals(expected)
    assert not predict_file(other, notes, tmp_path / "other.csv").equals(expected)  # the other run does differ

    # A run folder written before run.json: its test_metrics.json has the cwd-relative path; only the name counts.
    (copy / "run.json").unlink()
    test = json.loads((copy / "test_metrics.json").read_text())
    test["checkpoint"] = f"runs/two_label/version_0/{test['checkpoint']}"
    (copy / "test_metrics.json").write_text(json.dumps(test))
    assert predict_file(copy, notes, tmp_path / "old_layout.csv").equals(expected)

    # A copy without its checkpoints, or with an empty one, stops instead of finding weights elsewhere.
    best = best_checkpoint(original).name
    (copy / "checkpoints" / best).write_bytes(b"")
    with pytest.raises(RunError, match="is empty"):
        predict_file(copy, notes, tmp_path / "x.csv")
    shutil.rmtree(copy / "checkpoints")
    with pytest.raises(RunError, match=f"{copy / 'checkpoints' / best} does not exist"):
        predict_file(copy, notes, tmp_path / "x.csv")


# ----------------------------------------------------------------------------------------------------------------
# cross-dataset evaluation and options


def test_evaluate_on_another_prepared_folder_scores_every_row(tiny_runs, cache, tmp_path):
    run_dir = copy_run(tiny_runs["two_label"][0], tmp_path / "run")
    data = prepared_folder(cache)
    calibration = (run_dir / "calibration.json").read_bytes() if (run_dir / "calibration.json").exists() else None
    report = evaluate_run(run_dir, "all", data_dir=data)
    rows = sum(len(pd.read_parquet(data / f"{s}.parquet")) for s in ("train", "val", "test"))
    assert report["metrics"]["n"] == rows  # every row, not the run's row limits
    outside = report["outside_label_space"]
    assert outside["rows"] == report["metrics"]["unseen_gold"] > 0  # DRGs the run has no class for: errors
    space = Run.open(run_dir).label_space
    assert outside["drgs"] and not set(map(int, outside["drgs"])) & set(space.drgs)
    written = json.loads((run_dir / "eval" / data.name / "metrics_all.json").read_text())
    assert written["data"] == str(data.resolve()) and written["checkpoint"].startswith("checkpoints/")
    assert len(pd.read_parquet(run_dir / "eval" / data.name / "predictions_all.parquet")) == rows
    now = (run_dir / "calibration.json").read_bytes() if (run_dir / "calibration.json").exists() else None
    assert now == calibration  # other data never changes the temperature predict applies
    with pytest.raises(RunError, match="--split all scores the training rows too"):
        evaluate_run(run_dir, "all")


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--target-accuracy", "5"], "--target-accuracy must be in (0, 1]"),
        (["--base-rate", "-100"], "--base-rate is USD per unit of CMS weight and must be > 0"),
        (["--top-k", "0"], "--top-k must be >= 1"),
        (["--checkpoint", "nowhere.ckpt"], "checkpoint nowhere.ckpt does not exist"),
        (["--data", "nowhere"], "data folder nowhere does not exist"),
    ],
)
def test_evaluate_checks_options_before_scoring(tiny_runs, tmp_path, capsys, option, message):
    run_dir = copy_run(tiny_runs["two_label"][0], tmp_path / "run")
    evaluate.main(["--run", str(run_dir)])
    capsys.readouterr()
    written = {p: p.stat().st_mtime_ns for p in (run_dir / "eval").iterdir()}
    assert evaluate.main(["--run", str(run_dir), *option]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "eval").iterdir()} == written  # nothing rewritten


def test_a_broken_run_folder_is_named(tiny_runs, tmp_path, capsys):
    run_dir = copy_run(tiny_runs["two_label"][0], tmp_path / "run")
    config = run_dir / "config.yaml"
    good = config.read_text()
    config.write_text(good.replace("model:\n", "model:\n  - [unclosed\n", 1))
    assert evaluate.main(["--run", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{config} is not valid YAML (line " in err and "<unicode string>" not in err and err.count("\n") == 1
    with pytest.raises(RunError):
        evaluate.main(["--run", str(run_dir), "--debug"])
    config.write_text(good)
    (run_dir / "label_space.json").write_text("{oops")
    with pytest.raises(RunError, match="label_space.json is not valid JSON"):
        Run.open(run_dir)
    config.unlink()
    with pytest.raises(RunError, match="has no config.yaml"):
        Run.open(run_dir)
    with pytest.raises(RunError, match="is not a folder"):
        Run.open(tmp_path / "nowhere")
