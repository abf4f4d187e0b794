"""``DRGReasoner``: a causal LM with LoRA that writes a rationale and an MS-DRG — SFT cold start, then GRPO.

    python -m drg_llama.train --variant sft                                           # CPU demo on the embedded data
    python -m drg_llama.train --variant grpo --model.init_adapter runs/sft/version_0  # starts from the SFT adapter

Output format (parsed in ``rewards.py``)::

    <think>The principal diagnosis is … is an MCC … gives DRG 291.</think><answer>DRG 291: Heart Failure …</answer>

**Prompt.** The tokenizer's chat template renders a fixed system instruction (what MS-DRG, CC and MCC mean and the
output format) and the hospital course. The note alone is truncated to ``max_note_tokens`` (head, tail or head and
tail); the instruction never is. The template is rendered once around a placeholder and the note's ids are spliced
in, so truncation happens on token ids. A tokenizer without a chat template (the byte tokenizer of tests) uses
``PLAIN_TEMPLATE``.

**SFT** (``stage="sft"``): cross-entropy on the completion tokens only (prompt and padding are labelled -100).
Targets are grounded rationales built from the admission's codes and the grouper's output
(``drg_llama.data.rationales``), or answer-only (``<think></think><answer>…</answer>``) with ``rationale="answer_only"``
or where an admission has no usable codes.

**GRPO** (``stage="grpo"``, manual optimisation), per training step with B prompts:

1. Sample G completions per prompt with ``sample_completions``: the prompt's prefill runs ONCE per prompt and its
   KV cache is repeated G times (``DynamicCache.batch_repeat_interleave``), not G prefills.
2. Score them with the reward functions (TRL signature) -> rewards [B*G, F]; weighted sum -> [B*G].
3. ``group_advantages``: (r - group mean) / (group std + 1e-4), or no std scaling (Dr. GRPO), or batch std;
   a zero-variance group gets advantage 0.
4. ``clipped_token_loss``: PPO-style clipped ratio per token with log-probs at the sampling temperature, optional
   k3 KL to a reference, summed over tokens and divided by the number of completion tokens of the WHOLE generation
   batch, so micro-batches add up to the full-batch gradient (TRL's ``loss_type="dapo"``).
5. One optimizer step per generation batch (``grpo_iterations`` > 1 reuses the samples for more steps; then the
   old log-probs are computed once before the first step and the clip matters).

**KL reference.** With ``init_adapter_mode="merge"`` (default) the SFT adapter is merged into the base weights and
GRPO trains a fresh LoRA on top, so the reference (the SFT policy) is the same model with the adapter disabled: no
second copy. With ``"continue"`` GRPO keeps training the SFT adapter itself, so a frozen copy of the SFT model is kept
as the reference (twice the memory), only when ``beta > 0``.

The GRPO math is plain functions here, tested on literal tensors in ``tests/test_grpo_math.py`` and cross-checked
against ``trl.GRPOTrainer`` in ``tests/test_reasoner.py``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from drg_llama.data.tokenization import truncate_ids
from drg_llama.drg import LabelSpace, resolve_version
from drg_llama.metrics import f1_scores, score_predictions
from drg_llama.models.backbone import (
    BackboneConfig,
    build_causal_lm_backbone,
    check_trainable_tensors,
    check_training_setup,
    keep_trainable_fp32,
    keep_trainable_tensors,
    save_adapter,
)
from drg_llama.models.rewards import (
    REWARD_FUNCTIONS,
    ParsedAnswer,
    answer_closed,
    format_answer,
    parse_answer,
    score_answers,
)

logger = logging.getLogger(__name__)

INSTRUCTION = (
    "You assign the Medicare MS-DRG ({version}) of a hospital stay from its brief hospital course. "
    "The principal diagnosis sets the major diagnostic category (MDC) and the base DRG; an operating-room procedure "
    "makes the DRG surgical. Secondary diagnoses set the severity: a CC is a complication or comorbidity, an MCC a "
    "major one, and a CC or MCC does not count when the principal diagnosis excludes it (CC exclusions). Reason "
    "step by step inside <think></think>, then answer as <answer>DRG NNN: TITLE</answer>."
)
#: Prompt layout for tokenizers without a chat template (the byte tokenizer of tests).
PLAIN_TEMPLATE = "### Instruction\n{instruction}\n\n### Hospital course\n{note}\n\n### Response\n"
_NOTE = "\x00NOTE\x00"  # placeholder the template is rendered around; never appears in a note
SCALE_REWARDS = ("group", "batch", "none")
#: The test metrics logged to metrics.csv and printed at the end of a run (metrics.json holds them all).
SUMMARY_METRICS = (
    "top1",
    "format_valid",
    "invalid_drg",
    "base_acc",
    "severity_acc",
    "pass_at_k",
    "reward_greedy",
    "top_answer_share",
)
#: The metrics of each validation check (the same fixed notes every time), logged as ``val/<key>``: of greedy
#: answers, and ``reward_sampled`` only with ``val_samples``.
VAL_METRICS = (
    "reward_greedy",
    "reward_sampled",
    "top1",
    "base_acc",
    "severity_acc",
    "mdc_acc",
    "invalid_drg",
    "top_answer_share",
)


# ----------------------------------------------------------------------------------------------------------------
# Prompts


def prompt_parts(tokenizer, instruction: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the note: the rendered chat template (or ``PLAIN_TEMPLATE``) split at the note.

    Args:
        tokenizer: Any HF tokenizer; its ``chat_template`` is used when set.
        instruction: The system instruction (kept whole).

    Returns:
        ``(prefix_ids, suffix_ids)``; a prompt is ``prefix + note_ids + suffix`` and ends where the answer starts.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "system", "content": instruction},
            {"role": "user", "content": f"Hospital course:\n{_NOTE}"},
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos: list[int] = []  # the template writes its own special tokens
    else:
        text = PLAIN_TEMPLATE.format(instruction=instruction, note=_NOTE)
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    before, after = text.split(_NOTE)
    encode = tokenizer(add_special_tokens=False, text=[before, after])["input_ids"]
    return bos + list(encode[0]), list(encode[1])


def build_prompts(
    tokenizer, texts: Sequence[str], parts: tuple[list[int], list[int]], max_note_tokens: int, truncation: str
) -> list[list[int]]:
    """Prompt ids per note: the note's ids truncated to ``max_note_tokens`` between the template parts."""
    notes = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [parts[0] + truncate_ids(ids, max_note_tokens, truncation) + parts[1] for ids in notes]


def target_text(drg_code: int, version: str, rationale: str | None) -> str:
    """SFT target: ``<think>rationale</think><answer>DRG NNN: TITLE</answer>`` (empty think when answer-only)."""
    return f"<think>{rationale or ''}</think>{format_answer(drg_code, version)}"


