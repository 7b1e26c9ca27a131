"""Regularisers against hand values, independent loops, exact Jacobians and finite differences."""

import math

import pytest
import torch
from conftest import train_under_pixel_noise

from rvla_peft.objective import invariance_term
from rvla_peft.regularizers import (
    exact_jacobian_sq_norm,
    grad_norm_penalty,
    hutchinson_jacobian_sq_norm,
    rademacher,
    smoothness_penalty,
)

F64 = torch.float64


def _mlp_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(16, 3 * 8 * 8, generator=g, dtype=F64) / math.sqrt(3 * 8 * 8)
    b1 = torch.randn(16, generator=g, dtype=F64) * 0.1
    w2 = torch.randn(7, 16, generator=g, dtype=F64) / 4.0
    b2 = torch.randn(7, generator=g, dtype=F64) * 0.1
    return w1, b1, w2, b2


def _mlp(x, w1, b1, w2, b2):
    """[B, 3, 8, 8] -> [B, 7], per-sample, smooth and nonlinear."""
    h = torch.tanh(x.flatten(1) @ w1.T + b1)
    return torch.tanh(h @ w2.T + b2)


def _images(seed=1):
    g = torch.Generator().manual_seed(seed)
    # different scales per sample so the per-sample norms differ (catches mixing across the batch)
    scale = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=F64).view(4, 1, 1, 1)
    return torch.randn(4, 3, 8, 8, generator=g, dtype=F64) * scale


def test_rademacher_values_and_determinism():
    v = rademacher((1000,), generator=torch.Generator().manual_seed(0), dtype=F64)
    assert v.dtype == F64 and set(v.unique().tolist()) == {-1.0, 1.0}
    assert abs(v.mean().item()) < 0.1  # both signs drawn, roughly balanced
    assert torch.equal(v, rademacher((1000,), generator=torch.Generator().manual_seed(0), dtype=F64))


def test_exact_jacobian_linear_is_frobenius_of_w():
    w = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]], dtype=F64)
    b = torch.tensor([5.0, -5.0], dtype=F64)
    x = torch.randn(3, 3, dtype=F64)
    # J = W for every sample: ||W||_F^2 = 1 + 4 + 0 + 0 + 1 + 9 = 15
    out = exact_jacobian_sq_norm(lambda z: z @ w.T + b, x)
    torch.testing.assert_close(out, torch.full((3,), 15.0, dtype=F64), rtol=0, atol=1e-12)


def test_exact_jacobian_elementwise_tanh():
    x = torch.tensor([[0.0, 1.0, -2.0], [0.5, 0.5, 3.0]], dtype=F64)
    # J is diagonal with tanh'(x) = 1 - tanh(x)^2
    expected = [sum((1 - math.tanh(v) ** 2) ** 2 for v in row) for row in x.tolist()]
    torch.testing.assert_close(exact_jacobian_sq_norm(torch.tanh, x), torch.tensor(expected, dtype=F64))


def test_hutchinson_rademacher_exact_for_diagonal_jacobian():
    # with J diagonal, ||v^T J||^2 = sum_a v_a^2 J_aa^2 = ||J||_F^2 exactly for any +-1 probe
    x = torch.tensor([[0.0, 1.0, -2.0], [0.5, 0.5, 3.0]], dtype=F64, requires_grad=True)
    est = hutchinson_jacobian_sq_norm(torch.tanh(x), x, num_probes=1, generator=torch.Generator().manual_seed(3))
    expected = [sum((1 - math.tanh(v) ** 2) ** 2 for v in row) for row in x.tolist()]
    torch.testing.assert_close(est, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("probe", "tol"), [("rademacher", 0.05), ("gaussian", 0.10)])
def test_hutchinson_mean_matches_exact_on_mlp(probe, tol):
    params = _mlp_params()
    x = _images().requires_grad_()
    exact = exact_jacobian_sq_norm(lambda z: _mlp(z, *params), x.detach())
    gen = torch.Generator().manual_seed(0)
    est = hutchinson_jacobian_sq_norm(_mlp(x, *params), x, 1000, generator=gen, create_graph=False, probe=probe)
    assert est.shape == (4,) and not est.requires_grad
    assert exact.max() / exact.min() > 1.5  # the samples really differ
    rel = (est - exact).abs() / exact
    assert (rel < tol).all(), rel


