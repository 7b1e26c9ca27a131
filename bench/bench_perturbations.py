"""Perturbation cost: env steps/s plain vs wrapped with every observation perturbation, and each one's cost alone.

python bench/bench_perturbations.py [--blocks 20] [--block 10] [--num-envs 2] [--image-size 64] [--severity 0.5]

The env is a real ManiSkill env (PickCube-v1, CPU simulation where there is no GPU) stepped with random actions.
Plain and wrapped blocks of steps alternate and each rate is the median over its blocks, so load from other
processes on a shared machine falls on both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rvla_peft.config import EnvConfig, PerturbationSpec  # noqa: E402
from rvla_peft.envs import PerturbedEnv, VecEnv, make_envs  # noqa: E402
from rvla_peft.envs.perturbed import _one_thread_on_cpu  # noqa: E402
from rvla_peft.perturbations import PERTURBATIONS, ObservationPerturbation  # noqa: E402


def steps_per_second(env: VecEnv | PerturbedEnv, steps: int, generator: torch.Generator) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        env.step(torch.rand(env.num_envs, env.action_dim, generator=generator, device=env.device) * 2 - 1)
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    return steps * env.num_envs / (time.perf_counter() - start)


def microseconds_per_batch(name: str, severity: float, n: int, size: int, device: str, repeats: int) -> float:
    p = PERTURBATIONS[name](severity)
    g = torch.Generator(device=device).manual_seed(0)
    if issubclass(PERTURBATIONS[name], ObservationPerturbation):
        x = {
            "rgb": torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, device=device),
            "state": torch.randn(n, 9, device=device),
        }
    else:
        x = torch.rand(n, 7, device=device) * 2 - 1
    for _ in range(3):  # warm-up: per-env state, kernels, per-device constants
        p.apply(x, g)
    best = float("inf")
    for _ in range(5):  # the best of 5 timings, as timeit advises: others' load only ever adds time
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with _one_thread_on_cpu(torch.device(device)):  # as PerturbedEnv runs them
            for _ in range(repeats):
                p.apply(x, g)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / repeats * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--block", type=int, default=10, help="steps per block")
    parser.add_argument("--num-envs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--severity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=50, help="calls per timing of one perturbation")
    args = parser.parse_args()

    observation_suite = [n for n, cls in PERTURBATIONS.items() if issubclass(cls, ObservationPerturbation)]
    env = make_envs(EnvConfig(num_envs=args.num_envs, image_size=args.image_size))
    wrapped = PerturbedEnv(env, [PerturbationSpec(n, args.severity) for n in observation_suite], seed=0)
    wrapped.reset(seed=0)
    g = torch.Generator(device=env.device).manual_seed(0)
    steps_per_second(env, args.block, g)  # warm-up
    steps_per_second(wrapped, args.block, g)
    rates: dict[str, list[float]] = {"plain": [], "wrapped": []}
    for _ in range(args.blocks):
        rates["plain"].append(steps_per_second(env, args.block, g))
        rates["wrapped"].append(steps_per_second(wrapped, args.block, g))
    env.close()
    plain, perturbed = statistics.median(rates["plain"]), statistics.median(rates["wrapped"])

    device = str(env.device)
    costs = {
        n: microseconds_per_batch(n, args.severity, args.num_envs, args.image_size, device, args.repeats)
        for n in PERTURBATIONS
    }
    suite_us = sum(costs[n] for n in observation_suite)
    step_us = args.num_envs / plain * 1e6

    print(
        f"PickCube-v1 num_envs={args.num_envs} image={args.image_size} device={device} "
        f"threads={torch.get_num_threads()} severity={args.severity} {args.blocks} x 2 blocks of {args.block} steps"
    )
    print(f"  plain env:                    {plain:8.1f} env-steps/s  ({step_us / 1e3:.2f} ms per batched step)")
    print(f"  + {len(observation_suite)} observation perturbations: {perturbed:8.1f} env-steps/s")
    print(f"step time ratio wrapped / plain: {plain / perturbed:.3f}  (target <= 1.1)")
    print(f"  from the costs below: 1 + {suite_us:.0f} us / {step_us:.0f} us = {1 + suite_us / step_us:.3f}")
    print(f"per-perturbation cost, us per batch of [{args.num_envs}, {args.image_size}, {args.image_size}, 3]:")
    for name, us in costs.items():
        kind = "obs" if name in observation_suite else "action"
        print(f"  {name:16s} {kind:6s} {us:8.1f}")


if __name__ == "__main__":
    main()
