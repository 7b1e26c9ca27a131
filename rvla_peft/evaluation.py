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
     "paired": [{"policy", "baseline", "setting", "difference", "ci95"}]}

``resample`` (added in version 1, absent from older reports): when each spec's random parameters were drawn,
"episode" (held per episode) or "step" (redrawn every step), per component joined by "+" for a combination.
``schedule`` (added in version 1; absent means "batch"): how the episodes ran (``run_episodes``). "batch": the
perturbation draws depend on the number of envs too, so two reports pair episode for episode only at the same
number; "stream": on the episodes' reset seeds alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import torch

from rvla_peft.envs.perturbed import PerturbedEnv
from rvla_peft.perturbations.specs import CLEAN, Setting, spec_records
from rvla_peft.rollout import run_episodes
from rvla_peft.stats import paired_difference, t_interval, wilson_interval

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
            perturbed = PerturbedEnv(env, setting.specs, seed=seed, keyed=schedule == "stream")
            # Sampled actions draw from torch's global RNG: seed it per cell (and restore it after).
            devices = [env.device] if env.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                out = run_episodes(
                    policy, perturbed, episodes, seed, max_steps, deterministic, on_batch=progress, schedule=schedule
                )
            results.append(CellResult(name, setting.name, out.success.cpu().tolist(), out.returns.cpu().tolist()))
    return results


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
                diff, lo, hi = paired_difference(torch.tensor(a.successes), torch.tensor(b.successes))
                paired.append({"policy": policy, "baseline": baseline, "setting": s.name, "difference": diff,
                               "ci95": [lo, hi]})  # fmt: skip
    return summary, paired


ARM_SEPARATOR = "/"  # adapters named ARM/SEED are training seeds of one arm: `--adapter robust/0=... robust/1=...`


def arm_of(policy: str) -> str | None:
    arm, sep, seed = policy.rpartition(ARM_SEPARATOR)
    return arm if sep and arm and seed else None


def summarize_arms(results: list[CellResult], settings: list[Setting], baseline: str | None) -> list[dict]:
    """Seed-level statistics for every arm with two or more training seeds (adapters named ``ARM/SEED``): per
    setting (and for the mean over perturbed settings), each seed's success, the mean over seeds with its 95%
    Student-t interval over seeds and, against ``baseline``, each seed's paired difference with its t interval.
    The episode-pooled intervals elsewhere in the report ignore the variation between training seeds."""
    cell = {(r.policy, r.setting): r.success_rate for r in results}
    arms: dict[str, list[str]] = {}
    for policy in dict.fromkeys(r.policy for r in results):
        if (arm := arm_of(policy)) is not None:
            arms.setdefault(arm, []).append(policy)
    perturbed = [s.name for s in settings if s.name != CLEAN.name]
    rows = []
    for arm, seeds in arms.items():
        if len(seeds) < 2:
            continue
        names = [s.name for s in settings] + (["mean perturbed"] if perturbed else [])
        for name in names:
            keys = perturbed if name == "mean perturbed" else [name]
            per_seed = [sum(cell[p, k] for k in keys) / len(keys) for p in seeds]
            mean, lo, hi = t_interval(per_seed)
            row = {"arm": arm, "setting": name, "seeds": seeds, "per_seed": per_seed, "mean": mean, "t95": [lo, hi]}
            if baseline is not None and arm_of(baseline) != arm:
                base = sum(cell[baseline, k] for k in keys) / len(keys)
                diffs = [v - base for v in per_seed]
                d, dlo, dhi = t_interval(diffs)
                row.update({"baseline": baseline, "differences": diffs, "difference": d, "difference_t95": [dlo, dhi]})
            rows.append(row)
    return rows


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
) -> dict:
    baseline = policies[0]["name"] if len(policies) > 1 else None
    summary, paired = summarize(results, settings, baseline)
    arms = summarize_arms(results, settings, baseline)
    return {
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
    }
