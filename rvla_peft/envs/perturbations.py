"""Observation and action perturbations for robustness training and evaluation, on batched tensors.

Each perturbation has a ``name`` and a ``severity`` in [0, 1] that maps linearly to a documented physical range
(severity 0 is always the identity). Randomness comes only from a ``torch.Generator`` the caller seeds, on the
env's device, so a run is reproducible and no per-env Python loop is needed.

    env = PerturbedEnv(make_envs(cfg.env), [PerturbationSpec("action_noise", 1 / 3)], seed=0)

Adding a perturbation: subclass :class:`ObservationPerturbation` or :class:`ActionPerturbation`, set ``name``,
implement ``apply`` and decorate the class with :func:`register`.

This module imports only torch and the standard library: ``rvla_peft.config`` imports :func:`validate_specs`
while checking a recipe, before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from rvla_peft.envs.maniskill import Step, VecEnv


class SpecLike(Protocol):
    """What a perturbation is built from: ``rvla_peft.config.PerturbationSpec`` or anything shaped like it."""

    name: str
    severity: float


class Perturbation:
    """Base class: a named perturbation whose strength is ``severity`` in [0, 1]."""

    name: ClassVar[str]

    def __init__(self, severity: float) -> None:
        _check_severity(self.name, severity)
        self.severity = float(severity)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(severity={self.severity:g})"


class ObservationPerturbation(Perturbation):
    """Acts on the observation dict the policy sees ({"rgb": uint8 [N, H, W, 3], "state": float32 [N, D]})."""

    def apply(self, obs: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class ActionPerturbation(Perturbation):
    """Acts on the action [N, action_dim] in [-1, 1] before the env executes it (the policy's action is kept)."""

    def apply(self, action: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


PERTURBATIONS: dict[str, type[Perturbation]] = {}


def register(cls: type[Perturbation]) -> type[Perturbation]:
    """Class decorator adding a perturbation to :data:`PERTURBATIONS` under its ``name``."""
    if cls.name in PERTURBATIONS:
        raise ValueError(f"perturbation {cls.name!r} is registered twice")
    PERTURBATIONS[cls.name] = cls
    return cls


@register
class PixelNoise(ObservationPerturbation):
    """Additive Gaussian noise on every pixel and channel of ``rgb``.

    Standard deviation = 64 intensity levels (of 255) x severity: severity 0.5 gives std 32. The result is rounded
    and clamped to [0, 255] and stays uint8, so at high severity clamping makes the measured std a little smaller.
    """

    name = "pixel_noise"
    max_std = 64.0

    def apply(self, obs: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        if self.severity == 0:
            return obs
        rgb = obs["rgb"]
        noise = torch.randn(rgb.shape, generator=generator, device=rgb.device) * (self.max_std * self.severity)
        noisy = (rgb.float() + noise).round_().clamp_(0, 255).to(rgb.dtype)
        return {**obs, "rgb": noisy}


@register
class ActionNoise(ActionPerturbation):
    """Additive zero-mean Gaussian noise on the executed action, then clamped to [-1, 1].

    Standard deviation = 0.3 x severity, so severities 1/3, 2/3 and 1 give the RobustVLA paper's sigma 0.1, 0.2
    and 0.3 (in the env's normalised action space).
    """

    name = "action_noise"
    max_std = 0.3

    def apply(self, action: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.severity == 0:
            return action
        noise = torch.randn(action.shape, generator=generator, device=action.device, dtype=action.dtype)
        return (action + noise * (self.max_std * self.severity)).clamp_(-1.0, 1.0)


def _check_severity(name: str, severity: Any) -> None:
    if isinstance(severity, bool) or not isinstance(severity, (int, float)) or math.isnan(severity):
        raise ValueError(f"perturbation {name!r}: severity must be a number in [0, 1], got {severity!r}")
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"perturbation {name!r}: severity must be in [0, 1], got {severity!r}")


def validate_specs(specs: list[SpecLike]) -> None:
    """Raise ValueError for an unknown perturbation name or a severity outside [0, 1]."""
    for spec in specs:
        if spec.name not in PERTURBATIONS:
            valid = sorted(PERTURBATIONS)
            hint = difflib.get_close_matches(str(spec.name), valid, n=1)
            guess = f"did you mean {hint[0]!r}? " if hint else ""
            raise ValueError(f"unknown perturbation {spec.name!r}; {guess}valid names: {valid}")
        _check_severity(spec.name, spec.severity)


def build_perturbations(specs: list[SpecLike]) -> list[Perturbation]:
    """Instantiate the perturbations named by ``specs`` (validated first), in order."""
    validate_specs(specs)
    return [PERTURBATIONS[spec.name](spec.severity) for spec in specs]


class PerturbedEnv:
    """A VecEnv whose observations and executed actions are perturbed; same interface as the env it wraps.

    Observation perturbations apply to ``obs`` and ``final_obs`` returned by ``reset`` and ``step``; action
    perturbations apply to the action handed to the inner env only (the caller's tensor is never modified).
    ``reset(seed=s)`` also reseeds the perturbations' generator from ``(seed, s)``, so a seeded evaluation is
    reproducible. With no specs it is a pass-through.
    """

    def __init__(self, env: VecEnv, specs: list[SpecLike], seed: int = 0) -> None:
        self.env = env
        self.seed = seed
        self.perturbations = build_perturbations(specs)
        self._obs_perturbations = [p for p in self.perturbations if isinstance(p, ObservationPerturbation)]
        self._action_perturbations = [p for p in self.perturbations if isinstance(p, ActionPerturbation)]
        self.generator = torch.Generator(device=env.device)
        self.generator.manual_seed(seed)

    @property
    def num_envs(self) -> int:
        return self.env.num_envs

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def action_dim(self) -> int:
        return self.env.action_dim

    @property
    def instructions(self) -> list[str]:
        return self.env.instructions

    def reset(self, seed: int | None = None) -> dict[str, torch.Tensor]:
        if seed is not None:
            # hash of a tuple of ints is stable across processes (no hash randomisation for ints).
            self.generator.manual_seed(hash((self.seed, seed)))
        return self._perturb_obs(self.env.reset(seed=seed))

    def step(self, action: torch.Tensor) -> Step:
        action = action.to(self.device)
        for p in self._action_perturbations:
            action = p.apply(action, self.generator)
        step = self.env.step(action)
        if not self._obs_perturbations:
            return step
        final_obs = None if step.final_obs is None else self._perturb_obs(step.final_obs)
        return dataclasses.replace(step, obs=self._perturb_obs(step.obs), final_obs=final_obs)

    def close(self) -> None:
        self.env.close()

    def _perturb_obs(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for p in self._obs_perturbations:
            obs = p.apply(obs, self.generator)
        return obs