def test_hutchinson_gradient_matches_finite_differences():
    w1, b1, w2, b2 = _mlp_params()
    x0 = _images()

    def penalty(w1_):
        # same seed every call: the probes are fixed, the estimate is a deterministic function of the weights
        x = x0.clone().requires_grad_()
        est = hutchinson_jacobian_sq_norm(
            _mlp(x, w1_, b1, w2, b2), x, num_probes=3, generator=torch.Generator().manual_seed(42)
        )
        return est.sum()

    w1 = w1.clone().requires_grad_()
    (grad,) = torch.autograd.grad(penalty(w1), w1)
    assert grad.abs().max() > 1e-3
    h = 1e-6
    for i, j in [(0, 0), (3, 17), (15, 191), (7, 100)]:
        with torch.no_grad():
            plus, minus = w1.detach().clone(), w1.detach().clone()
            plus[i, j] += h
            minus[i, j] -= h
        # the estimator itself needs autograd (a vjp), so evaluate it outside no_grad
        fd = (penalty(plus) - penalty(minus)).item() / (2 * h)
        assert abs(grad[i, j].item() - fd) < 1e-6 * max(1.0, abs(fd)), (i, j, grad[i, j].item(), fd)


def test_hutchinson_rejects_unknown_probe():
    x = torch.ones(2, 3, requires_grad=True)
    with pytest.raises(ValueError):
        hutchinson_jacobian_sq_norm(x * 2, x, probe="uniform")


def _linear_softmax_logprob(x, w, actions):
    s = x @ torch.eye(2, dtype=F64)  # s is a non-leaf inside the graph, like a hooked embedding
    logp = torch.log_softmax(s @ w.T, dim=-1).gather(1, actions[:, None]).squeeze(1)
    return s, logp


def test_grad_norm_penalty_linear_softmax_by_hand():
    w = torch.eye(2, dtype=F64, requires_grad=True)
    x = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=F64, requires_grad=True)
    actions = torch.tensor([0, 1])
    # d log softmax(W s)_a / d s = W^T (e_a - p), W = I:
    #   sample 0: p = (1/2, 1/2), a=0: (1/2, -1/2)  -> 1/4 + 1/4 = 0.5
    #   sample 1: p = (3/4, 1/4), a=1: (-3/4, 3/4)  -> 9/16 + 9/16 = 1.125
    s, logp = _linear_softmax_logprob(x, w, actions)
    torch.testing.assert_close(grad_norm_penalty(logp, s, g_max=10.0), torch.tensor([0.5, 1.125], dtype=F64))
    # clip at g_max = 1: sample 1 becomes 1.0 and stops contributing gradient
    s, logp = _linear_softmax_logprob(x, w, actions)
    pen = grad_norm_penalty(logp, s, g_max=1.0)
    torch.testing.assert_close(pen, torch.tensor([0.5, 1.0], dtype=F64))
    (g_clipped,) = torch.autograd.grad(pen[1], w, retain_graph=True)
    (g_free,) = torch.autograd.grad(pen[0], w)
    assert g_clipped.abs().max() == 0.0
    assert g_free.abs().max() > 0.0


def test_grad_norm_penalty_matches_analytic_on_random_toy():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3, 2, generator=g, dtype=F64)  # 3 actions, 2-d state
    x = torch.randn(4, 2, generator=g, dtype=F64, requires_grad=True)
    actions = torch.tensor([0, 2, 1, 2])
    s, logp = _linear_softmax_logprob(x, w, actions)
    pen = grad_norm_penalty(logp, s, g_max=1e9)
    for b in range(4):
        sb = x[b].tolist()
        logits = [sum(w[k, d].item() * sb[d] for d in range(2)) for k in range(3)]
        z = sum(math.exp(v) for v in logits)
        p = [math.exp(v) / z for v in logits]
        e_minus_p = [(1.0 if k == actions[b].item() else 0.0) - p[k] for k in range(3)]
        grad = [sum(w[k, d].item() * e_minus_p[k] for k in range(3)) for d in range(2)]
        assert abs(pen[b].item() - sum(v * v for v in grad)) < 1e-12, b


