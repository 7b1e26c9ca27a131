"""The ``policy`` section: the fields every family shares, and what a family declares to the catalogue.

Each family (``rvla_peft/policies/<family>/configuration.py``) subclasses :class:`PolicyConfig` with its own fields
and checks, and names itself in a :class:`Family`; :mod:`rvla_peft.policies.families` collects them. Recipes stay
flat (``policy.chunk_size: 4`` beside ``policy.family: openvla_oft``): parsing picks the subclass from
``policy.family``. Light on purpose (no torch, no transformers): the config reads it before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rvla_peft.config.parsing import check

# How a policy's gripper output maps to ManiSkill's gripper command (Panda: -1 closed, +1 open; its mimic joint
# controller spans -0.01 m to 0.04 m per finger, so 0 is a 3 cm gap).
GRIPPER_CONVENTIONS = ("signed", "zero_one", "zero_one_binary")
# Published OpenVLA / OpenVLA-OFT checkpoints were trained on RLDS data aligned so that 0 = close, 1 = open.
CHECKPOINT_GRIPPER = {"openvla": "zero_one_binary", "openvla_oft": "zero_one_binary"}


def family_field(name: str = "action_tokens") -> Any:
    """The ``family`` field, defaulting to ``name``: each family's subclass sets its own."""
    return field(
        default=name,
        metadata={
            "help": "Policy family (rvla_peft/policies/<family>/): 'action_tokens' = OpenVLA-style over any "
            "image-text-to-text model; 'openvla' = OpenVLA checkpoints (their action ids, norm_stats and prompt); "
            "'pi0' = transformers' PI0, PPO over its flow-SDE denoising chain; 'openvla_oft' = OpenVLA-OFT "
            "(parallel decoding of an action chunk, continuous action head, learned Gaussian/Laplace scale). "
            "Each family has keys of its own besides the shared ones (--help-config names the family)."
        },
    )


@dataclass
class PolicyConfig:
    """The keys every family has. A recipe's section is parsed into its family's subclass."""

    family: str = family_field()
    prompt_template: str = field(
        default="In: What action should the robot take to {instruction}?\nOut:",
        metadata={"help": "Prompt; {instruction} is replaced by the task's instruction."},
    )
    action_dim: int = field(default=7, metadata={"help": "Dimensions of the action the env executes."})
    action_low: list[float] | None = field(
        default=None,
        metadata={"help": "Per-dimension q01 used to un-normalise [-1, 1] to env actions (None: identity)."},
    )
    action_high: list[float] | None = field(
        default=None, metadata={"help": "Per-dimension q99 used to un-normalise (None: identity)."}
    )
    value_head_hidden: int = field(default=256, metadata={"help": "Width of the value head's hidden layer."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of action tokens."})
    gripper: Literal["signed", "zero_one", "zero_one_binary"] | None = field(
        default=None,
        metadata={
            "help": "What the policy's gripper value (the last action dim, after un-normalisation) means. 'signed': "
            "ManiSkill's own, -1 closed and +1 open, executed as is. 'zero_one': 0 = close, 1 = open (OpenVLA's "
            "RLDS convention), executed as 2x - 1 (OpenVLA's normalize_gripper_action); 'zero_one_binary': the "
            "same then its sign, as OpenVLA's evaluation does (binarize=True). No inversion: OpenVLA inverts for "
            "LIBERO, where -1 opens; ManiSkill's -1 closes. None: the base's convention, 'zero_one_binary' for a "
            "published OpenVLA or OpenVLA-OFT checkpoint (policy.family openvla / openvla_oft), 'signed' for "
            "builtin: bases (trained in ManiSkill's convention) and the other families."
        },
    )
    merge_lora_to_act: bool = field(
        default=True,
        metadata={
            "help": "Fold the LoRA into the weights it adapts while the policy only acts (the trainer's rollouts "
            "and evaluations, python -m rvla_peft.eval), then put the weights back bit for bit: act()'s forwards "
            "cost what the bare model's do (the shipped tiny base on the CPU: 36 -> 24 ms per act at 2 envs). "
            "Holds a copy of the adapted weights meanwhile. Skipped for quantized bases (QLoRA)."
        },
    )

    def validate(self, cfg: Any) -> None:
        """Values that parse but cannot work; raises ConfigError naming the key. ``cfg`` is the whole TrainConfig
        (a family may depend on another section). A family extends it with its own checks, calling this first."""
        check(self.action_dim >= 1, "policy.action_dim", "must be >= 1")
        check(self.temperature > 0, "policy.temperature", "must be > 0")
        check("{instruction}" in self.prompt_template, "policy.prompt_template", "must contain {instruction}")
        for key in ("action_low", "action_high"):
            value = getattr(self, key)
            check(
                value is None or len(value) == self.action_dim,
                f"policy.{key}",
                f"needs {self.action_dim} values (policy.action_dim), got {value and len(value)}",
            )


def gripper_convention(policy: PolicyConfig, name_or_path: str) -> str:
    """``policy.gripper``, or the convention of the base ``name_or_path`` when it is None (see its help)."""
    if policy.gripper is not None:
        return policy.gripper
    if name_or_path.startswith("builtin:"):
        return "signed"
    return CHECKPOINT_GRIPPER.get(policy.family, "signed")


@dataclass(frozen=True)
class Family:
    """One policy family as the catalogue lists it: everything but the policy class itself is light."""

    name: str  # the value of policy.family
    config: type[PolicyConfig]  # its policy section
    lora_defaults: dict[str, Any]  # LoRA settings for every lora.* key a recipe leaves unset
    policy: str  # "module:Class" of the policy, imported only when one is built (torch, transformers)

    def __post_init__(self) -> None:
        default = self.config.__dataclass_fields__["family"].default
        if default != self.name:
            raise ValueError(f"{self.config.__name__}.family defaults to {default!r}, not its family {self.name!r}")
