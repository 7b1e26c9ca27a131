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

This module imports only torch and the standard library: ``rvla_peft.config`` imports :func:`validate_specs`
while checking a recipe, before anything heavy loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from rvla_peft.envs.maniskill import Step, VecEnv

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


# --------------------------------------------------------------------------------------------------------------
# Base classes


class Perturbation:
    """Base class: a named perturbation whose strength is ``severity`` in [0, 1].

    ``severity`` is read at every call, so :meth:`PerturbedEnv.set_severity_scale` can change it between steps.
    """

    name: ClassVar[str]

    def __init__(self, severity: float) -> None:
        _check_severity(self.name, severity)
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


# --------------------------------------------------------------------------------------------------------------
# Observation perturbations: the RobustVLA paper's five


@register
class Shift(ImagePerturbation):
    """Image translation (a camera that moved), by whole pixels.

    Each image moves by (dy, dx), each uniform among the integers in [-d, d] with d = round(severity x 20% of the
    image side): up to 13 px on a 64-px image at severity 1, 6 px at 0.5. Content leaving the frame is lost; the
    uncovered border is filled with zeros (black, the default) or, with ``fill="edge"``, the nearest edge pixel.
    """

    name = "shift"
    max_fraction = 0.2

    def __init__(self, severity: float, fill: Literal["zeros", "edge"] = "zeros") -> None:
        super().__init__(severity)
        if fill not in ("zeros", "edge"):
            raise ValueError(f"shift: fill must be 'zeros' or 'edge', got {fill!r}")
        self.fill = fill

    def max_shift(self, side: int) -> int:
        return round(self.severity * self.max_fraction * side)

    def sample(self, obs: Obs, generator: torch.Generator) -> Params:
        rgb = obs["rgb"]
        h, w = rgb.shape[-3:-1]
        u = _rand((*rgb.shape[:-3], 2), generator, rgb)
        dy, dx = self.max_shift(h), self.max_shift(w)
        return {"dy": _randint(2 * dy, u[..., 0]) - dy, "dx": _randint(2 * dx, u[..., 1]) - dx}

    def transform_images(self, rgb: torch.Tensor, params: Params) -> torch.Tensor:
        b, h, w, _ = rgb.shape
        rows = torch.arange(h, device=rgb.device) - params["dy"][:, None]  # source row of each output row
        cols = torch.arange(w, device=rgb.device) - params["dx"][:, None]
        batch = torch.arange(b, device=rgb.device)[:, None, None]
        out = rgb[batch, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
        if self.fill == "edge":
            return out
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        return out.masked_fill(~inside[..., None], 0)


@register
class Rotation(ImagePerturbation):
    """Image rotation about its centre (a camera rolled), bilinear, zeros outside the original frame.

    Angle uniform in [-30, 30] degrees x severity, positive = counter-clockwise as displayed (rows top to bottom).
    """

    name = "rotation"
    max_degrees = 30.0

    def sample(self, obs: Obs, generator: torch.Generator) -> Params:
        rgb = obs["rgb"]
        u = _rand(rgb.shape[:-3], generator, rgb)
        return {"degrees": (2 * u - 1) * (self.max_degrees * self.severity)}

    def transform_images(self, rgb: torch.Tensor, params: Params) -> torch.Tensor:
        _, h, w, _ = rgb.shape
        a = torch.deg2rad(params["degrees"].float())
        cos, sin, zero = a.cos(), a.sin(), torch.zeros_like(a)
        # Output pixel -> input pixel (inverse rotation) in normalised coordinates, corrected for the aspect ratio.
        theta = torch.stack(
            [torch.stack([cos, -sin * h / w, zero], -1), torch.stack([sin * w / h, cos, zero], -1)], dim=1
        )
        x = rgb.permute(0, 3, 1, 2).float()
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return _to_uint8(out.permute(0, 2, 3, 1))


_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of float [..., 3], as torchvision's rgb_to_grayscale (scalar weights: no host-to-device copy)."""
    return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


@functools.cache
def _hue_basis(device: torch.device) -> torch.Tensor:
    """[3, 3, 3] such that turning the hue by angle t maps RGB by ``basis[0] + cos t basis[1] + sin t basis[2]``.

    That is YIQ^-1 R(t) YIQ with R(t) rotating the chroma (I, Q) plane; built once per device.
    """
    yiq = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)
    units = torch.zeros(3, 3, 3, dtype=torch.float64)
    units[0, 0, 0] = 1  # luma kept
    units[1, 1, 1] = units[1, 2, 2] = 1  # cos t on the chroma diagonal
    units[2, 2, 1], units[2, 1, 2] = 1, -1  # sin t off it
    return (torch.linalg.inv(yiq) @ units @ yiq).to(device, torch.float32)


