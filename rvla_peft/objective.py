"""The training objective: one minibatch of a rollout -> every loss term, as a pure function of the batch, the
policy and the config (no trainer, no optimizer, no ranks).

    L = L_clip + vf_coef * L_value - ent_coef * H + kl_to_base * KL(pi || pi_ref)
        + alpha * R_jac + beta * R_smooth + lambda * R_inv

- ``L_clip``: PPO's clipped surrogate on the batch's advantages (GAE for ``ppo``, group-relative for ``rloo`` /
  ``grpo``); ``L_value``: the value loss, only where there is a critic. ``distill`` replaces both by
  KL(pi_ref(.|clean) || pi(.|perturbed)) on every sample: no reward.
- ``KL(pi || pi_ref)``: k3 estimate against the reference policy (:meth:`Policy.reference`: the adapter switched
  off), on the frames acted on or on the clean frames of the same steps (``kl_to_base_frames``).
- ``R_jac``: Hutchinson estimate of ||d mu / d pixels||_F^2 (or the paper's clipped gradient norm of log pi with
  respect to the visual embeddings); ``R_smooth``: ||mu - mu_old||^2 (or between consecutive steps);
  ``R_inv``: the policy on perturbed frames against the same actions on clean frames (see
  :mod:`rvla_peft.regularizers`).

:func:`compute_losses` returns the weighted terms that sum to the total, so a caller can also take each term's
gradient share. Run it under the run's autocast.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from rvla_peft.algorithms.group import kl_k3
from rvla_peft.algorithms.ppo import policy_loss, value_loss
from rvla_peft.config import TrainConfig
from rvla_peft.policies.base import Policy, PolicyOutput
from rvla_peft.regularizers import (
    grad_norm_penalty,
    hutchinson_jacobian_sq_norm,
    invariance_penalty,
    smoothness_penalty,
    token_invariance_kl,
)
from rvla_peft.rollout import Batch, GroupRollout, Rollout

AnyRollout = Rollout | GroupRollout


@dataclass
class Losses:
    total: Tensor
    stats: dict[str, Tensor]  # loss/<term> (unweighted) and ppo/<statistic>, for the logs
    terms: dict[str, Tensor]  # the weighted terms that sum to ``total`` (policy, value, kl_to_base, ...)


def subset_size(n: int, fraction: float) -> int:
    """How many samples of a minibatch of ``n`` a penalty computed on ``fraction`` of it uses (at least one)."""
    return max(1, math.ceil(n * fraction))


def micro_batches(minibatch: Tensor, accumulation_steps: int) -> list[Tensor]:
    """Positions in ``minibatch`` of each micro-batch (never an empty one)."""
    parts = min(accumulation_steps, len(minibatch))
    return list(torch.tensor_split(torch.arange(len(minibatch), device=minibatch.device), parts))


@torch.no_grad()
def reference_log_probs(policy: Policy, rollout: AnyRollout, cfg: TrainConfig, clean: bool = False) -> Tensor:
    """Log-probs of the rollout's actions under the reference policy, on the frames the policy saw or (``clean``)
    on the clean frames of the same steps, in the rollout's shape; computed once per rollout and kept on it."""
    key = "ref_log_probs_clean" if clean else "ref_log_probs"
    if getattr(rollout, key) is None:
        actions = rollout.flat(rollout.actions)
        observations = rollout.clean_observations if clean else rollout.observations
        n = actions.shape[0]
        size = max(1, math.ceil(n / (cfg.ppo.num_minibatches * cfg.ppo.gradient_accumulation_steps)))
        was_training = policy.training
        policy.eval()
        out = []
        with policy.reference():
            for idx in torch.arange(n, device=actions.device).split(size) if n else ():
                out.append(policy.evaluate(observations(idx), actions[idx]).log_prob.float())
        policy.train(was_training)
        flat = torch.cat(out) if out else actions.new_zeros(0, dtype=torch.float32)
        setattr(rollout, key, flat.reshape(rollout.log_probs.shape))
    return getattr(rollout, key)


