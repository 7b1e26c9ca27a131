"""perturb.sampler: which training perturbation each episode runs under (uniform, or a UCB bandit on failure).

Pure sampler tests, PerturbedEnv on a fake env (draws pinned to what the wrapper drew before samplers existed) and
on real ManiSkill envs (a scripted policy that fails under one setting), the config checks, and a resumed run.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import RECIPES
from test_perturbations import FakeEnv, _spec

from rvla_peft.config import ConfigError, PerturbationSpec, load_config
from rvla_peft.envs import PerturbedEnv, make_envs
from rvla_peft.experts import expert_env_config, make_expert
from rvla_peft.perturbations.sampler import (
    DEFAULT_EXPLORATION,
    AdversarialSampler,
    UniformSampler,
    build_sampler,
)
from rvla_peft.utils.constants import METRICS_FILE, RANK_STATES_FILE

# --------------------------------------------------------------------------------------------------------------
# Uniform: exactly the draws PerturbedEnv made before samplers existed


def _draw_as_before(num_settings, done, choice, generator, generators):
    """PerturbedEnv._start_episodes's draw before perturb.sampler, verbatim (one generator, or one per env)."""
    if generators:
        new = torch.zeros(done.shape[0], dtype=torch.long)
        if choice is not None:
            new.copy_(choice)
        for i in done.nonzero().flatten().tolist():
            new[i] = torch.randint(num_settings, (1,), generator=generators[i])
    else:
        new = torch.randint(num_settings, (done.shape[0],), generator=generator)
    return new if choice is None else torch.where(done, new, choice)


@pytest.mark.parametrize("keyed", [False, True])
def test_uniform_sampler_draws_what_the_wrapper_drew_before(keyed):
    def generators(seed):
        if keyed:
            return [torch.Generator().manual_seed(seed + i) for i in range(6)]
        return torch.Generator().manual_seed(seed)

    ours, theirs = generators(5), generators(5)
    masks = torch.Generator().manual_seed(0)
    sampler = UniformSampler(4)
    choice = expected = None
    starts = torch.zeros(4, dtype=torch.long)
    for t in range(30):
        done = torch.ones(6, dtype=torch.bool) if t == 0 else torch.rand(6, generator=masks) < 0.4
        choice = sampler.choose(done, choice, ours)
        expected = _draw_as_before(4, done, expected, None if keyed else theirs, theirs if keyed else None)
        assert torch.equal(choice, expected)
        starts += torch.bincount(choice[done], minlength=4)
    for a, b in zip(ours if keyed else [ours], theirs if keyed else [theirs], strict=True):
        assert torch.equal(a.get_state(), b.get_state()), "the same amount of the stream consumed"
    assert sampler.choice_counts() == starts.tolist() and sum(starts.tolist()) > 30
    assert sampler.choice_counts() == [0, 0, 0, 0], "cleared by the last call"


def _fake_run(sampler=None, keyed=False, seed=7):
    env = PerturbedEnv(FakeEnv([2, 3, 5, 2, 4]), [_spec("pixel_noise"), _spec("state_noise"), _spec("action_noise")],
                       seed=seed, sample_per_episode=True, keyed=keyed, sampler=sampler)  # fmt: skip
    env.reset(seed=3)
    rows = [env.episode_choice.tolist()]
    for _ in range(10):
        step = env.step(torch.zeros(5, 7))
        rows.append(env.episode_choice.tolist())
    return env, rows, step


# Recorded from PerturbedEnv before perturb.sampler existed (same env, specs and seeds as _fake_run).
BEFORE = {
    False: ([[2, 0, 0, 2, 0], [2, 0, 0, 2, 0], [0, 0, 0, 2, 0], [0, 1, 0, 2, 0], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0],
             [2, 1, 1, 0, 0], [2, 1, 1, 0, 0], [2, 1, 1, 2, 1], [2, 2, 1, 2, 1], [2, 2, 2, 0, 1]], 39449.0),
    True: ([[2, 1, 2, 2, 0], [2, 1, 2, 2, 0], [0, 1, 2, 1, 0], [0, 1, 2, 1, 0], [0, 1, 2, 0, 2], [0, 1, 2, 0, 2],
            [1, 2, 2, 0, 2], [1, 2, 2, 0, 2], [1, 2, 2, 2, 2], [1, 2, 2, 2, 2], [1, 2, 2, 0, 2]], 40191.0),
}  # fmt: skip


