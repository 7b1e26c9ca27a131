"""Robustness report: ``python -m rvla_peft.eval --base MODEL [--adapter PATH_OR_HUB_ID ...] --suite paper``.

Every policy (the base, then each adapter) is evaluated on the same grid: clean plus each perturbation of the suite
at each of its severities. Common random numbers make the comparison paired: episode e of every cell starts from
reset seed ``seed + e``, and every cell's perturbations draw from a generator seeded the same way for every
policy, so two policies see the same initial states and the same perturbation draws.

Writes into ``--out``: ``report.json`` (stable schema below), ``report.md`` (a table) and ``robustness.png``
(success vs severity per perturbation, one line per policy, 95% interval bands).

report.json, schema_version 1::

    {"schema_version", "command", "created", "versions", "task", "suite", "episodes", "seed", "deterministic",
     "policies": [{"name", "base", "adapter"}],
     "settings": [{"name", "perturbation", "severity", "specs": [{"name", "severity"}]}],
     "results": [{"policy", "setting", "success_rate", "ci95", "mean_return", "episodes", "successes"}],
     "summary": {policy: {"clean_success_rate", "mean_perturbed_success_rate", "robustness_gap",
                          "gap_by_perturbation": {perturbation: gap}}},
     "paired": [{"policy", "baseline", "setting", "difference", "ci95"}]}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

SCHEMA_VERSION = 1
REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "robustness.png"
Z95 = 1.959963984540054


# ------------------------------------------------------------------------------------------------------------------
# statistics (pure functions)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion: sane at 0 and n successes, unlike the normal interval."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n successes one end is p exactly in theory; clamp so float rounding never leaves p outside.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def paired_difference(a: torch.Tensor, b: torch.Tensor, z: float = Z95) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired episodes and its normal-approximation 95% interval.

    Pairing (same initial states and perturbation draws) removes the between-episode variance that two independent
    success rates would carry, so the interval is much narrower than the two Wilson intervals suggest.
    """
    d = a.double() - b.double()
    n = d.numel()
    mean = d.mean().item()
    half = z * (d.std(unbiased=True).item() / math.sqrt(n)) if n > 1 else float("inf")
    return mean, mean - half, mean + half


# ------------------------------------------------------------------------------------------------------------------
# the grid


@dataclass
class Setting:
    """One column of the grid: a label, the perturbation family it plots under, a severity, and the specs applied."""

    name: str
    perturbation: str
    severity: float
    specs: list = field(default_factory=list)


CLEAN = Setting("clean", "clean", 0.0, [])


def make_setting(label: str, parts: list) -> Setting:
    """A setting from its expanded parts; a combination plots under "a+b" at the severity of its last part."""
    return Setting(label, "+".join(p.name for p in parts), parts[-1].severity, list(parts))


def suite_grid(suite: str | None, extra: Sequence[str] = (), specs: Sequence = ()) -> list[Setting]:
    """Clean, the suite's settings, then ``specs`` (recipe entries: name + severity), then ``extra`` ones written
    ``name@severity`` (``rotation@0.5+action_noise@0.1`` combines); a setting named twice is run once. Raises
    ValueError naming the problem for an unknown suite or perturbation or a bad severity."""
    from rvla_peft.envs.perturbations import Spec, expand_spec, spec_label, suite_settings

    settings = [CLEAN] + [make_setting(label, parts) for label, parts in (suite_settings(suite) if suite else [])]
    settings += [make_setting(spec_label(spec), expand_spec(spec)) for spec in specs]  # exact severities
    for text in extra:
        name, sep, severity = text.rpartition("@")
        if not sep or not name:
            raise ValueError(f"--perturb {text!r}: write it as NAME@SEVERITY, e.g. rotation@0.5")
        try:
            spec = Spec(name, float(severity))
        except ValueError:
            raise ValueError(f"--perturb {text!r}: severity {severity!r} is not a number in [0, 1]") from None
        settings.append(make_setting(spec_label(spec), expand_spec(spec)))
    return list({s.name: s for s in reversed(settings)}.values())[::-1]  # a setting named twice is run once


# ------------------------------------------------------------------------------------------------------------------
# running it


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
) -> list[CellResult]:
    """Run every policy on every setting over the same ``episodes`` (common random numbers); one shared env."""
    from rvla_peft.envs import PerturbedEnv
    from rvla_peft.rollout import run_episodes

    results = []
    for setting in settings:
        for name, policy in policies.items():
            perturbed = PerturbedEnv(env, setting.specs, seed=seed)
            # Sampled actions draw from torch's global RNG: seed it per cell (and restore it after).
            devices = [env.device] if env.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                out = run_episodes(policy, perturbed, episodes, seed, max_steps, deterministic, on_batch=progress)
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


