"""Collect T steps x N envs with a policy, everything kept batched on the env/policy device.

Truncated episodes (time limit) are bootstrapped: gamma * V(final observation) is folded into their last reward,
so GAE can treat every episode end alike. Episode outcomes are gathered as tensors and reduced once per rollout,
not per step, to avoid host round trips in the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from rvla_peft.algorithms.ppo import bootstrap_truncated
from rvla_peft.envs.maniskill import Step
from rvla_peft.policies.base import Policy


@dataclass
class Rollout:
    rgb: Tensor  # [T+1, N, H, W, 3] uint8; index T is the observation after the last step
    actions: Tensor  # [T, N, A] policy-space actions
    log_probs: Tensor  # [T, N]
    values: Tensor  # [T, N]
    rewards: Tensor  # [T, N] with truncation bootstrap folded in
    dones: Tensor  # [T, N] bool: an episode ended at step t
    means: Tensor  # [T, N, A] behaviour policy's mean action (old-policy smoothness target)
    next_value: Tensor  # [N]
    instructions: list[str]  # one per env
    episodes: dict[str, Tensor] = field(default_factory=dict)  # success / return / length of finished episodes
    env_steps: int = 0  # simulator steps taken: T * N, times the chunk length for action-chunking policies

    @property
    def num_steps(self) -> int:
        return self.actions.shape[0]

    @property
    def num_envs(self) -> int:
        return self.actions.shape[1]

    def observations(self, flat_index: Tensor, offset: int = 0) -> dict:
        """Observation dict of flat (t * N + n) samples, at step t + offset (offset 1: the next observation)."""
        t, n = flat_index // self.num_envs, flat_index % self.num_envs
        return {"rgb": self.rgb[t + offset, n], "instruction": [self.instructions[i] for i in n.tolist()]}


def step_chunk(env, env_action: Tensor) -> Step:
    """Execute one action [N, A], or a chunk [N, k, A] open-loop, as one (macro) step.

    A chunk's reward is the sum of its steps' rewards up to the env's episode end (action-chunking policies such as
    OpenVLA-OFT and pi0 are trained as an MDP over chunks, as RLinf does). An env whose episode ends inside the
    chunk reports that end (flags, final observation, episode statistics); the chunk's remaining actions run in the
    env's next episode, unrewarded here.
    """
    if env_action.dim() == 2:
        return env.step(env_action)
    out = env.step(env_action[:, 0])
    done = out.terminated | out.truncated
    reward, terminated, truncated = out.reward.clone(), out.terminated, out.truncated
    success, ep_return, ep_length = out.episode_success, out.episode_return, out.episode_length
    final_obs = out.final_obs
    for j in range(1, env_action.shape[1]):
        step = env.step(env_action[:, j])
        alive = ~done
        reward = reward + step.reward * alive
        ends = (step.terminated | step.truncated) & alive
        terminated = torch.where(alive, step.terminated, terminated)
        truncated = torch.where(alive, step.truncated, truncated)
        success = torch.where(ends, step.episode_success, success)
        ep_return = torch.where(ends, step.episode_return, ep_return)
        ep_length = torch.where(ends, step.episode_length, ep_length)
        if step.final_obs is not None:
            if final_obs is None:
                final_obs = step.final_obs
            else:
                final_obs = {k: _where_rows(ends, step.final_obs[k], v) for k, v in final_obs.items()}
        done = done | ends
        out = step
    return Step(
        obs=out.obs,
        reward=reward,
        terminated=terminated,
        truncated=truncated,
        final_obs=final_obs,
        episode_success=success,
        episode_return=ep_return,
        episode_length=ep_length,
    )


def _where_rows(rows: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(rows.view(-1, *([1] * (a.dim() - 1))), a, b)


def with_instructions(obs: dict, env) -> dict:
    return {**obs, "instruction": env.instructions}


def _select(obs: dict, rows: Tensor) -> dict:
    return {k: (v[rows] if isinstance(v, Tensor) else [v[i] for i in rows.tolist()]) for k, v in obs.items()}


@torch.no_grad()
def collect(policy: Policy, env, obs: dict, num_steps: int, gamma: float) -> tuple[Rollout, dict]:
    """Run ``num_steps`` steps from ``obs``; returns the rollout and the observation to continue from."""
    device = policy.device
    rgb, actions, log_probs, values, rewards, dones, means = [], [], [], [], [], [], []
    success, returns, lengths = [], [], []
    chunk = 1
    for _ in range(num_steps):
        obs = with_instructions(obs, env)
        sample = policy.act(obs)
        chunk = sample.env_action.shape[1] if sample.env_action.dim() == 3 else 1
        step = step_chunk(env, sample.env_action)
        reward = step.reward.to(device).float()
        truncated, terminated = step.truncated.to(device), step.terminated.to(device)
        if step.final_obs is not None and bool(truncated.any()):
            rows = truncated.nonzero().squeeze(-1)
            final_values = torch.zeros_like(reward)
            final_values[rows] = policy.value(_select(with_instructions(step.final_obs, env), rows))
            reward = bootstrap_truncated(reward, truncated, terminated, final_values, gamma)
        done = truncated | terminated
        rgb.append(obs["rgb"])
        actions.append(sample.action)
        log_probs.append(sample.log_prob)
        values.append(sample.value)
        means.append(sample.mean)
        rewards.append(reward)
        dones.append(done)
        success.append(step.episode_success.to(device))
        returns.append(step.episode_return.to(device).float())
        lengths.append(step.episode_length.to(device))
        obs = step.obs
    obs = with_instructions(obs, env)
    dones = torch.stack(dones)
    rollout = Rollout(
        rgb=torch.stack(rgb + [obs["rgb"]]).to(device),
        actions=torch.stack(actions),
        log_probs=torch.stack(log_probs),
        values=torch.stack(values),
        rewards=torch.stack(rewards),
        dones=dones,
        means=torch.stack(means),
        next_value=policy.value(obs),
        instructions=list(env.instructions),
        episodes={
            "success": torch.stack(success)[dones].float(),
            "return": torch.stack(returns)[dones],
            "length": torch.stack(lengths)[dones].float(),
        },
        env_steps=num_steps * env.num_envs * chunk,
    )
    return rollout, obs


@dataclass
class EpisodeOutcomes:
    """Per-episode results of an evaluation, in episode order (episode e started from reset seed ``seed + e``)."""

    success: Tensor  # [E] bool
    returns: Tensor  # [E] float32
    lengths: Tensor  # [E] int64

    @property
    def success_rate(self) -> float:
        return self.success.float().mean().item()


@torch.no_grad()
def run_episodes(
    policy: Policy,
    env,
    episodes: int,
    seed: int,
    max_steps: int,
    deterministic: bool = True,
    on_batch=None,
) -> EpisodeOutcomes:
    """The first episode of each env, in batches of ``env.num_envs``; batch b resets with ``seed + b * num_envs``.

    Env i of batch b then starts from seed ``seed + b * N + i``, i.e. episode e from ``seed + e`` whatever N is,
    and a seeded :class:`~rvla_peft.envs.PerturbedEnv` replays the same perturbation draws for every policy
    (common random numbers). Episodes that auto-reset within a batch are ignored: each batch runs until every env
    has finished one episode (at most ``max_steps`` steps, the env's time limit). ``on_batch(k)`` is called with the
    number of episodes each finished batch adds (for a progress bar).
    """
    n = env.num_envs
    success, returns, lengths = [], [], []
    for start in range(0, episodes, n):
        obs = env.reset(seed=seed + start)
        finished = torch.zeros(n, dtype=torch.bool, device=policy.device)
        batch_success = torch.zeros(n, dtype=torch.bool, device=policy.device)
        batch_return = torch.zeros(n, dtype=torch.float32, device=policy.device)
        batch_length = torch.zeros(n, dtype=torch.int64, device=policy.device)
        for t in range(max_steps):
            sample = policy.act(with_instructions(obs, env), deterministic=deterministic)
            step = step_chunk(env, sample.env_action)
            first = (step.terminated | step.truncated).to(policy.device) & ~finished
            batch_success = torch.where(first, step.episode_success.to(policy.device), batch_success)
            batch_return = torch.where(first, step.episode_return.to(policy.device).float(), batch_return)
            batch_length = torch.where(first, step.episode_length.to(policy.device), batch_length)
            finished |= first
            obs = step.obs
            if t % 10 == 9 and bool(finished.all()):  # a host sync every 10 steps, not every step
                break
        if not bool(finished.all()):
            raise RuntimeError(f"an episode did not end within max_steps={max_steps}: is it the env's time limit?")
        k = min(n, episodes - start)
        success.append(batch_success[:k])
        returns.append(batch_return[:k])
        lengths.append(batch_length[:k])
        if on_batch is not None:
            on_batch(k)
    return EpisodeOutcomes(torch.cat(success), torch.cat(returns), torch.cat(lengths))
