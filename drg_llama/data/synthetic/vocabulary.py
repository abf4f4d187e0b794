"""The synthetic corpus's vocabulary: word lists and sentence templates, read from the YAML files beside this module.

    vocabulary/principals.yaml   curated principal problems: codes, lay names and the note's sentences
    vocabulary/mdc_tail.yaml     generic wording of long-tail principal diagnoses, by MDC
    vocabulary/secondary.yaml    conditions that can be CCs/MCCs, and how an uncoded one is mentioned
    vocabulary/chronic.yaml      chronic non-CC comorbidities
    vocabulary/phrases.yaml      free text around the coded facts (filler, distractors, exams, ...)

The files are data, edited as data; the generator holds no word list. They are read once per process on first use
(:func:`vocabulary`; forked workers inherit it), and every list comes back as a tuple, so nothing can change them.

Template mini-language, expanded by :func:`fill`:

* ``{a|b|c}``: one alternative, uniformly;
* ``{3-9}`` an integer, ``{1.2-3.5}`` a number with as many decimals as the bounds;
* ``{he} {He} {his} {His} {him} {pt} {age} {n} {N}``: pronouns, "Mr. ___"/"Ms. ___", age, and the name of the
  condition being described (``{N}`` capitalised).
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

FOLDER = Path(__file__).with_name("vocabulary")


@dataclass(frozen=True)
class Vocabulary:
    """Everything the generator writes from; see each file's opening comment for what its fields mean."""

    principals: tuple[dict[str, Any], ...]
    mdc_tail: dict[str, dict[str, Any]]
    secondary: tuple[dict[str, Any], ...]
    chronic: tuple[dict[str, Any], ...]
    distractors: tuple[str, ...]
    filler: tuple[dict[str, Any], ...]
    """Day-by-day sentences: ``text`` and the concepts it ``contradicts`` (a frozenset)."""
    problem_updates: tuple[str, ...]
    dispositions: dict[int, tuple[str, ...]]
    """By CMS discharge status."""
    instructions: tuple[str, ...]
    exams: tuple[str, ...]
    allergies: tuple[str, ...]


@functools.cache
def vocabulary() -> Vocabulary:
    """The vocabulary, read from :data:`FOLDER` once per process."""
    phrases = _read("phrases.yaml")
    filler = tuple(dict(entry, contradicts=frozenset(entry["contradicts"])) for entry in phrases.pop("filler"))
    return Vocabulary(
        principals=_read("principals.yaml"),
        mdc_tail=_read("mdc_tail.yaml"),
        secondary=_read("secondary.yaml"),
        chronic=_read("chronic.yaml"),
        filler=filler,
        **phrases,
    )


def _read(name: str) -> Any:
    path = FOLDER / name
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when installed: the same data, ten times faster
    try:
        with path.open(encoding="utf-8") as fh:
            return _frozen(yaml.load(fh, Loader=loader))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing; it ships with drg-llama, so reinstall the package") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path} is not valid YAML{where}; undo the last edit of that file") from None


def _frozen(value: Any) -> Any:
    """Lists as tuples, all the way down (mappings stay mappings)."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    return value


_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+(?:\.(\d+))?)-(\d+(?:\.(\d+))?)$")


def fill(template: str, rng: random.Random, ctx: dict[str, str]) -> str:
    """Expand the template mini-language (see the module docstring), innermost braces first."""

    def one(match: re.Match) -> str:
        body = match.group(1)
        if body in ctx:
            return ctx[body]
        if "|" in body:
            return rng.choice(body.split("|"))
        rmatch = _RANGE.match(body)
        if rmatch:
            lo, hi = float(rmatch.group(1)), float(rmatch.group(3))
            decimals = max(len(rmatch.group(2) or ""), len(rmatch.group(4) or ""))
            if decimals == 0:
                return str(rng.randint(int(lo), int(hi)))
            return f"{rng.uniform(lo, hi):.{decimals}f}"
        return body

    while "{" in template:
        expanded = _BRACES.sub(one, template)
        if expanded == template:
            break
        template = expanded
    return template
