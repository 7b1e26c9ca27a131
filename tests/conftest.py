"""Shared fixtures. Everything runs offline: the tiny model is built from a config into a per-session cache."""

import os
import tempfile
from pathlib import Path

# Before any import of huggingface_hub / mani_skill: no network, no stdin prompts, no writes to $HOME.
_SESSION_TMP = tempfile.mkdtemp(prefix="rvla_peft_tests.")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MS_ASSET_DIR", os.path.join(_SESSION_TMP, "ms_assets"))
os.environ.setdefault("RVLA_PEFT_CACHE", os.path.join(_SESSION_TMP, "cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from rvla_peft.config import TrainConfig, load_config  # noqa: E402

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Accelerate keeps one state per process; each test may pick its own mixed precision."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def tiny_cfg(tmp_path) -> TrainConfig:
    """The tiny recipe, shrunk for tests: 2 CPU envs, short rollouts, regularisers on."""
    return load_config(
        RECIPES / "tiny_cpu.yaml",
        [
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
    from rvla_peft.policies import build_policy

    torch.manual_seed(0)
    return build_policy(tiny_cfg)
