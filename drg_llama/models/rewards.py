"""The reasoner's task: the prompt it is given, the answer format, parsing, TRL-style rewards and scoring.

The reasoner is told (``INSTRUCTION``) to write ``<think>…</think><answer>DRG NNN: TITLE</answer>``; SFT targets are
written in that format (``target_text``). This module is the one place that writes and reads the format, so what SFT
teaches, what GRPO is rewarded for and what ``evaluate`` reports cannot drift apart (the task owns its reward and its
evaluation). The data module renders prompts and targets with ``prompt_parts`` and ``target_text``.

Reward functions follow TRL's convention (STYLE.md): plain callables with keyword arguments ``prompts``,
``completions``, ``completion_ids``, every dataset column by name (``drg_code``, ``drg_version``), and ``**kwargs``;
each returns one ``float | None`` per completion (None: the reward does not apply, e.g. no gold label). They work
unchanged as ``trl.GRPOTrainer(reward_funcs=[...])``::

    from drg_llama.models.rewards import exact_drg_reward, parse_answer
    parse_answer("<think>…</think><answer>DRG 291: Heart Failure and Shock with MCC</answer>").drg   # 291
    exact_drg_reward(completions=["<answer>DRG 291</answer>"], drg_code=[291])                        # [1.0]

Parsing never raises: a missing, unreadable or non-existent answer is a status that is counted.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from drg_llama.drg import get_table, map_title, resolve_version

#: Statuses of a parsed answer. ``ok``: a DRG of the target version; ``missing``: no ``<answer>`` block;
#: ``empty``: a block with nothing usable in it; ``invalid_drg``: a code or title that names no DRG of the version.
STATUSES = ("ok", "missing", "empty", "invalid_drg")

# Tolerant of case and whitespace inside the tags ("< Answer >"); the last block wins, as a model that restates
# its answer means the final one.
_ANSWER = re.compile(r"<\s*answer\s*>(.*?)(?:<\s*/\s*answer\s*>|$)", re.IGNORECASE | re.DOTALL)
# The full format: one think block, then one answer block, nothing else but whitespace.
_FORMAT = re.compile(
    r"^\s*<\s*think\s*>(?P<think>.*?)<\s*/\s*think\s*>\s*<\s*answer\s*>(?P<answer>.*?)<\s*/\s*answer\s*>\s*$",
    re.IGNORECASE | re.DOTALL,
)
# The end of the answer: generation stops here (``answer_closed``).
_CLOSE = re.compile(r"<\s*/\s*answer\s*>", re.IGNORECASE)
# "DRG 291", "drg #291", "MS-DRG 291", or a bare leading number "291: ..."
_CODE = re.compile(r"^\s*(?:ms[-\s]?)?(?:drg)?\s*#?\s*(\d{1,4})\b", re.IGNORECASE)
_DRG_WORD = re.compile(r"^\s*(?:ms[-\s]?)?drg\b\s*[:#-]?\s*", re.IGNORECASE)


@dataclass(frozen=True)
class ParsedAnswer:
    """What a completion answered.

    Attributes:
        drg: The DRG of the target version, or None.
        status: One of ``STATUSES``.
        format_ok: The completion is exactly ``<think>…</think><answer>…</answer>`` (whitespace allowed).
        reasoning: Text of the think block ("" when there is none). May quote the note: never log it.
    """

    drg: int | None
    status: str
    format_ok: bool
    reasoning: str = ""


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's conversational form (a list of messages, the last one's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return "" if completion is None else str(completion)


def format_answer(code: int, version: str = "v43") -> str:
    """The answer block for DRG ``code``: ``<answer>DRG 291: Heart Failure and Shock with MCC</answer>``."""
    return f"<answer>DRG {int(code)}: {get_table(version)[code].title}</answer>"


def target_text(drg_code: int, version: str, rationale: str | None) -> str:
    """SFT target: ``<think>rationale</think><answer>DRG NNN: TITLE</answer>`` (empty think when answer-only)."""
    return f"<think>{rationale or ''}</think>{format_answer(drg_code, version)}"


# ----------------------------------------------------------------------------------------------------------------
# The prompt

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


def instruction_for(version: str, instruction: str | None = None) -> str:
    """The system instruction for MS-DRG ``version``: ``instruction`` (default ``INSTRUCTION``), version filled in."""
    return (instruction if instruction is not None else INSTRUCTION).replace("{version}", f"version {version}")


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


# ----------------------------------------------------------------------------------------------------------------
# Parsing


@functools.lru_cache(maxsize=65_536)
def parse_answer(text: str, version: str = "v43") -> ParsedAnswer:
    """Read the DRG out of a completion, by code or else by title, for MS-DRG ``version``.

    A code wins over a title when both are given (titles are descriptive and often abbreviated); a title alone is
    mapped through the domain core (``map_title``), so "HEART FAILURE & SHOCK W MCC" reads as 291.

    Args:
        text: The completion.
        version: Target MS-DRG version.

    Returns:
        A :class:`ParsedAnswer`; never raises on malformed text.
    """
    version = resolve_version(version)
    text = text if isinstance(text, str) else completion_text(text)
    whole = _FORMAT.match(text)
    think = whole.group("think").strip() if whole else _think_text(text)
    blocks = _ANSWER.findall(text)
    if not blocks:
        return ParsedAnswer(None, "missing", False, think)
    body = " ".join(re.sub(r"<[^>]*>", " ", blocks[-1]).split())  # stray tags inside the block are not an answer
    if not body:
        return ParsedAnswer(None, "empty", whole is not None, think)
    table = get_table(version)
    code = _CODE.match(body)
    if code is not None:
        drg = int(code.group(1))
        status = "ok" if drg in table else "invalid_drg"
        return ParsedAnswer(drg if status == "ok" else None, status, whole is not None, think)
    title = _DRG_WORD.sub("", body).strip(" :.-")
    if not title:
        return ParsedAnswer(None, "empty", whole is not None, think)
    mapped = map_title(title, version)
    if mapped.ok and mapped.drg in table:
        return ParsedAnswer(mapped.drg, "ok", whole is not None, think)
    return ParsedAnswer(None, "invalid_drg", whole is not None, think)


def answer_closed(text: str) -> bool:
    """True once ``text`` contains a closing ``</answer>`` tag (any case and spacing the parser accepts)."""
    return _CLOSE.search(text) is not None


def _think_text(text: str) -> str:
    match = re.search(r"<\s*think\s*>(.*?)(?:<\s*/\s*think\s*>|<\s*answer\s*>|$)", text, re.IGNORECASE | re.DOTALL)
    return match.group(1).strip() if match else ""


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
        table = get_table(_version(kwargs, i))
        same_base = table.base(parsed.drg) == table.base(gold)
        same_severity = table.allowed_severities(parsed.drg) == table.allowed_severities(gold)
        out.append(0.5 * same_base + 0.5 * same_severity)
    return out


def invalid_drg_penalty(completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """-1.0 when the answer names a DRG that does not exist in the target version (a code or an unknown title)."""
    return [-1.0 if p.status == "invalid_drg" else 0.0 for p in _parsed(completions, kwargs)]


#: Reward functions by the names configs use (``model.reward_funcs: [format, exact, invalid]``).
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
    table = get_table(version)
    n = len(gold)
    if n == 0 or len(greedy) != n:
        raise ValueError(f"need one greedy answer per gold DRG, got {len(greedy)} and {n}")

    def fraction(flags) -> float:
        return float(sum(flags)) / n

    out = {
        "pass1_greedy": fraction(p.drg == g for p, g in zip(greedy, gold)),
        "format_valid": fraction(p.format_ok and p.status in ("ok", "invalid_drg") for p in greedy),
        "invalid_drg": fraction(p.status == "invalid_drg" for p in greedy),
        "no_answer": fraction(p.status in ("missing", "empty") for p in greedy),
        "answer_base_acc": fraction(
            p.drg is not None and table.base(p.drg) == table.base(g) for p, g in zip(greedy, gold)
        ),
        "answer_severity_acc": fraction(
            p.drg is not None and table.allowed_severities(p.drg) == table.allowed_severities(g)
            for p, g in zip(greedy, gold)
        ),
        "answer_mdc_acc": fraction(
            p.drg is not None and table[p.drg].mdc == table[g].mdc for p, g in zip(greedy, gold)
        ),
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
    "INSTRUCTION",
    "PLAIN_TEMPLATE",
    "REWARD_FUNCTIONS",
    "STATUSES",
    "ParsedAnswer",
    "answer_closed",
    "completion_text",
    "exact_drg_reward",
    "format_answer",
    "format_reward",
    "instruction_for",
    "invalid_drg_penalty",
    "majority_vote",
    "parse_answer",
    "partial_drg_reward",
    "prompt_parts",
    "score_answers",
    "target_text",
]
