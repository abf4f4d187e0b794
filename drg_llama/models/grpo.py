"""GRPO math as plain functions: rewards, group advantages, per-token log-probs, the clipped loss and KL.

    from drg_llama.models.grpo import clipped_token_loss, group_advantages
    advantages, zero_std = group_advantages(rewards, group_size=8)                       # [B*G]
    loss = clipped_token_loss(logps, old_logps, advantages, mask, 0.2, 0.28, num_tokens=n)["loss"]

Per GRPO step with B prompts and G completions each (``DRGReasoner.grpo_step`` calls these in this order):

1. ``reward_table``: every reward function (TRL signature) on every completion -> ``[B*G, F]``;
   ``combine_rewards``: their weighted sum -> ``[B*G]``.
2. ``group_advantages``: (r - group mean) / (group std + 1e-4), or no std scaling (Dr. GRPO), or batch std; a
   zero-variance group gets advantage 0.
3. ``group_log_probs``: the completions' log-probs at the sampling temperature, each prompt prefilled once.
4. ``clipped_token_loss``: PPO-style clipped ratio per token, optional k3 KL to a reference, summed over tokens and
   divided by the completion tokens of the WHOLE generation batch, so micro-batches add up to the full-batch
   gradient (TRL's ``loss_type="dapo"``).

Each is tested on literal tensors (``tests/test_grpo_math.py``) and cross-checked against ``trl.GRPOTrainer``
(``tests/test_reasoner.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from drg_llama.models.generation import positions

#: How ``group_advantages`` scales: by the group's std (GRPO), the batch's, or not at all (Dr. GRPO).
SCALE_REWARDS = ("group", "batch", "none")


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


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
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
    group_std = nanstd(grouped, dim=1).repeat_interleave(group_size)  # [N]
    advantages = rewards - mean
    if scale == "group":
        advantages = advantages / (group_std + eps)
    elif scale == "batch":
        advantages = advantages / (nanstd(rewards) + eps)
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


__all__ = [
    "SCALE_REWARDS",
    "answer_diversity",
    "clipped_token_loss",
    "combine_rewards",
    "group_advantages",
    "group_log_probs",
    "k3_kl",
    "nanstd",
    "returns_kv_cache",
    "reward_table",
    "token_log_probs",
]
