"""The ``pi0`` family's policy section and LoRA defaults (light: no torch, no transformers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

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
    likelihood: Literal["one_step", "mean", "sum"] = field(
        default="one_step",
        metadata={
            "help": "What the PPO ratio compares. 'one_step' (RLinf's default for pi0, joint_logprob: false): each "
            "chain adds noise at one of its K steps (drawn per chain), the other steps follow the ODE, and the "
            "log-prob is that step's Gaussian: one term per executed entry, as one action token gives, so "
            "ppo.clip_coef means what it does for token policies. 'sum': every step noised, the log-probs of all K "
            "summed (the chain's exact likelihood, but a log-ratio about K times one step's: 5 x 7 x 10 terms at "
            "pi0's defaults, so the clipped ratio saturates). 'mean': every step noised, the sum divided by K (as "
            "RLinf's joint_logprob averages its steps): every step explores, the ratio is the steps' geometric mean."
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