def make_batch(policy: Policy, rollout: AnyRollout, cfg: TrainConfig) -> Batch:
    """The rollout as samples with their advantages, and the reference log-probs when ``kl_to_base`` is on."""
    ref = reference_log_probs(policy, rollout, cfg, clean=cfg.kl_on_clean_frames) if cfg.kl_to_base > 0 else None
    return rollout.to_batch(cfg, ref)


def compute_losses(
    policy: Policy,
    rollout: AnyRollout,
    idx: Tensor,
    batch: Batch,
    advantages: Tensor,
    cfg: TrainConfig,
    generator: torch.Generator | None = None,
) -> Losses:
    """Every loss term on the samples ``idx`` of ``batch`` (``advantages``: theirs, normalised as configured).
    ``generator`` draws the Hutchinson probes, so switching a penalty on leaves every other random draw unchanged."""
    actions, old_log_probs = batch.actions[idx], batch.log_probs[idx]
    reg = cfg.regularizers
    obs = rollout.observations(idx)
    out = policy.evaluate(obs, actions)
    pg_loss, pg_stats = policy_loss(out.log_prob, old_log_probs, advantages, cfg.ppo.clip_coef)
    entropy = out.entropy.mean()
    stats = {"loss/ppo": pg_loss, "loss/entropy": entropy, **{f"ppo/{k}": v for k, v in pg_stats.items()}}
    if cfg.algorithm == "distill":  # no reward: the reference's clean-frame actions are the target
        distill = distill_term(policy, rollout, idx, actions, out)
        terms = {"distill": distill}
        del stats["loss/ppo"]  # not a term here; ppo/approx_kl and ppo/clip_frac still say how far the step went
        stats["loss/distill"] = distill
    else:
        terms = {"policy": pg_loss - cfg.ppo.ent_coef * entropy}
    if cfg.uses_critic:
        v_loss = value_loss(out.value, batch.values[idx], batch.returns[idx], cfg.ppo.value_clip_range)
        terms["value"] = cfg.ppo.vf_coef * v_loss
        stats["loss/value"] = v_loss
    if cfg.kl_to_base > 0:
        on_reference_frames = out
        if cfg.kl_on_clean_frames:  # the same actions on the clean frames: one more forward pass
            on_reference_frames = policy.evaluate(rollout.clean_observations(idx), actions)
        kl = kl_k3(on_reference_frames.log_prob, batch.ref_log_probs[idx]).mean()
        terms["kl_to_base"] = cfg.kl_to_base * kl
        stats["loss/kl_to_base"] = kl
    if reg.jacobian.weight > 0:
        jac = jacobian_penalty(policy, obs, actions, reg.jacobian, generator)
        terms["jacobian"] = reg.jacobian.weight * jac
        stats["loss/jacobian"] = jac
    if reg.smoothness.weight > 0:
        smooth = smoothness_term(policy, rollout, idx, out.mean, batch, reg.smoothness)
        terms["smooth"] = reg.smoothness.weight * smooth
        stats["loss/smooth"] = smooth
    if reg.invariance.weight > 0:
        inv = invariance_term(policy, rollout, idx, actions, out, reg.invariance)
        terms["invariance"] = reg.invariance.weight * inv
        stats["loss/invariance"] = inv
    total = sum(terms.values())  # in this order: the same bits as adding them one by one
    stats["loss/total"] = total
    return Losses(total, stats, terms)


def value_only_loss(policy: Policy, rollout: Rollout, idx: Tensor, batch: Batch, cfg: TrainConfig) -> Tensor:
    """The value loss alone (``ppo.critic_warmup_updates``: the critic trains while the policy is frozen)."""
    out = policy.evaluate(rollout.observations(idx), batch.actions[idx])
    return value_loss(out.value, batch.values[idx], batch.returns[idx], cfg.ppo.value_clip_range)


