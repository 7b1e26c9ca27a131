"""Concurrent requests gathered into one forward.

One worker thread owns the policy. It takes the first request waiting, then every request that arrives within
``max_wait_s`` of it, up to ``max_batch``, and answers them all from one batched call. With ``max_wait_s = 0`` it
waits for nothing: a batch is what queued while the previous forward ran (continuous batching), so a lone client
pays no wait and many clients share forwards."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    """One observation waiting for its action; ``inputs`` are passed to the predict function as they are."""

    inputs: Any
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class Answer:
    """An action and how it was produced, for the reply's ``server_timing``."""

    action: Any
    queue_ms: float  # from the request's arrival to the start of its batch's forward
    infer_ms: float  # the batch's forward
    batch_size: int


class ActionBatcher:
    """``predict(list of inputs) -> list of actions`` run on one thread, over batches of queued requests."""

    def __init__(self, predict: Callable[[list], list], max_batch: int = 16, max_wait_s: float = 0.0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait_s}")
        self.predict, self.max_batch, self.max_wait_s = predict, max_batch, max_wait_s
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="rvla-serve-batcher", daemon=True)
        self._thread.start()

    def submit(self, inputs: Any) -> Future:
        """Queue one observation; the future resolves to an :class:`Answer` (or the forward's exception)."""
        request = Request(inputs)
        self._queue.put(request)
        return request.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _next_batch(self) -> list[Request] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch, deadline = [first], time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                wait = deadline - time.perf_counter()
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:  # closing: answer what is here, then stop
                self._queue.put(None)
                break
            batch.append(item)
        return batch

    def _serve(self) -> None:
        while (batch := self._next_batch()) is not None:
            start = time.perf_counter()
            try:
                actions = self.predict([r.inputs for r in batch])
            except Exception as error:  # the server answers 500 for these requests and keeps serving
                for r in batch:
                    r.future.set_exception(error)
                continue
            infer_ms = 1000 * (time.perf_counter() - start)
            for r, action in zip(batch, actions, strict=True):
                r.future.set_result(Answer(action, 1000 * (start - r.arrived), infer_ms, len(batch)))
