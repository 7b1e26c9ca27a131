"""Robustness regularisers of RobustVLA (arXiv 2511.01331): ``L = L_PPO + alpha * R_jac + beta * R_smooth``.

- Jacobian term, two forms: the Hutchinson estimate of ``||d mu(o) / d o||_F^2`` (mu = mean action) and the paper's
  clipped input-gradient penalty ``min(||d log pi(a|s) / d s||^2, G_max)``.
- Smoothness term: ``||mu(s) - target||^2``, with target the behaviour policy's mean at the same state (the
  paper) or the current mean at ``s_{t+1}`` (CAPS, Mysore et al. 2021).
- Invariance term (paired-invariance training, as PAIR-VLA, arXiv 2605.13105): the divergence between the action
  distribution on the perturbed frame and on the clean frame of the same step: sampled (k3, any policy family) or
  exact over the bins of each action token (token policies).

All penalties keep the graph (``create_graph=True``) so they can be trained through by double backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rvla_peft.algorithms.group import kl_k3


def rademacher(shape, generator: torch.Generator | None = None, device=None, dtype=None) -> Tensor:
    """Independent +-1 entries with probability 1/2 each, of the given shape (default dtype when none)."""
    bits = torch.randint(0, 2, shape, generator=generator, device=device)
    return (2 * bits - 1).to(dtype or torch.get_default_dtype())


def _probe(kind: str, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """A probe shaped like ``like``, drawn on the generator's device (so a CPU generator works for GPU tensors)."""
    device = generator.device if generator is not None else like.device
    if kind == "rademacher":
        v = rademacher(like.shape, generator=generator, device=device, dtype=like.dtype)
    elif kind == "gaussian":
        v = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
    else:
        raise ValueError(f"probe must be 'rademacher' or 'gaussian', got {kind!r}")
    return v.to(like.device)


def hutchinson_jacobian_sq_norm(
    outputs: Tensor,
    inputs: Tensor,
    num_probes: int = 1,
    generator: torch.Generator | None = None,
    create_graph: bool = True,
    probe: str = "rademacher",
) -> Tensor:
    """Per-sample unbiased estimate of ``||d outputs_b / d inputs_b||_F^2`` (Hutchinson).

    For a probe ``v`` with ``E[v v^T] = I``: ``E||v^T J||^2 = tr(J J^T) = ||J||_F^2``. One vector-Jacobian product
    per probe covers the whole batch, because sample b's output must depend only on sample b's input (no
    batch-norm in training mode, no cross-sample attention): the gradient of ``sum(outputs * v)`` w.r.t.
    ``inputs[b]`` is then exactly ``v_b^T J_b``. Rademacher probes have lower variance than Gaussian ones.

    Args:
        outputs: ``[B, A]`` (or ``[B, ...]``), computed from ``inputs``.
        inputs: ``[B, ...]``, part of the graph (a leaf with ``requires_grad`` or a non-leaf activation).
        num_probes: probes averaged per sample.
        generator: for reproducible probes.
        create_graph: keep the graph so the estimate can be backpropagated (double backward).
        probe: "rademacher" or "gaussian".

    Returns:
        ``[B]``.
    """
    estimate = outputs.new_zeros(outputs.shape[0])
    for _ in range(num_probes):
        v = _probe(probe, outputs, generator)
        (vjp,) = torch.autograd.grad((outputs * v).sum(), inputs, create_graph=create_graph, retain_graph=True)
        estimate = estimate + vjp.flatten(1).pow(2).sum(1)
    return estimate / num_probes


def grad_norm_penalty(log_prob: Tensor, inputs: Tensor, g_max: float, create_graph: bool = True) -> Tensor:
    """The paper's ``R_jac`` per sample: ``min(||d log pi(a_b|s_b) / d s_b||^2, g_max)``.

    Summing ``log_prob`` before the gradient is exact per sample for the same reason as in
    :func:`hutchinson_jacobian_sq_norm`. The clip bounds the penalty where the policy is sharp; its gradient is
    zero on clipped samples.

    Args:
        log_prob: ``[B]``.
        inputs: ``[B, ...]``, s, e.g. visual embeddings captured by a forward hook (may be a non-leaf).
        g_max: clip of the squared norm.
        create_graph: keep the graph for double backward.

    Returns:
        ``[B]``.
    """
    (grad,) = torch.autograd.grad(log_prob.sum(), inputs, create_graph=create_graph, retain_graph=True)
    return grad.flatten(1).pow(2).sum(1).clamp(max=g_max)


def smoothness_penalty(mean: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over valid samples of ``||mean_b - target_b||^2`` (summed over action dims), a scalar.

    Args:
        mean: ``[B, A]`` (or ``[B, ...]``), the current policy's mean action.
        target: same shape; detach it for the old-policy form, keep its graph for the temporal (CAPS) form.
        mask: ``[B]`` bool, valid samples (e.g. no episode boundary between s_t and s_{t+1}); None = all.

    Returns:
        Scalar. Zero with a graph (zero gradients) when no sample is valid; masked-out entries may hold NaN.
    """
    diff = mean - target
    if mask is None:
        return diff.flatten(1).pow(2).sum(1).mean()
    keep = mask.bool().reshape(-1, *([1] * (diff.dim() - 1)))
    # where before squaring: masked NaN/inf get a zero gradient instead of 0 * NaN
    sq = torch.where(keep, diff, torch.zeros_like(diff)).flatten(1).pow(2).sum(1)
    return sq.sum() / mask.sum().clamp(min=1)


def exact_jacobian_sq_norm(fn: Callable[[Tensor], Tensor], inputs: Tensor) -> Tensor:
    """Exact per-sample ``||d fn(x)_b / d x_b||_F^2`` with ``torch.func`` (a reference for tests and benches).

    Args:
        fn: maps a batch ``[b, ...]`` to ``[b, A]``; called on single samples with a batch dim of 1 under vmap.
        inputs: ``[B, ...]``.

    Returns:
        ``[B]``. Costs one backward per output dim per sample: for small problems only.
    """

    def single(x: Tensor) -> Tensor:
        return fn(x.unsqueeze(0)).squeeze(0)

    jac = torch.func.vmap(torch.func.jacrev(single))(inputs)  # [B, A, *input_shape]
    return jac.flatten(1).pow(2).sum(1)


def invariance_penalty(log_prob_perturbed: Tensor, log_prob_clean: Tensor) -> Tensor:
    """Per-sample KL(pi(.|perturbed) || pi(.|clean)), k3-estimated on the rollout's actions (drawn on the perturbed
    frames): ``exp(r) - r - 1``, ``r = log pi(a|clean) - log pi(a|perturbed)``. Exactly 0 where the frames give the
    action the same probability. The clean side is the target: pass it detached, so that the perturbed distribution
    moves toward the clean one and not the other way. It needs only log-probs of whole actions, so it fits token,
    Laplace/Gaussian and flow-chain policies alike."""
    return kl_k3(log_prob_perturbed, log_prob_clean)


def token_invariance_kl(logits_perturbed: Tensor, logits_clean: Tensor) -> Tensor:
    """Per-sample ``sum_slots KL(pi(.|clean) || pi(.|perturbed))`` over the bins of each action slot, from logits
    ``[B, A, n_bins]`` teacher-forced on the same action tokens. The exact form of :func:`invariance_penalty` for
    token policies: its gradient (clean side detached) is the distillation gradient that the k3 estimate has only
    in expectation over sampled actions, without the variance of a whole-action probability ratio."""
    log_p = logits_perturbed.log_softmax(-1)
    log_q = logits_clean.log_softmax(-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1).sum(-1)
