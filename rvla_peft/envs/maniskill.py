"""Batched ManiSkill3 environments behind one small interface, on GPU or CPU simulation.

    envs = make_envs(cfg.env)          # a VecEnv
    obs = envs.reset(seed=0)           # {"rgb": uint8 [N, H, W, 3], "state": float32 [N, D]} on envs.device
    step = envs.step(action)           # action [N, action_dim] in [-1, 1]; returns a Step

Finished envs reset automatically within the same ``step``: ``step.obs`` is then the new episode's first
observation and ``step.final_obs`` holds the last observation of the finished one.

GPU (``physx_cuda``): one ManiSkill env of N sub-scenes behind ``ManiSkillVectorEnv``; every tensor stays on the
GPU. CPU (``physx_cpu`` allows one env per process): a gymnasium ``SyncVectorEnv`` or ``AsyncVectorEnv`` of N
single envs. ``AsyncVectorEnv`` starts its workers with "forkserver", so a script using it needs an
``if __name__ == "__main__":`` guard. A dead worker is reported as an :class:`EnvWorkerError` naming it, or, with
``env.restart_dead_workers``, the workers are rebuilt and the episodes in flight dropped (see ``CpuVecEnv``).
"""

from __future__ import annotations

import difflib
import functools
import multiprocessing
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch

if TYPE_CHECKING:
    from rvla_peft.config import EnvConfig

# Built-in instructions for the tasks whose assets ship inside the mani_skill wheel (they work offline).
INSTRUCTIONS: dict[str, str] = {
    "PickCube-v1": "pick up the red cube and move it to the goal",
    "PushCube-v1": "push the cube to the goal region",
    "PullCube-v1": "pull the cube to the goal region",
    "StackCube-v1": "stack the red cube on top of the green cube",
    "PokeCube-v1": "use the peg to poke the red cube to the goal",
    "PlaceSphere-v1": "place the sphere into the shallow bin",
    "LiftPegUpright-v1": "lift the peg and stand it upright on the table",
    "PegInsertionSide-v1": "pick up the peg and insert it into the hole in the box",
    "PushT-v1": "push the T-shaped block onto the target",
    "RollBall-v1": "push the ball so that it rolls into the goal region",
    "PlugCharger-v1": "plug the charger into the receptacle",
    "PullCubeTool-v1": "use the L-shaped tool to pull the cube to the goal region",
    "StackPyramid-v1": "place the red cube next to the green cube and stack the blue cube on top of both",
    "PickCubeSO100-v1": "pick up the cube and move it to the goal",
}

Obs = dict[str, torch.Tensor]


@dataclass
class Step:
    """What one ``VecEnv.step`` returns; the ``episode_*`` fields are valid only where ``terminated | truncated``."""

    obs: Obs  # after auto-reset for envs that ended this step
    reward: torch.Tensor  # [N] float32
    terminated: torch.Tensor  # [N] bool: success/failure, no bootstrap
    truncated: torch.Tensor  # [N] bool: time limit and not terminated, bootstrap from final_obs
    final_obs: Obs | None  # full batch; rows where done hold the finished episode's last obs; None if none done
    episode_success: torch.Tensor  # [N] bool: info["success"] at the finished episode's last step
    episode_return: torch.Tensor  # [N] float32: sum of the finished episode's rewards
    episode_length: torch.Tensor  # [N] int64
    # [N] bool: the episode ended because its env worker died and was restarted, not in the task (a rollout should
    # not count it as an outcome); such rows are also marked truncated. None: no row was dropped.
    dropped: torch.Tensor | None = field(default=None)
    # [N] int64 on the CPU: the reset seed of the queued episode (VecEnv.queue_episodes) that env i starts at this
    # step, -1 where none. None: no queued episode started.
    reset_seeds: torch.Tensor | None = field(default=None)


class EnvWorkerError(RuntimeError):
    """An env worker process died; the message names the env, its pid and its exit code or signal."""


