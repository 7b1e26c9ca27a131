"""ManiSkill3 environments (batched, GPU or CPU simulation) and the perturbations applied to them."""

from rvla_peft.envs.maniskill import Step, VecEnv, make_envs
from rvla_peft.envs.perturbations import PerturbedEnv

__all__ = ["PerturbedEnv", "Step", "VecEnv", "make_envs"]
