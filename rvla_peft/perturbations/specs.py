"""Perturbation specs: validation, combinations (``rotation@0.5+action_noise``), resample overrides
(``rotation@0.5:step``), stable labels, named suites, and the settings grid of a robustness evaluation."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Registers every perturbation. Named by their own modules, not through this package's __init__, which imports
# this module: a name read from it here would be read from a half-initialised module.
import rvla_peft.perturbations.action  # noqa: F401
import rvla_peft.perturbations.observation  # noqa: F401
from rvla_peft.perturbations.base import (
    PERTURBATIONS,
    Perturbation,
    Resample,
    Spec,
    SpecLike,
    check_resample,
    check_severity,
)

# --------------------------------------------------------------------------------------------------------------
# Specs: validation, combinations, labels, suites


def expand_spec(spec: SpecLike) -> list[Spec]:
    """The components of ``spec``, validated: ``"rotation@0.5+action_noise"`` at 0.2 -> rotation 0.5, noise 0.2.

    A part is ``NAME[@SEVERITY][:episode|step]``; the part's mode, else the spec's ``resample`` (if it has one), is
    the component's ``resample`` (None: the perturbation's own). Raises ValueError for an unknown name (with the
    nearest valid one), an empty part, a bad severity or a bad resample mode.
    """
    check_severity(str(spec.name), spec.severity)
    spec_mode = getattr(spec, "resample", None)
    check_resample(str(spec.name), spec_mode)
    components = []
    for part in str(spec.name).split("+"):
        head, colon, mode = (s.strip() for s in part.partition(":"))
        name, at, severity = (s.strip() for s in head.partition("@"))
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
        if colon:
            check_resample(part.strip(), mode)
        components.append(Spec(name, float(value), mode if colon else spec_mode))
    return components


def validate_specs(specs: list[SpecLike]) -> None:
    """Raise ValueError for an unknown perturbation name, an empty combination part or a severity outside [0, 1]."""
    for spec in specs:
        expand_spec(spec)


def build_perturbations(specs: list[SpecLike]) -> list[Perturbation]:
    """Instantiate every component of ``specs`` (validated first), in order."""
    return [PERTURBATIONS[c.name](c.severity, resample=c.resample) for spec in specs for c in expand_spec(spec)]


def resample_mode(component: Spec) -> Resample:
    """When ``component``'s random parameters are drawn: its override, else the perturbation's own ``resample``."""
    return component.resample or PERTURBATIONS[component.name].resample


def _mode_suffix(component: Spec) -> str:
    """``":step"`` / ``":episode"`` when an override differs from the perturbation's own mode, else "" (so the
    labels of default settings never change)."""
    mode = resample_mode(component)
    return "" if mode == PERTURBATIONS[component.name].resample else f":{mode}"


def spec_label(spec: SpecLike) -> str:
    """A stable metric label, every component with its severity: ``"rotation@0.5+action_noise@0.333"``; a part whose
    resample mode is overridden away from its default says so: ``"rotation@0.5:step"``."""
    return "+".join(f"{c.name}@{c.severity:.3g}{_mode_suffix(c)}" for c in expand_spec(spec))


RESAMPLE_NOTES = {"episode": "held per episode", "step": "redrawn every step"}


def spec_records(specs: Sequence[SpecLike]) -> list[dict]:
    """The report's record of each spec: ``{"name", "severity", "resample"}``, resample being the effective mode of
    each component, joined by "+" for a combination (``"episode+step"``)."""
    return [
        {"name": s.name, "severity": s.severity, "resample": "+".join(resample_mode(c) for c in expand_spec(s))}
        for s in specs
    ]


def resample_note(records: Sequence[dict]) -> str:
    """How a setting's parameters are drawn, from its :func:`spec_records` (as report.json has them): "held per
    episode", "redrawn every step", or per part ("rotation held per episode, action_noise redrawn every step");
    "" for none (clean) or a report written before the mode was recorded."""
    parts = []
    for record in records:
        if "resample" not in record:
            return ""
        names = [p.partition(":")[0].partition("@")[0].strip() for p in str(record["name"]).split("+")]
        parts += zip(names, str(record["resample"]).split("+"), strict=False)
    if len({mode for _, mode in parts}) == 1:
        return RESAMPLE_NOTES.get(parts[0][1], parts[0][1])
    return ", ".join(f"{name} {RESAMPLE_NOTES.get(mode, mode)}" for name, mode in parts)


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
    """A setting from its expanded parts; a combination plots under "a+b" at the severity of its last part (a part
    whose resample mode is overridden away from its default plots apart, under "rotation:step")."""
    return Setting(label, "+".join(p.name + _mode_suffix(p) for p in parts), parts[-1].severity, list(parts))


def suite_grid(suite: str | None, extra: Sequence[str] = (), specs: Sequence = ()) -> list[Setting]:
    """Clean, the suite's settings, then ``specs`` (recipe entries: name + severity), then ``extra`` ones written
    ``name@severity[:episode|step]`` (``rotation@0.5+action_noise@0.1`` combines, ``rotation@0.5:step`` redraws the
    angle every step); a setting named twice is run once. Raises ValueError naming the problem for an unknown suite
    or perturbation, a bad severity or a bad resample mode."""
    settings = [CLEAN] + [make_setting(label, parts) for label, parts in (suite_settings(suite) if suite else [])]
    settings += [make_setting(spec_label(spec), expand_spec(spec)) for spec in specs]  # exact severities
    for text in extra:
        name, sep, tail = text.rpartition("@")
        if not sep or not name:
            raise ValueError(f"--perturb {text!r}: write it as NAME@SEVERITY, e.g. rotation@0.5")
        severity, colon, mode = tail.partition(":")  # the last part's mode goes back onto its name
        name = f"{name}:{mode}" if colon else name
        try:
            spec = Spec(name, float(severity))
        except ValueError:
            raise ValueError(f"--perturb {text!r}: severity {severity!r} is not a number in [0, 1]") from None
        settings.append(make_setting(spec_label(spec), expand_spec(spec)))
    return list({s.name: s for s in reversed(settings)}.values())[::-1]  # a setting named twice is run once
