"""Evaluate policies on a grid of perturbation settings with common random numbers, and build the report dict.

Every policy (the base, then each adapter) is evaluated on the same grid: clean plus each perturbation of the suite
at each of its severities. Common random numbers make the comparison paired: episode e of every cell starts from
reset seed ``seed + e``, and every cell's perturbations draw from a generator seeded the same way for every
policy, so two policies see the same initial states and the same perturbation draws.

report.json, schema_version 1::

    {"schema_version", "command", "created", "versions", "task", "suite", "episodes", "seed", "deterministic",
     "schedule", "policies": [{"name", "base", "adapter"}],
     "settings": [{"name", "perturbation", "severity", "specs": [{"name", "severity", "resample"}]}],
     "results": [{"policy", "setting", "success_rate", "ci95", "mean_return", "episodes", "successes"}],
     "summary": {policy: {"clean_success_rate", "mean_perturbed_success_rate", "robustness_gap",
                          "gap_by_perturbation": {perturbation: gap}}},
     "paired": [{"policy", "baseline", "setting", "difference", "ci95", "p_mcnemar"}],
     "arms": [{"arm", "setting", "seeds", "per_seed", "mean", "ci95", "t95", and against the baseline "baseline",
               "differences", "difference", "difference_ci95", "difference_t95", on "mean perturbed" "gap_cut",
               "gap_cut_ci95"}],
     "intervals": {"results", "paired", "p_mcnemar", "arms": the method of each interval or test, in words},
     "videos": [{"setting", "mp4", "gif", "seeds", "successes": {policy: [0/1 per recorded episode]}}]}

``resample`` (added in version 1, absent from older reports): when each spec's random parameters were drawn,
"episode" (held per episode) or "step" (redrawn every step), per component joined by "+" for a combination.
``schedule`` (added in version 1; absent means "batch"): how the episodes ran (``run_episodes``). "batch": the
perturbation draws depend on the number of envs too, so two reports pair episode for episode only at the same
number; "stream": on the episodes' reset seeds alone.
``intervals`` and ``p_mcnemar`` (added in version 1): reports without them computed ``paired`` intervals by a normal
approximation, and ``arms`` had only ``t95`` intervals (Student-t over seeds).
``videos`` (added in version 1, only when clips were recorded: ``--video K``): per setting, a side-by-side clip of
its first K episodes (paths relative to the report's folder), their reset seeds and each policy's outcomes.

Intervals: a cell's success rate, Wilson; a paired difference of two policies, Newcombe's score interval for paired
proportions with the exact McNemar p-value; an arm's training seeds, the two-level bootstrap over seeds and
episodes (:mod:`rvla_peft.stats`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from rvla_peft.envs.perturbed import PerturbedEnv
from rvla_peft.perturbations.specs import CLEAN, Setting, spec_records
from rvla_peft.rollout import run_episodes
from rvla_peft.stats import (
    DIFFERENCE_BOUNDS,
    MCNEMAR,
    NEWCOMBE,
    RATE_BOUNDS,
    TWO_LEVEL,
    WILSON,
    TwoLevelBootstrap,
    paired_proportion_difference,
    t_interval,
    wilson_interval,
)

SCHEMA_VERSION = 1


@dataclass
class CellResult:
    policy: str
    setting: str
    successes: list[bool]
    returns: list[float]

    @property
    def episodes(self) -> int:
        return len(self.successes)

    @property
    def success_rate(self) -> float:
        return sum(self.successes) / self.episodes

    def as_dict(self) -> dict:
        return {
            "policy": self.policy,
            "setting": self.setting,
            "success_rate": self.success_rate,
            "ci95": list(wilson_interval(sum(self.successes), self.episodes)),
            "mean_return": sum(self.returns) / self.episodes,
            "episodes": self.episodes,
            "successes": [int(s) for s in self.successes],
        }


def _play_cell(policy, env, setting: Setting, episodes, seed, max_steps, deterministic, progress, schedule, record=()):
    """One cell of the grid: ``policy`` on ``setting``'s perturbations over episodes ``seed .. seed + episodes - 1``;
    its outcomes, and the :class:`FrameRecorder` that kept the frames of the episodes with reset seeds in ``record``
    (None if none)."""
    perturbed = PerturbedEnv(env, setting.specs, seed=seed, keyed=schedule == "stream")
    recorder = FrameRecorder(perturbed, record) if record else None
    # Sampled actions draw from torch's global RNG: seed it per cell (and restore it after).
    devices = [env.device] if env.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        played = recorder or perturbed
        out = run_episodes(policy, played, episodes, seed, max_steps, deterministic, progress, schedule)
    return out, recorder


def evaluate_grid(
    policies: dict[str, object],
    env,
    settings: list[Setting],
    episodes: int,
    seed: int,
    max_steps: int,
    deterministic: bool = True,
    progress: Callable[[int], None] | None = None,
    schedule: str = "batch",
) -> list[CellResult]:
    """Run every policy on every setting over the same ``episodes`` (common random numbers); one shared env.
    ``schedule``: ``run_episodes``'s."""
    results = []
    for setting in settings:
        for name, policy in policies.items():
            out, _ = _play_cell(policy, env, setting, episodes, seed, max_steps, deterministic, progress, schedule)
            results.append(CellResult(name, setting.name, out.success.cpu().tolist(), out.returns.cpu().tolist()))
    return results


