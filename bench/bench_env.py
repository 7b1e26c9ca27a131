"""Env steps per second with ManiSkill's full render meshes vs env.render_detail=fast, in one run.

python bench/bench_env.py [RECIPE] [--steps 40] [--rounds 3] [--policy-envs 2 4] [key=value ...]

1. The env alone (1 env, random actions): "full" and "fast" alternate in rounds (so that load on the machine
   drifts the same way for both), best round of each, and their ratio.
2. Env + policy (sampling actions, the LoRA folded in as in the trainer's rollouts: ``Policy.acting``) for both at
   each --policy-envs size (the recipe's vectorization); skip with --policy-envs (nothing after it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rvla_peft.config import TrainConfig, load_config  # noqa: E402
from rvla_peft.envs import VecEnv, make_envs  # noqa: E402
from rvla_peft.policies.base import Policy  # noqa: E402
from rvla_peft.policies.registry import build_policy  # noqa: E402
from rvla_peft.rollout import with_instructions  # noqa: E402

DETAILS = ("full", "fast")


def steps_per_s(
    env: VecEnv, steps: int, policy: Policy | None = None, autocast: torch.dtype | None = None
) -> tuple[float, float]:
    """(env-steps per second of wall time, CPU ms of this process per env-step: steadier on a loaded machine, and
    complete for sync vector envs, which render in this process). ``autocast``: the policy's, not the env's (a GPU
    env's controller does matrix products too). A CUDA env is synchronised before each clock read."""
    sync = torch.cuda.synchronize if env.device.type == "cuda" else lambda: None
    obs = env.reset(seed=0)
    sync()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        if policy is not None:
            cast = torch.autocast(env.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
            with cast:
                action = policy.act(with_instructions(obs, env)).env_action
        else:
            action = torch.rand(env.num_envs, env.action_dim, device=env.device) * 2 - 1
        obs = env.step(action).obs
    sync()
    n = steps * env.num_envs
    return n / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / n


def compare(cfg: TrainConfig, num_envs: int, steps: int, rounds: int, policy: Policy | None, device: str) -> dict:
    """Best (steps/s, CPU ms/step) of each render detail over ``rounds`` alternating rounds, after a warm-up step."""
    envs = {d: make_envs(dataclasses.replace(cfg.env, num_envs=num_envs, render_detail=d), device) for d in DETAILS}
    try:
        for env in envs.values():
            steps_per_s(env, 1, policy)
        rates = {d: [] for d in DETAILS}
        for _ in range(rounds):
            for detail, env in envs.items():
                rates[detail].append(steps_per_s(env, steps, policy))
        return {d: (max(r for r, _ in runs), min(c for _, c in runs)) for d, runs in rates.items()}
    finally:
        for env in envs.values():
            env.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/tiny_cpu.yaml")
    parser.add_argument("--steps", type=int, default=40, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policy-envs", type=int, nargs="*", default=[2, 4], help="env counts for env + policy")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    cfg = load_config(args.recipe, args.overrides)
    device = "cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"task={cfg.env.task} image={cfg.env.image_size} device={device} vectorization={cfg.env.vectorization} "
        f"model={cfg.model.name_or_path} torch_threads={torch.get_num_threads()} load={load:.1f}"
    )

    def line(label: str, rates: dict) -> None:
        (full, full_cpu), (fast, fast_cpu) = rates["full"], rates["fast"]
        print(
            f"  {label:<22} full {full:6.1f}  fast {fast:6.1f} env-steps/s  fast/full {fast / full:.2f}x   "
            f"(CPU ms/env-step: full {full_cpu:.1f}, fast {fast_cpu:.1f}, {full_cpu / fast_cpu:.2f}x)"
        )

    line("env alone, 1 env:", compare(cfg, 1, args.steps, args.rounds, None, device))
    if args.policy_envs:
        policy = build_policy(cfg, device=device).eval()
        with policy.acting():  # as the trainer's rollouts act: the LoRA folded in (policy.merge_lora_to_act)
            for n in args.policy_envs:
                line(f"env + policy, {n} envs:", compare(cfg, n, max(args.steps // n, 8), 2, policy, device))


if __name__ == "__main__":
    main()
