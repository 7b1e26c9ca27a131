"""Perturbations on batched tensors: identity at severity 0, determinism, ranges, measured noise scales."""

from __future__ import annotations

import pytest
import torch

from rvla_peft.config import PerturbationSpec
from rvla_peft.envs.perturbations import (
    PERTURBATIONS,
    ActionNoise,
    ActionPerturbation,
    ObservationPerturbation,
    PixelNoise,
    build_perturbations,
    validate_specs,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _obs(n: int = 4, size: int = 16) -> dict[str, torch.Tensor]:
    g = _gen(123)
    return {
        "rgb": torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8),
        "state": torch.randn(n, 9, generator=g),
    }


def _action(n: int = 4, dim: int = 7) -> torch.Tensor:
    return torch.rand(n, dim, generator=_gen(7)) * 2 - 1


def _apply(name: str, severity: float, seed: int = 0) -> tuple[object, object]:
    """(input, output) of perturbation ``name`` on a fixed batch of its kind."""
    p = PERTURBATIONS[name](severity)
    if isinstance(p, ObservationPerturbation):
        x = _obs()
        return x, p.apply(x, _gen(seed))
    assert isinstance(p, ActionPerturbation)
    x = _action()
    return x, p.apply(x, _gen(seed))


def _equal(a: object, b: object) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_identity_at_severity_zero(name: str) -> None:
    x, y = _apply(name, 0.0)
    assert _equal(x, y)


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_deterministic_for_a_seed(name: str) -> None:
    _, a = _apply(name, 0.7, seed=1)
    _, b = _apply(name, 0.7, seed=1)
    _, c = _apply(name, 0.7, seed=2)
    assert _equal(a, b)
    assert not _equal(a, c)


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_input_untouched_and_dtype_shape_kept(name: str) -> None:
    x, y = _apply(name, 1.0)
    x_again, _ = _apply(name, 0.0)  # a fresh copy of the same input
    assert _equal(x, x_again), "the input was modified in place"
    pairs = [(x[k], y[k]) for k in x] if isinstance(x, dict) else [(x, y)]
    for before, after in pairs:
        assert after.shape == before.shape and after.dtype == before.dtype and after.device == before.device


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


def test_validate_specs_accepts_config_specs() -> None:
    validate_specs([PerturbationSpec("pixel_noise", 0.0), PerturbationSpec("action_noise", 1.0)])
    validate_specs([])
    built = build_perturbations([PerturbationSpec("action_noise", 0.5)])
    assert isinstance(built[0], ActionNoise) and built[0].severity == 0.5


def test_validate_specs_unknown_name_suggests_nearest() -> None:
    with pytest.raises(ValueError, match="did you mean 'pixel_noise'") as err:
        validate_specs([PerturbationSpec("pixel_nois", 0.5)])
    assert "action_noise" in str(err.value)  # lists the valid names


@pytest.mark.parametrize("severity", [-0.1, 1.5, float("nan"), "high"])
def test_validate_specs_rejects_bad_severity(severity: object) -> None:
    with pytest.raises(ValueError, match="severity"):
        validate_specs([PerturbationSpec("action_noise", severity)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="severity"):
        ActionNoise(severity)  # type: ignore[arg-type]
