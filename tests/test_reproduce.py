"""bench/reproduce_paper.py's pooling of per-seed reports, on hand-made reports with known answers."""

import argparse
import json
import math
import statistics
from pathlib import Path

import pytest
from helpers import load_bench_script

from rvla_peft.stats import TwoLevelBootstrap, t975, t_interval, wilson_interval


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
    assert cells["robustvla|clean"]["wilson95"] == list(wilson_interval(6, 8))
    assert cells["robustvla|clean"]["per_seed"] == [1.0, 0.5]
    # the two-level bootstrap: [seeds, settings, episodes] per variant, episodes drawn jointly for both variants
    order = ["clean", "a", "b"]
    boot = TwoLevelBootstrap(
        {v: [[seed[v][s] for s in order] for seed in (SEED0, SEED1)] for v in ("ppo", "robustvla")}, resamples=2000
    )
    assert [cells["robustvla|clean"]["success_rate"], *cells["robustvla|clean"]["ci95"]] == list(
        boot.mean("robustvla", [0])
    )
    # mean perturbed: a and b pooled, 4 + 2 of 16 for robustvla, 2 + 1 of 16 for ppo
    assert cells[f"robustvla|{mean}"]["success_rate"] == 6 / 16 and cells[f"ppo|{mean}"]["success_rate"] == 3 / 16
    assert cells[f"robustvla|{mean}"]["per_seed"] == [4 / 8, 2 / 8] and cells[f"robustvla|{mean}"]["episodes"] == 16

    d = paired[f"robustvla|{mean}"]
    assert d["baseline"] == "ppo" and d["difference"] == pytest.approx(3 / 16)
    assert d["ci95"] == list(boot.difference("robustvla", "ppo", [1, 2])[1:])
    assert -1 <= d["ci95"][0] < 3 / 16 < d["ci95"][1] <= 1
    assert paired["robustvla|a"]["difference"] == pytest.approx(2 / 8)
    assert paired["ppo|clean"]["difference"] == 0.0 and paired["ppo|clean"]["ci95"] == [0.0, 0.0]
    # over training seeds: each seed's mean difference, then a Student-t interval over the two seeds
    assert paired[f"robustvla|{mean}"]["per_seed"] == pytest.approx([2 / 8, 1 / 8])
    half = t975(1) * statistics.stdev([2 / 8, 1 / 8]) / math.sqrt(2)
    assert paired[f"robustvla|{mean}"]["t95"] == pytest.approx([3 / 16 - half, 3 / 16 + half])
    half = t975(1) * statistics.stdev([1, 0.5]) / math.sqrt(2)
    assert 0.75 + half > 1 and cells["robustvla|clean"]["t95"] == [0.0, 1.0]  # clipped to what is possible
    assert summary["against_base"] == {} and summary["gap_cut"] == {}  # no base among the variants


def test_a_base_shared_by_every_seed_counts_its_episodes_once(reproduce):
    """The base is evaluated once and its report joins every seed's: 99 of its 100 episodes succeed, so its
    interval is Wilson's for 99/100, [94.6, 99.8] %, not the [97.1, 99.7] % of 297/300 from three copies."""
    base = {"clean": [1] * 99 + [0], "a": [1] * 50 + [0] * 50}
    seeds = [{"base": base, "ppo": {"clean": [1] * 95 + [0] * 5, "a": [1] * 60 + [0] * 40}} for _ in range(3)]
    summary = reproduce.aggregate([report(s) for s in seeds])
    cell = summary["cells"]["base|clean"]
    assert cell["episodes"] == 100 and cell["per_seed"] == [0.99] and cell["t95"] is None
    assert cell["wilson95"] == list(wilson_interval(99, 100)) == pytest.approx([0.945514, 0.998233], abs=1e-6)
    assert "| clean | 99.0 [" in reproduce.markdown(summary, None)
    # its interval is the Wilson interval of its one evaluation; differences with it resample its 100 episodes once
    assert cell["ci95"] == cell["wilson95"]
    arms = {"base": [[base["clean"], base["a"]]], "ppo": [[s["ppo"]["clean"], s["ppo"]["a"]] for s in seeds]}
    boot = TwoLevelBootstrap(arms, resamples=2000)
    assert cell["success_rate"] == boot.mean("base", [0])[0] == 0.99
    d = summary["paired"]["base|clean"]
    assert [d["difference"], *d["ci95"]] == list(boot.difference("base", "ppo", [0]))
    assert summary["cells"]["ppo|clean"]["episodes"] == 300
    with pytest.raises(SystemExit, match="not one shared evaluation"):
        reproduce.aggregate([report(seeds[0]), report({"base": {**base, "a": [0] * 100}, "ppo": seeds[0]["ppo"]})])


