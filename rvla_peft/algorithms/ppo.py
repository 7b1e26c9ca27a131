"""PPO pieces as small pure functions over tensors (CleanRL's maths, one function per idea).

Rollout layout: time-major ``[T, N]`` (T steps, N parallel envs). ``dones[t]`` is True when the episode ENDED at
step t (terminated or truncated), so nothing flows from step t+1 back into step t. The value of a time-limited
episode's last observation is folded into its last reward by :func:`bootstrap_truncated` before calling
:func:`compute_gae`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bootstrap_truncated(
    rewards: Tensor, truncated: Tensor, terminated: Tensor, final_values: Tensor, gamma: float
) -> Tensor:
    """Fold ``gamma * V(final obs)`` into the last reward of episodes cut by a time limit.

    A truncated episode did not really end, so its return continues past the cut; the env auto-resets, so the
    next stored value belongs to a new episode and :func:`compute_gae` must treat the step as done. Adding the
    bootstrap to the reward keeps both right (the standard partial-episode bootstrap).

    Args:
        rewards: ``[T, N]`` (or ``[N]``).
        truncated, terminated: bool, same shape as ``rewards``.
        final_values: same shape, V of the final observation where truncated; other entries are ignored (they
            may hold anything, NaN included).
        gamma: discount.

    Returns:
        New rewards, same shape; only ``truncated & ~terminated`` entries change.
    """
    bootstrap = truncated.bool() & ~terminated.bool()
    # where, not a multiply by the mask: a NaN placeholder in final_values must not leak into other rewards
    return torch.where(bootstrap, rewards + gamma * final_values, rewards)


def compute_gae(
    rewards: Tensor, values: Tensor, dones: Tensor, next_value: Tensor, *, gamma: float, gae_lambda: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016).

    ``delta_t = r_t + gamma * (1 - d_t) * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lambda * (1 - d_t) * A_{t+1}``
    with ``V_T = next_value``. Because ``dones[t]`` marks an episode that ended AT step t, the last step's flag
    ``dones[T-1]`` already says whether ``next_value`` is used: there is no separate ``next_done`` argument.

    Args:
        rewards: ``[T, N]``, already bootstrapped for truncation (see :func:`bootstrap_truncated`).
        values: ``[T, N]``, V(s_t) from the rollout.
        dones: ``[T, N]`` bool (or 0/1), episode ended at step t.
        next_value: ``[N]``, V of the observation after the last step.
        gamma: discount.
        gae_lambda: GAE lambda; 1 gives Monte-Carlo returns (minus V), 0 one-step TD errors.

    Returns:
        ``(advantages, returns)``, both ``[T, N]``, ``returns = advantages + values``.
    """
    not_done = 1.0 - dones.to(values.dtype)
    next_values = torch.cat([values[1:], next_value.unsqueeze(0)], dim=0)
    deltas = rewards + gamma * not_done * next_values - values
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(next_value, dtype=values.dtype)
    for t in reversed(range(rewards.shape[0])):
        last = deltas[t] + gamma * gae_lambda * not_done[t] * last
        advantages[t] = last
    return advantages, advantages + values


def normalize_advantages(adv: Tensor, eps: float = 1e-8) -> Tensor:
    """Zero mean, unit std over all entries of ``adv`` (any shape).

    Population std (not Bessel-corrected as in CleanRL): identical for real minibatches, but a single-sample
    minibatch gives 0 rather than NaN.
    """
    return (adv - adv.mean()) / (adv.std(correction=0) + eps)


def policy_loss(
    new_logprob: Tensor, old_logprob: Tensor, advantages: Tensor, clip_coef: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate objective, as a loss: ``mean(max(-A * r, -A * clip(r, 1 - c, 1 + c)))``, ``r = pi / pi_old``.

    Args:
        new_logprob, old_logprob, advantages: ``[B]``.
        clip_coef: c.

    Returns:
        ``(loss, stats)``: scalar loss; detached stats ``approx_kl`` (Schulman's k3 estimator of
        KL(old || new), ``mean((r - 1) - log r)``) and ``clip_frac`` (share of samples with ``|r - 1| > c``).
    """
    logratio = new_logprob - old_logprob
    ratio = logratio.exp()
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef)
    loss = torch.max(loss_unclipped, loss_clipped).mean()
    with torch.no_grad():
        stats = {
            "approx_kl": ((ratio - 1.0) - logratio).mean(),
            "clip_frac": ((ratio - 1.0).abs() > clip_coef).to(ratio.dtype).mean(),
        }
    return loss, stats


def value_loss(new_value: Tensor, old_value: Tensor, returns: Tensor, clip_coef: float | None) -> Tensor:
    """Value regression, ``0.5 * mean((v - R)^2)``; with ``clip_coef`` the pessimistic clipped form (CleanRL).

    Clipped: ``0.5 * mean(max((v - R)^2, (v_old + clip(v - v_old, -c, c) - R)^2))``.
    All inputs ``[B]``; returns a scalar.
    """
    loss_unclipped = (new_value - returns).pow(2)
    if clip_coef is None:
        return 0.5 * loss_unclipped.mean()
    v_clipped = old_value + (new_value - old_value).clamp(-clip_coef, clip_coef)
    loss_clipped = (v_clipped - returns).pow(2)
    return 0.5 * torch.max(loss_unclipped, loss_clipped).mean()


def minibatch_indices(
    batch_size: int, num_minibatches: int, generator: torch.Generator | None = None, device=None
) -> list[Tensor]:
    """A random permutation of ``range(batch_size)`` split into ``num_minibatches`` near-equal chunks.

    Every sample is used exactly once per epoch; chunk sizes differ by at most one (larger chunks first).
    The permutation is drawn on the generator's device (CPU when none), then moved to ``device``.
    """
    if not 1 <= num_minibatches <= batch_size:
        raise ValueError(f"num_minibatches must be in [1, batch_size={batch_size}], got {num_minibatches}")
    draw_device = generator.device if generator is not None else "cpu"
    perm = torch.randperm(batch_size, generator=generator, device=draw_device).to(device)
    return list(torch.tensor_split(perm, num_minibatches))
