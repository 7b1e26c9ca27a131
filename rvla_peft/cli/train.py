"""Train a robust LoRA adapter: ``python -m rvla_peft.train RECIPE [key=value ...]``.

Also under Accelerate: ``accelerate launch --config_file accelerate_configs/cpu_2proc.yaml -m rvla_peft.train
recipes/tiny_cpu.yaml``. ``--dry-run`` prints the resolved config and exits; ``--help-config`` lists every key.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

from rvla_peft.config import ConfigError, TrainConfig, dump_yaml, help_text, load_config
from rvla_peft.run_folder import (
    LATEST,
    MIN_FREE_BYTES,
    check_free_space,
    check_output_dir,
    check_writable,
    num_checkpoints,
    required_bytes,
    resolve_resume,
)
from rvla_peft.utils.runlock import RunLock, RunLockError, describe_holder, is_main_rank
from rvla_peft.utils.signals import StopOnSignal, exit_code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rvla_peft.train",
        description="Robust LoRA post-training of a VLA: PPO + Jacobian + smoothness penalties on ManiSkill.",
    )
    parser.add_argument("recipe", nargs="?", help="YAML recipe (default: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. ppo.learning_rate=3e-5")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in output_dir from its latest checkpoint"
    )
    parser.add_argument("--help-config", action="store_true", help="list every config key with its help")
    args = parser.parse_intermixed_args(argv)
    if args.recipe and "=" in args.recipe and not Path(args.recipe).exists():
        args.overrides.insert(0, args.recipe)  # `train key=value` with no recipe
        args.recipe = None
    if args.resume:
        args.overrides.append(f"resume_from_checkpoint={LATEST}")
    return args


def trainable_params(cfg: TrainConfig) -> int | None:
    """LoRA + trained heads, from the memory estimate (the model on the meta device); None when unknown offline."""
    try:
        from rvla_peft.memory import estimate_training_memory

        est = estimate_training_memory(cfg)
    except Exception:  # noqa: BLE001 - the estimate is a bonus: its failure only skips this part of the check
        return None
    return est.lora_params + est.head_params


def check_task(cfg: TrainConfig) -> None:
    """The task exists in ManiSkill's registry (the nearest ids otherwise), its assets are on disk, and GPU
    simulation, where asked for, can start."""
    import torch

    from rvla_peft.envs.maniskill import (
        _check_task,
        _import_mani_skill,
        enable_gpu_physics,
        set_local_cuda_device,
        simulates_on_gpu,
    )

    _import_mani_skill()
    try:
        _check_task(cfg.env.task)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # Only where the run will simulate on the GPU: a CPU machine planning a GPU recipe (--dry-run) has no GPU PhysX
    if simulates_on_gpu(cfg.env) and torch.cuda.is_available():
        set_local_cuda_device()  # before the Accelerator does: GPU PhysX starts on the rank's own GPU, not GPU 0
        enable_gpu_physics()


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print(help_text(TrainConfig))
        return 0
    lock = None
    try:
        cfg = load_config(args.recipe, args.overrides)
        if not args.dry_run:
            check_output_dir(cfg, resuming=resolve_resume(cfg) is not None)
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
    try:
        return _run(cfg)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: TrainConfig) -> int:
    """Build the trainer and train, under the signal handlers; every expected failure is one ``error:`` line."""
    from rvla_peft.envs.maniskill import EnvWorkerError
    from rvla_peft.trainer import NonFiniteError, RobustPPOTrainer, SaveError, TrainingInterrupted

    with StopOnSignal() as stop:
        try:
            trainer = RobustPPOTrainer(cfg)
            if trainer.resumed_from is not None and trainer.accelerator.is_main_process:
                print(f"Resuming from {trainer.resumed_from} (update {trainer.start_update}/{cfg.total_updates})")
            trainer.train(stop=stop.poll)
        except TrainingInterrupted as e:
            if e.signum and is_main_rank():
                print(
                    f"Stopped by {signal.Signals(e.signum).name} after update {e.update}/{cfg.total_updates}: "
                    f"checkpoint {e.checkpoint}, adapter (marked interrupted) {e.adapter}; continue with --resume",
                    file=sys.stderr,
                )
            return exit_code(e.signum)
        except KeyboardInterrupt:  # the second Ctrl-C
            print("error: interrupted; nothing saved since the last checkpoint", file=sys.stderr)
            return exit_code(signal.SIGINT)
        except ConfigError as e:  # the adapter check repeated before the final save, a resumed recipe that differs
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (EnvWorkerError, NonFiniteError, SaveError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    if trainer.accelerator.is_main_process:
        print(f"Adapter saved to {Path(cfg.output_dir) / 'adapter'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