class FrameRecorder:
    """An env wrapper (around the :class:`PerturbedEnv` of a cell) that keeps the frames of the episodes starting
    from the reset seeds in ``seeds``: every observation the env returns in them (what the policy saw), the last one
    (``final_obs``) included; ``frames[seed]``: uint8 [T, H, W, 3] once that episode has ended. An env's episode
    is known by its reset seed: ``seed + i`` after ``reset(seed)``, ``Step.reset_seeds`` for a queued episode, none
    for an auto-reset one (never kept). Everything else is the wrapped env's."""

    def __init__(self, env, seeds) -> None:
        self.env, self.seeds = env, set(seeds)
        self.frames: dict[int, np.ndarray] = {}
        self._playing: list[int] = []  # the reset seed of each env's episode, -1 if unknown
        self._current: list[list[np.ndarray]] = []

    def __getattr__(self, name: str):
        return getattr(self.env, name)

    def reset(self, seed: int | None = None, rebuild: bool = False):
        obs = self.env.reset(seed=seed, rebuild=rebuild)
        self._playing = [-1 if seed is None else seed + i for i in range(self.env.num_envs)]
        self._current = [[] for _ in self._playing]
        self._keep(obs["rgb"])
        return obs

    def step(self, action):
        step = self.env.step(action)
        for i in (step.terminated | step.truncated).cpu().nonzero().flatten().tolist():
            if self._wanted(i):
                if step.final_obs is not None:
                    self._current[i].append(step.final_obs["rgb"][i].cpu().numpy())
                self.frames[self._playing[i]] = np.stack(self._current[i])
            self._playing[i] = -1 if step.reset_seeds is None else int(step.reset_seeds[i])
            self._current[i] = []
        self._keep(step.obs["rgb"])
        return step

    def _wanted(self, i: int) -> bool:
        return self._playing[i] in self.seeds and self._playing[i] not in self.frames

    def _keep(self, rgb) -> None:
        rows = [i for i in range(len(self._playing)) if self._wanted(i)]
        if rows:
            frames = rgb[rows].cpu().numpy()
            for j, i in enumerate(rows):
                self._current[i].append(frames[j])


@dataclass
class RecordedCell:
    """The first episodes of a cell played again with their frames (:func:`record_grid`)."""

    policy: str
    setting: str
    successes: list[bool]
    returns: list[float]
    frames: list[np.ndarray]  # per episode, uint8 [T, H, W, 3]


def record_grid(
    policies: dict[str, object],
    env,
    settings: list[Setting],
    episodes: int,
    seed: int,
    max_steps: int,
    deterministic: bool = True,
    schedule: str = "batch",
) -> list[RecordedCell]:
    """Play the first ``episodes`` episodes of every cell of :func:`evaluate_grid` (called with the same arguments)
    again, keeping their frames. The same reset seeds, perturbation draws and (sampled actions) RNG seed give the
    same episodes: with the batch schedule the first batches are replayed whole, with the stream schedule every
    episode depends on its seed alone. A second pass, so that the grid itself never copies a frame."""
    seeds = range(seed, seed + episodes)
    cells = []
    for setting in settings:
        for name, policy in policies.items():
            out, recorder = _play_cell(
                policy, env, setting, episodes, seed, max_steps, deterministic, None, schedule, record=seeds
            )
            frames = [recorder.frames[s] for s in seeds]
            success, returns = out.success.cpu().tolist(), out.returns.cpu().tolist()
            cells.append(RecordedCell(name, setting.name, success, returns, frames))
    return cells


