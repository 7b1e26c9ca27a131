"""Demonstrations from the scripted experts, reproducible from seeds, for behaviour cloning or a warm start.

    python -m rvla_peft.demos --task PickCube-v1 --task PushCube-v1 --episodes 100 --seed 0 --out demos/ \\
        --image-size 64 --num-envs 2
    data = load_demos("demos/")     # rgb [T, H, W, 3] uint8, state, action, ... and episode boundaries

Episode e of a task starts from reset seed ``seed + e`` (envs run in batches of ``num_envs``, batch b reset with
``seed + b * num_envs``, and only the first episode of each env is kept). Seeds are tried in order until
``episodes`` successful episodes are in; failed ones are dropped and counted in the index. The same arguments give
bit-identical arrays (sync or async). A different ``num_envs`` gives the same initial states, but an env's physics
carries a little of its previous episode through a reset (the solver's warm start, ~1e-5 after a few steps; once,
the previous episode's grasp contact), so trajectories may then differ slightly.

An episode ends where ManiSkill ends it: these tasks terminate at success (PickCube's success includes a static
robot, so the last steps are the arm settling at the goal), and the env auto-resets there. So an episode holds no
steps after success, and a failed one (time limit) is dropped.

Layout of ``--out``::

    index.json                     tasks, instructions, seeds, success statistics, control mode, image size, speed
    <task>-00000.safetensors       up to --shard-episodes episodes of one task, steps concatenated:
                                     rgb uint8 [T, H, W, 3]   the policy camera, before the step's action
                                     state float32 [T, 16]    agent.qpos + extra.tcp_pose (the default obs state)
                                     action float32 [T, 7]    the expert's pd_ee_delta_pose action in [-1, 1]
                                     reward float32 [T]       the env's reward for that step (normalized_dense)
                                     episode_length int64 [E], episode_seed int64 [E]
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from rvla_peft.envs import PerturbedEnv, make_envs
from rvla_peft.envs.maniskill import resolve_instruction
from rvla_peft.experts import KEY_WIDTHS, PROPRIO_KEYS, Expert, expert_env_config, make_expert
from rvla_peft.perturbations import Spec

FORMAT = "rvla_peft.demos/1"
INDEX = "index.json"
STATE_DIM = sum(KEY_WIDTHS[k] for k in PROPRIO_KEYS)  # the expert's state starts with these columns


@dataclass
class Episode:
    seed: int
    success: bool
    data: dict[str, Tensor]  # rgb, state, action, reward: one row per step


def record_batch(env, expert: Expert, seed: int, max_steps: int) -> list[Episode]:
    """The first episode of each of the ``env.num_envs`` envs after ``env.reset(seed)``, env i from ``seed + i``."""
    n = env.num_envs
    obs = env.reset(seed=seed)
    rows: dict[str, list[Tensor]] = {"rgb": [], "state": [], "action": [], "reward": []}
    active = torch.ones(n, dtype=torch.bool)
    length = torch.full((n,), max_steps, dtype=torch.int64)
    success = torch.zeros(n, dtype=torch.bool)
    for t in range(max_steps):
        action = expert(obs["state"])
        step = env.step(action)
        rows["rgb"].append(obs["rgb"].cpu())
        rows["state"].append(obs["state"][:, :STATE_DIM].cpu())
        rows["action"].append(action.cpu())
        rows["reward"].append(step.reward.cpu())
        done = (step.terminated | step.truncated).cpu() & active
        length[done] = t + 1
        success[done] = step.episode_success.cpu()[done]
        active &= ~done
        if not active.any():
            break
        obs = step.obs
    if active.any():
        raise RuntimeError(f"an episode did not end within {max_steps} steps: is max_steps the env's time limit?")
    stacked = {key: torch.stack(value, dim=1) for key, value in rows.items()}  # [n, T, ...]
    return [
        Episode(seed + i, bool(success[i]), {k: v[i, : length[i]].clone() for k, v in stacked.items()})
        for i in range(n)
    ]


def _write_shard(path: Path, episodes: list[Episode]) -> None:
    tensors = {key: torch.cat([e.data[key] for e in episodes]) for key in episodes[0].data}
    tensors["episode_length"] = torch.tensor([len(e.data["action"]) for e in episodes], dtype=torch.int64)
    tensors["episode_seed"] = torch.tensor([e.seed for e in episodes], dtype=torch.int64)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def generate_task(
    task: str,
    out: Path,
    episodes: int,
    seed: int,
    image_size: int,
    num_envs: int,
    max_episode_steps: int,
    vectorization: str,
    shard_episodes: int,
    max_attempts: int,
    progress: bool = True,
    action_noise: float = 0.0,
) -> dict:
    """Record ``episodes`` successful expert episodes of ``task`` into shards under ``out``; return its index entry."""

    expert = make_expert(task)
    cfg = expert_env_config(
        task,
        num_envs=num_envs,
        image_size=image_size,
        max_episode_steps=max_episode_steps,
        vectorization=vectorization,
    )
    shards: list[str] = []
    pending: list[Episode] = []
    kept_seeds: list[int] = []
    lengths: list[int] = []
    failed_seeds: list[int] = []
    env_steps, start = 0, time.perf_counter()
    env = make_envs(cfg)
    stepper = env
    if action_noise > 0:  # DART: the env executes a noisy action, the recorded label stays the expert's clean one
        stepper = PerturbedEnv(env, [Spec("action_noise", action_noise)], seed=seed)
    startup = time.perf_counter() - start
    start = time.perf_counter()

    def flush() -> None:
        name = f"{task}-{len(shards):05d}.safetensors"
        _write_shard(out / name, pending)
        shards.append(name)
        pending.clear()

    bar = tqdm(total=episodes, desc=task, unit="ep", disable=not progress)
    with env:
        next_seed = seed
        while len(kept_seeds) < episodes:
            if next_seed - seed >= max_attempts:
                bar.close()
                raise RuntimeError(
                    f"{task}: only {len(kept_seeds)} of {episodes} episodes succeeded in {max_attempts} attempts "
                    f"(failed seeds {failed_seeds[:20]}...)"
                )
            batch = record_batch(stepper, expert, next_seed, max_episode_steps)
            env_steps += num_envs * max(len(e.data["action"]) for e in batch)
            for episode in batch:
                if len(kept_seeds) == episodes:
                    break  # later seeds of this batch were not needed: neither kept nor counted
                next_seed = episode.seed + 1
                if not episode.success:
                    failed_seeds.append(episode.seed)
                    continue
                pending.append(episode)
                kept_seeds.append(episode.seed)
                lengths.append(len(episode.data["action"]))
                bar.update(1)
                if len(pending) == shard_episodes:
                    flush()
            elapsed = time.perf_counter() - start
            bar.set_postfix(dropped=len(failed_seeds), steps_per_s=f"{env_steps / elapsed:.1f}")
    bar.close()
    if pending:
        flush()
    elapsed = time.perf_counter() - start
    attempted = len(kept_seeds) + len(failed_seeds)
    return {
        "instruction": resolve_instruction(cfg),
        "episodes": len(kept_seeds),
        "attempted": attempted,
        "dropped": len(failed_seeds),
        "success_rate": len(kept_seeds) / attempted,
        "seeds": kept_seeds,
        "failed_seeds": failed_seeds,
        "steps": sum(lengths),
        "mean_length": sum(lengths) / len(lengths),
        "shards": shards,
        "env_steps": env_steps,  # including the steps of envs that had already finished their episode
        "startup_s": round(startup, 2),
        "seconds": round(elapsed, 2),  # after startup
        "env_steps_per_s": round(env_steps / elapsed, 1),
    }


def generate_demos(
    tasks: list[str],
    out: str | Path,
    episodes: int,
    seed: int = 0,
    image_size: int = 64,
    num_envs: int = 2,
    max_episode_steps: int = 50,
    vectorization: str = "sync",
    shard_episodes: int = 200,
    max_attempts: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    action_noise: float = 0.0,
) -> dict:
    """Write a demo dataset for ``tasks`` to ``out`` (built in a temporary folder, then moved in); return the index.

    ``max_attempts`` (default ``2 * episodes + 10``) bounds the seeds tried per task. ``action_noise`` > 0 records
    DART-style demos: the executed action gets the ``action_noise`` perturbation at that severity (Gaussian, std
    0.3 x severity, seeded per batch), the recorded action is the expert's clean one for the state reached."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / INDEX).is_file():
            raise FileExistsError(f"{out} exists and is not a demo dataset: refusing to write into it")
        if not overwrite:
            raise FileExistsError(f"{out} already holds a demo dataset: pass overwrite=True (--overwrite)")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = {
        "format": FORMAT,
        "seed": seed,
        "episodes_per_task": episodes,
        "control_mode": "pd_ee_delta_pose",
        "camera": "base_camera",
        "image_size": image_size,
        "max_episode_steps": max_episode_steps,
        "state_keys": list(PROPRIO_KEYS),
        "action_dim": 7,
        "num_envs": num_envs,
        "vectorization": vectorization,
        "action_noise": action_noise,
        "tasks": {},
    }
    for task in tasks:
        index["tasks"][task] = generate_task(
            task,
            tmp,
            episodes,
            seed,
            image_size,
            num_envs,
            max_episode_steps,
            vectorization,
            shard_episodes,
            max_attempts if max_attempts is not None else 2 * episodes + 10,
            progress,
            action_noise,
        )
    (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return index


def load_demos(directory: str | Path) -> dict:
    """Every episode of a demo dataset, steps concatenated over tasks in index order.

    Returns ``rgb`` uint8 [T, H, W, 3], ``state`` float32 [T, 16], ``action`` float32 [T, 7], ``reward`` [T],
    ``episode_start`` / ``episode_length`` / ``episode_seed`` / ``episode_task`` int64 [E] (episode e is rows
    ``episode_start[e] : episode_start[e] + episode_length[e]``, its task ``tasks[episode_task[e]]``), and the lists
    ``tasks`` and ``instruction`` (one per episode)."""
    directory = Path(directory)
    index = json.loads((directory / INDEX).read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{directory / INDEX}: not a {FORMAT} dataset (format {index.get('format')!r})")
    parts: dict[str, list[Tensor]] = {}
    task_ids: list[Tensor] = []
    instructions: list[str] = []
    for task_id, entry in enumerate(index["tasks"].values()):
        for name in entry["shards"]:
            shard = load_file(str(directory / name))
            for key, value in shard.items():
                parts.setdefault(key, []).append(value)
            count = len(shard["episode_length"])
            task_ids.append(torch.full((count,), task_id, dtype=torch.int64))
            instructions += [entry["instruction"]] * count
    data: dict = {key: torch.cat(value) for key, value in parts.items()}
    lengths = data["episode_length"]
    data["episode_start"] = torch.cumsum(lengths, 0) - lengths
    data["episode_task"] = torch.cat(task_ids)
    data["tasks"] = list(index["tasks"])
    data["instruction"] = instructions
    return data


if __name__ == "__main__":  # the command lives in rvla_peft/cli/demos.py
    import sys

    from rvla_peft.cli.demos import main

    sys.exit(main())
