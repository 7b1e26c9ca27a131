"""The RobustVLA claim at small scale: base vs PPO vs PPO + Jacobian + smoothness (RobustVLA) vs its curriculum
variant (RobustVLA-C), each trained from the same base with several seeds, evaluated on the `paper` suite.

    python bench/reproduce_paper.py                                  # recipes/tiny_cpu.yaml, seeds 0 1 2
    python bench/reproduce_paper.py --seeds 0 --total-updates 4 --episodes 10    # a quick look
    python bench/reproduce_paper.py --jobs 3 --eval-num-envs 20 --eval-override env.vectorization=async
    python bench/reproduce_paper.py --recipe recipes/openvla_maniskill.yaml       # on a GPU

Every variant trains under the recipe's training perturbations; they differ only in the penalties and the severity
schedule (``VARIANTS``; ``--jobs`` trainings at once). Then ``rvla_peft.eval`` evaluates the base once and each
adapter on the fixed evaluation episodes (``--seed 0``: reset seeds 0 to episodes-1, the same perturbation draws for
every policy and every training seed: paired; the base's results, which no training seed changes, are shared by
every seed). Finished runs and reports are kept, so an interrupted reproduction resumes where it stopped, and a
variant added later trains and evaluates alone. Writes ``OUT/summary.md``, ``OUT/summary.json`` and
``OUT/summary.png``: per setting, each variant's success and its difference against PPO, paired by episode, with
95% two-level bootstrap intervals (training seeds and evaluation episodes resampled; the base, evaluated once,
counts its episodes once), the share of the base's robustness gap each variant closes, and per training seed the
success and difference with a Student-t interval over seeds (episodes held fixed), each table naming its interval.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from rvla_peft.cards import interrupted_update  # noqa: E402
from rvla_peft.stats import (  # noqa: E402
    DIFFERENCE_BOUNDS,
    RATE_BOUNDS,
    TWO_LEVEL,
    WILSON,
    TwoLevelBootstrap,
    t_interval,
    wilson_interval,
)

NO_PENALTIES = ["regularizers.jacobian.weight=0", "regularizers.smoothness.weight=0"]
# The weights that put each penalty at 20% of the gradient on recipes/tiny_cpu.yaml
# (`python bench/calibrate_penalties.py recipes/tiny_cpu.yaml --updates 4 --share 0.2`; README, Algorithms).
CALIBRATED = ["regularizers.jacobian.weight=0.066", "regularizers.smoothness.weight=72.5"]
# The invariance penalty to the base in its exact form, with the KL to the base on the clean frames: the form that
# helped under shift@0.5 (README, "Does RL improve the shipped base?").
INVARIANCE = [
    "regularizers.invariance.weight=1.0",
    "regularizers.invariance.form=exact",
    "regularizers.invariance.fraction=0.5",
    "regularizers.invariance.target=base",
    "kl_to_base_frames=clean",
]

# Overrides on top of the recipe: the variants differ only here.
VARIANTS: dict[str, list[str]] = {
    "ppo": [*NO_PENALTIES, "perturb.curriculum.schedule=none"],
    "robustvla": [*CALIBRATED, "perturb.curriculum.schedule=none"],
    "robustvla_c": [*CALIBRATED, "perturb.curriculum.schedule=linear", "perturb.curriculum.start=0.0"],
    "invariance": [*NO_PENALTIES, *INVARIANCE, "perturb.curriculum.schedule=none"],
    # The controlled study (bench/results/controlled/PROTOCOL.md): every arm anchors its KL on the clean frames, so
    # that each differs from ppo_klclean by one thing: the invariance penalty; then the adversarial sampler; the
    # RobustVLA penalties; no reward (distillation of the base's clean-frame actions in place of PPO).
    "ppo_klclean": [*NO_PENALTIES, "kl_to_base_frames=clean", "perturb.curriculum.schedule=none"],
    "invariance_adv": [*NO_PENALTIES, *INVARIANCE, "perturb.curriculum.schedule=none", "perturb.sampler=adversarial"],
    "robustvla_klclean": [*CALIBRATED, "kl_to_base_frames=clean", "perturb.curriculum.schedule=none"],
    "distill": [*NO_PENALTIES, "algorithm=distill", "kl_to_base_frames=clean", "perturb.curriculum.schedule=none"],
}
DEFAULT_VARIANTS = ["ppo", "robustvla", "robustvla_c"]
BASE = "base"


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), f"> {log}", flush=True)
    with log.open("w") as f:
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}); see {log}")


def code_commit() -> str:
    """The commit of the package code that runs (``unknown`` outside a git checkout); ``+dirty`` when it has
    uncommitted changes, which a study refuses (``--pinned``)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "rvla_peft", "recipes"], cwd=ROOT, capture_output=True, text=True
    )
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def train(args, variant: str, seed: int) -> Path:
    """Train one (variant, seed), or keep its finished adapter. With ``--save-every`` it checkpoints and, after an
    interruption, resumes from its latest checkpoint; the run records the commit it started from (``COMMIT``) and
    refuses to continue on other code, so each training seed runs from one pinned commit."""
    out = args.out / f"{variant}-seed{seed}"
    # finished: an adapter that no signal stopped (a stopped run leaves one marked interrupted, and resumes)
    if (out / "adapter" / "adapter_model.safetensors").exists() and interrupted_update(out / "adapter") is None:
        return out / "adapter"
    commit, stamp = code_commit(), out / "COMMIT"
    if stamp.exists() and stamp.read_text().strip() != commit:
        sys.exit(f"{out} started at commit {stamp.read_text().strip()}, this code is {commit}: run the study from "
                 "that commit (git worktree add DIR COMMIT) or remove the run folder")  # fmt: skip
    ramp = [f"perturb.curriculum.ramp_updates={max(1, args.total_updates // 2)}"] if variant == "robustvla_c" else []
    resume = ["resume_from_checkpoint=latest"] if any((out / "checkpoints").glob("update-*")) else []
    cmd = [sys.executable, "-m", "rvla_peft.train", str(args.recipe), f"output_dir={out}", f"seed={seed}",
           f"total_updates={args.total_updates}", "eval_episodes=0", f"save_every={args.save_every}",
           *(resume or ["overwrite_output_dir=true"]), *VARIANTS[variant], *ramp, *args.overrides]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(commit + "\n")
    log = args.out / f"{variant}-seed{seed}.log"
    run(cmd, log.with_suffix(".resumed.log") if resume else log)
    return out / "adapter"


