"""Two real CPU ranks (gloo) through accelerate launch and accelerate_configs/cpu_2proc.yaml."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import RECIPES
from helpers import free_port
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_two_cpu_ranks_exchange_gradients_and_end_identical(tmp_path):
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
        "--main_process_port", str(free_port()),
        str(ROOT / "tests" / "dist_train.py"), str(RECIPES / "tiny_cpu.yaml"), str(tmp_path),
        f"output_dir={tmp_path / 'run'}", "total_updates=2", "eval_episodes=0", "report_to=[]",
        "env.num_envs=1", "env.max_episode_steps=6", "ppo.num_steps=4", "ppo.num_minibatches=2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [tmp_path / f"rank{i}.safetensors" for i in range(2)]
    assert all(p.exists() for p in ranks), result.stderr[-3000:]
    metas = []
    for p in ranks:
        with safe_open(str(p), "pt") as f:
            metas.append(f.metadata())
    assert [m["num_processes"] for m in metas] == ["2", "2"]
    assert metas[0]["env_seed"] != metas[1]["env_seed"], "ranks must collect different experience"
    w0, w1 = load_file(ranks[0]), load_file(ranks[1])
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"{k} differs between ranks: gradients were not averaged"
    assert any(w0[k].abs().sum() > 0 for k in w0 if "lora_B" in k), "no update happened"
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