@register
class ColorJitter(ImagePerturbation):
    """Brightness, contrast, saturation and hue changes (lighting, white balance), in that order.

    Brightness, contrast and saturation factors are each uniform in [1 - 0.5 x severity, 1 + 0.5 x severity]
    (torchvision's ``ColorJitter(0.5, 0.5, 0.5, 0.1)`` at severity 1); the hue turns by a uniform fraction of the
    colour wheel in [-0.1, 0.1] x severity (+-36 degrees at severity 1), a rotation of the YIQ chroma plane.
    """

    name = "color_jitter"
    max_factor_change = 0.5
    max_hue = 0.1

    def sample(self, obs: Obs, generator: torch.Generator) -> Params:
        rgb = obs["rgb"]
        signed = 2 * _rand((*rgb.shape[:-3], 4), generator, rgb) - 1
        factors = 1 + signed[..., :3] * (self.max_factor_change * self.severity)
        return {
            "brightness": factors[..., 0],
            "contrast": factors[..., 1],
            "saturation": factors[..., 2],
            "hue": signed[..., 3] * (self.max_hue * self.severity),
        }

    def transform_images(self, rgb: torch.Tensor, params: Params) -> torch.Tensor:
        x = rgb.float() / 255

        def blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
            f = factor.view(-1, 1, 1, 1).float()
            return (f * a + (1 - f) * b).clamp_(0, 1)

        x = (x * params["brightness"].view(-1, 1, 1, 1).float()).clamp_(0, 1)
        x = blend(x, _grey(x).mean(dim=(1, 2)).view(-1, 1, 1, 1), params["contrast"])
        x = blend(x, _grey(x)[..., None], params["saturation"])
        turn = (2 * math.pi * params["hue"].float()).view(-1, 1, 1)
        basis = _hue_basis(x.device)
        matrix = basis[0] + turn.cos() * basis[1] + turn.sin() * basis[2]  # [B, 3, 3] on RGB column vectors
        x = torch.einsum("bij,bhwj->bhwi", matrix, x).clamp_(0, 1)
        return _to_uint8(x * 255)


@register
class Occlusion(ImagePerturbation):
    """A flat grey-to-black square over part of the image (something in front of the camera).

    Side = round(severity x 50% of the shorter image side): 32 px on a 64-px image at severity 1 (a quarter of
    the area). Position uniform with the square fully inside; its grey level uniform in 0 (black) to 128 (mid grey).
    """

    name = "occlusion"
    max_fraction = 0.5

    def sample(self, obs: Obs, generator: torch.Generator) -> Params:
        rgb = obs["rgb"]
        h, w = rgb.shape[-3:-1]
        side = round(self.severity * self.max_fraction * min(h, w))
        u = _rand((*rgb.shape[:-3], 3), generator, rgb)
        return {
            "top": _randint(h - side, u[..., 0]),
            "left": _randint(w - side, u[..., 1]),
            "side": torch.full_like(u[..., 0], side, dtype=torch.long),
            "level": _randint(128, u[..., 2]),
        }

    def transform_images(self, rgb: torch.Tensor, params: Params) -> torch.Tensor:
        _, h, w, _ = rgb.shape
        inside = _box_mask(params["top"], params["left"], params["side"], params["side"], h, w)
        return torch.where(inside[..., None], params["level"].to(rgb.dtype).view(-1, 1, 1, 1), rgb)


@register
class RandomErasing(ImagePerturbation):
    """torchvision-style random erasing: a rectangle of random pixel values.

    Area uniform in [2%, 33%] of the image x severity (torchvision's default ``scale`` at severity 1), aspect ratio
    log-uniform in [0.3, 3.3], position uniform inside the image; every pixel and channel of the rectangle gets an
    independent uniform value in 0..255. Unlike torchvision, every image is erased (no probability p).
    """

    name = "random_erasing"
    area = (0.02, 0.33)
    log_ratio = (math.log(0.3), math.log(3.3))

    def sample(self, obs: Obs, generator: torch.Generator) -> Params:
        rgb = obs["rgb"]
        h, w = rgb.shape[-3:-1]
        u = _rand((*rgb.shape[:-3], 4), generator, rgb)
        area = (self.area[0] + (self.area[1] - self.area[0]) * u[..., 0]) * (self.severity * h * w)
        ratio = torch.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * u[..., 1])
        height = (area * ratio).sqrt().round().long().clamp(0, h)
        width = (area / ratio).sqrt().round().long().clamp(0, w)
        values = torch.randint(0, 256, rgb.shape, generator=generator, device=rgb.device, dtype=torch.uint8)
        return {
            "top": _randint(h - height, u[..., 2]),
            "left": _randint(w - width, u[..., 3]),
            "height": height,
            "width": width,
            "values": values,
        }

    def transform_images(self, rgb: torch.Tensor, params: Params) -> torch.Tensor:
        _, h, w, _ = rgb.shape
        inside = _box_mask(params["top"], params["left"], params["height"], params["width"], h, w)
        return torch.where(inside[..., None], params["values"], rgb)


