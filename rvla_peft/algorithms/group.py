"""Critic-free group-relative advantages and a KL estimator, as small pure functions over tensors.

A *group* is G episodes started from the same initial state under the same perturbation draw; what differs between
them is the policy's own sampling. Each episode has one outcome (success 0/1, or its return), laid out
``[num_groups, G]``, and its advantage compares it with the other members of its group (no value function):

- RLOO (Kool et al. 2019; RIPT-VLA's LOOP): ``A_i = R_i - mean_{j != i} R_j``, unbiased, not rescaled.
- GRPO (Shao et al. 2024; SimpleVLA-RL, TRL's GRPOTrainer): ``A_i = (R_i - mean(R)) / (std(R) + eps)``, the
  group's sample standard deviation (Bessel-corrected, as TRL's ``std``).

A group whose outcomes are all equal carries no signal (every advantage is 0): dynamic sampling drops it and
collects another (:func:`informative_groups`).
"""

from __future__ import annotations

from torch import Tensor


def rloo_advantages(outcomes: Tensor) -> Tensor:
    """Leave-one-out baseline: ``A_i = R_i - (sum_j R_j - R_i) / (G - 1)`` per row of ``outcomes`` [num_groups, G].

    Equals ``G / (G - 1) * (R_i - mean(R))``; a row of equal outcomes gives zeros.
    """
    size = outcomes.shape[-1]
    if size < 2:
        raise ValueError(f"RLOO needs groups of at least 2 episodes, got {size}")
    others = (outcomes.sum(-1, keepdim=True) - outcomes) / (size - 1)
    return outcomes - others


def grpo_advantages(outcomes: Tensor, eps: float = 1e-4) -> Tensor:
    """Group-normalised outcomes: ``(R_i - mean(R)) / (std(R) + eps)`` per row of ``outcomes`` [num_groups, G].

    ``std`` is the sample standard deviation (``correction=1``, as TRL); ``eps`` (TRL's 1e-4) keeps a row of equal
    outcomes at 0 instead of NaN.
    """
    size = outcomes.shape[-1]
    if size < 2:
        raise ValueError(f"GRPO needs groups of at least 2 episodes, got {size}")
    mean = outcomes.mean(-1, keepdim=True)
    std = outcomes.std(-1, keepdim=True, correction=1)
    return (outcomes - mean) / (std + eps)


def group_advantages(outcomes: Tensor, algorithm: str) -> Tensor:
    """``rloo_advantages`` or ``grpo_advantages`` by name."""
    if algorithm == "rloo":
        return rloo_advantages(outcomes)
    if algorithm == "grpo":
        return grpo_advantages(outcomes)
    raise ValueError(f"unknown group algorithm {algorithm!r}; choose 'rloo' or 'grpo'")


def informative_groups(outcomes: Tensor) -> Tensor:
    """[num_groups] bool: the rows of ``outcomes`` [num_groups, G] whose outcomes are not all equal.

    Dynamic sampling (DAPO, RIPT-VLA) keeps only these: a group that all succeeded or all failed has zero advantage
    everywhere, so it costs an update's compute and moves nothing but the regularisers.
    """
    return (outcomes != outcomes[..., :1]).any(-1)


def kl_k3(log_prob: Tensor, ref_log_prob: Tensor, max_log_ratio: float = 20.0) -> Tensor:
    """Per-sample estimate of KL(pi || pi_ref) from samples of pi: ``exp(r) - r - 1``, ``r = log pi_ref - log pi``.

    Schulman's k3 estimator (TRL's GRPO KL term): unbiased, never negative, exactly 0 where the two log-probs are
    equal. ``r`` is clamped above at ``max_log_ratio`` so that a sample far more likely under the reference cannot
    overflow ``exp`` (log-probs of whole actions or denoising chains can differ by tens of nats).
    """
    r = (ref_log_prob - log_prob).clamp(max=max_log_ratio)
    return r.exp() - r - 1.0
