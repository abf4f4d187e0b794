"""End to end on a tiny random model and a small synthetic corpus: train -> evaluate -> predict, configs, DDP, resume.

The synthetic corpus is built once per session into a temporary DRG_LLAMA_CACHE and shared by these tests.
"""

import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import asdict, is_dataclass
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
import yaml

from drg_llama.data.datamodule import DRGDataModule
from drg_llama.errors import UserError
from drg_llama.evaluate import evaluate_run
from drg_llama.models.backbone import BackboneConfig
from drg_llama.models.classifier import DRGClassifier
from drg_llama.predict import InputError, predict_file
from drg_llama.runs import Run
from drg_llama.train import (
    CONFIG_DIR,
    VARIANTS,
    DRGLightningCLI,
    main,
    nested_nulls,
    shipped_config,
    variant_args,
)
from tests.test_datamodule import rewrite_split
from tests.tiny import TINY_LLAMA

REPO = Path(__file__).resolve().parent.parent
TINY = str(CONFIG_DIR / "tiny.yaml")


@pytest.fixture(scope="module")
def runs(tiny_runs):
    """The session's tiny runs (conftest): one per variant, trained once."""
    return tiny_runs


@pytest.mark.parametrize("variant", ["single_label", "two_label"])
def test_train_writes_every_artifact(runs, variant):
    run_dir, results = runs[variant]
    for name in ("config.yaml", "run.json", "metrics.csv", "label_space.json", "test_metrics.json"):
        assert (run_dir / name).exists(), name
    baseline = json.loads((run_dir / "baseline" / "metrics.json").read_text())
    assert baseline["text_window"] == "head 64 tokens of the model's tokenizer"  # tiny.yaml: the model's window
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in checkpoints and any(c.startswith("best-") for c in checkpoints)
    metrics_csv = pd.read_csv(run_dir / "metrics.csv")
    assert "val/top1" in metrics_csv.columns and metrics_csv["train/loss"].notna().any()
    test = json.loads((run_dir / "test_metrics.json").read_text())
    record = json.loads((run_dir / "run.json").read_text())
    # the tested checkpoint is recorded relative to the run folder, so a copy of the folder finds its own weights
    assert test["checkpoint"] == record["tested_checkpoint"] and test["checkpoint"].startswith("checkpoints/best-")
    assert record["recipe"] == "classifier" and record["variant"] == variant and record["selected_on"] == "val"
    assert sum(record["train_drg_counts"].values()) == 48  # tiny.yaml's limit_train rows
    assert test["variant"] == variant
    assert {"top1", "top5", "macro_f1_present", "macro_auc", "base_acc", "severity_acc"} <= set(test["metrics"])
    assert set(results) == {f"{variant} (best on val)", "tf-idf + logistic regression", "majority class"}
    space = json.loads((run_dir / "label_space.json").read_text())
    assert space["variant"] == variant
    # the checkpoint holds only the trainable tensors (LoRA + score), not the frozen base
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all("lora_" in k or "score" in k for k in state)


@pytest.mark.parametrize("variant", ["single_label", "two_label"])
def test_evaluate_reproduces_test_metrics_without_text(runs, variant):
    run_dir, _ = runs[variant]
    report = evaluate_run(run_dir, "test")
    recorded = json.loads((run_dir / "test_metrics.json").read_text())["metrics"]
    assert report["metrics"]["top1"] == pytest.approx(recorded["top1"])
    assert report["metrics"]["n"] == recorded["n"]
    predictions = pd.read_parquet(run_dir / "eval" / "predictions.parquet")
    assert list(predictions.columns) == ["hadm_id", "subject_id", "gold_drg", "pred_drg", "top_drgs", "top_probs"]
    assert len(predictions) == recorded["n"]
    assert all(sum(p) <= 1 + 1e-5 and list(p) == sorted(p, reverse=True) for p in predictions["top_probs"])
    assert (predictions["pred_drg"] == [d[0] for d in predictions["top_drgs"]]).all()
    assert (run_dir / "eval" / "metrics.json").exists()