# ------------------------------------------------------------------------------------------------------------------
# writing it


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
) -> dict:
    baseline = policies[0]["name"] if len(policies) > 1 else None
    summary, paired = summarize(results, settings, baseline)
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
        "policies": policies,
        "settings": [
            {**asdict(s), "specs": [{"name": p.name, "severity": p.severity} for p in s.specs]} for s in settings
        ],
        "results": [r.as_dict() for r in results],
        "summary": summary,
        "paired": paired,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def render_markdown(report: dict) -> str:
    """A table a person reads: success % [95% interval] per setting and policy, then the gaps."""
    policies = [p["name"] for p in report["policies"]]
    cell = {(r["policy"], r["setting"]): r for r in report["results"]}
    lines = [
        f"# Robustness report: {report['task']}",
        "",
        f"Suite `{report['suite']}`, {report['episodes']} episodes per cell, seed {report['seed']}, "
        f"{'deterministic' if report['deterministic'] else 'sampled'} actions. Success rate in % "
        "with its 95% Wilson interval; every policy saw the same initial states and perturbation draws.",
        "",
        "| setting | " + " | ".join(policies) + " |",
        "|---|" + "---|" * len(policies),
    ]
    for s in report["settings"]:
        row = []
        for p in policies:
            r = cell[p, s["name"]]
            lo, hi = r["ci95"]
            row.append(f"{_pct(r['success_rate'])} [{_pct(lo)}, {_pct(hi)}]")
        lines.append(f"| {s['name']} | " + " | ".join(row) + " |")
    lines += ["", "| policy | clean | mean perturbed | robustness gap |", "|---|---|---|---|"]
    for p in policies:
        m = report["summary"][p]
        lines.append(
            f"| {p} | {_pct(m['clean_success_rate'])} | {_pct(m['mean_perturbed_success_rate'])} | "
            f"{_pct(m['robustness_gap'])} |"
        )
    if report["paired"]:
        lines += ["", "Paired difference in success (percentage points, policy minus baseline, 95% interval):", ""]
        lines += ["| policy - baseline | setting | difference |", "|---|---|---|"]
        for d in report["paired"]:
            lo, hi = d["ci95"]
            lines.append(
                f"| {d['policy']} - {d['baseline']} | {d['setting']} | {_pct(d['difference'])} "
                f"[{_pct(lo)}, {_pct(hi)}] |"
            )
    lines += ["", "Command:", "", "```", report["command"], "```", ""]
    return "\n".join(lines)


