"""Perturbations on batched tensors: identity at severity 0, determinism, per-env draws, each documented effect
measured, per-episode state, the wrapper (combinations, per-episode sampling, severity scale), suites, curriculum.

Small fake tensors and a fake VecEnv only; the real ManiSkill wrapper is exercised in test_envs.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from rvla_peft.config import ConfigError, CurriculumConfig, PerturbationSpec, load_config
from rvla_peft.envs.maniskill import VecEnv
from rvla_peft.envs.perturbed import PerturbedEnv
from rvla_peft.perturbations import (
    PERTURBATIONS,
    SUITES,
    ActionPerturbation,
    ImagePerturbation,
    ObservationPerturbation,
    Spec,
    build_perturbations,
    expand_spec,
    register,
    spec_label,
    suite_grid,
    suite_settings,
    validate_specs,
)
from rvla_peft.perturbations.action import ActionNoise
from rvla_peft.perturbations.curriculum import Curriculum
from rvla_peft.perturbations.observation import Blur, ColorJitter, PixelNoise, Rotation, Shift

NAMES = sorted(PERTURBATIONS)
HISTORY = {"frame_drop", "latency", "action_delay"}  # outputs depend on earlier steps: no sample/transform
NO_RANDOMNESS = {"blur", "latency", "action_delay"}
N = 8


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _obs(step: int = 0, n: int = N, size: int = 16, cameras: int | None = None) -> dict[str, torch.Tensor]:
    """A distinct random observation per step."""
    g = _gen(1000 + step)
    shape = (n, size, size, 3) if cameras is None else (n, cameras, size, size, 3)
    return {
        "rgb": torch.randint(0, 256, shape, generator=g, dtype=torch.uint8),
        "state": torch.randn(n, 9, generator=g),
    }


def _action(step: int = 0, n: int = N) -> torch.Tensor:
    return torch.rand(n, 7, generator=_gen(2000 + step)) * 2 - 1


def _input(name: str, step: int = 0, **kw) -> object:
    return _obs(step, **kw) if issubclass(PERTURBATIONS[name], ObservationPerturbation) else _action(step)


def _run(name: str, severity: float, seed: int = 0, steps: int = 6) -> tuple[list, list]:
    """(inputs, outputs) of a fresh perturbation applied to ``steps`` distinct batches in sequence."""
    p = PERTURBATIONS[name](severity)
    g = _gen(seed)
    p.reset(torch.ones(N, dtype=torch.bool))
    inputs = [_input(name, t) for t in range(steps)]
    return inputs, [p.apply(x, g) for x in inputs]


def _equal(a: object, b: object) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b)


def _clone(x: object) -> object:
    return {k: v.clone() for k, v in x.items()} if isinstance(x, dict) else x.clone()


def _rows(x: object, i: int) -> object:
    return {k: v[i : i + 1] for k, v in x.items()} if isinstance(x, dict) else x[i : i + 1]


def _cat(rows: list) -> object:
    if isinstance(rows[0], dict):
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    return torch.cat(rows)


# --------------------------------------------------------------------------------------------------------------
# Every registered perturbation


@pytest.mark.parametrize("name", NAMES)
def test_identity_at_severity_zero(name: str) -> None:
    inputs, outputs = _run(name, 0.0)
    assert _equal(inputs, outputs)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_for_a_seed(name: str) -> None:
    _, a = _run(name, 0.7, seed=1)
    _, b = _run(name, 0.7, seed=1)
    _, c = _run(name, 0.7, seed=2)
    assert _equal(a, b)
    assert _equal(a, c) == (name in NO_RANDOMNESS)
    inputs, _ = _run(name, 0.7)
    assert not _equal(inputs, a), "severity 0.7 changed nothing in 6 steps"


@pytest.mark.parametrize("name", NAMES)
def test_input_untouched_and_dtype_shape_range_kept(name: str) -> None:
    inputs, outputs = _run(name, 1.0)
    assert _equal(inputs, [_input(name, t) for t in range(len(inputs))]), "an input was modified in place"
    for x, y in zip(inputs, outputs, strict=True):
        pairs = [(x[k], y[k]) for k in x] if isinstance(x, dict) else [(x, y)]
        for before, after in pairs:
            assert after.shape == before.shape and after.dtype == before.dtype and after.device == before.device
        if not isinstance(y, dict):
            assert y.abs().max() <= 1.0


@pytest.mark.parametrize("name", sorted(set(NAMES) - HISTORY))
def test_batched_equals_env_by_env_with_the_same_draws(name: str) -> None:
    p = PERTURBATIONS[name](0.7)
    x = _input(name)
    params = p.sample(x, _gen(3))
    assert all(v.shape[0] == N for v in params.values())
    batched = p.transform(x, params)
    one_by_one = _cat([p.transform(_rows(x, i), _rows(params, i)) for i in range(N)])
    assert _equal(batched, one_by_one)
    assert _equal(p.apply(x, _gen(3)), batched), "apply must be transform(sample) with the same draws"


@pytest.mark.parametrize("name", NAMES)
def test_one_generator_per_env_gives_each_env_the_draws_it_gets_alone(name: str) -> None:
    """A list of generators (PerturbedEnv(keyed=True)): over several steps, env i's outputs are those of a batch of
    env i alone with generator i (held and per-step draws, histories)."""
    steps = [_input(name, t) for t in range(4)]
    together = PERTURBATIONS[name](0.7)
    together.reset(torch.ones(N, dtype=torch.bool))
    generators = [_gen(10 + i) for i in range(N)]
    outputs = [together.apply(x, generators) for x in steps]
    for i in range(N):
        alone, g = PERTURBATIONS[name](0.7), _gen(10 + i)
        alone.reset(torch.ones(1, dtype=torch.bool))
        for x, y in zip(steps, outputs, strict=True):
            assert _equal(alone.apply(_rows(x, i), g), _rows(y, i))


@pytest.mark.parametrize("name", sorted(n for n in NAMES if issubclass(PERTURBATIONS[n], ObservationPerturbation)))
def test_several_cameras_each_perturbed(name: str) -> None:
    """rgb [N, C, H, W, 3]: shape kept; image perturbations change every camera, with a draw of its own."""
    p = PERTURBATIONS[name](1.0)
    g = _gen()
    one = _obs(cameras=1)
    obs = {**one, "rgb": one["rgb"].expand(N, 2, 16, 16, 3).contiguous()}  # both cameras see the same image
    out = [p.apply(obs, g) for _ in range(3)][-1]
    assert out["rgb"].shape == obs["rgb"].shape
    if issubclass(PERTURBATIONS[name], ImagePerturbation):
        for cam in range(2):
            assert not torch.equal(out["rgb"][:, cam], obs["rgb"][:, cam])
        if name not in NO_RANDOMNESS:
            assert not torch.equal(out["rgb"][:, 0], out["rgb"][:, 1])


# --------------------------------------------------------------------------------------------------------------
# Observation perturbations: the documented effect, measured


def _dot(size: int = 32, row: int = 10, col: int = 20, n: int = 1) -> dict[str, torch.Tensor]:
    rgb = torch.zeros(n, size, size, 3, dtype=torch.uint8)
    rgb[:, row, col] = 255
    return {"rgb": rgb, "state": torch.zeros(n, 3)}


def _centroid(img: torch.Tensor) -> tuple[float, float]:
    w = img.float().sum(-1)
    rows, cols = torch.meshgrid(torch.arange(w.shape[0]), torch.arange(w.shape[1]), indexing="ij")
    return float((w * rows).sum() / w.sum()), float((w * cols).sum() / w.sum())


@pytest.mark.parametrize("fill", ["zeros", "edge"])
def test_shift_moves_content_by_the_drawn_pixels(fill: str) -> None:
    p = Shift(1.0, fill=fill)
    out = p.transform(_dot(), {"dy": torch.tensor([3]), "dx": torch.tensor([-5])})["rgb"][0]
    assert out[13, 15].tolist() == [255, 255, 255] and int(out.sum()) == 3 * 255
    grey = {"rgb": torch.full((1, 32, 32, 3), 100, dtype=torch.uint8)}
    border = p.transform(grey, {"dy": torch.tensor([3]), "dx": torch.tensor([-5])})["rgb"][0]
    assert (border == 0).any() == (fill == "zeros")
    assert int((border == 0).all(-1).sum()) == (32 * 32 - 29 * 27 if fill == "zeros" else 0)


def test_shift_range_is_20_percent_of_the_side_at_severity_1() -> None:
    big = {"rgb": torch.zeros(1, dtype=torch.uint8).expand(4000, 64, 64, 3)}  # sampling reads only the shape
    for severity, d in [(1.0, 13), (0.5, 6)]:
        params = Shift(severity).sample(big, _gen())
        for key in ("dy", "dx"):
            assert params[key].min() == -d and params[key].max() == d
            assert set(params[key].unique().tolist()) == set(range(-d, d + 1))


@pytest.mark.parametrize("degrees", [30.0, -30.0, 90.0])
def test_rotation_turns_content_about_the_centre_by_the_angle(degrees: float) -> None:
    img = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
    img[:, 30:34, 46:50] = 255  # a square centred 16 px right of the image centre (31.5, 31.5)
    out = Rotation(1.0).transform({"rgb": img}, {"degrees": torch.tensor([degrees])})["rgb"][0]
    row, col = _centroid(out)
    a = math.radians(degrees)  # counter-clockwise as displayed: right -> up
    assert abs(col - (31.5 + 16 * math.cos(a))) < 0.3 and abs(row - (31.5 - 16 * math.sin(a))) < 0.3


def test_rotation_angle_range() -> None:
    rgb = torch.zeros(4000, 8, 8, 3, dtype=torch.uint8)
    degrees = Rotation(0.5).sample({"rgb": rgb}, _gen())["degrees"]
    assert degrees.abs().max() <= 15.0 and degrees.max() > 14.9 and degrees.min() < -14.9


def test_color_jitter_factors_and_their_effects() -> None:
    p = ColorJitter(1.0)
    params = p.sample({"rgb": torch.zeros(4000, 4, 4, 3, dtype=torch.uint8)}, _gen())
    for key in ("brightness", "contrast", "saturation"):
        assert params[key].min() >= 0.5 and params[key].max() <= 1.5 and params[key].min() < 0.51
    assert params["hue"].abs().max() <= 0.1 and params["hue"].abs().max() > 0.099

    def jitter(rgb: torch.Tensor, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0) -> torch.Tensor:
        values = dict(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
        return p.transform({"rgb": rgb}, {k: torch.tensor([float(v)]) for k, v in values.items()})["rgb"]

    x = _obs(n=1)["rgb"]
    assert (jitter(x, brightness=0.5).float() - x.float() * 0.5).abs().max() <= 1
    grey_pixels = jitter(x, saturation=0.0)
    assert (grey_pixels.max(-1).values.float() - grey_pixels.min(-1).values.float()).max() <= 1
    flat = jitter(x, contrast=0.0)
    assert flat.float().std() < 1
    grey = torch.full((1, 4, 4, 3), 90, dtype=torch.uint8)
    assert (jitter(grey, hue=0.4).float() - 90).abs().max() <= 1, "a hue turn leaves grey alone"
    red = torch.zeros(1, 4, 4, 3, dtype=torch.uint8)
    red[..., 0] = 200
    turned = jitter(red, hue=1 / 3)[0, 0, 0]
    assert turned.argmax() != 0, "a third of the colour wheel moves red away from red"


def test_occlusion_square_side_and_level() -> None:
    white = {"rgb": torch.full((200, 64, 64, 3), 255, dtype=torch.uint8)}
    out = PERTURBATIONS["occlusion"](0.5).apply(white, _gen())["rgb"]
    changed = (out != 255).all(-1)
    assert (changed.sum((1, 2)) == 16 * 16).all()  # side = 0.5 x 50% x 64
    rows, cols = changed.any(2), changed.any(1)
    assert (rows.sum(1) == 16).all() and (cols.sum(1) == 16).all(), "one square"
    levels = out[changed].view(-1, 3)
    assert levels.max() <= 128 and (levels == levels[:, :1]).all()


def test_random_erasing_area_and_values() -> None:
    p = PERTURBATIONS["random_erasing"](1.0)
    obs = {"rgb": torch.zeros(2000, 32, 32, 3, dtype=torch.uint8)}
    params = p.sample(obs, _gen())
    area = (params["height"] * params["width"]).float() / (32 * 32)
    assert area.max() <= 0.33 * 1.2 and area.min() >= 0.01 and abs(area.mean().item() - 0.175) < 0.03
    out = p.transform(obs, params)["rgb"]
    inside = torch.zeros(2000, 32, 32, dtype=torch.bool)
    for i in range(5):
        t, left, h, w = (int(params[k][i]) for k in ("top", "left", "height", "width"))
        inside[i, t : t + h, left : left + w] = True
        assert torch.equal(out[i][inside[i]], params["values"][i][inside[i]])
        assert (out[i][~inside[i]] == 0).all()
    half = PERTURBATIONS["random_erasing"](0.5).sample(obs, _gen())
    assert ((half["height"] * half["width"]).float() / 1024).max() <= 0.33 * 0.5 * 1.2


def test_pixel_noise_range_and_std_on_mid_grey() -> None:
    grey = {"rgb": torch.full((64, 32, 32, 3), 128, dtype=torch.uint8), "state": torch.zeros(64, 3)}
    out = PixelNoise(0.5).apply(grey, _gen())
    rgb = out["rgb"]
    assert rgb.dtype == torch.uint8
    std = (rgb.float() - 128).std().item()
    assert abs(std - 32.0) / 32.0 < 0.05, std  # 64 levels x severity 0.5
    assert abs((rgb.float() - 128).mean().item()) < 1.0
    assert torch.equal(out["state"], grey["state"]), "pixel noise must leave the state alone"
    saturated = PixelNoise(1.0).apply({"rgb": torch.full((8, 32, 32, 3), 250, dtype=torch.uint8)}, _gen())["rgb"]
    assert saturated.max().item() == 255 and saturated.min().item() < 250  # clamped, not wrapped around


def test_blur_is_a_gaussian_of_the_stated_sigma_and_removes_high_frequencies() -> None:
    line = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
    line[:, :, 32] = 255
    out = Blur(1.0).apply({"rgb": line}, _gen())["rgb"][0, 10, :, 0].float()
    sigma = 0.03 * 64
    taps = torch.arange(64) - 32
    expected = 255 * torch.exp(-0.5 * (taps / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    assert (out - expected).abs().max() <= 1.0
    noise = _obs(n=4, size=64)["rgb"]

    def high_frequency_energy(img: torch.Tensor) -> float:
        return float(img.float().diff(dim=1).square().mean() + img.float().diff(dim=2).square().mean())

    blurred = [high_frequency_energy(Blur(s).apply({"rgb": noise}, _gen())["rgb"]) for s in (0.25, 0.5, 1.0)]
    assert high_frequency_energy(noise) > blurred[0] > blurred[1] > blurred[2]
    assert blurred[2] < 0.1 * high_frequency_energy(noise)


def test_salt_pepper_fraction() -> None:
    grey = {"rgb": torch.full((64, 32, 32, 3), 128, dtype=torch.uint8)}
    out = PERTURBATIONS["salt_pepper"](0.5).apply(grey, _gen())["rgb"]
    pepper, salt = (out == 0).all(-1).float().mean().item(), (out == 255).all(-1).float().mean().item()
    assert abs(pepper - 0.025) < 0.003 and abs(salt - 0.025) < 0.003  # 10% x 0.5, half each
    assert ((out == 0) | (out == 255) | (out == 128)).all()


def test_state_noise_std_and_rgb_untouched() -> None:
    obs = {"rgb": torch.zeros(4000, 1, 1, 3, dtype=torch.uint8), "state": torch.zeros(4000, 9)}
    out = PERTURBATIONS["state_noise"](0.6).apply(obs, _gen())
    assert abs(out["state"].std().item() - 0.03) / 0.03 < 0.03  # 0.05 x 0.6
    assert out["rgb"] is obs["rgb"]


def _frames(steps: int, n: int = N) -> list[dict[str, torch.Tensor]]:
    """Frame t of every env is filled with the value t."""
    return [{"rgb": torch.full((n, 2, 2, 3), t, dtype=torch.uint8), "state": torch.zeros(n, 1)} for t in range(steps)]


def test_frame_drop_repeats_the_last_frame_at_the_stated_rate() -> None:
    p = PERTURBATIONS["frame_drop"](0.8)  # 50% x 0.8 = 40% of the steps
    g = _gen()
    shown = torch.stack([p.apply(f, g)["rgb"][:, 0, 0, 0] for f in _frames(250, n=32)])  # [T, N]
    assert (shown[0] == 0).all(), "an episode's first frame is never dropped"
    repeated = shown[1:] == shown[:-1]
    assert abs(repeated.float().mean().item() - 0.4) < 0.03
    fresh = ~repeated
    assert (shown[1:][fresh] == torch.arange(1, 250)[:, None].expand(-1, 32)[fresh]).all(), "else the current one"
    p.reset(torch.arange(32) < 16)
    first = p.apply({"rgb": torch.full((32, 2, 2, 3), 99, dtype=torch.uint8)}, g)["rgb"][:, 0, 0, 0]
    assert (first[:16] == 99).all(), "restarted envs show their new episode's first frame"


def test_latency_shows_the_frame_from_k_steps_ago_and_restarts_per_env() -> None:
    p = PERTURBATIONS["latency"](0.6)  # k = round(0.6 x 5) = 3
    g = _gen()
    frames = _frames(11)
    shown = [int(p.apply(f, g)["rgb"][0, 0, 0, 0]) for f in frames[:6]]
    assert shown == [0, 0, 0, 0, 1, 2]
    p.reset(torch.arange(N) == 0)  # env 0 starts a new episode at frame 6
    shown = torch.stack([p.apply(f, g)["rgb"][:, 0, 0, 0] for f in frames[6:10]])
    assert shown[:, 0].tolist() == [6, 6, 6, 6]
    assert shown[:, 1].tolist() == [3, 4, 5, 6]
    peeked = p.peek(frames[10], g)["rgb"][:, 0, 0, 0]
    assert (peeked == 7).all() and torch.equal(p.apply(frames[10], g)["rgb"][:, 0, 0, 0], peeked), "peek keeps state"


# --------------------------------------------------------------------------------------------------------------
# Action perturbations: the documented effect, measured


@pytest.mark.parametrize("severity", [1 / 3, 2 / 3, 1.0])
def test_action_noise_std_matches_paper_sigmas(severity: float) -> None:
    zeros = torch.zeros(20_000, 7)
    out = ActionNoise(severity).apply(zeros, _gen())
    expected = 0.3 * severity  # 0.1 / 0.2 / 0.3
    assert abs(out.std().item() - expected) / expected < 0.05
    assert abs(out.mean().item()) < 0.01
    assert torch.count_nonzero(zeros) == 0


def test_action_noise_clamps_to_unit_box() -> None:
    edge = torch.ones(1000, 7)
    out = ActionNoise(1.0).apply(edge, _gen())
    assert out.max().item() <= 1.0 and out.min().item() >= -1.0
    assert out.min().item() < 1.0


@pytest.mark.parametrize(
    "name, base, low, high", [("action_bias", 0.0, -0.1, 0.1), ("action_gain", 0.5, 0.375, 0.625)]
)
def test_per_episode_bias_and_gain_range_hold_and_redraw(name: str, base: float, low: float, high: float) -> None:
    """Severity 0.5: offsets in +-0.2 x 0.5, gains in 1 +- 0.5 x 0.5 (times the action 0.5), gripper untouched."""
    n = 4000
    p = PERTURBATIONS[name](0.5)
    g = _gen()
    action = torch.full((n, 7), base)
    first = p.apply(action, g)
    arm = first[:, :6]
    assert arm.min() >= low and arm.max() <= high and arm.min() < low + 0.002 and arm.max() > high - 0.002
    assert torch.equal(first[:, 6], action[:, 6]), "the gripper command is left alone"
    assert torch.equal(p.apply(action, g), first), "held for the episode"
    p.reset(torch.arange(n) < 10)
    again = p.apply(action, g)
    assert (again[:10, :6] != first[:10, :6]).all() and torch.equal(again[10:], first[10:])


def test_action_delay_executes_the_action_from_k_steps_ago_and_restarts_per_env() -> None:
    p = PERTURBATIONS["action_delay"](0.4)  # k = 2
    g = _gen()
    actions = [torch.full((N, 7), t / 10) for t in range(8)]
    executed = [p.apply(a, g)[:, 0] for a in actions[:5]]
    assert [round(float(e[0]) * 10) for e in executed] == [0, 0, 0, 1, 2]
    p.reset(torch.arange(N) == 1)
    executed = torch.stack([p.apply(a, g)[:, 0] for a in actions[5:]])
    assert (executed[:, 1] * 10).round().tolist() == [5, 5, 5]
    assert (executed[:, 0] * 10).round().tolist() == [3, 4, 5]


def test_action_dropout_zeroes_the_arm_at_the_stated_rate_and_keeps_the_gripper() -> None:
    action = torch.full((20_000, 7), 0.5)
    out = PERTURBATIONS["action_dropout"](0.6).apply(action, _gen())
    dropped = (out[:, :6] == 0).all(1)
    assert abs(dropped.float().mean().item() - 0.3) < 0.015  # 50% x 0.6
    assert (out[~dropped] == 0.5).all() and (out[:, 6] == 0.5).all()


def test_gripper_flip_rate_and_sign() -> None:
    action = torch.full((20_000, 7), 0.5)
    action[:, 6] = 1.0
    out = PERTURBATIONS["gripper_flip"](0.8).apply(action, _gen())
    flipped = out[:, 6] == -1.0
    assert abs(flipped.float().mean().item() - 0.2) < 0.015  # 25% x 0.8
    assert ((out[:, 6] == 1.0) | flipped).all() and torch.equal(out[:, :6], action[:, :6])


# --------------------------------------------------------------------------------------------------------------
# The wrapper


class FakeEnv(VecEnv):
    """Env i's episodes last lengths[i] steps. rgb = 50 x episode + t (or always ``frame`` [N, H, W, 3], a scene that
    never changes), state = [episode, t]; executed actions kept."""

    def __init__(self, lengths: list[int], frame: torch.Tensor | None = None) -> None:
        super().__init__(len(lengths), torch.device("cpu"), 7, ["task"] * len(lengths))
        self.lengths = torch.tensor(lengths)
        self.frame = frame
        self.executed: list[torch.Tensor] = []
        self.clean: list[dict[str, torch.Tensor]] = []

    def _obs(self) -> dict[str, torch.Tensor]:
        value = (50 * self.episode + self.t).to(torch.uint8)
        obs = {
            "rgb": value.view(-1, 1, 1, 1).expand(-1, 4, 4, 3).clone() if self.frame is None else self.frame.clone(),
            "state": torch.stack([self.episode, self.t], 1).float(),
        }
        self.clean.append(obs)
        return obs

    def _reset(self, seed: int | None) -> dict[str, torch.Tensor]:
        self.t = torch.zeros(self.num_envs, dtype=torch.long)
        self.episode = torch.zeros(self.num_envs, dtype=torch.long)
        return self._obs()

    def _step(self, action: torch.Tensor):
        self.executed.append(action.clone())
        self.t = self.t + 1
        done = self.t >= self.lengths
        final = self._obs() if bool(done.any()) else None
        self.t = self.t.masked_fill(done, 0)
        self.episode = self.episode + done.long()
        zeros = torch.zeros(self.num_envs)
        return self._obs(), zeros, done, zeros.bool(), final, zeros.bool()

    def close(self) -> None:
        pass


def _spec(name: str, severity: float = 1.0) -> PerturbationSpec:
    return PerturbationSpec(name, severity)


def test_perturbed_env_never_modifies_the_callers_action() -> None:
    specs = [_spec(n) for n in NAMES if issubclass(PERTURBATIONS[n], ActionPerturbation)]
    env = PerturbedEnv(FakeEnv([3, 5]), specs + [_spec("rotation+action_noise")], seed=0)
    env.reset(seed=0)
    for t in range(8):
        action = _action(t, n=2)
        kept = action.clone()
        env.step(action)
        assert torch.equal(action, kept)
    assert not torch.equal(env.env.executed[-1], action)


def test_perturbed_env_restarts_stateful_perturbations_of_finished_envs() -> None:
    """Env 0's episodes last 4 steps, env 1's 100; latency and action delay both by k = 2 steps."""
    fake = FakeEnv([4, 100])
    env = PerturbedEnv(fake, [_spec("latency", 0.4), _spec("action_delay", 0.4)], seed=0)
    shown = [env.reset(seed=0)["rgb"][:, 0, 0, 0].tolist()]
    finals = []
    for t in range(8):
        step = env.step(torch.full((2, 7), t / 10))
        shown.append(step.obs["rgb"][:, 0, 0, 0].tolist())
        if step.final_obs is not None:
            finals.append(step.final_obs["rgb"][0, 0, 0, 0].item())
    # rgb = 50 x episode + t; env 0 restarts after 4 steps: its new first frame (50) is shown at once.
    assert [s[0] for s in shown] == [0, 0, 0, 1, 50, 50, 50, 51, 100]
    assert [s[1] for s in shown] == [0, 0, 0, 1, 2, 3, 4, 5, 6]
    assert finals == [2, 52], "final_obs: the finished episode's frame from k steps before its end"
    executed = [round(float(a[0, 0]) * 10) for a in fake.executed]
    assert executed == [0, 0, 0, 1, 4, 4, 4, 5]
    assert [round(float(a[1, 0]) * 10) for a in fake.executed] == [0, 0, 0, 1, 2, 3, 4, 5]


def test_perturbed_env_per_episode_bias_is_redrawn_when_an_episode_ends() -> None:
    fake = FakeEnv([3, 100])
    env = PerturbedEnv(fake, [_spec("action_bias")], seed=0)
    env.reset(seed=0)
    for _ in range(6):
        env.step(torch.zeros(2, 7))
    bias = torch.stack(fake.executed)  # [T, N, 7]
    assert (bias[:, 1] == bias[0, 1]).all(), "env 1 stays in its first episode"
    assert (bias[:3, 0] == bias[0, 0]).all() and (bias[3:, 0] == bias[3, 0]).all()
    assert (bias[0, 0, :6] != bias[3, 0, :6]).all()


def _which(out: dict[str, torch.Tensor], clean: dict[str, torch.Tensor]) -> list[int]:
    """Per env: 1 if only rgb was perturbed, 2 if only the state, 0/3 for none/both."""
    rgb = (out["rgb"] != clean["rgb"]).flatten(1).any(1).long()
    state = (out["state"] != clean["state"]).any(1).long()
    return (rgb + 2 * state).tolist()


def _sampled_run(seed: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    lengths = [2, 3, 4, 5, 2, 3, 4, 5, 2, 3, 4, 5]
    fake = FakeEnv(lengths)
    env = PerturbedEnv(fake, [_spec("pixel_noise"), _spec("state_noise")], seed=seed, sample_per_episode=True)
    kinds = [_which(env.reset(seed=0), fake.clean[-1])]
    episodes = [fake.episode.tolist()]
    finals = []
    for _ in range(12):
        step = env.step(torch.zeros(len(lengths), 7))
        kinds.append(_which(step.obs, fake.clean[-1]))
        episodes.append(fake.episode.tolist())
        if step.final_obs is not None:
            finals.append((_which(step.final_obs, fake.clean[-2]), kinds[-2], (step.terminated).tolist()))
    return kinds, episodes, finals


def test_sample_per_episode_picks_one_spec_per_env_and_episode_deterministically() -> None:
    kinds, episodes, finals = _sampled_run(seed=0)
    assert all(k in (1, 2) for row in kinds for k in row), "exactly one spec per env"
    per_episode: dict[tuple[int, int], set[int]] = {}
    for row, eps in zip(kinds, episodes, strict=True):
        for env, (k, e) in enumerate(zip(row, eps, strict=True)):
            per_episode.setdefault((env, e), set()).add(k)
    assert all(len(v) == 1 for v in per_episode.values()), "the choice holds for the whole episode"
    assert {next(iter(v)) for v in per_episode.values()} == {1, 2}
    for final, previous, done in finals:
        assert all(f == p for f, p, d in zip(final, previous, done, strict=True) if d), "final_obs: old choice"
    assert _sampled_run(seed=0)[0] == kinds
    assert _sampled_run(seed=1)[0] != kinds


def test_combination_applies_every_component() -> None:
    fake = FakeEnv([100, 100])
    env = PerturbedEnv(fake, [_spec("state_noise+action_noise", 0.5)], seed=0)
    assert [(type(p).__name__, p.severity) for p in env.perturbations] == [("StateNoise", 0.5), ("ActionNoise", 0.5)]
    obs = env.reset(seed=0)
    assert not torch.equal(obs["state"], fake.clean[-1]["state"]) and torch.equal(obs["rgb"], fake.clean[-1]["rgb"])
    env.step(torch.zeros(2, 7))
    assert fake.executed[-1].abs().sum() > 0


def test_severity_scale_multiplies_every_severity() -> None:
    fake = FakeEnv([100, 100])
    env = PerturbedEnv(fake, [_spec("action_noise", 0.8), _spec("rotation@0.5+state_noise", 0.4)], seed=0)
    env.set_severity_scale(0.5)
    assert [p.severity for p in env.perturbations] == [0.4, 0.25, 0.2]
    env.set_severity_scale(0.0)
    assert _equal(env.reset(seed=0), fake.clean[-1])
    env.step(torch.full((2, 7), 0.3))
    assert (fake.executed[-1] == 0.3).all()
    env.set_severity_scale(1.0)
    assert [p.severity for p in env.perturbations] == [0.8, 0.5, 0.4]
    with pytest.raises(ValueError, match="severity"):
        env.set_severity_scale(1.5)


# --------------------------------------------------------------------------------------------------------------
# Resample: random parameters held per episode or redrawn every step

EXPECTED_RESAMPLE = {
    **dict.fromkeys(
        ["shift", "rotation", "color_jitter", "occlusion", "random_erasing", "blur", "latency"], "episode"
    ),
    **dict.fromkeys(["action_bias", "action_gain", "action_delay"], "episode"),
    **dict.fromkeys(["pixel_noise", "salt_pepper", "state_noise", "frame_drop"], "step"),
    **dict.fromkeys(["action_noise", "action_dropout", "gripper_flip"], "step"),
}
DRAWN = sorted(set(NAMES) - HISTORY - NO_RANDOMNESS)  # a constant input's output shows the random parameters
HELD = [n for n in DRAWN if PERTURBATIONS[n].resample == "episode"]
REDRAWN = [n for n in DRAWN if PERTURBATIONS[n].resample == "step"]
OTHER = {"episode": "step", "step": "episode"}


def _constant_input(name: str, n: int = N) -> object:
    """One input reused at every step: 64-px images, so two shift or occlusion draws rarely coincide."""
    return _obs(n=n, size=64) if issubclass(PERTURBATIONS[name], ObservationPerturbation) else _action(n=n)


def _two_episodes(
    name: str, seed: int = 0, resample: str | None = None, done: torch.Tensor | None = None, n: int = N
) -> tuple[list, list]:
    """A fresh perturbation (severity 1) on one constant input: 3 steps, ``reset(done)`` (default: all), 3 more."""
    p = PERTURBATIONS[name](1.0, resample=resample)
    g = _gen(seed)
    x = _constant_input(name, n)
    p.reset(torch.ones(n, dtype=torch.bool))
    first = [p.apply(x, g) for _ in range(3)]
    p.reset(torch.ones(n, dtype=torch.bool) if done is None else done)
    return first, [p.apply(x, g) for _ in range(3)]


def _changed(a: object, b: object) -> torch.Tensor:
    """[N] bool: env i's output differs between a and b."""
    pairs = [(a[k], b[k]) for k in a] if isinstance(a, dict) else [(a, b)]
    return torch.stack([(x != y).reshape(x.shape[0], -1).any(1) for x, y in pairs]).any(0)


