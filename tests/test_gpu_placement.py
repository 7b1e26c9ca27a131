"""Where each rank simulates and renders: ManiSkill uses GPU n only when told ``physx_cuda:n`` / ``cuda:n``, so the
envs get the rank's index; preflight starts GPU PhysX on the rank's own GPU. No GPU here: a fake ManiSkill entry
point registered with gymnasium records what the env would have been built with, under simulated local ranks."""

from pathlib import Path

import gymnasium as gym
import pytest
import torch
import yaml

import rvla_peft.envs.maniskill as maniskill
from rvla_peft.cli import train
from rvla_peft.config import EnvConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
TASK = "PickCube-v1"  # a real task id, so that the task and asset checks run as they do


class Recorded(Exception):
    """Raised by the fake env once it has recorded its kwargs: nothing past gym.make can run without a GPU."""


class FakeManiSkillEnv:
    made: list[dict] = []

    def __init__(self, **kwargs):
        FakeManiSkillEnv.made.append(kwargs)
        raise Recorded


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA "available" with a current device that ``torch.cuda.set_device`` moves; the task's gymnasium entry
    point replaced by the recorder (ManiSkill's own registry, which the task check reads, is left alone)."""
    maniskill._import_mani_skill()
    current = {"index": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: current.update(index=torch.device("cuda", i).index))
    monkeypatch.setattr(maniskill, "enable_gpu_physics", lambda: current.setdefault("physx_on", current["index"]))
    spec = gym.spec(TASK)
    fake = gym.envs.registration.EnvSpec(TASK, entry_point=FakeManiSkillEnv, kwargs=dict(spec.kwargs))
    monkeypatch.setitem(gym.registry, TASK, fake)
    FakeManiSkillEnv.made = []
    return current


def env_cfg(**overrides) -> EnvConfig:
    return EnvConfig(task=TASK, num_envs=4, vectorization="sync", **overrides)


@pytest.mark.parametrize("rank", [0, 1])
def test_gpu_envs_simulate_and_render_on_the_ranks_gpu(fake_gpu, rank):
    # the Accelerator's device
    with pytest.raises(Recorded):
        maniskill.make_envs(env_cfg(sim_backend="physx_cuda", render_backend="gpu"), device=f"cuda:{rank}")
    # no device given: the current one, which the launcher's LOCAL_RANK made the rank's
    with pytest.MonkeyPatch.context() as m:
        m.setenv("LOCAL_RANK", str(rank))
        maniskill.set_local_cuda_device()
        with pytest.raises(Recorded):
            maniskill.make_envs(env_cfg(sim_backend="auto", render_backend="auto"))
    for kwargs in FakeManiSkillEnv.made:
        assert kwargs["sim_backend"] == f"physx_cuda:{rank}" and kwargs["render_backend"] == f"cuda:{rank}"
        assert kwargs["num_envs"] == 4
    assert len(FakeManiSkillEnv.made) == 2


def test_cpu_simulation_renders_on_the_ranks_gpu_and_cpu_rendering_is_unchanged(fake_gpu):
    with pytest.raises(Recorded):
        maniskill.make_envs(env_cfg(sim_backend="physx_cpu", render_backend="gpu"), device="cuda:1")
    with pytest.raises(Recorded):
        maniskill.make_envs(env_cfg(sim_backend="physx_cpu", render_backend="cpu"), device="cuda:1")
    (gpu_render, cpu_render) = FakeManiSkillEnv.made
    assert gpu_render["sim_backend"] == "physx_cpu" and gpu_render["render_backend"] == "cuda:1"
    assert cpu_render["sim_backend"] == "physx_cpu" and cpu_render["render_backend"] == "cpu"


def test_preflight_starts_gpu_physics_on_the_ranks_gpu(fake_gpu, monkeypatch, tmp_path):
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = load_config(None, [f"output_dir={tmp_path}", f"env.task={TASK}", "env.sim_backend=physx_cuda"])
    train.check_task(cfg)
    assert fake_gpu["physx_on"] == 1  # GPU PhysX started after the rank's device was made current


def test_multi_gpu_config_leaves_the_process_count_to_the_launch(tmp_path):
    """No hard-coded 8: accelerate asks for --num_processes (one per GPU) instead of starting 8 on fewer GPUs."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "accelerate_configs" / "multi_gpu.yaml"
    assert "num_processes" not in yaml.safe_load(path.read_text())
    cluster = load_config_from_file(str(path))
    assert cluster.num_processes == -1 and cluster.distributed_type == "MULTI_GPU" and cluster.gpu_ids == "all"


class FakeBatchedEnv:
    """Stands in for ManiSkill's GPU env behind ManiSkillVectorEnv: records each reset's arguments."""

    def __init__(self):
        self.resets = []

    def reset(self, seed=None, options=None):
        self.resets.append({"seed": seed, "options": options})
        return {"n": len(seed)}, {}


def gpu_env_without_a_gpu(num_envs: int) -> maniskill.GpuVecEnv:
    """A GpuVecEnv over the fake batched env (its constructor needs a GPU): the reset logic is the real one."""
    env = maniskill.GpuVecEnv.__new__(maniskill.GpuVecEnv)
    maniskill.VecEnv.__init__(env, num_envs, torch.device("cpu"), 7, ["lift"] * num_envs)
    env._env = FakeBatchedEnv()
    env._obs = lambda raw: raw
    return env


def test_gpu_envs_never_rebuild_their_scenes():
    """The trainer restarts with rebuild=True after every evaluation and checkpoint; on GPU that would reconfigure
    (reallocate PhysX's GPU buffers) each time."""
    env = gpu_env_without_a_gpu(3)
    env.reset(seed=10, rebuild=True)
    env.reset(seed=20)
    assert env._env.resets == [{"seed": [10, 11, 12], "options": None}, {"seed": [20, 21, 22], "options": None}]


class ManiSkillLikeBatchedEnv(FakeBatchedEnv):
    """ManiSkill 3's batched GPU reset, as ``sapien_env.reset`` does it: the whole batch's initial state drawn after
    ``torch.manual_seed(seed[0])``, in two draws (a position, then an angle, as its tasks' ``_initialize_episode``)."""

    def reset(self, seed=None, options=None):
        super().reset(seed, options)
        with torch.random.fork_rng():
            torch.manual_seed(seed[0])
            xy = torch.rand(len(seed), 2)
            angle = torch.rand(len(seed))
        return torch.cat([xy, angle[:, None]], dim=1), {}


def test_gpu_initial_states_depend_on_the_batch_and_the_env_says_so():
    """The documented rule (README, eval --seed): a GPU batch's env i starts from a state of (seed, i, num_envs),
    not from seed + i's, so a GPU report pairs with another only at the same num_envs."""
    assert maniskill.CpuVecEnv.initial_state_per_seed and not maniskill.GpuVecEnv.initial_state_per_seed
    starts = {}
    for n in (2, 4):
        env = gpu_env_without_a_gpu(n)
        env._env = ManiSkillLikeBatchedEnv()
        starts[n] = env.reset(seed=100)
        assert env._env.resets[0]["seed"] == list(range(100, 100 + n))
        again = gpu_env_without_a_gpu(n)
        again._env = ManiSkillLikeBatchedEnv()
        assert torch.equal(again.reset(seed=100), starts[n])  # same seed and num_envs: the same starts
    assert not torch.equal(starts[2], starts[4][:2])  # env 0 and 1 start elsewhere with 4 envs
    single = gpu_env_without_a_gpu(1)
    single._env = ManiSkillLikeBatchedEnv()
    assert not torch.equal(single.reset(seed=101)[0], starts[2][1])  # env 1 is not seed 101's single env