def plot_report(report: dict, path: Path) -> None:
    """Success vs severity, one panel per perturbation (clean at severity 0), one line per policy, interval bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell = {(r["policy"], r["setting"]): r for r in report["results"]}
    families: dict[str, list[dict]] = {}
    for s in report["settings"]:
        if s["perturbation"] != CLEAN.name:
            families.setdefault(s["perturbation"], []).append(s)
    panels = list(families) or [CLEAN.name]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    has_clean = any(s["name"] == CLEAN.name for s in report["settings"])
    for ax, family in zip(axes.flat, panels, strict=False):
        points = ([{"name": CLEAN.name, "severity": 0.0}] if has_clean else []) + sorted(
            families.get(family, []), key=lambda s: s["severity"]
        )
        for policy in (p["name"] for p in report["policies"]):
            xs = [s["severity"] for s in points]
            rs = [cell[policy, s["name"]] for s in points]
            ax.plot(xs, [r["success_rate"] for r in rs], marker="o", label=policy)
            ax.fill_between(xs, [r["ci95"][0] for r in rs], [r["ci95"][1] for r in rs], alpha=0.15)
        ax.set_title(family, fontsize=9)
        ax.set_xlabel("severity")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    axes[0, 0].set_ylabel("success rate")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{report['task']}: success under perturbation ({report['episodes']} episodes per point)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    """Write the three files, each atomically (a temp file renamed into place): no half-written report."""
    out.mkdir(parents=True, exist_ok=True)

    def atomic(name: str, write: Callable[[Path], None]) -> None:
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=Path(name).suffix)
        os.close(fd)
        try:
            write(Path(tmp))
            os.replace(tmp, out / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    atomic(REPORT_JSON, lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    atomic(REPORT_MD, lambda p: p.write_text(render_markdown(report)))
    atomic(REPORT_PNG, lambda p: plot_report(report, p))


# ------------------------------------------------------------------------------------------------------------------
# the command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rvla_peft.eval",
        description="Robustness report of a base VLA and its adapters under a grid of perturbations.",
    )
    parser.add_argument("--base", help="base model: Hub id, local folder or builtin:NAME (default: the recipe's)")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]PATH_OR_HUB_ID",
        help="an adapter to evaluate (repeatable); NAME labels it in the report",
    )
    parser.add_argument("--no-base", action="store_true", help="evaluate only the adapters, not the bare base")
    parser.add_argument("--recipe", help="recipe giving the policy and env settings (default: the first adapter's)")
    parser.add_argument("--task", help="ManiSkill task (default: the recipe's env.task)")
    parser.add_argument("--suite", default="paper", help="named perturbation suite: paper, full, quick or none")
    parser.add_argument("--perturb", action="append", default=[], metavar="NAME@SEVERITY", help="add a setting")
    parser.add_argument("--episodes", type=int, default=50, help="episodes per policy and setting")
    parser.add_argument("--seed", type=int, default=0, help="episode e starts from reset seed SEED + e")
    parser.add_argument("--num-envs", type=int, help="parallel envs (default: the recipe's env.num_envs)")
    parser.add_argument("--sample", action="store_true", help="sample actions instead of taking the most likely")
    parser.add_argument("--out", default="report", help="output folder for report.json, report.md, robustness.png")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    parser.add_argument(
        "--allow-base-mismatch", action="store_true", help="evaluate an adapter whose recorded base differs"
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. env.image_size=128")
    return parser.parse_intermixed_args(argv)


def _adapter_args(values: list[str]) -> list[tuple[str, str]]:
    named = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or "/" in name or Path(value).exists():
            name, path = Path(value.rstrip("/")).name or value, value
            if name == "adapter":  # OUTPUT/adapter: name it after the run folder
                name = Path(value.rstrip("/")).parent.name or name
        named.append((name, path))
    names = [n for n, _ in named]
    if len(set(names)) != len(names) or "base" in names:
        raise ValueError(f"adapter names must be unique and not 'base', got {names}: label them NAME=PATH")
    return named


def _recipe_of(adapter: Path) -> Path | None:
    from rvla_peft.hub import HubError, adapter_recipe

    try:
        return adapter_recipe(adapter)
    except HubError:
        return None


def main(argv: list[str] | None = None) -> int:
    from rvla_peft.config import ConfigError, load_config
    from rvla_peft.hub import HubError, check_base_match, resolve_adapter

    args = parse_args(argv)
    out = Path(args.out)
    try:
        named = _adapter_args(args.adapter)  # [(name, path or Hub id as given)]
        if args.no_base and not named:
            raise ValueError("--no-base with no --adapter leaves nothing to evaluate")
        if args.episodes < 1:
            raise ValueError(f"--episodes must be >= 1, got {args.episodes}")
        if (out / REPORT_JSON).exists() and not args.overwrite:
            raise ValueError(f"{out / REPORT_JSON} exists; choose another --out or pass --overwrite")
        # Hub ids are downloaded here (only the adapter's files), so that a wrong id fails before any model loads.
        local = [resolve_adapter(given) for _, given in named]
        recipe = args.recipe or next((r for path in local if (r := _recipe_of(path))), None)
        overrides = list(args.overrides)
        if args.base:
            overrides.append(f"model.name_or_path={args.base}")
        if args.task:
            overrides.append(f"env.task={args.task}")
        if args.num_envs:
            overrides.append(f"env.num_envs={args.num_envs}")
        cfg = load_config(recipe, overrides)
        settings = suite_grid(None if args.suite == "none" else args.suite, args.perturb)
        from rvla_peft.policies.registry import base_model_id

        for path, (_, given) in zip(local, named, strict=True):
            check_base_match(path, base_model_id(cfg.model), allow=args.allow_base_mismatch, adapter_name=given)
        from rvla_peft.envs import make_envs

        device = "cuda" if torch.cuda.is_available() else "cpu"
        env = make_envs(cfg.env, device=device)  # before any model loads: a bad task fails in seconds
    except (ConfigError, ValueError, HubError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = "python -m rvla_peft.eval " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        report = run(cfg, env, named, local, settings, args, command)
    finally:
        env.close()
    write_report(report, out)
    print(render_markdown(report))
    print(f"Report written to {out}/ ({REPORT_JSON}, {REPORT_MD}, {REPORT_PNG})")
    return 0


def run(cfg, env, named: list[tuple[str, str]], local: list[Path], settings: list[Setting], args, command: str):
    """Load the policies (base first) and evaluate the grid; returns the report dict."""
    from tqdm.auto import tqdm

    from rvla_peft.policies.registry import base_model_id, build_policy, load_policy

    policies, described = {}, []
    if not args.no_base:
        policies["base"] = build_policy(cfg, device=env.device)
        described.append({"name": "base", "base": base_model_id(cfg.model), "adapter": None})
    for (name, given), path in zip(named, local, strict=True):
        if _recipe_of(path) is None:  # no recipe beside it: the evaluation recipe's policy settings
            policies[name] = build_policy(cfg, adapter=path, device=env.device)
        else:  # the policy settings it was trained with, on the evaluated base (checked in main)
            policies[name] = load_policy(cfg.model, path, env.device, allow_base_mismatch=True)
        described.append({"name": name, "base": base_model_id(cfg.model), "adapter": given})
    for policy in policies.values():
        policy.eval()
    deterministic = not args.sample
    with tqdm(total=len(policies) * len(settings) * args.episodes, desc="episodes", unit="ep") as bar:
        results = evaluate_grid(
            policies, env, settings, args.episodes, args.seed, cfg.env.max_episode_steps, deterministic, bar.update
        )
    return build_report(
        results,
        settings,
        described,
        task=cfg.env.task,
        suite=args.suite,
        episodes=args.episodes,
        seed=args.seed,
        deterministic=deterministic,
        command=command,
    )


if __name__ == "__main__":
    sys.exit(main())
