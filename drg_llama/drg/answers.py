"""The reasoner's answer as text: the instruction that asks for it, the format it is written in, and its parser.

The reasoner is told (``INSTRUCTION``) to write ``<think>…</think><answer>DRG NNN: TITLE</answer>``. SFT targets are
written in that format (``target_text``, by ``drg_llama.data.reasoner``) and answers are read back by
``parse_answer``, by code or else by title through the title mapping (``map_title``); the rewards and the scoring of
answers (``drg_llama.models.rewards``) and sampling's stop rule (``answer_closed``) read them here. One place writes
and reads the format, so what SFT teaches, what GRPO is rewarded for and what ``evaluate`` reports cannot drift
apart::

    from drg_llama.drg.answers import format_answer, parse_answer
    parse_answer("<think>…</think><answer>DRG 291: Heart Failure and Shock with MCC</answer>").drg   # 291
    format_answer(291)                       # '<answer>DRG 291: Heart Failure and Shock with MCC</answer>'

Parsing never raises: a missing, unreadable or non-existent answer is a status that is counted.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from drg_llama.drg.tables import get_table, resolve_version
from drg_llama.drg.titles import map_title

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
# The instruction

INSTRUCTION = (
    "You assign the Medicare MS-DRG ({version}) of a hospital stay from its brief hospital course. "
    "The principal diagnosis sets the major diagnostic category (MDC) and the base DRG; an operating-room procedure "
    "makes the DRG surgical. Secondary diagnoses set the severity: a CC is a complication or comorbidity, an MCC a "
    "major one, and a CC or MCC does not count when the principal diagnosis excludes it (CC exclusions). Reason "
    "step by step inside <think></think>, then answer as <answer>DRG NNN: TITLE</answer>."
)


def instruction_for(version: str, instruction: str | None = None) -> str:
    """The system instruction for MS-DRG ``version``: ``instruction`` (default ``INSTRUCTION``), version filled in."""
    return (instruction if instruction is not None else INSTRUCTION).replace("{version}", f"version {version}")


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


__all__ = [
    "INSTRUCTION",
    "STATUSES",
    "ParsedAnswer",
    "answer_closed",
    "completion_text",
    "format_answer",
    "instruction_for",
    "parse_answer",
    "target_text",
]
