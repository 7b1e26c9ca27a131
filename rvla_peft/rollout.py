"""Collect experience with a policy, everything kept batched on the env/policy device.

- :func:`collect` (PPO): T steps x N envs, continuing across episodes. Truncated episodes (time limit) are
  bootstrapped: gamma * V(final observation) is folded into their last reward, so GAE can treat every episode end
  alike. Episode outcomes are gathered as tensors and reduced once per rollout, not per step, to avoid host round
  trips in the loop.
- :func:`collect_groups` (RLOO / GRPO): whole episodes in groups of G from the same initial state and the same
  perturbation draw, with dynamic sampling (groups whose outcomes are all equal are dropped and refilled).
- :func:`run_episodes` (evaluation): the first episode of each env from seeded resets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rvla_peft.algorithms.group import group_advantages, informative_groups
from rvla_peft.algorithms.ppo import bootstrap_truncated, compute_gae
from rvla_peft.envs.maniskill import Step
from rvla_peft.policies.base import Policy


@dataclass
class Batch:
    """A rollout flattened to samples ([T*N, ...] for PPO, [S, ...] for groups) with its advantages: what the
    objective (:mod:`rvla_peft.objective`) indexes by minibatch."""

    actions: Tensor
    log_probs: Tensor
    values: Tensor | None  # None without a critic
    advantages: Tensor
    returns: Tensor | None  # None without a critic
    means: Tensor
    ref_log_probs: Tensor | None  # the reference policy's log-probs of the actions (kl_to_base > 0)

    def __len__(self) -> int:
        return self.actions.shape[0]


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
    # success / return / length of finished episodes; "setting": the perturb.train entry each ran under
    # (sample_per_episode), -1 when not drawn per episode
    episodes: dict[str, Tensor] = field(default_factory=dict)
    env_steps: int = 0  # simulator steps taken: T * N, times the chunk length for action-chunking policies
    ref_log_probs: Tensor | None = None  # [T, N] log-probs of the actions under the base policy (filled by trainers)
    ref_log_probs_clean: Tensor | None = None  # the same on the clean frames (kl_to_base_frames=clean)
    rgb_clean: Tensor | None = None  # [T, N, H, W, 3] the frames before observation perturbations (env.keep_clean)

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

    def clean_observations(self, flat_index: Tensor) -> dict:
        """The same samples' observations as rendered, before the observation perturbations."""
        if self.rgb_clean is None:
            raise ValueError("this rollout kept no clean frames: collect from a PerturbedEnv with keep_clean=True")
        t, n = flat_index // self.num_envs, flat_index % self.num_envs
        return {"rgb": self.rgb_clean[t, n], "instruction": [self.instructions[i] for i in n.tolist()]}

    def next_indices(self, flat_index: Tensor) -> tuple[Tensor, Tensor]:
        """Flat index of each sample's next step in the same episode, and whether there is one (else itself)."""
        t = flat_index // self.num_envs
        valid = (t + 1 < self.num_steps) & ~self.dones.reshape(-1)[flat_index]
        return torch.where(valid, flat_index + self.num_envs, flat_index), valid

    @staticmethod
    def flat(x: Tensor) -> Tensor:
        """[T, N, ...] -> [T*N, ...]: the sample order of :meth:`observations`."""
        return x.reshape(-1, *x.shape[2:])

    def to_batch(self, cfg, ref_log_probs: Tensor | None = None) -> Batch:
        """Samples with GAE advantages and returns from the value head (``cfg``: the run's TrainConfig)."""
        advantages, returns = compute_gae(
            self.rewards, self.values, self.dones, self.next_value, gamma=cfg.ppo.gamma, gae_lambda=cfg.ppo.gae_lambda
        )
        f = self.flat
        ref = None if ref_log_probs is None else f(ref_log_probs)
        return Batch(f(self.actions), f(self.log_probs), f(self.values), f(advantages), f(returns), f(self.means), ref)

    def totals(self) -> dict[str, tuple[float, float | None]]:
        """This rollout type's own metrics as (numerator, denominator) sums over this rank's samples; the trainer
        sums both over ranks and divides (a None denominator: the metric is the sum itself)."""
        return {"rollout/step_reward": (self.rewards.sum().item(), float(self.rewards.numel()))}


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
    final_obs, dropped = out.final_obs, out.dropped
    for j in range(1, env_action.shape[1]):
        step = env.step(env_action[:, j])
        alive = ~done
        if step.dropped is not None:  # a dead env worker cut the episode short (restart_dead_workers)
            dropped = step.dropped & alive if dropped is None else dropped | (step.dropped & alive)
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
        dropped=dropped,
    )


