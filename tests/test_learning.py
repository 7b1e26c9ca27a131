"""Evidence that the loop learns: from a fixed seed, the episode return on real ManiSkill rises over the updates.

Slow (minutes): `make test-slow`. The recipe is recipes/tiny_learn.yaml; bench/learning_curve.py plots the same
run for the README.
"""

import statistics

import pytest
from conftest import RECIPES

from rvla_peft.config import load_config
from rvla_peft.trainer import RobustPPOTrainer, TrainerCallback


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 11 minutes on an idle 2-core machine
def test_return_rises_over_updates_from_a_fixed_seed(tmp_path):
    cfg = load_config(RECIPES / "tiny_learn.yaml", [f"output_dir={tmp_path}", "report_to=[]"])
    history: list[float] = []

    class RecordReturns(TrainerCallback):
        def on_log(self, trainer, update, metrics):
            if "rollout/return" in metrics:
                history.append(metrics["rollout/return"])

    trainer = RobustPPOTrainer(cfg, callbacks=[RecordReturns()])
    trainer.train()
    k = max(3, len(history) // 5)
    first, last = statistics.mean(history[:k]), statistics.mean(history[-k:])
    assert last > 1.4 * first, f"return did not rise: first {k} updates {first:.3f}, last {k} {last:.3f}: {history}"