class VecEnv:
    """N environments stepped together; subclasses implement the backend, this class keeps episode statistics."""

    num_envs: int
    device: torch.device
    action_dim: int
    instructions: list[str]

    def __init__(self, num_envs: int, device: torch.device, action_dim: int, instructions: list[str]) -> None:
        self.num_envs = num_envs
        self.device = device
        self.action_dim = action_dim
        self.instructions = instructions
        self._returns = torch.zeros(num_envs, dtype=torch.float32, device=device)
        self._lengths = torch.zeros(num_envs, dtype=torch.int64, device=device)
        self.dropped_episodes = 0  # episodes cut short by a dead env worker (restart_dead_workers), for the logs
        self._rebuild = False  # read by a backend's _reset: reset(rebuild=True) is in progress
        self._dropped: torch.Tensor | None = None  # set by a backend's _step when it dropped episodes
        self._queue: list[int] = []  # reset seeds of the episodes to start next (queue_episodes)

    # Whether env i's initial state after ``reset(seed)`` is the one a single env reset with ``seed + i`` starts
    # from, at any num_envs (CPU envs). GPU envs: ManiSkill draws the whole batch's initial states after
    # ``torch.manual_seed`` of the first seed, so env i's start depends on ``seed``, ``i`` and ``num_envs``.
    initial_state_per_seed: bool = True

    def reset(self, seed: int | None = None, rebuild: bool = False) -> Obs:
        """Reset every env; env i gets ``seed + i``, so the same seed gives the same initial states: on CPU envs
        those of single envs reset with ``seed + i``; on GPU envs a batched draw seeded with ``seed``, the same
        only at the same ``num_envs`` (``initial_state_per_seed``).

        ``rebuild``: also rebuild the scenes (ManiSkill's ``reconfigure``), dropping what the physics engine carries
        over from earlier episodes (its solver caches shift later states by float rounding): a run resumed from a
        checkpoint then continues exactly as the uninterrupted run, which rebuilt at the same update. CPU envs
        only: GPU envs keep the scenes they were built with, as each GPU reconfiguration reallocates PhysX's GPU
        buffers (the pattern behind ManiSkill's GPU out-of-memory reports); a resumed GPU run differs from the
        uninterrupted one at that float level."""
        self._returns.zero_()
        self._lengths.zero_()
        self._queue = []
        self._rebuild = rebuild
        try:
            return self._reset(seed)
        finally:
            self._rebuild = False

    def queue_episodes(self, seeds: list[int]) -> None:
        """Episodes to play next, by reset seed: as envs finish an episode (in env order within a step), each starts
        the next queued one instead of the episode its auto-reset drew, and ``Step.reset_seeds`` says which. Once
        the queue is empty, finished envs auto-reset as before. ``reset`` empties it. The evaluation's ``stream``
        schedule (``run_episodes``): no env waits for the others at the end of a batch."""
        if not self.can_queue_episodes:
            raise NotImplementedError(f"{type(self).__name__} cannot reset single envs: queued episodes need CPU envs")
        self._queue = list(seeds)

    @property
    def can_queue_episodes(self) -> bool:
        return type(self)._reset_envs is not VecEnv._reset_envs

    def step(self, action: torch.Tensor) -> Step:
        if action.shape != (self.num_envs, self.action_dim):
            raise ValueError(f"action must have shape {(self.num_envs, self.action_dim)}, got {tuple(action.shape)}")
        obs, reward, terminated, truncated, final_obs, final_success = self._step(action)
        truncated = truncated & ~terminated
        done = terminated | truncated
        reset_seeds = None
        if self._queue and self._dropped is None and bool(done.any()):
            obs, reset_seeds = self._start_queued(done)
        dropped, self._dropped = self._dropped, None
        episode_return = self._returns + reward
        episode_length = self._lengths + 1
        # New tensors rather than in-place updates: the returned episode_* stay valid after the next step.
        self._returns = episode_return.masked_fill(done, 0.0)
        self._lengths = episode_length.masked_fill(done, 0)
        return Step(
            obs=obs,
            reward=reward,
            terminated=terminated,
            truncated=truncated,
            final_obs=final_obs,
            episode_success=final_success & done,
            episode_return=episode_return,
            episode_length=episode_length,
            dropped=dropped,
            reset_seeds=reset_seeds,
        )

    def _start_queued(self, done: torch.Tensor) -> tuple[Obs, torch.Tensor]:
        """Reset the first finished envs with the next queued seeds; the batch's observations after it."""
        seeds = torch.full((self.num_envs,), -1, dtype=torch.int64)
        for i in done.nonzero().flatten().tolist()[: len(self._queue)]:
            seeds[i] = self._queue.pop(0)
        return self._reset_envs(seeds >= 0, seeds.tolist()), seeds

    def close(self) -> None:
        raise NotImplementedError

    def _reset(self, seed: int | None) -> Obs:
        raise NotImplementedError

    def _reset_envs(self, mask: torch.Tensor, seeds: list[int]) -> Obs:
        """Backend: reset env i where ``mask`` ([N] bool, CPU) from ``seeds[i]``; every env's observations after."""
        raise NotImplementedError

    def _step(
        self, action: torch.Tensor
    ) -> tuple[Obs, torch.Tensor, torch.Tensor, torch.Tensor, Obs | None, torch.Tensor]:
        """Backend step: (obs, reward, terminated, truncated, final_obs or None, success at the last step)."""
        raise NotImplementedError

    def __enter__(self) -> VecEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------------
