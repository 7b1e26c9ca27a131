"""Does RL improve the shipped pretrained base? Train arms x seeds under one training setting, then evaluate every
adapter and the base on the same fixed episodes (reset seeds 0-99, argmax actions), clean and under the setting.

    python bench/rl_improve.py --setting action_noise@1 --arm ppo: --arm rloo:algorithm=rloo --seeds 0 1 2
    python bench/rl_improve.py --setting clean --arm ppo: --seeds 0 1 2          # drift check: train clean

An arm is ``NAME:OVERRIDE,OVERRIDE,...`` on top of the recipe (default ``recipes/tiny_cpu.yaml``). Every policy is
evaluated by its own ``python -m rvla_peft.eval`` call with ``--seed 0``: common random numbers make the episodes and
perturbation draws identical across calls, so the comparisons are paired, and finished runs and reports are kept
(an interrupted study resumes). Writes ``OUT/summary.json`` and ``OUT/summary.md``: per arm, the success of each
training seed, the mean over seeds with a 95% Student-t interval over seeds, the paired difference to the base per
seed and its t interval; the pooled Wilson interval over all episodes is shown too, labelled as such.
``--versus ARM`` adds each arm's paired difference to that arm, over the seeds both have. ``--no-train`` only
summarises the runs that have reports (arms stopped at different numbers of seeds).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rvla_peft.stats import DIFFERENCE_BOUNDS, RATE_BOUNDS, t_interval, wilson_interval  # noqa: E402

CLEAN = "clean"


def run(cmd: list[str], log: Path) -> float:
    print("$", " ".join(cmd), f"> {log}", flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}); see {log}")
    return time.perf_counter() - start


def train_overrides(setting: str) -> list[str]:
    """The training perturbation: none for 'clean', else the setting (name@severity) held as the recipe's."""
    if setting == CLEAN:
        return ["perturb.train=[]"]
    name, _, severity = setting.rpartition("@")
    return [f"perturb.train=[{{name: {name}, severity: {float(severity)}}}]"]


def report_file(args, name: str) -> Path:
    """Where the evaluation of policy ``name`` ("base", "ARM-seedS") writes its report."""
    return args.out / f"eval-{name}" / "report.json"


def train(args, arm: str, overrides: list[str], seed: int) -> Path:
    out = args.out / f"{arm}-seed{seed}"
    adapter = out / "adapter"
    evaluated = report_file(args, f"{arm}-seed{seed}").exists()
    if evaluated or (adapter / "adapter_model.safetensors").exists():  # results keep reports, not adapters
        return adapter
    cmd = [sys.executable, "-m", "rvla_peft.train", str(args.recipe), f"output_dir={out}", f"seed={seed}",
           "eval_episodes=0", "overwrite_output_dir=true", "report_to=[]", *train_overrides(args.setting),
           *overrides, *args.overrides]  # fmt: skip
    seconds = run(cmd, args.out / f"{arm}-seed{seed}.train.log")
    (out / "train_seconds.txt").write_text(f"{seconds:.1f}\n")
    return adapter


def evaluate(args, name: str, adapter: Path | None) -> dict:
    report = report_file(args, name)
    if not report.exists():
        perturb = [] if args.setting == CLEAN else ["--perturb", args.setting]
        policy = ["--no-base", f"--adapter={name}={adapter}"] if adapter else []
        cmd = [sys.executable, "-m", "rvla_peft.eval", "--recipe", str(args.recipe), "--suite", "none", *perturb,
               "--episodes", str(args.episodes), "--seed", "0", "--out", str(report.parent), "--overwrite", *policy,
               *args.overrides]  # fmt: skip
        run(cmd, args.out / f"eval-{name}.log")
    return json.loads(report.read_text())


def successes(report: dict, setting: str) -> list[int]:
    (cell,) = [r for r in report["results"] if r["setting"] == setting]
    return cell["successes"]


def paired(x: list[int], y: list[int]) -> float:
    """Mean per-episode difference of two policies' successes on the same episodes."""
    return sum(xi - yi for xi, yi in zip(x, y, strict=True)) / len(x)


def versus(adapters: dict[str, dict[int, dict]], reference: str, settings: list[str]) -> dict:
    """Per arm and setting: the paired difference to ``reference`` on each seed both arms have, and its t interval."""
    out = {}
    for arm, by_seed in adapters.items():
        common = [seed for seed in by_seed if seed in adapters[reference]]
        if arm == reference or not common:
            continue
        out[arm] = {}
        for s in settings:
            diffs = [paired(successes(by_seed[k], s), successes(adapters[reference][k], s)) for k in common]
            mean, lo, hi = t_interval(diffs, DIFFERENCE_BOUNDS)
            out[arm][s] = {"seeds": common, "per_seed": diffs, "mean": mean, "t95_over_seeds": [lo, hi]}
    return out


