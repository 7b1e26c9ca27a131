"""PPO maths against values worked out by hand or by independent Python loops."""

import math

import pytest
import torch

from rvla_peft.algorithms.ppo import (
    bootstrap_truncated,
    compute_gae,
    minibatch_indices,
    normalize_advantages,
    policy_loss,
    value_loss,
)

F64 = torch.float64


def test_bootstrap_truncated_changes_only_truncated_not_terminated():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], dtype=F64)
    truncated = torch.tensor([[True, True, False, False], [False, True, False, True]])
    terminated = torch.tensor([[False, True, True, False], [False, False, False, True]])
    nan = float("nan")
    # only [0,0] and [1,1] are truncated-not-terminated; NaN elsewhere must not leak
    final_values = torch.tensor([[10.0, nan, nan, nan], [nan, -20.0, nan, 99.0]], dtype=F64)
    out = bootstrap_truncated(rewards, truncated, terminated, final_values, gamma=0.9)
    # 1 + 0.9 * 10 = 10; 6 + 0.9 * -20 = -12
    expected = torch.tensor([[10.0, 2.0, 3.0, 4.0], [5.0, -12.0, 7.0, 8.0]], dtype=F64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_bootstrap_truncated_1d():
    rewards, final_values = torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0])
    out = bootstrap_truncated(rewards, torch.tensor([True, False]), torch.tensor([False, False]), final_values, 0.5)
    torch.testing.assert_close(out, torch.tensor([2.0, 1.0]), rtol=0, atol=0)


def test_compute_gae_by_hand():
    gamma, lam = 0.5, 0.5  # gamma * lambda = 0.25
    # columns: env 0, env 1
    rewards = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 1.0]], dtype=F64)
    values = torch.tensor([[0.5, 1.0], [1.0, 2.0], [1.5, 4.0]], dtype=F64)
    dones = torch.tensor([[False, False], [True, False], [False, True]])
    next_value = torch.tensor([2.0, 8.0], dtype=F64)
    # env 0 (episode ends at t=1; the new episode bootstraps from next_value=2):
    #   t=2: delta = 3 + 0.5*2 - 1.5 = 2.5,            A = 2.5
    #   t=1: done, delta = 2 - 1 = 1.0,                A = 1.0 (nothing flows from t=2)
    #   t=0: delta = 1 + 0.5*1.0 - 0.5 = 1.0,          A = 1.0 + 0.25*1.0 = 1.25
    # env 1 (ends at the last step, so next_value=8 is ignored):
    #   t=2: done, delta = 1 - 4 = -3,                 A = -3
    #   t=1: delta = 0 + 0.5*4 - 2 = 0,                A = 0 + 0.25*-3 = -0.75
    #   t=0: delta = 0 + 0.5*2 - 1 = 0,                A = 0 + 0.25*-0.75 = -0.1875
    adv, ret = compute_gae(rewards, values, dones, next_value, gamma=gamma, gae_lambda=lam)
    expected_adv = torch.tensor([[1.25, -0.1875], [1.0, -0.75], [2.5, -3.0]], dtype=F64)
    expected_ret = torch.tensor([[1.75, 0.8125], [2.0, 1.25], [4.0, 1.0]], dtype=F64)
    torch.testing.assert_close(adv, expected_adv, rtol=0, atol=1e-6)
    torch.testing.assert_close(ret, expected_ret, rtol=0, atol=1e-6)


def _random_rollout(seed, T=6, N=3):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(T, N, generator=g, dtype=F64)
    values = torch.randn(T, N, generator=g, dtype=F64)
    dones = torch.rand(T, N, generator=g) < 0.3
    dones[1, 0], dones[-1, 1], dones[:, 2] = True, True, False  # a mid-episode end, a final end, none at all
    next_value = torch.randn(N, generator=g, dtype=F64)
    return rewards, values, dones, next_value


def test_compute_gae_gamma1_lambda1_is_monte_carlo():
    rewards, values, dones, next_value = _random_rollout(0)
    _, ret = compute_gae(rewards, values, dones, next_value, gamma=1.0, gae_lambda=1.0)
    T, N = rewards.shape
    for n in range(N):
        for t in range(T):
            # undiscounted sum of rewards to the end of the episode, plus V(next obs) if it is still running at T
            total, k = 0.0, t
            while True:
                total += rewards[k, n].item()
                if dones[k, n]:
                    break
                if k == T - 1:
                    total += next_value[n].item()
                    break
                k += 1
            assert abs(ret[t, n].item() - total) < 1e-9, (t, n)


