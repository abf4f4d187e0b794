"""GRPO math on literal tensors: advantages (incl. a zero-variance group), the clipped token loss, KL, temperature."""

import math

import pytest
import torch

from drg_llama.models.grpo import (
    clipped_token_loss,
    combine_rewards,
    group_advantages,
    k3_kl,
    token_log_probs,
)

NAN = math.nan


def test_group_advantages_with_a_zero_variance_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])  # two groups of G=4; the second is constant
    adv, zero = group_advantages(rewards, 4, "group")
    std = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)  # unbiased (Bessel) std of [1, 0, 0, 0], as TRL
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4)
    torch.testing.assert_close(adv[:4], expected)
    torch.testing.assert_close(adv[4:], torch.zeros(4))  # 0 / (0 + eps): no signal, no NaN
    assert zero.tolist() == [False] * 4 + [True] * 4


def test_group_advantages_without_std_scaling_and_with_batch_std():
    rewards = torch.tensor([2.0, 0.0, 1.0, 1.0])
    adv, _ = group_advantages(rewards, 2, "none")
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0, 0.0]))
    adv, zero = group_advantages(rewards, 2, "batch")
    batch_std = rewards.std().item()  # unbiased, over all four
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0, 0.0]) / (batch_std + 1e-4))
    assert zero.tolist() == [False, False, True, True]


def test_unscorable_rows_get_zero_advantage_and_do_not_move_the_baseline():
    per_fn = torch.tensor([[1.0, NAN], [NAN, NAN], [0.0, 0.0], [0.0, NAN]])  # row 1: every reward said None
    rewards = combine_rewards(per_fn, torch.tensor([1.0, 2.0]))
    assert rewards[0] == 1.0 and math.isnan(rewards[1]) and rewards[2] == 0.0
    adv, _ = group_advantages(torch.tensor([1.0, NAN, 0.0, 0.0, 1.0, 1.0]), 3, "none")
    torch.testing.assert_close(adv, torch.tensor([0.5, 0.0, -0.5, -2 / 3, 1 / 3, 1 / 3]))
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), 2, "median")


def test_token_log_probs_use_the_sampling_temperature():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])  # [1, 2, 3]
    targets = torch.tensor([[0, 2]])
    at_half = token_log_probs(logits, targets, temperature=0.5)
    expected0 = 4.0 - math.log(math.exp(4.0) + 1.0 + math.exp(-2.0))  # softmax(logits / 0.5)
    torch.testing.assert_close(at_half, torch.tensor([[expected0, -math.log(3.0)]]))
    at_one = token_log_probs(logits, targets, temperature=1.0)
    assert at_one[0, 0] != pytest.approx(at_half[0, 0].item())


def test_clipped_loss_on_literal_ratios():
    # ratios exp(logp - old): 1.5 and 0.5 on row 0 (A = +1), 1.5 and 0.5 on row 1 (A = -1); row 1's last token masked
    old = torch.zeros(2, 3)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]])).requires_grad_()
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = clipped_token_loss(logps, old, adv, mask, epsilon_low=0.2, epsilon_high=0.3)
    # A>0: -min(r, clip(r, 0.8, 1.3)) -> -1.3, -0.5, -1.0 ; A<0: -min(-r, -clip(r)) = max(r, clip(r)) -> 1.5, 0.8
    per_token = torch.tensor([-1.3, -0.5, -1.0, 1.5, 0.8])
    assert out["loss"].item() == pytest.approx(per_token.sum().item() / 5)
    assert out["tokens"].item() == 5 and out["clipped"].item() == 2  # (r=1.5, A=+1) and (r=0.5, A=-1)
    out["loss"].backward()
    # the clipped token and the (r=0.5, A=-1) token, where the clip range is the binding side, get no gradient
    grad = logps.grad
    assert grad[0, 0] == 0 and grad[1, 1] == 0 and grad[1, 2] == 0
    assert grad[0, 1].item() == pytest.approx(-0.5 / 5) and grad[1, 0].item() == pytest.approx(1.5 / 5)


def test_micro_batches_normalised_by_the_global_token_count_sum_to_the_full_loss():
    torch.manual_seed(0)
    logps = torch.randn(4, 6) * 0.1
    old = logps + torch.randn(4, 6) * 0.05
    adv = torch.tensor([1.0, -0.5, 0.3, 0.0])
    mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4, [1] * 5 + [0], [1] * 3 + [0] * 3])
    full = clipped_token_loss(logps, old, adv, mask)["loss"]
    total = mask.sum()
    halves = (slice(0, 1), slice(1, 4))
    parts = [clipped_token_loss(logps[s], old[s], adv[s], mask[s], num_tokens=total)["loss"] for s in halves]
    torch.testing.assert_close(sum(parts), full)
    # per-micro-batch means would weight the short completions more: not the same loss
    means = [clipped_token_loss(logps[s], old[s], adv[s], mask[s])["loss"] for s in halves]
    assert abs(sum(means) / 2 - full) > 1e-4


def test_kl_term():
    logps = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    kl = k3_kl(logps, ref)
    torch.testing.assert_close(kl, torch.tensor([[0.5 - math.log(0.5) - 1, 0.0]]))
    assert (kl >= 0).all()
    mask = torch.ones(1, 2)
    out = clipped_token_loss(logps, logps, torch.zeros(1), mask, ref_logps=ref, beta=0.1)
    assert out["loss"].item() == pytest.approx(0.1 * kl.sum().item() / 2)
    assert out["kl_sum"].item() == pytest.approx(kl.sum().item())
    with pytest.raises(ValueError):
        clipped_token_loss(logps, logps, torch.zeros(1), mask, beta=0.1)


def test_one_step_on_policy_gradient_is_the_advantage_weighted_score():
    """With old = logps.detach() the ratio is 1 and the gradient is -A / n_tokens per token (policy gradient)."""
    logps = torch.log(torch.tensor([[0.3, 0.6], [0.2, 0.9]])).requires_grad_()
    out = clipped_token_loss(logps, logps.detach(), torch.tensor([2.0, -1.0]), torch.ones(2, 2))
    out["loss"].backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.5, -0.5], [0.25, 0.25]]))
    assert out["clipped"].item() == 0