# Observation keys


def _leaf_paths(space: gym.spaces.Dict, prefix: str = "") -> list[str]:
    paths = []
    for key, sub in space.spaces.items():
        if isinstance(sub, gym.spaces.Dict):
            paths += _leaf_paths(sub, f"{prefix}{key}.")
        else:
            paths.append(f"{prefix}{key}")
    return paths


def _lookup(tree: Any, path: str) -> Any:
    for key in path.split("."):
        tree = tree[key]
    return tree


def check_obs_keys(single_space: gym.spaces.Dict, camera: str, state_keys: list[str]) -> int:
    """Raise ValueError for an unknown camera or state key (naming the valid ones); return the state width."""
    cameras = sorted(single_space["sensor_data"].spaces) if "sensor_data" in single_space.spaces else []
    if camera not in cameras:
        raise ValueError(f"unknown camera {camera!r} for env.camera; this task's cameras: {cameras}")
    valid = [p for p in _leaf_paths(single_space) if not p.startswith(("sensor_data.", "sensor_param."))]
    width = 0
    for key in state_keys:
        if key not in valid:
            hint = difflib.get_close_matches(key, valid, n=1)
            guess = f"did you mean {hint[0]!r}? " if hint else ""
            if key.startswith("extra."):
                guess += "(object poses appear only with env.privileged_state=true) "
            raise ValueError(f"unknown state key {key!r} in env.state_keys; {guess}valid keys: {valid}")
        width += int(np.prod(_lookup(single_space, key).shape, dtype=np.int64))
    return width


def extract_state(raw: dict, state_keys: list[str], num_envs: int) -> torch.Tensor:
    """The ``state_keys`` entries of ManiSkill's batched obs dict, flattened and concatenated: float32 [N, D]."""
    parts = [torch.as_tensor(_lookup(raw, key)).reshape(num_envs, -1).to(torch.float32) for key in state_keys]
    return torch.cat(parts, dim=1) if parts else torch.zeros((num_envs, 0), dtype=torch.float32)


def extract_obs(raw: dict, camera: str, state_keys: list[str]) -> Obs:
    """ManiSkill's batched obs dict -> {"rgb": uint8 [N, H, W, 3], "state": float32 [N, D]}."""
    rgb = raw["sensor_data"][camera]["rgb"]
    return {"rgb": rgb, "state": extract_state(raw, state_keys, rgb.shape[0]).to(rgb.device)}


# --------------------------------------------------------------------------------------------------------------
# Construction


def _import_mani_skill() -> None:
    from rvla_peft.renderer import ensure_vulkan

    ensure_vulkan()  # before sapien loads: it picks its Vulkan device at import
    import mani_skill.envs  # noqa: F401  (registers the tasks)


def simulates_on_gpu(cfg: EnvConfig) -> bool:
    """``physx_cuda``, or ``auto`` where CUDA is: the one place that decides between the two backends."""
    return cfg.sim_backend == "physx_cuda" or (cfg.sim_backend == "auto" and torch.cuda.is_available())


