"""Shared fixtures. Everything runs offline: the tiny model is built from a config into a per-session cache."""

import os
import subprocess
import tempfile
from pathlib import Path

# Before any import of huggingface_hub / mani_skill: no network, no stdin prompts, no writes to $HOME.
_SESSION_TMP = tempfile.mkdtemp(prefix="rvla_peft_tests.")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MS_ASSET_DIR", os.path.join(_SESSION_TMP, "ms_assets"))
os.environ.setdefault("RVLA_PEFT_CACHE", os.path.join(_SESSION_TMP, "cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs one pytest-xdist worker per core: each worker, and the processes it starts, computes on one torch
# thread. Two workers each spinning two OpenMP threads on two cores made the heaviest test 5-10x slower.
XDIST_WORKER = "PYTEST_XDIST_WORKER" in os.environ
if XDIST_WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if XDIST_WORKER:
    torch.set_num_threads(1)  # in case a plugin imported torch before OMP_NUM_THREADS was set

from rvla_peft.config import TrainConfig, load_config  # noqa: E402

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# recipes/tiny_cpu.yaml starts from the shipped pretrained base (builtin:tiny-vla-maniskill, 64 bins, PushCube,
# success reward); the tests that use it as "the tiny recipe" pin the tiny random model with OpenVLA's 256 bins on
# PickCube with the dense reward (which varies from episode to episode even when nothing succeeds) instead.
TINY_RANDOM = [
    "model.name_or_path=builtin:tiny-llava",
    "policy.n_bins=256",
    "env.task=PickCube-v1",
    "env.reward_mode=normalized_dense",
]


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Accelerate keeps one state per process; each test may pick its own mixed precision."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def asset_dir(tmp_path_factory: pytest.TempPathFactory):
    """A module's own ManiSkill asset folder, away from ~/.maniskill (read when mani_skill is first imported):
    ``pytestmark = pytest.mark.usefixtures("asset_dir")``."""
    path = tmp_path_factory.mktemp("ms_assets")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MS_ASSET_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny models: they gain nothing from more, and on a shared, loaded 2-core
    machine spinning OpenMP threads made steps several times (up to 10-50x) slower."""
    from rvla_peft.utils.threads import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture
def tiny_cfg(tmp_path) -> TrainConfig:
    """The tiny recipe, shrunk for tests: 2 CPU envs, short rollouts, regularisers on; on the tiny random model
    (TINY_RANDOM), not the pretrained base that the recipe ships with."""
    return load_config(
        RECIPES / "tiny_cpu.yaml",
        [
            *TINY_RANDOM,
            f"output_dir={tmp_path / 'run'}",
            "total_updates=1",
            "eval_episodes=0",
            "report_to=[]",
            "env.num_envs=2",
            "env.max_episode_steps=8",
            "ppo.num_steps=4",
            "ppo.num_minibatches=2",
            "ppo.update_epochs=1",
        ],
    )


@pytest.fixture
def tiny_policy(tiny_cfg):
    from rvla_peft.policies.registry import build_policy

    torch.manual_seed(0)
    return build_policy(tiny_cfg)


@pytest.fixture
def tmpfs(tmp_path):
    """A real small file system: mount a tmpfs of the requested size (needs root; skipped otherwise)."""
    mounted = []

    def mount(size: str) -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def train_under_pixel_noise(cfg: TrainConfig):
    """Train ``cfg`` under pixel noise (every step, no per-episode choice): (trainer, final metrics, first rollout)."""
    from rvla_peft.config import PerturbationSpec
    from rvla_peft.trainer import RobustPPOTrainer

    cfg.perturb.train = [PerturbationSpec(name="pixel_noise", severity=0.5)]
    cfg.perturb.sample_per_episode = False
    trainer = RobustPPOTrainer(cfg)
    seen = {}
    original = trainer.update
    trainer.update = lambda rollout: original(seen.setdefault("rollout", rollout))
    metrics = trainer.train()
    return trainer, metrics, seen["rollout"]
