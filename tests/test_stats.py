"""Seed-level statistics against closed forms."""

import math

import pytest

from rvla_peft.stats import Z95, t975, t_interval


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
