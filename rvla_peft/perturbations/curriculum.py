"""Severity curriculum over training (the RobustVLA paper's RobustVLA-C): a scale in [0, 1] per PPO update.

The trainer multiplies every training perturbation's severity by the scale, once per update:

    curriculum = Curriculum(cfg.perturb.curriculum)
    for update in range(cfg.total_updates):
        train_env.set_severity_scale(curriculum.scale(update, success_rate))  # previous update's success, or None
        ...

Schedules (``start`` is the scale at update 0):

* ``none``: 1 throughout, the specs' severities as written.
* ``linear``: from ``start`` to 1 over ``ramp_updates`` updates, then 1.
* ``step``: the same ramp in ``stages`` equal jumps, the last one at ``ramp_updates``.
* ``success``: ``start``, raised by ``increment`` (up to 1) after every update whose rollout success rate reached
  ``success_threshold``; None or NaN (no episode finished) leaves it. This one depends on the rates seen so far,
  so call ``scale`` once per update, in order.

Pure Python, no torch: the config validates the same fields before anything heavy loads.
"""

from __future__ import annotations

from typing import Protocol


class CurriculumLike(Protocol):
    """``rvla_peft.config.CurriculumConfig`` or anything shaped like it (validated there)."""

    schedule: str
    start: float
    ramp_updates: int
    stages: int
    success_threshold: float
    increment: float


class Curriculum:
    """The severity scale for each update; see the module docstring for the schedules."""

    def __init__(self, cfg: CurriculumLike) -> None:
        if cfg.schedule not in ("none", "linear", "step", "success"):
            raise ValueError(f"unknown curriculum schedule {cfg.schedule!r}; use none, linear, step or success")
        self.cfg = cfg
        self._level = cfg.start  # the "success" schedule's current scale

    def state_dict(self) -> dict:
        """What a resumed run needs: the ``success`` schedule's level (the others depend on the update only)."""
        return {"level": self._level}

    def load_state_dict(self, state: dict) -> None:
        self._level = float(state["level"])

    def scale(self, update: int, success_rate: float | None = None) -> float:
        """The scale for ``update`` (0-based); ``success_rate`` is the last update's, used by ``success`` only."""
        cfg = self.cfg
        if cfg.schedule == "none":
            return 1.0
        if cfg.schedule == "success":
            if success_rate is not None and success_rate >= cfg.success_threshold:  # NaN compares False
                self._level = min(1.0, self._level + cfg.increment)
            return self._level
        if cfg.schedule == "linear":
            progress = min(update / cfg.ramp_updates, 1.0)
        else:  # step: integer arithmetic, so stage boundaries are exact
            progress = min(update * cfg.stages // cfg.ramp_updates, cfg.stages) / cfg.stages
        return cfg.start + (1.0 - cfg.start) * progress