def test_every_perturbation_states_when_it_draws_and_why() -> None:
    assert {n: PERTURBATIONS[n].resample for n in NAMES} == EXPECTED_RESAMPLE
    for name in NAMES:
        assert f'resample "{PERTURBATIONS[name].resample}": ' in PERTURBATIONS[name].__doc__, "a one-line reason"
        assert PERTURBATIONS[name](0.5).mode == EXPECTED_RESAMPLE[name]
    with pytest.raises(TypeError, match="set the class attribute resample"):
        register(type("Unstated", (ActionPerturbation,), {"name": "unstated"}))
    assert "unstated" not in PERTURBATIONS
    with pytest.raises(ValueError, match="resample must be 'episode'"):
        Rotation(0.5, resample="always")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", [n for n in NAMES if EXPECTED_RESAMPLE[n] == "episode"])
def test_held_parameters_are_constant_within_an_episode(name: str) -> None:
    first, second = _two_episodes(name)
    assert all(_equal(y, first[0]) for y in first) and all(_equal(y, second[0]) for y in second)


@pytest.mark.parametrize("name", HELD)
def test_held_parameters_differ_across_episodes_and_come_from_the_seed(name: str) -> None:
    first, second = _two_episodes(name)
    assert _changed(first[0], _constant_input(name)).all(), "severity 1 perturbs every env"
    assert _changed(first[-1], second[0]).all(), "every env drew new parameters for its new episode"
    again = _two_episodes(name)
    assert _equal(again[0] + again[1], first + second)
    assert _changed(_two_episodes(name, seed=1)[0][0], first[0]).all()


