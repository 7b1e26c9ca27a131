"""Statistics of success rates and training diagnostics (pure functions, checked against closed forms)."""

from __future__ import annotations

import math

import torch

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion: sane at 0 and n successes, unlike the normal interval."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n successes one end is p exactly in theory; clamp so float rounding never leaves p outside.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def paired_difference(a: torch.Tensor, b: torch.Tensor, z: float = Z95) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired episodes and its normal-approximation 95% interval.

    Pairing (same initial states and perturbation draws) removes the between-episode variance that two independent
    success rates would carry, so the interval is much narrower than the two Wilson intervals suggest.
    """
    d = a.double() - b.double()
    n = d.numel()
    mean = d.mean().item()
    half = z * (d.std(unbiased=True).item() / math.sqrt(n)) if n > 1 else float("inf")
    return mean, mean - half, mean + half


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): how much of the return the critic predicts (nan if constant)."""
    var = returns.var()
    return float("nan") if var == 0 else float(1 - (returns - values).var() / var)