def enable_gpu_physics() -> None:
    """Turn on SAPIEN's GPU PhysX, which downloads its library into ``~/.sapien/physx/VERSION`` on first use: on a
    machine without internet that fails deep inside ``requests``; say what to put where instead."""
    import sapien.physx as physx

    try:
        physx.enable_gpu()
    except Exception as e:  # noqa: BLE001 - requests' errors, a bad zip, a missing libcuda: all end the same way
        folder = Path.home() / ".sapien" / "physx" / physx.version()
        raise RuntimeError(
            f"env.sim_backend=physx_cuda: SAPIEN could not load its PhysX GPU library from {folder} "
            f"({type(e).__name__}: {str(e)[:200]}). On the first GPU run SAPIEN downloads it (physx-precompiled "
            f"release {physx.version()}, linux-so.zip); on a machine without internet, run `python -m "
            f"rvla_peft.renderer physx --download DIR` where there is internet, carry DIR over and run `python -m "
            f"rvla_peft.renderer physx --install DIR/libPhysXGpu_64.so` (it lands in {folder}), or simulate on the "
            f"CPU with env.sim_backend=physx_cpu"
        ) from e


def _check_task(task: str) -> None:
    from mani_skill.utils.registration import REGISTERED_ENVS

    if task not in REGISTERED_ENVS:
        hint = difflib.get_close_matches(task, list(REGISTERED_ENVS), n=3, cutoff=0.4)
        raise ValueError(f"unknown ManiSkill task {task!r} in env.task; nearest registered ids: {hint}")
    missing = missing_assets(task)
    if missing:
        raise ValueError(
            f"task {task!r} needs assets that are not on disk: {missing}. Download them first with "
            f"`python -m mani_skill.utils.download_asset {task}` (they go under MS_ASSET_DIR), or pick a task whose "
            f"assets ship with mani_skill, e.g. {sorted(INSTRUCTIONS)[:4]}"
        )


def missing_assets(task: str) -> list[str]:
    """The asset data sources ``task`` needs that are not downloaded (ManiSkill would otherwise prompt on stdin)."""
    from mani_skill.utils import assets
    from mani_skill.utils.registration import REGISTERED_ENVS

    missing = []
    for asset_id in REGISTERED_ENVS[task].asset_download_ids or []:
        if asset_id in assets.DATA_GROUPS:
            sources = assets.expand_data_group_into_individual_data_source_ids(asset_id)
        else:
            sources = [asset_id]
        missing += [s for s in sources if not assets.is_data_source_downloaded(s)]
    return missing


def resolve_instruction(cfg: EnvConfig) -> str:
    if cfg.instruction is not None:
        return cfg.instruction
    if cfg.task not in INSTRUCTIONS:
        raise ValueError(
            f"no built-in instruction for task {cfg.task!r}: set env.instruction (built-in: {sorted(INSTRUCTIONS)})"
        )
    return INSTRUCTIONS[cfg.task]


def _make_kwargs(cfg: EnvConfig, num_envs: int, sim_backend: str, render_backend: str) -> dict[str, Any]:
    return dict(
        # One env per process on CPU: seed every reset (auto-resets too) from the env's own RNG, not from the
        # process-global torch RNG that the policy also draws from. Not on GPU, where a partial reset would reseed
        # torch from sub-env 0's unchanged seed and repeat the same initial states.
        enhanced_determinism=sim_backend == "physx_cpu",
        num_envs=num_envs,
        # "+state_dict" adds privileged entries (object poses, goals) under "extra"; it stays a dict, not flattened.
        obs_mode="rgb+state_dict" if cfg.privileged_state else "rgb",
        control_mode=cfg.control_mode,
        reward_mode=cfg.reward_mode,
        sim_backend=sim_backend,
        render_backend=render_backend,
        sensor_configs=dict(width=cfg.image_size, height=cfg.image_size),
        max_episode_steps=cfg.max_episode_steps,  # gymnasium 1.4 leaves env.spec.max_episode_steps None
    )