# --------------------------------------------------------------------------------------------------------------
# More observation perturbations: sensor noise and timing


@register
class PixelNoise(ImagePerturbation):
    """Additive Gaussian noise on every pixel and channel of ``rgb``.

    Standard deviation = 64 intensity levels (of 255) x severity: severity 0.5 gives std 32. The result is rounded
    and clamped to [0, 255] and stays uint8, so at high severity clamping makes the measured std a little smaller.
    """

    name = "pixel_noise"
    max_std = 64.0

    def sample(self, obs: Obs, generator: torch.Generator) -> Params:
        rgb = obs["rgb"]
        return {"noise": torch.randn(rgb.shape, generator=generator, device=rgb.device)}

    def transform_images(self, rgb: torch.Tensor, params: Params) -> torch.Tensor:
        return _to_uint8(rgb.float() + params["noise"] * (self.max_std * self.severity))


@register
class Blur(ImagePerturbation):
    """Gaussian blur (defocus, motion smear), the same for every image: no random draws.

    sigma = severity x 3% of the shorter image side (1.9 px on a 64-px image at severity 1), kernel radius
    ceil(3 sigma), edges replicated.
    """

    name = "blur"
    max_fraction = 0.03

    def sigma(self, side: int) -> float:
        return self.severity * self.max_fraction * side

    def sample(self, obs: Obs, generator: torch.Generator) -> Params:
        return {}

    def transform_images(self, rgb: torch.Tensor, params: Params) -> torch.Tensor:
        b, h, w, c = rgb.shape
        sigma = self.sigma(min(h, w))
        radius = math.ceil(3 * sigma)
        taps = torch.arange(-radius, radius + 1, device=rgb.device, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
        kernel = kernel / kernel.sum()
        x = rgb.permute(0, 3, 1, 2).reshape(b * c, 1, h, w).float()
        x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
        x = F.conv2d(F.conv2d(x, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))
        return _to_uint8(x.reshape(b, c, h, w).permute(0, 2, 3, 1))


@register
class SaltPepper(ImagePerturbation):
    """Impulse noise: dead (black) and stuck (white) pixels, all channels of a pixel together.

    A fraction 10% x severity of the pixels is hit, half set to 0 and half to 255.
    """

    name = "salt_pepper"
    max_fraction = 0.1

    def sample(self, obs: Obs, generator: torch.Generator) -> Params:
        rgb = obs["rgb"]
        return {"u": _rand(rgb.shape[:-1], generator, rgb)}

    def transform_images(self, rgb: torch.Tensor, params: Params) -> torch.Tensor:
        fraction = self.max_fraction * self.severity
        u = params["u"][..., None]
        return rgb.masked_fill(u < fraction / 2, 0).masked_fill((u >= fraction / 2) & (u < fraction), 255)


@register
class StateNoise(ObservationPerturbation):
    """Additive Gaussian noise on ``obs["state"]`` (proprioception: joint angles in rad, TCP pose in m).

    Standard deviation = 0.05 x severity in the state's own units, on every entry.
    """

    name = "state_noise"
    max_std = 0.05

    def sample(self, obs: Obs, generator: torch.Generator) -> Params:
        state = obs["state"]
        return {"noise": torch.randn(state.shape, generator=generator, device=state.device, dtype=state.dtype)}

    def transform(self, obs: Obs, params: Params) -> Obs:
        return {**obs, "state": obs["state"] + params["noise"] * (self.max_std * self.severity)}


@register
class FrameDrop(ObservationPerturbation):
    """Dropped camera frames: with probability 50% x severity per env and step, the env shows its last frame again.

    A run of drops freezes the image. The first frame of an episode is never dropped. Only ``rgb`` (every camera
    of the env together); the state stays current.
    """

    name = "frame_drop"
    max_rate = 0.5

    def __init__(self, severity: float) -> None:
        super().__init__(severity)
        self._last: torch.Tensor | None = None  # [N, ...] the frame each env showed last
        self._started: torch.Tensor | None = None  # [N] bool: the env has shown a frame of its current episode

    def reset(self, done: torch.Tensor) -> None:
        if self._started is not None:
            self._started = self._started & ~done

    def apply(self, obs: Obs, generator: torch.Generator) -> Obs:
        out = self.peek(obs, generator)
        self._last = out["rgb"]
        self._started = torch.ones(out["rgb"].shape[0], dtype=torch.bool, device=out["rgb"].device)
        return out

    def peek(self, obs: Obs, generator: torch.Generator) -> Obs:
        rgb = obs["rgb"]
        if self.severity == 0 or self._last is None:
            return obs
        drop = (_rand((rgb.shape[0],), generator, rgb) < self.max_rate * self.severity) & self._started
        return {**obs, "rgb": torch.where(_rows(drop, rgb), self._last, rgb)}


@register
class Latency(ObservationPerturbation):
    """Camera latency: the env shows the frame from k = round(severity x 5) steps ago (250 ms at ManiSkill's 20 Hz).

    Early in an episode, the episode's first frame. Only ``rgb``; the state stays current (encoders are fast).
    """

    name = "latency"
    max_steps = 5

    def __init__(self, severity: float) -> None:
        super().__init__(severity)
        self._frames = _History(self.max_steps)

    def steps(self) -> int:
        return round(self.severity * self.max_steps)

    def reset(self, done: torch.Tensor) -> None:
        self._frames.reset(done)

    def apply(self, obs: Obs, generator: torch.Generator) -> Obs:
        out = self.peek(obs, generator)
        self._frames.push(obs["rgb"])
        return out

    def peek(self, obs: Obs, generator: torch.Generator) -> Obs:
        k = self.steps()
        return obs if k == 0 else {**obs, "rgb": self._frames.delayed(obs["rgb"], k)}


# --------------------------------------------------------------------------------------------------------------
# Action perturbations


@register
class ActionNoise(ActionPerturbation):
    """Additive zero-mean Gaussian noise on the executed action, then clamped to [-1, 1].

    Standard deviation = 0.3 x severity, so severities 1/3, 2/3 and 1 give the RobustVLA paper's sigma 0.1, 0.2
    and 0.3 (in the env's normalised action space).
    """

    name = "action_noise"
    max_std = 0.3

    def sample(self, action: torch.Tensor, generator: torch.Generator) -> Params:
        noise = torch.randn(action.shape, generator=generator, device=action.device, dtype=action.dtype)
        return {"noise": noise}

    def transform(self, action: torch.Tensor, params: Params) -> torch.Tensor:
        return (action + params["noise"] * (self.max_std * self.severity)).clamp_(-1.0, 1.0)


class _PerEpisodeAction(ActionPerturbation):
    """Parameters drawn per env at its episode's first action and held until its episode ends.

    ``sample`` draws unit-scale values that ``transform`` scales by the current severity, so a curriculum changing
    the severity acts at once and the draws do not depend on it.
    """

    def __init__(self, severity: float) -> None:
        super().__init__(severity)
        self._params: Params | None = None
        self._redraw: torch.Tensor | None = None  # [N] bool: envs whose episode started since the last action

    def reset(self, done: torch.Tensor) -> None:
        self._redraw = done if self._redraw is None else self._redraw | done

    def apply(self, action: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self._params is None or self._redraw is not None:
            fresh = self.sample(action, generator)
            if self._params is not None:
                fresh = {k: torch.where(_rows(self._redraw, v), v, self._params[k]) for k, v in fresh.items()}
            self._params, self._redraw = fresh, None
        return action if self.severity == 0 else self.transform(action, self._params)


@register
class ActionBias(_PerEpisodeAction):
    """A constant offset on the arm's action dims for the whole episode (a miscalibrated controller).

    Per env and episode, each arm dim's offset is uniform in [-0.2, 0.2] x severity (normalised action units); the
    gripper command is left alone. Clamped to [-1, 1].
    """

    name = "action_bias"
    max_offset = 0.2

    def sample(self, action: torch.Tensor, generator: torch.Generator) -> Params:
        return {"offset": 2 * _rand((action.shape[0], action.shape[1] - 1), generator, action) - 1}

    def transform(self, action: torch.Tensor, params: Params) -> torch.Tensor:
        return _with_arm(action, action[:, :GRIPPER] + params["offset"] * (self.max_offset * self.severity))


@register
class ActionGain(_PerEpisodeAction):
    """A multiplicative gain error on the arm's action dims for the whole episode (wrong controller gains).

    Per env and episode, each arm dim's gain is uniform in [1 - 0.5 x severity, 1 + 0.5 x severity]; the gripper
    command is left alone. Clamped to [-1, 1].
    """

    name = "action_gain"
    max_error = 0.5

    def sample(self, action: torch.Tensor, generator: torch.Generator) -> Params:
        return {"error": 2 * _rand((action.shape[0], action.shape[1] - 1), generator, action) - 1}

    def transform(self, action: torch.Tensor, params: Params) -> torch.Tensor:
        return _with_arm(action, action[:, :GRIPPER] * (1 + params["error"] * (self.max_error * self.severity)))


@register
class ActionDelay(ActionPerturbation):
    """Actuation delay: the env executes the action from k = round(severity x 5) steps ago (250 ms at 20 Hz).

    Early in an episode, the episode's first action (there is no older command to execute).
    """

    name = "action_delay"
    max_steps = 5

    def __init__(self, severity: float) -> None:
        super().__init__(severity)
        self._actions = _History(self.max_steps)

    def steps(self) -> int:
        return round(self.severity * self.max_steps)

    def reset(self, done: torch.Tensor) -> None:
        self._actions.reset(done)

    def apply(self, action: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        out = self._actions.delayed(action, self.steps())
        self._actions.push(action)
        return out


@register
class ActionDropout(ActionPerturbation):
    """Lost commands: with probability 50% x severity per env and step, the arm's action is zeroed.

    A zero delta pose holds the arm still. The gripper keeps the policy's command: zero there would mean "half
    closed" rather than "no change", and a lost packet should not open or close the hand.
    """

    name = "action_dropout"
    max_rate = 0.5

    def sample(self, action: torch.Tensor, generator: torch.Generator) -> Params:
        return {"u": _rand((action.shape[0],), generator, action)}

    def transform(self, action: torch.Tensor, params: Params) -> torch.Tensor:
        drop = (params["u"] < self.max_rate * self.severity)[:, None]
        return _with_arm(action, action[:, :GRIPPER].masked_fill(drop, 0.0))


@register
class GripperFlip(ActionPerturbation):
    """A wrong gripper command: with probability 25% x severity per env and step, its sign is flipped.

    Open becomes close and vice versa; the arm dims are left alone.
    """

    name = "gripper_flip"
    max_rate = 0.25

    def sample(self, action: torch.Tensor, generator: torch.Generator) -> Params:
        return {"u": _rand((action.shape[0],), generator, action)}

    def transform(self, action: torch.Tensor, params: Params) -> torch.Tensor:
        flip = params["u"] < self.max_rate * self.severity
        gripper = action[:, GRIPPER:]
        return torch.cat([action[:, :GRIPPER], torch.where(flip[:, None], -gripper, gripper)], dim=1)


# --------------------------------------------------------------------------------------------------------------
# Specs: validation, combinations, labels, suites


def _check_severity(name: str, severity: Any) -> None:
    if isinstance(severity, bool) or not isinstance(severity, (int, float)) or math.isnan(severity):
        raise ValueError(f"perturbation {name!r}: severity must be a number in [0, 1], got {severity!r}")
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"perturbation {name!r}: severity must be in [0, 1], got {severity!r}")


def expand_spec(spec: SpecLike) -> list[Spec]:
    """The components of ``spec``, validated: ``"rotation@0.5+action_noise"`` at 0.2 -> rotation 0.5, noise 0.2.

    Raises ValueError for an unknown name (with the nearest valid one), an empty part or a bad severity.
    """
    _check_severity(str(spec.name), spec.severity)
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
            _check_severity(f"{name}@{severity}", value)
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
# The wrapper


@contextlib.contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """On CPU, run the perturbations on one intra-op thread.

    A batch is a few small images: threads only add overhead there, and OpenMP workers spin-waiting after each
    parallel op take the cores from the simulator and renderer that run next (on 2 cores, env steps went 2x slower
    with the observation suite; bench/bench_perturbations.py).
    """
    if device.type != "cpu" or not torch.backends.openmp.is_available():
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _where_obs(mask: torch.Tensor, a: Obs, b: Obs) -> Obs:
    return {k: torch.where(_rows(mask, a[k]), a[k], b[k]) for k in a}


class PerturbedEnv:
    """A VecEnv whose observations and executed actions are perturbed; same interface as the env it wraps.

    Observation perturbations apply to ``obs`` and ``final_obs`` returned by ``reset`` and ``step``; action
    perturbations apply to the action handed to the inner env only (the caller's tensor is never modified).
    ``reset(seed=s)`` also reseeds the perturbations' generator from ``(seed, s)``, so a seeded evaluation is
    reproducible. With no specs it is a pass-through.

    Episodes: ``reset`` restarts every perturbation's per-env state; after a step in which some envs finished
    (the inner env auto-resets them, so ``step.obs`` already starts their next episode), ``final_obs`` is perturbed
    first with the finished episodes' state (``peek``), then ``reset(done)`` restarts those envs, then ``obs``.

    ``sample_per_episode``: instead of every spec applying to every env, each env draws one spec (a combination
    counts as one) at each episode start, uniformly; every spec runs on the whole batch and ``torch.where``
    selects per env. ``set_severity_scale(s)`` multiplies every severity by s (a curriculum).
    """

    def __init__(self, env: VecEnv, specs: list[SpecLike], seed: int = 0, sample_per_episode: bool = False) -> None:
        self.env = env
        self.seed = seed
        self.groups = [build_perturbations([spec]) for spec in specs]
        self.perturbations = [p for group in self.groups for p in group]
        self.sample_per_episode = sample_per_episode and len(self.groups) > 1
        self._base_severity = [p.severity for p in self.perturbations]
        self._choice: torch.Tensor | None = None  # [N] index of each env's group under sample_per_episode
        self.severity_scale = 1.0
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

    def set_severity_scale(self, scale: float) -> None:
        """Effective severity = each spec's severity x ``scale`` in [0, 1], from the next step on."""
        _check_severity("severity scale", scale)
        self.severity_scale = float(scale)
        for p, base in zip(self.perturbations, self._base_severity, strict=True):
            p.severity = base * self.severity_scale

    def reset(self, seed: int | None = None) -> Obs:
        if seed is not None:
            # hash of a tuple of ints is stable across processes (no hash randomisation for ints).
            self.generator.manual_seed(hash((self.seed, seed)))
        obs = self.env.reset(seed=seed)
        self._start_episodes(torch.ones(self.num_envs, dtype=torch.bool, device=self.device))
        return self._perturb_obs(obs)

    def step(self, action: torch.Tensor) -> Step:
        step = self.env.step(self._perturb_action(action.to(self.device)))
        if not self.perturbations:
            return step
        final_obs = None
        if step.final_obs is not None:  # some episode ended (known without a device sync)
            final_obs = self._perturb_obs(step.final_obs, peek=True)
            self._start_episodes(step.terminated | step.truncated)
        return dataclasses.replace(step, obs=self._perturb_obs(step.obs), final_obs=final_obs)

    def close(self) -> None:
        self.env.close()

    def _start_episodes(self, done: torch.Tensor) -> None:
        for p in self.perturbations:
            p.reset(done)
        if self.sample_per_episode:
            new = torch.randint(len(self.groups), (self.num_envs,), generator=self.generator, device=self.device)
            self._choice = new if self._choice is None else torch.where(done, new, self._choice)

    def _chosen(self) -> list[tuple[torch.Tensor | None, list[Perturbation]]]:
        """(env mask or None for all envs, perturbations) pairs to run."""
        if not self.sample_per_episode:
            return [(None, self.perturbations)]
        return [(self._choice == i, group) for i, group in enumerate(self.groups)]

    def _perturb_obs(self, obs: Obs, peek: bool = False) -> Obs:
        out = obs
        with _one_thread_on_cpu(self.device):
            for mask, group in self._chosen():
                chain = [p for p in group if isinstance(p, ObservationPerturbation)]
                if not chain:
                    continue
                y = obs
                for p in chain:
                    y = p.peek(y, self.generator) if peek else p.apply(y, self.generator)
                out = y if mask is None else _where_obs(mask, y, out)
        return out

    def _perturb_action(self, action: torch.Tensor) -> torch.Tensor:
        out = action
        with _one_thread_on_cpu(self.device):
            for mask, group in self._chosen():
                chain = [p for p in group if isinstance(p, ActionPerturbation)]
                if not chain:
                    continue
                y = action
                for p in chain:
                    y = p.apply(y, self.generator)
                out = y if mask is None else torch.where(mask[:, None], y, out)
        return out
