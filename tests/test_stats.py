"""Statistics against closed forms and published values; the bootstrap by its properties."""

import math

import numpy as np
import pytest
import torch

from rvla_peft.stats import (
    DIFFERENCE_BOUNDS,
    RATE_BOUNDS,
    Z95,
    TwoLevelBootstrap,
    mcnemar_exact_p,
    newcombe_paired_interval,
    paired_counts,
    paired_difference,
    paired_proportion_difference,
    percentile_interval,
    t975,
    t_interval,
    wilson_interval,
)


def test_t_quantiles_match_their_closed_forms():
    p = 0.975
    assert t975(1) == pytest.approx(math.tan(math.pi * (p - 0.5)), abs=1e-6)  # Cauchy
    assert t975(2) == pytest.approx((2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))), abs=1e-6)
    assert t975(4) == pytest.approx(2.776445, abs=1e-6)
    assert t975(1000) == pytest.approx(1.962339, abs=1e-4)  # past the table: tends to the normal quantile
    assert t975(31) > t975(1000) > Z95
    with pytest.raises(ValueError, match=">= 1"):
        t975(0)


def test_t_interval_of_three_seeds():
    mean, lo, hi = t_interval([0.30, 0.05, 0.30])
    sd = math.sqrt(((0.30 - mean) ** 2 * 2 + (0.05 - mean) ** 2) / 2)
    assert mean == pytest.approx(0.65 / 3)
    assert hi - mean == pytest.approx(4.302653 * sd / math.sqrt(3))
    assert mean - lo == pytest.approx(hi - mean)
    assert t_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    assert t_interval([0.4])[1:] == (-math.inf, math.inf)


