"""What a training run logs besides its losses, each pooled over ranks (collective calls: every rank makes them):

- ``rollout/*``: the episodes a rollout finished (success rate, return, length; per training perturbation when
  each episode draws one), plus what the rollout type adds (``Rollout.totals``);
- ``policy/*``: how far the policy has moved from the reference policy (the adapter switched off): the k3 KL on
  the rollout's own samples, and the deterministic actions on a fixed set of probe frames;
- ``eval/*``: success on fixed episodes, clean and under each evaluated perturbation;
- ``env/*``: the health of CPU env workers.
"""

from __future__ import annotations

import torch

from rvla_peft.algorithms.group import kl_k3
from rvla_peft.evaluation import evaluate_grid
from rvla_peft.objective import AnyRollout, reference_log_probs
from rvla_peft.perturbations import suite_grid
from rvla_peft.policies.base import Policy
from rvla_peft.utils.collectives import rank_sum

# A continuous action dimension counts as changed in policy/argmax_changed when its deterministic (normalised) value
# moved by more than one bin of OpenVLA's 256 over [-1, 1]; token actions are compared exactly.
CONTINUOUS_ACTION_CHANGE = 2.0 / 256


def rollout_metrics(accelerator, rollout: AnyRollout, setting_labels: list[str]) -> dict[str, float]:
    """Episode outcomes of this rollout (every collected episode, dropped groups included), pooled over ranks;
    ``rollout/success_rate/<label>`` for each training perturbation that episodes drew (``setting_labels``)."""
    ep = rollout.episodes
    success, ret, length = (ep[k].sum().item() for k in ("success", "return", "length"))
    success, ret, length, count = rank_sum(accelerator, [success, ret, length, len(ep["success"])])
    metrics = {"rollout/episodes": count}
    if count:
        metrics.update(
            {
                "rollout/success_rate": success / count,
                "rollout/return": ret / count,
                "rollout/episode_length": length / count,
            }
        )
    totals = rollout.totals()
    sums = rank_sum(accelerator, [v for pair in totals.values() for v in (pair[0], pair[1] or 0.0)])
    for i, (name, (_, denominator)) in enumerate(totals.items()):
        numerator, count_ = sums[2 * i], sums[2 * i + 1]
        metrics[name] = numerator if denominator is None else numerator / count_
    if setting_labels and "setting" in ep:
        setting, won = ep["setting"], ep["success"]
        per = rank_sum(
            accelerator,
            [
                v
                for i in range(len(setting_labels))
                for v in (won[setting == i].sum().item(), (setting == i).sum().item())
            ],
        )
        for i, label in enumerate(setting_labels):
            if per[2 * i + 1]:
                metrics[f"rollout/success_rate/{label}"] = per[2 * i] / per[2 * i + 1]
    return metrics


def make_probe(rollout: AnyRollout, frames: int) -> dict:
    """``frames`` observations spread evenly over the rollout, kept on the device."""
    n = rollout.log_probs.numel()
    idx = torch.linspace(0, n - 1, min(frames, n)).round().long().unique()
    return rollout.observations(idx.to(rollout.log_probs.device))


@torch.no_grad()
def probe_drift(accelerator, policy: Policy, probe: dict) -> dict[str, float]:
    """The deterministic actions on the probe frames against the reference policy's, averaged over ranks.

    ``policy/argmax_changed``: the share of action dimensions that differ (the argmax token for token policies;
    for continuous ones, a move of the normalised mean by more than one bin of 256 over [-1, 1]); 0 before the
    first optimizer step, since LoRA starts as the identity. ``policy/argmax_shift``: the mean move in bins over
    all dimensions (in 256-bin widths for continuous actions): how far, not only how often."""
    was_training = policy.training
    policy.eval()
    ours = policy.act(probe, deterministic=True)
    with policy.reference():
        base = policy.act(probe, deterministic=True)
    policy.train(was_training)
    if ours.action.is_floating_point():
        shift = (ours.mean.float() - base.mean.float()).abs() / CONTINUOUS_ACTION_CHANGE
        changed = shift > 1
    else:
        shift = (ours.action - base.action).abs().float()
        changed = ours.action != base.action
    local = torch.stack([changed.float().mean(), shift.mean()]).to(accelerator.device)
    share, bins = accelerator.reduce(local, "mean").tolist()
    return {"policy/argmax_changed": share, "policy/argmax_shift": bins}