def evaluate(args, name: str, adapter: Path | None = None, label: str = BASE) -> dict:
    """The report of the base (``adapter`` None) or of one adapter alone, named ``label`` in it, on the fixed
    evaluation episodes; ``name`` names its folder."""
    out = args.out / f"report-{name}"
    if not (out / "report.json").exists():
        policy = ["--no-base", f"--adapter={label}={adapter}"] if adapter else []
        eval_envs = ["--num-envs", str(args.eval_num_envs)] if args.eval_num_envs else []
        cmd = [sys.executable, "-m", "rvla_peft.eval", "--recipe", str(args.recipe), "--suite", args.suite,
               "--episodes", str(args.episodes), "--seed", str(args.eval_seed), *eval_envs, "--out", str(out),
               "--overwrite",
               *policy, *args.overrides, *args.eval_override]  # fmt: skip
        run(cmd, args.out / f"report-{name}.log")
    return json.loads((out / "report.json").read_text())


def seed_report(base: dict, adapters: list[dict]) -> dict:
    """One training seed's report: the base's results and its adapters', evaluated on the same episodes."""
    for report in adapters:
        if report["settings"] != base["settings"] or report["episodes"] != base["episodes"]:
            sys.exit(f"{report['policies'][0]['name']}: evaluated on other settings or episodes than the base")
    return {
        "settings": base["settings"],
        "policies": [p for report in [base, *adapters] for p in report["policies"]],
        "results": [r for report in [base, *adapters] for r in report["results"]],
    }


MEAN = "mean perturbed"
RESAMPLES = 2000