def test_predict_on_texts_and_mimic_file(runs, tmp_path):
    run_dir, _ = runs["two_label"]
    texts = tmp_path / "notes.csv"
    pd.DataFrame({"id": ["a", "b", "c"], "text": ["sepsis with acute kidney injury", "heart failure", "  "]}).to_csv(
        texts, index=False
    )
    out = predict_file(run_dir, texts, tmp_path / "pred.csv", top_k=3)
    written = pd.read_csv(tmp_path / "pred.csv")
    assert "text" not in written.columns
    assert list(written["id"].astype(str)) == ["a", "b", "c"]
    assert written.loc[2, "skipped"] == "empty_text"  # reported, not silently dropped
    assert written.loc[:1, ["drg_1", "drg_2", "drg_3"]].notna().all().all()
    assert (out.loc[:1, "prob_1"] >= out.loc[:1, "prob_2"]).all()

    mimic = tmp_path / "discharge.csv"
    pd.DataFrame(
        {
            "note_id": ["1-DS-1", "2-DS-1"],
            "hadm_id": ["1", "2"],
            "note_type": ["DS", "DS"],
            "text": ["Brief Hospital Course:\nTreated for pneumonia.\n\nDischarge Medications:\nnone", "no course"],
        }
    ).to_csv(mimic, index=False)
    predicted = predict_file(run_dir, mimic, tmp_path / "pred.parquet")
    assert predicted.loc[predicted["id"] == "1-DS-1", "drg_1"].notna().all()
    assert predicted.loc[predicted["id"] == "2-DS-1", "skipped"].item() == "no_hospital_course"

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(InputError, match="empty"):
        predict_file(run_dir, empty, tmp_path / "x.csv")


@pytest.mark.parametrize("config", sorted(p.relative_to(CONFIG_DIR) for p in CONFIG_DIR.rglob("*.yaml")))
def test_every_shipped_config_parses(config, capsys):
    path = CONFIG_DIR / config
    first = path.read_text().splitlines()[0]
    assert first.startswith("# python -m drg_llama."), f"{config} must open with the command that runs it"
    variant = next((v for v in VARIANTS if f"--variant {v}" in first), "two_label")
    overlay = [] if path == CONFIG_DIR / f"{variant}.yaml" else ["--config", str(path)]
    _, args = variant_args(["--variant", variant, *overlay, "--print_config"])
    with pytest.raises(SystemExit) as exit_:
        DRGLightningCLI(args)
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "backbone:" in printed and "class_path: drg_llama." in printed


