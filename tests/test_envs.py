"""Real ManiSkill3 envs on the CPU (2 envs, 64x64 RGB): shapes, auto-reset, episode statistics, seeding, errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rvla_peft.config import EnvConfig, PerturbationSpec
from rvla_peft.envs import PerturbedEnv, Step, VecEnv, make_envs
from rvla_peft.envs.maniskill import INSTRUCTIONS, resolve_instruction

HORIZON = 5


pytestmark = pytest.mark.usefixtures("asset_dir")


def _cfg(**overrides: object) -> EnvConfig:
    return EnvConfig(**{"num_envs": 2, "image_size": 64, "max_episode_steps": HORIZON, **overrides})


@pytest.fixture(scope="module")
def env(asset_dir: Path) -> Iterator[VecEnv]:
    envs = make_envs(_cfg(vectorization="sync"))
    yield envs
    envs.close()


def _zeros(env: VecEnv) -> torch.Tensor:
    return torch.zeros(env.num_envs, env.action_dim)


def test_reset_observation_layout(env: VecEnv) -> None:
    obs = env.reset(seed=0)
    assert env.num_envs == 2 and env.action_dim == 7 and env.device == torch.device("cpu")
    assert env.instructions == [INSTRUCTIONS["PickCube-v1"]] * 2
    assert set(obs) == {"rgb", "state"}
    assert obs["rgb"].shape == (2, 64, 64, 3) and obs["rgb"].dtype == torch.uint8
    assert obs["state"].shape == (2, 9 + 7) and obs["state"].dtype == torch.float32  # agent.qpos + extra.tcp_pose
    assert obs["rgb"].device == env.device and obs["state"].device == env.device
    assert obs["rgb"].float().std() > 1, "the camera image is blank"


def test_same_seed_same_initial_states(env: VecEnv) -> None:
    a, b, c = env.reset(seed=3), env.reset(seed=3), env.reset(seed=4)
    assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["state"], b["state"])
    assert not torch.equal(a["rgb"], c["rgb"])
    assert not torch.equal(a["rgb"][0], a["rgb"][1]), "env i must get seed + i"


def test_unseeded_fresh_envs_differ(env: VecEnv) -> None:
    # Every single CPU env is created with ManiSkill's fixed seed 2022: an unseeded reset must still spread them.
    with make_envs(_cfg()) as fresh:
        obs = fresh.reset()
    assert not torch.equal(obs["rgb"][0], obs["rgb"][1])


def test_time_limit_truncates_and_auto_resets(env: VecEnv) -> None:
    env.reset(seed=0)
    returns = torch.zeros(2)
    actions = torch.rand(HORIZON, 2, 7, generator=torch.Generator().manual_seed(0)) * 0.2 - 0.1
    steps: list[Step] = []
    for t in range(HORIZON):
        step = env.step(actions[t])
        assert step.reward.shape == (2,) and step.reward.dtype == torch.float32
        assert step.terminated.dtype == torch.bool and step.truncated.dtype == torch.bool
        returns += step.reward
        steps.append(step)
    for step in steps[:-1]:
        assert not (step.terminated | step.truncated).any() and step.final_obs is None
    last = steps[-1]
    assert last.truncated.all() and not last.terminated.any()
    assert last.final_obs is not None
    assert last.final_obs["rgb"].shape == (2, 64, 64, 3) and last.final_obs["state"].shape == (2, 16)
    assert torch.allclose(last.episode_return, returns, atol=1e-5)
    assert last.episode_return.dtype == torch.float32
    assert last.episode_length.tolist() == [HORIZON, HORIZON] and last.episode_length.dtype == torch.int64
    assert not last.episode_success.any()
    # The returned obs starts a new episode: the arm is back at a fresh initial pose.
    assert (last.obs["state"] - last.final_obs["state"]).abs().amax(dim=1).min() > 1e-3
    # ... and the episode statistics restart with it.
    nxt = env.step(_zeros(env))
    assert nxt.final_obs is None
    assert torch.equal(nxt.episode_return, nxt.reward) and nxt.episode_length.tolist() == [1, 1]


def test_rejects_wrong_action_shape(env: VecEnv) -> None:
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(torch.zeros(2, 6))


def test_perturbed_env_is_pass_through_without_specs(env: VecEnv) -> None:
    clean = env.reset(seed=1)
    wrapped = PerturbedEnv(env, [], seed=0)
    assert wrapped.num_envs == 2 and wrapped.action_dim == 7 and wrapped.instructions == env.instructions
    obs = wrapped.reset(seed=1)
    assert torch.equal(obs["rgb"], clean["rgb"]) and torch.equal(obs["state"], clean["state"])


def test_perturbed_env_perturbs_obs_and_executed_action(env: VecEnv) -> None:
    env.reset(seed=1)
    clean_next = env.step(_zeros(env)).obs
    specs = [PerturbationSpec("pixel_noise", 0.5), PerturbationSpec("action_noise", 1.0)]
    wrapped = PerturbedEnv(env, specs, seed=0)
    first, again = wrapped.reset(seed=1), wrapped.reset(seed=1)
    assert torch.equal(first["rgb"], again["rgb"]), "seeded resets must give the same perturbed obs"
    clean_first = env.reset(seed=1)
    assert not torch.equal(first["rgb"], clean_first["rgb"]) and torch.equal(first["state"], clean_first["state"])
    wrapped.reset(seed=1)
    action = _zeros(env)
    step = wrapped.step(action)
    assert torch.count_nonzero(action) == 0, "the caller's action tensor was modified"
    assert step.obs["rgb"].dtype == torch.uint8
    # The executed action was noisy, so the arm moved away from where the zero action leaves it.
    assert not torch.allclose(step.obs["state"], clean_next["state"], atol=1e-4)


def test_perturbed_env_perturbs_final_obs(env: VecEnv) -> None:
    def last_step(e: VecEnv | PerturbedEnv) -> Step:
        e.reset(seed=2)
        return [e.step(_zeros(env)) for _ in range(HORIZON)][-1]

    clean = last_step(env)
    noisy = last_step(PerturbedEnv(env, [PerturbationSpec("pixel_noise", 0.5)], seed=0))
    assert clean.final_obs is not None and noisy.final_obs is not None
    assert torch.equal(noisy.final_obs["state"], clean.final_obs["state"])
    assert not torch.equal(noisy.final_obs["rgb"], clean.final_obs["rgb"])
    assert torch.equal(noisy.reward, clean.reward)


def test_async_matches_sync(env: VecEnv) -> None:
    # One step past the time limit, so the new episodes are compared too: they must be seeded per env, not from
    # the process-global torch RNG (shared by the sync envs and the policy, separate in each async worker).
    actions = torch.rand(HORIZON + 1, 2, 7, generator=torch.Generator().manual_seed(1)) * 2 - 1
    sync_obs = env.reset(seed=5)
    sync_steps = [env.step(a) for a in actions]
    with make_envs(_cfg(vectorization="async")) as async_env:
        async_obs = async_env.reset(seed=5)
        async_steps = [async_env.step(a) for a in actions]
    assert torch.equal(sync_obs["state"], async_obs["state"]) and torch.equal(sync_obs["rgb"], async_obs["rgb"])
    for s, a in zip(sync_steps, async_steps, strict=True):
        assert torch.allclose(s.reward, a.reward) and torch.equal(s.truncated, a.truncated)
        assert torch.allclose(s.obs["state"], a.obs["state"], atol=1e-5) and torch.equal(s.obs["rgb"], a.obs["rgb"])
    end = HORIZON - 1
    assert async_steps[end].final_obs is not None and async_steps[end].episode_length.tolist() == [HORIZON] * 2
    assert torch.allclose(sync_steps[end].final_obs["state"], async_steps[end].final_obs["state"], atol=1e-5)


def test_unknown_task_suggests_registered_ids() -> None:
    with pytest.raises(ValueError, match="PickCube-v1"):
        make_envs(_cfg(task="PickCub-v1"))


def test_task_without_instruction_asks_for_one() -> None:
    with pytest.raises(ValueError, match=r"env\.instruction"):
        make_envs(_cfg(task="Empty-v1"))
    assert resolve_instruction(_cfg(task="Empty-v1", instruction="wave")) == "wave"
    assert resolve_instruction(_cfg(instruction="grab it")) == "grab it"


def test_unknown_camera_names_valid_ones() -> None:
    with pytest.raises(ValueError, match="base_camera"):
        make_envs(_cfg(num_envs=1, camera="wrist_camera"))


def test_unknown_state_key_names_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"did you mean .agent\.qvel."):
        make_envs(_cfg(num_envs=1, state_keys=["agent.qpos", "agent.qvelocity"]))


def test_gpu_physics_offline_says_where_the_library_goes(monkeypatch) -> None:
    # What SAPIEN raised on a GPU machine without internet, at its first physx_cuda env (the download of its library)
    import requests
    import sapien.physx

    from rvla_peft.envs.maniskill import enable_gpu_physics

    def offline() -> None:
        raise requests.exceptions.ConnectionError("Failed to resolve 'github.com'")

    monkeypatch.setattr(sapien.physx, "enable_gpu", offline)
    folder = Path.home() / ".sapien" / "physx" / sapien.physx.version()
    with pytest.raises(RuntimeError, match="could not load its PhysX GPU library") as err:
        enable_gpu_physics()
    assert str(folder) in str(err.value) and "env.sim_backend=physx_cpu" in str(err.value)
    # and how to carry the library over: the two commands of rvla_peft.renderer
    assert "python -m rvla_peft.renderer physx --download DIR" in str(err.value)
    assert "python -m rvla_peft.renderer physx --install DIR/libPhysXGpu_64.so" in str(err.value)
    # Training's preflight asks for GPU physics only where CUDA is: a CPU machine may plan a GPU recipe (--dry-run)
    from rvla_peft.cli.train import check_task
    from rvla_peft.config import TrainConfig

    cfg = TrainConfig(env=_cfg(sim_backend="physx_cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_task(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU that this test stands in for
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)  # preflight makes the rank's GPU current
    with pytest.raises(RuntimeError, match="could not load its PhysX GPU library"):
        check_task(cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_batch_stays_on_device_and_auto_resets() -> None:
    with make_envs(_cfg(num_envs=4, sim_backend="physx_cuda", render_backend="gpu")) as gpu:
        obs = gpu.reset(seed=0)
        assert gpu.device.type == "cuda" and obs["rgb"].device.type == "cuda" and obs["rgb"].shape == (4, 64, 64, 3)
        assert torch.equal(gpu.reset(seed=0)["rgb"], obs["rgb"])
        kept = obs["rgb"].clone()
        returns = torch.zeros(4, device=gpu.device)
        for _ in range(HORIZON):
            step = gpu.step(torch.zeros(4, gpu.action_dim))
            returns += step.reward
        assert torch.equal(obs["rgb"], kept), "an rgb tensor handed out earlier was overwritten by later renders"
        assert step.reward.device.type == "cuda" and step.truncated.all() and step.final_obs is not None
        assert step.final_obs["rgb"].device.type == "cuda"
        assert step.episode_length.tolist() == [HORIZON] * 4
        assert torch.allclose(step.episode_return, returns, atol=1e-5)