def _where_rows(rows: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(rows.view(-1, *([1] * (a.dim() - 1))), a, b)


def with_instructions(obs: dict, env) -> dict:
    return {**obs, "instruction": env.instructions}


def _select(obs: dict, rows: Tensor) -> dict:
    return {k: (v[rows] if isinstance(v, Tensor) else [v[i] for i in rows.tolist()]) for k, v in obs.items()}


def episode_setting(env, device) -> Tensor:
    """[N] index of the ``perturb.train`` entry each env's current episode runs under, -1 where none is drawn per
    episode (a plain env, or every perturbation applying to every episode)."""
    choice = getattr(env, "episode_choice", None)
    if choice is None:
        return torch.full((env.num_envs,), -1, dtype=torch.long, device=device)
    return choice.to(device, torch.long, copy=True)


@torch.no_grad()
def collect(policy: Policy, env, obs: dict, num_steps: int, gamma: float) -> tuple[Rollout, dict]:
    """Run ``num_steps`` steps from ``obs``; returns the rollout and the observation to continue from."""
    device = policy.device
    rgb, actions, log_probs, values, rewards, dones, means = [], [], [], [], [], [], []
    success, returns, lengths, settings, clean = [], [], [], [], []
    chunk = 1
    for _ in range(num_steps):
        obs = with_instructions(obs, env)
        # the setting of the episode running now: one that ends in this (macro) step ran under it
        settings.append(episode_setting(env, device))
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
        if "rgb_clean" in obs:
            clean.append(obs["rgb_clean"])
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
            "setting": torch.stack(settings)[dones],
        },
        env_steps=num_steps * env.num_envs * chunk,
        rgb_clean=torch.stack(clean).to(device) if clean else None,
    )
    return rollout, obs


@dataclass
class GroupRollout:
    """Whole episodes in groups of G, the kept groups' steps flattened to S samples.

    Episodes of a group started from the same reset seed (so the same initial state) and the same perturbation
    draw; steps are ordered by group, then member, then time, so an episode's steps are contiguous. There is no
    padding: steps after an episode's end are never stored.
    """

    rgb: Tensor  # [S, H, W, 3] uint8
    actions: Tensor  # [S, ...] policy-space actions
    log_probs: Tensor  # [S] behaviour log-probs
    means: Tensor  # [S, A] behaviour policy's mean action
    env_index: Tensor  # [S] the env that ran the step (its instruction)
    episode: Tensor  # [S] index of the step's episode, g * G + j for member j of kept group g
    outcomes: Tensor  # [num_kept, G] float: success (0/1) or return of each kept episode
    group_seeds: Tensor  # [num_kept] the reset seed each kept group's episodes started from
    instructions: list[str]  # one per env
    episodes: dict[str, Tensor]  # success / return / length / setting of EVERY collected episode, dropped included
    groups_collected: int = 0  # groups run, kept or not
    env_steps: int = 0  # simulator steps taken (all passes, including envs idling after their episode)
    ref_log_probs: Tensor | None = None  # [S] log-probs of the actions under the base policy (filled by trainers)

    def __len__(self) -> int:
        return self.log_probs.shape[0]

    @property
    def groups_kept(self) -> int:
        return self.outcomes.shape[0]

    def observations(self, flat_index: Tensor) -> dict:
        env = self.env_index[flat_index]
        return {"rgb": self.rgb[flat_index], "instruction": [self.instructions[i] for i in env.tolist()]}

    def next_indices(self, flat_index: Tensor) -> tuple[Tensor, Tensor]:
        """Index of each sample's next step in the same episode, and whether there is one (else itself)."""
        nxt = (flat_index + 1).clamp(max=len(self) - 1)
        valid = (flat_index + 1 < len(self)) & (self.episode[nxt] == self.episode[flat_index])
        return torch.where(valid, nxt, flat_index), valid

    def step_advantages(self, advantages: Tensor) -> Tensor:
        """Per-episode advantages [num_kept, G] broadcast to every step of the episode: [S]."""
        return advantages.reshape(-1)[self.episode]

    @staticmethod
    def flat(x: Tensor) -> Tensor:
        """Samples are stored flat already."""
        return x

    def to_batch(self, cfg, ref_log_probs: Tensor | None = None) -> Batch:
        """Samples with each episode's advantage relative to its group (``cfg.algorithm``: rloo / grpo); no critic."""
        advantages = self.step_advantages(group_advantages(self.outcomes, cfg.algorithm))
        return Batch(self.actions, self.log_probs, None, advantages, None, self.means, ref_log_probs)

    def totals(self) -> dict[str, tuple[float, float | None]]:
        """Dynamic sampling's bookkeeping as (numerator, denominator) sums; see :meth:`Rollout.totals`."""
        kept, collected = float(self.groups_kept), float(self.groups_collected)
        return {
            "groups/kept_frac": (kept, collected),
            "groups/kept": (kept, None),
            "groups/collected": (collected, None),
            "groups/samples": (float(len(self)), None),
        }


