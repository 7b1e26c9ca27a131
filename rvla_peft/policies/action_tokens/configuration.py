"""The ``action_tokens`` family's policy section and LoRA defaults (light: no torch, no transformers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rvla_peft.config.parsing import check
from rvla_peft.config.policy import Family, PolicyConfig, family_field

# RL4VLA's: r 32, alpha 16 on every linear layer.
LORA_DEFAULTS = {"r": 32, "alpha": 16, "target_modules": "all-linear", "exclude_modules": None}


@dataclass
class ActionTokenPolicyConfig(PolicyConfig):
    family: str = family_field("action_tokens")
    n_bins: int = field(default=256, metadata={"help": "Action bins, on the last n_bins vocabulary ids."})
    compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the model's forward for act()'s token-by-token decoding (the update's forwards "
            "stay eager). On the 2-core CPU, act() of the shipped tiny base took 0.5-0.7x the CPU time after 1-3 "
            "minutes of compiling per process, agreeing with eager decoding to float rounding "
            "(bench/bench_decoding.py --compile): for long runs and large evaluations, not short ones."
        },
    )

    def validate(self, cfg: Any) -> None:
        super().validate(cfg)
        check(self.n_bins >= 2, "policy.n_bins", "must be >= 2")


FAMILY = Family(
    name="action_tokens",
    config=ActionTokenPolicyConfig,
    lora_defaults=LORA_DEFAULTS,
    policy="rvla_peft.policies.action_tokens.modeling:ActionTokenPolicy",
)