@pytest.mark.parametrize("keyed", [False, True])
def test_perturbed_env_choices_and_pixels_are_unchanged_by_the_default_sampler(keyed):
    for sampler in (None, UniformSampler(3)):
        _, rows, step = _fake_run(sampler, keyed)
        assert (rows, float(step.obs["rgb"].float().sum())) == BEFORE[keyed]


def test_the_adversarial_sampler_leaves_the_perturbations_random_stream_as_uniform_does():
    """Common random numbers: the adversarial sampler draws and drops the uniform choice, so the generator that the
    perturbations also draw from is where it would be under the uniform sampler."""
    uniform, rows_u, _ = _fake_run(UniformSampler(3))
    adversarial, rows_a, _ = _fake_run(AdversarialSampler(3))
    assert rows_a != rows_u
    assert rows_a[0] == [0, 1, 2, 0, 1], "untried settings first, then spread over the batch"
    assert torch.equal(uniform.generator.get_state(), adversarial.generator.get_state())


def test_sampler_metrics_are_the_shares_of_the_episodes_started_since_the_last_call():
    env, rows, _ = _fake_run()
    # every env's choice at reset, then the choice of each env whose episode ended (FakeEnv lengths 2, 3, 5, 2, 4)
    lengths = [2, 3, 5, 2, 4]
    starts = [0, 0, 0]
    for t, row in enumerate(rows):
        for i, k in enumerate(row):
            if t % lengths[i] == 0:
                starts[k] += 1
    metrics = env.sampler_metrics()
    assert metrics == pytest.approx({
        f"perturb/choice_{name}@1": n / sum(starts)
        for name, n in zip(("pixel_noise", "state_noise", "action_noise"), starts, strict=True)
    }, abs=0)  # fmt: skip
    assert env.sampler_metrics() == {}, "no episode started since"
    env.step(torch.zeros(5, 7))  # step 11: no episode ends
    assert env.sampler_metrics() == {}
    env.step(torch.zeros(5, 7))  # step 12: envs 0, 1, 3 and 4 start new episodes
    drawn = [env.episode_choice.tolist()[i] for i in (0, 1, 3, 4)]
    shares = [n / 4 for n in torch.bincount(torch.tensor(drawn), minlength=3).tolist()]
    assert list(env.sampler_metrics().values()) == shares
    plain = PerturbedEnv(FakeEnv([2, 3]), [_spec("pixel_noise")], seed=0, sample_per_episode=True)
    plain.reset(seed=0)
    assert plain.sampler_metrics() == {}, "one spec: nothing is drawn per episode"


# --------------------------------------------------------------------------------------------------------------
# Adversarial: sliding-window UCB on failure

C = DEFAULT_EXPLORATION


def test_untried_settings_come_first_then_a_batch_spreads_over_equal_settings():
    sampler = AdversarialSampler(3)
    choice = sampler.choose(torch.ones(5, dtype=torch.bool), None, torch.Generator().manual_seed(0))
    assert choice.tolist() == [0, 1, 2, 0, 1]
    assert sampler.choice_counts() == [2, 2, 1]
    assert sampler.scores() == [math.inf] * 3, "nothing finished and nothing running: all untried"


