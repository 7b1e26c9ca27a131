"""``rvla-sft`` / ``python -m rvla_peft.sft``: supervised warm-up of any policy family on scripted-expert
demonstrations (:mod:`rvla_peft.sft`), before robust RL from its adapter (``model.adapter``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rvla_peft.config import ConfigError
from rvla_peft.config.parsing import help_text
from rvla_peft.utils.commands import portable_command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="rvla-sft",
        description="Supervised warm-up of a VLA policy on demonstrations recorded by rvla-demos, with its "
        "family's own objective (LoRA by default).",
    )
    p.add_argument("recipe", nargs="?", default=None, help="warm-up recipe (YAML), e.g. recipes/sft_tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=200 demos=[demos/push]")
    p.add_argument("--full", action="store_true", help="fully fine-tune (full_finetune=true)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue output_dir/checkpoint (resume_from_checkpoint=latest)",
    )
    p.add_argument("--dry-run", action="store_true", help="check the recipe and the demonstrations, load no model")
    p.add_argument("--help-config", action="store_true", help="print every recipe key with its help and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from rvla_peft.sft import SFTConfig, SFTError, check_demos, check_output_dir, load_sft_config, sft

    args = parse_args(argv)
    if args.help_config:
        print(help_text(SFTConfig))
        return 0
    overrides = list(args.overrides)
    if args.recipe is not None and "=" in args.recipe and not Path(args.recipe).is_file():
        args.recipe, overrides = None, [args.recipe, *overrides]  # overrides alone, no recipe
    if args.full:
        overrides.append("full_finetune=true")
    if args.resume:
        overrides.append("resume_from_checkpoint=latest")
    command = portable_command("rvla-sft", sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_sft_config(args.recipe, overrides)
        if args.dry_run:
            data = check_demos(cfg)
            check_output_dir(cfg)
            print(f"ok: {cfg.policy.family} warm-up on {data.num_episodes} episodes ({', '.join(data.tasks)})")
            return 0
        sft(cfg, command)
    except (ConfigError, SFTError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