def aggregate(reports: list[dict], shared: tuple[str, ...] = (BASE,), resamples: int = RESAMPLES,
              bootstrap_seed: int = 0, baseline: str | None = None) -> dict:  # fmt: skip
    """Pool the per-seed reports: success per (variant, setting), paired differences against ``baseline`` (default
    ``ppo``, else the first variant), and against the base with the share of its robustness gap closed.

    Intervals (``ci95``) by the two-level bootstrap: each variant's training seeds resampled (independently per
    variant), the evaluation episodes resampled jointly for every variant and setting, since every report ran the
    same episodes. A variant in ``shared`` (the base, which no training seed changes) appears in every seed's report
    with the same results: it is one evaluation, counted once, and its success rate's interval is Wilson's over its
    episodes (differences with it are still bootstrapped). ``wilson95``: the Wilson interval pooling a variant's
    distinct (seed, episode) units, which ignores how seeds differ. ``t95``: the Student-t interval over training
    seeds, episodes held fixed, clipped to what is possible; None for a shared variant (one evaluation).

    The "mean perturbed" row averages the perturbed settings; its Wilson interval pools their episodes as if
    independent (somewhat narrow)."""
    settings = [s["name"] for s in reports[0]["settings"]]
    variants = list(dict.fromkeys(p["name"] for rep in reports for p in rep["policies"]))  # in order, once each
    perturbed = [s for s in settings if s != "clean"]
    index = {s: [settings.index(n) for n in (perturbed if s == MEAN else [s])] for s in [*settings, MEAN]}

    def successes(rep: dict, v: str, s: str) -> list[float]:
        return next(r for r in rep["results"] if r["policy"] == v and r["setting"] == s)["successes"]

    def has(rep: dict, *names: str) -> bool:  # an arm may have run fewer seeds than the others (--arm-seeds)
        return all(any(p["name"] == v for p in rep["policies"]) for v in names)

    outcomes = {}  # variant -> [seeds, settings, episodes]
    for v in variants:
        runs = [[successes(rep, v, s) for s in settings] for rep in reports if has(rep, v)]
        if v in shared:
            if any(run != runs[0] for run in runs):
                sys.exit(f"{v}: its results differ between the seeds' reports, so it is not one shared evaluation")
            runs = runs[:1]
        outcomes[v] = np.asarray(runs, dtype=float)
    boot = TwoLevelBootstrap(outcomes, resamples=resamples, seed=bootstrap_seed)

    cells = {}
    for v in variants:
        for s in [*settings, MEAN]:
            units = outcomes[v][:, index[s], :]
            wins, n = int(units.sum()), units.size
            rates = units.mean(axis=(1, 2)).tolist()
            mean, lo, hi = boot.mean(v, index[s])
            wilson = list(wilson_interval(wins, n))
            cells[f"{v}|{s}"] = {
                "success_rate": mean,
                # one evaluation: a proportion, whose Wilson interval stays honest at 99/100 (a percentile
                # bootstrap of 100 episodes gives [97, 100] there)
                "ci95": wilson if v in shared else [lo, hi],
                "wilson95": wilson,
                "per_seed": rates,
                "t95": None if v in shared else list(t_interval(rates, RATE_BOUNDS)[1:]),
                "episodes": n,
            }
    paired = {}
    baseline = baseline or ("ppo" if "ppo" in variants else variants[0])
    for v in variants:
        for s in [*settings, MEAN]:
            per_seed = []
            for rep in (rep for rep in reports if has(rep, v, baseline)):  # the seeds both arms ran
                per_setting = [
                    [a - b for a, b in zip(successes(rep, v, name), successes(rep, baseline, name), strict=True)]
                    for name in (perturbed if s == MEAN else [s])
                ]
                units = [sum(d) / len(d) for d in zip(*per_setting, strict=True)]
                per_seed.append(sum(units) / len(units))
            d, lo, hi = boot.difference(v, baseline, index[s])
            paired[f"{v}|{s}"] = {"difference": d, "ci95": [lo, hi], "baseline": baseline, "per_seed": per_seed,
                                  "t95": list(t_interval(per_seed, DIFFERENCE_BOUNDS)[1:])}  # fmt: skip
    against_base, gap_cut = {}, {}
    if BASE in variants:
        for v in variants:
            if v == BASE:
                continue
            for s in [*settings, MEAN]:
                d, lo, hi = boot.difference(v, BASE, index[s])
                against_base[f"{v}|{s}"] = {"difference": d, "ci95": [lo, hi]}
            if "clean" in settings and perturbed:
                cut, lo, hi = boot.gap_cut(v, BASE, settings.index("clean"), index[MEAN])
                gap_cut[v] = {"value": cut, "ci95": [lo, hi]}
    intervals = {
        "ci95": f"{TWO_LEVEL} ({resamples} resamples, seed {bootstrap_seed}; episodes resampled jointly across "
        f"variants and settings); {', '.join(shared) or 'no variant'}, evaluated once: its episodes counted once, "
        f"its success rate with the {WILSON}",
        "wilson95": f"{WILSON} pooling a variant's (seed, episode) units",
        "t95": "Student-t interval over training seeds, evaluation episodes held fixed, clipped to what is possible",
    }
    return {"settings": settings, "variants": variants, "cells": cells, "paired": paired,
            "against_base": against_base, "gap_cut": gap_cut, "intervals": intervals}  # fmt: skip


