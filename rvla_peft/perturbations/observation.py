"""Observation perturbations: camera pose (shift, rotation), lighting (colour jitter), occluders, sensor noise,
blur, dropped or late frames, noisy proprioception."""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F

from rvla_peft.perturbations.base import (
    ImagePerturbation,
    Obs,
    ObservationPerturbation,
    Params,
    Resample,
    _box_mask,
    _History,
    _rand,
    _randint,
    _rows,
    _to_uint8,
    register,
)

# --------------------------------------------------------------------------------------------------------------
# Observation perturbations: the RobustVLA paper's five


@register
class Shift(ImagePerturbation):
    """Image translation (a camera that moved), by whole pixels.

    Each image moves by (dy, dx), each uniform among the integers in [-d, d] with d = round(severity x 20% of the
    image side): up to 13 px on a 64-px image at severity 1, 6 px at 0.5. Content leaving the frame is lost; the
    uncovered border is filled with zeros (black, the default) or, with ``fill="edge"``, the nearest edge pixel.

    resample "episode": a camera that moved stays where it moved to.
    """

    name = "shift"
    resample = "episode"
    max_fraction = 0.2

    def __init__(
        self, severity: float, fill: Literal["zeros", "edge"] = "zeros", resample: Resample | None = None
    ) -> None:
        super().__init__(severity, resample)
        if fill not in ("zeros", "edge"):
            raise ValueError(f"shift: fill must be 'zeros' or 'edge', got {fill!r}")
        self.fill = fill

    def max_shift(self, side: int) -> int:
        return round(self.severity * self.max_fraction * side)

    def draw(self, obs: Obs, generator: torch.Generator) -> Params:
        rgb = obs["rgb"]
        return {"u": _rand((*rgb.shape[:-3], 2), generator, rgb)}

    def parameters(self, obs: Obs, draws: Params) -> Params:
        h, w = obs["rgb"].shape[-3:-1]
        u = draws["u"]
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

    resample "episode": a rolled camera stays rolled.
    """

    name = "rotation"
    resample = "episode"
    max_degrees = 30.0

    def draw(self, obs: Obs, generator: torch.Generator) -> Params:
        rgb = obs["rgb"]
        return {"u": _rand(rgb.shape[:-3], generator, rgb)}

    def parameters(self, obs: Obs, draws: Params) -> Params:
        return {"degrees": (2 * draws["u"] - 1) * (self.max_degrees * self.severity)}

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

    resample "episode": the room's lighting and the camera's white balance hold over an episode.
    """

    name = "color_jitter"
    resample = "episode"
    max_factor_change = 0.5
    max_hue = 0.1

    def draw(self, obs: Obs, generator: torch.Generator) -> Params:
        rgb = obs["rgb"]
        return {"u": _rand((*rgb.shape[:-3], 4), generator, rgb)}

    def parameters(self, obs: Obs, draws: Params) -> Params:
        signed = 2 * draws["u"] - 1
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

    resample "episode": an object in front of the camera stays in its place.
    """

    name = "occlusion"
    resample = "episode"
    max_fraction = 0.5

    def draw(self, obs: Obs, generator: torch.Generator) -> Params:
        rgb = obs["rgb"]
        return {"u": _rand((*rgb.shape[:-3], 3), generator, rgb)}

    def parameters(self, obs: Obs, draws: Params) -> Params:
        h, w = obs["rgb"].shape[-3:-1]
        side = round(self.severity * self.max_fraction * min(h, w))
        u = draws["u"]
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

    resample "episode": a persistent patch (dirt or a sticker on the lens, a dead region of the sensor).
    """

    name = "random_erasing"
    resample = "episode"
    area = (0.02, 0.33)
    log_ratio = (math.log(0.3), math.log(3.3))

    def draw(self, obs: Obs, generator: torch.Generator) -> Params:
        rgb = obs["rgb"]
        u = _rand((*rgb.shape[:-3], 4), generator, rgb)
        values = torch.randint(0, 256, rgb.shape, generator=generator, device=rgb.device, dtype=torch.uint8)
        return {"u": u, "values": values}

    def parameters(self, obs: Obs, draws: Params) -> Params:
        h, w = obs["rgb"].shape[-3:-1]
        u = draws["u"]
        area = (self.area[0] + (self.area[1] - self.area[0]) * u[..., 0]) * (self.severity * h * w)
        ratio = torch.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * u[..., 1])
        height = (area * ratio).sqrt().round().long().clamp(0, h)
        width = (area / ratio).sqrt().round().long().clamp(0, w)
        return {
            "top": _randint(h - height, u[..., 2]),
            "left": _randint(w - width, u[..., 3]),
            "height": height,
            "width": width,
            "values": draws["values"],
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

    resample "step": sensor noise is new in every frame.
    """

    name = "pixel_noise"
    resample = "step"
    max_std = 64.0

    def draw(self, obs: Obs, generator: torch.Generator) -> Params:
        rgb = obs["rgb"]
        return {"noise": torch.randn(rgb.shape, generator=generator, device=rgb.device)}

    def transform_images(self, rgb: torch.Tensor, params: Params) -> torch.Tensor:
        return _to_uint8(rgb.float() + params["noise"] * (self.max_std * self.severity))


@register
class Blur(ImagePerturbation):
    """Gaussian blur (defocus, motion smear), the same for every image: no random draws.

    sigma = severity x 3% of the shorter image side (1.9 px on a 64-px image at severity 1), kernel radius
    ceil(3 sigma), edges replicated.

    resample "episode": a defocused lens stays defocused (no random draws, so the mode changes nothing).
    """

    name = "blur"
    resample = "episode"
    max_fraction = 0.03

    def sigma(self, side: int) -> float:
        return self.severity * self.max_fraction * side

    def draw(self, obs: Obs, generator: torch.Generator) -> Params:
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

    resample "step": impulse noise (transmission errors) hits different pixels in every frame.
    """

    name = "salt_pepper"
    resample = "step"
    max_fraction = 0.1

    def draw(self, obs: Obs, generator: torch.Generator) -> Params:
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

    resample "step": encoder noise is new in every reading.
    """

    name = "state_noise"
    resample = "step"
    max_std = 0.05

    def draw(self, obs: Obs, generator: torch.Generator) -> Params:
        state = obs["state"]
        return {"noise": torch.randn(state.shape, generator=generator, device=state.device, dtype=state.dtype)}

    def transform(self, obs: Obs, params: Params) -> Obs:
        return {**obs, "state": obs["state"] + params["noise"] * (self.max_std * self.severity)}


@register
class FrameDrop(ObservationPerturbation):
    """Dropped camera frames: with probability 50% x severity per env and step, the env shows its last frame again.

    A run of drops freezes the image. The first frame of an episode is never dropped. Only ``rgb`` (every camera
    of the env together); the state stays current.

    resample "step": frames are lost one by one (held per episode, ``frame_drop:episode``, an env that drops
    freezes on its episode's first frame: a stuck camera).
    """

    name = "frame_drop"
    resample = "step"
    max_rate = 0.5

    def __init__(self, severity: float, resample: Resample | None = None) -> None:
        super().__init__(severity, resample)
        self._last: torch.Tensor | None = None  # [N, ...] the frame each env showed last
        self._started: torch.Tensor | None = None  # [N] bool: the env has shown a frame of its current episode

    def reset(self, done: torch.Tensor) -> None:
        super().reset(done)
        if self._started is not None:
            self._started = self._started & ~done

    def draw(self, obs: Obs, generator: torch.Generator) -> Params:
        rgb = obs["rgb"]
        return {"u": _rand((rgb.shape[0],), generator, rgb)}

    def apply(self, obs: Obs, generator: torch.Generator) -> Obs:
        out = self._show(obs, generator, commit=True)
        self._last = out["rgb"]
        self._started = torch.ones(out["rgb"].shape[0], dtype=torch.bool, device=out["rgb"].device)
        return out

    def peek(self, obs: Obs, generator: torch.Generator) -> Obs:
        return self._show(obs, generator, commit=False)

    def _show(self, obs: Obs, generator: torch.Generator, commit: bool) -> Obs:
        u = self.draws(obs, generator, commit)["u"]
        if self.severity == 0 or self._last is None:
            return obs
        rgb = obs["rgb"]
        drop = (u < self.max_rate * self.severity) & self._started
        return {**obs, "rgb": torch.where(_rows(drop, rgb), self._last, rgb)}


@register
class Latency(ObservationPerturbation):
    """Camera latency: the env shows the frame from k = round(severity x 5) steps ago (250 ms at ManiSkill's 20 Hz).

    Early in an episode, the episode's first frame. Only ``rgb``; the state stays current (encoders are fast).

    resample "episode": the delay is a property of the camera pipeline (no random draws, so the mode changes
    nothing).
    """

    name = "latency"
    resample = "episode"
    max_steps = 5

    def __init__(self, severity: float, resample: Resample | None = None) -> None:
        super().__init__(severity, resample)
        self._frames = _History(self.max_steps)

    def steps(self) -> int:
        return round(self.severity * self.max_steps)

    def reset(self, done: torch.Tensor) -> None:
        super().reset(done)
        self._frames.reset(done)

    def draw(self, obs: Obs, generator: torch.Generator) -> Params:
        return {}

    def apply(self, obs: Obs, generator: torch.Generator) -> Obs:
        out = self.peek(obs, generator)
        self._frames.push(obs["rgb"])
        return out

    def peek(self, obs: Obs, generator: torch.Generator) -> Obs:
        k = self.steps()
        return obs if k == 0 else {**obs, "rgb": self._frames.delayed(obs["rgb"], k)}
