"""The env wrapper that applies perturbations to a VecEnv's observations and executed actions."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from rvla_peft.envs.maniskill import Step, VecEnv
from rvla_peft.perturbations.base import (
    ActionPerturbation,
    Generators,
    Obs,
    ObservationPerturbation,
    Perturbation,
    SpecLike,
    _rows,
    check_severity,
)
from rvla_peft.perturbations.sampler import PerturbationSampler, UniformSampler
from rvla_peft.perturbations.specs import build_perturbations, spec_label
from rvla_peft.utils.threads import torch_threads

# --------------------------------------------------------------------------------------------------------------
# The wrapper


@contextlib.contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """On CPU, run the perturbations on one intra-op thread.

    A batch is a few small images: threads only add overhead there, and OpenMP workers spin-waiting after each
    parallel op take the cores from the simulator and renderer that run next (on 2 cores, env steps went 2x slower
    with the observation suite; bench/bench_perturbations.py).
    """
    with torch_threads(1 if device.type == "cpu" and torch.backends.openmp.is_available() else None):
        yield


def _where_obs(mask: torch.Tensor, a: Obs, b: Obs) -> Obs:
    return {k: torch.where(_rows(mask, a[k]), a[k], b[k]) for k in a}


class PerturbedEnv:
    """A VecEnv whose observations and executed actions are perturbed; same interface as the env it wraps.

    Observation perturbations apply to ``obs`` and ``final_obs`` returned by ``reset`` and ``step``; action
    perturbations apply to the action handed to the inner env only (the caller's tensor is never modified).
    ``reset(seed=s)`` also reseeds the perturbations' generator from ``(seed, s)``, so a seeded evaluation is
    reproducible. With no specs it is a pass-through.

    Episodes: ``reset`` restarts every perturbation's per-env state; after a step in which some envs finished
    (the inner env auto-resets them, so ``step.obs`` already starts their next episode), ``final_obs`` is perturbed
    first with the finished episodes' state (``peek``), then ``reset(done)`` restarts those envs, then ``obs``.
    A perturbation with ``resample="episode"`` (shift, rotation, colour jitter, ...) draws env i's parameters at the
    start of its episode and holds them until it ends; one with ``resample="step"`` redraws them at every step
    (``rvla_peft.perturbations.base``). ``final_obs`` is perturbed without advancing the generator, so the draws of
    every step depend only on the seed and the step number, not on when episodes end: two policies evaluated with
    the same seed see the same draws (common random numbers) even once their episodes end at different times.

    ``sample_per_episode``: instead of every spec applying to every env, each env draws one spec (a combination
    counts as one) at each episode start, chosen by ``sampler`` (``rvla_peft.perturbations.sampler``: uniformly by
    default; ``AdversarialSampler`` favours the specs under which recent episodes failed, fed each finished
    episode's success here); every spec runs on the whole batch and ``torch.where`` selects per env.
    ``set_severity_scale(s)`` multiplies every severity by s (a curriculum).

    ``keyed``: each env draws from its own generator, seeded from ``(seed, r)`` where r is the reset seed of its
    episode (``seed + i`` for env i after ``reset(seed)``, a queued episode's seed after that: ``Step.reset_seeds``).
    An episode's draws then depend on its reset seed alone, not on the env it runs in, the number of envs or when
    the other envs' episodes end (the evaluation's ``stream`` schedule). Every episode must start from a seed. (An
    adversarial ``sampler``'s choice of spec depends on earlier outcomes too; the spec's own draws still do not.)
    """

    def __init__(
        self,
        env: VecEnv,
        specs: list[SpecLike],
        seed: int = 0,
        sample_per_episode: bool = False,
        keyed: bool = False,
        sampler: PerturbationSampler | None = None,
    ) -> None:
        self.env = env
        self.seed = seed
        self.groups = [build_perturbations([spec]) for spec in specs]
        self.perturbations = [p for group in self.groups for p in group]
        self.sample_per_episode = sample_per_episode and len(self.groups) > 1
        self._base_severity = [p.severity for p in self.perturbations]
        self._choice: torch.Tensor | None = None  # [N] index of each env's group under sample_per_episode
        self.sampler = sampler if sampler is not None else UniformSampler(max(len(self.groups), 1))
        if self.sampler.num_settings != max(len(self.groups), 1):
            raise ValueError(f"the sampler chooses among {self.sampler.num_settings} settings, not {len(self.groups)}")
        self.setting_labels = [spec_label(spec) for spec in specs]
        self.severity_scale = 1.0
        self.generator = torch.Generator(device=env.device)
        self.generator.manual_seed(seed)
        self.keyed = keyed
        self._generators = [torch.Generator(device=env.device) for _ in range(env.num_envs)] if keyed else []
        # Also return each frame as rendered, before the observation perturbations, as obs["rgb_clean"] (the
        # invariance penalty compares the policy on both).
        self.keep_clean = False

    @property
    def num_envs(self) -> int:
        return self.env.num_envs

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def action_dim(self) -> int:
        return self.env.action_dim

    @property
    def instructions(self) -> list[str]:
        return self.env.instructions

    @property
    def episode_choice(self) -> torch.Tensor | None:
        """[N] index in ``specs`` of the entry each env's current episode runs under (``sample_per_episode``), else
        None. Read before a step: an episode that ends in the step ran under it (rollouts log success per entry)."""
        return self._choice if self.sample_per_episode else None

    def sampler_metrics(self) -> dict[str, float]:
        """``perturb/choice_<label>``: the share of the episodes started since the last call that drew each spec
        (``sample_per_episode``; empty when none started or nothing is drawn per episode)."""
        if not self.sample_per_episode:
            return {}
        counts = self.sampler.choice_counts()
        total = sum(counts)
        if not total:
            return {}
        return {f"perturb/choice_{label}": n / total for label, n in zip(self.setting_labels, counts, strict=True)}

    def sampler_state_dict(self) -> dict:
        """The sampler's state (an adversarial sampler's recent outcomes), for a checkpoint."""
        return self.sampler.state_dict()

    def load_sampler_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def set_severity_scale(self, scale: float) -> None:
        """Effective severity = each spec's severity x ``scale`` in [0, 1], from the next step on."""
        check_severity("severity scale", scale)
        self.severity_scale = float(scale)
        for p, base in zip(self.perturbations, self._base_severity, strict=True):
            p.severity = base * self.severity_scale

    def reset(self, seed: int | None = None, rebuild: bool = False) -> Obs:
        if seed is not None:
            # hash of a tuple of ints is stable across processes (no hash randomisation for ints).
            self.generator.manual_seed(hash((self.seed, seed)))
            for i, generator in enumerate(self._generators):
                generator.manual_seed(hash((self.seed, seed + i)))
        elif self.keyed:
            raise ValueError("PerturbedEnv(keyed=True) draws from each episode's reset seed: reset it with a seed")
        obs = self.env.reset(seed=seed, rebuild=rebuild)
        self._start_episodes(torch.ones(self.num_envs, dtype=torch.bool, device=self.device))
        return self._perturb_obs(obs)

    def step(self, action: torch.Tensor) -> Step:
        step = self.env.step(self._perturb_action(action.to(self.device)))
        if not self.perturbations and not self.keep_clean:
            return step
        final_obs = None
        if step.final_obs is not None:  # some episode ended (known without a device sync)
            # The generator's state is a host-side (seed, offset) on CUDA too: saving it costs no sync.
            generators = [self.generator, *self._generators]
            states = [g.get_state() for g in generators]
            final_obs = self._perturb_obs(step.final_obs, peek=True)
            for g, state in zip(generators, states, strict=True):
                g.set_state(state)
            if self.sample_per_episode and self.sampler.learns:
                self._report_outcomes(step)
            if self.keyed and step.reset_seeds is not None:
                for i in (step.reset_seeds >= 0).nonzero().flatten().tolist():
                    self._generators[i].manual_seed(hash((self.seed, int(step.reset_seeds[i]))))
            self._start_episodes(step.terminated | step.truncated)
        return dataclasses.replace(step, obs=self._perturb_obs(step.obs), final_obs=final_obs)

    def queue_episodes(self, seeds: list[int]) -> None:
        """The inner env's :meth:`~rvla_peft.envs.maniskill.VecEnv.queue_episodes`."""
        self.env.queue_episodes(seeds)

    def close(self) -> None:
        self.env.close()

    def _report_outcomes(self, step: Step) -> None:
        """Each finished episode's success to the sampler, under the spec it ran with (before the next draw); an
        episode a dead env worker cut short has no outcome."""
        ended = step.terminated | step.truncated
        if step.dropped is not None:
            ended = ended & ~step.dropped.to(ended.device)
        rows = ended.nonzero().flatten().tolist()
        if rows:
            choice, success = self._choice.tolist(), step.episode_success.tolist()
            for i in rows:
                self.sampler.update(choice[i], success[i])

    def _start_episodes(self, done: torch.Tensor) -> None:
        for p in self.perturbations:
            p.reset(done)
        if not self.sample_per_episode:
            return
        # keyed: only the starting envs draw, each from its own generator
        self._choice = self.sampler.choose(done, self._choice, self._generators if self.keyed else self.generator)

    @property
    def _draw_from(self) -> Generators:
        return self._generators if self.keyed else self.generator

    def _chosen(self) -> list[tuple[torch.Tensor | None, list[Perturbation]]]:
        """(env mask or None for all envs, perturbations) pairs to run."""
        if not self.sample_per_episode:
            return [(None, self.perturbations)]
        return [(self._choice == i, group) for i, group in enumerate(self.groups)]

    def _perturb_obs(self, obs: Obs, peek: bool = False) -> Obs:
        out = obs
        with _one_thread_on_cpu(self.device):
            for mask, group in self._chosen():
                chain = [p for p in group if isinstance(p, ObservationPerturbation)]
                if not chain:
                    continue
                y = obs
                for p in chain:
                    y = p.peek(y, self._draw_from) if peek else p.apply(y, self._draw_from)
                out = y if mask is None else _where_obs(mask, y, out)
        return {**out, "rgb_clean": obs["rgb"]} if self.keep_clean else out

    def _perturb_action(self, action: torch.Tensor) -> torch.Tensor:
        out = action
        with _one_thread_on_cpu(self.device):
            for mask, group in self._chosen():
                chain = [p for p in group if isinstance(p, ActionPerturbation)]
                if not chain:
                    continue
                y = action
                for p in chain:
                    y = p.apply(y, self._draw_from)
                out = y if mask is None else torch.where(mask[:, None], y, out)
        return out
