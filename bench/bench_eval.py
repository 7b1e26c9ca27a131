"""Evaluation episodes per minute: the settings of the throughput issue (full render detail, 2 envs) against today's,
in one run.

python bench/bench_eval.py [RECIPE] [--episodes 8] [--rounds 2] [--configs full:2:on fast:8:stream] [key=value ...]

Each configuration is ``DETAIL:NUM_ENVS[:OPTION...]``: ``env.render_detail`` and ``env.num_envs``, then any of
``sync`` / ``async`` (``env.vectorization``; default the recipe's), ``on`` / ``off`` (the base's fresh LoRA adapter
active, as the evaluation ran the base before it switched it off, or off, the default, as ``python -m rvla_peft.eval``
runs it now: the same bits) and ``batch`` / ``stream`` (``run_episodes``' schedule; default ``batch``). Each evaluates
the recipe's base policy as ``python -m rvla_peft.eval`` does (argmax actions, episode e from reset seed e), clean and
under each ``--perturb`` setting. The configurations alternate in rounds, so that load on the machine drifts the
same way for all; the best round of each is kept. Printed per configuration: episodes per minute, the share of env
steps spent on envs whose episode had already ended (a batch runs until its slowest episode ends), the successes,
and the speed ratio to the first configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rvla_peft.config import load_config  # noqa: E402
from rvla_peft.envs import PerturbedEnv, make_envs  # noqa: E402
from rvla_peft.perturbations import suite_grid  # noqa: E402
from rvla_peft.policies.registry import build_policy  # noqa: E402
from rvla_peft.rollout import run_episodes  # noqa: E402

OPTIONS = {"sync": "vectorization", "async": "vectorization", "on": "adapter", "off": "adapter",
           "batch": "schedule", "stream": "schedule"}  # fmt: skip


class _CountingSteps:
    """The env, counting its (batched) steps."""

    def __init__(self, env) -> None:
        self.env, self.steps = env, 0

    def __getattr__(self, name: str):
        return getattr(self.env, name)

    def step(self, action):
        self.steps += 1
        return self.env.step(action)


def one_round(policy, env, settings: dict, episodes: int, max_steps: int, options: dict) -> dict:
    """Seconds, env steps taken, episode steps that counted, and successes, over every setting."""
    taken = useful = 0
    successes = {}
    # A fresh scene: the simulator's solver warm-starts from an env's earlier episodes, so configurations sharing an
    # env would otherwise play slightly different trajectories (and episode lengths).
    env.reset(seed=0, rebuild=True)
    start = time.perf_counter()
    stream = options["schedule"] == "stream"
    for label, specs in settings.items():
        counting = _CountingSteps(PerturbedEnv(env, specs, seed=0, keyed=stream))
        with contextlib.nullcontext() if options["adapter"] == "on" else policy.peft_model.disable_adapter():
            out = run_episodes(policy, counting, episodes, seed=0, max_steps=max_steps, schedule=options["schedule"])
        taken += counting.steps * env.num_envs
        useful += int(out.lengths.sum())
        successes[label] = int(out.success.sum())
    return {"seconds": time.perf_counter() - start, "taken": taken, "useful": useful, "successes": successes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/tiny_cpu.yaml")
    parser.add_argument("--episodes", type=int, default=8, help="episodes per setting and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["full:2:sync:on", "fast:2", "fast:8:async", "fast:8:async:stream"],
        help="DETAIL:NUM_ENVS[:OPTION...], options sync|async, on|off (the base's adapter), batch|stream",
    )
    parser.add_argument("--perturb", action="append", default=None, help="NAME@SEVERITY (default: shift@0.5)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    cfg = load_config(args.recipe, args.overrides)
    device = "cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu"
    settings = {s.name: s.specs for s in suite_grid(None, args.perturb or ["shift@0.5"])}  # clean first
    configs, options = [], {}
    for text in args.configs:
        detail, n, *rest = text.split(":")
        chosen = {"vectorization": cfg.env.vectorization, "adapter": "off", "schedule": "batch"}
        for option in rest:
            if option not in OPTIONS:
                parser.error(f"{text}: unknown option {option!r}; options: {', '.join(OPTIONS)}")
            chosen[OPTIONS[option]] = option
        options[text] = chosen
        env_cfg = dataclasses.replace(
            cfg.env, render_detail=detail, num_envs=int(n), vectorization=chosen["vectorization"]
        )
        configs.append((text, env_cfg))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"task={cfg.env.task} image={cfg.env.image_size} device={device} vectorization={cfg.env.vectorization} "
        f"model={cfg.model.name_or_path} episodes={args.episodes} x {len(settings)} settings "
        f"torch_threads={torch.get_num_threads()} load={load:.1f}"
    )
    policy = build_policy(cfg, device=device).eval()
    # Configurations that differ only in adapter or schedule share their envs (rebuilt at each round): every env is a
    # simulator process or an in-process simulator, and holding all of them at once woke the OOM killer.
    shared = {repr(env_cfg): env_cfg for _, env_cfg in configs}
    built = {key: make_envs(env_cfg, device) for key, env_cfg in shared.items()}
    envs = {label: built[repr(env_cfg)] for label, env_cfg in configs}
    try:
        for env in built.values():  # warm-up: first render, first forward
            run_episodes(policy, env, env.num_envs, seed=0, max_steps=cfg.env.max_episode_steps)
        rounds = {label: [] for label in envs}
        for _ in range(args.rounds):
            for label, env in envs.items():
                rounds[label].append(
                    one_round(policy, env, settings, args.episodes, cfg.env.max_episode_steps, options[label])
                )
    finally:
        for env in built.values():
            env.close()
    reference = None
    for label, runs in rounds.items():
        best = min(runs, key=lambda r: r["seconds"])
        per_min = 60 * args.episodes * len(settings) / best["seconds"]
        reference = reference or per_min
        idle = 1 - best["useful"] / best["taken"]
        wins = ", ".join(f"{k} {v}/{args.episodes}" for k, v in best["successes"].items())
        print(
            f"  {label:<14} {per_min:6.1f} episodes/min  x{per_min / reference:.2f}   idle env-steps {idle:5.1%}   "
            f"successes: {wins}"
        )


if __name__ == "__main__":
    main()