def _flat(settings: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = list(value) if isinstance(value, tuple) else value
    return out


def _defaults(cls) -> dict:
    params = inspect.signature(cls.__init__).parameters.values()
    return _flat({p.name: asdict(p.default) if is_dataclass(p.default) else p.default for p in params})


@pytest.mark.parametrize("variant", ["sft", "grpo"])
def test_the_reasoner_defaults_are_the_shipped_configs(variant):
    """DRGReasoner() and ReasonerDataModule() train what configs/sft.yaml and grpo.yaml ship; a YAML value that
    differs from its default says so on its line. Backbone, data size, limits and the MS-DRG version are the demo's."""
    from drg_llama.data.reasoner import ReasonerDataModule
    from drg_llama.models.reasoner import DRGReasoner

    text = (CONFIG_DIR / f"{variant}.yaml").read_text()
    config = yaml.safe_load(text)
    sizing = {"backbone", "data_dir", "synthetic_n", "limit_train", "limit_val", "limit_test", "drg_version"}
    differing = set()
    for section, cls in (("model", DRGReasoner), ("data", ReasonerDataModule)):
        assert config[section]["class_path"] == f"{cls.__module__}.{cls.__name__}"
        defaults = _defaults(cls)
        for key, value in _flat(config[section]["init_args"]).items():
            if key.split(".")[0] not in sizing and value != defaults[key]:
                differing.add(key.split(".")[-1])
    marked = {line.split(":")[0].strip() for line in text.splitlines() if "# not the default" in line}
    assert differing == marked


def test_cli_errors_are_one_sentence(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match="unknown variant 'three_label'"):
        main(["--variant", "three_label"])
    with pytest.raises(SystemExit, match="unknown variant 'dpo'"):
        main(["--variant", "dpo"])
    monkeypatch.chdir(tmp_path)  # no runs here
    with pytest.raises(SystemExit) as exit_:
        main(["--variant", "sft", "--ckpt_path", "last"])
    err = capsys.readouterr().err
    expected = f"error: --ckpt_path last found no last.ckpt under {Path('runs/sft')}; start a fresh run instead\n"
    assert exit_.value.code == 2 and err == expected


def test_settings_a_recipe_does_not_read_are_refused(capsys):
    """The classifier's tokenisation settings do not exist for the reasoner (they used to be accepted and ignored)."""
    for option in ("--data.max_length", "--data.packing"):
        with pytest.raises(SystemExit) as exit_:
            main(["--variant", "sft", option, "64"])
        assert exit_.value.code == 2
        assert f"'{option.removeprefix('--data.')}' is not accepted" in capsys.readouterr().err


def test_a_null_inside_a_settings_group_is_none(capsys):
    """``--model.backbone.tokenizer null`` sets None (jsonargparse, under class_path, would pass the string "None")."""
    given = ["--model.backbone.tokenizer", "null", "--model.backbone.quantization=null", "--x", "null"]
    expected = ["--model.backbone", '{"tokenizer": null}', "--model.backbone", '{"quantization": null}', "--x", "null"]
    assert nested_nulls(given) == expected
    _, args = variant_args(["--variant", "two_label", "--config", TINY, "--model.backbone.tokenizer", "null"])
    with pytest.raises(SystemExit):
        DRGLightningCLI([*args, "--model.backbone.lora_r", "2", "--print_config"])
    backbone = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["backbone"]
    assert backbone["tokenizer"] is None and backbone["lora_r"] == 2 and backbone["name_or_path"] == "random"


def test_shipped_configs_are_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert shipped_config("configs/models/tiny.yaml") == str(CONFIG_DIR / "models" / "tiny.yaml")
    assert shipped_config("context/512.yaml") == str(CONFIG_DIR / "context" / "512.yaml")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text("data: {}")
    assert shipped_config("configs/tiny.yaml") == "configs/tiny.yaml"  # a file of the user's own wins
    assert shipped_config("missing.yaml") == "missing.yaml"  # left for LightningCLI to report


def _bad_data_folders(tmp_path: Path, prepared: Path) -> dict[str, tuple[list[str], str]]:
    """Training options that name an unusable data folder or value, with the message each must give."""
    not_prepared = tmp_path / "not_prepared"
    not_prepared.mkdir()
    empty = tmp_path / "empty"
    shutil.copytree(prepared, empty)
    rewrite_split(empty, "train", pd.read_parquet(empty / "train.parquet").iloc[:0])
    old = tmp_path / "old_version"
    shutil.copytree(prepared, old)
    manifest = json.loads((prepared / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "drg_version": "v40"}))
    return {
        "missing": (["--data.data_dir", str(tmp_path / "nowhere")], "does not exist"),
        "not prepared": (["--data.data_dir", str(not_prepared)], "is not a prepared folder (no manifest.json)"),
        "empty": (["--data.data_dir", str(empty)], "train.parquet has no rows"),
        "version": (["--data.data_dir", str(old)], "prepared with v40 but drg_version is v43"),
        "max_length": (["--data.max_length", "1"], "max_length must be >= 2"),
        "batch_size": (["--data.batch_size", "0"], "batch_size and eval_batch_size must be >= 1"),
        "one class": (["--data.data_dir", str(prepared), "--data.limit_train", "1"], "a single DRG"),
    }


