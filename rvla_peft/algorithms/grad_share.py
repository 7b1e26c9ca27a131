"""How much of the update each loss term drives: the norm of each term's gradient on the trainable parameters.

A penalty whose gradient is 0.1% of the policy gradient's does nothing whatever its value; these shares say so,
and :func:`calibrated_weights` gives the weights that put each penalty at a chosen share
(``bench/calibrate_penalties.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def term_grad_norms(terms: dict[str, Tensor], params: Sequence[torch.nn.Parameter]) -> dict[str, float]:
    """``||d term / d params||_2`` for each (already weighted) scalar term, one backward per term through the shared
    graph (kept for the caller's own backward). A term that does not reach the parameters has norm 0."""
    norms = {}
    for name, term in terms.items():
        if not term.requires_grad:
            norms[name] = 0.0
            continue
        grads = torch.autograd.grad(term, list(params), retain_graph=True, allow_unused=True)
        squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        norms[name] = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
    return norms


def grad_shares(norms: dict[str, float]) -> dict[str, float]:
    """Each term's gradient norm over the sum of all terms' norms (the shares sum to 1; all 0 when no gradient)."""
    total = sum(norms.values())
    return {name: (n / total if total > 0 else 0.0) for name, n in norms.items()}


def grad_share_history(norms: dict[str, float]) -> dict[str, list[Tensor]]:
    """``grad/norm_<term>`` and ``grad/share_<term>`` as one-element metric histories (the trainer averages a
    metric's history over the update)."""
    out = {}
    for prefix, values in (("grad/norm_", norms), ("grad/share_", grad_shares(norms))):
        for name, value in values.items():
            out[prefix + name] = [torch.tensor(value)]
    return out


def calibrated_weights(norms: dict[str, float], penalties: dict[str, float], share: float) -> dict[str, float]:
    """Weights putting every penalty at ``share`` of the summed gradient norm.

    ``norms``: gradient norms of the other (already weighted) terms; ``penalties``: each penalty's gradient norm at
    weight 1. With K penalties each at share s of T = O + sum_k w_k n_k (O: the other terms' sum), w_k n_k = s T gives
    T = O / (1 - K s) and w_k = s O / ((1 - K s) n_k)."""
    k = len(penalties)
    if not 0 < share * k < 1:
        raise ValueError(f"share={share} for {k} penalties: the penalties' shares must sum to less than 1")
    others = sum(norms.values())
    return {name: (share * others / ((1 - k * share) * n) if n > 0 else float("inf")) for name, n in penalties.items()}
