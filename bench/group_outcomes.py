"""How a group algorithm would see the pretrained base: sampled success and the spread of outcomes within groups, at
several rollout temperatures, before any training.

    python bench/group_outcomes.py --setting action_noise@1 --temperatures 0.3 0.5 1.0 [--groups 16] [key=value ...]

For each temperature, ``rollout.collect_groups`` runs ``--groups`` groups of ``--size`` episodes of the recipe's
policy (no adapter trained) under the setting, from reset seeds 1000+ (training seeds, not the evaluation's 0-99),
without dynamic sampling. Prints and writes (``--out``, JSON) per temperature: the success rate, the number of
groups whose outcomes are all equal (which dynamic sampling would drop), and the share of the outcome variance that
lies within groups (what the leave-one-out baseline can attribute to the policy's own sampling).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from rvla_peft.algorithms.group import informative_groups  # noqa: E402
from rvla_peft.config import load_config  # noqa: E402
from rvla_peft.envs import make_envs  # noqa: E402
from rvla_peft.envs.perturbed import PerturbedEnv  # noqa: E402
from rvla_peft.perturbations.specs import suite_grid  # noqa: E402
from rvla_peft.policies.registry import build_policy  # noqa: E402
from rvla_peft.rollout import collect_groups  # noqa: E402


def spread(outcomes: torch.Tensor) -> dict:
    """Success, all-equal groups and the within-group share of the variance of [K, G] binary outcomes."""
    p = outcomes.float().mean(1)
    mean = outcomes.float().mean().item()
    total = mean * (1 - mean)
    within = (p * (1 - p)).mean().item()
    return {
        "success": mean,
        "all_equal_groups": int((~informative_groups(outcomes)).sum()),
        "groups": len(p),
        "within_group_share": within / total if total else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/tiny_cpu.yaml")
    parser.add_argument("--setting", required=True, help="NAME@SEVERITY, as rvla_peft.eval --perturb")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--out", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    (setting,) = suite_grid(None, [args.setting])[1:]  # after "clean"; raises a clear error on a bad name
    results = {}
    for temperature in args.temperatures:
        cfg = load_config(args.recipe, [*args.overrides, f"policy.temperature={temperature}"])
        policy = build_policy(cfg).eval()
        env = PerturbedEnv(make_envs(cfg.env, "cpu"), setting.specs, seed=0)
        try:
            torch.manual_seed(0)
            groups = collect_groups(
                policy, env, args.groups, args.size, seed=1000, max_steps=cfg.env.max_episode_steps,
                dynamic_sampling=False,
            )  # fmt: skip
        finally:
            env.close()
        results[temperature] = spread(groups.outcomes)
        print(f"temperature {temperature}: {results[temperature]}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
