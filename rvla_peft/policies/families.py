"""The catalogue of policy families: name -> policy section (config class), LoRA defaults and the policy class's
"module:Class". Light (no torch, no transformers): the config reads it to parse ``policy:``, the registry to build
a policy. A family lives in its own folder, ``rvla_peft/policies/<family>/`` (``configuration.py``: its
:class:`~rvla_peft.config.policy.Family` record; ``modeling.py``: the policy); adding one is that folder and one
entry in :data:`FAMILIES`."""

from __future__ import annotations

import dataclasses
import logging

from rvla_peft.config.parsing import Variants, from_variant_dict
from rvla_peft.config.policy import Family, PolicyConfig
from rvla_peft.policies.action_tokens import configuration as action_tokens
from rvla_peft.policies.openvla import configuration as openvla
from rvla_peft.policies.openvla_oft import configuration as openvla_oft
from rvla_peft.policies.pi0 import configuration as pi0

logger = logging.getLogger(__name__)

FAMILIES: dict[str, Family] = {
    f.name: f for f in (action_tokens.FAMILY, openvla.FAMILY, openvla_oft.FAMILY, pi0.FAMILY)
}

POLICY_FAMILIES: dict[str, str] = {name: f.policy for name, f in FAMILIES.items()}
LORA_DEFAULTS: dict[str, dict] = {name: f.lora_defaults for name, f in FAMILIES.items()}
OPENVLA_UNUSED_MODULES = openvla.OPENVLA_UNUSED_MODULES

# How the ``policy:`` section is parsed: ``policy.family`` picks the class (TrainConfig.policy's metadata).
POLICY_VARIANTS = Variants(
    key="family", classes={name: f.config for name, f in FAMILIES.items()}, default=PolicyConfig().family
)


def family_config(policy: PolicyConfig) -> PolicyConfig:
    """``policy`` as its family's config class: a plain :class:`PolicyConfig`, or a config whose ``family`` was
    changed after parsing, is rebuilt by the recipe rules (another family's keys only at their defaults)."""
    if type(policy) is POLICY_VARIANTS.classes.get(policy.family):
        return policy
    return from_variant_dict(POLICY_VARIANTS, dataclasses.asdict(policy), "policy.")


def drop_keys_of_the_replaced_family(section: dict, recipe_section: dict) -> dict:
    """The ``policy:`` section after overrides, without the recipe's keys that only its own family had when an
    override switched ``policy.family`` (``tiny_cpu.yaml policy.family=openvla_oft`` drops the recipe's
    ``n_bins: 64``, logged). A key an override set is kept, and refused if it belongs to another family."""
    default = POLICY_VARIANTS.default
    family = section.get("family", default)
    if family == recipe_section.get("family", default) or family not in FAMILIES:
        return section
    own = {f.name for f in dataclasses.fields(FAMILIES[family].config)}
    kept = {}
    for key, value in section.items():
        from_recipe = key in recipe_section and recipe_section[key] == value
        if from_recipe and key not in own and POLICY_VARIANTS.owners(key):
            logger.warning(
                "policy.%s=%r from the recipe does not apply to policy.family=%s: dropped", key, value, family
            )
            continue
        kept[key] = value
    return kept
