"""Time per ``act`` call of the action-token policy, the previous decoding against the current one, and the policy's
share of a rollout step, in one run.

python bench/bench_decoding.py [RECIPE] [--batches 2 4] [--calls 60] [--steps 20] [key=value ...]

1. ``act`` alone on env observations at each --batches size: "old" (``act`` as it was before it decoded in inference
   mode, kept here as ``old_act``) and "new" (``policy.act``) alternate call by call; the median wall and CPU ms per
   call of each, the median of the paired CPU-time ratios new/old (CPU time leaves out waiting for a core, so it is
   steadier on a loaded machine), and whether both gave the same bits (actions, log-probs, means, values) from one
   seed, sampled and deterministic.
   "merged": ``policy.act`` inside ``policy.acting()``, the LoRA folded into the weights as the trainer's rollouts
   and ``python -m rvla_peft.eval`` act (``policy.merge_lora_to_act``): its median ms, its CPU-time ratio to "new",
   and how far its samples are from the unmerged policy's; and the merged prefill forward alone (image + prompt,
   no decoding), the floor of any ``act`` of this model.
   With ``--compile``, also "compiled" (``policy.compile=true``: the same weights, act's forwards through
   ``torch.compile``): the seconds its first call took (compiling), its median ms, its CPU-time ratio to "new", and
   how far its samples are from eager decoding (deterministic actions equal or not, largest mean-action difference).
2. A rollout of --steps steps with the recipe's env config, old then new from the same env seed and torch seed (so
   the same trajectory): policy and env ms per step and the policy's share, policy / (policy + env), by wall clock
   and by this process's CPU time (complete for sync vector envs only: async ones step in worker processes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rvla_peft.config import load_config  # noqa: E402
from rvla_peft.envs import make_envs  # noqa: E402
from rvla_peft.policies.base import ActionSample  # noqa: E402
from rvla_peft.policies.registry import build_policy  # noqa: E402
from rvla_peft.rollout import with_instructions  # noqa: E402

FIELDS = ("action", "env_action", "log_prob", "value", "mean")


def old_act(policy, obs: dict, deterministic: bool = False) -> ActionSample:
    """``ActionTokenPolicy.act`` before this change: the same decoding under no-grad instead of inference mode."""
    with torch.no_grad():
        return policy._decode(obs, deterministic)


def same_bits(policy, obs: dict) -> bool:
    """Old and new give identical samples from the same seed, sampled and deterministic."""
    for deterministic in (False, True):
        torch.manual_seed(0)
        old = old_act(policy, obs, deterministic)
        torch.manual_seed(0)
        new = policy.act(obs, deterministic)
        if not all(torch.equal(getattr(old, f), getattr(new, f)) for f in FIELDS):
            return False
    return True


def clocks() -> tuple[float, float]:
    """(wall, CPU time of this process) in seconds. CPU time is steadier on a loaded machine: it leaves out the time
    the process waits for a core."""
    return time.perf_counter(), time.process_time()


def time_act(acts: dict, obs: dict, calls: int) -> dict:
    """Median (wall ms, CPU ms) per call of each act and, under "ratio", the median of the paired CPU-time ratios
    new/old (and "compiled_ratio", compiled/new, when there is a compiled act): the acts alternate call by call, in
    ABBA order, so that drifting load hits them alike."""
    for act in acts.values():
        act(obs)
    times = {name: [] for name in acts}
    for i in range(calls):
        for name, act in acts.items() if i % 2 == 0 else reversed(acts.items()):
            wall, cpu = clocks()
            act(obs)
            end_wall, end_cpu = clocks()
            times[name].append((1000 * (end_wall - wall), 1000 * (end_cpu - cpu)))
    result = {name: tuple(statistics.median(x) for x in zip(*t, strict=True)) for name, t in times.items()}

    def ratio(a: str, b: str) -> float:
        return statistics.median(x[1] / y[1] for x, y in zip(times[a], times[b], strict=True))

    result["ratio"] = ratio("new", "old")
    result["merged_ratio"] = ratio("merged", "new")
    if "compiled" in acts:
        result["compiled_ratio"] = ratio("compiled", "new")
    return result


def prefill_ms(policy, obs: dict, calls: int) -> float:
    """Median CPU ms of the one forward over image and prompt that every ``act`` begins with, without the decoding
    after it: the floor of an ``act`` of this model, however the tokens are decoded."""
    times = []
    with torch.inference_mode():
        for _ in range(calls + 1):
            start = clocks()[1]
            policy._prompt_forward(obs, use_cache=True)
            times.append(1000 * (clocks()[1] - start))
    return statistics.median(times[1:])


def agreement(other, policy, obs: dict) -> str:
    """Deterministic decoding, another policy object (compiled, merged) vs ``policy``: same actions or not, and
    the largest mean-action difference."""
    a, b = other.act(obs, deterministic=True), policy.act(obs, deterministic=True)
    return f"same actions: {torch.equal(a.action, b.action)}, max |mean diff| {(a.mean - b.mean).abs().max():.1e}"


def rollout_split(act, env, steps: int) -> dict[str, tuple[float, float]]:
    """{"wall" | "cpu": (policy ms, env ms) per step} over ``steps`` steps from env seed 0 and torch seed 0."""
    obs = env.reset(seed=0)
    torch.manual_seed(0)
    policy_s, env_s = [0.0, 0.0], [0.0, 0.0]  # wall, CPU
    for _ in range(steps):
        start = clocks()
        action = act(with_instructions(obs, env)).env_action
        middle = clocks()
        obs = env.step(action).obs
        end = clocks()
        for k in range(2):
            policy_s[k] += middle[k] - start[k]
            env_s[k] += end[k] - middle[k]
    return {clock: (1000 * policy_s[k] / steps, 1000 * env_s[k] / steps) for k, clock in enumerate(("wall", "cpu"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/tiny_cpu.yaml")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 4], help="env counts for act alone")
    parser.add_argument("--calls", type=int, default=60, help="act calls of each, alternating")
    parser.add_argument("--steps", type=int, default=20, help="rollout steps")
    parser.add_argument("--compile", action="store_true", help="also time act with policy.compile=true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    cfg = load_config(args.recipe, args.overrides)
    device = "cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"model={cfg.model.name_or_path} task={cfg.env.task} image={cfg.env.image_size} device={device} "
        f"torch_threads={torch.get_num_threads()} load={load:.1f}"
    )
    policy = build_policy(cfg, device=device).eval()
    merged = build_policy(cfg, device=device).eval()  # as the trainer collects rollouts
    stack = contextlib.ExitStack()
    stack.enter_context(merged.acting())
    acts = {"old": lambda obs: old_act(policy, obs), "new": policy.act, "merged": merged.act}
    if args.compile:
        compiled_cfg = dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, compile=True))
        compiled = build_policy(compiled_cfg, device=device).eval()
        acts["compiled"] = compiled.act

    print(f"act alone, {args.calls} calls of each (median ms per call, wall and CPU time):")
    for n in args.batches:
        env = make_envs(dataclasses.replace(cfg.env, num_envs=n), device)
        try:
            obs = with_instructions(env.reset(seed=0), env)
        finally:
            env.close()
        if args.compile:  # the first call compiles; dynamic shapes: one graph for every batch size
            start = time.perf_counter()
            compiled.act(obs)
            print(f"  batch {n}: compiled act's first call {time.perf_counter() - start:.1f} s")
        ms = time_act(acts, obs, args.calls)
        (old_wall, old_cpu), (new_wall, new_cpu) = ms["old"], ms["new"]
        print(
            f"  batch {n}: old {old_wall:5.1f} wall {old_cpu:5.1f} CPU   new {new_wall:5.1f} wall {new_cpu:5.1f} CPU"
            f"   new/old {ms['ratio']:.3f} (CPU, paired)   same bits: {same_bits(policy, obs)}"
        )
        wall, cpu = ms["merged"]
        print(
            f"  batch {n}: merged {wall:5.1f} wall {cpu:5.1f} CPU   merged/new {ms['merged_ratio']:.3f} "
            f"(CPU, paired)   {agreement(merged, policy, obs)}"
        )
        print(f"  batch {n}: merged, the prefill forward alone {prefill_ms(merged, obs, args.calls):5.1f} CPU")
        if args.compile:
            wall, cpu = ms["compiled"]
            print(
                f"  batch {n}: compiled {wall:5.1f} wall {cpu:5.1f} CPU   compiled/new {ms['compiled_ratio']:.3f} "
                f"(CPU, paired)   {agreement(compiled, policy, obs)}"
            )

    env = make_envs(cfg.env, device)
    try:
        print(f"rollout, {cfg.env.num_envs} envs ({cfg.env.vectorization}), {args.steps} steps (ms per step):")
        for name, act in acts.items():
            split = rollout_split(act, env, args.steps)
            print(
                f"  {name}:"
                + "".join(
                    f"   {clock}: policy {p:5.1f} env {e:5.1f} policy share {p / (p + e):.1%}"
                    for clock, (p, e) in split.items()
                )
            )
    finally:
        env.close()
        stack.close()


if __name__ == "__main__":
    main()
