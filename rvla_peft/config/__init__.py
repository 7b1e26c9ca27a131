"""Typed configuration: a YAML recipe plus dotted ``key=value`` overrides, checked before anything heavy loads.

    cfg = load_config("recipes/tiny_cpu.yaml", ["ppo.learning_rate=3e-5", "env.num_envs=4"])

Every field carries help text (``python -m rvla_peft.train --help-config`` prints it). An unknown key, a value
of the wrong type or an impossible value raises :class:`ConfigError` naming the key and, for a typo, the
nearest valid one. The schema is in :mod:`rvla_peft.config.schema`, the dataclass machinery in
:mod:`rvla_peft.config.parsing`.
"""

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
