"""Truncation of token ids inside the tokenizer's special tokens (drg_llama.data.tokenization), on literal ids.

Run: pytest tests/test_tokenization.py
"""

import pytest

from drg_llama.data.tokenization import encode_texts, special_tokens, truncate_ids
from tests.test_datamodule import note, word_tokenizer


def test_truncate_ids_modes():
    ids = list(range(10))
    assert truncate_ids(ids, 4, "head") == [0, 1, 2, 3]
    assert truncate_ids(ids, 4, "tail") == [6, 7, 8, 9]
    assert truncate_ids(ids, 4, "head_tail") == [0, 1, 8, 9]
    assert truncate_ids(ids, 5, "head_tail") == [0, 1, 2, 8, 9]
    assert truncate_ids(ids, 1, "head_tail") == [0]
    assert truncate_ids(ids, 20, "tail") == ids
    with pytest.raises(ValueError, match="truncation"):
        truncate_ids(ids, 4, "middle")


@pytest.mark.parametrize("bos_eos", [True, False])
def test_truncation_keeps_special_tokens(bos_eos):
    tok = word_tokenizer(bos_eos)
    text = note(20)  # w0 .. w19 -> ids 4 .. 23
    words = list(range(4, 24))
    prefix, suffix = special_tokens(tok)
    assert (prefix, suffix) == (([2], [3]) if bos_eos else ([], []))
    budget = 10 - len(prefix) - len(suffix)
    assert encode_texts(tok, [text], 10, "head")[0] == prefix + words[:budget] + suffix
    assert encode_texts(tok, [text], 10, "tail")[0] == prefix + words[-budget:] + suffix
    half = (budget + 1) // 2
    assert encode_texts(tok, [text], 10, "head_tail")[0] == prefix + words[:half] + words[-(budget - half) :] + suffix
    assert encode_texts(tok, [note(3)], 10, "head")[0] == prefix + [4, 5, 6] + suffix