def test_smoothness_penalty_values_mask_and_grad():
    mean = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]], dtype=F64, requires_grad=True)
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=F64)
    # squared distances: [0 + 4, 9 + 16, 1 + 1] = [4, 25, 2]
    assert abs(smoothness_penalty(mean, target).item() - 31.0 / 3.0) < 1e-12
    # mask out row 1, and put NaN in its target: (4 + 2) / 2 = 3, gradients stay finite
    target_nan = target.clone()
    target_nan[1] = float("nan")
    mask = torch.tensor([True, False, True])
    pen = smoothness_penalty(mean, target_nan, mask)
    assert abs(pen.item() - 3.0) < 1e-12
    pen.backward()
    # d/d mean = 2 (mean - target) / 2 on valid rows, 0 on the masked one
    torch.testing.assert_close(mean.grad, torch.tensor([[0.0, 2.0], [0.0, 0.0], [-1.0, -1.0]], dtype=F64))


def test_smoothness_penalty_no_valid_sample_is_zero_with_graph():
    mean = torch.randn(3, 2, requires_grad=True)
    pen = smoothness_penalty(mean, torch.zeros(3, 2), torch.zeros(3, dtype=torch.bool))
    assert pen.item() == 0.0 and pen.requires_grad
    pen.backward()
    assert torch.equal(mean.grad, torch.zeros(3, 2))


def test_smoothness_penalty_temporal_grad_reaches_both_ends():
    # CAPS form: target = the current policy's mean at s_{t+1}, not detached
    mean_t = torch.tensor([[1.0, 0.0]], requires_grad=True)
    mean_next = torch.tensor([[0.0, 2.0]], requires_grad=True)
    pen = smoothness_penalty(mean_t, mean_next)
    assert pen.item() == 5.0  # 1 + 4
    pen.backward()
    torch.testing.assert_close(mean_t.grad, torch.tensor([[2.0, -4.0]]))
    torch.testing.assert_close(mean_next.grad, torch.tensor([[-2.0, 4.0]]))


# ----------------------------------------------------------------------------------------------------------------
# invariance: the action distribution on the perturbed frame against the clean frame's


