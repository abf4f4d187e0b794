"""Tokenisation: how a note becomes at most ``max_length`` token ids, and which tokenizer did it.

The data module tokenises every split once (``DRGDataModule.tokenize_split``) and the reasoner builds its prompts
with the same truncation, so both read the rules here. The tokenizer itself comes from
``drg_llama.pretrained.load_tokenizer`` (the model needs the same loader, and models/ never imports data/).

* **Truncation** happens on token ids, inside the tokenizer's special tokens (BOS/EOS kept): ``head`` keeps the
  first tokens, ``tail`` the last, ``head_tail`` the first and last halves (discharge notes put the final diagnoses
  and procedures late in the course).
* **Fingerprint** (:func:`tokenizer_fingerprint`): a hash of what the tokenizer does, so tokenised caches are keyed
  by content, not by where the tokenizer was loaded from.

    from drg_llama.data.tokenization import encode_texts
    from drg_llama.pretrained import load_tokenizer
    encode_texts(load_tokenizer("byte"), ["Admitted with sepsis."], max_length=16, truncation="head_tail")
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

#: Which tokens of a longer note are kept.
TRUNCATIONS = ("head", "tail", "head_tail")


# ----------------------------------------------------------------------------------------------------------------
# Token ids of a note (pure functions, tested on literal ids)
# ----------------------------------------------------------------------------------------------------------------


def truncate_ids(ids: Sequence[int], budget: int, mode: str) -> list[int]:
    """Cut a token sequence to at most ``budget`` tokens.

    Args:
        ids: Token ids of the text, without special tokens.
        budget: Tokens to keep (``max_length`` minus the special tokens).
        mode: ``head`` (first tokens), ``tail`` (last tokens) or ``head_tail`` (first ``ceil(budget/2)`` and last
            ``floor(budget/2)``).

    Returns:
        The kept ids, in their original order.
    """
    ids = list(ids)
    if len(ids) <= budget:
        return ids
    if budget <= 0:
        return []
    if mode == "head":
        return ids[:budget]
    if mode == "tail":
        return ids[-budget:]
    if mode == "head_tail":
        head = (budget + 1) // 2
        tail = budget - head
        return ids[:head] + (ids[-tail:] if tail else [])
    raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {mode!r}")


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """Ids the tokenizer adds before and after a text (e.g. LLaMA: ``[<s>]``, ``[]``; SmolLM2: ``[]``, ``[]``).

    Found by encoding a probe with and without special tokens, so it works for any post-processor.
    """
    probe = "drg"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain) :])
    return [], []  # an unusual post-processor that rewrites the text's ids: add nothing rather than guess


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what the tokenizer does (vocabulary, merges, normaliser, special tokens), not of its name.

    Two tokenizers loaded from different paths but with the same content share a tokenised cache; a changed one
    never reuses a stale cache.
    """
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizer: its vocabulary is the best content proxy we have
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(special_tokens(tokenizer)).encode())
    return h.hexdigest()[:16]


def encode_texts(tokenizer, texts: Sequence[str], max_length: int, truncation: str) -> list[list[int]]:
    """Token ids of ``texts``: the text's ids truncated to fit ``max_length`` together with the special tokens."""
    prefix, suffix = special_tokens(tokenizer)
    budget = max_length - len(prefix) - len(suffix)
    if budget < 1:
        raise ValueError(f"max_length={max_length} leaves no room for text after {len(prefix) + len(suffix)} specials")
    # verbose=False: the "longer than model_max_length" warning is expected, we truncate right after.
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [prefix + truncate_ids(ids, budget, truncation) + suffix for ids in encoded]
