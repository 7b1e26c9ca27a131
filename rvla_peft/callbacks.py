"""Observe a training run without patching it, as transformers' ``TrainerCallback`` does.

Subclass :class:`TrainerCallback`, override the events you need and pass instances to the trainer
(``RobustPPOTrainer(cfg, callbacks=[...])``). Every event receives the trainer; callbacks run on every rank, in
the order given, after the trainer's own handling of the event. Return values are ignored: a callback observes, it
does not steer (stop a run with a signal, as the command line does).
"""

from __future__ import annotations

from pathlib import Path


class TrainerCallback:
    def on_train_begin(self, trainer) -> None:
        """Before the first update of this process (after a resume: of the updates left)."""

    def on_update_end(self, trainer, update: int, metrics: dict[str, float]) -> None:
        """After update ``update`` (1-based) has collected and optimised, before its metrics are logged."""

    def on_log(self, trainer, update: int, metrics: dict[str, float]) -> None:
        """After ``metrics`` were written to metrics.jsonl and the trackers."""

    def on_before_optimizer_step(self, trainer) -> None:
        """A minibatch's gradients are ready (all-reduced and clipped); the optimizer has not stepped yet."""

    def on_optimizer_step(self, trainer, stepped: bool) -> None:
        """After the optimizer step, or after it was skipped for a non-finite loss or gradient (``stepped`` False:
        the weights are as they were)."""

    def on_save(self, trainer, path: Path) -> None:
        """After a checkpoint or the adapter was written to ``path``."""

    def on_train_end(self, trainer, metrics: dict[str, float]) -> None:
        """After the final adapter was written."""


class CallbackList:
    """Calls an event on each callback in order."""

    def __init__(self, callbacks: list[TrainerCallback] | None = None):
        self.callbacks = list(callbacks or [])

    def __getattr__(self, event: str):
        if not event.startswith("on_"):
            raise AttributeError(event)

        def call(*args, **kwargs) -> None:
            for callback in self.callbacks:
                getattr(callback, event)(*args, **kwargs)

        return call