def test_t_interval_is_clipped_to_what_is_possible():
    # three seeds at 100, 100 and 97.9 %: unclipped, the t interval reaches past 100 %
    mean, lo, hi = t_interval([1.0, 1.0, 0.979])
    assert hi > 1
    assert t_interval([1.0, 1.0, 0.979], bounds=RATE_BOUNDS) == pytest.approx((mean, lo, 1.0))
    assert t_interval([-0.99, -0.9], bounds=DIFFERENCE_BOUNDS)[1] == -1.0
    assert t_interval([0.4], bounds=RATE_BOUNDS)[1:] == (0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# proportions: Wilson, Newcombe's paired interval, the exact McNemar test


def test_wilson_interval_of_a_base_counted_once_and_three_times():
    """99 of 100 episodes: centre (0.99 + z^2/200) / (1 + z^2/100) = 0.971889, half-width
    z sqrt(0.99 * 0.01 / 100 + z^2 / 40000) / (1 + z^2/100) = 0.026359, so [94.55, 99.82] %. The same 100
    episodes pooled three times (297 of 300) would give [97.1, 99.7] %, printed [97, 100]: too narrow."""
    z2 = Z95**2
    centre, half = (0.99 + z2 / 200) / (1 + z2 / 100), Z95 * math.sqrt(0.99 * 0.01 / 100 + z2 / 40000) / (1 + z2 / 100)
    assert wilson_interval(99, 100) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert wilson_interval(99, 100) == pytest.approx((0.945514, 0.998233), abs=1e-6)
    assert wilson_interval(297, 300) == pytest.approx((0.971017, 0.996593), abs=1e-6)


def test_newcombe_paired_interval_matches_a_published_example():
    """Cavo et al. (2012), complete response before and after consolidation therapy, 161 patients, table
    [[59, 6], [16, 80]]: Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), chapter 8,
    give the Newcombe square-and-add interval -0.0621 (-0.1186 to -0.0046) and the exact McNemar p = 0.052."""
    diff, lo, hi = newcombe_paired_interval(59, 6, 16, 80)
    assert diff == pytest.approx(-10 / 161)
    assert (round(diff, 4), round(lo, 4), round(hi, 4)) == (-0.0621, -0.1186, -0.0046)
    assert round(mcnemar_exact_p(6, 16), 3) == 0.052


def test_newcombe_paired_interval_by_hand():
    """Cells (both, only a, only b, neither) = (12, 5, 1, 12), n = 30: p_a = 17/30, p_b = 13/30, D = 4/30.
    Wilson 95% intervals: 17/30 -> [0.391973, 0.726225], 13/30 -> [0.273775, 0.608027] (mirror images), so
    p_a - l_a = u_b - p_b = 0.174694 and p_b - l_b = u_a - p_a = 0.159558.
    phi: A = 12 * 12 - 5 * 1 = 139 > n/2, corrected to 139 - 15 = 124, over sqrt(17 * 13 * 13 * 17) = 221:
    phi = 0.561086. Lower = D - 0.174694 sqrt(2 - 2 phi) = 0.133333 - 0.163675 = -0.030341;
    upper = D + 0.159558 sqrt(2 - 2 phi) = 0.133333 + 0.149494 = 0.282828."""
    (l_a, u_a), (l_b, u_b) = wilson_interval(17, 30), wilson_interval(13, 30)
    assert (l_a, u_a, l_b, u_b) == pytest.approx((0.391973, 0.726225, 0.273775, 0.608027), abs=1e-6)
    phi = 124 / 221
    lower = 4 / 30 - (17 / 30 - l_a) * math.sqrt(2 - 2 * phi)
    upper = 4 / 30 + (u_a - 17 / 30) * math.sqrt(2 - 2 * phi)
    diff, lo, hi = newcombe_paired_interval(12, 5, 1, 12)
    assert (diff, lo, hi) == pytest.approx((4 / 30, lower, upper), abs=1e-12)
    assert (lo, hi) == pytest.approx((-0.030341, 0.282828), abs=1e-6)
    # phi is 0 when A = both * neither - only_a * only_b lies in [0, n/2]: here A = 9 - 4 = 5 = n/2
    low, up = wilson_interval(5, 10)
    half = math.hypot(0.5 - low, up - 0.5)
    assert newcombe_paired_interval(3, 2, 2, 3) == pytest.approx((0.0, -half, half))


@pytest.mark.parametrize("cells", [(12, 5, 1, 12), (59, 6, 16, 80), (100, 0, 0, 0), (50, 0, 0, 50), (0, 0, 0, 30),
                                   (0, 30, 0, 0), (3, 0, 9, 1), (7, 2, 2, 7), (1, 1, 7, 12)])  # fmt: skip
def test_newcombe_paired_interval_properties(cells):
    both, only_a, only_b, neither = cells
    diff, lo, hi = newcombe_paired_interval(*cells)
    assert -1 <= lo <= diff <= hi <= 1
    assert diff == (only_a - only_b) / sum(cells)
    # swapping the arms mirrors the interval
    assert newcombe_paired_interval(both, only_b, only_a, neither) == pytest.approx((-diff, -hi, -lo), abs=1e-15)
    if only_a == only_b == 0:  # no pair disagrees: still an interval, where the normal one is [0, 0]
        assert diff == 0 and lo < -0.01 and hi > 0.01
        assert lo == pytest.approx(-hi)


def test_no_disagreement_does_not_collapse_and_the_normal_interval_did():
    a = b = torch.tensor([1] * 97 + [0] * 3)
    assert paired_difference(a, b) == (0.0, 0.0, 0.0)
    diff, lo, hi, p = paired_proportion_difference(a.tolist(), b.tolist())
    assert diff == 0 and p == 1.0
    # both rates 97/100: phi = (97 * 3 - 100 / 2) / (97 * 3) = 241 / 291, square-and-add of the Wilson arms
    low, up = wilson_interval(97, 100)
    phi = (97 * 3 - 50) / (97 * 3)
    half = math.sqrt((0.97 - low) ** 2 - 2 * phi * (0.97 - low) * (up - 0.97) + (up - 0.97) ** 2)
    assert (lo, hi) == pytest.approx((-half, half))
    assert hi > 0.02
    assert paired_counts([1, 1, 0, 0, 1], [1, 0, 1, 0, 0]) == (1, 2, 1, 1)
    with pytest.raises(ValueError, match="one pair per episode"):
        paired_counts([1, 0], [1])


def test_mcnemar_exact_p_is_the_binomial_tail_on_discordant_pairs():
    assert mcnemar_exact_p(6, 16) == 2 * sum(math.comb(22, k) for k in range(7)) / 2**22 == 220112 / 4194304
    assert mcnemar_exact_p(5, 1) == mcnemar_exact_p(1, 5) == 2 * (1 + 6) / 64
    assert mcnemar_exact_p(0, 5) == 2 / 32
    assert mcnemar_exact_p(0, 0) == mcnemar_exact_p(4, 4) == 1.0  # no evidence either way: never above 1
    assert mcnemar_exact_p(0, 1000) == 2.0**-999 > 0  # exact integers: no overflow of 2**m, no underflow
    assert 0 < mcnemar_exact_p(900, 1100) < 1e-5 and mcnemar_exact_p(1000, 1001) == 1.0
    with pytest.raises(ValueError, match=">= 0"):
        mcnemar_exact_p(-1, 3)


# ----------------------------------------------------------------------------------------------------------------
# the two-level bootstrap over training seeds and evaluation episodes


def _arm(rng: np.random.Generator, seeds: int, episodes: int, seed_rates, episode_effect) -> np.ndarray:
    q = np.asarray(seed_rates, dtype=float)[:, None] + episode_effect[None, :]
    return (rng.random((seeds, episodes)) < q).astype(int)


def test_bootstrap_is_seeded_and_reproducible():
    rng = np.random.default_rng(0)
    arms = {"a": rng.integers(0, 2, (3, 4, 50)), "base": rng.integers(0, 2, (1, 4, 50))}
    one, two = TwoLevelBootstrap(arms, resamples=300, seed=7), TwoLevelBootstrap(arms, resamples=300, seed=7)
    other = TwoLevelBootstrap(arms, resamples=300, seed=8)
    assert one.difference("a", "base") == two.difference("a", "base")
    assert np.array_equal(one.replicates["a"], two.replicates["a"])
    assert one.mean("a")[1:] != other.mean("a")[1:]
    assert one.mean("a")[0] == other.mean("a")[0] == arms["a"].mean()  # the estimate is the data's, not resampled


def test_bootstrap_replicates_are_means_over_resampled_seeds_and_episodes():
    """One replicate by hand: the contraction with resample counts equals indexing the resampled units."""
    x = np.random.default_rng(1).integers(0, 2, (3, 2, 10))
    boot = TwoLevelBootstrap({"a": x}, resamples=1, seed=3)
    rng = np.random.default_rng(3)  # the same draws, in the same order: episodes first, then the arm's seeds
    episodes = rng.multinomial(10, np.full(10, 0.1))
    seeds = rng.multinomial(3, np.full(3, 1 / 3))
    units = x[np.repeat(np.arange(3), seeds)][:, :, np.repeat(np.arange(10), episodes)]
    np.testing.assert_allclose(boot.replicates["a"][0], units.mean(axis=(0, 2)))


def test_bootstrap_intervals_stay_possible_and_cover_the_estimate():
    rng = np.random.default_rng(2)
    arms = {"a": np.ones((3, 2, 40)), "b": rng.integers(0, 2, (3, 2, 40)), "base": np.zeros((1, 2, 40))}
    arms["a"][0, 0, :2] = 0  # 99.2 % over seeds: a t interval over seeds would pass 100 %
    boot = TwoLevelBootstrap(arms, resamples=400, seed=0)
    for arm in arms:
        est, lo, hi = boot.mean(arm)
        assert 0 <= lo <= est <= hi <= 1
    est, lo, hi = boot.difference("a", "base")
    assert -1 <= lo <= est <= hi <= 1
    assert boot.mean("base") == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same episodes"):
        TwoLevelBootstrap({"a": np.ones((2, 1, 10)), "b": np.ones((1, 1, 12))})
    assert TwoLevelBootstrap({"a": np.ones((2, 1, 10)), "b": np.ones((1, 1, 12))}, paired=False).mean("b")[0] == 1
    with pytest.raises(ValueError, match=r"\[seeds, settings, episodes\]"):
        TwoLevelBootstrap({"a": np.ones(10)})


def test_gap_cut_is_the_share_of_the_base_gap_closed():
    # settings: clean, then two perturbed; the base's gap 1 - 0.25 = 0.75, the arm's 1 - 0.625 = 0.375: cut 50 %
    base = np.array([[[1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 0, 0]]])
    arm = np.array([[[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]] * 2)
    boot = TwoLevelBootstrap({"arm": arm, "base": base}, resamples=500, seed=0)
    est, lo, hi = boot.gap_cut("arm", "base", clean=0, perturbed=[1, 2])
    assert est == pytest.approx(0.5) and lo <= est <= hi
    no_gap = TwoLevelBootstrap({"arm": arm, "base": np.ones((1, 3, 4))}, resamples=50)
    assert math.isnan(no_gap.gap_cut("arm", "base", 0, [1, 2])[0])
    # a replicate where the statistic is undefined counts against both ends
    assert percentile_interval(np.array([math.nan] * 3 + list(range(97)))) == (-math.inf, math.inf)  # 3 % > 2.5 %
    assert percentile_interval(np.array([math.nan] + list(range(99)))) == (1.0, 97.0)  # 1 %: the next order stats
    assert percentile_interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))


