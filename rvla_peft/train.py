"""Train a robust LoRA adapter: ``python -m rvla_peft.train RECIPE [key=value ...]``.

Also under Accelerate: ``accelerate launch --config_file accelerate_configs/cpu_2proc.yaml -m rvla_peft.train
recipes/tiny_cpu.yaml``. ``--dry-run`` prints the resolved config and exits; ``--help-config`` lists every key.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

from rvla_peft.config import ConfigError, TrainConfig, dump_yaml, help_text, load_config
from rvla_peft.utils.runlock import RunLock, RunLockError, describe_holder, is_main_rank

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny_cpu.yaml"
# Free space a run needs besides its adapters and checkpoints: metrics, TensorBoard events, recipe, report plots.
MIN_FREE_BYTES = 32 * 2**20
# Bytes per trainable parameter in the final adapter (fp32) and in a checkpoint (fp32 weights + AdamW's two moments)
ADAPTER_BYTES_PER_PARAM = 4
CHECKPOINT_BYTES_PER_PARAM = 12


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


def check_writable(directory: str | Path) -> list[Path]:
    """Create ``directory`` if needed and write + delete a probe file in it; a ConfigError says why not. Returns the
    folders it created (a dry run removes them again)."""
    directory = Path(directory)
    created = [p for p in (directory, *directory.parents) if not p.exists()][::-1]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"output_dir: {directory} is a file, not a folder") from None
    except OSError as e:
        raise ConfigError(f"output_dir: cannot create {directory}: {e.strerror or e}") from None
    if not directory.is_dir():
        raise ConfigError(f"output_dir: {directory} is not a folder")
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"rvla_peft")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output_dir: cannot write in {directory}: {e.strerror or e}") from None
    return created


def required_bytes(trainable_params: int, checkpoints: int) -> int:
    """Disk a run writes: the final adapter, every checkpoint (the trainer keeps them all), one more checkpoint's
    worth for the staging copy an atomic save holds beside the old one, and :data:`MIN_FREE_BYTES` for the rest."""
    per_param = ADAPTER_BYTES_PER_PARAM + (checkpoints + 1) * CHECKPOINT_BYTES_PER_PARAM
    return trainable_params * per_param + MIN_FREE_BYTES


def num_checkpoints(cfg: TrainConfig) -> int:
    """Checkpoints the run writes: every ``save_every`` updates, not at the last one (the adapter is saved there)."""
    return (cfg.total_updates - 1) // cfg.save_every if cfg.save_every > 0 else 0


def check_free_space(directory: str | Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ConfigError(
            f"output_dir: {directory} has {_size(free)} free, {what} needs about {_size(needed)}; free some space or "
            "choose another output_dir=..."
        )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def trainable_params(cfg: TrainConfig) -> int | None:
    """LoRA + trained heads, from the memory estimate (the model on the meta device); None when unknown offline."""
    try:
        from rvla_peft.memory import estimate_training_memory

        est = estimate_training_memory(cfg)
    except Exception:  # noqa: BLE001 - the estimate is a bonus: its failure only skips this part of the check
        return None
    return est.lora_params + est.head_params


def check_task(cfg: TrainConfig) -> None:
    """The task exists in ManiSkill's registry (the nearest ids otherwise) and its assets are on disk."""
    from rvla_peft.envs.maniskill import _check_task, _import_mani_skill

    _import_mani_skill()
    try:
        _check_task(cfg.env.task)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def preflight(cfg: TrainConfig, dry_run: bool = False) -> list[str]:
    """What can fail before the model and envs are built (~20 s), in order of cost, after :func:`check_writable`:
    the output folder has room (a floor first, then the adapter and checkpoints' size), the task exists.

    A dry run only warns (returned) about room for the checkpoints: it plans a run that may go to another disk."""
    check_free_space(cfg.output_dir, MIN_FREE_BYTES, "a run")  # before the slow checks: a full disk fails fast
    check_task(cfg)
    params = trainable_params(cfg)
    if params is None:
        return []
    checkpoints = num_checkpoints(cfg)
    try:
        check_free_space(
            cfg.output_dir,
            required_bytes(params, checkpoints),
            f"the adapter and {checkpoints} checkpoints of {params / 1e6:.2f}M trainable parameters",
        )
    except ConfigError as e:
        if not dry_run:
            raise
        return [f"warning: {e}"]
    return []


def _remove(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:  # no longer empty: something else wrote there meanwhile
            return


def final_save_guard(cls):
    """``cls`` (the trainer) with the finished-adapter check repeated just before the final save: an adapter that
    appeared during the run (another run that ignored the lock) is not replaced silently."""

    class Guarded(cls):
        def save_adapter(self):
            if self.accelerator.is_main_process:
                check_output_dir(self.cfg)
            return super().save_adapter()

    Guarded.__name__ = Guarded.__qualname__ = cls.__name__
    return Guarded


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print(help_text(TrainConfig))
        return 0
    lock = None
    try:
        cfg = load_config(args.recipe, args.overrides)
        if not args.dry_run:
            check_output_dir(cfg)
        created = check_writable(cfg.output_dir)
        try:
            if not args.dry_run and is_main_rank():
                # Before anything slow: a second run in this folder stops at once. Only rank 0 holds it, as every
                # rank of `accelerate launch` runs main() on the same output_dir.
                command = "python -m rvla_peft.train " + shlex.join(sys.argv[1:] if argv is None else argv)
                lock = RunLock(cfg.output_dir, command=command).acquire()
            warnings = preflight(cfg, dry_run=args.dry_run)
        except (ConfigError, RunLockError):
            if lock is not None:
                lock.release()
            _remove(created)  # a refused run leaves no folder behind
            raise
        if args.dry_run:
            _remove(created)  # nor does a dry run
            from rvla_peft.memory import format_estimate

            print(dump_yaml(cfg), end="")
            print(format_estimate(cfg), end="")  # YAML comment lines: stdout stays a loadable recipe
            print("".join(f"# {w}\n" for w in warnings), end="")
            return 0
    except (ConfigError, RunLockError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if lock is not None and lock.stale:
        print(f"note: took over the stale lock of a run that died ({describe_holder(lock.stale)})")
    from rvla_peft.envs.maniskill import EnvWorkerError
    from rvla_peft.trainer import RobustPPOTrainer

    try:
        trainer = final_save_guard(RobustPPOTrainer)(cfg)
        trainer.train()
    except ConfigError as e:  # the adapter check repeated before the final save
        print(f"error: {e}", file=sys.stderr)
        return 2
    except EnvWorkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()
    if trainer.accelerator.is_main_process:
        print(f"Adapter saved to {Path(cfg.output_dir) / 'adapter'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