@pytest.mark.parametrize("name", HELD)
def test_reset_redraws_only_the_envs_whose_episode_ended(name: str) -> None:
    done = torch.arange(N) % 3 == 0
    first, second = _two_episodes(name, done=done)
    assert torch.equal(_changed(first[-1], second[0]), done)


@pytest.mark.parametrize("name", REDRAWN)
def test_redrawn_parameters_change_at_every_step(name: str) -> None:
    p = PERTURBATIONS[name](1.0)
    g = _gen()
    x = _constant_input(name, n=64)
    draws = [p.draws(x, g) for _ in range(3)]
    for a, b in zip(draws, draws[1:], strict=False):
        assert all(_changed(a[k], b[k]).all() for k in a), "every env draws anew"
    outputs = _two_episodes(name, n=64)[0]
    for a, b in zip(outputs, outputs[1:], strict=False):
        assert _changed(a, b).any()


@pytest.mark.parametrize("name", DRAWN)
def test_resample_override_flips_the_behaviour(name: str) -> None:
    flipped = OTHER[EXPECTED_RESAMPLE[name]]
    first, second = _two_episodes(name, resample=flipped, n=64)
    if flipped == "step":
        assert _changed(first[0], first[1]).any() and _changed(second[0], second[1]).any()
    else:
        assert all(_equal(y, first[0]) for y in first) and all(_equal(y, second[0]) for y in second)
        assert _changed(first[-1], second[0]).any()


