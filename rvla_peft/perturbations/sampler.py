"""Which training perturbation each episode runs under (``perturb.sampler``, with ``perturb.sample_per_episode``).

    sampler = build_sampler(cfg.perturb, num_settings=len(cfg.perturb.train))
    choice = sampler.choose(starting, choice, generator)  # [N] index of each env's setting, redrawn where starting
    sampler.update(setting, success)  # once per finished episode
    sampler.choice_counts()  # episodes drawn per setting since the last call (for perturb/choice_<label>)

``PerturbedEnv`` calls all three; the trainer only logs the counts and checkpoints ``state_dict()``.

* ``uniform``: every starting episode draws a setting uniformly (``torch.randint`` on the caller's generator, the
  draws ``PerturbedEnv`` always made). It learns nothing.
* ``adversarial``: a bandit over the settings whose reward is failure: each starting episode runs under the setting
  with the highest recent failure rate plus an exploration bonus, so training spends its episodes where the policy
  fails now (a UCB choice of perturbation, as RobustVLA, arXiv 2510.00037). See :class:`AdversarialSampler`.

Both consume the same random numbers from the caller's generator (the adversarial sampler draws and discards the
uniform choice): the perturbations draw their parameters from that generator too, so switching the sampler leaves
their parameters unchanged (common random numbers).

Pure torch and Python, no simulator import.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Protocol

import torch

# Hoeffding's bound for an outcome in [0, 1]: P(mean - true >= eps) <= exp(-2 n eps^2). With eps = c sqrt(ln N / n)
# this is N^(-2 c^2): c = 1/sqrt(2) sets every setting's bonus at the 1/N level. UCB1 (Auer et al. 2002) uses
# sqrt(2), the N^-4 level: twice the bonus, so it spends more of a short run's episodes on settings already handled.
DEFAULT_EXPLORATION = 1 / math.sqrt(2)
# Finished episodes (all settings together) the failure rates are measured over: ~20 per setting with 5 settings
# (a binomial rate's standard error <= 0.11), ~15-30 updates of the tiny recipe, so the estimates follow the policy.
DEFAULT_WINDOW = 100

SAMPLERS = ("uniform", "adversarial")

Generators = torch.Generator | Sequence[torch.Generator]


class SamplerConfigLike(Protocol):
    """``rvla_peft.config.PerturbConfig`` or anything shaped like it (validated there)."""

    sampler: str
    sampler_exploration: float
    sampler_window: int


def _uniform_draws(
    num_settings: int, starting: torch.Tensor, current: torch.Tensor | None, generator: Generators
) -> torch.Tensor:
    """[N] the uniform choice at the starting envs, ``current`` elsewhere. One generator: ``randint`` for all N envs
    (the non-starting envs' numbers are drawn and dropped, so the stream advances alike whoever starts); one generator
    per env (``PerturbedEnv(keyed=True)``): one number from each starting env's own."""
    device = starting.device
    if isinstance(generator, torch.Generator):
        new = torch.randint(num_settings, (starting.shape[0],), generator=generator, device=device)
    else:
        new = torch.zeros(starting.shape[0], dtype=torch.long, device=device)
        if current is not None:
            new.copy_(current)
        for i in starting.nonzero().flatten().tolist():
            new[i] = torch.randint(num_settings, (1,), generator=generator[i], device=device)
    return new if current is None else torch.where(starting, new, current)


class UniformSampler:
    """Each starting episode draws one of ``num_settings`` uniformly; outcomes are ignored."""

    learns = False  # update() does nothing: PerturbedEnv need not read the outcomes (a host sync on GPU)

    def __init__(self, num_settings: int) -> None:
        if num_settings < 1:
            raise ValueError(f"a sampler needs at least one setting, got {num_settings}")
        self.num_settings = num_settings
        self._draws: torch.Tensor | None = None  # [K] int64 on the choices' device, summed without a host sync

    def choose(self, starting: torch.Tensor, current: torch.Tensor | None, generator: Generators) -> torch.Tensor:
        """[N] the setting of each env's episode: a new draw where ``starting`` ([N] bool), ``current`` elsewhere
        (None: every env starts)."""
        choice = _uniform_draws(self.num_settings, starting, current, generator)
        drawn = (torch.nn.functional.one_hot(choice, self.num_settings) * starting[:, None]).sum(0)
        self._draws = drawn if self._draws is None else drawn + self._draws.to(drawn.device)
        return choice

    def update(self, setting: int, success: bool) -> None:
        """An episode under ``setting`` ended (a uniform sampler ignores it)."""

    def choice_counts(self) -> list[int]:
        """Episodes drawn under each setting since the last call (then cleared)."""
        counts = self._counts()
        self._draws = None
        return counts

    def state_dict(self) -> dict:
        """The uncleared draw counts (the draws themselves follow the caller's generator)."""
        return {"kind": "uniform", "draws": self._counts()}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, "uniform", self.num_settings)
        self._draws = torch.tensor(state["draws"], dtype=torch.long)

    def _counts(self) -> list[int]:
        return [0] * self.num_settings if self._draws is None else [int(c) for c in self._draws.tolist()]


