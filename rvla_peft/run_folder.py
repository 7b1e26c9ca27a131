"""A training run's output folder: what may be written there, what a resumed run continues from, and whether the
disk has room. Light (no torch): ``python -m rvla_peft.train`` runs these checks before anything slow is imported.

    OUTPUT_DIR/recipe.yaml, metrics.jsonl, adapter/, checkpoints/update-000010/, rvla_peft/ (TensorBoard)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from rvla_peft.config.parsing import ConfigError, read_yaml
from rvla_peft.utils.constants import (
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    RECIPE_FILE,
    TRAINER_STATE,
)

LATEST = "latest"
# Free space a run needs besides its adapters and checkpoints: metrics, TensorBoard events, recipe, report plots.
MIN_FREE_BYTES = 32 * 2**20
# Bytes per trainable parameter in the final adapter (fp32) and in a checkpoint (fp32 weights + AdamW's two moments)
ADAPTER_BYTES_PER_PARAM = 4
CHECKPOINT_BYTES_PER_PARAM = 12
# Recipe keys a resumed run may change: how long it runs and where it reports, not what it trains.
RESUMABLE_CHANGES = (
    "total_updates", "save_every", "eval_every", "eval_episodes", "report_to", "video_every", "hub",
    "overwrite_output_dir", "resume_from_checkpoint", "max_consecutive_skips", "output_dir",
)  # fmt: skip


def checkpoint_name(update: int) -> str:
    return f"{CHECKPOINT_PREFIX}{update:06d}"


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints (trainer state written) in ``output_dir``, oldest first."""
    folder = Path(output_dir) / CHECKPOINTS_DIR
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: p.name)


def read_trainer_state(folder: str | Path) -> dict:
    path = Path(folder) / TRAINER_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"resume_from_checkpoint: cannot read {path}: {e}") from None


def resolve_resume(cfg) -> Path | None:
    """The checkpoint folder ``cfg.resume_from_checkpoint`` names (``latest``: the newest in output_dir), or None."""
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint == LATEST:
        found = checkpoints(cfg.output_dir)
        if not found:
            raise ConfigError(
                f"resume_from_checkpoint: no checkpoint in {Path(cfg.output_dir) / CHECKPOINTS_DIR} (save_every=N "
                "writes them); start without --resume"
            )
        return found[-1]
    folder = Path(cfg.resume_from_checkpoint)
    if not (folder / TRAINER_STATE).is_file():
        raise ConfigError(
            f"resume_from_checkpoint: {folder} is not a checkpoint (no {TRAINER_STATE}); use 'latest' or a folder "
            f"under {Path(cfg.output_dir) / CHECKPOINTS_DIR}"
        )
    return folder


def _flat(data: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume_recipe(recipe: dict, checkpoint: Path) -> None:
    """A resumed run trains what the checkpoint trained: only :data:`RESUMABLE_CHANGES` may differ from its recipe."""
    saved_path = checkpoint / RECIPE_FILE
    if not saved_path.is_file():
        return  # a checkpoint from before recipes were saved in checkpoints: nothing to compare
    saved, ours = _flat(read_yaml(saved_path) or {}), _flat(recipe)
    changed = [
        key
        for key in sorted(set(saved) | set(ours))
        # None in ours: a key resolved when training starts (the family's LoRA defaults), as the saved one was
        if saved.get(key) != ours.get(key) and ours.get(key) is not None and key.split(".")[0] not in RESUMABLE_CHANGES
    ]
    if changed:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {ours.get(k)!r}" for k in changed[:4])
        more = f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""
        raise ConfigError(
            f"resume_from_checkpoint: this recipe differs from the one {checkpoint} was trained with ({shown}{more});"
            " resume with the same recipe (only total_updates, save_every, eval_*, report_to, video_every, hub.* may "
            "change)"
        )


def adapter_fingerprint(output_dir: str | Path) -> tuple[int, int] | None:
    """Identity of the adapter in ``output_dir`` (inode, mtime), to tell whether another run replaced it."""
    try:
        stat = (Path(output_dir) / ADAPTER_DIR / ADAPTER_WEIGHTS).stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def check_output_dir(cfg, resuming: bool = False) -> None:
    """Refuse to replace what a finished or interrupted run left unless asked: nothing a user trained is lost."""
    if cfg.overwrite_output_dir or resuming:
        return
    out = Path(cfg.output_dir)
    adapter = out / ADAPTER_DIR
    if adapter.exists():
        if _interrupted(adapter):
            raise ConfigError(
                f"output_dir: {out} holds an interrupted run; continue it with --resume (or "
                "resume_from_checkpoint=latest), or start over with overwrite_output_dir=true"
            )
        raise ConfigError(
            f"output_dir: {adapter} already holds an adapter; choose another output_dir=... or pass "
            "overwrite_output_dir=true"
        )
    found = checkpoints(out)
    if found:
        raise ConfigError(
            f"output_dir: {out} holds checkpoints of an unfinished run (latest {found[-1].name}); continue it with "
            "--resume (or resume_from_checkpoint=latest), or start over with overwrite_output_dir=true"
        )


def _interrupted(adapter: Path) -> bool:
    try:
        return bool(json.loads((adapter / TRAINER_STATE).read_text()).get("interrupted"))
    except (OSError, ValueError, AttributeError):  # none, unreadable or not an object: not marked interrupted
        return False


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


def num_checkpoints(cfg) -> int:
    """Checkpoints the run writes: every ``save_every`` updates, not at the last one (the adapter is saved there)."""
    return (cfg.total_updates - 1) // cfg.save_every if cfg.save_every > 0 else 0


def check_free_space(directory: str | Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ConfigError(
            f"output_dir: {directory} has {format_size(free)} free, {what} needs about {format_size(needed)}; free "
            "some space or choose another output_dir=..."
        )


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
