"""RL algorithms: PPO building blocks."""

from rvla_peft.algorithms.ppo import (
    bootstrap_truncated,
    compute_gae,
    minibatch_indices,
    normalize_advantages,
    policy_loss,
    value_loss,
)

__all__ = [
    "bootstrap_truncated",
    "compute_gae",
    "minibatch_indices",
    "normalize_advantages",
    "policy_loss",
    "value_loss",
]
