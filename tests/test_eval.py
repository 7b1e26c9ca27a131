"""The robustness report: its statistics, common random numbers on real envs, and the CLI end to end."""

import json
import math

import pytest
import torch
from helpers import Recording

from rvla_peft import eval as rvla_eval
from rvla_peft.config import PerturbationSpec
from rvla_peft.envs import PerturbedEnv, make_envs
from rvla_peft.envs.maniskill import VecEnv
from rvla_peft.evaluation import CellResult, evaluate_grid, interval_methods, summarize
from rvla_peft.perturbations import CLEAN, Setting, Spec, suite_grid
from rvla_peft.policies.base import ActionSample
from rvla_peft.report import render_markdown
from rvla_peft.rollout import run_episodes
from rvla_peft.stats import (
    TwoLevelBootstrap,
    mcnemar_exact_p,
    newcombe_paired_interval,
    paired_difference,
    t975,
    wilson_interval,
)

# ----------------------------------------------------------------------------------------------------------------
# statistics


def test_wilson_interval_matches_the_closed_form():
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.277533, abs=1e-6)
    lo, hi = wilson_interval(10, 10)
    assert (lo, hi) == pytest.approx((0.722467, 1.0), abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for n in range(1, 200):  # the rate always lies inside its interval, float rounding included
        assert wilson_interval(n, n)[1] == 1.0 and wilson_interval(0, n)[0] == 0.0


def test_paired_difference_uses_the_per_episode_differences():
    a, b = torch.tensor([1, 1, 0, 1]), torch.tensor([0, 1, 0, 0])
    mean, lo, hi = paired_difference(a, b)
    half = 1.959963984540054 * math.sqrt(1 / 3) / 2  # sample std of [1, 0, 0, 1] is sqrt(1/3)
    assert (mean, lo, hi) == pytest.approx((0.5, 0.5 - half, 0.5 + half))


def test_summary_gaps_and_paired_differences():
    settings = [
        Setting("clean", "clean", 0.0),
        Setting("rotation@0.5", "rotation", 0.5),
        Setting("rotation@1", "rotation", 1.0),
        Setting("action_noise@1", "action_noise", 1.0),
    ]
    outcomes = {
        ("base", "clean"): [1, 1, 1, 0],
        ("base", "rotation@0.5"): [1, 0, 0, 0],
        ("base", "rotation@1"): [0, 0, 0, 0],
        ("base", "action_noise@1"): [1, 1, 0, 0],
        ("robust", "clean"): [1, 1, 1, 1],
        ("robust", "rotation@0.5"): [1, 1, 0, 0],
        ("robust", "rotation@1"): [1, 0, 0, 0],
        ("robust", "action_noise@1"): [1, 1, 1, 0],
    }
    results = [CellResult(p, s, [bool(x) for x in v], [float(x) for x in v]) for (p, s), v in outcomes.items()]
    summary, paired = summarize(results, settings, baseline="base")
    base = summary["base"]
    assert base["clean_success_rate"] == 0.75
    assert base["mean_perturbed_success_rate"] == pytest.approx((0.25 + 0 + 0.5) / 3)
    assert base["robustness_gap"] == pytest.approx(0.75 - 0.25)
    assert base["gap_by_perturbation"] == pytest.approx({"rotation": 0.75 - 0.125, "action_noise": 0.25})
    assert summary["robust"]["robustness_gap"] == pytest.approx(1 - 0.5)
    assert [d["setting"] for d in paired] == [s.name for s in settings]
    assert all(d["policy"] == "robust" and d["baseline"] == "base" for d in paired)
    assert [d["difference"] for d in paired] == pytest.approx([0.25, 0.25, 0.25, 0.25])
    # Newcombe's interval from each setting's paired table (both, only robust, only base, neither)
    tables = [(3, 1, 0, 0), (1, 1, 0, 2), (0, 1, 0, 3), (2, 1, 0, 1)]
    assert [d["ci95"] for d in paired] == [list(newcombe_paired_interval(*t)[1:]) for t in tables]
    assert [d["p_mcnemar"] for d in paired] == [mcnemar_exact_p(1, 0)] * 4 == [1.0] * 4
    assert all(-1 <= d["ci95"][0] < d["difference"] < d["ci95"][1] <= 1 for d in paired)
    report = {
        "task": "PickCube-v1",
        "suite": "test",
        "episodes": 4,
        "seed": 0,
        "deterministic": True,
        "policies": [{"name": "base"}, {"name": "robust"}],
        "settings": [{"name": s.name} for s in settings],
        "results": [r.as_dict() for r in results],
        "summary": summary,
        "paired": paired,
        "command": "python -m rvla_peft.eval ...",
    }
    table = render_markdown(report)
    assert "| rotation@0.5 | 25.0 [4.6, 69.9] | 50.0 [15.0, 85.0] |" in table
    assert "| base | 75.0 | 25.0 | 50.0 |" in table
    lo, hi = newcombe_paired_interval(*tables[0])[1:]
    assert f"| robust - base | clean | 25.0 [{100 * lo:.1f}, {100 * hi:.1f}] | 1 |" in table
    # every interval's method named once, in a footnote; a report without the record names the older methods
    assert "[2] normal approximation of the per-episode differences" in table
    report["intervals"] = interval_methods(4)
    table = render_markdown(report)
    assert table.count("Wilson score interval") == 1 and table.count("Newcombe") == 1
    assert "[1] Wilson score interval over the cell's 4 episodes." in table
    assert (
        "[2] Newcombe's score interval for paired proportions (method 10), over the 4 episode pairs; p: exact "
        in table
    )


def test_grid_validates_settings_before_any_work():
    grid = suite_grid("quick", ["rotation@0.5+action_noise@0.1", "action_noise@1"])
    assert [s.name for s in grid[:1]] == ["clean"] and grid[0].specs == []
    combo, noise = grid[-2], grid[-1]
    assert combo.name == "rotation@0.5+action_noise@0.1" and combo.perturbation == "rotation+action_noise"
    assert combo.specs == [Spec("rotation", 0.5), Spec("action_noise", 0.1)] and combo.severity == 0.1
    assert (noise.name, noise.perturbation, noise.severity) == ("action_noise@1", "action_noise", 1.0)
    with pytest.raises(ValueError, match="did you mean 'action_noise'"):
        suite_grid(None, ["action_nois@0.5"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        suite_grid(None, ["action_noise@1.5"])
    with pytest.raises(ValueError, match="NAME@SEVERITY"):
        suite_grid(None, ["action_noise"])
    assert [s.name for s in suite_grid(None, ["action_noise@1", "action_noise@1.0", "pixel_noise@1"])] == [
        "clean", "action_noise@1", "pixel_noise@1"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown perturbation suite 'papr'; did you mean 'paper'"):
        suite_grid("papr")


# ----------------------------------------------------------------------------------------------------------------
# common random numbers on real envs


class ConstantPolicy:
    """Always the same action; remembers every observation it was shown."""

    device = torch.device("cpu")

    def __init__(self, value: float, action_dim: int = 7):
        self.value, self.action_dim, self.seen = value, action_dim, []

    def act(self, obs, deterministic=True):
        self.seen.append(obs["rgb"].clone())
        n = obs["rgb"].shape[0]
        action = torch.full((n, self.action_dim), self.value)
        zeros = torch.zeros(n)
        return ActionSample(action=action, env_action=action, log_prob=zeros, value=zeros, mean=action)


@pytest.fixture
def env_cfg(tiny_cfg):
    tiny_cfg.env.max_episode_steps = 5
    tiny_cfg.env.image_size = 32
    return tiny_cfg.env


def test_episode_seeds_do_not_depend_on_the_number_of_envs(env_cfg):
    """Episode e starts from seed + e: 1 env or 2 in parallel play the same 3 episodes."""
    returns = []
    for num_envs in (1, 2):
        env_cfg.num_envs = num_envs
        with make_envs(env_cfg) as env:
            out = run_episodes(ConstantPolicy(0.3), env, episodes=3, seed=11, max_steps=5)
        assert out.success.shape == (3,) and out.lengths.tolist() == [5, 5, 5]
        returns.append(out.returns)
    assert torch.equal(returns[0], returns[1])
    assert len(set(returns[0].tolist())) == 3  # three different initial states


def test_two_policies_see_the_same_perturbation_draws(env_cfg):
    specs = [PerturbationSpec("pixel_noise", 0.5), PerturbationSpec("action_noise", 0.5)]
    setting = Setting("noise", "noise", 0.5, specs)
    with make_envs(env_cfg) as real:
        env = Recording(real)
        a, b = ConstantPolicy(0.0), ConstantPolicy(0.1)
        evaluate_grid({"a": a}, env, [setting], episodes=2, seed=3, max_steps=5)
        noise_a = [x - 0.0 for x in env.actions]
        env.actions.clear()
        evaluate_grid({"b": b}, env, [setting], episodes=2, seed=3, max_steps=5)
        noise_b = [x - 0.1 for x in env.actions]
    assert torch.equal(a.seen[0], b.seen[0])  # same initial state, same pixel noise
    assert not torch.equal(a.seen[0], a.seen[1])  # and fresh noise at the next step
    assert len(noise_a) == len(noise_b) == 5
    for x, y in zip(noise_a, noise_b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)  # identical draws (clamping at +-1 is out of reach)
    assert 0.05 < torch.stack(noise_a).std().item() < 0.3  # it is noise: std 0.15


class SeededEpisodes(VecEnv):
    """A VecEnv without physics: the episode from reset seed s lasts 3 + s % 5 steps; its frame shows s, its reward
    is the executed action's sum (so it carries the action noise), and it succeeds if its return is above 0.
    Auto-reset episodes take seeds 1000, 1001, ...; ``steps`` counts env-steps taken (idle ones too)."""

    def __init__(self, num_envs: int) -> None:
        super().__init__(num_envs, torch.device("cpu"), 7, ["task"] * num_envs)
        self.steps, self._auto = 0, 1000

    def _obs(self) -> dict[str, torch.Tensor]:
        rgb = (self.seed % 200).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 8, 8, 3).clone()
        return {"rgb": rgb, "state": torch.stack([self.seed, self.t], 1).float()}

    def _reset(self, seed: int | None) -> dict[str, torch.Tensor]:
        self.seed, self.t = torch.arange(seed, seed + self.num_envs), torch.zeros(self.num_envs, dtype=torch.long)
        self._return = torch.zeros(self.num_envs)
        return self._obs()

    def _reset_envs(self, mask: torch.Tensor, seeds: list[int]) -> dict[str, torch.Tensor]:
        self.seed = torch.where(mask, torch.tensor(seeds), self.seed)
        self.t, self._return = self.t.masked_fill(mask, 0), self._return.masked_fill(mask, 0)
        return self._obs()

    def _step(self, action: torch.Tensor):
        self.steps += self.num_envs
        reward = action.sum(1)
        self.t, self._return = self.t + 1, self._return + reward
        done = self.t >= 3 + self.seed % 5
        success = done & (self._return > 0)
        final = self._obs() if bool(done.any()) else None
        for i in done.nonzero().flatten().tolist():  # same-step auto-reset
            self.seed[i], self._auto = self._auto, self._auto + 1
        self.t, self._return = self.t.masked_fill(done, 0), self._return.masked_fill(done, 0)
        return self._obs(), reward, success, done & ~success, final, success


def test_the_stream_schedule_plays_each_episode_as_alone_at_any_number_of_envs():
    """schedule="stream": an env starts the next episode the moment it finishes one, and each episode's draws follow
    its reset seed. Episodes of different lengths under action noise (per step) and a shift (per episode: it draws
    too, so it would misalign the action noise if the draws did): 2 and 3 envs give exactly the outcomes of the
    batch schedule with 1 env, and with 3 envs no env idles until the last episodes."""
    from rvla_peft.rollout import ScheduleError

    specs = [Spec("action_noise", 1.0), Spec("shift", 0.5)]
    outcomes, steps = {}, {}
    for label, n, schedule in [("alone", 1, "batch"), (2, 2, "stream"), (3, 3, "stream"), ("batch3", 3, "batch")]:
        env = SeededEpisodes(n)
        perturbed = PerturbedEnv(env, specs, seed=4, keyed=schedule == "stream")
        outcomes[label] = run_episodes(ConstantPolicy(0.0), perturbed, 11, seed=10, max_steps=8, schedule=schedule)
        steps[label] = env.steps
    alone = outcomes["alone"]
    assert alone.lengths.tolist() == [3 + (10 + e) % 5 for e in range(11)]
    assert 0 < int(alone.success.sum()) < 11  # the noise decides
    for n in (2, 3):
        assert torch.equal(outcomes[n].lengths, alone.lengths), n
        assert torch.equal(outcomes[n].success, alone.success), n
        assert torch.equal(outcomes[n].returns, alone.returns), n
    useful = int(alone.lengths.sum())
    assert steps[3] < steps["batch3"], steps  # the batch schedule's idle tails (and its check every 10 steps)
    assert steps[3] - useful <= 2 * 7, steps  # idle only while the last episodes end
    with pytest.raises(ScheduleError, match="keyed=True"):
        run_episodes(ConstantPolicy(0.0), PerturbedEnv(SeededEpisodes(2), specs), 2, 0, 8, schedule="stream")
    with pytest.raises(ValueError, match="schedule must be one of"):
        run_episodes(ConstantPolicy(0.0), SeededEpisodes(2), 2, 0, 8, schedule="lockstep")


def test_queued_episodes_start_from_their_seeds_on_real_envs(env_cfg):
    """CpuVecEnv.queue_episodes: envs that finish start the queued seeds (in env order), the same initial states as
    a reset with those seeds; once the queue is empty they auto-reset as before."""
    env_cfg.max_episode_steps = 2
    with make_envs(env_cfg) as env:
        env.reset(seed=0)
        env.queue_episodes([7])
        action = torch.zeros(2, env.action_dim)
        env.step(action)
        step = env.step(action)
        assert step.reset_seeds.tolist() == [7, -1]  # env 0 takes the one queued seed, env 1 auto-resets
        expected = env.reset(seed=7)["state"][0]  # env 0 of a reset with seed 7 starts from seed 7
        assert torch.equal(step.obs["state"][0], expected)
        assert not torch.equal(step.obs["state"][1], expected)
        assert env.step(action).reset_seeds is None and env.step(action).reset_seeds is None


def test_sampled_evaluations_repeat_exactly(env_cfg, tiny_policy):
    with make_envs(env_cfg) as env:
        runs = [
            evaluate_grid({"p": tiny_policy}, env, [CLEAN], 2, seed=5, max_steps=5, deterministic=False)
            for _ in range(2)
        ]
    assert runs[0][0].returns == runs[1][0].returns
    assert runs[0][0].successes == runs[1][0].successes


# ----------------------------------------------------------------------------------------------------------------
# the command line


def _cli(tmp_path, *extra):
    from conftest import RECIPES, TINY_RANDOM

    return [
        "--recipe",
        str(RECIPES / "tiny_cpu.yaml"),
        "--episodes",
        "2",
        "--out",
        str(tmp_path / "report"),
        "env.max_episode_steps=4",
        "env.image_size=32",
        *TINY_RANDOM,
        *extra,
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--suite", "none", "--perturb", "action_nois@0.5"], "did you mean 'action_noise'"),
        (["--suite", "none", "--perturb", "action_noise@2"], "[0, 1]"),
        (["--suite", "none", "--task", "PickSingleYCB-v1"], "needs assets that are not on disk"),
        (["--suite", "none", "--episodes", "0"], "--episodes must be >= 1"),
        (["--suite", "none", "--no-base"], "nothing to evaluate"),
    ],
)
def test_cli_rejects_bad_input_before_loading_a_model(tmp_path, capsys, extra, message):
    assert rvla_eval.main(_cli(tmp_path, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_cli_refuses_an_adapter_trained_on_another_base(tmp_path, capsys, tiny_policy):
    adapter = tmp_path / "other" / "adapter"
    tiny_policy.save_pretrained(adapter, base_model_id="someone/another-base")
    assert rvla_eval.main(_cli(tmp_path, "--suite", "none", "--adapter", str(adapter))) == 2
    assert "was trained on base 'someone/another-base'" in capsys.readouterr().err


@pytest.mark.parametrize("schedule", ["batch", "stream"])
def test_cli_writes_the_report_and_keeps_an_existing_one(tmp_path, capsys, tiny_policy, schedule):
    adapter = tmp_path / "robust" / "adapter"
    tiny_policy.save_pretrained(adapter, base_model_id="builtin:tiny-llava")
    args = _cli(tmp_path, "--suite", "none", "--perturb", "action_noise@1", "--adapter", str(adapter))
    assert rvla_eval.main([*args, "--schedule", schedule]) == 0
    out = tmp_path / "report"
    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == 1 and report["task"] == "PickCube-v1" and report["schedule"] == schedule
    assert [p["name"] for p in report["policies"]] == ["base", "robust"]
    assert [s["name"] for s in report["settings"]] == ["clean", "action_noise@1"]
    assert len(report["results"]) == 4 and all(r["episodes"] == 2 for r in report["results"])
    assert {d["setting"] for d in report["paired"]} == {"clean", "action_noise@1"}
    assert report["command"].startswith("python -m rvla_peft.eval --recipe")
    assert str(tmp_path) not in report["command"] and "--adapter adapter " in report["command"]  # portable_path
    assert "| action_noise@1 |" in (out / "report.md").read_text()
    assert (out / "robustness.png").read_bytes()[:4] == b"\x89PNG"
    # The adapter starts as the base (LoRA B = 0), and both saw the same episodes: identical outcomes.
    cells = {(r["policy"], r["setting"]): r for r in report["results"]}
    assert cells["base", "clean"]["mean_return"] == cells["robust", "clean"]["mean_return"]
    before = (out / "report.json").read_bytes()
    assert rvla_eval.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "report.json").read_bytes() == before


def test_eval_measures_a_scripted_expert_high_clean_and_low_under_strong_action_noise():
    """A state-based expert solves clean PickCube; sigma-0.3 action noise breaks its grasp (measured 16/16, 0/16)."""
    from rvla_peft.experts import ScriptedPolicy, expert_env_config, make_expert

    cfg = expert_env_config("PickCube-v1", num_envs=2, image_size=32)
    settings = suite_grid(None, ["action_noise@1"])
    with make_envs(cfg) as env:
        results = evaluate_grid({"expert": ScriptedPolicy(make_expert("PickCube-v1"))}, env, settings, 6, seed=0,
                                max_steps=cfg.max_episode_steps)  # fmt: skip
    clean, noisy = results
    assert (clean.setting, noisy.setting) == ("clean", "action_noise@1")
    assert sum(clean.successes) >= 5, clean.successes
    assert sum(noisy.successes) <= 2, noisy.successes


def test_training_seeds_of_an_arm_get_a_two_level_bootstrap_interval_and_paired_differences():
    from rvla_peft.evaluation import summarize_arms

    settings = [CLEAN, Setting("shift@0.5", "shift", 0.5), Setting("rotation@0.5", "rotation", 0.5)]
    outcomes = {  # 4 episodes per cell; the arm "rl" has three training seeds
        "base": {"clean": [1, 1, 1, 1], "shift@0.5": [1, 0, 0, 0], "rotation@0.5": [0, 0, 0, 0]},
        "rl/0": {"clean": [1, 1, 1, 1], "shift@0.5": [1, 1, 0, 0], "rotation@0.5": [1, 0, 0, 0]},
        "rl/1": {"clean": [1, 1, 1, 0], "shift@0.5": [1, 1, 1, 0], "rotation@0.5": [0, 0, 0, 0]},
        "rl/2": {"clean": [1, 1, 1, 1], "shift@0.5": [1, 0, 0, 0], "rotation@0.5": [1, 1, 0, 0]},
        "single/0": {"clean": [1, 1, 1, 1], "shift@0.5": [0, 0, 0, 0], "rotation@0.5": [0, 0, 0, 0]},
    }
    results = [
        CellResult(p, s, [bool(x) for x in v], [float(x) for x in v])
        for p, row in outcomes.items()
        for s, v in row.items()
    ]
    rows = summarize_arms(results, settings, baseline="base")
    assert {r["arm"] for r in rows} == {"rl"}, "one seed is not an arm's interval"
    by = {r["setting"]: r for r in rows}
    shift = by["shift@0.5"]
    assert shift["per_seed"] == [0.5, 0.75, 0.25] and shift["mean"] == pytest.approx(0.5)
    half = t975(2) * 0.25 / math.sqrt(3)  # sd of (0.5, 0.75, 0.25) is 0.25
    assert 0.5 + half > 1 and shift["t95"] == pytest.approx([0.0, 1.0])  # clipped to what is possible
    assert shift["differences"] == pytest.approx([0.25, 0.5, 0.0]) and shift["difference"] == pytest.approx(0.25)
    assert shift["difference_t95"] == pytest.approx([0.25 - half, 0.25 + half])  # same spread: base is one number
    mean = by["mean perturbed"]
    assert mean["per_seed"] == pytest.approx([(0.5 + 0.25) / 2, 0.75 / 2, (0.25 + 0.5) / 2])
    assert mean["differences"] == pytest.approx([v - 0.125 for v in mean["per_seed"]])
    # the two-level bootstrap: the base's one evaluation is one seed, episodes drawn jointly for the arm and the base
    order = ["clean", "shift@0.5", "rotation@0.5"]
    table = {p: [row[s] for s in order] for p, row in outcomes.items()}
    arms = {"rl": [table["rl/0"], table["rl/1"], table["rl/2"]], "base": [table["base"]]}
    boot = TwoLevelBootstrap(arms, resamples=2000, seed=0)
    assert (shift["mean"], *shift["ci95"]) == boot.mean("rl", [1])
    assert (shift["difference"], *shift["difference_ci95"]) == boot.difference("rl", "base", [1])
    assert (mean["mean"], *mean["ci95"]) == boot.mean("rl", [1, 2])
    assert 0 <= shift["ci95"][0] < shift["mean"] < shift["ci95"][1] <= 1
    # gap cut: base clean 1, perturbed 1/8; rl clean 11/12, perturbed 3/8
    assert mean["gap_cut"] == pytest.approx(1 - (11 / 12 - 3 / 8) / (1 - 1 / 8))
    assert (mean["gap_cut"], *mean["gap_cut_ci95"]) == boot.gap_cut("rl", "base", 0, [1, 2])
    assert "gap_cut" not in shift
    report = {"task": "PushCube-v1", "suite": "none", "episodes": 4, "seed": 0, "deterministic": True,
              "policies": [{"name": p} for p in outcomes], "settings": [{"name": s.name} for s in settings],
              "results": [r.as_dict() for r in results], "summary": summarize(results, settings, "base")[0],
              "paired": [], "arms": rows, "command": "python -m rvla_peft.eval ...",
              "intervals": interval_methods(4)}  # fmt: skip
    text = render_markdown(report)
    assert "| rl | shift@0.5 | 50.0, 75.0, 25.0 | 50.0 [" in text
    assert "| rl | mean perturbed | 37.5, 37.5, 37.5 | 37.5 [" in text
    assert f"| {100 * mean['gap_cut']:.1f} [{100 * mean['gap_cut_ci95'][0]:.1f}, " in text
    assert "[3] two-level percentile bootstrap over training seeds and evaluation episodes (2000 resamples" in text


# ----------------------------------------------------------------------------------------------------------------
# rollout videos


def test_side_by_side_frames_hold_each_panel_upscaled_and_mark_the_outcome():
    """Two policies on one episode of 32x32 frames: panels upscaled 4x (to 128 px) side by side under the setting's
    band; the shorter episode holds its last frame with a green (success) border, the other turns red at its end."""
    from rvla_peft.utils.video import BAND, FAILURE, HOLD, SUCCESS, EpisodeFrames, frame_size, side_by_side

    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (3, 32, 32, 3), generator=gen, dtype=torch.uint8).numpy()
    b = torch.randint(0, 256, (5, 32, 32, 3), generator=gen, dtype=torch.uint8).numpy()
    clip = side_by_side([EpisodeFrames("a", a, True), EpisodeFrames("b", b, False)], "clean | episode 0")
    assert frame_size(32, 32, 2) == (BAND + 128 + BAND, 256)
    assert len(clip) == 5 + HOLD and all(f.shape == (160, 256, 3) and f.dtype.name == "uint8" for f in clip)
    assert HOLD > 0 and all((f == clip[4]).all() for f in clip[5:])  # the outcomes held before the next episode
    for t in range(5):  # interior pixels (away from the border) are the frames, each pixel a 4x4 block
        assert (clip[t][BAND + 8 : BAND + 120 : 4, 8:120:4] == a[min(t, 2), 2:30, 2:30]).all()
        assert (clip[t][BAND + 9 : BAND + 121 : 4, 136:248:4] == b[t, 2:30, 2:30]).all()
    assert tuple(clip[1][BAND, 0]) != SUCCESS and tuple(clip[2][BAND, 0]) == SUCCESS == tuple(clip[4][BAND, 0])
    assert tuple(clip[3][BAND, 128]) != FAILURE and tuple(clip[4][BAND, 128]) == FAILURE


@pytest.mark.parametrize("schedule", ["batch", "stream"])
def test_recorded_episodes_are_the_grids_episodes(env_cfg, tiny_policy, schedule):
    """The second pass that records frames replays the grid's first episodes exactly (same reset seeds, perturbation
    draws and outcomes), over more than one batch of envs; its frames are what each policy saw."""
    from rvla_peft.evaluation import record_grid, replay_mismatches

    settings = suite_grid(None, ["color_jitter@0.5", "action_noise@1"])
    seer = ConstantPolicy(0.3)
    policies = {"tiny": tiny_policy, "constant": seer}
    with make_envs(env_cfg) as env:  # 2 envs: the 3 recorded episodes span two batches
        results = evaluate_grid(policies, env, settings, 4, seed=7, max_steps=5, schedule=schedule)
        seer.seen.clear()
        recorded = record_grid(policies, env, settings, 3, seed=7, max_steps=5, schedule=schedule)
    assert replay_mismatches(results, recorded) == []
    grid = {(r.policy, r.setting): r for r in results}
    assert [(r.policy, r.setting) for r in recorded] == list(grid)
    for r in recorded:
        assert r.returns == grid[r.policy, r.setting].returns[:3] and len(r.frames) == 3
        assert all(f.shape == (6, 32, 32, 3) for f in r.frames)  # the reset frame, 4 after steps, the last one
    assert len({r.returns[0] for r in recorded if r.policy == "constant"}) > 1  # the settings differ
    jitter = next(r for r in recorded if r.policy == "constant" and r.setting == "color_jitter@0.5")
    first_seen = seer.seen[len(seer.seen) // 3].numpy()  # the jittered cell's first act: episodes 0 and 1
    assert (jitter.frames[0][0] == first_seen[0]).all() and (jitter.frames[1][0] == first_seen[1]).all()


def test_cli_writes_side_by_side_videos_and_links_them(tmp_path, capsys, tiny_policy):
    import imageio.v3 as iio

    from rvla_peft.utils.video import HOLD, frame_size

    adapter = tmp_path / "robust" / "adapter"
    tiny_policy.save_pretrained(adapter, base_model_id="builtin:tiny-llava")
    args = _cli(tmp_path, "--suite", "none", "--perturb", "color_jitter@0.5", "--adapter", str(adapter))
    assert rvla_eval.main([*args, "--video", "3"]) == 2
    assert "--video must be between 0 and --episodes (2)" in capsys.readouterr().err
    assert rvla_eval.main([*args, "--video", "1"]) == 0
    out = tmp_path / "report"
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    height, width = frame_size(32, 32, 2)  # two policies side by side
    for setting, stem in [("clean", "clean"), ("color_jitter@0.5", "color_jitter_0.5")]:
        entry = next(v for v in report["videos"] if v["setting"] == setting)
        assert entry["mp4"] == f"videos/{stem}.mp4" and entry["gif"] == f"videos/{stem}.gif"
        assert entry["seeds"] == [0] and set(entry["successes"]) == {"base", "robust"}
        mp4, gif = iio.imread(out / entry["mp4"], plugin="FFMPEG"), iio.imread(out / entry["gif"])
        assert mp4.shape == (5 + HOLD, height, width, 3)  # episodes of 4 steps: 5 observations, the last held
        assert gif.shape[1:3] == (height, width) and 3 <= gif.shape[0] <= (5 + HOLD + 1) // 2 + 1
        assert f"![{setting}]({entry['gif']})" in md and f"([MP4]({entry['mp4']}))" in md
