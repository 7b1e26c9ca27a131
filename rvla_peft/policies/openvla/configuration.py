"""The ``openvla`` family's policy section and LoRA defaults (light: no torch, no transformers). The ``openvla_oft``
family reads the same checkpoints and shares their statistics key and unused layers from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rvla_peft.config.parsing import check
from rvla_peft.config.policy import Family, PolicyConfig, family_field
from rvla_peft.policies.action_tokens.configuration import ActionTokenPolicyConfig

# OpenVLA's layers that never run, so never get a gradient: its features are the patch tokens after the
# second-to-last block of each vision tower, so the last block (DINOv2 ViT-L: 24 blocks, SigLIP So400m: 27) and
# SigLIP's attention-pool head are only there to load the checkpoint. peft's list form matches these as name
# suffixes. Written for the published dinosiglip-224px towers (openvla-7b and every OpenVLA-OFT checkpoint); the
# 3-block towers of builtin:tiny-openvla keep LoRA on their last block (zero-initialised, it stays zero).
OPENVLA_UNUSED_MODULES = [
    f"{tower}.blocks.{last}.{layer}"
    for tower, last in (("featurizer", 23), ("fused_featurizer", 26))
    for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
] + [f"attn_pool.{layer}" for layer in ("q", "kv", "proj", "mlp.fc1", "mlp.fc2")]

# OpenVLA's own fine-tuning recipe (r 32, alpha 16, all-linear), minus the layers that never run.
LORA_DEFAULTS = {"r": 32, "alpha": 16, "target_modules": "all-linear", "exclude_modules": OPENVLA_UNUSED_MODULES}


def unnorm_key_field() -> Any:
    return field(
        default=None,
        metadata={
            "help": "The dataset in the checkpoint's norm_stats whose action q01/q99 (and mask) un-normalise actions, "
            "e.g. 'bridge_orig' (None: action_low/action_high)."
        },
    )


def check_unnorm_key(policy: PolicyConfig) -> None:
    check(
        getattr(policy, "unnorm_key", None) is None or (policy.action_low is None and policy.action_high is None),
        "policy.unnorm_key",
        "set either policy.unnorm_key or policy.action_low/action_high, not both",
    )


@dataclass
class OpenVLAPolicyConfig(ActionTokenPolicyConfig):
    family: str = family_field("openvla")
    unnorm_key: str | None = unnorm_key_field()

    def validate(self, cfg: Any) -> None:
        super().validate(cfg)
        check_unnorm_key(self)


FAMILY = Family(
    name="openvla",
    config=OpenVLAPolicyConfig,
    lora_defaults=LORA_DEFAULTS,
    policy="rvla_peft.policies.openvla.modeling:OpenVLAPolicy",
)
