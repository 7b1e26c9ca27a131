"""Rollouts act under the same autocast as the updates: the behaviour policy is the policy the first minibatch
evaluates, so its ratio is 1 and approx_kl 0 (to the float level of decoding token by token against one
teacher-forced pass) under mixed precision as in float32."""

import pytest
from conftest import RECIPES, TINY_RANDOM

from rvla_peft.config import load_config
from rvla_peft.trainer import RobustPPOTrainer


def first_minibatch_kl(tmp_path, mixed_precision: str) -> float:
    """approx_kl of a one-minibatch, one-epoch update: the first minibatch's, before any optimizer step."""
    cfg = load_config(
        RECIPES / "tiny_cpu.yaml",
        [
            *TINY_RANDOM,
            f"output_dir={tmp_path / mixed_precision}",
            f"mixed_precision='{mixed_precision}'",
            "policy.merge_lora_to_act=false",  # acting and updating with the same (unmerged) weights
            "total_updates=1",
            "eval_episodes=0",
            "save_every=0",
            "report_to=[]",
            "env.num_envs=2",
            "env.max_episode_steps=8",
            "ppo.num_steps=4",
            "ppo.num_minibatches=1",
            "ppo.update_epochs=1",
        ],
    )
    metrics = RobustPPOTrainer(cfg).train()
    assert metrics["ppo/optimizer_steps"] == 1 and metrics["ppo/clip_frac"] == 0
    return metrics["ppo/approx_kl"]


@pytest.mark.parametrize("mixed_precision, bound", [("no", 0.0), ("bf16", 2e-7)])
def test_the_first_minibatch_ratio_is_one_under_the_runs_precision(tmp_path, mixed_precision, bound):
    # bf16: 5e-8 here, from the KV-cached decoding's rounding against the teacher-forced pass; acting outside the
    # autocast that the update uses gave 1.3e-6
    assert 0 <= first_minibatch_kl(tmp_path, mixed_precision) <= bound