def test_scores_and_picks_on_a_scripted_outcome_sequence():
    sampler = AdversarialSampler(3, exploration=C, window=3)
    for k, success in [(0, True), (1, False), (2, True)]:
        sampler.update(k, success)
    bonus = math.sqrt(math.log(3) / 2)  # c sqrt(ln N / n) with c = 1/sqrt(2), N = 3, n = 1
    assert sampler.scores() == pytest.approx([bonus, 1 + bonus, bonus], rel=1e-12)
    assert sampler.failure_rates() == [0.0, 1.0, 0.0]
    assert sampler.pick() == 1, "the setting that failed"
    sampler.update(1, True)  # the window (3 episodes) drops setting 0's only episode
    assert sampler.failure_rates() == [None, 0.5, 0.0]
    assert sampler.pick() == 0, "a setting with no episode in the window is tried again"
    sampler.update(0, False)  # window: (2, ok), (1, ok), (0, failed)
    assert sampler.scores() == pytest.approx([1 + bonus, bonus, bonus], rel=1e-12)
    assert sampler.pick() == 0
    # running episodes count in n and N: 30 of setting 0 in flight bring its bonus down below setting 1's
    running = [30, 0, 0]
    n_total = 3 + 30
    assert sampler.scores(running) == pytest.approx(
        [1 + C * math.sqrt(math.log(n_total) / 31), C * math.sqrt(math.log(n_total)), C * math.sqrt(math.log(n_total))]
    )
    assert sampler.pick(running) == 1
    greedy = AdversarialSampler(3, exploration=0.0, window=10)
    for k, success in [(0, True), (1, False), (2, True), (1, True), (2, False), (2, False)]:
        greedy.update(k, success)
    assert greedy.failure_rates() == [0.0, 0.5, pytest.approx(2 / 3)] and greedy.pick() == 2


def test_episodes_running_under_a_setting_spread_a_batch():
    sampler = AdversarialSampler(2)
    sampler.update(0, False)
    sampler.update(1, True)
    current = torch.zeros(40, dtype=torch.long)
    choice = sampler.choose(torch.ones(40, dtype=torch.bool), current, torch.Generator().manual_seed(0))
    counts = sampler.choice_counts()
    assert counts == torch.bincount(choice, minlength=2).tolist()
    assert counts[0] > counts[1] > 0, "mostly the failing setting, the other still tried"
    # the same starts with 39 envs still running setting 0: every start goes to setting 1 first
    starting = torch.zeros(40, dtype=torch.bool)
    starting[5] = True
    again = sampler.choose(starting, torch.zeros(40, dtype=torch.long), torch.Generator().manual_seed(0))
    assert again[5] == 1 and (again[~starting] == 0).all()


def _drive(sampler, outcomes: random.Random, steps: int, generator: torch.Generator) -> list[list[int]]:
    """A scripted run: 4 envs, each episode ends with probability 1/2 per step, failing with probability
    0.2 / 0.5 / 0.9 by setting; the choices after each step."""
    fail = [0.2, 0.5, 0.9]
    choice = sampler.choose(torch.ones(4, dtype=torch.bool), None, generator)
    rows = []
    for _ in range(steps):
        ended = torch.tensor([outcomes.random() < 0.5 for _ in range(4)])
        for i in ended.nonzero().flatten().tolist():
            k = int(choice[i])
            sampler.update(k, outcomes.random() >= fail[k])
        choice = sampler.choose(ended, choice, generator)
        rows.append(choice.tolist())
    return rows


def test_the_bandit_learns_which_setting_fails_most():
    sampler = AdversarialSampler(3)
    rows = _drive(sampler, random.Random(0), 300, torch.Generator().manual_seed(0))
    late = torch.bincount(torch.tensor(rows[100:]).flatten(), minlength=3)
    assert late[2] > late[1] > late[0] > 0, late.tolist()
    uniform = UniformSampler(3)
    rows = _drive(uniform, random.Random(0), 300, torch.Generator().manual_seed(0))
    assert torch.bincount(torch.tensor(rows[100:]).flatten(), minlength=3).max() < late[2]