def test_frame_drop_held_per_episode_freezes_the_camera_of_some_envs() -> None:
    p = PERTURBATIONS["frame_drop"](1.0, resample="episode")  # half of the envs drop, at every step
    g = _gen()
    frames = _frames(12, n=64)
    shown = torch.stack([p.apply(f, g)["rgb"][:, 0, 0, 0] for f in frames[:6]])  # [T, N]
    frozen = (shown == 0).all(0)
    assert (frozen | (shown == torch.arange(6)[:, None]).all(0)).all(), "an env freezes on its first frame or never"
    assert 0.3 < frozen.float().mean() < 0.7
    p.reset(torch.ones(64, dtype=torch.bool))
    shown = torch.stack([p.apply(f, g)["rgb"][:, 0, 0, 0] for f in frames[6:]])
    refrozen = (shown == 6).all(0)
    assert (refrozen | (shown == torch.arange(6, 12)[:, None]).all(0)).all() and not torch.equal(refrozen, frozen)


def _wrapped(specs: list, lengths: tuple[int, ...] = (3, 5, 100), seed: int = 0, steps: int = 10) -> dict:
    """A PerturbedEnv over a scene that never changes, driven by constant actions: per step the perturbed obs, each
    env's episode index, final_obs, and the executed action."""
    fake = FakeEnv(list(lengths), frame=_obs(n=len(lengths), size=32)["rgb"])
    env = PerturbedEnv(fake, specs, seed=seed)
    obs, episodes, finals = [env.reset(seed=0)], [fake.episode.clone()], []
    clean = [fake.clean[-1]]
    for _ in range(steps):
        step = env.step(torch.full((len(lengths), 7), 0.5))
        obs.append(step.obs)
        clean.append(fake.clean[-1])
        episodes.append(fake.episode.clone())
        finals.append(step.final_obs)
    return {
        "env": env,
        "obs": obs,
        "clean": clean,
        "episodes": torch.stack(episodes),
        "finals": finals,
        "executed": fake.executed,
    }