@dataclass
class _Pass:
    """One episode per env from a seeded reset: per-env step tensors (only the episode's own steps)."""

    rgb: list[Tensor]
    actions: list[Tensor]
    log_probs: list[Tensor]
    means: list[Tensor]
    success: Tensor  # [N] bool
    returns: Tensor  # [N]
    lengths: Tensor  # [N] env steps
    setting: Tensor  # [N]
    env_steps: int
    dropped: Tensor  # [N] bool: the episode was cut short by a dead env worker, its outcome is unknown


def _first_episodes(policy: Policy, env, seed: int, max_steps: int) -> _Pass:
    n, device = env.num_envs, policy.device
    obs = env.reset(seed=seed)
    setting = episode_setting(env, device)
    alive = torch.ones(n, dtype=torch.bool, device=device)
    steps = torch.zeros(n, dtype=torch.long, device=device)  # (macro) steps of each env's first episode
    success = torch.zeros(n, dtype=torch.bool, device=device)
    returns = torch.zeros(n, dtype=torch.float32, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    dropped = torch.zeros(n, dtype=torch.bool, device=device)
    rgb, actions, log_probs, means = [], [], [], []
    env_steps = 0
    for _ in range(max_steps):
        obs = with_instructions(obs, env)
        sample = policy.act(obs)
        step = step_chunk(env, sample.env_action)
        env_steps += n * (sample.env_action.shape[1] if sample.env_action.dim() == 3 else 1)
        rgb.append(obs["rgb"].to(device))
        actions.append(sample.action)
        log_probs.append(sample.log_prob)
        means.append(sample.mean)
        steps += alive
        ended = (step.terminated | step.truncated).to(device) & alive
        success = torch.where(ended, step.episode_success.to(device), success)
        returns = torch.where(ended, step.episode_return.to(device).float(), returns)
        lengths = torch.where(ended, step.episode_length.to(device), lengths)
        if step.dropped is not None:
            dropped |= step.dropped.to(device) & ended
        alive &= ~ended
        obs = step.obs
        if not bool(alive.any()):  # one host sync per step: every env past its first episode ends the pass
            break
    if bool(alive.any()):
        raise RuntimeError(f"an episode did not end within max_steps={max_steps}: is it the env's time limit?")
    stacked = [torch.stack(x) for x in (rgb, actions, log_probs, means)]  # [T, N, ...]
    per_env = [[x[:k, i].clone() for i, k in enumerate(steps.tolist())] for x in stacked]  # clone: free [T, N]
    return _Pass(*per_env, success, returns, lengths, setting, env_steps, dropped)


@torch.no_grad()
def collect_groups(
    policy: Policy,
    env,
    num_groups: int,
    group_size: int,
    seed: int,
    max_steps: int,
    *,
    max_resample: int = 0,
    outcome: str = "success",
    dynamic_sampling: bool = True,
) -> GroupRollout:
    """Collect ``num_groups`` groups of ``group_size`` whole episodes (fewer if dynamic sampling runs out).

    Layout: env i of the batch holds a group; the batch runs ``group_size`` passes, each from ``env.reset(seed=s)``
    with the same ``s``, so member j of group i starts from reset seed ``s + i`` in every pass (the same initial
    state) and a seeded :class:`~rvla_peft.envs.PerturbedEnv` replays the same per-episode perturbation draws (its
    generator is reseeded from ``s`` at every reset); only the policy's sampling differs between members. Per-step
    noise drawn after the first episode of the batch ends may differ between members. A pass runs until every env
    has finished its first episode (at most ``max_steps`` steps); later auto-reset episodes are ignored.

    Dynamic sampling: groups whose outcomes are all equal are dropped, and rounds of ``env.num_envs`` new groups
    (the next round resets with ``s + N``) run until ``num_groups`` are kept, at most
    ``ceil(num_groups / N) + max_resample`` rounds. Kept groups beyond ``num_groups`` are discarded.
    """
    if outcome not in ("success", "return"):
        raise ValueError(f"outcome must be 'success' or 'return', got {outcome!r}")
    n, device = env.num_envs, policy.device
    rounds = math.ceil(num_groups / n) + (max_resample if dynamic_sampling else 0)
    kept_steps: list[list[list[Tensor]]] = [[], [], [], []]  # rgb, actions, log_probs, means: one tensor per episode
    kept_env, kept_outcomes, kept_seeds = [], [], []
    episodes: dict[str, list[Tensor]] = {"success": [], "return": [], "length": [], "setting": []}
    collected = env_steps = 0
    for r in range(rounds):
        if len(kept_outcomes) >= num_groups:
            break
        round_seed = seed + r * n
        passes = [_first_episodes(policy, env, round_seed, max_steps) for _ in range(group_size)]
        env_steps += sum(p.env_steps for p in passes)
        collected += n
        success = torch.stack([p.success for p in passes], dim=1)  # [N, G]
        returns = torch.stack([p.returns for p in passes], dim=1)
        episodes["success"].append(success.float().reshape(-1))
        episodes["return"].append(returns.reshape(-1))
        episodes["length"].append(torch.stack([p.lengths for p in passes], dim=1).float().reshape(-1))
        episodes["setting"].append(torch.stack([p.setting for p in passes], dim=1).reshape(-1))
        outcomes = success.float() if outcome == "success" else returns
        keep = informative_groups(outcomes) if dynamic_sampling else torch.ones(n, dtype=torch.bool, device=device)
        keep &= ~torch.stack([p.dropped for p in passes], dim=1).any(dim=1)  # an unknown outcome: not a failure
        for i in keep.nonzero().squeeze(-1).tolist():
            if len(kept_outcomes) == num_groups:
                break
            for p in passes:
                for store, x in zip(kept_steps, (p.rgb, p.actions, p.log_probs, p.means), strict=True):
                    store.append(x[i])
                kept_env.append(torch.full((p.rgb[i].shape[0],), i, dtype=torch.long, device=device))
            kept_outcomes.append(outcomes[i])
            kept_seeds.append(round_seed + i)
    if kept_outcomes:
        rgb, actions, log_probs, means = (torch.cat(x) for x in kept_steps)
        env_index = torch.cat(kept_env)
    else:  # nothing kept: empty tensors of the right dtypes and shapes, so callers need no special case
        last = passes[-1]
        rgb, actions, log_probs, means = (x[0][:0] for x in (last.rgb, last.actions, last.log_probs, last.means))
        env_index = torch.zeros(0, dtype=torch.long, device=device)
    lengths = torch.tensor([len(e) for e in kept_env], dtype=torch.long, device=device)
    return GroupRollout(
        rgb=rgb,
        actions=actions,
        log_probs=log_probs,
        means=means,
        env_index=env_index,
        episode=torch.repeat_interleave(torch.arange(len(kept_env), device=device), lengths),
        outcomes=torch.stack(kept_outcomes) if kept_outcomes else torch.zeros(0, group_size, device=device),
        group_seeds=torch.tensor(kept_seeds, dtype=torch.long),
        instructions=list(env.instructions),
        episodes={k: torch.cat(v) for k, v in episodes.items()},
        groups_collected=collected,
        env_steps=env_steps,
    )


@dataclass
class EpisodeOutcomes:
    """Per-episode results of an evaluation, in episode order (episode e started from reset seed ``seed + e``)."""

    success: Tensor  # [E] bool
    returns: Tensor  # [E] float32
    lengths: Tensor  # [E] int64

    @property
    def success_rate(self) -> float:
        return self.success.float().mean().item()


SCHEDULES = ("batch", "stream")


class ScheduleError(ValueError):
    """The ``stream`` schedule asked of an env or a policy that cannot run it."""


@torch.no_grad()
def run_episodes(
    policy: Policy,
    env,
    episodes: int,
    seed: int,
    max_steps: int,
    deterministic: bool = True,
    on_batch=None,
    schedule: str = "batch",
) -> EpisodeOutcomes:
    """Play ``episodes`` episodes, episode e from reset seed ``seed + e`` whatever the number of envs N.

    ``schedule="batch"``: the first episode of each env, in batches of N; batch b resets with ``seed + b * N``,
    so env i of batch b starts from seed ``seed + b * N + i``. Episodes that auto-reset within a batch are ignored:
    each batch runs until every env has finished one episode (at most ``max_steps`` steps, the env's time limit),
    the envs done early idling. A seeded :class:`~rvla_peft.envs.PerturbedEnv` replays the same perturbation
    draws for every policy (common random numbers) at the same N.

    ``schedule="stream"``: the envs play the episodes in order, each starting the next one as soon as it finishes
    its own (``VecEnv.queue_episodes``), so none idles until the last N episodes; the env must be a
    ``PerturbedEnv(keyed=True)`` (its draws follow each episode's reset seed, so they are common to every policy and
    every N) over CPU envs, and the policy must act one step at a time (no action chunks).

    ``on_batch(k)`` is called with the number of episodes finished since its last call (for a progress bar).
    """
    if schedule == "stream":
        return _stream_episodes(policy, env, episodes, seed, max_steps, deterministic, on_batch)
    if schedule != "batch":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
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


def _stream_episodes(policy, env, episodes, seed, max_steps, deterministic, on_finished) -> EpisodeOutcomes:
    if not getattr(env, "keyed", False):
        raise ScheduleError("schedule 'stream' needs PerturbedEnv(keyed=True): its draws follow each episode's seed")
    n = env.num_envs
    obs = env.reset(seed=seed)  # env i plays episode i
    env.queue_episodes([seed + e for e in range(n, episodes)])
    playing = torch.arange(n)  # the episode each env plays; -1 once it is past the last one (its steps are ignored)
    playing[episodes:] = -1
    success = torch.zeros(episodes, dtype=torch.bool)
    returns = torch.zeros(episodes, dtype=torch.float32)
    lengths = torch.zeros(episodes, dtype=torch.int64)
    left, age = episodes, torch.zeros(n, dtype=torch.int64)
    while left:
        sample = policy.act(with_instructions(obs, env), deterministic=deterministic)
        if sample.env_action.dim() != 2:
            raise ScheduleError("schedule 'stream' runs one action per step; a policy acting in chunks needs 'batch'")
        step = env.step(sample.env_action)
        if step.dropped is not None:
            raise RuntimeError("an env worker died and its episodes were lost: evaluate again")
        age += 1
        ends = ((step.terminated | step.truncated).cpu() & (playing >= 0)).nonzero().flatten()
        if (age[playing >= 0] > max_steps).any():
            raise RuntimeError(f"an episode did not end within max_steps={max_steps}: is it the env's time limit?")
        for i in ends.tolist():
            e = int(playing[i])
            success[e], returns[e] = step.episode_success[i], step.episode_return[i]
            lengths[e] = step.episode_length[i]
            started = -1 if step.reset_seeds is None else int(step.reset_seeds[i])
            playing[i], age[i] = (started - seed if started >= 0 else -1), 0
        left -= len(ends)
        if on_finished is not None and len(ends):
            on_finished(len(ends))
        obs = step.obs
    return EpisodeOutcomes(success, returns, lengths)
