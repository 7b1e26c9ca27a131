"""Observation and action perturbations for robustness training and evaluation, on batched tensors.

Each perturbation has a ``name`` and a ``severity`` in [0, 1] that maps linearly to the physical range stated in its
docstring; severity 0 is exactly the identity. Everything runs as batched torch ops on the env's device (no per-env
Python loop, no host round trip), and randomness comes only from the ``torch.Generator`` passed in, drawn per env
(per image where there are several cameras), so a run is reproducible.

    env = PerturbedEnv(make_envs(cfg.env), [PerturbationSpec("rotation+action_noise", 1 / 3)], seed=0)

Spec names: ``"rotation"``; a combination ``"rotation+action_noise"`` (every part at the spec's severity); a part
may carry its own severity, ``"rotation@0.5+action_noise"`` (rotation at 0.5, action noise at the spec's). A list
of specs composes, in order.

Stateless perturbations implement ``sample`` (all random parameters of a batch, leading dim N, in one go) and
``transform`` (deterministic and row-wise given those), which is what makes "batched == env by env" testable.
Stateful ones (``frame_drop``, ``latency``, ``action_delay``, and the per-episode ``action_bias``/``action_gain``)
keep per-env state that :class:`PerturbedEnv` restarts through ``reset(done)`` when an env's episode ends.

Adding a perturbation: subclass :class:`ImagePerturbation`, :class:`ObservationPerturbation` or
:class:`ActionPerturbation`, set ``name``, implement ``sample``/``transform`` (or ``apply``) and decorate the class
with :func:`register`.

This package imports only torch and the standard library (no simulator): ``rvla_peft.config`` validates recipes
with it before anything heavy loads. The env wrapper that applies perturbations is
:class:`rvla_peft.envs.perturbed.PerturbedEnv`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Protocol

import torch

Obs = dict[str, torch.Tensor]
Params = dict[str, torch.Tensor]

GRIPPER = -1  # index of the gripper command in the action (Panda pd_ee_delta_pose: -1 closed, +1 open)


class SpecLike(Protocol):
    """What a perturbation is built from: ``rvla_peft.config.PerturbationSpec`` or anything shaped like it."""

    name: str
    severity: float


@dataclasses.dataclass(frozen=True)
class Spec:
    """One perturbation at one severity, shaped like ``rvla_peft.config.PerturbationSpec`` (no config import)."""

    name: str
    severity: float


def check_severity(name: str, severity: Any) -> None:
    if isinstance(severity, bool) or not isinstance(severity, (int, float)) or math.isnan(severity):
        raise ValueError(f"perturbation {name!r}: severity must be a number in [0, 1], got {severity!r}")
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"perturbation {name!r}: severity must be in [0, 1], got {severity!r}")


# --------------------------------------------------------------------------------------------------------------
# Base classes


class Perturbation:
    """Base class: a named perturbation whose strength is ``severity`` in [0, 1].

    ``severity`` is read at every call, so :meth:`PerturbedEnv.set_severity_scale` can change it between steps.
    """

    name: ClassVar[str]

    def __init__(self, severity: float) -> None:
        check_severity(self.name, severity)
        self.severity = float(severity)

    def reset(self, done: torch.Tensor) -> None:
        """Start a new episode for the envs where ``done`` ([N] bool) is set; stateless perturbations ignore it."""

    def sample(self, x: Any, generator: torch.Generator) -> Params:
        """Every random parameter for the batch ``x``, each with leading dim N (all but the delay-like ones)."""
        raise NotImplementedError

    def transform(self, x: Any, params: Params) -> Any:
        """Apply with the given parameters: deterministic and row by row, so any slice of rows gives the same rows."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(severity={self.severity:g})"


class ObservationPerturbation(Perturbation):
    """Acts on the observation dict the policy sees ({"rgb": uint8 [N, H, W, 3], "state": float32 [N, D]})."""

    def apply(self, obs: Obs, generator: torch.Generator) -> Obs:
        """The perturbed observation; advances per-env state where there is some. The input is never modified."""
        return obs if self.severity == 0 else self.transform(obs, self.sample(obs, generator))

    def peek(self, obs: Obs, generator: torch.Generator) -> Obs:
        """Like ``apply`` but leaves per-env state alone: for ``final_obs``, seen next to the step's ``obs``."""
        return self.apply(obs, generator)