def test_state_round_trip_gives_identical_future_choices():
    sampler = AdversarialSampler(3, window=20)
    outcomes, generator = random.Random(1), torch.Generator().manual_seed(1)
    _drive(sampler, outcomes, 50, generator)
    state = json.loads(json.dumps(sampler.state_dict()))  # plain lists: fits a JSON trainer state as well
    assert len(state["recent"]) == 20
    restored = AdversarialSampler(3, window=20)
    restored.load_state_dict(state)
    later = (outcomes.getstate(), generator.get_state())
    expected = _drive(sampler, outcomes, 50, generator)
    outcomes.setstate(later[0])
    generator.set_state(later[1])
    assert _drive(restored, outcomes, 50, generator) == expected
    assert restored.state_dict() == sampler.state_dict()
    fresh = AdversarialSampler(3, window=20)
    outcomes.setstate(later[0])
    generator.set_state(later[1])
    assert _drive(fresh, outcomes, 50, generator) != expected, "the state is what makes them equal"
    with pytest.raises(ValueError, match="'adversarial' sampler cannot load into a 'uniform'"):
        UniformSampler(3).load_state_dict(state)
    with pytest.raises(ValueError, match="has 3 settings, this sampler 4"):
        AdversarialSampler(4).load_state_dict(state)
    uniform = UniformSampler(2)
    uniform.choose(torch.ones(3, dtype=torch.bool), None, torch.Generator().manual_seed(0))
    copy = UniformSampler(2)
    copy.load_state_dict(json.loads(json.dumps(uniform.state_dict())))
    assert copy.choice_counts() == uniform.choice_counts() and sum(copy.state_dict()["draws"]) == 0


def test_bad_sampler_arguments_are_refused():
    with pytest.raises(ValueError, match="at least 2"):
        AdversarialSampler(1)
    with pytest.raises(ValueError, match="exploration"):
        AdversarialSampler(2, exploration=-0.1)
    with pytest.raises(ValueError, match="window"):
        AdversarialSampler(2, window=0)
    with pytest.raises(ValueError, match="setting 3 is not in"):
        AdversarialSampler(3).update(3, True)
    with pytest.raises(ValueError, match="chooses among 2 settings, not 3"):
        PerturbedEnv(FakeEnv([2]), [_spec("pixel_noise")] * 3, sample_per_episode=True, sampler=UniformSampler(2))


# --------------------------------------------------------------------------------------------------------------
# Config


def _cfg(*overrides):
    return load_config(RECIPES / "tiny_cpu.yaml", list(overrides))


def test_config_builds_the_sampler_and_refuses_what_cannot_work():
    cfg = _cfg("perturb.sampler=adversarial", "perturb.sampler_exploration=0.5", "perturb.sampler_window=40")
    sampler = build_sampler(cfg.perturb, len(cfg.perturb.train))
    assert isinstance(sampler, AdversarialSampler) and (sampler.exploration, sampler.window) == (0.5, 40)
    assert isinstance(build_sampler(_cfg().perturb, 5), UniformSampler)
    assert _cfg().perturb.sampler_exploration == pytest.approx(1 / math.sqrt(2))
    refused = {
        "perturb.sample_per_episode=false": "set perturb.sample_per_episode=true",
        "perturb.train=[{name: shift}]": "needs at least 2, got 1",
        "algorithm=rloo": "needs algorithm=ppo",
        "perturb.sampler_exploration=-1": "perturb.sampler_exploration: must be a finite number >= 0",
        "perturb.sampler_window=0": "perturb.sampler_window: must be >= 1",
    }
    for override, message in refused.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            _cfg("perturb.sampler=adversarial", override)
    with pytest.raises(ConfigError, match="did you mean 'adversarial'"):
        _cfg("perturb.sampler=adversarail")
    _cfg("perturb.sample_per_episode=false", "perturb.train=[{name: shift}]")  # uniform: as before


# --------------------------------------------------------------------------------------------------------------
# Real ManiSkill envs: a scripted policy that is blind under a camera shift

SETTINGS = [PerturbationSpec("shift", 0.5), PerturbationSpec("action_noise", 0.1)]


@pytest.fixture(scope="module")
def push_env():
    cfg = expert_env_config("PushCube-v1", num_envs=2, max_episode_steps=20, image_size=32, sim_backend="physx_cpu",
                            render_backend="cpu")  # fmt: skip
    env = make_envs(cfg)
    yield env
    env.close()


