"""Atomic writes: a reader (or a crash) never sees a half-written adapter, checkpoint, report or demo shard."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_save(directory: str | Path, write: Callable[[Path], object]) -> None:
    """``write(staging)`` fills a sibling temp folder, which then replaces ``directory`` (the old one is removed
    only after the new one is in place)."""
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write(staging)
    except BaseException:  # a full disk, a signal: no hidden half-written folder is left behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = directory.with_name(f".{directory.name}.old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    staging.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` fills a temp file in the same folder, which is then renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))