def test_bad_data_options_stop_in_one_line(cache, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepared = DRGDataModule(synthetic_n=300).prepared_dir  # the tiny config's corpus (built once per session)
    for name, (args, message) in _bad_data_folders(tmp_path, prepared).items():
        with pytest.raises(SystemExit) as exit_:
            main(["--variant", "two_label", "--config", TINY, *args])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err, (name, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (name, err)
    assert not (tmp_path / "runs" / "two_label" / "version_0" / "run.json").exists()  # stopped before training
    with pytest.raises(UserError, match="max_length"):  # --debug: the exception itself, with its traceback
        main(["--variant", "two_label", "--config", TINY, "--data.max_length", "1", "--debug"])


def test_drg_llama_2023_split_trains_without_validation(cache, tmp_path, monkeypatch):
    """DRG-LLaMA's split has no validation rows: training must run, and the last weights are tested (never picked on
    test). Before, datasets refused the empty val.parquet ("Instruction 'train' corresponds to no data")."""
    from drg_llama.data.mimic import prepare

    raw = DRGDataModule(synthetic_n=300).prepared_dir.parent / "raw"  # the tiny config's corpus
    prepared = tmp_path / "paper"
    prepare(raw, prepared, split="drg_llama_2023")
    assert len(pd.read_parquet(prepared / "val.parquet")) == 0
    monkeypatch.chdir(tmp_path)
    results = main(
        ["--variant", "two_label", "--config", TINY, "--data.data_dir", str(prepared), "--run_baseline", "false"]
    )
    assert list(results) == ["two_label (last; no validation)"]
    run_dir = tmp_path / "runs" / "two_label" / "version_0"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["tested_checkpoint"] == "checkpoints/last.ckpt" and record["selected_on"] == "last"
    report = evaluate_run(run_dir)  # nothing to fit the temperature on: T stays 1, nothing breaks
    assert report["metrics"]["top1"] == pytest.approx(results["two_label (last; no validation)"]["top1"])
    assert report["calibration"]["temperature"] == 1.0 and report["calibration"]["n_fit"] == 0
    with pytest.raises(UserError, match="val.parquet has no rows"):
        evaluate_run(run_dir, "val")


# ----------------------------------------------------------------------------------------------------------------
# DDP and resume


DDP_DRIVER = textwrap.dedent(
    """
    import json, os, sys
    from drg_llama.train import main
    results = main(sys.argv[1:])
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    metrics = next(v for k, v in results.items() if "best on val" in k)
    with open(f"rank{rank}.json", "w") as fh:
        json.dump(metrics, fh)
    """
)


@pytest.mark.slow
def test_ddp_two_processes_agree(cache, runs, tmp_path):
    (tmp_path / "driver.py").write_text(DDP_DRIVER)
    env = {**os.environ, "DRG_LLAMA_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "driver.py",
        "--variant",
        "single_label",
        "--config",
        TINY,
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--run_baseline",
        "false",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 == rank1
    # every test row scored exactly once, although the sampler pads the ranks with repeated rows
    single_process = json.loads((runs["single_label"][0] / "test_metrics.json").read_text())["metrics"]
    assert rank0["n"] == single_process["n"]

    # The validation figures logged during training come from torchmetrics states summed over the two ranks; scoring
    # the same checkpoint on the same rows afterwards in one process with metrics.py must give the same figures.
    run_dir = tmp_path / "runs" / "single_label" / "version_0"
    logged = pd.read_csv(run_dir / "metrics.csv").dropna(subset=["val/top1"]).iloc[-1]
    evaluated = evaluate_run(run_dir, "val")["metrics"]
    for key in ("top1", "top5", "top10", "macro_f1_present", "ece", "base_acc", "severity_acc"):
        assert logged[f"val/{key}"] == pytest.approx(evaluated[key], abs=1e-6), key
    # AUROC in the loop is read from 400-bin log-probability histograms (no probabilities gathered) and metrics.py's
    # is exact; this untrained tiny model scores every class almost alike, so many scores tie within one bin.
    assert logged["val/macro_auc"] == pytest.approx(evaluated["macro_auc"], abs=0.02)


class Killed(RuntimeError):
    """Stands for the process dying right after the checkpoint of a step was written."""


class _KillAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


def _fit(tmp_path: Path, name: str, max_epochs: int, ckpt_path=None, kill_at=None):
    L.seed_everything(0)
    data = DRGDataModule(
        variant="two_label",
        tokenizer=None,
        max_length=64,
        batch_size=8,
        limit_train=48,
        limit_val=16,
        limit_test=16,
        synthetic_n=300,
    )
    backbone = BackboneConfig(
        name_or_path="random", random_init=TINY_LLAMA, tokenizer="byte", lora_r=4, lora_alpha=8, lora_dropout=0.0
    )
    model = DRGClassifier(backbone=backbone, label_space=data.label_space, learning_rate=0.01)
    data.set_tokenizer(model.tokenizer)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=1, save_last=True)
    callbacks = [checkpoint] + ([_KillAt(kill_at)] if kill_at else [])
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer, model


@pytest.mark.slow
def test_resume_mid_epoch_matches_uninterrupted_run(cache, tmp_path):
    full_trainer, full = _fit(tmp_path, "full", max_epochs=2)
    assert full_trainer.global_step == 12  # 48 rows / 8 = 6 steps per epoch

    with pytest.raises(Killed):
        _fit(tmp_path, "killed", max_epochs=2, kill_at=9)  # mid-way through epoch 2
    # Lightning runs checkpoint callbacks last, so the kill during step 9 left step 8's checkpoint: 2 of epoch 2's
    # 6 batches were trained, 4 remain.
    assert torch.load(tmp_path / "killed" / "last.ckpt", weights_only=True)["global_step"] == 8
    resumed_trainer, resumed = _fit(tmp_path, "resumed", max_epochs=2, ckpt_path=str(tmp_path / "killed" / "last.ckpt"))
    assert resumed_trainer.global_step == full_trainer.global_step
    full_state = {n: p for n, p in full.named_parameters() if p.requires_grad}
    for name, param in resumed.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, full_state[name], msg=f"{name} differs after resume")


def test_load_model_rebuilds_the_same_frozen_base(runs):
    run = Run.open(runs["two_label"][0])
    first, _ = run.load_model()
    torch.manual_seed(123)  # whatever the global state, the rebuild is seeded as the training run was
    second, _ = run.load_model()
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name


def test_cli_resume_continues_the_same_run_directory(runs, tmp_path):
    """Extends a copy of the two_label run by one epoch."""
    workdir = tmp_path / "work"
    shutil.copytree(runs["two_label"][0].parent.parent.parent, workdir)
    run_dir = workdir / "runs" / "two_label" / "version_0"
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        main(
            [
                "--variant",
                "two_label",
                "--config",
                TINY,
                "--ckpt_path",
                "last",
                "--trainer.max_epochs",
                "2",
                "--run_baseline",
                "false",
            ]
        )
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"]  # no new version, no "0" folder
    metrics = pd.read_csv(run_dir / "metrics.csv")
    trained = metrics[metrics["train/loss"].notna()]
    assert set(trained["epoch"]) == {0, 1}  # the first epoch's rows survive, the second epoch's are appended
    assert trained["step"].is_monotonic_increasing
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12


def test_a_resumed_sweep_point_keeps_its_metrics_history(cache, tmp_path):
    """A sweep point stopped after its last checkpoint resumes into its own folder, whose metrics.csv keeps the rows
    of the steps before the resume (a sweep point's folder is not named version_N)."""
    from drg_llama.sweep import parse_grid, run_sweep

    grid, out = parse_grid(["data.max_length=32"]), tmp_path / "sweep"
    run_sweep("two_label", grid, ["--config", TINY, "--run_baseline", "false"], out)
    point = out / "data.max_length-32"
    first = pd.read_csv(point / "metrics.csv").dropna(subset=["train/loss"])
    (point / "test_metrics.json").unlink()  # stopped after its last checkpoint, before the test
    run_sweep("two_label", grid, ["--config", TINY, "--run_baseline", "false", "--trainer.max_epochs", "2"], out)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [point.name]
    trained = pd.read_csv(point / "metrics.csv").dropna(subset=["train/loss"])
    assert set(trained["epoch"]) == {0, 1} and trained["step"].is_monotonic_increasing
    pd.testing.assert_frame_equal(trained[trained["epoch"] == 0][["step", "train/loss"]], first[["step", "train/loss"]])
    assert json.loads((point / "sweep_point.json").read_text())["resumed"]


def test_qlora_cli_trains_a_local_pretrained_folder_with_packing(cache, tmp_path, monkeypatch):
    """The whole QLoRA path through the CLI: 4-bit base from a local folder, LoRA, packed batches, test, adapter.

    bitsandbytes runs its CPU fallback here; on a GPU the same command runs its CUDA kernels.
    """
    from tests.test_backbone import save_tiny_pretrained

    folder = save_tiny_pretrained(tmp_path / "pretrained")
    monkeypatch.chdir(tmp_path)
    overrides = ["--model.backbone.random_init", "null", "--model.backbone.tokenizer", "null"]
    overrides += ["--model.backbone.name_or_path", folder, "--model.backbone.quantization", "4bit"]
    overrides += ["--model.backbone.dtype", "bf16", "--data.packing", "true", "--data.pack_tokens", "128"]
    results = main(["--variant", "two_label", "--config", TINY, *overrides, "--trainer.max_steps", "3"])
    run_dir = tmp_path / "runs" / "two_label" / "version_0"
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    config = (run_dir / "config.yaml").read_text()
    assert "quantization: 4bit" in config and "packing: true" in config
    assert 0.0 <= results["two_label (best on val)"]["top1"] <= 1.0
