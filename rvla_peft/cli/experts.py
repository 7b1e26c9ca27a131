"""``rvla-experts`` / ``python -m rvla_peft.experts``: measure a scripted expert's success on state-only CPU envs
(:mod:`rvla_peft.experts`)."""

from __future__ import annotations

import argparse
import itertools
import sys
import time

from rvla_peft.experts import EXPERTS, action_perturbations, run_expert
from rvla_peft.perturbations import suite_grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure a scripted expert's success on state-only CPU envs.")
    parser.add_argument("--task", action="append", help="task id (repeatable); default: every task with an expert")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="episode e starts from reset seed seed + e")
    parser.add_argument("--max-episode-steps", type=int, default=50)
    parser.add_argument(
        "--perturb", action="append", default=[], metavar="NAME@SEVERITY",
        help="also measure under this action perturbation (repeatable; e.g. action_noise@1): how much of a "
        "policy's loss under it a closed-loop controller that sees the true state also suffers",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        settings = suite_grid(None, args.perturb)
        for setting in settings:
            action_perturbations(setting.specs)
    except ValueError as err:
        parser.error(str(err))
    for task, setting in itertools.product(args.task or sorted(EXPERTS), settings):
        start = time.perf_counter()
        seeds = range(args.seed, args.seed + args.episodes)
        successes, lengths = run_expert(task, seeds, args.max_episode_steps, perturb=setting.specs)
        failed = [s for s, ok in zip(seeds, successes, strict=True) if not ok]
        ok_lengths = [n for n, ok in zip(lengths, successes, strict=True) if ok] or [0]
        print(
            f"{task} {setting.name}: success {sum(successes)}/{len(successes)} = "
            f"{sum(successes) / len(successes):.1%}, "
            f"mean length of successes {sum(ok_lengths) / len(ok_lengths):.1f} steps, failed seeds {failed}, "
            f"{sum(lengths) / (time.perf_counter() - start):.0f} steps/s"
        )


if __name__ == "__main__":
    sys.exit(main())
