"""Preemption and Ctrl-C: the first SIGTERM or SIGINT asks a long job to stop at its next safe point (the trainer
finishes the update, writes a checkpoint and the adapter, then exits); a second Ctrl-C exits at once.

    with StopOnSignal() as stop:
        for update in ...:
            ...
            if stop.poll():
                save(); raise SystemExit(exit_code(stop.received))
"""

from __future__ import annotations

import signal
import sys
import threading


def exit_code(signum: int) -> int:
    """128 + the signal: what a shell and a scheduler read as "stopped by SIGTERM" (143) or "by Ctrl-C" (130)."""
    return 128 + int(signum)


class StopOnSignal:
    """Records the first SIGTERM/SIGINT instead of dying; a second SIGINT raises ``KeyboardInterrupt`` at once (and
    again at the next :meth:`poll`, should a finaliser have swallowed it).

    Handlers are only installed from the main thread (Python's rule); elsewhere this is a no-op that never fires."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self.received: int | None = None
        self.aborted = False  # a second Ctrl-C came
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def poll(self) -> int | None:
        """The signal that asked to stop (None: none yet). Raises ``KeyboardInterrupt`` if a second Ctrl-C came and its
        exception was swallowed: a handler that runs inside a finaliser (``__del__``, as SAPIEN's scenes have) raises
        into it, and Python only prints "Exception ignored"."""
        if self.aborted:
            raise KeyboardInterrupt
        return self.received

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            if signum == signal.SIGINT:
                self.aborted = True
                raise KeyboardInterrupt  # the second Ctrl-C: no more waiting
            return  # a repeated SIGTERM: already stopping
        self.received = signum
        again = " (Ctrl-C again to exit at once, without saving)" if signal.SIGINT in self.signals else ""
        print(f"\n{name} received: stopping after the current update to save a checkpoint{again}", file=sys.stderr)