def _per_step(run: dict, name: str) -> list[torch.Tensor]:
    """What an image or action perturbation changes at each step: the image (the scene never changes) or the
    executed action."""
    if issubclass(PERTURBATIONS[name], ImagePerturbation):
        return [o["rgb"] for o in run["obs"][:-1]]
    return list(run["executed"])


@pytest.mark.parametrize("name", HELD)
def test_perturbed_env_holds_each_envs_parameters_for_its_episode_and_recomputes_them(name: str) -> None:
    run = _wrapped([_spec(name)])
    seen, episodes = _per_step(run, name), run["episodes"]
    for i in range(3):
        for t in range(len(seen)):
            for u in range(t):
                same = bool(episodes[t, i] == episodes[u, i])
                assert torch.equal(seen[t][i], seen[u][i]) == same, (i, t, u)
    if issubclass(PERTURBATIONS[name], ObservationPerturbation):
        for t, final in enumerate(run["finals"]):
            ended = episodes[t + 1] != episodes[t]
            if final is not None:  # the finished episode's last frame, with that episode's parameters
                assert torch.equal(final["rgb"][ended], run["obs"][t]["rgb"][ended])
    again = _wrapped([_spec(name)])
    assert _equal(again["obs"], run["obs"]) and _equal(again["executed"], run["executed"])
    assert all(a is b is None or _equal(a, b) for a, b in zip(again["finals"], run["finals"], strict=True))
    assert sum(f is not None for f in run["finals"]) >= 3, "envs 0 and 1 finished episodes"
    assert not _equal(_per_step(_wrapped([_spec(name)], seed=1), name), seen), "another seed, other draws"


