"""Observation and action perturbations for robustness training and evaluation, on batched tensors.

Each perturbation has a ``name`` and a ``severity`` in [0, 1] that maps linearly to the physical range stated in its
docstring; severity 0 is exactly the identity. Everything runs as batched torch ops on the env's device (no per-env
Python loop, no host round trip), and randomness comes only from the ``torch.Generator`` passed in, drawn per env
(per image where there are several cameras), so a run is reproducible.

    env = PerturbedEnv(make_envs(cfg.env), [PerturbationSpec("rotation+action_noise", 1 / 3)], seed=0)

Spec names: ``"rotation"``; a combination ``"rotation+action_noise"`` (every part at the spec's severity); a part
may carry its own severity, ``"rotation@0.5+action_noise"`` (rotation at 0.5, action noise at the spec's), and its
own resample mode, ``"rotation@0.5:step+action_noise"`` (a part is ``NAME[@SEVERITY][:episode|step]``; the spec's
``resample``, if set, applies to the parts without one). A list of specs composes, in order.

Random parameters: ``draw`` gives the unit-scale random draws of a batch (uniforms, normals; leading dim N, in one
go, independent of the severity), ``parameters`` maps them through the current severity to physical ones (pixels,
degrees), and ``transform`` applies those, deterministic and row-wise, which is what makes "batched == env by env"
testable; ``sample`` = ``parameters(draw)``. Each class states when its draws are made, ``resample``:

* ``"episode"``: drawn for env i when its episode starts and held for the whole episode, where the physical cause
  persists (a moved camera, changed lighting, an occluder, a miscalibrated actuator);
* ``"step"``: drawn afresh at every step (sensor noise, dropped frames or commands).

A spec may override it (``rotation@0.5:step``, or ``resample`` on the spec). Held draws are unit-scale, so a
curriculum changing the severity scales a fixed draw. A per-episode perturbation still draws at every step and keeps
the new draw only for envs whose episode has just started (``reset(done)``): the generator then advances the same
way whatever the episode lengths, so every draw depends only on the seed and the step number, and two policies
whose episodes end at different times still see the same draws (common random numbers).

Stateful ones (``frame_drop``, ``latency``, ``action_delay``) also keep histories that :class:`PerturbedEnv`
restarts through ``reset(done)`` when an env's episode ends.

Adding a perturbation: subclass :class:`ImagePerturbation`, :class:`ObservationPerturbation` or
:class:`ActionPerturbation`, set ``name`` and ``resample`` (with a one-line reason in the docstring), implement
``draw``/``transform`` (and ``parameters`` where the severity shapes the draws; or ``apply``) and decorate the class
with :func:`register`.

This package imports only torch and the standard library (no simulator): ``rvla_peft.config`` validates recipes
with it before anything heavy loads. The env wrapper that applies perturbations is
:class:`rvla_peft.envs.perturbed.PerturbedEnv`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal, Protocol, get_args

import torch

Obs = dict[str, torch.Tensor]
Params = dict[str, torch.Tensor]
Resample = Literal["episode", "step"]
Generators = torch.Generator | list[torch.Generator]  # one for the batch, or one per env
RESAMPLE_MODES: tuple[str, ...] = get_args(Resample)

GRIPPER = -1  # index of the gripper command in the action (Panda pd_ee_delta_pose: -1 closed, +1 open)


class SpecLike(Protocol):
    """What a perturbation is built from: ``rvla_peft.config.PerturbationSpec`` or anything shaped like it.

    It may also have ``resample`` ("episode", "step" or None for each perturbation's own), read with getattr.
    """

    name: str
    severity: float


@dataclasses.dataclass(frozen=True)
class Spec:
    """One perturbation at one severity, shaped like ``rvla_peft.config.PerturbationSpec`` (no config import).

    ``resample`` None: the perturbation's own ``resample``; "episode" or "step" overrides it.
    """

    name: str
    severity: float
    resample: Resample | None = None


def check_severity(name: str, severity: Any) -> None:
    if isinstance(severity, bool) or not isinstance(severity, (int, float)) or math.isnan(severity):
        raise ValueError(f"perturbation {name!r}: severity must be a number in [0, 1], got {severity!r}")
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"perturbation {name!r}: severity must be in [0, 1], got {severity!r}")


def check_resample(name: str, resample: Any) -> None:
    if resample is not None and resample not in RESAMPLE_MODES:
        raise ValueError(
            f"perturbation {name!r}: resample must be 'episode' (held per episode) or 'step' (redrawn every step), "
            f"got {resample!r}"
        )


# --------------------------------------------------------------------------------------------------------------
# Base classes


class Perturbation:
    """Base class: a named perturbation whose strength is ``severity`` in [0, 1].

    ``severity`` is read at every call, so :meth:`PerturbedEnv.set_severity_scale` can change it between steps.
    ``resample`` (class): when the random draws are made, "episode" or "step" (module docstring); the instance's
    ``mode`` is that unless the constructor's ``resample`` overrides it.
    """

    name: ClassVar[str]
    resample: ClassVar[Resample]

    def __init__(self, severity: float, resample: Resample | None = None) -> None:
        check_severity(self.name, severity)
        check_resample(self.name, resample)
        self.severity = float(severity)
        self.mode: Resample = resample or type(self).resample
        self._held: Params | None = None  # "episode": each env's draws for its current episode
        self._redraw: torch.Tensor | None = None  # [N] bool: envs whose episode started since the last draw

    def reset(self, done: torch.Tensor) -> None:
        """Start a new episode for the envs where ``done`` ([N] bool) is set: their held draws are replaced at the
        next call (and any history restarts)."""
        if self._held is not None:
            self._redraw = done if self._redraw is None else self._redraw | done

    def draw(self, x: Any, generator: torch.Generator) -> Params:
        """Unit-scale random draws for the batch ``x``, each with leading dim N, independent of the severity."""
        raise NotImplementedError

    def parameters(self, x: Any, draws: Params) -> Params:
        """The physical parameters at the current severity from unit draws (default: the draws themselves)."""
        return draws

    def sample(self, x: Any, generator: torch.Generator) -> Params:
        """Fresh random parameters for the batch ``x`` at the current severity: ``parameters(draw)``."""
        return self.parameters(x, self.draw(x, generator))

    def transform(self, x: Any, params: Params) -> Any:
        """Apply with the given parameters: deterministic and row by row, so any slice of rows gives the same rows."""
        raise NotImplementedError

    def draws(self, x: Any, generator: Generators, commit: bool = True) -> Params:
        """This step's unit draws: fresh ("step"), or each env's for its episode ("episode"); ``commit=False``
        leaves the held ones alone. ``generator`` may be a list, one per env: row i then draws from the i-th
        (``PerturbedEnv(keyed=True)``).

        Always draws a full batch, also for "episode" (only the envs starting an episode keep the new rows), so the
        generator advances the same way at every step, whatever the episode lengths and the severity.
        """
        fresh = self.draw(x, generator) if isinstance(generator, torch.Generator) else _draw_rows(self, x, generator)
        if self.mode == "step":
            return fresh
        held = self._held
        if held is None or any(k not in held or held[k].shape != v.shape for k, v in fresh.items()):
            held = fresh  # first call, or the batch changed shape: every env starts afresh
        elif self._redraw is not None:
            held = {k: torch.where(_rows(self._redraw, v), v, held[k]) for k, v in fresh.items()}
        if commit:
            self._held, self._redraw = held, None
        return held

    def _perturb(self, x: Any, generator: Generators, commit: bool) -> Any:
        draws = self.draws(x, generator, commit)  # drawn at severity 0 too: the curriculum never shifts the draws
        return x if self.severity == 0 else self.transform(x, self.parameters(x, draws))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(severity={self.severity:g}, resample={self.mode!r})"


class ObservationPerturbation(Perturbation):
    """Acts on the observation dict the policy sees ({"rgb": uint8 [N, H, W, 3], "state": float32 [N, D]})."""

    def apply(self, obs: Obs, generator: torch.Generator) -> Obs:
        """The perturbed observation; advances per-env state where there is some. The input is never modified."""
        return self._perturb(obs, generator, commit=True)

    def peek(self, obs: Obs, generator: torch.Generator) -> Obs:
        """What ``apply`` would return, leaving per-env state alone: for ``final_obs``, seen next to the step's
        ``obs`` (before ``reset(done)``, so with the finished episodes' held draws)."""
        return self._perturb(obs, generator, commit=False)


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
        return self._perturb(action, generator, commit=True)


PERTURBATIONS: dict[str, type[Perturbation]] = {}


def register(cls: type[Perturbation]) -> type[Perturbation]:
    """Class decorator adding a perturbation to :data:`PERTURBATIONS` under its ``name``."""
    if cls.name in PERTURBATIONS:
        raise ValueError(f"perturbation {cls.name!r} is registered twice")
    if getattr(cls, "resample", None) not in RESAMPLE_MODES:
        raise TypeError(f"perturbation {cls.name!r}: set the class attribute resample to 'episode' or 'step'")
    PERTURBATIONS[cls.name] = cls
    return cls


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _draw_rows(perturbation: Perturbation, x: Any, generators: list[torch.Generator]) -> Params:
    """``perturbation.draw`` row by row, row i from ``generators[i]``: each env's draws depend on its generator only,
    not on the batch around it."""
    rows = [perturbation.draw(_row(x, i), g) for i, g in enumerate(generators)]
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}


def _row(x: Any, i: int) -> Any:
    """Row i of a batch (a tensor or a dict of tensors), keeping the batch dim."""
    return {k: v[i : i + 1] for k, v in x.items()} if isinstance(x, dict) else x[i : i + 1]


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
