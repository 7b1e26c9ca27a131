"""Observation and action perturbations (no simulator import): the registry, specs, suites and the curriculum.

from rvla_peft.perturbations import PERTURBATIONS, expand_spec, suite_settings
"""

from rvla_peft.perturbations.base import (
    PERTURBATIONS,
    ActionPerturbation,
    ImagePerturbation,
    ObservationPerturbation,
    Perturbation,
    Spec,
    register,
)
from rvla_peft.perturbations.specs import (
    CLEAN,
    SUITES,
    Setting,
    build_perturbations,
    expand_spec,
    spec_label,
    suite_grid,
    suite_settings,
    validate_specs,
)

__all__ = [
    "CLEAN",
    "PERTURBATIONS",
    "SUITES",
    "ActionPerturbation",
    "ImagePerturbation",
    "ObservationPerturbation",
    "Perturbation",
    "Setting",
    "Spec",
    "build_perturbations",
    "expand_spec",
    "register",
    "spec_label",
    "suite_grid",
    "suite_settings",
    "validate_specs",
]