# ----------------------------------------------------------------------------------------------------------------
# Batching


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, P]`` ids and mask, left-padded so every prompt ends at the last column (where generation starts)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def sft_batch(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt + completion, labels -100 everywhere but the completion tokens.

    Left padding puts every completion at the right edge, so the loss needs logits for the last
    ``max completion length + 1`` positions only (``logits_to_keep``), not for the whole prompt: with a 49k
    vocabulary the full-sequence logits would dominate the step's memory and time.
    """
    seqs = [list(r["prompt"]) + list(r["completion"]) for r in rows]
    ids, mask = left_pad(seqs, pad_id)  # [B, T]
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        n = len(r["completion"])
        labels[i, ids.shape[1] - n :] = torch.as_tensor(list(r["completion"]))
    width = max(len(r["completion"]) for r in rows)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "completion_width": torch.tensor(width)}


def collate(rows: list[dict], pad_id: int) -> dict[str, Any]:
    """Batch of examples: left-padded prompts (generation), the SFT tensors, and the label columns."""
    prompt_ids, prompt_mask = left_pad([r["prompt"] for r in rows], pad_id)
    batch: dict[str, Any] = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "drg_code": torch.tensor([r["drg_code"] for r in rows], dtype=torch.long),
        "row": torch.tensor([r["row"] for r in rows], dtype=torch.long),
    }
    if all(r.get("completion") is not None for r in rows):
        batch.update(sft_batch(rows, pad_id))
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Generation with one shared prefill per prompt


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding does not shift positions)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


#: Sampling checks on the host (stop tags, all rows done, non-finite logits) once per this many tokens: each check
#: is a device-to-host sync, and the GPU runs ahead between them. A row's completion still ends at the exact token.
CHECK_EVERY = 8


class NonFiniteLogitsError(FloatingPointError):
    """The model produced NaN or infinite logits while sampling."""


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    stop: AnswerStop | None = None,
    check_every: int = CHECK_EVERY,
    kv_cache: KVCacheMode = "auto",
) -> dict[str, torch.Tensor]:
    """Sample ``num_samples`` completions per prompt, prefilling each prompt once.

    The prompt's KV cache is computed for B rows and then repeated G times along the batch (row order
    ``[p0 s0, p0 s1, …, p1 s0, …]``, as ``repeat_interleave``), so the prefill costs B forwards, not B*G.

    The loop stays on the device: eos is detected on token ids, and the host looks at the rows only every
    ``check_every`` tokens (stop tags, whether every row is done, non-finite logits). A row that ended between two
    checks keeps being fed tokens until the next one; they are cut off, and since every row draws its own random
    numbers the other rows are unaffected, so the result equals checking after every token (``check_every=1``).
    Non-finite logits never reach ``torch.multinomial``: on a GPU that is a device-side assert that poisons the
    process; here the row samples from a uniform stand-in and the next check raises ``NonFiniteLogitsError``.

    Args:
        model: Causal LM (PEFT-wrapped or plain), in eval mode (gradient checkpointing drops the KV cache in
            training mode).
        prompt_ids: ``[B, P]`` left-padded prompts.
        prompt_mask: ``[B, P]``.
        num_samples: G completions per prompt.
        max_new_tokens: Completion budget; rows still running then are ``truncated``.
        temperature: Sampling temperature; 0 means greedy.
        eos_token_id: Ends a completion (kept as its last token).
        pad_token_id: Written after a completion ended.
        generator: Optional RNG for reproducible sampling.
        stop: Optional ``AnswerStop``: rows end at the token that closes ``</answer>`` (nothing after it is read, so
            sampling it only costs time and drifts).
        check_every: Tokens between host checks (>= 1).
        kv_cache: ``dynamic`` (transformers' growing cache), ``static`` (``StaticDecoder``: preallocated cache and
            mask), ``graph`` (static, each decode step replayed as one CUDA graph), or ``auto``: ``graph`` on a CUDA
            device, else ``dynamic``. A static setup or graph capture that fails falls back with a warning.

    Returns:
        ``completion_ids`` [B*G, C], ``completion_mask`` [B*G, C] (1 up to and including eos or the stop),
        ``truncated`` [B*G] bool, ``first_logits`` [B*G, V] (the distribution of the first token, for tests);
        C is the longest completion.
    """
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    g = num_samples
    pos = positions(prompt_mask)  # [B, P]
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    if cache is None:
        raise RuntimeError("the model returned no KV cache; sample in eval mode (gradient checkpointing drops it)")
    cache.batch_repeat_interleave(g)  # [B, …] -> [B*G, …]: the shared prefill
    logits = out.logits[:, -1].float().repeat_interleave(g, dim=0)  # [B*G, V]
    first_logits = logits.clone()
    n, p, device = logits.shape[0], prompt_mask.shape[1], logits.device
    decoder = StaticDecoder.build(model, cache, prompt_mask.repeat_interleave(g, dim=0), max_new_tokens, kv_cache)
    if decoder is not None:
        out = cache = None  # the prompt's keys/values now live in the decoder's preallocated cache
    not_ended = max_new_tokens + 1
    mask = torch.ones((n, p + max_new_tokens), dtype=prompt_mask.dtype, device=device)  # [B*G, P+C], preallocated
    mask[:, :p] = prompt_mask.repeat_interleave(g, dim=0)
    tokens = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=device)  # [B*G, C]
    ended = torch.full((n,), not_ended, dtype=torch.long, device=device)  # [B*G] completion length once ended
    non_finite = torch.zeros((), dtype=torch.bool, device=device)
    last = pos[:, -1].repeat_interleave(g, dim=0)  # [B*G]
    uniform = torch.full_like(logits[:1], 1.0 / logits.shape[-1])  # [1, V] stand-in for a non-finite row
    checked = 0  # tokens [0, checked) were seen by the host's stop check
    length = 0
    for step in range(max_new_tokens):
        if temperature > 0:
            probs = (logits / temperature).softmax(-1)  # a NaN/inf logit makes its row NaN
            bad = probs.isnan().any(-1, keepdim=True)  # [B*G, 1]
            nxt = torch.multinomial(torch.where(bad, uniform, probs), 1, generator=generator).squeeze(-1)
        else:
            bad = logits.isnan().any(-1, keepdim=True) | logits.isposinf().any(-1, keepdim=True)
            nxt = logits.argmax(-1)
        non_finite |= bad.any()
        live = ended == not_ended  # [B*G] as far as the device knows
        nxt = torch.where(live, nxt, torch.full_like(nxt, pad_token_id))
        tokens[:, step] = nxt
        ended = torch.where(live & (nxt == eos_token_id), step + 1, ended)
        length = step + 1
        if length % check_every == 0 or length == max_new_tokens:
            if bool(non_finite):
                raise NonFiniteLogitsError(
                    f"the model produced NaN or infinite logits at completion token {length}; its weights or inputs "
                    "have diverged (check the learning rate and train/loss, and use bf16-mixed rather than fp16)"
                )
            if stop is not None:
                ended = stop.end_rows(tokens, ended, not_ended, checked, length)
            checked = length
            if not bool((ended == not_ended).any()) or length == max_new_tokens:
                break
        last = last + 1
        if decoder is not None:
            logits = decoder.step(nxt, last, p + length - 1)
            continue
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask[:, : p + length],
            position_ids=last[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1].float()
    truncated = ended == not_ended
    lengths = torch.where(truncated, length, ended)  # [B*G]
    width = int(lengths.max()) if n else 0
    completion_mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()  # [B*G, C]
    completion_ids = torch.where(completion_mask.bool(), tokens[:, :width], pad_token_id)
    return {
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "truncated": truncated,
        "first_logits": first_logits,
    }


KVCacheMode = Literal["auto", "dynamic", "static", "graph"]
#: Eager decode steps before a CUDA graph is captured (libraries allocate their workspaces on first use).
GRAPH_WARMUP_STEPS = 2


class StaticDecoder:
    """One decode step at a time over a preallocated KV cache and mask, optionally replayed as a CUDA graph.

    transformers' dynamic cache grows by concatenation and its 2-D mask is turned into a 4-D mask on every step;
    a 7B model's decode step then costs tens of kernel launches per layer issued from Python, several times the
    ~3.5 ms an H200 needs to read the weights once. Here the cache (``StaticCache``), the additive 4-D mask
    ``[N, 1, 1, P+C]`` and the input buffers have fixed addresses, so after ``GRAPH_WARMUP_STEPS`` eager steps the
    whole forward is captured once and each later token is one ``graph.replay()``. Sampling stays outside the
    graph. A graph lives for one ``sample_completions`` call, so weights updated between GRPO steps are read fresh.
    """

    def __init__(self, model: torch.nn.Module, cache, prompt_mask: torch.Tensor, max_new_tokens: int, graph: bool):
        from transformers import StaticCache

        layers = cache.layers
        dtype, device = layers[0].keys.dtype, layers[0].keys.device
        n, p = prompt_mask.shape
        self.cache = StaticCache(config=model.config, max_cache_len=p + max_new_tokens)
        for i, layer in enumerate(layers):
            self.cache.update(layer.keys, layer.values, i)  # the prompt's keys/values at positions [0, P)
        self.mask = torch.full((n, 1, 1, p + max_new_tokens), torch.finfo(dtype).min, dtype=dtype, device=device)
        self.mask[:, 0, 0, :p].masked_fill_(prompt_mask.bool(), 0.0)  # [N, 1, 1, P+C], 0 where a key is visible
        self.ids = torch.zeros((n, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((n, 1), dtype=torch.long, device=device)
        self.model, self.use_graph, self.steps = model, graph, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: torch.Tensor | None = None

    @classmethod
    def build(cls, model, cache, prompt_mask, max_new_tokens: int, mode: str) -> StaticDecoder | None:
        """The decoder ``mode`` asks for on this device (None: keep the dynamic cache)."""
        on_cuda = prompt_mask.device.type == "cuda"
        if mode == "dynamic" or (mode == "auto" and not on_cuda):
            return None
        try:
            return cls(model, cache, prompt_mask, max_new_tokens, graph=mode != "static" and on_cuda)
        except Exception as err:  # noqa: BLE001 - an unusual cache layout: the dynamic cache still works
            logger.warning(
                "static KV cache unavailable (%s: %s); decoding with the dynamic cache", type(err).__name__, err
            )
            return None

    def _forward(self) -> torch.Tensor:
        out = self.model(
            input_ids=self.ids,
            attention_mask=self.mask,
            position_ids=self.positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1].float()  # [N, V]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, column: int) -> torch.Tensor:
        """Logits ``[N, V]`` after feeding ``tokens`` [N] at ``positions`` [N], written to cache slot ``column``.

        The returned tensor is overwritten by the next step when a graph is in use.
        """
        self.ids.copy_(tokens[:, None])
        self.positions.copy_(positions[:, None])
        self.mask[:, 0, 0, column] = 0.0  # the new token sees itself; later slots stay masked
        self.steps += 1
        # Autocast's cast cache would hand the graph copies made during capture: no caching while decoding.
        autocast = contextlib.nullcontext()
        if torch.is_autocast_enabled(self.ids.device.type):
            autocast = torch.autocast(self.ids.device.type, torch.get_autocast_dtype(self.ids.device.type), True, False)
        with autocast:
            if not self.use_graph:
                return self._forward()
            if self.graph is None:
                if self.steps <= GRAPH_WARMUP_STEPS:
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        logits = self._forward()
                    torch.cuda.current_stream().wait_stream(side)
                    return logits
                try:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        self.graph_logits = self._forward()  # recorded, not run: the cache does not move here
                    self.graph = graph
                except Exception as err:  # noqa: BLE001 - a kernel that cannot be captured: stay eager
                    logger.warning("CUDA graph capture failed (%s: %s); decoding eagerly", type(err).__name__, err)
                    self.use_graph = False
                    return self._forward()
            self.graph.replay()
            return self.graph_logits


class AnswerStop:
    """Ends sampled rows at the token that closes ``</answer>`` (the reasoner's output reads nothing after it).

    It reads decoded text, not token ids, because ``</answer>`` tokenizes differently after different words.
    ``sample_completions`` calls ``end_rows`` every few tokens; it decodes only the new tokens of the rows still
    running, plus ``lookback`` tokens before them (twice the tag's own token count, room for the spaced and cased
    variants the parser accepts), and, for the rare row that closed the tag, finds the exact token.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lookback = 2 * len(tokenizer("</answer>", add_special_tokens=False)["input_ids"]) + 2

    def first_close(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, t]`` token windows -> ``[N]`` long: each row's shortest prefix that closes the tag, 0 if none does."""
        rows = tokens.tolist()
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)

        def closes(row: list[int], t: int) -> bool:
            return answer_closed(self.tokenizer.decode(row[:t], skip_special_tokens=True))

        found = [
            next(t for t in range(1, len(row) + 1) if closes(row, t)) if answer_closed(text) else 0
            for row, text in zip(rows, texts)
        ]
        return torch.tensor(found, dtype=torch.long)

    def end_rows(
        self, tokens: torch.Tensor, ended: torch.Tensor, not_ended: int, checked: int, length: int
    ) -> torch.Tensor:
        """``ended`` with the running rows that closed the tag in tokens ``[checked, length)`` set to their length."""
        running = (ended == not_ended).nonzero().squeeze(-1)  # [k]
        if running.numel() == 0:
            return ended
        start = max(0, checked - self.lookback)
        close = self.first_close(tokens[running, start:length]).to(ended.device)  # [k]
        return ended.index_put((running,), torch.where(close > 0, start + close, ended[running]))


