"""Observation and action perturbations (no simulator import): the registry, specs, suites and the curriculum.

from rvla_peft.perturbations import PERTURBATIONS, expand_spec, suite_settings
"""

from rvla_peft.perturbations.base import (
    PERTURBATIONS,
    ActionPerturbation,
    ImagePerturbation,
    ObservationPerturbation,
    Perturbation,
    Resample,
    Spec,
    register,
)
from rvla_peft.perturbations.specs import (
    CLEAN,
    RESAMPLE_NOTES,
    SUITES,
    Setting,
    build_perturbations,
    expand_spec,
    resample_mode,
    resample_note,
    spec_label,
    spec_records,
    suite_grid,
    suite_settings,
    validate_specs,
)

__all__ = [
    "CLEAN",
    "PERTURBATIONS",
    "RESAMPLE_NOTES",
    "SUITES",
    "ActionPerturbation",
    "ImagePerturbation",
    "ObservationPerturbation",
    "Perturbation",
    "Resample",
    "Setting",
    "Spec",
    "build_perturbations",
    "expand_spec",
    "register",
    "resample_mode",
    "resample_note",
    "spec_label",
    "spec_records",
    "suite_grid",
    "suite_settings",
    "validate_specs",
]
