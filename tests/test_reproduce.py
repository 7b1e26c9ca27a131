"""bench/reproduce_paper.py's pooling of per-seed reports, on hand-made reports with known answers."""

import math
import statistics

import pytest
from helpers import load_bench_script

from rvla_peft.stats import Z95, t975, wilson_interval


@pytest.fixture(scope="module")
def reproduce():
    return load_bench_script("reproduce_paper")


def report(successes: dict[str, dict[str, list[int]]]) -> dict:
    """The parts of an rvla_peft.eval report.json that the aggregation reads."""
    policies, settings = list(successes), list(next(iter(successes.values())))
    return {
        "policies": [{"name": p} for p in policies],
        "settings": [{"name": s} for s in settings],
        "results": [
            {"policy": p, "setting": s, "successes": x, "episodes": len(x)}
            for p, row in successes.items()
            for s, x in row.items()
        ],
    }


SEED0 = {
    "ppo": {"clean": [1, 1, 1, 0], "a": [0, 0, 1, 0], "b": [1, 0, 0, 0]},
    "robustvla": {"clean": [1, 1, 1, 1], "a": [1, 0, 1, 0], "b": [1, 1, 0, 0]},
}
SEED1 = {
    "ppo": {"clean": [1, 1, 0, 0], "a": [0, 0, 0, 0], "b": [0, 0, 0, 1]},
    "robustvla": {"clean": [1, 1, 0, 0], "a": [0, 1, 0, 0], "b": [0, 0, 0, 1]},
}


def test_pools_seeds_and_pairs_episodes(reproduce):
    summary = reproduce.aggregate([report(SEED0), report(SEED1)])
    cells, paired, mean = summary["cells"], summary["paired"], reproduce.MEAN
    assert summary["settings"] == ["clean", "a", "b"] and summary["variants"] == ["ppo", "robustvla"]

    assert cells["robustvla|clean"]["success_rate"] == 6 / 8
    assert cells["robustvla|clean"]["ci95"] == list(wilson_interval(6, 8))
    assert cells["robustvla|clean"]["per_seed"] == [1.0, 0.5]
    # mean perturbed: a and b pooled, 4 + 2 of 16 for robustvla, 2 + 1 of 16 for ppo
    assert cells[f"robustvla|{mean}"]["success_rate"] == 6 / 16 and cells[f"ppo|{mean}"]["success_rate"] == 3 / 16
    assert cells[f"robustvla|{mean}"]["per_seed"] == [4 / 8, 2 / 8] and cells[f"robustvla|{mean}"]["episodes"] == 16

    # per (seed, episode): the mean over a and b of robustvla - ppo
    units = [0.5, 0.5, 0, 0, 0, 0.5, 0, 0]
    d = paired[f"robustvla|{mean}"]
    half = Z95 * statistics.stdev(units) / math.sqrt(len(units))
    assert d["baseline"] == "ppo" and d["difference"] == pytest.approx(3 / 16)
    assert d["ci95"] == pytest.approx([3 / 16 - half, 3 / 16 + half])
    assert paired["robustvla|a"]["difference"] == pytest.approx(2 / 8)
    assert paired["ppo|clean"]["difference"] == 0.0 and paired["ppo|clean"]["ci95"] == [0.0, 0.0]
    # over training seeds: each seed's mean difference, then a Student-t interval over the two seeds
    assert paired[f"robustvla|{mean}"]["per_seed"] == pytest.approx([2 / 8, 1 / 8])
    half = t975(1) * statistics.stdev([2 / 8, 1 / 8]) / math.sqrt(2)
    assert paired[f"robustvla|{mean}"]["t95"] == pytest.approx([3 / 16 - half, 3 / 16 + half])
    half = t975(1) * statistics.stdev([1, 0.5]) / math.sqrt(2)
    assert cells["robustvla|clean"]["t95"] == pytest.approx([0.75 - half, 0.75 + half])


def test_markdown_and_plot(reproduce, tmp_path):
    summary = reproduce.aggregate([report(SEED0), report(SEED1)])
    table = reproduce.markdown(summary, None)
    assert "| mean perturbed | **18.8 [" in table and "| mean perturbed | +18.8 [" in table
    assert "Over training seeds" in table and "| mean perturbed | 25/12: 18.8 [" in table
    reproduce.plot(summary, tmp_path / "summary.png")
    assert (tmp_path / "summary.png").stat().st_size > 1000