def _push(env, sampler, steps: int, seed: int = 0, state: dict | None = None):
    """The PushCube expert acting on the true state, except on a frame the perturbations changed (a camera shift),
    where it does nothing, so the episode fails. Returns the wrapper, its choices and the episodes' outcomes."""
    perturbed = PerturbedEnv(env, SETTINGS, seed=0, sample_per_episode=True, sampler=sampler)
    perturbed.keep_clean = True
    if state is not None:
        perturbed.load_sampler_state_dict(state)
    expert = make_expert("PushCube-v1")
    obs = perturbed.reset(seed=seed, rebuild=True)
    choices, outcomes = [perturbed.episode_choice.tolist()], []
    for _ in range(steps):
        blind = (obs["rgb"] != obs["rgb_clean"]).flatten(1).any(1)
        choice = perturbed.episode_choice.clone()
        step = perturbed.step(torch.where(blind[:, None], 0.0, expert(obs["state"])))
        for i in (step.terminated | step.truncated).nonzero().flatten().tolist():
            outcomes.append([int(choice[i]), int(step.episode_success[i])])
        choices.append(perturbed.episode_choice.tolist())
        obs = step.obs
    return perturbed, choices, outcomes


def test_on_maniskill_the_adversarial_sampler_moves_episodes_to_the_setting_that_fails(push_env):
    shares = {}
    for name, sampler in (("uniform", UniformSampler(2)), ("adversarial", AdversarialSampler(2))):
        env, _, outcomes = _push(push_env, sampler, 160)
        shares[name] = env.sampler_metrics()["perturb/choice_shift@0.5"]
        by_setting = {k: [s for j, s in outcomes if j == k] for k in (0, 1)}
        assert sum(by_setting[0]) / len(by_setting[0]) < 0.3 < 0.7 < sum(by_setting[1]) / len(by_setting[1])
    assert sampler.state_dict()["recent"] == outcomes, "every finished episode reached the bandit, in order"
    assert shares["adversarial"] >= 0.8 and shares["adversarial"] > shares["uniform"] + 0.2, shares


def test_on_maniskill_a_restored_sampler_continues_as_the_uninterrupted_one(push_env):
    """What the trainer does at a checkpoint: the sampler's state saved, the envs restarted from a seed."""
    env, _, _ = _push(push_env, AdversarialSampler(2, window=6), 40)
    state = json.loads(json.dumps(env.sampler_state_dict()))
    _, expected, outcomes = _push(push_env, env.sampler, 40, seed=1)
    _, resumed, again = _push(push_env, AdversarialSampler(2, window=6), 40, seed=1, state=state)
    assert (resumed, again) == (expected, outcomes)
    _, fresh, _ = _push(push_env, AdversarialSampler(2, window=6), 40, seed=1)
    assert fresh != expected, "without the state the choices differ"


# --------------------------------------------------------------------------------------------------------------
# The trainer: logged per update, checkpointed per rank, resumed


def test_a_resumed_run_logs_the_same_choices_as_the_uninterrupted_run(tmp_path):
    from rvla_peft.trainer import RobustPPOTrainer

    short = [f"output_dir={tmp_path / 'run'}", "report_to=[]", "eval_episodes=0", "total_updates=3", "save_every=2",
             "env.max_episode_steps=12", "ppo.num_steps=8", "ppo.num_minibatches=2", "ppo.update_epochs=1",
             "perturb.sampler=adversarial", "perturb.sampler_window=8"]  # fmt: skip
    RobustPPOTrainer(_cfg(*short)).train()
    metrics = tmp_path / "run" / METRICS_FILE
    first = [json.loads(line) for line in metrics.read_text().splitlines()]
    labels = [f"perturb/choice_{name}" for name in ("pixel_noise@0.3", "action_noise@0.33", "shift@0.5",
                                                    "rotation@0.5", "color_jitter@0.5")]  # fmt: skip
    assert all(sum(line.get(k, 0.0) for k in labels) == pytest.approx(1.0) for line in first)
    checkpoint = tmp_path / "run" / "checkpoints" / "update-000002"
    saved = torch.load(checkpoint / RANK_STATES_FILE, weights_only=False)[0]["sampler"]
    assert saved["kind"] == "adversarial" and len(saved["recent"]) > 0
    RobustPPOTrainer(_cfg(*short, f"resume_from_checkpoint={checkpoint}")).train()
    again = [json.loads(line) for line in metrics.read_text().splitlines()]

    def logged(lines):
        return [{k: v for k, v in line.items() if not k.startswith("time/")} for line in lines]

    assert logged(again) == logged(first)
