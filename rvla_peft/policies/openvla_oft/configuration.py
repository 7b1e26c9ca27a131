"""The ``openvla_oft`` family's policy section and LoRA defaults (light: no torch, no transformers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rvla_peft.config.parsing import check
from rvla_peft.config.policy import Family, PolicyConfig, family_field
from rvla_peft.policies.openvla.configuration import OPENVLA_UNUSED_MODULES, check_unnorm_key, unnorm_key_field

# OpenVLA-OFT's own fine-tuning used r 32, alpha 16, all-linear: all but OpenVLA's layers that never run.
LORA_DEFAULTS = {"r": 32, "alpha": 16, "target_modules": "all-linear", "exclude_modules": OPENVLA_UNUSED_MODULES}


@dataclass
class OpenVLAOFTPolicyConfig(PolicyConfig):
    family: str = family_field("openvla_oft")
    unnorm_key: str | None = unnorm_key_field()
    chunk_size: int = field(
        default=8,
        metadata={
            "help": "Actions predicted per forward pass (OFT's NUM_ACTIONS_CHUNK, not in its config.json: 8 for the "
            "LIBERO checkpoints, 25 ALOHA, 5 Bridge)."
        },
    )
    execute_steps: int | None = field(
        default=None,
        metadata={
            "help": "Actions of each predicted chunk executed open-loop as one PPO step (None: the whole chunk)."
        },
    )
    action_distribution: Literal["gaussian", "laplace"] = field(
        default="laplace",
        metadata={
            "help": "Distribution around the action head's output for PPO's log-probs. 'laplace' (RIPT-VLA's; the "
            "likelihood whose maximum is OFT's L1 regression) or 'gaussian'."
        },
    )
    scale_head: Literal["state_independent", "state_dependent"] = field(
        default="state_independent",
        metadata={
            "help": "The distribution's scale. 'state_independent': a learned log-scale per chunk step and action "
            "dim; 'state_dependent': RIPT-VLA's scale head (an MLP over the action features)."
        },
    )
    init_log_scale: float = field(
        default=-2.0, metadata={"help": "Initial log-scale (std or Laplace b) of normalised actions."}
    )
    log_scale_bounds: list[float] = field(
        default_factory=lambda: [-5.0, 0.5],
        metadata={"help": "[min, max] the log-scale is clamped to (RIPT-VLA: [-2, 0.5])."},
    )
    center_crop_area: float | None = field(
        default=0.9,
        metadata={
            "help": "Area of OFT's centre crop, resized back to the model's size, on every image the policy sees "
            "(rollouts, updates, evaluation): OFT trains with random crops of 90% of the area and evaluates with "
            "the centre one (openvla-oft: center_crop=True, crop_scale 0.9). null: the whole image (a checkpoint "
            "trained without image augmentation)."
        },
    )
    action_head_file: str | None = field(
        default=None,
        metadata={
            "help": "OFT's released action head to start from, e.g. 'action_head--150000_checkpoint.pt': a file "
            "path, or a file name in the base model's folder or Hub repo (None: a freshly initialised head)."
        },
    )

    def validate(self, cfg: Any) -> None:
        super().validate(cfg)
        check(self.chunk_size >= 1, "policy.chunk_size", "must be >= 1")
        steps = self.execute_steps
        check(steps is None or steps >= 1, "policy.execute_steps", "must be >= 1 (or null)")
        check(
            steps is None or steps <= self.chunk_size,
            "policy.execute_steps",
            f"must be <= policy.chunk_size={self.chunk_size}",
        )
        bounds = self.log_scale_bounds
        check(len(bounds) == 2 and bounds[0] < bounds[1], "policy.log_scale_bounds", f"needs [min, max], got {bounds}")
        check_unnorm_key(self)
        area = self.center_crop_area
        check(area is None or 0 < area <= 1, "policy.center_crop_area", f"must be in (0, 1] (or null), got {area}")
        check(
            not cfg.lora.adapt_output_layer,
            "lora.adapt_output_layer",
            "must be false for policy.family=openvla_oft: its forward never computes logits",
        )


FAMILY = Family(
    name="openvla_oft",
    config=OpenVLAOFTPolicyConfig,
    lora_defaults=LORA_DEFAULTS,
    policy="rvla_peft.policies.openvla_oft.modeling:OpenVLAOFTPolicy",
)