def jacobian_penalty(policy: Policy, obs: dict, actions: Tensor, jac_cfg, generator=None) -> Tensor:
    """R_jac on the first ``fraction`` of the samples: Hutchinson's ||d mu / d pixels||_F^2, or the paper's
    min(||d log pi / d visual embeddings||^2, g_max)."""
    k = subset_size(len(actions), jac_cfg.fraction)
    sub = {"rgb": obs["rgb"][:k], "instruction": obs["instruction"][:k]}
    # Double backward through attention needs the math SDPA kernel (flash / CPU-fused kernels have none);
    # only this pass pays for it.
    with sdpa_kernel(SDPBackend.MATH):
        if jac_cfg.form == "hutchinson":
            pixels = policy.observation_inputs(sub).detach().requires_grad_(True)
            out = policy.evaluate(sub, actions[:k], pixel_values=pixels)
            penalty = hutchinson_jacobian_sq_norm(
                out.mean, pixels, jac_cfg.num_probes, generator=generator, create_graph=True
            )
        else:
            with policy.capture_visual_embeddings() as captured:
                out = policy.evaluate(sub, actions[:k])
            penalty = grad_norm_penalty(out.log_prob, captured[0], jac_cfg.g_max, create_graph=True)
    return penalty.mean()


def invariance_term(
    policy: Policy, rollout: AnyRollout, idx: Tensor, actions: Tensor, out: PolicyOutput, inv_cfg
) -> Tensor:
    """The policy on the perturbed frames (``out``, with gradient) against the same actions on the clean frames of
    the same steps (no gradient: the target; the reference policy's with ``target: base``), on a share of the
    minibatch."""
    k = subset_size(len(idx), inv_cfg.fraction)
    teacher = policy.reference() if inv_cfg.target == "base" else contextlib.nullcontext()
    with torch.no_grad(), teacher:
        clean = policy.evaluate(rollout.clean_observations(idx[:k]), actions[:k])
    if inv_cfg.form == "exact":
        return token_invariance_kl(out.logits[:k], clean.logits).mean()
    return invariance_penalty(out.log_prob[:k], clean.log_prob).mean()


def distill_term(policy: Policy, rollout: Rollout, idx: Tensor, actions: Tensor, out: PolicyOutput) -> Tensor:
    """On-policy distillation (``algorithm: distill``), on every sample: token policies, the exact per-slot
    KL(pi_ref(.|clean) || pi(.|perturbed)) over all bins, teacher-forced on the rollout's tokens; continuous
    families, the k3 estimate of KL(pi(.|perturbed) || pi_ref(.|clean)) on the rollout's actions (drawn by the
    policy on the perturbed frame)."""
    with torch.no_grad(), policy.reference():
        teacher = policy.evaluate(rollout.clean_observations(idx), actions)
    if out.logits is not None:
        return token_invariance_kl(out.logits, teacher.logits).mean()
    return invariance_penalty(out.log_prob, teacher.log_prob).mean()


def smoothness_term(
    policy: Policy, rollout: AnyRollout, idx: Tensor, mean: Tensor, batch: Batch, smooth_cfg
) -> Tensor:
    """R_smooth: the mean action against the behaviour policy's at the same state (``old_policy``), or against the
    current policy's at the episode's next state (``temporal``, teacher-forced on a_{t+1})."""
    if smooth_cfg.form == "old_policy":
        return smoothness_penalty(mean, batch.means[idx].detach())
    k = subset_size(len(idx), smooth_cfg.fraction)
    next_idx, valid = rollout.next_indices(idx[:k])  # invalid rows point at themselves and are masked out
    next_mean = policy.evaluate(rollout.observations(next_idx), batch.actions[next_idx]).mean
    return smoothness_penalty(mean[:k], next_mean, mask=valid)