class AdversarialSampler:
    """Sliding-window UCB on failure: each starting episode runs under the setting k that maximises

        failure_k + c * sqrt(ln N / n_k)

    where failure_k is the failure rate of the episodes under k among the last ``window`` finished episodes (all
    settings together), n_k their number plus k's episodes still running, and N the sum of the n_k. A setting with
    no episode in the window and none running is tried first (in index order); one with running episodes but none
    finished in the window counts as failing (1.0) until one finishes.

    Why UCB on a sliding window (Garivier & Moulines 2011, SW-UCB) and not EXP3: the failure rates are not
    adversarial but drift slowly as the policy learns, and EXP3's importance-weighted estimates are noisy at the
    ~100s of episodes a run has; UCB is also what RobustVLA (arXiv 2510.00037) uses to pick its perturbations. The
    window makes the estimates follow the current policy, and a setting that drops out of it (the policy once
    handled it) is re-tried at once, so a setting the policy forgets is found again.

    Episodes start in batches (all envs at a reset) while their outcomes arrive later. The running episodes count
    in n_k and N with their setting's current estimate as outcome (GP-BUCB's hallucinated observations, Desautels
    et al. 2014), so a batch of starts spreads over the settings instead of all taking the same argmax. Within one
    call, envs choose in index order, each seeing the earlier ones as running.

    ``exploration`` is c (:data:`DEFAULT_EXPLORATION`: Hoeffding's 1/N level); 0 is greedy on the failure rate.
    """

    learns = True

    def __init__(
        self, num_settings: int, exploration: float = DEFAULT_EXPLORATION, window: int = DEFAULT_WINDOW
    ) -> None:
        if num_settings < 2:
            raise ValueError(f"the adversarial sampler chooses between settings: needs at least 2, got {num_settings}")
        if not (exploration >= 0 and math.isfinite(exploration)):
            raise ValueError(f"exploration must be a finite number >= 0, got {exploration}")
        if window < 1:
            raise ValueError(f"window must be >= 1 finished episode, got {window}")
        self.num_settings = num_settings
        self.exploration = float(exploration)
        self.window = int(window)
        self._recent: deque[tuple[int, bool]] = deque(maxlen=self.window)  # (setting, success), oldest first
        self._draws = [0] * num_settings

    def failure_rates(self) -> list[float | None]:
        """Each setting's failure rate over the window's episodes (None: none of them ran under it)."""
        runs, fails = self._window_counts()
        return [f / n if n else None for f, n in zip(fails, runs, strict=True)]

    def scores(self, running: Sequence[int] | None = None) -> list[float]:
        """The UCB score of each setting, ``running[k]`` episodes of setting k in flight (inf: untried)."""
        running = list(running) if running is not None else [0] * self.num_settings
        runs, fails = self._window_counts()
        total = sum(runs) + sum(running)
        scores = []
        for k in range(self.num_settings):
            n = runs[k] + running[k]
            if n == 0:
                scores.append(math.inf)
                continue
            failure = fails[k] / runs[k] if runs[k] else 1.0
            scores.append(failure + self.exploration * math.sqrt(math.log(total) / n))
        return scores

    def pick(self, running: Sequence[int] | None = None) -> int:
        """The setting with the highest score; ties go to the lowest index."""
        scores = self.scores(running)
        return max(range(self.num_settings), key=lambda k: (scores[k], -k))

    def choose(self, starting: torch.Tensor, current: torch.Tensor | None, generator: Generators) -> torch.Tensor:
        """[N] the setting of each env's episode: the UCB pick where ``starting`` ([N] bool), ``current`` elsewhere
        (None: every env starts). The uniform sampler's numbers are drawn and dropped (common random numbers)."""
        choice = _uniform_draws(self.num_settings, starting, current, generator).cpu()
        starts = starting.cpu()
        running = [0] * self.num_settings
        for k in choice[~starts].tolist():
            running[k] += 1
        for i in starts.nonzero().flatten().tolist():
            k = self.pick(running)
            running[k] += 1
            self._draws[k] += 1
            choice[i] = k
        return choice.to(starting.device)

    def update(self, setting: int, success: bool) -> None:
        """An episode under ``setting`` ended, succeeding or not: it enters the window (the oldest may leave)."""
        if not 0 <= setting < self.num_settings:
            raise ValueError(f"setting {setting} is not in [0, {self.num_settings})")
        self._recent.append((int(setting), bool(success)))

    def choice_counts(self) -> list[int]:
        """Episodes drawn under each setting since the last call (then cleared)."""
        counts, self._draws = self._draws, [0] * self.num_settings
        return counts

    def state_dict(self) -> dict:
        """What the next choices depend on: the window's outcomes and the uncleared draw counts (plain lists)."""
        return {
            "kind": "adversarial",
            "recent": [[k, int(s)] for k, s in self._recent],
            "draws": list(self._draws),
        }

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, "adversarial", self.num_settings)
        recent = [(int(k), bool(s)) for k, s in state["recent"]]
        if any(not 0 <= k < self.num_settings for k, _ in recent):
            raise ValueError(f"sampler state names a setting outside [0, {self.num_settings})")
        self._recent = deque(recent, maxlen=self.window)
        self._draws = [int(c) for c in state["draws"]]

    def _window_counts(self) -> tuple[list[int], list[int]]:
        runs, fails = [0] * self.num_settings, [0] * self.num_settings
        for k, success in self._recent:
            runs[k] += 1
            fails[k] += not success
        return runs, fails


PerturbationSampler = UniformSampler | AdversarialSampler


def _check_state(state: dict, kind: str, num_settings: int) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"sampler state of a {state.get('kind')!r} sampler cannot load into a {kind!r} one")
    if len(state["draws"]) != num_settings:
        raise ValueError(f"sampler state has {len(state['draws'])} settings, this sampler {num_settings}")


def build_sampler(cfg: SamplerConfigLike, num_settings: int) -> PerturbationSampler:
    """The sampler ``cfg.sampler`` names, over ``num_settings`` settings."""
    if cfg.sampler == "uniform":
        return UniformSampler(num_settings)
    if cfg.sampler == "adversarial":
        return AdversarialSampler(num_settings, cfg.sampler_exploration, cfg.sampler_window)
    raise ValueError(f"unknown perturbation sampler {cfg.sampler!r}; use one of {', '.join(SAMPLERS)}")