def test_markdown_and_plot(reproduce, tmp_path):
    summary = reproduce.aggregate([report(SEED0), report(SEED1)])
    table = reproduce.markdown(summary, None)
    assert "| mean perturbed | **18.8 [" in table and "| mean perturbed | +18.8 [" in table
    assert "Over training seeds" in table and "| mean perturbed | 25/12: 18.8 [" in table
    reproduce.plot(summary, tmp_path / "summary.png")
    assert (tmp_path / "summary.png").stat().st_size > 1000


def test_the_committed_invariance_study_with_intervals_over_seeds_and_episodes(reproduce):
    """bench/results/paper_inv120 (the base once, the invariance arm at 3 training seeds, 100 episodes per cell):
    the interval over seeds alone, +10.4 [+9, +12], widens to [+7.9, +13.1] once the episodes are resampled too,
    the gap cut is 21.7% [15.2, 28.3], and the base's clean 99/100 keeps its Wilson [94.6, 99.8]."""
    out = Path(__file__).resolve().parent.parent / "bench" / "results" / "paper_inv120"
    base = json.loads((out / "report-base" / "report.json").read_text())
    arm = [json.loads((out / f"report-invariance-seed{s}" / "report.json").read_text()) for s in range(3)]
    summary = reproduce.aggregate([reproduce.seed_report(base, [a]) for a in arm])
    mean = reproduce.MEAN
    d = summary["against_base"][f"invariance|{mean}"]
    assert [round(100 * x, 1) for x in (d["difference"], *d["ci95"])] == [10.4, 7.9, 13.1]
    t = t_interval([x - 0.5077777777777778 for x in summary["cells"][f"invariance|{mean}"]["per_seed"]])
    assert [round(100 * x) for x in t] == [10, 9, 12]  # the seeds-only interval it replaces
    cut = summary["gap_cut"]["invariance"]
    assert [round(100 * x, 1) for x in (cut["value"], *cut["ci95"])] == [21.7, 15.2, 28.3]
    clean = summary["cells"]["base|clean"]
    assert clean["episodes"] == 100 and [round(100 * x, 1) for x in clean["ci95"]] == [94.6, 99.8]
    clean = summary["cells"]["invariance|clean"]
    assert t_interval(clean["per_seed"])[2] > 1 and clean["t95"][1] == 1.0  # clipped to what is possible


