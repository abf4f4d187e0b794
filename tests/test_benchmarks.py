"""Smoke test of benchmarks/train_throughput.py on CPU with a tiny model, plus its workload and FLOP arithmetic.

Run: pytest tests/test_benchmarks.py   (the end-to-end run is marked slow: -m "not slow" skips it)
"""

import importlib.util
import json
import math
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
    # DESIGN.md §4: 24.8 samples/s at 512 tokens on the LLaMA-7B shape is about 42% of 790 TFLOP/s.
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