def make_envs(cfg: EnvConfig, device: torch.device | str | None = None) -> VecEnv:
    """Build ``cfg.num_envs`` environments of ``cfg.task``; tensors come back on ``device`` (default: the sim's)."""
    _import_mani_skill()
    _check_task(cfg.task)
    instruction = resolve_instruction(cfg)
    if cfg.sim_backend == "physx_cuda" and not torch.cuda.is_available():
        raise ValueError("env.sim_backend='physx_cuda' needs a CUDA GPU; use 'auto' or 'physx_cpu' on this machine")
    use_gpu = simulates_on_gpu(cfg)
    render = cfg.render_backend if cfg.render_backend != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    out_device = torch.device(device) if device is not None else None
    index = cuda_index(out_device) if use_gpu or render == "gpu" else None
    if render == "gpu":
        render = f"cuda:{index}"  # ManiSkill renders on GPU n only when told "cuda:n"; bare "gpu" is GPU 0
    if use_gpu:
        return GpuVecEnv(cfg, instruction, render, out_device, index)
    return CpuVecEnv(cfg, instruction, render, out_device or torch.device("cpu"))


def cuda_index(device: torch.device | None) -> int:
    """The GPU this process simulates and renders on: ``device``'s (the Accelerator's ``cuda:<local rank>``), else
    the current CUDA device (which accelerate and torchrun set per rank). ManiSkill picks GPU n only from
    ``"physx_cuda:n"`` / ``"cuda:n"`` (its ``envs/utils/system/backend.py``): without the index every rank of a
    multi-GPU run would simulate on GPU 0."""
    if device is not None and device.type == "cuda" and device.index is not None:
        return device.index
    return torch.cuda.current_device()


def set_local_cuda_device() -> None:
    """Make this rank's GPU (``LOCAL_RANK``, set by accelerate launch and torchrun; 0 alone) the current one, as the
    Accelerator will: CUDA work before it (GPU PhysX's start at preflight) then lands on the rank's own GPU."""
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


# --------------------------------------------------------------------------------------------------------------
# GPU: one batched ManiSkill env


class GpuVecEnv(VecEnv):
    """ManiSkill's GPU simulation of N sub-scenes; observations, rewards and flags never leave the GPU."""

    initial_state_per_seed = False  # ManiSkill's batched reset: torch.manual_seed(seeds[0]), then one draw for all

    def __init__(
        self, cfg: EnvConfig, instruction: str, render_backend: str, device: torch.device | None, index: int
    ) -> None:
        from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

        enable_gpu_physics()
        env = gym.make(cfg.task, **_make_kwargs(cfg, cfg.num_envs, f"physx_cuda:{index}", render_backend))
        try:
            check_obs_keys(env.unwrapped.single_observation_space, cfg.camera, cfg.state_keys)
        except ValueError:
            env.close()
            raise
        self._env = ManiSkillVectorEnv(env, auto_reset=True, ignore_terminations=False, record_metrics=True)
        self._camera, self._state_keys = cfg.camera, list(cfg.state_keys)
        self._sim_device = torch.device(self._env.device)
        action_dim = int(env.unwrapped.single_action_space.shape[0])
        super().__init__(cfg.num_envs, device or self._sim_device, action_dim, [instruction] * cfg.num_envs)

    def _obs(self, raw: dict) -> Obs:
        obs = extract_obs(raw, self._camera, self._state_keys)
        # With ManiSkill's default "minimal" shader, rgb is a view of SAPIEN's CUDA render buffer, which the next
        # render overwrites: copy it so that callers can keep the tensors they were given.
        rgb = obs["rgb"].to(self.device, copy=True, memory_format=torch.contiguous_format)
        return {"rgb": rgb, "state": obs["state"].to(self.device)}

    def _reset(self, seed: int | None) -> Obs:
        seeds = None if seed is None else [seed + i for i in range(self.num_envs)]
        raw, _ = self._env.reset(seed=seeds)  # never reconfigure (``rebuild`` is CPU only: VecEnv.reset)
        return self._obs(raw)

    def _step(
        self, action: torch.Tensor
    ) -> tuple[Obs, torch.Tensor, torch.Tensor, torch.Tensor, Obs | None, torch.Tensor]:
        raw, reward, terminated, truncated, info = self._env.step(action.to(self._sim_device, torch.float32))
        final_obs, success = None, torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        if "final_observation" in info:  # present only when some env finished (saves a host sync)
            final_obs = self._obs(info["final_observation"])
            if "success" in info["final_info"]:
                success = info["final_info"]["success"].to(self.device, torch.bool)
        reward = reward.to(self.device, torch.float32)
        terminated, truncated = terminated.to(self.device, torch.bool), truncated.to(self.device, torch.bool)
        return self._obs(raw), reward, terminated, truncated, final_obs, success

    def close(self) -> None:
        self._env.close()