def kl_to_reference(accelerator, policy: Policy, rollout: AnyRollout, cfg) -> dict[str, float]:
    """``policy/kl_to_base``: the k3 estimate of KL(pi || pi_ref) on the rollout's own samples, i.e. of the policy
    that collected it, pooled over ranks."""
    ref = reference_log_probs(policy, rollout, cfg).reshape(-1)
    kl = kl_k3(rollout.log_probs.reshape(-1).float(), ref)
    total, count = rank_sum(accelerator, [kl.sum().item(), kl.numel()])
    return {"policy/kl_to_base": total / count} if count else {}


def evaluation_metrics(accelerator, policy: Policy, env, cfg, seed: int) -> dict[str, float]:
    """``eval/<setting>/success_rate`` and ``/return``: clean and each ``perturb.eval`` / ``perturb.eval_suite``
    setting, the same episodes for every setting (``rvla_peft.evaluation.evaluate_grid``), argmax actions, averaged
    over ranks; with ``eval_sampled`` also ``eval_sampled/...``: the same episodes with sampled actions, the policy
    that RL optimises."""
    settings = suite_grid(cfg.perturb.eval_suite, specs=cfg.perturb.eval)
    modes = [("eval", True)] + ([("eval_sampled", False)] if cfg.eval_sampled else [])
    metrics = {}
    for prefix, deterministic in modes:
        cells = evaluate_grid(
            {"policy": policy},
            env,
            settings,
            cfg.eval_episodes,
            seed=seed,
            max_steps=cfg.env.max_episode_steps,
            deterministic=deterministic,
        )
        for cell in cells:
            local = torch.tensor([cell.success_rate, sum(cell.returns) / cell.episodes], device=accelerator.device)
            success_rate, mean_return = accelerator.reduce(local, "mean").tolist()
            metrics[f"{prefix}/{cell.setting}/success_rate"] = success_rate
            metrics[f"{prefix}/{cell.setting}/return"] = mean_return
    return metrics


def env_health(accelerator, env) -> dict[str, float]:
    """``env/dropped_episodes`` and ``env/worker_restarts`` so far, over ranks (CPU async envs restart workers
    that die; an episode they cut short is dropped from training, not counted as a failure)."""
    if not hasattr(env, "worker_restarts"):
        return {}
    dropped, restarts = rank_sum(accelerator, [env.dropped_episodes, env.worker_restarts])
    return {"env/dropped_episodes": dropped, "env/worker_restarts": restarts}


# shown on the progress bar's line after each update (everything goes to metrics.jsonl and the trackers)
SHOWN_METRICS = (
    "rollout/success_rate", "rollout/return", "rollout/step_reward", "loss/ppo", "loss/value", "loss/jacobian",
    "loss/smooth", "loss/invariance", "loss/distill", "ppo/approx_kl", "ppo/clip_frac", "policy/kl_to_base",
    "policy/argmax_changed", "groups/kept_frac", "time/env_steps_per_s",
)  # fmt: skip


def progress_line(metrics: dict[str, float], update: int, total_updates: int) -> str:
    """One line per update for the terminal: the main metrics, then every evaluated success rate."""
    line = " ".join(f"{k}={metrics[k]:.4g}" for k in SHOWN_METRICS if k in metrics)
    line += "".join(
        f" {k}={v:.3g}" for k, v in metrics.items() if k.startswith(("eval/", "eval_sampled/")) and k.endswith("rate")
    )
    return f"[update {update}/{total_updates}] {line}"
