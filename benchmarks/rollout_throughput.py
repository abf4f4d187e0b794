"""GRPO rollout throughput: our sampler (one prefill per prompt, host checks every few tokens) vs HF ``generate``.

    python benchmarks/rollout_throughput.py --json rollout.json          # H100/H200: Qwen2.5-7B shape, 8 x G=8
    python benchmarks/rollout_throughput.py --device cpu --shape tiny-qwen2 --prompts 2 --group 2 \\
        --prompt-tokens 32 --new-tokens 8                                  # CPU smoke run, seconds
    python benchmarks/rollout_throughput.py --profile 25                 # and the top 25 operators of our side

Both sides sample from the same model object, in the same process, on the same device: a random-initialised model
of the real shape (throughput does not depend on the weights' values) wrapped with LoRA r=8 on q/v as GRPO trains
it, bf16 on CUDA, SDPA, in eval mode. Each draws ``group`` completions for each of ``prompts`` prompts of
``prompt-tokens`` tokens, exactly ``new-tokens`` tokens each (no stop: our eos is an id that never occurs, the
reference gets ``min_new_tokens``), at temperature 1 with no top-k/top-p, which is what GRPO samples from.

* **ours**: ``drg_llama.models.generation.sample_completions``: each prompt is prefilled once and its KV cache
  repeated G times; eos is tracked on the device and the host looks every ``CHECK_EVERY`` tokens; on CUDA the
  decode steps run over a preallocated cache as one CUDA graph each (``StaticDecoder``).
* **ours, dynamic cache**: the same with ``kv_cache="dynamic"`` (transformers' growing cache, eager steps), to
  show what the graph is worth.
* **reference**: ``model.generate(num_return_sequences=G, do_sample=True)``, what a user writes (and what TRL's
  GRPOTrainer calls without vLLM): the prompts are repeated G times before a prefill of every copy.

Every side runs once untimed (same shapes: kernels chosen, allocator grown), then ``--repeats`` timed runs between
``torch.cuda.synchronize`` calls; the median is reported. Reported: completions/s, new tokens/s, the ratio, peak
memory, and the decode floor: each decode step must read every weight once, so ``weight bytes / bandwidth`` per
step bounds completions/s from above (``--bandwidth-tbs``, 4.3 TB/s measured on an H200).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.train_throughput import SHAPES, _free, _peak_gb, _reset_peak, _sync, report_header  # noqa: E402

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random-initialised causal LM of ``shape`` with LoRA (PEFT), built directly on ``device``, in eval mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(SHAPES[shape])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config.pad_token_id = 0
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA)).eval()


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, list[float], Any]:
    out = fn()  # warm-up: the same shapes as the timed runs
    times = []
    _sync(device)
    _reset_peak(device)
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


def profile_ops(fn, device: torch.device, top: int) -> list[dict[str, Any]]:
    """The ``top`` operators of one more run of ``fn`` by self time on the device (the host where there is none).

    What a decode step spends its time on, which the rates alone cannot say: kernels (device time), or the host
    issuing them (host time far above device time), or synchronisations (``cudaStreamSynchronize``, ``item``).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        device_us = getattr(e, "self_device_time_total", 0.0) or 0.0
        rows.append(
            {
                "op": e.key[:120],
                "calls": int(e.count),
                "self_device_ms": device_us / 1e3,
                "self_cpu_ms": e.self_cpu_time_total / 1e3,
            }
        )
    key = "self_device_ms" if device.type == "cuda" else "self_cpu_ms"
    return sorted(rows, key=lambda r: r[key], reverse=True)[:top]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time both samplers; returns the report (also printed as one table line per side and the ratio)."""
    from drg_llama.models.generation import CHECK_EVERY, sample_completions

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here; run with --device cpu --shape tiny-qwen2 for a smoke test.")
    if args.shape not in SHAPES:
        raise SystemExit(f"unknown shape {args.shape!r}; choose from {sorted(SHAPES)}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.shape, device, dtype)
    vocab = SHAPES[args.shape]["vocab_size"]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    prompts = torch.randint(3, vocab, (args.prompts, args.prompt_tokens), device=device, generator=gen)
    mask = torch.ones_like(prompts)
    n, g, new = args.prompts * args.group, args.group, args.new_tokens

    def ours(kv_cache: str = "auto") -> torch.Tensor:
        out = sample_completions(
            model, prompts, mask, g, new, 1.0, eos_token_id=-1, pad_token_id=0, generator=gen, kv_cache=kv_cache
        )
        return out["completion_ids"]

    def reference() -> torch.Tensor:
        out = model.generate(
            input_ids=prompts,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            num_return_sequences=g,
            max_new_tokens=new,
            min_new_tokens=new,
            eos_token_id=2,
            pad_token_id=0,
        )
        return out[:, prompts.shape[1] :]

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor_s = new * weight_bytes / (args.bandwidth_tbs * 1e12)  # every decode step reads every weight once
    report: dict[str, Any] = {
        **report_header(args, device),
        "check_every": CHECK_EVERY,
        "weight_gb": weight_bytes / 2**30,
        "decode_floor_completions_per_s": n / floor_s if device.type == "cuda" else float("nan"),
        "sides": {},
    }
    sides = (("ours", ours), ("ours_dynamic_cache", lambda: ours("dynamic")), ("reference", reference))
    for name, fn in sides:
        try:
            seconds, times, out = _timed(fn, device, args.repeats)
            if tuple(out.shape) != (n, new):
                raise RuntimeError(f"{name} returned completions of shape {tuple(out.shape)}, expected {(n, new)}")
            side = {
                "seconds": seconds,
                "times": times,
                "completions_per_s": n / seconds,
                "new_tokens_per_s": n * new / seconds,
                "ms_per_decode_step": 1e3 * seconds / new,
                "peak_mem_gb": _peak_gb(device),
            }
        except Exception as err:  # noqa: BLE001 - report and go on to the other side
            side = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
        report["sides"][name] = side
        print(f"{name:>18}: {json.dumps(side, default=str)}")
        _free(device)
    if args.profile:
        report["profile"] = profile_ops(ours, device, args.profile)
        for row in report["profile"]:
            print(
                f"  {row['self_device_ms']:10.1f} ms device {row['self_cpu_ms']:10.1f} ms host"
                f" {row['calls']:7d}x  {row['op']}"
            )
    rate = {name: side.get("completions_per_s", float("nan")) for name, side in report["sides"].items()}
    report["ratio"] = rate["ours"] / rate["reference"]
    report["ratio_dynamic_cache"] = rate["ours_dynamic_cache"] / rate["reference"]
    print(
        f"{args.shape}, {args.prompts} prompts x G={g}, {args.prompt_tokens}-token prompts, {new} new tokens: "
        f"ours {rate['ours']:.2f} completions/s (dynamic cache {rate['ours_dynamic_cache']:.2f}), reference "
        f"{rate['reference']:.2f}; ratio {report['ratio']:.2f} ({report['ratio_dynamic_cache']:.2f})"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--shape", default="qwen2.5-7b", help=f"one of {sorted(SHAPES)}")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per rollout batch")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side (median reported)")
    parser.add_argument("--bandwidth-tbs", type=float, default=4.3, help="device memory bandwidth for the floor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="after timing, profile one more run of ours: top N ops"
    )
    parser.add_argument("--json", default=None, help="also write the report here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