def targets(summary: dict) -> list[dict]:
    """The issue's targets for the reproduction, fixed before its runs, for every arm with penalties (each variant
    but the base and ``ppo``), with two-level bootstrap intervals (``aggregate``):

    - beats the base on mean perturbed success by >= 10 points, its interval above 0;
    - beats plain RL (``ppo``) on mean perturbed success, the paired interval above 0;
    - clean success >= 95% (also checked for ``ppo``);
    - robustness gap (clean minus mean perturbed) cut by >= 30% against the base's.
    """
    cells, paired, variants = summary["cells"], summary["paired"], summary["variants"]
    if BASE not in variants:
        return []
    rows = []
    for v in variants:
        if v == BASE:
            continue
        if v != "ppo":
            d = summary["against_base"][f"{v}|{MEAN}"]
            rows.append({"arm": v, "target": "mean perturbed minus base >= +10, interval above 0",
                         "value": d["difference"], "ci95": d["ci95"],
                         "met": d["difference"] >= 0.10 and d["ci95"][0] > 0})  # fmt: skip
            if "ppo" in variants:
                d = paired[f"{v}|{MEAN}"]
                rows.append({"arm": v, "target": "mean perturbed minus ppo (paired), interval above 0",
                             "value": d["difference"], "ci95": d["ci95"], "met": d["ci95"][0] > 0})  # fmt: skip
            cut = summary["gap_cut"][v]
            rows.append({"arm": v, "target": "robustness gap cut >= 30% against the base", "value": cut["value"],
                         "ci95": cut["ci95"], "met": cut["value"] >= 0.30})  # fmt: skip
        clean = cells[f"{v}|clean"]["success_rate"]
        rows.append({"arm": v, "target": "clean >= 95%", "value": clean, "ci95": None, "met": clean >= 0.95})
    return rows


STUDY_BASELINE = "ppo_klclean"


def study_targets(summary: dict, baseline: str = STUDY_BASELINE) -> list[dict]:
    """The controlled study's targets (bench/results/controlled/PROTOCOL.md), fixed before its runs, with two-level
    bootstrap intervals: for every arm against equal-budget PPO with the clean-frame KL (``baseline``), mean
    perturbed success >= +8 points with the interval above 0; gap cut >= 35% against the base; clean >= 97% (every
    arm, the baseline too); no action-noise setting below the base beyond its interval (upper bound < 0)."""
    cells, variants = summary["cells"], summary["variants"]
    if BASE not in variants or baseline not in variants:
        return []
    rows = []
    for v in variants:
        if v == BASE:
            continue
        if v != baseline:
            d = summary["paired"][f"{v}|{MEAN}"]
            rows.append({"arm": v, "target": f"mean perturbed minus {baseline} >= +8, interval above 0",
                         "value": d["difference"], "ci95": d["ci95"],
                         "met": d["difference"] >= 0.08 and d["ci95"][0] > 0})  # fmt: skip
            cut = summary["gap_cut"][v]
            rows.append({"arm": v, "target": "robustness gap cut >= 35% against the base", "value": cut["value"],
                         "ci95": cut["ci95"], "met": cut["value"] >= 0.35})  # fmt: skip
        for s in (s for s in summary["settings"] if s.startswith("action_noise@")):
            d = summary["against_base"][f"{v}|{s}"]
            rows.append({"arm": v, "target": f"{s} not below the base beyond its interval", "value": d["difference"],
                         "ci95": d["ci95"], "met": d["ci95"][1] >= 0})  # fmt: skip
        clean = cells[f"{v}|clean"]["success_rate"]
        rows.append({"arm": v, "target": "clean >= 97%", "value": clean, "ci95": None, "met": clean >= 0.97})
    return rows