class ImagePerturbation(ObservationPerturbation):
    """Acts on ``obs["rgb"]`` only, over its last three dims [..., H, W, 3], so every camera is perturbed.

    ``sample`` draws parameters of shape ``rgb.shape[:-3] + (...)``: one draw per image, i.e. per env and camera.
    Subclasses implement ``transform_images`` on flat uint8 [B, H, W, 3] with parameters of leading dim B.
    """

    def transform(self, obs: Obs, params: Params) -> Obs:
        rgb = obs["rgb"]
        flat = rgb.reshape(-1, *rgb.shape[-3:])
        flat_params = {k: v.reshape(flat.shape[0], *v.shape[rgb.dim() - 3 :]) for k, v in params.items()}
        return {**obs, "rgb": self.transform_images(flat, flat_params).reshape(rgb.shape)}

    def transform_images(self, rgb: torch.Tensor, params: Params) -> torch.Tensor:
        raise NotImplementedError


class ActionPerturbation(Perturbation):
    """Acts on the action [N, action_dim] in [-1, 1] the env executes; the policy's tensor is never modified."""

    def apply(self, action: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return action if self.severity == 0 else self.transform(action, self.sample(action, generator))


PERTURBATIONS: dict[str, type[Perturbation]] = {}


def register(cls: type[Perturbation]) -> type[Perturbation]:
    """Class decorator adding a perturbation to :data:`PERTURBATIONS` under its ``name``."""
    if cls.name in PERTURBATIONS:
        raise ValueError(f"perturbation {cls.name!r} is registered twice")
    PERTURBATIONS[cls.name] = cls
    return cls


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _rand(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) on ``like``'s device, in its dtype when floating (else float32)."""
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return torch.rand(shape, generator=generator, device=like.device, dtype=dtype)


def _randint(bound: torch.Tensor | int, u: torch.Tensor) -> torch.Tensor:
    """Integers uniform in [0, bound] (inclusive, per element) from uniforms ``u`` in [0, 1)."""
    return (u * (bound + 1)).floor().long()


def _rows(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-env [N] mask viewed to broadcast over ``x`` [N, ...]."""
    return mask.view(-1, *([1] * (x.dim() - 1)))


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _box_mask(top: torch.Tensor, left: torch.Tensor, height: Any, width: Any, h: int, w: int) -> torch.Tensor:
    """[B, h, w] bool, True inside each image's rectangle (top, left, height, width)."""
    rows = torch.arange(h, device=top.device)
    cols = torch.arange(w, device=top.device)
    inside_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])
    inside_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])
    return inside_rows[:, :, None] & inside_cols[:, None, :]


def _with_arm(action: torch.Tensor, arm: torch.Tensor) -> torch.Tensor:
    """The action with its arm dims (all but the gripper) replaced by ``arm``, clamped to [-1, 1]."""
    return torch.cat([arm.clamp(-1.0, 1.0), action[:, GRIPPER:]], dim=1)


class _History:
    """Per-env ring buffer of the last ``size`` entries, for delays.

    ``delayed(x, k)`` gives each env's entry from ``k`` steps ago, or the first entry of its episode when the
    episode is younger than that (x itself on its first step). Indexing is by a Python int position shared by all
    envs plus a per-env age tensor, so nothing syncs with the device.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._buffer: torch.Tensor | None = None  # [size, N, ...]
        self._age: torch.Tensor | None = None  # [N] entries pushed this episode, capped at size
        self._pos = 0  # next slot to write

    def reset(self, done: torch.Tensor) -> None:
        if self._age is not None:
            self._age = self._age.masked_fill(done, 0)

    def delayed(self, x: torch.Tensor, k: int) -> torch.Tensor:
        if k == 0 or self._buffer is None:
            return x
        back = self._age.clamp(max=k)
        past = self._buffer[(self._pos - back) % self.size, torch.arange(x.shape[0], device=x.device)]
        return torch.where(_rows(back > 0, x), past, x)

    def push(self, x: torch.Tensor) -> None:
        if self._buffer is None:
            self._buffer = x.new_empty((self.size, *x.shape))
            self._age = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        self._buffer[self._pos] = x
        self._pos = (self._pos + 1) % self.size
        self._age = (self._age + 1).clamp_(max=self.size)
