"""Statistics of success rates and training diagnostics (pure functions, checked against closed forms).

What the reports use, and why:

- one policy's success rate over the episodes of one cell: the Wilson score interval (``wilson_interval``), inside
  [0, 1] at 0 and n successes, where the normal interval is not;
- two policies evaluated on the same episodes (one pair per episode): Newcombe's score interval for a difference of
  paired proportions (``newcombe_paired_interval``, his method 10) and the exact McNemar test
  (``mcnemar_exact_p``); both stay informative when no pair disagrees, where the normal interval of the per-episode
  differences collapses to a point;
- an arm trained with several seeds: the two-level bootstrap (``TwoLevelBootstrap``), which resamples the training
  seeds and the evaluation episodes, so its interval carries both sources of variation; an interval over seeds
  alone (``t_interval``) holds the episodes fixed and is too narrow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

Z95 = 1.959963984540054

WILSON = "Wilson score interval"
NEWCOMBE = "Newcombe's score interval for paired proportions (method 10)"
MCNEMAR = "exact McNemar test"
TWO_LEVEL = "two-level percentile bootstrap over training seeds and evaluation episodes"


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


def paired_counts(a: Sequence, b: Sequence) -> tuple[int, int, int, int]:
    """The paired 2x2 table of two binary outcomes on the same episodes: (both succeed, only ``a``, only ``b``,
    neither)."""
    a, b = [bool(x) for x in a], [bool(x) for x in b]
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need one pair per episode, got {len(a)} and {len(b)} outcomes")
    both = sum(x and y for x, y in zip(a, b, strict=True))
    only_a, only_b = sum(a) - both, sum(b) - both
    return both, only_a, only_b, len(a) - both - only_a - only_b


def newcombe_paired_interval(
    both: int, only_a: int, only_b: int, neither: int, z: float = Z95
) -> tuple[float, float, float]:
    """Difference ``p_a - p_b`` of two proportions measured on the same units, with Newcombe's (1998) hybrid score
    interval (method 10 of Stat Med 17:2635): the two Wilson intervals combined by square-and-add, corrected for the
    correlation of the pairs. Inside [-1, 1]; not a point when the arms never disagree (``only_a = only_b = 0``).

    phi, the correlation of the two outcomes, uses ``A = both * neither - only_a * only_b`` shrunk by ``n / 2``
    towards 0 when positive (Newcombe's continuity correction of phi alone), and is 0 when a margin is empty.
    """
    if min(both, only_a, only_b, neither) < 0:
        raise ValueError(f"paired counts must be >= 0, got {(both, only_a, only_b, neither)}")
    n = both + only_a + only_b + neither
    if n == 0:
        return 0.0, -1.0, 1.0
    p_a, p_b = (both + only_a) / n, (both + only_b) / n
    l_a, u_a = wilson_interval(both + only_a, n, z)
    l_b, u_b = wilson_interval(both + only_b, n, z)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    a = both * neither - only_a * only_b
    phi = 0.0 if margins == 0 else (max(a - n / 2, 0.0) if a > 0 else a) / math.sqrt(margins)
    diff = (only_a - only_b) / n
    lower = diff - math.sqrt(max(0.0, (p_a - l_a) ** 2 - 2 * phi * (p_a - l_a) * (u_b - p_b) + (u_b - p_b) ** 2))
    upper = diff + math.sqrt(max(0.0, (p_b - l_b) ** 2 - 2 * phi * (p_b - l_b) * (u_a - p_a) + (u_a - p_a) ** 2))
    return diff, max(-1.0, min(diff, lower)), min(1.0, max(diff, upper))


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar test: under "no difference" each discordant pair is either way with probability 1/2,
    so p = 2 P(X <= min(only_a, only_b)) for X ~ Binomial(only_a + only_b, 1/2), at most 1 (1 with no discordant
    pair)."""
    if min(only_a, only_b) < 0:
        raise ValueError(f"discordant counts must be >= 0, got {(only_a, only_b)}")
    m, k = only_a + only_b, min(only_a, only_b)
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(k + 1))  # exact integers: no underflow at large m
    return min(1.0, 2 * tail / 2**m)


