"""Answer parsing, each reward function on literal strings, and the scoring of generated answers."""

import pytest

from drg_llama.drg.answers import ParsedAnswer, completion_text, format_answer, parse_answer
from drg_llama.models.rewards import (
    REWARD_FUNCTIONS,
    exact_drg_reward,
    format_reward,
    invalid_drg_penalty,
    majority_vote,
    partial_drg_reward,
    score_answers,
)

GOOD = (
    "<think>I50.9 is the principal diagnosis; N17.0 is an MCC.</think>"
    "<answer>DRG 291: Heart Failure and Shock with MCC</answer>"
)


def test_parse_well_formed_answer():
    parsed = parse_answer(GOOD)
    assert parsed == ParsedAnswer(291, "ok", True, "I50.9 is the principal diagnosis; N17.0 is an MCC.")
    assert format_answer(291) == "<answer>DRG 291: Heart Failure and Shock with MCC</answer>"
    assert parse_answer(f"<think></think>{format_answer(871)}").drg == 871


@pytest.mark.parametrize(
    "text, drg, status, format_ok",
    [
        ("  <THINK> x </Think>\n\n< Answer >  drg   292 : whatever </ANSWER>  ", 292, "ok", True),
        ("<think>x</think><answer>MS-DRG #193</answer>", 193, "ok", True),
        ("<think>x</think><answer>291</answer>", 291, "ok", True),
        # by title, also MIMIC's abbreviated style, through the domain core's title mapping
        ("<think>x</think><answer>Heart failure and shock with MCC</answer>", 291, "ok", True),
        ("<think>x</think><answer>DRG: HEART FAILURE & SHOCK W MCC</answer>", 291, "ok", True),
        # the last answer block wins; text around the blocks breaks the format but not the answer
        ("<answer>DRG 292</answer> no wait <answer>DRG 291</answer>", 291, "ok", False),
        ("preamble <think>x</think><answer>DRG 291</answer>", 291, "ok", False),
        # unterminated answer: read what is there, but the format is wrong
        ("<think>x</think><answer>DRG 291: Heart", 291, "ok", False),
        # codes that do not exist in v43
        ("<think>x</think><answer>DRG 999999</answer>", None, "invalid_drg", True),
        ("<think>x</think><answer>DRG 247</answer>", None, "invalid_drg", True),  # PCI code before v41
        ("<think>x</think><answer>Acute Unicorn Syndrome with MCC</answer>", None, "invalid_drg", True),
        ("<think>x</think><answer>   </answer>", None, "empty", True),
        ("<think>x</think><answer>DRG</answer>", None, "empty", True),
        ("<think>only thinking, never answered", None, "missing", False),
        ("", None, "missing", False),
        ("<answer><answer></answer>", None, "empty", False),
    ],
)
def test_parse_malformed_outputs_never_raise(text, drg, status, format_ok):
    parsed = parse_answer(text)
    assert (parsed.drg, parsed.status, parsed.format_ok) == (drg, status, format_ok)


def test_parse_depends_on_the_target_version():
    assert parse_answer("<answer>DRG 247</answer>", "v40").drg == 247
    assert parse_answer("<answer>DRG 247</answer>", "v43").status == "invalid_drg"


def test_completion_text_accepts_trl_conversational_completions():
    assert completion_text([{"role": "assistant", "content": GOOD}]) == GOOD
    assert completion_text(None) == ""


COMPLETIONS = [
    GOOD,  # exact
    "<think>x</think><answer>DRG 292: Heart Failure and Shock with CC</answer>",  # right base, wrong severity
    "<think>x</think><answer>DRG 193</answer>",  # wrong base (pneumonia), same severity set {MCC}
    "<think>x</think><answer>DRG 9999</answer>",  # does not exist
    "DRG 291",  # no tags at all
]


def test_format_reward():
    assert format_reward(completions=COMPLETIONS) == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_exact_reward():
    assert exact_drg_reward(completions=COMPLETIONS, drg_code=[291] * 5) == [1.0, 0.0, 0.0, 0.0, 0.0]
    # no gold label: the reward does not apply (TRL skips None)
    assert exact_drg_reward(completions=COMPLETIONS[:2]) == [None, None]
    assert exact_drg_reward(completions=COMPLETIONS[:2], drg_code=[None, float("nan")]) == [None, None]


def test_partial_reward_uses_the_family_table():
    assert partial_drg_reward(completions=COMPLETIONS, drg_code=[291] * 5) == [1.0, 0.5, 0.5, 0.0, 0.0]
    # 872 (without MCC) admits {NONE, CC}; 871 {MCC}: same base, different severity set
    assert partial_drg_reward(completions=["<answer>DRG 871</answer>"], drg_code=[872]) == [0.5]


def test_invalid_drg_penalty():
    assert invalid_drg_penalty(completions=COMPLETIONS) == [0.0, 0.0, 0.0, -1.0, 0.0]


def test_rewards_take_trl_keyword_arguments():
    """Every reward accepts TRL's call (prompts, completions, completion_ids, columns, extra kwargs)."""
    kwargs = {
        "prompts": ["p"] * 2,
        "completions": COMPLETIONS[:2],
        "completion_ids": [[1, 2], [3]],
        "drg_code": [291, 291],
        "drg_version": ["v43", "v43"],
        "trainer_state": None,
    }
    for name, fn in REWARD_FUNCTIONS.items():
        values = fn(**kwargs)
        assert len(values) == 2 and all(v is None or isinstance(v, float) for v in values), name


def test_majority_vote_and_scores():
    assert majority_vote([None, 292, 291, 291, 292]) == 292  # tie: the first seen wins
    assert majority_vote([None, None]) is None
    greedy = [parse_answer(c) for c in COMPLETIONS[:4]]
    sampled = [[parse_answer(COMPLETIONS[1]), parse_answer(COMPLETIONS[0])]] * 4
    scores = score_answers(greedy, [291, 291, 193, 291], "v43", sampled)
    assert scores["pass1_greedy"] == 0.5  # rows 0 and 2
    assert scores["format_valid"] == 1.0 and scores["invalid_drg"] == 0.25 and scores["no_answer"] == 0.0
    assert scores["answer_base_acc"] == 0.75  # row 1 has the right family; row 3 is invalid
    assert scores["pass_at_k"] == 0.75 and scores["pass1_sampled"] == pytest.approx(0.375)
    assert scores["maj_at_k"] == 0.0  # 292 was voted first, then 291: a tie goes to 292
    assert scores["top_answer_share"] == 0.25  # four different answers (no answer is one of them)
    collapsed = score_answers([greedy[0]] * 3 + [greedy[3]], [291, 292, 193, 291])
    assert collapsed["top_answer_share"] == 0.75 and collapsed["pass1_greedy"] == 0.25
    with pytest.raises(ValueError):
        score_answers(greedy, [291])