@pytest.mark.parametrize("name", DRAWN + ["rotation+pixel_noise", "shift+state_noise+action_bias+action_noise"])
def test_draws_depend_on_the_step_not_on_when_other_envs_episodes_end(name: str) -> None:
    """Common random numbers: env 2 (one long episode) sees the same draws whatever envs 0 and 1 do, also when a
    held part redraws for them while a redrawn part goes on."""

    def env_2(lengths: tuple[int, ...]) -> list[torch.Tensor]:
        run = _wrapped([_spec(name)], lengths=lengths)
        noise = [o["state"] - c["state"] for o, c in zip(run["obs"], run["clean"], strict=True)]  # state: [episode, t]
        return [torch.cat([o["rgb"][2].flatten().float(), e[2]]) for o, e in zip(run["obs"], noise, strict=False)] + [
            a[2] for a in run["executed"]
        ]

    assert _equal(env_2((3, 5, 100)), env_2((2, 7, 100)))


def test_combination_holds_and_redraws_per_part_at_per_part_severities() -> None:
    def rgb_held_noise_redrawn(spec: PerturbationSpec) -> tuple[list, bool, bool]:
        run = _wrapped([spec], lengths=(100, 100, 100), steps=4)
        modes = [(p.name, p.severity, p.mode) for p in run["env"].perturbations]
        rgb = [o["rgb"] for o in run["obs"]]
        executed = run["executed"]
        noise_redrawn = all(_changed(x, y).all() for x, y in zip(executed, executed[1:], strict=False))
        assert noise_redrawn and not torch.equal(rgb[0], run["env"].env.clean[0]["rgb"])
        return modes, all(torch.equal(x, rgb[0]) for x in rgb), noise_redrawn

    modes, held, _ = rgb_held_noise_redrawn(PerturbationSpec("rotation@0.5+action_noise", 1 / 3))
    assert modes == [("rotation", 0.5, "episode"), ("action_noise", 1 / 3, "step")] and held
    modes, held, _ = rgb_held_noise_redrawn(PerturbationSpec("rotation@0.5+action_noise", 1 / 3, resample="step"))
    assert modes == [("rotation", 0.5, "step"), ("action_noise", 1 / 3, "step")] and not held
    spec = PerturbationSpec("rotation@0.5:episode+action_noise", 1 / 3, resample="step")  # the part's mode wins
    modes, held, _ = rgb_held_noise_redrawn(spec)
    assert modes == [("rotation", 0.5, "episode"), ("action_noise", 1 / 3, "step")] and held


