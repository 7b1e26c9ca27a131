"""Group-relative advantages, the dynamic-sampling mask and the k3 KL estimator, against values worked out by hand."""

import math

import pytest
import torch

from rvla_peft.algorithms import group_advantages, grpo_advantages, informative_groups, kl_k3, rloo_advantages

F64 = torch.float64


def test_rloo_is_each_outcome_minus_the_mean_of_the_others():
    outcomes = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=F64)
    # row 0: others' mean for a success (1 + 0 + 0) / 3 = 1/3, for a failure (1 + 0 + 1) / 3 = 2/3
    # row 1: success: (1 + 1 + 0) / 3 = 2/3 -> 1/3; failure: (1 + 1 + 1) / 3 = 1 -> -1
    expected = torch.tensor(
        [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [1 / 3, 1 / 3, 1 / 3, -1.0], [0.0, 0.0, 0.0, 0.0]], dtype=F64
    )
    torch.testing.assert_close(rloo_advantages(outcomes), expected, rtol=0, atol=1e-12)
    # returns, G = 3: 3 - (1 + 2) / 2 = 1.5, 1 - (3 + 2) / 2 = -1.5, 2 - (3 + 1) / 2 = 0
    torch.testing.assert_close(
        rloo_advantages(torch.tensor([[3.0, 1.0, 2.0]], dtype=F64)),
        torch.tensor([[1.5, -1.5, 0.0]], dtype=F64),
        rtol=0,
        atol=1e-12,
    )
    torch.testing.assert_close(group_advantages(outcomes, "rloo"), expected, rtol=0, atol=1e-12)


def test_grpo_normalises_by_the_groups_sample_std():
    outcomes = torch.tensor([[1.0, 1.0, 1.0, 0.0], [3.0, 1.0, 2.0, 2.0]], dtype=F64)
    # row 0: mean 0.75, squared deviations 3 x 0.0625 + 0.5625 = 0.75, / (G - 1) = 0.25, std 0.5
    # row 1: mean 2, squared deviations 1 + 1 + 0 + 0 = 2, / 3, std sqrt(2/3)
    s = math.sqrt(2 / 3)
    expected = torch.tensor([[0.5, 0.5, 0.5, -1.5], [1 / s, -1 / s, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(grpo_advantages(outcomes, eps=0.0), expected, rtol=0, atol=1e-12)
    # TRL's eps = 1e-4 in the denominator
    torch.testing.assert_close(
        grpo_advantages(outcomes)[0],
        torch.tensor([0.25, 0.25, 0.25, -0.75], dtype=F64) / (0.5 + 1e-4),
        rtol=0,
        atol=1e-12,
    )
    torch.testing.assert_close(group_advantages(outcomes, "grpo"), grpo_advantages(outcomes), rtol=0, atol=0)


def test_a_group_of_equal_outcomes_has_zero_advantage_not_nan():
    same = torch.ones(2, 5)
    assert torch.equal(grpo_advantages(same), torch.zeros(2, 5))
    assert torch.equal(rloo_advantages(same), torch.zeros(2, 5))


def test_groups_need_two_episodes_and_a_known_algorithm():
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="at least 2"):
        grpo_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="rloo"):
        group_advantages(torch.ones(3, 2), "ppo")


def test_informative_groups_drops_all_success_and_all_failure():
    outcomes = torch.tensor([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]])
    assert informative_groups(outcomes).tolist() == [True, False, False, True, False]


def test_k3_by_hand():
    log = math.log
    log_prob = torch.tensor([log(0.5), log(0.5), 0.0, log(0.25)], dtype=F64)
    ref = torch.tensor([log(0.5), log(0.25), log(0.5), log(0.5)], dtype=F64)
    # r = ref - logp: 0, log 1/2, log 1/2, log 2; exp(r) - r - 1
    expected = torch.tensor([0.0, log(2) - 0.5, log(2) - 0.5, 1 - log(2)], dtype=F64)
    torch.testing.assert_close(kl_k3(log_prob, ref), expected, rtol=0, atol=1e-12)


def test_k3_averaged_over_the_policy_is_the_exact_kl():
    """E_{a ~ p}[k3] = KL(p || q): p = (0.5, 0.5), q = (0.25, 0.75)."""
    p, q = torch.tensor([0.5, 0.5], dtype=F64), torch.tensor([0.25, 0.75], dtype=F64)
    estimate = (p * kl_k3(p.log(), q.log())).sum()
    exact = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert estimate.item() == pytest.approx(exact, abs=1e-12)


def test_k3_stays_finite_far_from_the_reference():
    out = kl_k3(torch.tensor([-200.0]), torch.tensor([0.0]))  # r = 200, clamped to 20
    assert torch.isfinite(out).all() and out.item() == pytest.approx(math.exp(20) - 21)