def answer_stop(tokenizer) -> AnswerStop:
    """The stop rule of the reasoner's sampling: end at ``</answer>``."""
    return AnswerStop(tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# GRPO math (plain functions, tested on literal tensors)


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) under ``softmax(logits / temperature)``: ``[N, T, V]``, ``[N, T]`` -> ``[N, T]``.

    The loss must score tokens under the distribution they were sampled from, hence the temperature.
    """
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    return scaled.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def combine_rewards(per_function: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over reward functions ``[N, F]`` -> ``[N]``, skipping NaN (None); NaN where all are NaN."""
    total = (per_function * weights[None, :]).nansum(dim=1)  # [N]
    return torch.where(torch.isnan(per_function).all(dim=1), torch.full_like(total, math.nan), total)


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased standard deviation ignoring NaN (NaN with fewer than two values), as TRL's ``nanstd``."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=dim is not None)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=dim is not None)
    if dim is not None:
        var, count = var.squeeze(dim), count.squeeze(dim)
    return torch.where(count > 1, (var * count / (count - 1).clamp(min=1)).sqrt(), torch.full_like(var, math.nan))


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages of GRPO.

    Args:
        rewards: ``[N]`` rewards, N = prompts x group_size, grouped consecutively; NaN = unscorable.
        group_size: G samples per prompt (>= 2).
        scale: ``group`` divides by the group's std (GRPO), ``batch`` by the std of all rewards, ``none`` not at all
            (Dr. GRPO: std scaling favours prompts that are too easy or too hard).
        eps: Added to the std, so a zero-variance group gets advantage 0 / eps = 0 rather than NaN.

    Returns:
        ``(advantages [N], zero_std [N] bool)``; unscorable rows get advantage 0. Stds are unbiased (Bessel), as TRL.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale must be one of {SCALE_REWARDS}, got {scale!r}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"need groups of >= 2 samples that divide {rewards.numel()} rewards, got {group_size}")
    grouped = rewards.view(-1, group_size)  # [B, G]
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)  # [N]
    group_std = _nanstd(grouped, dim=1).repeat_interleave(group_size)  # [N]
    advantages = rewards - mean
    if scale == "group":
        advantages = advantages / (group_std + eps)
    elif scale == "batch":
        advantages = advantages / (_nanstd(rewards) + eps)
    zero_std = torch.isclose(group_std, torch.zeros_like(group_std))
    return torch.nan_to_num(advantages, nan=0.0), zero_std


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased for samples of pi)."""
    delta = ref_logps - logps
    return delta.exp() - delta - 1


def clipped_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    num_tokens: float | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Clipped surrogate loss per token, normalised by a token count.

    loss = sum_t mask * ( -min(r A, clip(r, 1-eps_low, 1+eps_high) A) + beta KL_t ) / num_tokens,
    with r = exp(logps - old_logps).

    Args:
        logps: ``[N, T]`` log-probs of the completion tokens under the current policy (with grad).
        old_logps: ``[N, T]`` under the sampling policy (``logps.detach()`` when there is one step per batch).
        advantages: ``[N]`` one per completion.
        mask: ``[N, T]`` 1 on completion tokens.
        epsilon_low: Lower clip range.
        epsilon_high: Upper clip range (default ``epsilon_low``; DAPO's clip-higher uses a larger one).
        ref_logps: ``[N, T]`` under the reference policy; needed when ``beta > 0``.
        beta: KL coefficient.
        num_tokens: Denominator; pass the completion-token count of the whole generation batch so the losses of its
            micro-batches sum to the full-batch loss. Default: this call's ``mask.sum()``.

    Returns:
        ``loss`` (scalar), and detached sums for logging: ``tokens``, ``clipped`` (tokens where the clip is
        active), ``kl_sum``.
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    ratio = (logps - old_logps).exp()  # [N, T]
    adv = advantages[:, None].to(logps.dtype)  # [N, 1]
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * adv)  # [N, T]
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
    denom = mask.sum().clamp(min=1.0) if num_tokens is None else torch.as_tensor(num_tokens, dtype=logps.dtype)
    loss = (per_token * mask).sum() / denom.clamp(min=1.0)
    clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    return {
        "loss": loss,
        "tokens": mask.sum().detach(),
        "clipped": (clipped.to(mask.dtype) * mask).sum().detach(),
        "kl_sum": (kl.detach() * mask).sum() if kl is not None else torch.zeros((), device=logps.device),
    }


def returns_kv_cache(model: torch.nn.Module) -> bool:
    """Whether a forward of ``model`` now returns its KV cache.

    transformers drops the cache inside a layer that checkpoints its activations (training mode with gradient
    checkpointing on); transformers 5.17 does so even when gradients are off.
    """
    return not (model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()))


def group_log_probs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """``[b*G, C]`` log-probs of G completions per prompt, with each prompt's forward run once, not G times.

    The prompts ``[b, P]`` are prefilled once (with gradient), their KV cache is repeated G times along the batch,
    and only the completions ``[b*G, C]`` (G consecutive rows per prompt, as ``sample_completions`` returns them) run
    on top of it. Under gradient checkpointing, which drops the KV cache, each row runs prompt + completion whole.
    The gradient reaching the shared prompt activations is the sum over the group, exactly what G
    separate forwards would give; the cost of the prompt part falls from b*G*P tokens to b*P. With 300-token
    prompts and 30-token answers this is most of a GRPO step.

    Returns:
        ``[b*G, C]`` log-probs under ``softmax(logits / temperature)``, equal in value and gradient to one forward
        of each repeated prompt + completion (``tests/test_reasoner.py``, which also checks them against TRL).
    """
    b, n = prompt_ids.shape[0], completion_ids.shape[0]
    if b == 0 or n % b:
        raise ValueError(f"{n} completions do not split into groups over {b} prompts")
    g = n // b
    c = completion_ids.shape[1]
    if not returns_kv_cache(model):
        # Gradient checkpointing drops the KV cache in training mode, so each prompt runs once per completion, in
        # one forward of prompt + completion (what TRL does): G times the prompt's compute, same values.
        mask = torch.cat([prompt_mask.repeat_interleave(g, dim=0), completion_mask], dim=1)  # [b*G, P+C]
        logits = model(
            input_ids=torch.cat([prompt_ids.repeat_interleave(g, dim=0), completion_ids], dim=1),
            attention_mask=mask,
            position_ids=positions(mask),
            logits_to_keep=c + 1,
        ).logits[:, :-1]  # [b*G, C, V]: the last prompt position predicts the first completion token
        return token_log_probs(logits, completion_ids, temperature)
    pos = positions(prompt_mask)  # [b, P]
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(g)  # [b, ...] -> [b*G, ...], differentiable: gradients of the group add up
    first = out.logits[:, -1:].repeat_interleave(g, dim=0)  # [b*G, 1, V]: predicts the first completion token
    mask = torch.cat([prompt_mask.repeat_interleave(g, dim=0), completion_mask], dim=1)  # [b*G, P+C]
    start = pos[:, -1:].repeat_interleave(g, dim=0) + 1  # [b*G, 1]
    rest = model(
        input_ids=completion_ids,
        attention_mask=mask,
        position_ids=start + torch.arange(c, device=start.device)[None, :],
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=c,
    ).logits  # [b*G, C, V]: position t predicts token t+1
    logits = torch.cat([first, rest[:, :-1]], dim=1)  # [b*G, C, V]
    return token_log_probs(logits, completion_ids, temperature)


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over completion tokens (``sft_batch`` layout), computing logits only where needed."""
    keep = int(batch["completion_width"]) + 1
    mask = batch["attention_mask"]
    logits = model(
        input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions(mask), logits_to_keep=keep
    ).logits  # [B, K, V]
    targets = batch["labels"][:, -keep + 1 :]  # [B, K-1]: logits at t predict token t+1
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def reward_table(
    functions: Sequence[Callable[..., list]],
    prompts: list,
    completions: list[str],
    completion_ids: list[list[int]],
    columns: dict[str, list],
) -> torch.Tensor:
    """``[N, F]`` rewards of each function (TRL call signature), None -> NaN."""
    out = torch.full((len(completions), len(functions)), math.nan)
    for j, fn in enumerate(functions):
        values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        if len(values) != len(completions):
            raise ValueError(
                f"reward {getattr(fn, '__name__', fn)} returned {len(values)} values for {len(completions)}"
            )
        out[:, j] = torch.tensor([math.nan if v is None else float(v) for v in values])
    return out


