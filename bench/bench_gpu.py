"""The GPU-batched rollout path: ManiSkill's GPU simulation (physx_cuda, GPU rendering) with the policy on the GPU.

    python bench/bench_gpu.py [RECIPE] [--num-envs 16 64 256] [--steps 40] [--autocast bf16] [key=value ...]

For each env count, in a fresh process (one size's GPU physics state cannot carry into the next): env-steps per
second of the env alone (random actions), of env + policy sampling actions (the rollout's inner loop, the policy
under ``--autocast``), their ratio, and the peak GPU memory allocated by torch. Both loops synchronise the GPU before
the clock stops. CUDA only; the CPU path is ``bench/bench_env.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_env import steps_per_s  # noqa: E402  (the script beside this one: bench/ is on sys.path)

from rvla_peft.config import load_config  # noqa: E402
from rvla_peft.envs import make_envs  # noqa: E402
from rvla_peft.policies.registry import build_policy  # noqa: E402

GPU_ENV = ["env.sim_backend=physx_cuda", "env.render_backend=gpu"]


def child(
    recipe: str,
    overrides: list[str],
    num_envs: int,
    steps: int,
    autocast: str,
    backends: list[str] = GPU_ENV,
    device: str = "cuda",
) -> dict:
    """Env-steps/s of ``num_envs`` envs alone and with the recipe's policy acting; ``backends``: the env overrides
    (GPU simulation and rendering here; ``bench/gpu_acceptance.py`` also passes others)."""
    cfg = load_config(recipe, [*overrides, *backends])
    env = make_envs(dataclasses.replace(cfg.env, num_envs=num_envs), device)
    cuda = torch.device(device).type == "cuda"
    try:
        policy = build_policy(cfg, device=device).eval()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast)
        steps_per_s(env, 1, policy, dtype)  # warm-up: the first steps allocate and pick kernels
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        alone, _ = steps_per_s(env, steps)
        with_policy, _ = steps_per_s(env, steps, policy, dtype)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        return {"alone": alone, "policy": with_policy, "peak_gib": peak}
    finally:
        env.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/tiny_cpu.yaml")
    parser.add_argument("--num-envs", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per loop")
    parser.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="bf16", help="the policy's autocast")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA GPU; on the CPU run bench/bench_env.py")
    if args.child:
        result = child(args.recipe, args.overrides, args.child, args.steps, args.autocast)
        print("RESULT " + json.dumps(result), flush=True)
        return
    name = torch.cuda.get_device_name()
    print(f"{args.recipe} {' '.join(args.overrides)} on {name}, policy autocast {args.autocast}")
    for n in args.num_envs:
        cmd = [sys.executable, __file__, args.recipe, "--child", str(n), "--steps", str(args.steps)]
        done = subprocess.run([*cmd, "--autocast", args.autocast, *args.overrides], capture_output=True, text=True)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"  {n:4d} envs: failed ({done.returncode})\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
            continue
        r = json.loads(lines[-1][len("RESULT ") :])
        print(
            f"  {n:4d} envs: env alone {r['alone']:8.0f} env-steps/s, env + policy {r['policy']:8.0f} "
            f"(ratio {r['policy'] / r['alone']:.2f}), peak allocated {r['peak_gib']:.2f} GiB",
            flush=True,
        )


if __name__ == "__main__":
    main()
