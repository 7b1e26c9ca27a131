"""One run per output folder: a lock file held for the run's life, so that a second run there stops at once instead
of interleaving ``metrics.jsonl`` and replacing the first run's adapter and checkpoints.

    with RunLock(output_dir, command="python -m rvla_peft.train ..."):
        trainer.train()

The lock is ``fcntl.flock`` on ``OUTPUT_DIR/.rvla_peft.lock``; the file also records who holds it (pid, host, start
time, command) for the error message. The kernel drops a flock when its process dies, however it dies (kill -9
included), so a lock file left behind by a dead run on this host is stale and is taken over. A lock file written on
another host cannot be checked from here (its pid means nothing here): it is refused, naming the file to delete.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from rvla_peft.utils.constants import LOCK_FILE


class RunLockError(RuntimeError):
    """Another run holds the output folder; the message names it."""


def describe_holder(record: dict) -> str:
    started = record.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return (
        f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, started {when}: "
        f"{record.get('command') or '(command not recorded)'}"
    )


def read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


class RunLock:
    """Exclusive hold of ``directory`` for one run (a context manager; :meth:`acquire` / :meth:`release` also work).

    Raises :class:`RunLockError` naming the holder when another live run has it. ``stale``: the record of a dead
    run's lock that was taken over (None when the folder was free)."""

    def __init__(self, directory: str | Path, command: str | None = None) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.command = command if command is not None else " ".join([Path(sys.executable).name, *sys.argv])
        self.stale: dict | None = None
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        for _ in range(10):  # retried only when the file was replaced between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunLockError(self._held_message(read_record(self.path))) from None
            # The holder unlinks the file on release: if that happened between our open and flock, we hold a lock
            # on a file nobody else can see any more, and must start again on the current one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = read_record(self.path)
            if previous.get("host") not in (None, host) and previous.get("pid") is not None:
                os.close(fd)  # flock is advisory and may not reach across hosts: do not guess
                raise RunLockError(
                    self._held_message(previous)
                    + f" (another host: if that run is gone, delete {self.path} and start again)"
                )
            self.stale = previous or None
            record = {"pid": os.getpid(), "host": host, "started": time.time(), "command": self.command}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            self._fd = fd
            return self
        raise RunLockError(f"could not take the lock {self.path}: it keeps being replaced by another process")

    def _held_message(self, record: dict) -> str:
        return (
            f"output_dir {self.directory} is in use by another run ({describe_holder(record)}); wait for it to "
            "finish or choose another output_dir=..."
        )

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding the flock: nobody can be mid-takeover of this file
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_main_rank() -> bool:
    """Rank 0 (or no launcher): the process that holds the run's lock. ``accelerate launch`` / torchrun set RANK for
    every process, and each one runs ``main()``."""
    return os.environ.get("RANK", "0") in ("", "0")