def test_curriculum_scales_the_held_draw_instead_of_redrawing_it() -> None:
    fake = FakeEnv([100, 100], frame=_obs(n=2, size=32)["rgb"])
    env = PerturbedEnv(fake, [_spec("action_bias"), _spec("rotation")], seed=0)
    full = env.reset(seed=0)
    rotation = env.perturbations[1]
    clean = fake.clean[-1]

    def degrees() -> torch.Tensor:  # the held angle at the current severity (commit=False: no state changes)
        return rotation.parameters(clean, rotation.draws(clean, _gen(99), commit=False))["degrees"]

    full_degrees = degrees()
    env.step(torch.zeros(2, 7))
    env.set_severity_scale(0.5)
    half = env.step(torch.zeros(2, 7)).obs
    assert torch.equal(fake.executed[1][:, :6] * 2, fake.executed[0][:, :6]), "half the same offset"
    assert torch.equal(degrees() * 2, full_degrees) and full_degrees.abs().min() > 0.1
    assert not torch.equal(half["rgb"], full["rgb"])
    env.set_severity_scale(1.0)
    assert torch.equal(env.step(torch.zeros(2, 7)).obs["rgb"], full["rgb"]), "back to the same draw"
    assert torch.equal(fake.executed[2], fake.executed[0])


def test_resample_in_specs_labels_and_the_cli_grid() -> None:
    assert expand_spec(_spec("rotation@0.5:step+action_noise", 0.2)) == [
        Spec("rotation", 0.5, "step"),
        Spec("action_noise", 0.2),
    ]
    assert expand_spec(PerturbationSpec("rotation+action_noise:step", 0.2, resample="episode")) == [
        Spec("rotation", 0.2, "episode"),
        Spec("action_noise", 0.2, "step"),
    ]
    # Labels stay as they were for default modes; an override away from the default shows.
    assert spec_label(_spec("rotation:episode+action_noise:step", 0.5)) == "rotation@0.5+action_noise@0.5"
    assert spec_label(_spec("rotation:step+action_noise", 0.5)) == "rotation@0.5:step+action_noise@0.5"
    built = build_perturbations([_spec("shift@0.2:step+pixel_noise:episode", 0.4)])
    assert [(p.name, p.severity, p.mode) for p in built] == [("shift", 0.2, "step"), ("pixel_noise", 0.4, "episode")]
    grid = suite_grid(None, ["rotation@0.5", "rotation@0.5:step", "rotation@0.5+action_noise@0.1:episode"])
    assert [(s.name, s.perturbation) for s in grid[1:]] == [
        ("rotation@0.5", "rotation"),
        ("rotation@0.5:step", "rotation:step"),
        ("rotation@0.5+action_noise@0.1:episode", "rotation+action_noise:episode"),
    ]
    assert grid[2].specs == [Spec("rotation", 0.5, "step")]
    for bad in ["rotation@0.5:stp", "rotation@0.5:", "rotation@0.5:step:episode"]:
        with pytest.raises(ValueError, match="resample must be 'episode'"):
            suite_grid(None, [bad])
    with pytest.raises(ValueError, match="resample must be 'episode'"):
        validate_specs([PerturbationSpec("rotation", 0.5, resample="sometimes")])  # type: ignore[arg-type]


def test_config_resample_override() -> None:
    cfg = load_config(None, ["perturb.train=[{name: rotation, severity: 0.5, resample: step}, {name: 'shift:step'}]"])
    assert [s.resample for s in cfg.perturb.train] == ["step", None]
    assert [p.mode for p in build_perturbations(cfg.perturb.train)] == ["step", "step"]
    with pytest.raises(
        ConfigError,
        match="perturb.train\\[0\\].resample: 'stp' is not one of \\['episode', 'step'\\]; did you mean 'step'",
    ):
        load_config(None, ["perturb.train=[{name: rotation, resample: stp}]"])
    with pytest.raises(ConfigError, match="perturb.eval: perturbation 'rotation:stp': resample must be"):
        load_config(None, ["perturb.eval=[{name: 'rotation:stp'}]"])


def test_report_and_card_say_when_parameters_are_drawn() -> None:
    from rvla_peft.cards import robustness_table
    from rvla_peft.evaluation import CellResult, build_report
    from rvla_peft.report import render_markdown

    grid = suite_grid(None, ["rotation@0.5", "rotation@0.5:step", "rotation@0.5+action_noise@0.1"])
    policies = [{"name": "base", "base": "b", "adapter": None}, {"name": "robust", "base": "b", "adapter": "a"}]
    results = [CellResult(p["name"], s.name, [True, False], [1.0, 0.0]) for s in grid for p in policies]
    report = build_report(
        results, grid, policies, task="PickCube-v1", suite=None, episodes=2, seed=0, deterministic=True, command="c"
    )
    assert report["schema_version"] == 1
    assert [s["specs"] for s in report["settings"]] == [
        [],
        [{"name": "rotation", "severity": 0.5, "resample": "episode"}],
        [{"name": "rotation", "severity": 0.5, "resample": "step"}],
        [
            {"name": "rotation", "severity": 0.5, "resample": "episode"},
            {"name": "action_noise", "severity": 0.1, "resample": "step"},
        ],
    ]
    md = render_markdown(report)
    assert "| setting | base | robust | random parameters |" in md
    assert "| clean | 50.0 [9.5, 90.5] | 50.0 [9.5, 90.5] | - |" in md
    assert "| rotation@0.5 | 50.0 [9.5, 90.5] | 50.0 [9.5, 90.5] | held per episode |" in md
    assert "| rotation@0.5:step | 50.0 [9.5, 90.5] | 50.0 [9.5, 90.5] | redrawn every step |" in md
    assert "| rotation held per episode, action_noise redrawn every step |" in md
    table = robustness_table(report, "robust")
    assert table.splitlines()[0].endswith("| difference [95% CI] | random parameters |")
    assert "| `rotation@0.5:step` | 50% [9, 91] |" in table and table.splitlines()[3].endswith("| held per episode |")
    # A report written before the mode was recorded: no such column, nothing breaks.
    old = {**report, "settings": [{k: v for k, v in s.items() if k != "specs"} for s in report["settings"]]}
    assert "random parameters" not in render_markdown(old) and "random parameters" not in robustness_table(
        old, "robust"
    )
    old["settings"] = [{**s, "specs": [{"name": "rotation", "severity": 0.5}]} for s in old["settings"]]
    assert "random parameters" not in render_markdown(old)


# --------------------------------------------------------------------------------------------------------------
# Specs, validation, suites


def test_expand_spec_combinations_and_per_part_severities() -> None:
    assert expand_spec(_spec("rotation", 0.3)) == [Spec("rotation", 0.3)]
    assert expand_spec(_spec("rotation+action_noise", 0.4)) == [Spec("rotation", 0.4), Spec("action_noise", 0.4)]
    assert expand_spec(_spec(" rotation@0.5 + action_noise ", 0.2)) == [
        Spec("rotation", 0.5),
        Spec("action_noise", 0.2),
    ]
    assert spec_label(_spec("rotation@0.5+action_noise", 1 / 3)) == "rotation@0.5+action_noise@0.333"
    built = build_perturbations([_spec("shift+blur", 0.1), _spec("gripper_flip", 0.9)])
    assert [(p.name, p.severity) for p in built] == [("shift", 0.1), ("blur", 0.1), ("gripper_flip", 0.9)]


