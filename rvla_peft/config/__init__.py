"""Typed configuration: a YAML recipe plus dotted ``key=value`` overrides, checked before anything heavy loads.

    cfg = load_config("recipes/tiny_cpu.yaml", ["ppo.learning_rate=3e-5", "env.num_envs=4"])

Every field carries help text (``python -m rvla_peft.train --help-config`` prints it). An unknown key, a value
of the wrong type or an impossible value raises :class:`ConfigError` naming the key and, for a typo, the
nearest valid one. The schema is in :mod:`rvla_peft.config.schema`, the dataclass machinery in
:mod:`rvla_peft.config.parsing`.

The names are loaded on first use (PEP 562): importing a submodule (``rvla_peft.config.parsing``, which the policy
families' configurations import) must not run the schema, which imports those families.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rvla_peft.config.parsing import ConfigError, apply_override, from_dict, help_text, to_dict
    from rvla_peft.config.schema import (
        CurriculumConfig,
        EnvConfig,
        HubConfig,
        JacobianConfig,
        LoraSettings,
        ModelConfig,
        PerturbationSpec,
        PerturbConfig,
        PolicyConfig,
        PPOConfig,
        RegularizerConfig,
        SmoothnessConfig,
        TrainConfig,
        dump_yaml,
        load_config,
    )

__all__ = [
    "ConfigError",
    "CurriculumConfig",
    "EnvConfig",
    "HubConfig",
    "JacobianConfig",
    "LoraSettings",
    "ModelConfig",
    "PPOConfig",
    "PerturbConfig",
    "PerturbationSpec",
    "PolicyConfig",
    "RegularizerConfig",
    "SmoothnessConfig",
    "TrainConfig",
    "apply_override",
    "dump_yaml",
    "from_dict",
    "help_text",
    "load_config",
    "to_dict",
]

_FROM_PARSING = {"ConfigError", "apply_override", "from_dict", "help_text", "to_dict"}


def __getattr__(name: str):
    if name in _FROM_PARSING:
        from rvla_peft.config import parsing as module
    elif name in __all__:
        from rvla_peft.config import schema as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
