"""The ``pi0`` family's policy section and LoRA defaults (light: no torch, no transformers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rvla_peft.config.parsing import check
from rvla_peft.config.policy import Family, PolicyConfig, family_field

# peft saves LoRA on the embed_action_time.* layers but drops it on reload (a key-renaming clash): left out.
LORA_DEFAULTS = {
    "r": 32,
    "alpha": 16,
    "target_modules": "all-linear",
    "exclude_modules": ["action_in_proj", "state_proj", "action_time_mlp_in", "action_time_mlp_out"],
}


@dataclass
class Pi0PolicyConfig(PolicyConfig):
    family: str = family_field("pi0")
    num_denoise_steps: int | None = field(
        default=None,
        metadata={"help": "Denoising steps K per action chunk (None: the checkpoint's num_inference_steps)."},
    )
    noise_level: float = field(
        default=0.5,
        metadata={
            "help": "Flow-SDE noise level a; each denoising step adds Gaussian noise of std sqrt(dt) * a * "
            "sqrt(t / (1 - t)) to the executed actions (RLinf's flow-SDE; 0.5 is its default)."
        },
    )
    execute_steps: int | None = field(
        default=None,
        metadata={
            "help": "Actions of each predicted chunk executed open-loop as one PPO step (None: the whole chunk)."
        },
    )
    use_state: bool = field(
        default=False,
        metadata={
            "help": "Feed obs['state'] (zero-padded to max_state_dim) as pi0's robot state; false: a zero state. The "
            "rollout buffer keeps no state, so PPO training needs false."
        },
    )

    def validate(self, cfg: Any) -> None:
        super().validate(cfg)
        check(self.noise_level > 0, "policy.noise_level", "must be > 0")
        for key in ("num_denoise_steps", "execute_steps"):
            value = getattr(self, key)
            check(value is None or value >= 1, f"policy.{key}", "must be >= 1 (or null)")


FAMILY = Family(
    name="pi0", config=Pi0PolicyConfig, lora_defaults=LORA_DEFAULTS, policy="rvla_peft.policies.pi0.modeling:Pi0Policy"
)
