"""Label spaces and the joint decoder (numpy and torch give the same numbers)."""

import math

import numpy as np
import pytest
import torch

from drg_llama.drg import DRGFacts, LabelSpace, Severity, drg_llama_decode, drg_llama_severity_code, get_table


def test_single_label_space_round_trip():
    space = LabelSpace.build("v43", "single_label", [872, 291, 291, 193])
    assert space.drgs == (193, 291, 872) and space.num_outputs == 3
    assert space.decode([space.index(d) for d in (291, 872)]) == [291, 872]
    assert LabelSpace.from_dict(space.to_dict()) == space
    with pytest.raises(KeyError, match="not a class"):
        space.index(292)


def test_two_label_space_contains_whole_families():
    space = LabelSpace.build("v43", "two_label", [292, 872])
    assert space.bases == (291, 871)
    assert space.drgs == (291, 292, 293, 871, 872)
    assert space.num_outputs == 2 + 3
    index, base, mask = space.encode(872)
    assert space.drgs[index] == 872 and space.bases[base] == 871 and mask == (True, True, False)


def test_error_drgs_are_never_classes():
    assert 998 not in LabelSpace.build("v43", "single_label")
    with pytest.raises(ValueError, match="error DRGs"):
        LabelSpace("v43", "single_label", (291, 999))


def test_joint_decoder_hand_computed_example():
    space = LabelSpace.build("v43", "two_label", [291, 871])  # classes 291 292 293 871 872
    p_base = np.array([[0.7, 0.3]])  # 291-family, 871-family
    p_sev = np.array([[0.2, 0.5, 0.3]])  # NONE, CC, MCC
    scores = np.exp(space.joint_log_scores(np.log(p_base), np.log(p_sev)))[0]
    expected = {291: 0.7 * 0.3, 292: 0.7 * 0.5, 293: 0.7 * 0.2, 871: 0.3 * 0.3, 872: 0.3 * (0.2 + 0.5)}
    assert dict(zip(space.drgs, scores)) == pytest.approx(expected)
    assert scores.sum() == pytest.approx(1.0)
    # Ranking: 292 first; 872 (0.21) ties 291 (0.21), both above 293 (0.14) although NONE alone is 0.2.
    assert space.drgs[int(scores.argmax())] == 292
    # Independent argmax would pick base 291 and severity CC -> 292 too, but the joint decode differs when the
    # severity mass is split: with p_sev = (0.4, 0.35, 0.25) on the 871 family, argmax says NONE -> 872 and the
    # joint decode agrees (0.75); on the 291 family it says 293 with 0.4 while 872's family gets 0.75.
    p_base2, p_sev2 = np.array([[0.55, 0.45]]), np.array([[0.4, 0.35, 0.25]])
    joint = np.exp(space.joint_log_scores(np.log(p_base2), np.log(p_sev2)))[0]
    assert space.drgs[int(joint.argmax())] == 872  # 0.45 * 0.75 = 0.3375 > 0.55 * 0.4 = 0.22
    logits = np.log(np.concatenate([p_base2, p_sev2], axis=1))
    assert space.argmax_decode(logits) == [293]  # independent argmax picks base 291 + NONE


def test_joint_decoder_is_a_distribution_and_torch_matches_numpy():
    space = LabelSpace.build("v43", "two_label")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, space.num_outputs)) * 3
    lp_np = space.drg_log_probs(logits)
    assert lp_np.shape == (6, space.num_classes)
    np.testing.assert_allclose(np.exp(lp_np).sum(-1), 1.0, atol=1e-9)
    lp_t = space.drg_log_probs(torch.tensor(logits))
    assert isinstance(lp_t, torch.Tensor)
    np.testing.assert_allclose(lp_t.numpy(), lp_np, atol=1e-9)
    # gradients flow through the torch path
    x = torch.tensor(logits, requires_grad=True)
    space.drg_log_probs(x)[:, 0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_single_label_log_probs():
    space = LabelSpace.build("v43", "single_label", [291, 292, 293])
    lp = space.drg_log_probs(np.array([[0.0, math.log(2), math.log(3)]]))
    np.testing.assert_allclose(np.exp(lp), [[1 / 6, 2 / 6, 3 / 6]])


def test_drg_llama_codes_and_fallback():
    assert [drg_llama_severity_code(d) for d in (293, 292, 291, 872, 313)] == [0, 1, 2, 3, 4]
    assert drg_llama_decode(871, 3) == 872 and drg_llama_decode(291, 2) == 291
    # invalid pair: "without MCC" in a three-way family falls back to its NONE member
    assert drg_llama_decode(291, 3) == 293
    assert drg_llama_decode(871, 1) == get_table("v43").recombine(871, Severity.CC) == 872


def test_class_facts_are_the_one_source_of_per_class_drg_facts():
    space = LabelSpace.build("v43", "two_label", [292, 872])  # classes 291 292 293 871 872
    facts = space.class_facts
    assert facts.base.tolist() == [291, 291, 291, 871, 871]
    assert facts.severities.tolist() == [{"MCC"}, {"CC"}, {"NONE"}, {"MCC"}, {"NONE", "CC"}]
    assert facts.mdc.tolist() == ["05", "05", "05", "18", "18"]
    np.testing.assert_allclose(facts.weight, [get_table("v43")[d].weight for d in space.drgs])  # CMS Table 5
    # the decoder's severity mask is read from the same facts
    assert space.allowed_mask.tolist() == [[s.value in allowed for s in Severity] for allowed in facts.severities]
    # any DRG of the version, class or not; codes outside it never agree with anything
    other = space.facts([190, 12345, None])
    assert other.base.tolist() == [190, -1, -1] and other.mdc.tolist() == ["04", "?", "?"]
    assert other.severities[1] == frozenset() and np.isnan(other.weight[1:]).all()
    top1 = facts.take([1, 4, 0])  # predicted 292, 872, 291
    same = top1.agreement(DRGFacts.of([281, 871, 12345], "v43"))  # gold 281 (AMI, with CC), 871, unknown
    assert same["base"].tolist() == [False, True, False]
    assert same["severity"].tolist() == [True, False, False]
    assert same["mdc"].tolist() == [True, True, False]
    unknown = DRGFacts.of([None], "v43")
    assert not any(v[0] for v in unknown.agreement(unknown).values())  # two unknown answers do not agree
    with pytest.raises(ValueError, match="cannot compare"):
        facts.agreement(other)
