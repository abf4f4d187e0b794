"""The reasoner's data (drg_llama.data.reasoner): prompts, SFT targets, batches, the training order and resume."""

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from drg_llama.data.reasoner import EpochShuffle, ReasonerDataModule, build_prompts, prompt_parts
from drg_llama.drg.answers import parse_answer, target_text
from drg_llama.errors import UserError
from drg_llama.models.backbone import build_causal_lm_backbone
from tests.test_generation import tiny_backbone


class _ChatTokenizer:
    """Stands in for a tokenizer with a chat template: one id per character, template markers as text."""

    chat_template = "x"
    bos_token_id = None

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        body = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
        return body + ("<assistant>" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [[ord(c) for c in t] for t in text]}


def test_the_note_is_truncated_and_the_instruction_never_is():
    tok = _ChatTokenizer()
    instruction = "Explain MS-DRG, CC and MCC. " * 20  # long: must survive whole
    parts = prompt_parts(tok, instruction)
    note = "A" * 50 + "B" * 50
    (prompt,) = build_prompts(tok, [note], parts, max_note_tokens=10, truncation="head_tail")
    text = "".join(chr(i) for i in prompt)
    assert text == f"<system>{instruction}</><user>Hospital course:\nAAAAABBBBB</><assistant>"
    (short,) = build_prompts(tok, ["tiny"], parts, max_note_tokens=10, truncation="tail")
    assert "".join(chr(i) for i in short).endswith("Hospital course:\ntiny</><assistant>")


def test_plain_prompt_without_chat_template_and_targets():
    _, tok = build_causal_lm_backbone(tiny_backbone())
    assert tok.chat_template is None  # the byte tokenizer: documented plain layout
    parts = prompt_parts(tok, "Give the DRG.")
    (prompt,) = build_prompts(tok, ["x" * 100], parts, max_note_tokens=8, truncation="head")
    text = tok.decode(prompt, skip_special_tokens=True)
    assert text == "### Instruction\nGive the DRG.\n\n### Hospital course\nxxxxxxxx\n\n### Response\n"
    assert prompt[0] == tok.bos_token_id
    target = target_text(291, "v43", "I50.9 is the principal diagnosis.")
    assert parse_answer(target).drg == 291 and parse_answer(target).format_ok
    assert parse_answer(target_text(871, "v43", None)).format_ok  # answer-only: an empty think block


# ----------------------------------------------------------------------------------------------------------------
# the data module


def tiny_reasoner_data(**settings) -> ReasonerDataModule:
    """The tiny synthetic corpus (300 admissions) as prompts for the byte tokenizer."""
    data = ReasonerDataModule(synthetic_n=300, instruction="Give the DRG.", max_note_tokens=32, **settings)
    data.set_tokenizer(build_causal_lm_backbone(tiny_backbone())[1])
    return data


def test_batches_hold_prompts_targets_and_gold_never_text(cache):
    data = tiny_reasoner_data(limit_train=8, limit_val=4, limit_test=4, batch_size=4, rationale="answer_only")
    assert data.label_space.variant == "single_label"  # one class per DRG: the reasoner answers DRGs
    tok = data.tokenizer
    train = next(iter(data.train_dataloader()))
    assert {"prompt_ids", "prompt_mask", "drg_code", "row", "input_ids", "attention_mask", "labels"} <= set(train)
    assert not {k for k, v in train.items() if not isinstance(v, torch.Tensor)}  # tensors only: no text
    frame = pd.read_parquet(data.prepared_dir / "train.parquet").iloc[:8]
    for i, row in enumerate(train["row"].tolist()):
        # the target is the gold DRG in the answer format, and the only labelled tokens
        target = train["labels"][i][train["labels"][i] >= 0].tolist()
        assert parse_answer(tok.decode(target, skip_special_tokens=True)).drg == frame["drg_code"][row]
        assert train["drg_code"][i] == frame["drg_code"][row]
        prompt = tok.decode(train["prompt_ids"][i][train["prompt_mask"][i].bool()].tolist(), skip_special_tokens=True)
        assert prompt.startswith("### Instruction\nGive the DRG.") and prompt.endswith("### Response\n")
    test = next(iter(data.test_dataloader()))
    assert "labels" not in test and test["row"].tolist() == [0, 1, 2, 3]  # no targets, in row order
    assert (
        data.split_frame("test")["hadm_id"].tolist()
        == pd.read_parquet(data.prepared_dir / "test.parquet").iloc[:4]["hadm_id"].tolist()
    )
    texts = next(iter(data.texts_dataloader(["sepsis", "heart failure"])))
    assert texts["row"].tolist() == [0, 1] and (texts["drg_code"] == -1).all()


def test_grounded_targets_are_counted(cache):
    data = tiny_reasoner_data(limit_train=8, limit_val=4, rationale="grounded")
    targets = [r["completion"] for r in data.examples("train")]
    assert all(t is not None for t in targets) and data.examples("test")[0]["completion"] is None
    assert sum(data.rationale_counts.values()) == 8  # train rows; val adds its own when built
    assert data.rationale_counts.get("grounded", 0) > 0


def test_the_first_epoch_keeps_the_order_of_a_shuffled_loader_and_resume_skips_trained_rows():
    shuffled = list(DataLoader(range(10), shuffle=True, generator=torch.Generator().manual_seed(3)))
    sampler = EpochShuffle(10, seed=3)
    assert list(sampler) == [int(x) for x in shuffled]  # runs trained before this sampler existed repeat
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(10)) and second != list(EpochShuffle(10, seed=3))
    sampler.skip_on_resume(epoch=1, rows=4)
    assert list(sampler) == second[4:]  # the rows of the 2 batches (of 2) trained before the stop are left out
    assert list(sampler) == second  # once only


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"truncation": "middle"}, "truncation must be one of"),
        ({"rationale": "teacher"}, "rationale must be one of"),
        ({"max_note_tokens": 0}, "max_note_tokens must be >= 1"),
        ({"batch_size": 0}, "batch_size and eval_batch_size must be >= 1"),
    ],
)
def test_bad_options_are_user_errors(option, message):
    with pytest.raises(UserError, match=message):
        ReasonerDataModule(**option)
