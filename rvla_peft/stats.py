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


# Two-sided 95% quantiles of Student's t, t_{0.975, df} for df = 1..30 (standard table values).
_T975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
    2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
    2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
)  # fmt: skip


def t975(df: int) -> float:
    """t_{0.975, df}; past the table, the normal quantile with the first Cornish-Fisher correction (error < 1e-4)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    return Z95 + (Z95**3 + Z95) / (4 * df)


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean of ``values`` with its 95% Student-t interval: the interval over training seeds, whose spread (not the
    episodes within a seed) is what decides whether a training recipe helps. One value gives an infinite interval."""
    n = len(values)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, -math.inf, math.inf
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half