# --------------------------------------------------------------------------------------------------------------
# CPU: a gymnasium vector env of single envs


class SingleEnvAdapter(gym.Wrapper):
    """One ManiSkill CPU env (torch, batch of 1) -> flat numpy {"rgb", "state"}, scalar reward and flags.

    ``info`` carries only ``success`` (bool), so the vector env's info arrays stay small.
    """

    def __init__(self, env: gym.Env, camera: str, state_keys: list[str]) -> None:
        super().__init__(env)
        single = env.unwrapped.single_observation_space
        width = check_obs_keys(single, camera, state_keys)
        self._camera, self._state_keys = camera, list(state_keys)
        rgb_shape = single["sensor_data"][camera]["rgb"].shape
        self.observation_space = gym.spaces.Dict(
            rgb=gym.spaces.Box(0, 255, rgb_shape, np.uint8),
            state=gym.spaces.Box(-np.inf, np.inf, (width,), np.float32),
        )
        self.action_space = env.unwrapped.single_action_space

    def _flat(self, raw: dict) -> dict[str, np.ndarray]:
        obs = extract_obs(raw, self._camera, self._state_keys)
        return {"rgb": obs["rgb"][0].cpu().numpy(), "state": obs["state"][0].cpu().numpy()}

    @staticmethod
    def _success(info: dict) -> dict[str, bool]:
        success = info.get("success")
        return {"success": bool(success[0]) if success is not None else False}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        raw, info = self.env.reset(seed=seed, options=options)
        return self._flat(raw), self._success(info)

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        raw, reward, terminated, truncated, info = self.env.step(action)
        return self._flat(raw), float(reward[0]), bool(terminated[0]), bool(truncated[0]), self._success(info)


def make_single_env(cfg: EnvConfig, render_backend: str, worker: bool = False) -> SingleEnvAdapter:
    """One wrapped CPU env; module-level so that AsyncVectorEnv can pickle it for its workers."""
    if worker and multiprocessing.parent_process() is not None:
        # N workers already keep the cores busy: one torch and one lavapipe thread each avoids oversubscribing
        # them (measured ~12% more steps/s on 2 cores). Not applied to gymnasium's probe env in the main process.
        torch.set_num_threads(1)
        os.environ.setdefault("LP_NUM_THREADS", "1")
        # Ctrl-C reaches the whole process group: the main process decides (it saves, then closes the workers).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _import_mani_skill()
    from rvla_peft.envs.render import with_render_detail
    from rvla_peft.envs.shaders import has_environment_map, lean_shader_config

    kwargs = _make_kwargs(cfg, 1, "physx_cpu", render_backend)
    # The stock "minimal" pack without SAPIEN's BRDF table, whose generation is ~3 s of each process's first frame
    # on the CPU renderer; the same pixels unless the scene has an environment map (rvla_peft/envs/shaders.py).
    lean = lean_shader_config() if render_backend == "cpu" else None
    if lean is None:
        env = gym.make(cfg.task, **kwargs)
    else:
        env = gym.make(cfg.task, **(kwargs | {"sensor_configs": kwargs["sensor_configs"] | {"shader_config": lean}}))
        if has_environment_map(env):
            env.close()
            env = gym.make(cfg.task, **kwargs)
    try:
        # "fast": lighter render meshes now and after every reset that rebuilds the scene (GPU envs keep full detail)
        return SingleEnvAdapter(with_render_detail(env, cfg.render_detail), cfg.camera, cfg.state_keys)
    except (ValueError, ImportError):
        env.close()
        raise


# What every async env worker imports, loaded once by the forkserver that forks them.
WORKER_PRELOAD = ["rvla_peft.envs.maniskill", "rvla_peft.envs.render", "rvla_peft.envs.shaders", "mani_skill.envs"]