def answer_diversity(answers: Sequence[int | None], group_size: int) -> dict[str, float]:
    """How varied a generation batch's answers are (None = no valid DRG, counted as one more answer).

    Returns:
        ``distinct_answers``: distinct answers over the batch / the number of prompts (1.0 when each prompt gets its
        own answer, 1/B when every prompt gets the same one: mode collapse); ``group_distinct``: mean over groups of
        distinct answers / G (0 variety inside a group = nothing for GRPO to compare).
    """
    groups = [answers[i : i + group_size] for i in range(0, len(answers), group_size)]
    return {
        "distinct_answers": len(set(answers)) / max(len(groups), 1),
        "group_distinct": float(np.mean([len(set(grp)) / len(grp) for grp in groups])) if groups else 0.0,
    }


# ----------------------------------------------------------------------------------------------------------------
# Metrics of generated answers in the classifier's metrics.json layout


def generation_metrics(
    space: LabelSpace,
    greedy: Sequence[ParsedAnswer],
    gold: Sequence[int],
    sampled: Sequence[Sequence[ParsedAnswer]] | None = None,
) -> dict[str, float]:
    """The classifier's metric keys (``top1`` … ``severity_acc``) plus the generation metrics of ``score_answers``.

    The greedy answer is a one-hot "distribution" over the label space's DRGs (all zeros for an invalid answer or a
    DRG outside the space), so top-k, AUC and ECE are those of a point prediction: ``top1`` = Pass@1 greedy and
    ``top5`` = ``top1``. Base, severity and MDC accuracy and F1 are computed on the answered DRG itself, so a valid
    DRG outside the training classes still earns base/severity credit and an invalid answer predicts no class.
    """
    n, c = len(gold), space.num_classes
    probs = np.zeros((n, c), dtype=np.float64)
    pred = np.full(n, c, dtype=np.int64)  # c = "no class of the space"
    for i, p in enumerate(greedy):
        if p.drg is not None and p.drg in space:
            pred[i] = space.index(p.drg)
            probs[i, pred[i]] = 1.0
    gold_index = np.array([space.index(g) if g in space else -1 for g in gold], dtype=np.int64)
    metrics = score_predictions(space, probs, gold_index)
    answers = score_answers(greedy, gold, space.version, sampled)
    metrics.update(answers)
    metrics["top1"] = answers["pass1_greedy"]
    for key in ("base_acc", "severity_acc", "mdc_acc"):
        metrics[key] = answers[f"answer_{key}"]
    gold_ext = np.where(gold_index < 0, c + 1, gold_index)  # unseen gold DRGs: their own column, never predicted
    present = f1_scores(pred, gold_ext, c + 2)
    metrics["macro_f1_present"] = present["macro_f1_present"]
    metrics["micro_f1"] = present["micro_f1"]
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# The LightningModule


