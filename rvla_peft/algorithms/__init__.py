"""RL algorithms: PPO building blocks and critic-free group-relative advantages."""

from rvla_peft.algorithms.group import (
    group_advantages,
    grpo_advantages,
    informative_groups,
    kl_k3,
    rloo_advantages,
)
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
    "group_advantages",
    "grpo_advantages",
    "informative_groups",
    "kl_k3",
    "minibatch_indices",
    "normalize_advantages",
    "policy_loss",
    "rloo_advantages",
    "value_loss",
]