def _token_log_probs(weight: torch.Tensor, frames: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log pi(a | frame) of a linear softmax policy over 5 bins, summed over 2 action dimensions."""
    logits = (frames @ weight).reshape(frames.shape[0], 2, 5)
    return logits.log_softmax(-1).gather(-1, actions[..., None]).squeeze(-1).sum(-1)


def test_invariance_penalty_is_zero_on_identical_frames_and_its_gradient_matches_finite_differences():
    from rvla_peft.regularizers import invariance_penalty

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    clean = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    perturbed = clean + 0.5 * torch.randn(8, 6, generator=gen, dtype=torch.float64)
    actions = torch.randint(0, 5, (8, 2), generator=gen)

    same = invariance_penalty(_token_log_probs(weight, clean, actions), _token_log_probs(weight, clean, actions))
    assert torch.equal(same, torch.zeros(8, dtype=torch.float64))

    def penalty(w: torch.Tensor) -> torch.Tensor:
        target = _token_log_probs(w, clean, actions).detach()  # the clean side is the target
        return invariance_penalty(_token_log_probs(w, perturbed, actions), target).mean()

    value = penalty(weight)
    assert value > 0
    (grad,) = torch.autograd.grad(value, weight)
    eps = 1e-6
    numeric = torch.zeros_like(weight)
    with torch.no_grad():
        for i in range(weight.shape[0]):
            for j in range(weight.shape[1]):
                step = torch.zeros_like(weight)
                step[i, j] = eps
                # the target held at the unperturbed weight, as the detach makes autograd do
                target = _token_log_probs(weight, clean, actions)
                up = invariance_penalty(_token_log_probs(weight + step, perturbed, actions), target).mean()
                down = invariance_penalty(_token_log_probs(weight - step, perturbed, actions), target).mean()
                numeric[i, j] = (up - down) / (2 * eps)
    assert torch.allclose(grad, numeric, atol=1e-8, rtol=1e-6)


def test_exact_token_invariance_is_the_per_slot_kl_and_the_sampled_gradient_in_expectation():
    from rvla_peft.regularizers import invariance_penalty, token_invariance_kl

    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    clean = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    perturbed = clean + 0.5 * torch.randn(3, 6, generator=gen, dtype=torch.float64)

    def logits(frames):
        return (frames @ weight).reshape(frames.shape[0], 2, 5)

    target = logits(clean).detach()
    assert torch.equal(token_invariance_kl(target, target), torch.zeros(3, dtype=torch.float64))
    exact = token_invariance_kl(logits(perturbed), target)
    closed_form = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=target), torch.distributions.Categorical(logits=logits(perturbed))
    ).sum(-1)
    torch.testing.assert_close(exact, closed_form)

    # The sampled (k3) form on every joint action of this 2 x 5-bin policy, weighted by its probability on the
    # perturbed frame (the rollout's sampling distribution, held fixed): the same gradient as the exact form.
    joint = torch.cartesian_prod(torch.arange(5), torch.arange(5))  # [25, 2]
    rows = torch.arange(3).repeat_interleave(25)
    actions = joint.repeat(3, 1)
    log_p = _token_log_probs(weight, perturbed[rows], actions)
    log_q = _token_log_probs(weight, clean[rows], actions).detach()
    expected_sampled = (log_p.detach().exp() * invariance_penalty(log_p, log_q)).sum() / 3
    (g_sampled,) = torch.autograd.grad(expected_sampled, weight)
    (g_exact,) = torch.autograd.grad(exact.mean(), weight)
    torch.testing.assert_close(g_sampled, g_exact)


def _train_under_pixel_noise(cfg, **invariance):
    """One update of the tiny trainer with the invariance term on, under pixel noise: (trainer, metrics, rollout)."""
    for key, value in {"weight": 1.0, **invariance}.items():
        setattr(cfg.regularizers.invariance, key, value)
    return train_under_pixel_noise(cfg)


@pytest.mark.parametrize("form", ["sampled", "exact"])
def test_the_trainer_keeps_clean_frames_and_trains_the_invariance_term(tiny_cfg, form):
    _, metrics, rollout = _train_under_pixel_noise(tiny_cfg, form=form)
    assert rollout.rgb_clean is not None and rollout.rgb_clean.shape == rollout.rgb[:-1].shape
    assert not torch.equal(rollout.rgb_clean, rollout.rgb[:-1]), "the policy saw noisy frames, the clean kept apart"
    assert metrics["loss/invariance"] > 0


def test_the_invariance_target_is_the_current_policy_or_the_base_with_the_adapter_off(tiny_cfg):
    from rvla_peft.regularizers import token_invariance_kl

    trainer, _, rollout = _train_under_pixel_noise(tiny_cfg, form="exact", fraction=1.0)
    inv_cfg, policy = trainer.cfg.regularizers.invariance, trainer.policy
    policy.eval()  # no dropout: the values below are compared exactly
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an adapter far from the base, so the two targets differ
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    idx = torch.arange(4)
    actions = rollout.flat(rollout.actions)[idx]
    out = policy.evaluate(rollout.observations(idx), actions)
    clean = rollout.clean_observations(idx)
    with torch.no_grad():
        with policy.peft_model.disable_adapter():
            base_logits = policy.evaluate(clean, actions).logits
        current_logits = policy.evaluate(clean, actions).logits
    penalty = {}
    for target in ("current", "base"):
        inv_cfg.target = target
        penalty[target] = invariance_term(policy, rollout, idx, actions, out, inv_cfg)
    torch.testing.assert_close(penalty["current"], token_invariance_kl(out.logits, current_logits).mean())
    torch.testing.assert_close(penalty["base"], token_invariance_kl(out.logits, base_logits).mean())
    assert abs(penalty["base"] - penalty["current"]) > 1e-3
    assert torch.equal(policy.evaluate(clean, actions).logits, current_logits), "the adapter is back on"
    for p in trainer.params:
        p.grad = None
    penalty["base"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.params), "the perturbed side trains"