class DRGReasoner(L.LightningModule):
    """Generative MS-DRG reasoner over a causal LM with LoRA: SFT cold start and GRPO.

    Args:
        backbone: Which causal LM to load and how to adapt it (LoRA rank, dtype, quantisation…).
        label_space: Classes of the run (for the classifier-style metrics); linked from ``data.label_space``.
        stage: ``sft`` (teacher forcing on rationale targets) or ``grpo`` (sampling + rewards).
        init_adapter: LoRA adapter folder to start from (the SFT run's ``adapter/``, or the run folder itself).
        init_adapter_mode: ``merge`` it into the base and train a fresh LoRA (reference = adapter disabled), or
            ``continue`` training it (reference = a frozen copy, kept only when beta > 0).
        instruction: System instruction; None uses ``INSTRUCTION`` (``{version}`` is filled in).
        max_note_tokens: Token budget of the hospital course in the prompt (the instruction is never truncated).
        truncation: Which note tokens to keep: ``head``, ``tail`` or ``head_tail``.
        rationale: SFT targets: ``grounded`` (from codes + grouper, answer-only where unavailable) or ``answer_only``.
        codes_dir: ``hosp/`` folder with diagnoses_icd/procedures_icd; None finds it from the prepared folder.
        batch_size: Prompts per training step (SFT rows per batch).
        eval_batch_size: Prompts per evaluation batch.
        learning_rate: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps, then constant.
        max_grad_norm: Gradient norm clip (0 disables).
        num_generations: G completions per prompt (GRPO).
        temperature: Sampling temperature of GRPO (and of the loss's log-probs).
        max_new_tokens: Completion budget during training and evaluation.
        reward_funcs: Names in ``rewards.REWARD_FUNCTIONS``.
        reward_weights: One weight per reward function (default 1.0 each).
        scale_rewards: ``group``, ``batch`` or ``none`` (see ``group_advantages``).
        epsilon_low: Lower clip of the ratio.
        epsilon_high: Upper clip (default epsilon_low).
        beta: KL coefficient to the reference policy (0 disables the reference forward).
        grpo_iterations: Optimizer steps per generation batch (mu); > 1 makes the clip active.
        micro_batch_size: Completions per forward/backward in the GRPO loss, rounded down to whole groups (at least
            one prompt x G); token counts normalise across micro-batches.
        eval_samples: k sampled answers per evaluation prompt for Pass@1 (sampled), Maj@k, Pass@k; 0 greedy only.
        eval_temperature: Temperature of those samples.
        val_samples: Completions sampled per validation note at the training ``temperature`` with the same seed at
            every check, for ``val/reward_sampled``: the expected reward GRPO maximises, on fixed held-out notes
            (0: greedy only).
        drg_version: MS-DRG version of answers (default: the label space's).
        seed: Seed of the training shuffle and of sampling.
    """

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        label_space: LabelSpace | dict | None = None,
        stage: Literal["sft", "grpo"] = "sft",
        init_adapter: str | None = None,
        init_adapter_mode: Literal["merge", "continue"] = "merge",
        instruction: str | None = None,
        max_note_tokens: int = 256,
        truncation: Literal["head", "tail", "head_tail"] = "head_tail",
        rationale: Literal["grounded", "answer_only"] = "grounded",
        codes_dir: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        max_grad_norm: float = 1.0,
        num_generations: int = 4,
        temperature: float = 1.0,
        max_new_tokens: int = 192,
        reward_funcs: Sequence[str] = ("format", "exact", "invalid"),
        reward_weights: Sequence[float] | None = None,
        scale_rewards: Literal["group", "batch", "none"] = "group",
        epsilon_low: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.0,
        grpo_iterations: int = 1,
        micro_batch_size: int = 8,
        eval_samples: int = 0,
        eval_temperature: float = 0.7,
        val_samples: int = 0,
        drg_version: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if label_space is None:
            raise ValueError("DRGReasoner needs a label space; it comes from the data module (data.label_space).")
        if isinstance(label_space, dict):
            label_space = LabelSpace.from_dict(label_space)
        backbone = backbone or BackboneConfig()
        if isinstance(backbone, dict):
            backbone = BackboneConfig(**backbone)
        if stage not in ("sft", "grpo"):
            raise ValueError(f"stage must be 'sft' or 'grpo', got {stage!r}")
        if rationale not in ("grounded", "answer_only"):
            raise ValueError(f"rationale must be 'grounded' or 'answer_only', got {rationale!r}")
        unknown = [r for r in reward_funcs if r not in REWARD_FUNCTIONS]
        if unknown:
            raise ValueError(f"unknown reward functions {unknown}; choose from {sorted(REWARD_FUNCTIONS)}")
        reward_weights = list(reward_weights) if reward_weights is not None else [1.0] * len(reward_funcs)
        if len(reward_weights) != len(reward_funcs):
            raise ValueError(f"{len(reward_weights)} reward_weights for {len(reward_funcs)} reward_funcs")
        if stage == "grpo" and num_generations < 2:
            raise ValueError("GRPO needs num_generations >= 2 (advantages are relative to the group)")
        if scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
        if init_adapter_mode not in ("merge", "continue"):
            raise ValueError(f"init_adapter_mode must be 'merge' or 'continue', got {init_adapter_mode!r}")
        if max_note_tokens < 1 or max_new_tokens < 1 or micro_batch_size < 1 or grpo_iterations < 1:
            raise ValueError("max_note_tokens, max_new_tokens, micro_batch_size and grpo_iterations must be >= 1")
        self.label_space = label_space
        self.backbone_config = backbone
        self.version = resolve_version(drg_version or label_space.version)
        self.save_hyperparameters(ignore=["backbone", "label_space"])
        self.hparams.update(
            backbone=asdict(backbone),
            label_space=label_space.to_dict(),
            reward_funcs=list(reward_funcs),
            reward_weights=reward_weights,
            # absolute, so evaluate/predict can rebuild the model from any working directory
            init_adapter=str(Path(init_adapter).expanduser().resolve()) if init_adapter else None,
        )
        self.model, self.tokenizer = self._build_model(backbone, init_adapter, init_adapter_mode)
        self.model.train()  # from_pretrained returns eval mode, which would silently disable LoRA dropout
        self.reference = None
        if stage == "grpo" and beta > 0 and init_adapter and init_adapter_mode == "continue":
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.automatic_optimization = stage == "sft"
        self.strict_loading = False  # checkpoints hold only the trainable tensors
        self.rewards = [REWARD_FUNCTIONS[name] for name in reward_funcs]
        text = instruction if instruction is not None else INSTRUCTION
        self.instruction = text.replace("{version}", f"version {self.version}")
        self.parts = prompt_parts(self.tokenizer, self.instruction)
        self._stop = answer_stop(self.tokenizer)
        self._data_module = None
        self._examples: dict[str, list[dict]] = {}
        self._eval: list[dict] = []
        self.rationale_counts: dict[str, int] = {}
        self.last_eval: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------------------------------
    # model and data

    @staticmethod
    def _build_model(cfg: BackboneConfig, init_adapter: str | None, mode: str):
        if not init_adapter:
            return build_causal_lm_backbone(cfg)
        from peft import LoraConfig, PeftModel, get_peft_model

        folder = Path(init_adapter).expanduser()
        if (folder / "adapter" / "adapter_config.json").is_file():
            folder = folder / "adapter"  # a run directory was given
        if not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"init_adapter {init_adapter} holds no adapter_config.json; pass the SFT run's adapter/ folder"
            )
        base, tokenizer = build_causal_lm_backbone(replace(cfg, lora_r=0))
        if mode == "continue":
            model = PeftModel.from_pretrained(base, str(folder), is_trainable=True)
            keep_trainable_fp32(model)
            return model, tokenizer
        if cfg.quantization is not None:
            raise ValueError("a quantized base cannot absorb a merged adapter; use init_adapter_mode: continue")
        merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
        if cfg.lora_r == 0:
            return merged, tokenizer
        lora = LoraConfig(
            task_type="CAUSAL_LM",
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_target_modules),
        )
        model = get_peft_model(merged, lora)
        keep_trainable_fp32(model)
        return model, tokenizer

    def attach_data(self, data) -> None:
        """Use ``data`` (a ``DRGDataModule``) for its prepared folder, row limits and seed; texts are read here."""
        if data.label_space.drgs != self.label_space.drgs:
            raise ValueError("the data module's classes differ from the model's label space")
        self._data_module = data

    def split_frame(self, split: str) -> pd.DataFrame:
        """hadm_id, subject_id, drg_code and text of the split's first ``limit`` rows (row order = index)."""
        if self._data_module is None:
            raise RuntimeError("call attach_data(DRGDataModule) before training or evaluating")
        import pyarrow.parquet as pq

        columns = ["hadm_id", "subject_id", "drg_code", "text"]
        frame = pq.read_table(self._data_module.prepared_dir / f"{split}.parquet", columns=columns).to_pandas()
        limit = self._data_module.limits[split]
        return frame.iloc[:limit].reset_index(drop=True) if limit is not None else frame

    def examples(self, split: str, with_targets: bool | None = None) -> list[dict]:
        """Prompt ids (and SFT completion ids) per row of a split, built once; the text is not kept."""
        if split in self._examples:
            return self._examples[split]
        frame = self.split_frame(split)
        if with_targets is None:
            with_targets = split in ("train", "val") and (self.hparams.stage == "sft" or split == "val")
        prompts = build_prompts(
            self.tokenizer, frame["text"].tolist(), self.parts, self.hparams.max_note_tokens, self.hparams.truncation
        )
        completions: list[list[int] | None] = [None] * len(frame)
        if with_targets:
            rationales = self._rationales(frame)
            texts = [target_text(int(d), self.version, r) for d, r in zip(frame["drg_code"], rationales)]
            eos = [self.tokenizer.eos_token_id]
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            completions = [list(x) + eos for x in ids]
        self._examples[split] = [
            {"prompt": p, "completion": c, "drg_code": int(d), "row": i, "hadm_id": int(h)}
            for i, (p, c, d, h) in enumerate(zip(prompts, completions, frame["drg_code"], frame["hadm_id"]))
        ]
        return self._examples[split]

    def _rationales(self, frame: pd.DataFrame) -> list[str | None]:
        if self.hparams.rationale == "answer_only":
            return [None] * len(frame)
        from drg_llama.data.rationales import find_codes_dir, grounded_rationales

        codes_dir = self.hparams.codes_dir or find_codes_dir(self._data_module.prepared_dir)
        if codes_dir is None:
            logger.warning("no diagnoses_icd next to %s: SFT targets are answer-only", self._data_module.prepared_dir)
            return [None] * len(frame)
        rationales, counts = grounded_rationales(codes_dir, frame, self.version)
        for key, value in counts.items():
            self.rationale_counts[key] = self.rationale_counts.get(key, 0) + value
        logger.info("SFT targets: %s", dict(counts))  # counts only, never text
        return rationales

    def _loader(self, split: str, train: bool) -> DataLoader:
        rows = self.examples(split)
        pad = self.tokenizer.pad_token_id
        size = self.hparams.batch_size if train else self.hparams.eval_batch_size
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            rows, batch_size=size, shuffle=train, generator=generator, collate_fn=lambda r: collate(r, pad)
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    # ----------------------------------------------------------------------------------------------------------
    # SFT

    def sft_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the completion tokens of a left-padded batch (prompt and padding are -100)."""
        return sft_loss(self.model, batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        if self.hparams.stage == "sft":
            loss = self.sft_loss(batch)
            self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
            return loss
        self.grpo_step(batch)
        return None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Teacher-forced loss of the gold target: cheap, and shows whether GRPO drifts from the SFT behaviour.
        if "labels" in batch:
            self.log("val/loss", self.sft_loss(batch), prog_bar=True, batch_size=batch["input_ids"].shape[0])
        # Greedy answers on the same fixed notes at every check: the held-out reward curve. GRPO's training reward
        # is measured on new prompts each step, so it moves with which notes were drawn as much as with the policy.
        # Samples (val_samples) use the training temperature and a generator re-seeded at every check: the same
        # random draws each time, so a change between checks is the policy's, not the dice's.
        hp = self.hparams
        if batch_idx == 0:
            self._val_rng = torch.Generator(device=self.device).manual_seed(hp.seed + 2_000)
        self._collect(batch, hp.val_samples, temperature=hp.temperature, generator=self._val_rng)

    def on_validation_epoch_end(self) -> None:
        metrics = self._summarise()
        if metrics is None:
            return
        for key in (k for k in VAL_METRICS if k in metrics):
            self.log(f"val/{key}", metrics[key], prog_bar=key == "reward_greedy", sync_dist=True)
        # The logger's step column is one behind during fit and 0 for a validate before fit: plot against this.
        self.log("val/optimizer_steps", float(self.global_step), sync_dist=True)

    # ----------------------------------------------------------------------------------------------------------
    # GRPO

    def _generator(self) -> torch.Generator:
        if not hasattr(self, "_rng"):
            self._rng = torch.Generator(device=self.device).manual_seed(self.hparams.seed + 1_000 * self.global_rank)
        return self._rng

    def _reference_logps(self, *args) -> torch.Tensor:
        if self.reference is not None:
            return group_log_probs(self.reference, *args)
        with self.model.disable_adapter():  # base (+ merged SFT adapter) = the reference policy
            return group_log_probs(self.model, *args)

    def score(
        self, texts: list[str], gold: list[int], ids: list[list[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The run's rewards of completions: per function ``[N, F]`` and weighted ``[N]`` (training and evaluation)."""
        ids = ids if ids is not None else self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        columns = {"drg_code": gold, "drg_version": [self.version] * len(gold)}
        per_fn = reward_table(self.rewards, [None] * len(texts), texts, ids, columns)
        return per_fn, combine_rewards(per_fn, torch.tensor(self.hparams.reward_weights, dtype=torch.float32))

    def grpo_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One GRPO step on a batch of prompts: sample, score, advantages, clipped loss, optimizer step(s)."""
        hp = self.hparams
        g, temperature = hp.num_generations, hp.temperature
        self.model.eval()  # no dropout while sampling
        sample = sample_completions(
            self.model,
            batch["prompt_ids"],
            batch["prompt_mask"],
            g,
            hp.max_new_tokens,
            temperature,
            self.tokenizer.eos_token_id,
            self.tokenizer.pad_token_id,
            self._generator(),
            stop=self._stop,
        )
        self.model.train()
        comp_ids, comp_mask = sample["completion_ids"], sample["completion_mask"]  # [B*G, C]
        ids_list = [row[m.bool()].tolist() for row, m in zip(comp_ids, comp_mask)]
        texts = self.tokenizer.batch_decode(ids_list, skip_special_tokens=True)
        per_fn, rewards = self.score(texts, batch["drg_code"].repeat_interleave(g).tolist(), ids_list)
        advantages, zero_std = group_advantages(rewards, g, hp.scale_rewards)
        advantages = advantages.to(self.device)

        n_tokens = comp_mask.sum().float()
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            # Normalise by the mean token count per rank so that DDP's gradient average equals sum / global tokens.
            n_tokens = self.trainer.strategy.reduce(n_tokens, reduce_op="sum") / world
        # Micro-batches hold whole groups, so each prompt is prefilled once per forward (group_log_probs).
        per_micro = max(1, hp.micro_batch_size // g)
        prompts = [slice(i, i + per_micro) for i in range(0, batch["prompt_ids"].shape[0], per_micro)]
        slices = [(p, slice(p.start * g, p.stop * g)) for p in prompts]  # (prompt rows, completion rows)

        def args(p: slice, c: slice) -> tuple:
            return batch["prompt_ids"][p], batch["prompt_mask"][p], comp_ids[c], comp_mask[c], temperature

        old, ref = None, None
        with torch.no_grad():
            if hp.grpo_iterations > 1:
                old = torch.cat([group_log_probs(self.model, *args(p, c)) for p, c in slices])
            if hp.beta > 0:
                ref = torch.cat([self._reference_logps(*args(p, c)) for p, c in slices])
        opt = self.optimizers()
        scheduler = self.lr_schedulers()
        totals = {"loss": 0.0, "tokens": 0.0, "clipped": 0.0, "kl_sum": 0.0, "logp_sum": 0.0}
        for _ in range(hp.grpo_iterations):
            for p, c in slices:
                logps = group_log_probs(self.model, *args(p, c))  # [m*G, C]
                terms = clipped_token_loss(
                    logps,
                    old[c] if old is not None else logps.detach(),
                    advantages[c],
                    comp_mask[c],
                    hp.epsilon_low,
                    hp.epsilon_high,
                    ref[c] if ref is not None else None,
                    hp.beta,
                    num_tokens=n_tokens,
                )
                self.manual_backward(terms["loss"])
                for key in ("loss", "tokens", "clipped", "kl_sum"):
                    totals[key] += float(terms[key].detach())
                totals["logp_sum"] += float((logps.detach() * comp_mask[c]).sum())
            if hp.max_grad_norm > 0:
                self.clip_gradients(opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()

        lengths = comp_mask.sum(1).float()
        tokens = max(totals["tokens"], 1.0)
        stats = {
            "reward": float(torch.nanmean(rewards)),
            "reward_std": float(_nanstd(rewards)) if rewards.numel() > 1 else 0.0,
            "frac_reward_zero_std": float(zero_std.float().mean()),
            "completion_length": float(lengths.mean()),
            "truncated_fraction": float(sample["truncated"].float().mean()),
            "clip_ratio": totals["clipped"] / tokens,
            "kl": totals["kl_sum"] / tokens,
            "loss": totals["loss"] / hp.grpo_iterations,
            # Collapse shows here before it shows in the reward: the policy's per-token entropy (estimated by the
            # sampled tokens' -log p) falls and every prompt gets the same answer.
            "entropy": -totals["logp_sum"] / tokens,
            **answer_diversity([parse_answer(t, self.version).drg for t in texts], g),
        }
        for name, column in zip(hp.reward_funcs, per_fn.T):
            stats[f"rewards/{name}"] = float(torch.nanmean(column)) if not torch.isnan(column).all() else math.nan
        size = batch["prompt_ids"].shape[0]
        for key, value in stats.items():
            self.log(f"train/{key}", value, prog_bar=key == "reward", batch_size=size)
        return stats

    # ----------------------------------------------------------------------------------------------------------
    # generation for evaluation and prediction

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        samples: int = 0,
        temperature: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[list[str], list[list[str]]]:
        """Greedy completion per prompt, and ``samples`` sampled ones (shared prefill), as text."""
        was_training = self.model.training
        self.model.eval()
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        args = (self.model, prompt_ids.to(self.device), prompt_mask.to(self.device))

        def decode(out: dict[str, torch.Tensor]) -> list[str]:
            rows = [r[m.bool()].tolist() for r, m in zip(out["completion_ids"], out["completion_mask"])]
            return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

        limit, stop = self.hparams.max_new_tokens, self._stop
        greedy = decode(sample_completions(*args, 1, limit, 0.0, eos, pad, stop=stop))
        sampled: list[list[str]] = [[] for _ in greedy]
        if samples > 0:
            temp = self.hparams.eval_temperature if temperature is None else temperature
            rng = generator if generator is not None else self._generator()
            out = decode(sample_completions(*args, samples, limit, temp, eos, pad, rng, stop=stop))
            sampled = [out[i * samples : (i + 1) * samples] for i in range(len(greedy))]
        self.model.train(was_training)
        return greedy, sampled

    def _collect(self, batch: dict[str, torch.Tensor], samples: int, **sampling: Any) -> None:
        """Generate for an evaluation batch and keep gold + completions (in memory only) for ``_summarise``."""
        greedy, sampled = self.generate(batch["prompt_ids"], batch["prompt_mask"], samples, **sampling)
        for i, row in enumerate(batch["row"].tolist()):
            self._eval.append(
                {"row": row, "gold": int(batch["drg_code"][i]), "greedy": greedy[i], "sampled": sampled[i]}
            )

    def _summarise(self) -> dict[str, float] | None:
        """Metrics of the collected completions (``generation_metrics`` + held-out rewards); sets ``last_eval``."""
        if not self._eval:
            return None
        rows = sorted(self._eval, key=lambda r: r["row"])
        self._eval = []
        _, first = np.unique([r["row"] for r in rows], return_index=True)  # DDP padding repeats rows
        rows = [rows[i] for i in first]
        greedy = [parse_answer(r["greedy"], self.version) for r in rows]
        sampled = [[parse_answer(t, self.version) for t in r["sampled"]] for r in rows] if rows[0]["sampled"] else None
        gold = [r["gold"] for r in rows]
        metrics = generation_metrics(self.label_space, greedy, gold, sampled)
        # The training reward on held-out notes: whether what GRPO optimised carries over beyond its prompts.
        metrics["reward_greedy"] = float(torch.nanmean(self.score([r["greedy"] for r in rows], gold)[1]))
        if sampled is not None:
            k = len(rows[0]["sampled"])
            texts = [t for r in rows for t in r["sampled"]]
            metrics["reward_sampled"] = float(torch.nanmean(self.score(texts, [g for g in gold for _ in range(k)])[1]))
        self.last_eval = {"metrics": metrics, "rows": rows, "greedy": greedy, "sampled": sampled}
        return metrics

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._collect(batch, self.hparams.eval_samples)

    def on_test_epoch_end(self) -> None:
        metrics = self._summarise()
        if metrics is None:
            return
        for key in SUMMARY_METRICS:
            if key in metrics:
                self.log(f"test/{key}", metrics[key], sync_dist=True)

    # ----------------------------------------------------------------------------------------------------------
    # optimisation and checkpoints

    def setup(self, stage: str) -> None:
        check_training_setup(self.trainer, self, self.backbone_config, stage, generative=True)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        warmup = self.hparams.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep_trainable_tensors(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_trainable_tensors(self, checkpoint)

    def save_adapter(self, folder: str) -> None:
        """Write the LoRA adapter as safetensors (PEFT layout)."""
        save_adapter(self, "model", folder)


__all__ = [
    "INSTRUCTION",
    "PLAIN_TEMPLATE",
    "SUMMARY_METRICS",
    "VAL_METRICS",
    "DRGReasoner",
    "answer_diversity",
    "AnswerStop",
    "NonFiniteLogitsError",
    "StaticDecoder",
    "answer_stop",
    "returns_kv_cache",
    "build_prompts",
    "clipped_token_loss",
    "collate",
    "combine_rewards",
    "generation_metrics",
    "group_advantages",
    "group_log_probs",
    "k3_kl",
    "prompt_parts",
    "reward_table",
    "sample_completions",
    "sft_batch",
    "sft_loss",
    "target_text",
    "token_log_probs",
]
