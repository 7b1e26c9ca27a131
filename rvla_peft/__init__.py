"""rvla_peft: robust LoRA post-training of vision-language-action models (PPO + Jacobian and smoothness penalties)."""

__version__ = "0.1.0"
