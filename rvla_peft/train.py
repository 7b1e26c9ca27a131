"""Train a robust LoRA adapter: ``python -m rvla_peft.train RECIPE [key=value ...]``.

Also under Accelerate: ``accelerate launch --config_file accelerate_configs/cpu_2proc.yaml -m rvla_peft.train
recipes/tiny_cpu.yaml``. ``--dry-run`` prints the resolved config and exits; ``--help-config`` lists every key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rvla_peft.config import ConfigError, TrainConfig, dump_yaml, help_text, load_config

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny_cpu.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rvla_peft.train",
        description="Robust LoRA post-training of a VLA: PPO + Jacobian + smoothness penalties on ManiSkill.",
    )
    parser.add_argument("recipe", nargs="?", help="YAML recipe (default: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. ppo.learning_rate=3e-5")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its help")
    args = parser.parse_intermixed_args(argv)
    if args.recipe and "=" in args.recipe and not Path(args.recipe).exists():
        args.overrides.insert(0, args.recipe)  # `train key=value` with no recipe
        args.recipe = None
    return args


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse to overwrite a finished run unless asked: nothing a user trained is lost silently."""
    adapter = Path(cfg.output_dir) / "adapter"
    if adapter.exists() and not cfg.overwrite_output_dir:
        raise ConfigError(
            f"output_dir: {adapter} already holds an adapter; choose another output_dir=... or pass "
            "overwrite_output_dir=true"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print(help_text(TrainConfig))
        return 0
    try:
        cfg = load_config(args.recipe, args.overrides)
        if args.dry_run:
            from rvla_peft.memory import format_estimate

            print(dump_yaml(cfg), end="")
            print(format_estimate(cfg), end="")  # YAML comment lines: stdout stays a loadable recipe
            return 0
        check_output_dir(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from rvla_peft.trainer import RobustPPOTrainer

    trainer = RobustPPOTrainer(cfg)
    trainer.train()
    if trainer.accelerator.is_main_process:
        print(f"Adapter saved to {Path(cfg.output_dir) / 'adapter'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