def test_compute_gae_lambda0_is_td_error():
    gamma = 0.9
    rewards, values, dones, next_value = _random_rollout(1)
    adv, _ = compute_gae(rewards, values, dones, next_value, gamma=gamma, gae_lambda=0.0)
    T, N = rewards.shape
    for n in range(N):
        for t in range(T):
            v_next = next_value[n].item() if t == T - 1 else values[t + 1, n].item()
            td = rewards[t, n].item() + gamma * (0.0 if dones[t, n] else v_next) - values[t, n].item()
            assert abs(adv[t, n].item() - td) < 1e-9, (t, n)


def test_normalize_advantages():
    out = normalize_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64), eps=0.0)
    # mean 2.5, population variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    s = math.sqrt(1.25)
    torch.testing.assert_close(out, torch.tensor([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s], dtype=F64))
    # a single sample normalises to 0, not NaN
    assert normalize_advantages(torch.tensor([3.0])).item() == 0.0


def test_policy_loss_by_hand():
    c = 0.2
    ratio = torch.tensor([1.1, 1.5, 0.5, 1.5, 0.5], dtype=F64)
    adv = torch.tensor([2.0, 1.0, 1.0, -1.0, -2.0], dtype=F64)
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, 0.0], dtype=F64)
    new = (old + ratio.log()).requires_grad_()
    # per-sample max(-A r, -A clip(r, 0.8, 1.2)):
    #   r=1.1 A=+2: max(-2.2, -2.2) = -2.2   (inside the range)
    #   r=1.5 A=+1: max(-1.5, -1.2) = -1.2   (clipped: no gain from pushing r higher)
    #   r=0.5 A=+1: max(-0.5, -0.8) = -0.5   (unclipped: pessimistic bound)
    #   r=1.5 A=-1: max( 1.5,  1.2) =  1.5   (unclipped)
    #   r=0.5 A=-2: max( 1.0,  1.6) =  1.6   (clipped)
    # mean = (-2.2 - 1.2 - 0.5 + 1.5 + 1.6) / 5 = -0.16
    loss, stats = policy_loss(new, old, adv, c)
    assert abs(loss.item() - (-0.16)) < 1e-12
    # d loss / d new_logprob = -A r / 5 on unclipped terms, 0 on clipped ones
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([-0.44, 0.0, -0.1, 0.3, 0.0], dtype=F64))
    # |r - 1| > 0.2 for 4 of 5
    assert abs(stats["clip_frac"].item() - 0.8) < 1e-12
    k3 = [(r - 1) - math.log(r) for r in (1.1, 1.5, 0.5, 1.5, 0.5)]
    assert abs(stats["approx_kl"].item() - sum(k3) / 5) < 1e-12
    assert not stats["approx_kl"].requires_grad


def test_policy_loss_on_policy_is_minus_mean_advantage():
    lp = torch.tensor([-1.0, -2.0, -3.0])
    loss, stats = policy_loss(lp, lp, torch.tensor([1.0, 2.0, 6.0]), 0.2)
    assert loss.item() == pytest.approx(-3.0)
    assert stats["approx_kl"].item() == 0.0 and stats["clip_frac"].item() == 0.0


def test_value_loss_by_hand():
    v = torch.tensor([3.0, 3.0, 1.0], dtype=F64)
    old = torch.tensor([1.0, 1.0, 1.2], dtype=F64)
    ret = torch.tensor([4.0, 2.0, 2.0], dtype=F64)
    # unclipped (v - R)^2 = [1, 1, 1] -> 0.5 * 1 = 0.5
    assert abs(value_loss(v, old, ret, None).item() - 0.5) < 1e-12
    # c = 0.5: v_clip = old + clip(v - old) = [1.5, 1.5, 1.0]; (v_clip - R)^2 = [6.25, 0.25, 1.0]
    # max with unclipped = [6.25, 1, 1] -> 0.5 * 8.25 / 3 = 1.375
    assert abs(value_loss(v, old, ret, 0.5).item() - 1.375) < 1e-12


def test_minibatch_indices_partition_and_determinism():
    parts = minibatch_indices(10, 3, torch.Generator().manual_seed(7), "cpu")
    assert [len(p) for p in parts] == [4, 3, 3]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    again = minibatch_indices(10, 3, torch.Generator().manual_seed(7), "cpu")
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    other = minibatch_indices(10, 3, torch.Generator().manual_seed(8), "cpu")
    assert not torch.equal(torch.cat(parts), torch.cat(other))
    assert torch.cat(parts).tolist() != list(range(10))  # shuffled
    with pytest.raises(ValueError):
        minibatch_indices(3, 4, None, "cpu")
