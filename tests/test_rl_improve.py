"""bench/rl_improve.py: its seed-level summary on hand-made reports with known answers, and which runs it retrains."""

import argparse
import json
import statistics
from pathlib import Path

import pytest
from helpers import load_bench_script

from rvla_peft.stats import t975


@pytest.fixture(scope="module")
def study():
    return load_bench_script("rl_improve")


def report(cells: dict[str, list[int]]) -> dict:
    """The part of an rvla_peft.eval report.json that the study reads."""
    return {"results": [{"setting": s, "successes": x} for s, x in cells.items()]}


def test_summary_per_seed_rates_and_paired_differences_over_seeds(study):
    base = report({"clean": [1, 1, 1, 1], "shift@0.5": [0, 1, 0, 0]})
    seeds = {
        0: report({"clean": [1, 1, 1, 1], "shift@0.5": [1, 1, 0, 0]}),
        1: report({"clean": [1, 1, 1, 0], "shift@0.5": [1, 1, 1, 0]}),
        2: report({"clean": [1, 1, 1, 1], "shift@0.5": [0, 1, 0, 0]}),
    }
    summary = study.summarize(base, {"arm": seeds}, ["clean", "shift@0.5"])
    assert summary["base"] == {"clean": 1.0, "shift@0.5": 0.25}
    cell = summary["arms"]["arm"]["shift@0.5"]
    rates, diffs = [0.5, 0.75, 0.25], [0.25, 0.5, 0.0]
    assert cell["per_seed"] == dict(zip(seeds, rates, strict=True))
    half = t975(2) * statistics.stdev(diffs) / 3**0.5
    assert cell["paired_diff_vs_base"] == pytest.approx(0.25)
    assert cell["paired_diff_t95_over_seeds"] == pytest.approx([0.25 - half, 0.25 + half])
    assert cell["seeds_above_base"] == 2  # a seed equal to the base is not above it
    assert cell["pooled_episodes"] == 12
    assert summary["arms"]["arm"]["clean"]["paired_diff_vs_base"] == pytest.approx(-1 / 12)


def test_a_run_with_a_report_is_not_retrained_and_the_others_train_under_the_setting(study, tmp_path, monkeypatch):
    launched = []

    def train_in_a_second(cmd, log):  # stands in for minutes of training; the trainer makes its output_dir
        launched.append(cmd)
        (out,) = [a.removeprefix("output_dir=") for a in cmd if a.startswith("output_dir=")]
        Path(out).mkdir(parents=True)
        return 1.0

    monkeypatch.setattr(study, "run", train_in_a_second)
    args = argparse.Namespace(out=tmp_path, recipe=Path("recipes/tiny_cpu.yaml"), setting="shift@0.5", overrides=[])
    evaluated = tmp_path / "eval-arm-seed0" / "report.json"  # results keep reports, not adapters
    evaluated.parent.mkdir()
    evaluated.write_text(json.dumps(report({"clean": [1]})))

    assert study.train(args, "arm", ["total_updates=60"], 0) == tmp_path / "arm-seed0" / "adapter"
    assert launched == []
    study.train(args, "arm", ["total_updates=60"], 1)
    (cmd,) = launched
    assert "seed=1" in cmd and "perturb.train=[{name: shift, severity: 0.5}]" in cmd
    assert cmd[-1] == "total_updates=60"
    assert (tmp_path / "arm-seed1" / "train_seconds.txt").read_text() == "1.0\n"


def test_versus_pairs_two_arms_on_the_seeds_both_have(study):
    arm = {0: report({"shift@0.5": [1, 1, 0, 0]}), 1: report({"shift@0.5": [1, 1, 1, 0]})}
    reference = {k: report({"shift@0.5": [1, 0, 0, 0]}) for k in (0, 1, 2)}
    out = study.versus({"arm": arm, "ref": reference}, "ref", ["shift@0.5"])
    assert list(out) == ["arm"]
    cell = out["arm"]["shift@0.5"]
    assert cell["seeds"] == [0, 1] and cell["per_seed"] == [0.25, 0.5]
    half = t975(1) * statistics.stdev([0.25, 0.5]) / 2**0.5
    assert cell["mean"] == pytest.approx(0.375)
    assert 0.375 + half > 1 and cell["t95_over_seeds"] == [-1.0, 1.0]  # clipped to what a difference can be