def paired_proportion_difference(a: Sequence, b: Sequence, z: float = Z95) -> tuple[float, float, float, float]:
    """Paired difference of two binary outcomes over the same episodes: ``(mean(a) - mean(b), lower, upper, p)``
    with Newcombe's interval and the exact McNemar p-value."""
    both, only_a, only_b, neither = paired_counts(a, b)
    diff, lo, hi = newcombe_paired_interval(both, only_a, only_b, neither, z)
    return diff, lo, hi, mcnemar_exact_p(only_a, only_b)


def paired_difference(a: torch.Tensor, b: torch.Tensor, z: float = Z95) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired episodes and its normal-approximation 95% interval.

    Pairing (same initial states and perturbation draws) removes the between-episode variance that two independent
    success rates would carry. For binary outcomes prefer ``paired_proportion_difference``: this interval is a point
    when no pair disagrees and can leave [-1, 1].
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


RATE_BOUNDS = (0.0, 1.0)  # a success rate
DIFFERENCE_BOUNDS = (-1.0, 1.0)  # a difference of two success rates


def t_interval(values: list[float], bounds: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """Mean of ``values`` with its 95% Student-t interval: the interval over training seeds, holding each seed's
    evaluation episodes fixed (``TwoLevelBootstrap`` resamples them too). One value gives an infinite interval.
    ``bounds``: what is possible (``RATE_BOUNDS`` for success rates, ``DIFFERENCE_BOUNDS`` for their differences);
    the interval is clipped to it."""
    n = len(values)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = sum(values) / n
    if n == 1:
        lo, hi = -math.inf, math.inf
    else:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = t975(n - 1) * sd / math.sqrt(n)
        lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(bounds[0], lo), min(bounds[1], hi)
    return mean, lo, hi


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap replicates. A nan replicate (a statistic undefined in
    that resample) counts against both ends: -inf for the lower, +inf for the upper."""
    r = np.asarray(replicates, dtype=float)
    alpha = 100 * (1 - level) / 2
    undefined = np.isnan(r)
    if not undefined.any():
        return float(np.percentile(r, alpha)), float(np.percentile(r, 100 - alpha))
    # no interpolation next to an infinite end (inf - inf): the order statistics outward
    lo = np.percentile(np.where(undefined, -np.inf, r), alpha, method="lower")
    hi = np.percentile(np.where(undefined, np.inf, r), 100 - alpha, method="higher")
    return float(lo), float(hi)


class TwoLevelBootstrap:
    """Two-level (hierarchical) bootstrap of success over training seeds and evaluation episodes.

    ``arms`` maps each arm to its binary outcomes, an array ``[seeds, settings, episodes]`` (or ``[seeds,
    episodes]`` for one setting); a base that is not trained is an arm with one seed. Each of ``resamples``
    replicates draws, with replacement, each arm's seeds (independently per arm) and the episodes; with ``paired``
    (the default) one draw of episode indices serves every arm and every setting, since episode e of every cell
    starts from the same reset seed and perturbation draws; then every arm needs the same number of episodes.
    ``resample_episodes=False`` holds the episodes fixed (the interval over seeds alone, for comparison).

    A replicate's mean over resampled (seed, episode) units is ``c_seeds @ outcomes @ c_episodes / (seeds *
    episodes)`` with each unit's resample count as its weight, so all replicates are one tensor contraction. The
    statistics below share the replicates, and their intervals are percentile intervals.
    """

    def __init__(
        self,
        arms: Mapping[str, np.ndarray | Sequence],
        *,
        resamples: int = 2000,
        seed: int = 0,
        level: float = 0.95,
        paired: bool = True,
        resample_episodes: bool = True,
    ):
        if resamples < 1:
            raise ValueError(f"resamples must be >= 1, got {resamples}")
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}")
        data = {}
        for name, outcomes in arms.items():
            x = np.asarray(outcomes, dtype=float)
            if x.ndim == 2:
                x = x[:, None, :]
            if x.ndim != 3 or 0 in x.shape:
                raise ValueError(f"arm {name!r}: outcomes must be [seeds, settings, episodes], got shape {x.shape}")
            data[name] = x
        if not data:
            raise ValueError("TwoLevelBootstrap needs at least one arm")
        settings = {x.shape[1] for x in data.values()}
        if len(settings) > 1:
            raise ValueError(f"every arm needs the same settings, got {sorted(settings)} settings")
        episodes = {x.shape[2] for x in data.values()}
        if paired and len(episodes) > 1:
            raise ValueError(
                f"paired arms need the same episodes, got {sorted(episodes)} episodes; pass paired=False if the "
                "arms ran different episodes"
            )
        self.resamples, self.seed, self.level = resamples, seed, level
        self.data = data
        rng = np.random.default_rng(seed)

        def counts(n: int) -> np.ndarray:  # how often each of n units is drawn, per resample: rows sum to n
            return rng.multinomial(n, np.full(n, 1 / n), size=resamples).astype(float)

        shared = counts(episodes.pop()) if paired and resample_episodes else None
        self.replicates: dict[str, np.ndarray] = {}  # arm -> [resamples, settings]
        for name, x in data.items():
            seeds, _, n_episodes = x.shape
            c_seeds = counts(seeds)
            if not resample_episodes:
                c_eps = np.ones((resamples, n_episodes))
            else:
                c_eps = shared if shared is not None else counts(n_episodes)
            # integer sums of 0/1 outcomes (exact in float), divided once: a rate never rounds past 0 or 1
            self.replicates[name] = np.einsum("rs,ske,re->rk", c_seeds, x, c_eps) / (seeds * n_episodes)

    def _select(self, arm: str, settings: Sequence[int] | None) -> tuple[float, np.ndarray]:
        if arm not in self.data:
            raise KeyError(f"no arm {arm!r}; arms: {list(self.data)}")
        keys = list(range(self.data[arm].shape[1])) if settings is None else list(settings)
        estimate = float(self.data[arm][:, keys, :].mean())
        return estimate, self.replicates[arm][:, keys].mean(axis=1)

    def _interval(self, estimate: float, replicates: np.ndarray) -> tuple[float, float, float]:
        lo, hi = percentile_interval(replicates, self.level)
        return estimate, lo, hi

    def mean(self, arm: str, settings: Sequence[int] | None = None) -> tuple[float, float, float]:
        """The arm's success averaged over ``settings`` (indices; all by default) and its seeds and episodes."""
        return self._interval(*self._select(arm, settings))

    def difference(self, arm: str, baseline: str, settings: Sequence[int] | None = None) -> tuple[float, float, float]:
        """``mean(arm) - mean(baseline)``; paired by episode when the bootstrap is."""
        a, ra = self._select(arm, settings)
        b, rb = self._select(baseline, settings)
        return self._interval(a - b, ra - rb)

    def gap_cut(self, arm: str, base: str, clean: int, perturbed: Sequence[int]) -> tuple[float, float, float]:
        """The share of the base's robustness gap (clean minus mean perturbed success) that the arm closes:
        ``1 - gap(arm) / gap(base)``; nan where the base has no gap (in a replicate: counted against both ends)."""

        def gap(name: str) -> tuple[float, np.ndarray]:
            c, rc = self._select(name, [clean])
            p, rp = self._select(name, perturbed)
            return c - p, rc - rp

        (ga, rga), (gb, rgb) = gap(arm), gap(base)
        estimate = 1 - ga / gb if gb > 0 else math.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            replicates = np.where(rgb > 0, 1 - rga / np.where(rgb > 0, rgb, 1.0), np.nan)
        return self._interval(estimate, replicates)