def replay_mismatches(results: list[CellResult], recorded: list[RecordedCell]) -> list[str]:
    """The recorded cells whose outcomes (success and return) differ from the grid's on the same episodes (none
    expected)."""
    cell = {(r.policy, r.setting): r for r in results}
    mismatches = []
    for r in recorded:
        grid, k = cell[r.policy, r.setting], len(r.successes)
        if (grid.successes[:k], grid.returns[:k]) != (r.successes, r.returns):
            mismatches.append(f"{r.policy} on {r.setting}")
    return mismatches


def write_videos(recorded: list[RecordedCell], out: Path, folder: str, seed: int) -> list[dict]:
    """One MP4 and one GIF per setting under ``out / folder``: each recorded episode in turn, the policies side by
    side. Returns the report's ``videos`` entries (paths relative to ``out``)."""
    from rvla_peft.utils import video

    by_setting: dict[str, list[RecordedCell]] = {}
    for r in recorded:
        by_setting.setdefault(r.setting, []).append(r)
    entries = []
    for setting, cells in by_setting.items():
        frames = []
        for e in range(len(cells[0].frames)):
            played = [video.EpisodeFrames(c.policy, c.frames[e], c.successes[e]) for c in cells]
            frames += video.side_by_side(played, f"{setting} | episode {e} (reset seed {seed + e})")
        stem = f"{folder}/{video.file_stem(setting)}"
        video.write_mp4(frames, out / f"{stem}.mp4")
        video.write_gif(frames, out / f"{stem}.gif")
        entries.append({"setting": setting, "mp4": f"{stem}.mp4", "gif": f"{stem}.gif",
                        "seeds": [seed + e for e in range(len(cells[0].frames))],
                        "successes": {c.policy: [int(s) for s in c.successes] for c in cells}})  # fmt: skip
    return entries


def summarize(results: list[CellResult], settings: list[Setting], baseline: str | None) -> tuple[dict, list]:
    """Per-policy robustness gaps (clean minus perturbed) and the paired difference of each policy vs ``baseline``."""
    cell = {(r.policy, r.setting): r for r in results}
    policies = list(dict.fromkeys(r.policy for r in results))
    perturbed = [s for s in settings if s.name != CLEAN.name]
    summary = {}
    for policy in policies:
        clean = cell[policy, CLEAN.name].success_rate if (policy, CLEAN.name) in cell else None
        rates = {s.name: cell[policy, s.name].success_rate for s in perturbed}
        mean_perturbed = sum(rates.values()) / len(rates) if rates else None
        by_family: dict[str, list[float]] = {}
        for s in perturbed:
            by_family.setdefault(s.perturbation, []).append(rates[s.name])
        summary[policy] = {
            "clean_success_rate": clean,
            "mean_perturbed_success_rate": mean_perturbed,
            "robustness_gap": None if clean is None or mean_perturbed is None else clean - mean_perturbed,
            "gap_by_perturbation": {
                p: (None if clean is None else clean - sum(v) / len(v)) for p, v in by_family.items()
            },
        }
    paired = []
    if baseline is not None:
        for policy in policies:
            if policy == baseline:
                continue
            for s in settings:
                a, b = cell[policy, s.name], cell[baseline, s.name]
                diff, lo, hi, p = paired_proportion_difference(a.successes, b.successes)
                paired.append({"policy": policy, "baseline": baseline, "setting": s.name, "difference": diff,
                               "ci95": [lo, hi], "p_mcnemar": p})  # fmt: skip
    return summary, paired


ARM_SEPARATOR = "/"  # adapters named ARM/SEED are training seeds of one arm: `--adapter robust/0=... robust/1=...`


def arm_of(policy: str) -> str | None:
    arm, sep, seed = policy.rpartition(ARM_SEPARATOR)
    return arm if sep and arm and seed else None


BOOTSTRAP_RESAMPLES = 2000


