"""ManiSkill3 environments (batched, GPU or CPU simulation) and the wrapper that perturbs them."""

from rvla_peft.envs.maniskill import Step, VecEnv, make_envs
from rvla_peft.envs.perturbed import PerturbedEnv

__all__ = ["PerturbedEnv", "Step", "VecEnv", "make_envs"]
