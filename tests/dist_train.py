"""Launched by test_distributed.py under `accelerate launch`: train, then dump this rank's trainable weights."""

import sys
from pathlib import Path

from safetensors.torch import save_file

from rvla_peft.config import load_config
from rvla_peft.trainer import RobustPPOTrainer

if __name__ == "__main__":
    recipe, dump_dir, *overrides = sys.argv[1:]
    trainer = RobustPPOTrainer(load_config(recipe, overrides))
    trainer.train()
    acc = trainer.accelerator
    state = {n: p.detach().cpu().contiguous() for n, p in trainer.policy.named_parameters() if p.requires_grad}
    meta = {"num_processes": str(acc.num_processes), "env_seed": str(trainer.env_seed)}
    save_file(state, str(Path(dump_dir) / f"rank{acc.process_index}.safetensors"), metadata=meta)
