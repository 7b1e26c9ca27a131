"""The few collective operations training needs, in one place. Each is a collective call: every rank must make it,
in the same order; in a single process none communicates.

Why the policy is not wrapped by ``accelerator.prepare``: DDP syncs gradients only for calls through its own
``forward`` and does not support double backward (``autograd.grad(create_graph=True)``), which the Jacobian penalty
needs. The trainable parameters (LoRA + value head) are small, so their gradients are averaged across ranks
explicitly with one all-reduce per optimizer step (:func:`average_gradients`); every rank then takes the same step
and the weights stay identical.
"""

from __future__ import annotations

import torch


def rank_max(accelerator, value: float) -> float:
    """The largest of every rank's ``value``: one decision all ranks take together."""
    if accelerator.num_processes == 1:
        return float(value)
    return accelerator.reduce(torch.tensor(float(value), device=accelerator.device), "max").item()


def rank_sum(accelerator, values: list[float]) -> list[float]:
    """Each of ``values`` summed over ranks."""
    local = torch.tensor([float(v) for v in values], device=accelerator.device)
    return accelerator.reduce(local, "sum").tolist()


def rank_mean(accelerator, value: torch.Tensor) -> float:
    """A scalar averaged over ranks."""
    return accelerator.reduce(value.float().to(accelerator.device), "mean").item()


def broadcast_parameters(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Start every rank from rank 0's weights, as DDP would."""
    if accelerator.num_processes == 1:
        return
    for p in params:
        torch.distributed.broadcast(p.data, src=0)


def average_gradients(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Average ``params``' gradients over ranks with one all-reduce (a missing gradient counts as zeros)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), "mean")
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()