def test_targets_are_checked_over_training_seeds_against_the_base_and_ppo(reproduce):
    base = {"clean": [1, 1, 1, 1], "a": [0, 0, 0, 0], "b": [1, 0, 0, 0]}  # mean perturbed 1/8, gap 7/8
    strong = {"clean": [1, 1, 1, 1], "a": [1, 1, 1, 0], "b": [1, 1, 0, 1]}  # mean perturbed 6/8 on both seeds
    seeds = [{"base": base, **seed, "strong": strong} for seed in (SEED0, SEED1)]
    summary = reproduce.aggregate([report(s) for s in seeds])
    short = {
        "mean perturbed minus base": "base",
        "mean perturbed minus ppo": "ppo",
        "robustness gap": "gap",
        "clean": "clean",
    }
    rows = {}
    for r in reproduce.targets(summary):
        rows[r["arm"], next(v for k, v in short.items() if r["target"].startswith(k))] = r
    assert {arm for arm, _ in rows} == {"ppo", "robustvla", "strong"}

    # robustvla: 4/8 and 2/8 perturbed, so +3/8 and +1/8 over the base (its one evaluation): mean +1/4, with the
    # two-level bootstrap interval of aggregate()
    r = rows["robustvla", "base"]
    assert (
        r["value"] == pytest.approx(1 / 4)
        and r["ci95"] == summary["against_base"][f"robustvla|{reproduce.MEAN}"]["ci95"]
    )
    assert (
        r["ci95"][0] < 0 and not r["met"]
    )  # +25 points, but over 2 seeds and 4 episodes the interval reaches below 0
    assert rows["strong", "base"]["value"] == pytest.approx(5 / 8) and rows["strong", "base"]["met"]
    assert rows["strong", "base"]["ci95"][0] > 0
    # against ppo: the paired difference of aggregate(), interval above 0 or not
    assert rows["robustvla", "ppo"]["value"] == pytest.approx(3 / 16)
    assert rows["robustvla", "ppo"]["ci95"] == summary["paired"][f"robustvla|{reproduce.MEAN}"]["ci95"]
    assert rows["robustvla", "ppo"]["met"] is False
    # the gap: base 1 - 1/8; robustvla (clean 1 and 1/2 over the seeds) 3/4 - 3/8, cut 1 - (3/8) / (7/8) = 4/7
    assert rows["robustvla", "gap"]["value"] == pytest.approx(4 / 7) and rows["robustvla", "gap"]["met"]
    lo, hi = rows["robustvla", "gap"]["ci95"]
    assert lo < 4 / 7 < hi
    assert rows["strong", "gap"]["value"] == pytest.approx(1 - (1 / 4) / (7 / 8))
    # clean: ppo 0.75 and 0.5 over the seeds, below 95%; strong 100%
    assert rows["ppo", "clean"]["value"] == 0.625 and not rows["ppo", "clean"]["met"]
    assert rows["strong", "clean"]["met"]
    assert ("ppo", "base") not in rows  # plain RL is the comparison, not an arm with penalties
    table = reproduce.targets_markdown(reproduce.targets(summary))
    assert (
        f"| robustvla | robustness gap cut >= 30% against the base | 57.1% [{100 * lo:.1f}, {100 * hi:.1f}] | yes |"
        in table
    )
    assert "| ppo | clean >= 95% | 62.5% | no |" in table


