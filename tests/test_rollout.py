"""collect() on real ManiSkill envs: time-limit truncation is bootstrapped with V(final observation)."""

import pytest
import torch
from helpers import Recording

from rvla_peft.envs import PerturbedEnv, make_envs
from rvla_peft.rollout import collect, step_chunk, with_instructions


@pytest.fixture
def env(tiny_cfg):
    tiny_cfg.env.max_episode_steps = 3
    env = make_envs(tiny_cfg.env)
    yield Recording(env)
    env.close()


def test_truncated_episodes_are_bootstrapped_and_counted(tiny_policy, env):
    gamma = 0.9
    torch.manual_seed(0)
    torch.nn.init.normal_(tiny_policy.value_head.net[-1].weight)  # starts at zero: V would be 0 and hide a bug
    torch.nn.init.normal_(tiny_policy.value_head.net[-1].bias)
    obs = env.reset(seed=0)
    rollout, next_obs = collect(tiny_policy.eval(), env, obs, num_steps=4, gamma=gamma)
    assert rollout.rewards.shape == (4, 2) and rollout.rgb.shape == (5, 2, 64, 64, 3)
    truncated = torch.stack([s.truncated for s in env.steps])
    assert truncated[2].all() and not truncated[[0, 1, 3]].any(), "episodes of 3 steps end at step index 2"
    assert torch.equal(rollout.dones, truncated | torch.stack([s.terminated for s in env.steps]))
    final = with_instructions(env.steps[2].final_obs, env)
    final_value = tiny_policy.value(final)
    assert (final_value.abs() > 1e-3).all()
    expected = env.steps[2].reward + gamma * final_value
    torch.testing.assert_close(rollout.rewards[2], expected, atol=1e-6, rtol=0)
    for t in (0, 1, 3):
        assert torch.equal(rollout.rewards[t], env.steps[t].reward), "only truncated steps are bootstrapped"
    assert torch.equal(rollout.episodes["length"], torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(rollout.episodes["return"], sum(s.reward for s in env.steps[:3]))
    assert torch.equal(rollout.rgb[3], env.steps[2].obs["rgb"]), "after the cut the next episode's first frame"
    assert torch.equal(rollout.rgb[4], next_obs["rgb"])


def test_an_action_chunk_is_one_macro_step_cut_at_the_episode_end(tiny_cfg, env):
    """Two chunks of 2 steps over 3-step episodes: the second chunk ends the episode at its first step."""
    actions = torch.rand(2, 4, 7, generator=torch.Generator().manual_seed(0)) * 2 - 1
    env.reset(seed=4)
    singles = [env.step(actions[:, j]) for j in range(4)]
    env.reset(seed=4)
    first, second = step_chunk(env, actions[:, 0:2]), step_chunk(env, actions[:, 2:4])
    torch.testing.assert_close(first.reward, singles[0].reward + singles[1].reward)
    assert not (first.terminated | first.truncated).any()
    torch.testing.assert_close(second.reward, singles[2].reward)  # the 4th step belongs to the next episode
    assert second.truncated.all() and torch.equal(second.episode_length, torch.tensor([3, 3]))
    torch.testing.assert_close(second.episode_return, singles[2].episode_return)
    assert torch.equal(second.final_obs["rgb"], singles[2].final_obs["rgb"])
    assert torch.equal(second.obs["rgb"], singles[3].obs["rgb"])


def test_collect_records_the_training_perturbation_of_each_finished_episode(tiny_cfg, tiny_policy, env):
    """With perturb.sample_per_episode, each finished episode carries the entry it ran under (for
    rollout/success_rate/<label>); an env that draws none per episode gives -1."""
    perturbed = PerturbedEnv(env, tiny_cfg.perturb.train, seed=0, sample_per_episode=True)
    obs = perturbed.reset(seed=0)
    first = perturbed.episode_choice.clone()
    assert first.shape == (2,) and (first >= 0).all() and (first < len(tiny_cfg.perturb.train)).all()
    torch.manual_seed(0)
    rollout, _ = collect(tiny_policy.eval(), perturbed, obs, num_steps=4, gamma=0.9)  # episodes end at step 2
    assert torch.equal(rollout.episodes["setting"], first)
    plain, _ = collect(tiny_policy, env, env.reset(seed=0), num_steps=3, gamma=0.9)
    assert plain.episodes["setting"].tolist() == [-1, -1]
