"""torch's intra-op CPU threads for one block of work."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Inside the block torch computes on ``n`` CPU threads (None: as it was), and goes back to its count after.

    Why a block and not the process: a rollout runs the policy between env steps, and OpenMP workers spin-waiting
    after each small op take the cores the simulator and the software renderer need; an update has the cores to
    itself and gains from all of them."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