def test_validate_specs_accepts_config_specs() -> None:
    validate_specs([PerturbationSpec("pixel_noise", 0.0), PerturbationSpec("action_noise", 1.0)])
    validate_specs([])
    built = build_perturbations([PerturbationSpec("action_noise", 0.5)])
    assert isinstance(built[0], ActionNoise) and built[0].severity == 0.5


def test_validate_specs_unknown_name_suggests_nearest() -> None:
    with pytest.raises(ValueError, match="did you mean 'pixel_noise'") as err:
        validate_specs([PerturbationSpec("pixel_nois", 0.5)])
    assert "action_noise" in str(err.value)  # lists the valid names
    with pytest.raises(ValueError, match="unknown perturbation 'rotatoin' in 'rotatoin\\+action_noise'; did you mean"):
        validate_specs([PerturbationSpec("rotatoin+action_noise", 0.5)])


@pytest.mark.parametrize("name", ["rotation+", "+rotation", "rotation++blur", "rotation+@0.5", ""])
def test_validate_specs_rejects_an_empty_combination_part(name: str) -> None:
    with pytest.raises(ValueError, match="empty part"):
        validate_specs([PerturbationSpec(name, 0.5)])


@pytest.mark.parametrize("severity", [-0.1, 1.5, float("nan"), "high"])
def test_validate_specs_rejects_bad_severity(severity: object) -> None:
    with pytest.raises(ValueError, match="severity"):
        validate_specs([PerturbationSpec("action_noise", severity)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="severity"):
        ActionNoise(severity)  # type: ignore[arg-type]


@pytest.mark.parametrize("part", ["rotation@1.5", "rotation@x", "rotation@nan", "rotation@"])
def test_validate_specs_rejects_bad_part_severity(part: str) -> None:
    with pytest.raises(ValueError, match="severity"):
        validate_specs([PerturbationSpec(f"{part}+action_noise", 0.5)])


def test_suites() -> None:
    paper = dict(suite_settings("paper"))
    assert {"shift@0.5", "rotation@0.5", "color_jitter@0.5", "occlusion@0.5", "random_erasing@0.5"} <= set(paper)
    sigmas = [0.3 * paper[f"action_noise@{s}"][0].severity for s in ("0.333", "0.667", "1")]
    assert sigmas == pytest.approx([0.1, 0.2, 0.3])
    rotation, noise = paper["rotation@0.5+action_noise@0.333"]
    assert rotation == Spec("rotation", 0.5) and 0.3 * noise.severity == pytest.approx(0.1)
    full = suite_settings("full")
    assert {c.name for _, specs in full for c in specs} == set(PERTURBATIONS)
    assert len(suite_settings("quick")) == 2
    for name in SUITES:
        for _, specs in suite_settings(name):
            validate_specs(specs)
    with pytest.raises(ValueError, match="did you mean 'paper'.*valid suites"):
        suite_settings("papr")


# --------------------------------------------------------------------------------------------------------------
# Curriculum and config


def _scales(schedule: str, updates: int, rates: list | None = None, **kw) -> list[float]:
    curriculum = Curriculum(CurriculumConfig(schedule=schedule, **kw))
    rates = rates or [None] * updates
    return [curriculum.scale(u, r) for u, r in zip(range(updates), rates, strict=True)]


def test_curriculum_schedules() -> None:
    assert _scales("none", 3, start=0.3) == [1.0, 1.0, 1.0]
    assert _scales("linear", 7, start=0.2, ramp_updates=4) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0])
    step = _scales("step", 12, start=0.0, ramp_updates=10, stages=2)
    assert step == [0.0] * 5 + [0.5] * 5 + [1.0] * 2
    rates = [None, 0.4, 0.5, float("nan"), 0.9, 1.0, 1.0, 1.0]
    success = _scales("success", 8, rates, start=0.1, success_threshold=0.5, increment=0.3)
    assert success == pytest.approx([0.1, 0.1, 0.4, 0.4, 0.7, 1.0, 1.0, 1.0])


@pytest.mark.parametrize(
    "override, message",
    [
        ("perturb.curriculum.start=1.5", "perturb.curriculum.start: must be in [0, 1]"),
        ("perturb.curriculum.ramp_updates=0", "perturb.curriculum.ramp_updates: must be >= 1"),
        ("perturb.curriculum.stages=0", "perturb.curriculum.stages: must be >= 1"),
        ("perturb.curriculum.success_threshold=2", "perturb.curriculum.success_threshold: must be in [0, 1]"),
        ("perturb.curriculum.increment=0", "perturb.curriculum.increment: must be in (0, 1]"),
        ("perturb.curriculum.schedule=linaer", "did you mean 'linear'"),
        ("perturb.train=[{name: 'rotation+', severity: 0.5}]", "perturb.train: perturbation 'rotation+': empty part"),
        ("perturb.eval=[{name: rotatoin, severity: 0.5}]", "did you mean 'rotation'"),
        ("perturb.train=[{name: 'rotation@2', severity: 0.5}]", "severity must be in [0, 1]"),
    ],
)
def test_config_rejects_bad_perturb_settings(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_config_accepts_the_new_perturb_settings() -> None:
    cfg = load_config(
        None,
        [
            "perturb.train=[{name: 'rotation@0.5+action_noise', severity: 0.33}, {name: latency}]",
            "perturb.sample_per_episode=true",
            "perturb.curriculum={schedule: step, start: 0.25, ramp_updates: 8, stages: 3}",
        ],
    )
    assert cfg.perturb.sample_per_episode and cfg.perturb.curriculum.stages == 3
    assert Curriculum(cfg.perturb.curriculum).scale(8) == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda() -> None:
    """Every perturbation in both resample modes, state restarts, peeks and PerturbedEnv's generator save/restore
    included, runs without a device-to-host synchronisation."""
    device = torch.device("cuda")
    perturbations = [cls(0.7, resample=mode) for cls in PERTURBATIONS.values() for mode in ("episode", "step")]
    g = torch.Generator(device=device).manual_seed(0)
    obs = {k: v.to(device) for k, v in _obs(cameras=2).items()}
    action = _action().to(device)
    done = (torch.arange(N) % 2 == 0).to(device)

    def steps() -> None:
        for _ in range(3):
            for p in perturbations:
                if isinstance(p, ObservationPerturbation):
                    state = g.get_state()
                    p.peek(obs, g)
                    g.set_state(state)
                p.apply(obs if isinstance(p, ObservationPerturbation) else action, g)
                p.reset(done)

    steps()  # first calls allocate state and per-device constants
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps()
    finally:
        torch.cuda.set_sync_debug_mode(0)