# A dead worker surfaces in the main process as one of these, from the pipe to it (gymnasium says nothing more).
WORKER_DEATH = (BrokenPipeError, EOFError, ConnectionResetError)


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by signal {-exitcode} ({signal.Signals(-exitcode).name})"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


class CpuVecEnv(VecEnv):
    """N single-env ManiSkill CPU simulations in a gymnasium Sync/AsyncVectorEnv with same-step auto-reset.

    Async workers that die (killed, out of memory, a simulator crash) raise :class:`EnvWorkerError` naming them,
    or, with ``cfg.restart_dead_workers``, the whole AsyncVectorEnv is rebuilt and reset (gymnasium has no way to
    replace one worker): every episode in flight is dropped (that step returns the new episodes' first observations,
    reward 0, ``truncated`` and ``Step.dropped`` set, ``final_obs`` the last observation seen) and counted in
    ``dropped_episodes``; ``worker_restarts`` counts the rebuilds.
    """

    def __init__(self, cfg: EnvConfig, instruction: str, render_backend: str, device: torch.device) -> None:
        self._cfg, self._render_backend = cfg, render_backend
        self.restart_dead_workers = cfg.restart_dead_workers
        self._vec = self._build()
        self.worker_restarts = 0
        self._broken = False  # a worker died and its pending call will never be answered
        self._seed = 0
        self._last_obs: Obs | None = None
        action_dim = int(self._vec.single_action_space.shape[0])
        super().__init__(cfg.num_envs, device, action_dim, [instruction] * cfg.num_envs)

    def _build(self) -> gym.vector.VectorEnv:
        cfg, same_step = self._cfg, gym.vector.AutoresetMode.SAME_STEP
        if cfg.vectorization == "async":
            # Workers fork from a server that has imported the simulator once (until it starts, later calls change
            # nothing): ~2 s of imports less per worker, 10 workers on 2 cores 21 -> 9 s (README).
            multiprocessing.get_context("forkserver").set_forkserver_preload(WORKER_PRELOAD)
            fn = functools.partial(make_single_env, cfg, self._render_backend, worker=True)
            return gym.vector.AsyncVectorEnv(
                [fn] * cfg.num_envs, context="forkserver", copy=False, autoreset_mode=same_step
            )
        fn = functools.partial(make_single_env, cfg, self._render_backend)
        return gym.vector.SyncVectorEnv([fn] * cfg.num_envs, copy=False, autoreset_mode=same_step)

    def worker_pids(self) -> list[int]:
        """The pid of each env's worker process (async only; empty for sync)."""
        return [p.pid for p in getattr(self._vec, "processes", [])]

    def _worker_error(self, error: BaseException) -> EnvWorkerError | None:
        """An EnvWorkerError naming the dead workers, or None when every worker is alive (another failure)."""
        processes = getattr(self._vec, "processes", [])
        deadline = time.monotonic() + 2.0  # the pipe closes a moment before the exit can be reaped
        while not (dead := [(i, p) for i, p in enumerate(processes) if not p.is_alive()]):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)
        dead = [f"env worker {i} (pid {p.pid}) {describe_exit(p.exitcode)}" for i, p in dead]
        return EnvWorkerError(f"{'; '.join(dead)} [{type(error).__name__} from its pipe]")

    def _discard(self) -> None:
        """Close a vector env with dead workers: terminate the live ones and free pipes and shared memory."""
        vec = self._vec
        if isinstance(vec, gym.vector.AsyncVectorEnv):
            from gymnasium.vector.async_vector_env import AsyncState

            vec._state = AsyncState.DEFAULT  # the pending step's answer will never come: do not wait for it
        try:
            vec.close(terminate=True)
        except (*WORKER_DEATH, OSError):
            pass

    def _restart(self, error: EnvWorkerError, in_flight: int) -> Obs:
        """Rebuild every worker and reset every env; the ``in_flight`` episodes are dropped."""
        self._discard()
        self.worker_restarts += 1
        self.dropped_episodes += in_flight
        warnings.warn(
            f"{error}: restarting the env workers (restart {self.worker_restarts}, {in_flight} episodes in flight "
            f"dropped, {self.dropped_episodes} in all)",
            RuntimeWarning,
            stacklevel=3,
        )
        self._vec = self._build()
        # A new seed per restart, derived from the last reset's: reproducible, and not the same episodes again.
        seed = int(np.random.default_rng([self._seed, self.worker_restarts]).integers(2**31 - self.num_envs))
        try:
            obs, _ = self._vec.reset(seed=seed)
        except WORKER_DEATH as e:  # dies again at once: a crash loop, not a one-off
            raise (self._worker_error(e) or e) from None
        self._broken = False
        return self._obs(obs)

    def _on_worker_death(self, error: BaseException, in_flight: int) -> Obs:
        self._broken = True  # a pending call that will never be answered: close() must not wait for it
        described = self._worker_error(error)
        if described is None:
            raise error
        if not self.restart_dead_workers:
            raise EnvWorkerError(
                f"{described}; set env.restart_dead_workers=true to rebuild the workers and go on"
            ) from None
        return self._restart(described, in_flight)

    def _obs(self, obs: dict[str, np.ndarray]) -> Obs:
        # copy=False above hands out the vector env's own buffers: copy once here, they are overwritten next step.
        self._last_obs = {k: torch.tensor(v, device=self.device) for k, v in obs.items()}
        return self._last_obs

    def _reset(self, seed: int | None) -> Obs:
        if seed is None:
            # Each single env starts from ManiSkill's fixed creation seed: unseeded, all N would start identical.
            seed = int(np.random.default_rng().integers(2**31 - self.num_envs))
        self._seed = seed
        try:
            options = {"reconfigure": True} if self._rebuild else None
            obs, _ = self._vec.reset(seed=seed, options=options)  # gymnasium seeds env i with seed + i
        except WORKER_DEATH as e:
            return self._on_worker_death(e, in_flight=0)  # a reset ends the episodes anyway
        return self._obs(obs)

    def _reset_envs(self, mask: torch.Tensor, seeds: list[int]) -> Obs:
        rows = mask.numpy()
        try:
            obs, _ = self._vec.reset(
                seed=[s if m else None for s, m in zip(seeds, rows, strict=True)], options={"reset_mask": rows}
            )
        except WORKER_DEATH as e:  # every episode in flight is lost with the restart: the caller sees them dropped
            new_obs = self._on_worker_death(e, in_flight=self.num_envs)
            self._dropped = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
            return new_obs
        return self._obs(obs)

    def _step(
        self, action: torch.Tensor
    ) -> tuple[Obs, torch.Tensor, torch.Tensor, torch.Tensor, Obs | None, torch.Tensor]:
        last = self._last_obs
        try:
            obs, reward, terminated, truncated, info = self._vec.step(action.detach().to("cpu", torch.float32).numpy())
        except WORKER_DEATH as e:
            new_obs = self._on_worker_death(e, in_flight=self.num_envs)
            everyone = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
            self._dropped = everyone
            nothing = torch.zeros_like(everyone)
            reward = torch.zeros(self.num_envs, dtype=torch.float32, device=self.device)
            return new_obs, reward, nothing, everyone, last if last is not None else new_obs, nothing
        final_obs, success = None, np.zeros(self.num_envs, dtype=bool)
        if "final_obs" in info:  # gymnasium gives one dict per finished env: rows of a full-batch copy
            final = {key: value.copy() for key, value in obs.items()}
            for i in np.flatnonzero(info["_final_obs"]):
                for key, value in final.items():
                    value[i] = info["final_obs"][i][key]
            final_obs = {key: torch.from_numpy(value).to(self.device) for key, value in final.items()}
            success = info["final_info"]["success"]
        return (
            self._obs(obs),
            torch.tensor(reward, dtype=torch.float32, device=self.device),
            torch.tensor(terminated, device=self.device),
            torch.tensor(truncated, device=self.device),
            final_obs,
            torch.tensor(success, device=self.device),
        )

    def close(self) -> None:
        if self._vec.closed:
            return
        if self._broken:  # its pending step will never be answered
            self._discard()
            return
        try:
            self._vec.close()
        except WORKER_DEATH:  # a worker died since the last step: nothing left to close gracefully
            self._discard()