def targets_markdown(rows: list[dict]) -> str:
    lines = ["| arm | target | measured [95% interval] | met |", "|---|---|---|---|"]
    for r in rows:
        # a rate or a share in %; a difference in points, signed ("clean" alone would match ppo_klclean)
        percent = r["target"].startswith(("clean", "robustness gap cut"))
        if r["ci95"] is not None:
            value = _t(r["value"], r["ci95"], "" if percent else "+", percent)
        else:
            value = f"{100 * r['value']:.1f}" + ("%" if percent else "")
        lines.append(f"| {r['arm']} | {r['target']} | {value} | {'yes' if r['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def markdown(summary: dict, args) -> str:
    variants, settings = summary["variants"], summary["settings"]
    lines = [
        "Success in % with its 95% interval [1]:",
        "",
        "| setting | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for s in [*settings, MEAN]:
        row = []
        for v in variants:
            c = summary["cells"][f"{v}|{s}"]
            cell = _t(c["success_rate"], c["ci95"])
            row.append(f"**{cell}**" if s == MEAN else cell)
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    base = summary["paired"][f"{variants[0]}|{settings[0]}"]["baseline"]
    lines += ["", f"Paired difference against `{base}` (percentage points, 95% interval [1]):", ""]
    lines += ["| setting | " + " | ".join(v for v in variants if v != base) + " |"]
    lines += ["|---|" + "---|" * (len(variants) - 1)]
    for s in [*settings, MEAN]:
        row = []
        for v in variants:
            if v == base:
                continue
            d = summary["paired"][f"{v}|{s}"]
            row.append(_t(d["difference"], d["ci95"], "+"))
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    if summary.get("gap_cut"):
        lines += ["", f"Share of `{BASE}`'s robustness gap (clean minus mean perturbed) closed, 95% interval [1]:", ""]
        lines += ["| " + " | ".join(summary["gap_cut"]) + " |", "|" + "---|" * len(summary["gap_cut"])]
        lines += ["| " + " | ".join(_t(c["value"], c["ci95"], "", True) for c in summary["gap_cut"].values()) + " |"]
    lines += ["", "Over training seeds: per-seed success, mean [95% interval over seeds, 2]; paired difference "
              f"against `{base}` per seed, mean [interval 2]:", ""]  # fmt: skip
    lines += ["| setting | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for s in [*settings, MEAN]:
        row = []
        for v in variants:
            c, d = summary["cells"][f"{v}|{s}"], summary["paired"][f"{v}|{s}"]
            per_seed = "/".join(f"{100 * x:.0f}" for x in c["per_seed"])
            text = f"{per_seed}: " + ("one evaluation" if c["t95"] is None else _t(c["success_rate"], c["t95"]))
            if v != base:
                text += f"; {'/'.join(f'{100 * x:+.0f}' for x in d['per_seed'])}: {_t(d['difference'], d['t95'], '+')}"
            row.append(text)
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    lines += ["", f"[1] {summary['intervals']['ci95']}.", f"[2] {summary['intervals']['t95']}."]
    return "\n".join(lines) + "\n"


def _t(mean: float, interval: list[float], sign: str = "", percent: bool = False) -> str:
    """``mean [lo, hi]`` in percent, one decimal (whole points would print [97.1, 99.7] as [97, 100])."""
    unit = "%" if percent else ""
    lo, hi = (f"{100 * x:{sign}.1f}" if math.isfinite(x) else f"{'-' if x < 0 else '+'}inf" for x in interval)
    return f"{100 * mean:{sign}.1f}{unit} [{lo}, {hi}]"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, variants = [*summary["settings"], MEAN], summary["variants"]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(settings)), 3.6), dpi=110)
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        cells = [summary["cells"][f"{v}|{s}"] for s in settings]
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(settings))]
        rates = [c["success_rate"] for c in cells]
        err = [[r - c["ci95"][0] for r, c in zip(rates, cells, strict=True)],
               [c["ci95"][1] - r for r, c in zip(rates, cells, strict=True)]]  # fmt: skip
        ax.bar(xs, rates, width, yerr=err, capsize=2, label=v)
    ax.set_xticks(range(len(settings)), settings, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=len(variants))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_arm_seeds(specs: list[str], variants: list[str], seeds: list[int]) -> dict[str, list[int]]:
    """Each variant's training seeds: ``seeds``, or a subset of them given as ``ARM=S,S,...``."""
    arm_seeds = {v: list(seeds) for v in variants}
    for spec in specs:
        arm, _, listed = spec.partition("=")
        if arm not in arm_seeds:
            sys.exit(f"--arm-seeds {spec}: {arm!r} is not among --variants {variants}")
        try:
            chosen = [int(x) for x in listed.split(",")]
        except ValueError:
            sys.exit(f"--arm-seeds {spec}: expected ARM=S,S,... with integer seeds, e.g. {arm}=0,1,2")
        if not set(chosen) <= set(seeds):  # never empty: "ARM=" fails int() above
            sys.exit(f"--arm-seeds {spec}: the seeds must be a subset of --seeds {seeds}")
        arm_seeds[arm] = chosen
    return arm_seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "tiny_cpu.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--total-updates", type=int, default=20)
    parser.add_argument("--episodes", type=int, default=100, help="evaluation episodes per cell and seed (0-N)")
    parser.add_argument("--suite", default="paper")
    parser.add_argument("--eval-seed", type=int, default=0, help="episode e of every cell from reset seed SEED + e")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N updates; resume after a stop")
    parser.add_argument("--targets", choices=["paper", "study"], default="paper", help="which targets to check")
    parser.add_argument("--pinned", action="store_true", help="refuse to run on uncommitted package or recipe code")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "paper")
    parser.add_argument("--resamples", type=int, default=RESAMPLES, help="bootstrap resamples of the intervals")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap's resampling")
    parser.add_argument("--jobs", type=int, default=1, help="trainings run at once (one CPU core or so each)")
    parser.add_argument("--eval-num-envs", type=int, help="envs per evaluation (default: the recipe's)")
    parser.add_argument("--eval-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for the evaluations only, e.g. env.vectorization=async")  # fmt: skip
    parser.add_argument("--arm-seeds", action="append", default=[], metavar="ARM=S,S,...",
                        help="one arm's seeds where it runs fewer than --seeds, e.g. ARM=0,1,2")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run, e.g. env.num_envs=4")
    args = parser.parse_intermixed_args()
    if args.pinned and code_commit().endswith("+dirty"):
        sys.exit("--pinned: rvla_peft/ or recipes/ has uncommitted changes; commit them or run from a clean worktree")
    arm_seeds = parse_arm_seeds(args.arm_seeds, args.variants, args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    base = evaluate(args, BASE)
    runs = [(variant, seed) for seed in args.seeds for variant in args.variants if seed in arm_seeds[variant]]

    def train_and_evaluate(variant: str, seed: int) -> dict:  # each report as soon as its training ends
        return evaluate(args, f"{variant}-seed{seed}", train(args, variant, seed), label=variant)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        trained = dict(zip(runs, pool.map(lambda run: train_and_evaluate(*run), runs), strict=True))
    reports = [
        seed_report(base, [trained[v, seed] for v in args.variants if (v, seed) in trained]) for seed in args.seeds
    ]
    baseline = STUDY_BASELINE if args.targets == "study" else None
    summary = aggregate(reports, resamples=args.resamples, bootstrap_seed=args.bootstrap_seed, baseline=baseline)
    summary["targets"] = study_targets(summary) if args.targets == "study" else targets(summary)
    summary["command"] = "python bench/reproduce_paper.py " + " ".join(sys.argv[1:])
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown(summary, args)
    if summary["targets"]:
        table += "\nThe targets, with the intervals of [1]:\n\n" + targets_markdown(summary["targets"])
    (args.out / "summary.md").write_text(table)
    plot(summary, args.out / "summary.png")
    print(table)
    print(f"written to {args.out}/summary.md, summary.json, summary.png")


if __name__ == "__main__":
    main()