def summarize(base: dict, adapters: dict[str, dict[int, dict]], settings: list[str]) -> dict:
    summary = {"base": {s: sum(successes(base, s)) / len(successes(base, s)) for s in settings}, "arms": {}}
    for arm, by_seed in adapters.items():
        cells = {}
        for s in settings:
            b = successes(base, s)
            rates, diffs, pooled = [], [], []
            for report in by_seed.values():
                x = successes(report, s)
                rates.append(sum(x) / len(x))
                diffs.append(paired(x, b))
                pooled += x
            mean, lo, hi = t_interval(rates, RATE_BOUNDS)
            d_mean, d_lo, d_hi = t_interval(diffs, DIFFERENCE_BOUNDS)
            cells[s] = {
                "per_seed": dict(zip(by_seed, rates, strict=True)),
                "mean": mean,
                "t95_over_seeds": [lo, hi],
                "paired_diff_vs_base": d_mean,
                "paired_diff_t95_over_seeds": [d_lo, d_hi],
                "seeds_above_base": sum(d > 0 for d in diffs),
                "pooled_episodes": len(pooled),
                "pooled_wilson95": list(wilson_interval(sum(pooled), len(pooled))),
            }
        summary["arms"][arm] = cells
    return summary


def pct(x: float) -> str:
    return f"{100 * x:.1f}" if abs(x) != float("inf") else "inf"


def ci(bounds: list[float]) -> str:
    """An interval in %, or what stands in for one over a single seed."""
    lo, hi = bounds
    return f"[{pct(lo)}, {pct(hi)}]" if abs(lo) != float("inf") else "[one seed]"


def markdown(summary: dict, settings: list[str], args) -> str:
    lines = [f"Training setting `{args.setting}`; evaluation: {args.episodes} episodes per cell (reset seeds 0-"
             f"{args.episodes - 1}), argmax actions. Success in %.", "",
             "| policy | " + " | ".join(f"{s}: per seed | {s}: mean [t95 over seeds] | {s}: paired diff vs base "
                                       "[t95 over seeds]" for s in settings) + " |",
             "|---|" + "---|---|---|" * len(settings)]  # fmt: skip
    lines.append("| base | " + " | ".join(f"- | {pct(summary['base'][s])} | -" for s in settings) + " |")
    for arm, cells in summary["arms"].items():
        row = []
        for s in settings:
            c = cells[s]
            seeds = " / ".join(pct(r) for r in c["per_seed"].values())
            row.append(f"{seeds} | {pct(c['mean'])} {ci(c['t95_over_seeds'])}"
                       f" | {pct(c['paired_diff_vs_base'])} {ci(c['paired_diff_t95_over_seeds'])}")  # fmt: skip
        lines.append(f"| {arm} | " + " | ".join(row) + " |")
    lines += [
        "",
        "Pooled over seeds and episodes (Wilson 95%, treats episodes of different seeds as independent):",
        "",
    ]
    for arm, cells in summary["arms"].items():
        pooled = ", ".join(
            f"{s} {pct(c['mean'])} [{pct(c['pooled_wilson95'][0])}, {pct(c['pooled_wilson95'][1])}]"
            for s, c in cells.items()
        )
        lines.append(f"- {arm}: {pooled}")
    if summary.get("versus"):
        reference = summary["versus_arm"]
        lines += ["", f"Paired difference to {reference} on the seeds both arms have (t95 over those seeds):", ""]
        for arm, cells in summary["versus"].items():
            row = "; ".join(
                f"{s} {pct(c['mean'])} {ci(c['t95_over_seeds'])} "
                f"(seeds {', '.join(map(str, c['seeds']))}: {' / '.join(pct(d) for d in c['per_seed'])})"
                for s, c in cells.items()
            )
            lines.append(f"- {arm}: {row}")
    return "\n".join(lines) + "\n"


def parse_arm(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--arm {text!r}: write NAME:OVERRIDE,OVERRIDE (or NAME: for the recipe as it is)")
    return name, [o for o in rest.split(",") if o]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "tiny_cpu.yaml")
    parser.add_argument("--setting", required=True, help="training and evaluation setting: clean or NAME@SEVERITY")
    parser.add_argument("--arm", action="append", required=True, help="NAME:OVERRIDE,OVERRIDE,... (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--versus", metavar="ARM", help="also give each arm's paired difference to this arm")
    parser.add_argument("--no-train", action="store_true", help="only summarise the runs that have reports")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run and evaluation")
    args = parser.parse_intermixed_args()
    args.out.mkdir(parents=True, exist_ok=True)
    arms = dict(map(parse_arm, args.arm))
    if args.versus is not None and args.versus not in arms:
        parser.error(f"--versus {args.versus}: not one of the arms ({', '.join(arms)})")
    settings = [CLEAN] if args.setting == CLEAN else [CLEAN, args.setting]
    base = evaluate(args, "base", None)
    adapters = {arm: {} for arm in arms}
    for seed in args.seeds:  # seed-major: a stopped study has every arm at the same number of seeds
        for arm, overrides in arms.items():
            if args.no_train and not report_file(args, f"{arm}-seed{seed}").exists():
                print(f"{arm} seed {seed}: no report, not run", flush=True)
                continue
            adapters[arm][seed] = evaluate(args, f"{arm}-seed{seed}", train(args, arm, overrides, seed))
    adapters = {arm: by_seed for arm, by_seed in adapters.items() if by_seed}
    summary = summarize(base, adapters, settings)
    if args.versus is not None:
        summary["versus_arm"], summary["versus"] = args.versus, versus(adapters, args.versus, settings)
    summary["command"] = "python bench/rl_improve.py " + " ".join(sys.argv[1:])
    summary["train_seconds"] = {
        p.parent.name: float(p.read_text()) for p in sorted(args.out.glob("*/train_seconds.txt"))
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown(summary, settings, args)
    (args.out / "summary.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
