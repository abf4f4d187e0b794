"""The reasoner's rewards (TRL-style functions) and the scoring of its generated answers.

Both read answers with ``drg_llama.drg.answers.parse_answer``, the one parser of the format SFT targets are written
in, so what GRPO is rewarded for is exactly what ``evaluate`` reports (the task owns its reward and its evaluation).

Reward functions follow TRL's convention: plain callables with keyword arguments ``prompts``, ``completions``,
``completion_ids``, every dataset column by name (``drg_code``, ``drg_version``), and ``**kwargs``; each returns one
``float | None`` per completion (None: the reward does not apply, e.g. no gold label). They work unchanged as
``trl.GRPOTrainer(reward_funcs=[...])``::

    from drg_llama.models.rewards import exact_drg_reward
    exact_drg_reward(completions=["<answer>DRG 291</answer>"], drg_code=[291])                        # [1.0]
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from drg_llama.drg import DRGFacts
from drg_llama.drg.answers import ParsedAnswer, completion_text, parse_answer

# ----------------------------------------------------------------------------------------------------------------
# Reward functions (TRL signature)


def _version(kwargs: dict[str, Any], i: int) -> str:
    """Target version of row ``i``: the ``drg_version`` column (a list) or keyword (a string), default v43."""
    value = kwargs.get("drg_version", "v43")
    if isinstance(value, str):
        return value
    return value[i] if value is not None and len(value) > i and value[i] else "v43"


def _gold(value: Any) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


def _parsed(completions: Sequence[Any], kwargs: dict[str, Any]) -> list[ParsedAnswer]:
    return [parse_answer(completion_text(c), _version(kwargs, i)) for i, c in enumerate(completions)]


def format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """1.0 when the completion is exactly ``<think>…</think><answer>DRG NNN: …</answer>`` with a readable answer."""
    return [1.0 if p.format_ok and p.status in ("ok", "invalid_drg") else 0.0 for p in _parsed(completions, kwargs)]


def exact_drg_reward(
    completions: Sequence[Any], drg_code: Sequence[Any] | None = None, **kwargs: Any
) -> list[float | None]:
    """1.0 when the answer is the gold DRG, else 0.0 (None where the row has no gold DRG).

    DRG-Sapphire found this strict reward beat partial credit; it is the default.
    """
    if drg_code is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for parsed, gold in zip(_parsed(completions, kwargs), drg_code):
        gold = _gold(gold)
        out.append(None if gold is None else float(parsed.drg == gold))
    return out


def partial_drg_reward(
    completions: Sequence[Any], drg_code: Sequence[Any] | None = None, **kwargs: Any
) -> list[float | None]:
    """0.5 for the right base DRG (family) + 0.5 for the right severity set, via the family table.

    "Right severity" means the answer admits the same effective severities as the gold DRG (292 and 281 both admit
    only CC), the same definition as ``severity_acc`` in the metrics. An exact answer scores 1.0.
    """
    if drg_code is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for i, (parsed, gold) in enumerate(zip(_parsed(completions, kwargs), drg_code)):
        gold = _gold(gold)
        if gold is None:
            out.append(None)
            continue
        if parsed.drg is None:
            out.append(0.0)
            continue
        version = _version(kwargs, i)
        same = DRGFacts.of([parsed.drg], version).agreement(DRGFacts.of([gold], version))
        out.append(0.5 * bool(same["base"][0]) + 0.5 * bool(same["severity"][0]))
    return out


def invalid_drg_penalty(completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """-1.0 when the answer names a DRG that does not exist in the target version (a code or an unknown title)."""
    return [-1.0 if p.status == "invalid_drg" else 0.0 for p in _parsed(completions, kwargs)]


#: Reward functions by the names configs use (``model.rewards.functions: [format, exact, invalid]``).
REWARD_FUNCTIONS = {
    "format": format_reward,
    "exact": exact_drg_reward,
    "partial": partial_drg_reward,
    "invalid": invalid_drg_penalty,
}


# ----------------------------------------------------------------------------------------------------------------
# Scoring generated answers (evaluate and the test step)


def majority_vote(answers: Sequence[int | None]) -> int | None:
    """Most frequent valid DRG among samples; ties go to the one seen first; None when no sample is valid."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def score_answers(
    greedy: Sequence[ParsedAnswer],
    gold: Sequence[int],
    version: str = "v43",
    sampled: Sequence[Sequence[ParsedAnswer]] | None = None,
) -> dict[str, float]:
    """Generation metrics that are not in the classifier's ``compute_metrics``.

    Args:
        greedy: The greedy answer per row.
        gold: Gold DRG per row.
        version: MS-DRG version of the answers.
        sampled: k sampled answers per row (k >= 1) for the sampled metrics; None skips them.

    Returns:
        ``pass1_greedy``, ``format_valid``, ``invalid_drg``, ``no_answer`` (fractions), ``answer_base_acc``,
        ``answer_severity_acc``, ``answer_mdc_acc`` (on the greedy answer, over all rows; an invalid answer is
        wrong), ``top_answer_share`` (the share of rows given the most common greedy answer, no answer included:
        near 1.0 means the model answers from the prior, not from the note), and with samples ``pass1_sampled``
        (mean over samples), ``maj_at_k``, ``pass_at_k``, ``k``.
    """
    n = len(gold)
    if n == 0 or len(greedy) != n:
        raise ValueError(f"need one greedy answer per gold DRG, got {len(greedy)} and {n}")

    def fraction(flags) -> float:
        return float(sum(flags)) / n

    # No answer (None) has no facts, so it agrees with nothing: an invalid answer is wrong at every level.
    same = DRGFacts.of([p.drg for p in greedy], version).agreement(DRGFacts.of(gold, version))
    out = {
        "pass1_greedy": fraction(p.drg == g for p, g in zip(greedy, gold)),
        "format_valid": fraction(p.format_ok and p.status in ("ok", "invalid_drg") for p in greedy),
        "invalid_drg": fraction(p.status == "invalid_drg" for p in greedy),
        "no_answer": fraction(p.status in ("missing", "empty") for p in greedy),
        "answer_base_acc": fraction(same["base"]),
        "answer_severity_acc": fraction(same["severity"]),
        "answer_mdc_acc": fraction(same["mdc"]),
        "top_answer_share": max(Counter(p.drg for p in greedy).values()) / n,
    }
    if sampled is not None:
        if len(sampled) != n or any(len(s) == 0 for s in sampled):
            raise ValueError("sampled must hold at least one answer per row")
        k = len(sampled[0])
        out["k"] = float(k)
        out["pass1_sampled"] = float(sum(sum(p.drg == g for p in s) / len(s) for s, g in zip(sampled, gold))) / n
        out["maj_at_k"] = fraction(majority_vote([p.drg for p in s]) == g for s, g in zip(sampled, gold))
        out["pass_at_k"] = fraction(any(p.drg == g for p in s) for s, g in zip(sampled, gold))
    return out


__all__ = [
    "REWARD_FUNCTIONS",
    "exact_drg_reward",
    "format_reward",
    "invalid_drg_penalty",
    "majority_vote",
    "partial_drg_reward",
    "score_answers",
]
