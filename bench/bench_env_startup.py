"""Seconds to start CPU envs, as ManiSkill and SAPIEN start them against rvla_peft's start, in one run.

python bench/bench_env_startup.py [RECIPE] [--num-envs 10] [--rounds 2] [key=value ...]

"stock": SAPIEN's stock ``minimal`` shader pack (its BRDF table generated in every process,
``RVLA_PEFT_STOCK_SHADERS=1``) and async workers that import everything themselves. "lean": the pack without the
table (rvla_peft/envs/shaders.py) and workers forked from a forkserver that imported the simulator once. Each
measurement is a fresh Python process (the table is generated once per process), the two alternate in rounds, and
the best round of each counts:

1. one env in the main process (``make_envs`` with ``env.vectorization=sync``, 1 env): build + first reset;
2. ``--num-envs`` async envs (``env.vectorization=async``): build + first reset.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
from rvla_peft.config import load_config
from rvla_peft.envs import maniskill
from rvla_peft.envs import make_envs

recipe, variant, *overrides = sys.argv[1:]
if variant == "stock":
    maniskill.WORKER_PRELOAD = []  # workers import everything themselves
cfg = load_config(recipe, overrides)
start = time.perf_counter()
env = make_envs(cfg.env, "cpu")
env.reset(seed=0)
print(json.dumps(time.perf_counter() - start))
env.close()
"""


def seconds(recipe: str, variant: str, overrides: list[str]) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if variant == "stock":
        env["RVLA_PEFT_STOCK_SHADERS"] = "1"
    else:
        env.pop("RVLA_PEFT_STOCK_SHADERS", None)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, recipe, variant, *overrides], env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/tiny_cpu.yaml")
    parser.add_argument("--num-envs", type=int, default=10, help="async envs in the second measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"recipe={args.recipe} cores={os.cpu_count()} load={load:.1f}")
    cases = {
        "1 env, main process": ["env.vectorization=sync", "env.num_envs=1"],
        f"{args.num_envs} async envs": ["env.vectorization=async", f"env.num_envs={args.num_envs}"],
    }
    for label, case in cases.items():
        best = {}
        for _ in range(args.rounds):
            for variant in ("stock", "lean"):
                s = seconds(args.recipe, variant, [*args.overrides, *case])
                best[variant] = min(best.get(variant, float("inf")), s)
        print(
            f"  {label:<22} stock {best['stock']:5.1f} s  lean {best['lean']:5.1f} s  "
            f"stock/lean {best['stock'] / best['lean']:.2f}x"
        )


if __name__ == "__main__":
    main()