def test_finished_runs_are_kept_and_each_report_names_its_arm(reproduce, tmp_path, monkeypatch):
    launched = []

    def run_in_a_moment(cmd, log):  # stands in for minutes of training or evaluation: writes what they would
        launched.append(cmd)
        if "rvla_peft.train" in cmd:
            (out,) = [a.removeprefix("output_dir=") for a in cmd if a.startswith("output_dir=")]
            (Path(out) / "adapter").mkdir(parents=True)
            (Path(out) / "adapter" / "adapter_model.safetensors").write_bytes(b"")
        else:
            out = Path(cmd[cmd.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "report.json").write_text(json.dumps(report({"x": {"clean": [1]}})))

    monkeypatch.setattr(reproduce, "run", run_in_a_moment)
    args = argparse.Namespace(out=tmp_path, recipe=Path("recipes/tiny_cpu.yaml"), total_updates=4, overrides=[],
                              eval_num_envs=None, eval_override=[], suite="paper", episodes=10, eval_seed=0,
                              save_every=0)  # fmt: skip
    finished = tmp_path / "robustvla_c-seed1" / "adapter" / "adapter_model.safetensors"
    finished.parent.mkdir(parents=True)
    finished.write_bytes(b"")

    assert reproduce.train(args, "robustvla_c", 1) == finished.parent
    assert launched == []
    adapter = reproduce.train(args, "robustvla_c", 2)
    (cmd,) = launched
    assert "seed=2" in cmd and "perturb.curriculum.ramp_updates=2" in cmd
    reproduce.evaluate(args, "robustvla_c-seed2", adapter, label="robustvla_c")
    assert launched[-1][launched[-1].index("--no-base") + 1] == f"--adapter=robustvla_c={adapter}"
    reproduce.evaluate(args, "robustvla_c-seed2", adapter, label="robustvla_c")
    reproduce.evaluate(args, "base")
    assert len(launched) == 3 and "--adapter" not in " ".join(launched[-1])


def test_an_interrupted_run_resumes_from_its_checkpoint_on_its_starting_commit(reproduce, tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(reproduce, "run", lambda cmd, log: launched.append((cmd, log)))
    monkeypatch.setattr(reproduce, "code_commit", lambda: "abc123")
    args = argparse.Namespace(out=tmp_path, recipe=Path("recipes/tiny_cpu.yaml"), total_updates=120, overrides=[],
                              eval_num_envs=None, eval_override=[], suite="paper", episodes=100, eval_seed=100000,
                              save_every=10)  # fmt: skip
    reproduce.train(args, "invariance_adv", 3)
    cmd, log = launched[-1]
    assert "overwrite_output_dir=true" in cmd and "save_every=10" in cmd and "perturb.sampler=adversarial" in cmd
    assert (tmp_path / "invariance_adv-seed3" / "COMMIT").read_text() == "abc123\n"
    (tmp_path / "invariance_adv-seed3" / "checkpoints" / "update-000040").mkdir(parents=True)
    reproduce.train(args, "invariance_adv", 3)
    cmd, log = launched[-1]
    assert "resume_from_checkpoint=latest" in cmd and "overwrite_output_dir=true" not in cmd
    assert log.name == "invariance_adv-seed3.resumed.log"
    monkeypatch.setattr(reproduce, "code_commit", lambda: "def456")
    with pytest.raises(SystemExit, match="started at commit abc123, this code is def456"):
        reproduce.train(args, "invariance_adv", 3)
    with pytest.raises(FileNotFoundError):  # the stand-in for the evaluation writes no report
        reproduce.evaluate(args, "base")
    cmd, _ = launched[-1]
    assert cmd[cmd.index("--seed") + 1] == "100000"

    monkeypatch.setattr(reproduce, "code_commit", lambda: "abc123")
    # a run stopped by a signal leaves an adapter marked interrupted: not finished, it resumes
    adapter = tmp_path / "invariance_adv-seed3" / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    (adapter / "trainer_state.json").write_text(json.dumps({"update": 39, "total_updates": 120, "interrupted": True}))
    launched.clear()
    reproduce.train(args, "invariance_adv", 3)
    assert "resume_from_checkpoint=latest" in launched[-1][0]
    (adapter / "trainer_state.json").write_text(json.dumps({"update": 120, "interrupted": False}))
    assert reproduce.train(args, "invariance_adv", 3) == adapter and len(launched) == 1


def test_the_study_targets_compare_every_arm_with_equal_budget_ppo(reproduce):
    base = {"clean": [1, 1, 1, 1], "shift": [0, 0, 0, 0], "action_noise@1": [1, 1, 1, 0]}
    ppo = {"clean": [1, 1, 1, 1], "shift": [0, 0, 1, 0], "action_noise@1": [1, 1, 1, 0]}
    strong = {"clean": [1, 1, 1, 1], "shift": [1, 1, 1, 0], "action_noise@1": [1, 1, 1, 1]}
    weak = {"clean": [1, 1, 1, 0], "shift": [0, 0, 1, 0], "action_noise@1": [0, 0, 0, 0]}
    seeds = [{"base": base, "ppo_klclean": ppo, "strong": strong, "weak": weak}] * 2
    summary = reproduce.aggregate([report(s) for s in seeds], baseline="ppo_klclean")
    assert summary["paired"]["strong|shift"]["baseline"] == "ppo_klclean"
    rows = {(r["arm"], r["target"].split(" ")[0]): r for r in reproduce.study_targets(summary)}
    # strong: mean perturbed 7/8 against ppo's 4/8: +3/8, every resample above 0
    assert rows["strong", "mean"]["value"] == pytest.approx(3 / 8) and rows["strong", "mean"]["met"]
    assert (
        rows["strong", "robustness"]["value"] == pytest.approx(4 / 5)  # base gap 5/8, strong 1/8
        and rows["strong", "robustness"]["met"]
    )
    assert rows["strong", "action_noise@1"]["met"] and rows["strong", "clean"]["met"]
    # weak: no gain over ppo, clean 3/4, and 3 of 4 action-noise episodes lost against the base
    assert not rows["weak", "mean"]["met"] and not rows["weak", "clean"]["met"]
    assert (
        rows["weak", "action_noise@1"]["value"] == pytest.approx(-3 / 4) and not rows["weak", "action_noise@1"]["met"]
    )
    assert ("ppo_klclean", "mean") not in rows and rows["ppo_klclean", "clean"]["met"]
    table = reproduce.targets_markdown(reproduce.study_targets(summary))
    lo, hi = (100 * x for x in rows["strong", "mean"]["ci95"])
    row = f"| strong | mean perturbed minus ppo_klclean >= +8, interval above 0 | +37.5 [{lo:+.1f}, {hi:+.1f}] | yes |"
    assert row in table
    assert "| weak | clean >= 97% | 75.0% | no |" in table and "| weak | action_noise@1 not below" in table


def test_an_arm_with_fewer_seeds_is_pooled_over_its_own_seeds(reproduce):
    """--arm-seeds: robustvla runs seed 0 only, ppo seeds 0 and 1. Its cells pool its one seed, its paired
    per-seed differences use the seeds both ran, and the bootstrap draws each arm's own seeds."""
    summary = reproduce.aggregate([report(SEED0), report({"ppo": SEED1["ppo"]})])
    cells, paired = summary["cells"], summary["paired"]
    assert summary["variants"] == ["ppo", "robustvla"]
    assert cells["robustvla|clean"]["per_seed"] == [1.0] and cells["robustvla|clean"]["episodes"] == 4
    assert cells["ppo|clean"]["per_seed"] == [0.75, 0.5] and cells["ppo|clean"]["episodes"] == 8
    # seed 0 alone: robustvla a 2/4 against ppo 1/4, b 2/4 against 1/4
    assert paired[f"robustvla|{reproduce.MEAN}"]["per_seed"] == [0.25]
    order = ["clean", "a", "b"]
    boot = TwoLevelBootstrap(
        {
            "ppo": [[s["ppo"][x] for x in order] for s in (SEED0, SEED1)],
            "robustvla": [[SEED0["robustvla"][x] for x in order]],
        },
        resamples=2000,
    )
    d = paired[f"robustvla|{reproduce.MEAN}"]
    assert [d["difference"], *d["ci95"]] == list(boot.difference("robustvla", "ppo", [1, 2]))


def test_arm_seeds_must_name_an_arm_and_a_subset_of_the_seeds(reproduce):
    assert reproduce.parse_arm_seeds(["b=0,2"], ["a", "b"], [0, 1, 2]) == {"a": [0, 1, 2], "b": [0, 2]}
    errors = [("c=0", "not among --variants"), ("b=0,x", "integer seeds"), ("b=", "integer seeds"),
              ("b=3", "subset of --seeds")]  # fmt: skip
    for spec, message in errors:
        with pytest.raises(SystemExit, match=message):
            reproduce.parse_arm_seeds([spec], ["a", "b"], [0, 1, 2])
