"""Env steps per second: the env alone (random actions) vs env + policy (sampling actions), in one run.

python bench/bench_env.py [RECIPE] [--steps 64] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rvla_peft.config import load_config  # noqa: E402
from rvla_peft.envs import make_envs  # noqa: E402
from rvla_peft.policies.registry import build_policy  # noqa: E402
from rvla_peft.rollout import with_instructions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/tiny_cpu.yaml")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    cfg = load_config(args.recipe, args.overrides)
    device = "cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu"
    env = make_envs(cfg.env, device=device)
    policy = build_policy(cfg, device=device).eval()
    obs = env.reset(seed=0)
    n = env.num_envs

    def run(with_policy: bool) -> float:
        nonlocal obs
        start = time.perf_counter()
        for _ in range(args.steps):
            if with_policy:
                action = policy.act(with_instructions(obs, env)).env_action
            else:
                action = torch.rand(n, env.action_dim, device=device) * 2 - 1
            obs = env.step(action).obs
        return args.steps * n / (time.perf_counter() - start)

    run(True)  # warm-up
    rates = {"env": [], "env+policy": []}
    for _ in range(2):  # interleaved
        rates["env"].append(run(False))
        rates["env+policy"].append(run(True))
    env_rate, full_rate = max(rates["env"]), max(rates["env+policy"])
    print(
        f"task={cfg.env.task} num_envs={n} image={cfg.env.image_size} device={device} "
        f"vectorization={cfg.env.vectorization} model={cfg.model.name_or_path}"
    )
    print(f"  env alone:    {env_rate:.1f} env-steps/s")
    print(f"  env + policy: {full_rate:.1f} env-steps/s")
    print(f"ratio (env + policy) / env: {full_rate / env_rate:.2f}")
    env.close()


if __name__ == "__main__":
    main()
