"""Perturbation specs: validation, combinations (``rotation@0.5+action_noise``), stable labels, named suites, and the
settings grid of a robustness evaluation."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rvla_peft.perturbations import action, observation  # noqa: F401  (register every perturbation)
from rvla_peft.perturbations.base import PERTURBATIONS, Perturbation, Spec, SpecLike, check_severity

# --------------------------------------------------------------------------------------------------------------
# Specs: validation, combinations, labels, suites


def expand_spec(spec: SpecLike) -> list[Spec]:
    """The components of ``spec``, validated: ``"rotation@0.5+action_noise"`` at 0.2 -> rotation 0.5, noise 0.2.

    Raises ValueError for an unknown name (with the nearest valid one), an empty part or a bad severity.
    """
    check_severity(str(spec.name), spec.severity)
    components = []
    for part in str(spec.name).split("+"):
        name, at, severity = (s.strip() for s in part.partition("@"))
        if not name:
            raise ValueError(
                f"perturbation {spec.name!r}: empty part in the combination; "
                "write e.g. 'rotation+action_noise' or 'rotation@0.5+action_noise'"
            )
        if name not in PERTURBATIONS:
            valid = sorted(PERTURBATIONS)
            hint = difflib.get_close_matches(name, valid, n=1)
            guess = f"did you mean {hint[0]!r}? " if hint else ""
            where = f" in {spec.name!r}" if name != spec.name else ""
            raise ValueError(f"unknown perturbation {name!r}{where}; {guess}valid names: {valid}")
        value: Any = spec.severity
        if at:
            try:
                value = float(severity)
            except ValueError:
                value = severity
            check_severity(f"{name}@{severity}", value)
        components.append(Spec(name, float(value)))
    return components


def validate_specs(specs: list[SpecLike]) -> None:
    """Raise ValueError for an unknown perturbation name, an empty combination part or a severity outside [0, 1]."""
    for spec in specs:
        expand_spec(spec)


def build_perturbations(specs: list[SpecLike]) -> list[Perturbation]:
    """Instantiate every component of ``specs`` (validated first), in order."""
    return [PERTURBATIONS[c.name](c.severity) for spec in specs for c in expand_spec(spec)]


def spec_label(spec: SpecLike) -> str:
    """A stable metric label, every component with its severity: ``"rotation@0.5+action_noise@0.333"``."""
    return "+".join(f"{c.name}@{c.severity:.3g}" for c in expand_spec(spec))


# Settings of the robustness report: suite -> [(perturbation or combination, [severities])].
SUITES: dict[str, list[tuple[str, list[float]]]] = {
    # The RobustVLA paper's evaluation: its five visual perturbations at a moderate severity (shift up to 6 px,
    # rotation up to 15 degrees, jitter factors 0.75-1.25, a 16-px square, up to 17% erased, on 64-px images),
    # Gaussian action noise sigma 0.1 / 0.2 / 0.3, and rotation combined with sigma-0.1 action noise.
    "paper": [
        ("shift", [0.5]),
        ("rotation", [0.5]),
        ("color_jitter", [0.5]),
        ("occlusion", [0.5]),
        ("random_erasing", [0.5]),
        ("action_noise", [1 / 3, 2 / 3, 1.0]),
        ("rotation@0.5+action_noise", [1 / 3]),
    ],
    # Every registered perturbation at three severities, and the paper's combination.
    "full": [(name, [1 / 3, 2 / 3, 1.0]) for name in PERTURBATIONS] + [("rotation@0.5+action_noise", [1 / 3])],
    # Two cheap settings, for tests and smoke runs.
    "quick": [("pixel_noise", [0.5]), ("action_noise", [1 / 3])],
}


def suite_settings(name: str) -> list[tuple[str, list[Spec]]]:
    """The settings of suite ``name`` as (label, components) pairs, e.g. ("action_noise@0.333", [Spec(...)])."""
    if name not in SUITES:
        hint = difflib.get_close_matches(name, list(SUITES), n=1)
        guess = f"did you mean {hint[0]!r}? " if hint else ""
        raise ValueError(f"unknown perturbation suite {name!r}; {guess}valid suites: {sorted(SUITES)}")
    settings = []
    for spec_name, severities in SUITES[name]:
        for severity in severities:
            spec = Spec(spec_name, severity)
            settings.append((spec_label(spec), expand_spec(spec)))
    return settings


# --------------------------------------------------------------------------------------------------------------
# The grid of a robustness evaluation


@dataclass
class Setting:
    """One column of the grid: a label, the perturbation family it plots under, a severity, and the specs applied."""

    name: str
    perturbation: str
    severity: float
    specs: list = field(default_factory=list)


CLEAN = Setting("clean", "clean", 0.0, [])


def make_setting(label: str, parts: list) -> Setting:
    """A setting from its expanded parts; a combination plots under "a+b" at the severity of its last part."""
    return Setting(label, "+".join(p.name for p in parts), parts[-1].severity, list(parts))


def suite_grid(suite: str | None, extra: Sequence[str] = (), specs: Sequence = ()) -> list[Setting]:
    """Clean, the suite's settings, then ``specs`` (recipe entries: name + severity), then ``extra`` ones written
    ``name@severity`` (``rotation@0.5+action_noise@0.1`` combines); a setting named twice is run once. Raises
    ValueError naming the problem for an unknown suite or perturbation or a bad severity."""
    settings = [CLEAN] + [make_setting(label, parts) for label, parts in (suite_settings(suite) if suite else [])]
    settings += [make_setting(spec_label(spec), expand_spec(spec)) for spec in specs]  # exact severities
    for text in extra:
        name, sep, severity = text.rpartition("@")
        if not sep or not name:
            raise ValueError(f"--perturb {text!r}: write it as NAME@SEVERITY, e.g. rotation@0.5")
        try:
            spec = Spec(name, float(severity))
        except ValueError:
            raise ValueError(f"--perturb {text!r}: severity {severity!r} is not a number in [0, 1]") from None
        settings.append(make_setting(spec_label(spec), expand_spec(spec)))
    return list({s.name: s for s in reversed(settings)}.values())[::-1]  # a setting named twice is run once
