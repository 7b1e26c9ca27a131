"""Errors that end a training run, in a leaf module so that every layer can raise or catch them."""

from __future__ import annotations

from pathlib import Path


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT stopped the run after an update; the checkpoint and the (interrupted) adapter are written."""

    def __init__(self, signum: int, update: int, checkpoint: Path, adapter: Path) -> None:
        self.signum, self.update, self.checkpoint, self.adapter = signum, update, checkpoint, adapter
        super().__init__(f"stopped at update {update}; checkpoint {checkpoint}, adapter {adapter}")


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient, or a weight is not finite."""


class SaveError(RuntimeError):
    """The adapter could not be written; the message says where the trained state went instead."""