def summarize_arms(
    results: list[CellResult],
    settings: list[Setting],
    baseline: str | None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    bootstrap_seed: int = 0,
) -> list[dict]:
    """Seed-level statistics for every arm with two or more training seeds (adapters named ``ARM/SEED``): per
    setting (and for the mean over perturbed settings), each seed's success and the mean over seeds with its 95%
    two-level bootstrap interval (training seeds and evaluation episodes resampled, ``resamples`` draws from
    ``bootstrap_seed``); against ``baseline`` (evaluated once: its episodes count once), each seed's difference and
    the mean difference, paired by episode, with its bootstrap interval, and on the mean perturbed row the share of
    the baseline's robustness gap the arm closes. ``t95`` / ``difference_t95``: the Student-t interval over seeds
    alone (episodes held fixed, clipped to what is possible), for comparison."""
    cell = {(r.policy, r.setting): r for r in results}
    arms: dict[str, list[str]] = {}
    for policy in dict.fromkeys(r.policy for r in results):
        if (arm := arm_of(policy)) is not None:
            arms.setdefault(arm, []).append(policy)
    arms = {arm: seeds for arm, seeds in arms.items() if len(seeds) >= 2}
    if not arms:
        return []
    names = [s.name for s in settings]
    perturbed = [i for i, s in enumerate(settings) if s.name != CLEAN.name]
    clean = names.index(CLEAN.name) if CLEAN.name in names else None
    compare = baseline is not None
    outcomes = {arm: [[cell[p, n].successes for n in names] for p in seeds] for arm, seeds in arms.items()}
    base_key = "\0baseline"  # no arm's name: a baseline named like an arm stays apart
    if compare:
        outcomes[base_key] = [[cell[baseline, n].successes for n in names]]
    boot = TwoLevelBootstrap(outcomes, resamples=resamples, seed=bootstrap_seed)
    rate = {(p, n): cell[p, n].success_rate for p in {r.policy for r in results} for n in names}
    rows = []
    for arm, seeds in arms.items():
        rows_of_arm = [(n, [i]) for i, n in enumerate(names)] + ([("mean perturbed", perturbed)] if perturbed else [])
        for name, keys in rows_of_arm:
            per_seed = [sum(rate[p, names[k]] for k in keys) / len(keys) for p in seeds]
            mean, lo, hi = boot.mean(arm, keys)
            row = {"arm": arm, "setting": name, "seeds": seeds, "per_seed": per_seed, "mean": mean, "ci95": [lo, hi],
                   "t95": list(t_interval(per_seed, RATE_BOUNDS)[1:])}  # fmt: skip
            if compare and arm_of(baseline) != arm:
                base = sum(rate[baseline, names[k]] for k in keys) / len(keys)
                diffs = [v - base for v in per_seed]
                d, dlo, dhi = boot.difference(arm, base_key, keys)
                row.update({"baseline": baseline, "differences": diffs, "difference": d, "difference_ci95": [dlo, dhi],
                            "difference_t95": list(t_interval(diffs, DIFFERENCE_BOUNDS)[1:])})  # fmt: skip
                if name == "mean perturbed" and clean is not None:
                    cut, clo, chi = boot.gap_cut(arm, base_key, clean, perturbed)
                    row.update({"gap_cut": cut, "gap_cut_ci95": [clo, chi]})
            rows.append(row)
    return rows


def interval_methods(episodes: int, resamples: int = BOOTSTRAP_RESAMPLES, bootstrap_seed: int = 0) -> dict:
    """How each of a report's intervals is computed, in words (the report's footnotes)."""
    return {
        "results": f"{WILSON} over the cell's {episodes} episodes",
        "paired": f"{NEWCOMBE}, over the {episodes} episode pairs",
        "p_mcnemar": f"{MCNEMAR} (binomial on the pairs that disagree)",
        "arms": f"{TWO_LEVEL} ({resamples} resamples, seed {bootstrap_seed}; episodes resampled jointly across "
        "arms and settings, a baseline evaluated once counted once)",
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("rvla_peft", "torch", "transformers", "peft", "accelerate", "mani_skill"):
        try:
            out[package] = version(package.replace("_", "-"))
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def build_report(
    results: list[CellResult],
    settings: list[Setting],
    policies: list[dict],
    *,
    task: str,
    suite: str | None,
    episodes: int,
    seed: int,
    deterministic: bool,
    command: str,
    schedule: str = "batch",
    videos: list[dict] | None = None,
) -> dict:
    baseline = policies[0]["name"] if len(policies) > 1 else None
    summary, paired = summarize(results, settings, baseline)
    arms = summarize_arms(results, settings, baseline)
    report = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": versions(),
        "task": task,
        "suite": suite,
        "episodes": episodes,
        "seed": seed,
        "deterministic": deterministic,
        "schedule": schedule,
        "policies": policies,
        "settings": [{**asdict(s), "specs": spec_records(s.specs)} for s in settings],
        "results": [r.as_dict() for r in results],
        "summary": summary,
        "paired": paired,
        "arms": arms,
        "intervals": interval_methods(episodes),
    }
    if videos:
        report["videos"] = videos
    return report