def test_two_level_interval_is_wider_than_the_seeds_only_one_and_covers_the_truth():
    """A known truth: each training seed's success rate is uniform on [0.4, 0.8] (mean 0.6), each evaluation
    episode adds -0.15 or +0.15 (easy or hard initial states, shared by every seed and arm); the base, one fixed
    model, succeeds at 0.5 + the episode's effect. Truth: arm 0.6, difference +0.1. 8 seeds, 60 episodes, 300
    simulated studies: the two-level interval covers near 95 %, the one over seeds alone (episodes held fixed)
    misses the episodes' variation and covers less, with narrower intervals."""
    rng = np.random.default_rng(0)
    covered = {"two-level": 0, "seeds only": 0, "difference": 0}
    width = {"two-level": 0.0, "seeds only": 0.0}
    runs = 300
    for i in range(runs):
        effect = rng.choice([-0.15, 0.15], size=60)
        arms = {"arm": _arm(rng, 8, 60, rng.uniform(0.4, 0.8, 8), effect), "base": _arm(rng, 1, 60, [0.5], effect)}
        both = TwoLevelBootstrap(arms, resamples=400, seed=i)
        seeds_only = TwoLevelBootstrap(arms, resamples=400, seed=i, resample_episodes=False)
        for name, boot in (("two-level", both), ("seeds only", seeds_only)):
            _, lo, hi = boot.mean("arm")
            covered[name] += lo <= 0.6 <= hi
            width[name] += (hi - lo) / runs
        _, lo, hi = both.difference("arm", "base")
        covered["difference"] += lo <= 0.1 <= hi
    assert covered["two-level"] / runs >= 0.9 and covered["difference"] / runs >= 0.9, covered
    assert covered["seeds only"] < covered["two-level"], covered
    assert width["two-level"] > 1.15 * width["seeds only"], width
