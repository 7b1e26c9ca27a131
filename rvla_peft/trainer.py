"""RobustPPOTrainer: online PPO with LoRA plus the RobustVLA penalties, on Accelerate.

    L = L_PPO + vf_coef * L_value - ent_coef * H + alpha * R_jac + beta * R_smooth

One iteration = collect a rollout under the training perturbations, then ``update_epochs`` passes of minibatch
PPO over it. Read :meth:`RobustPPOTrainer.update` top to bottom for the whole algorithm.

Why the policy is not wrapped by ``accelerator.prepare``: DDP syncs gradients only for calls through its own
``forward`` and does not support double backward (``autograd.grad(create_graph=True)``), which the Jacobian
penalty needs. The trainable parameters (LoRA + value head) are small, so their gradients are averaged across
ranks explicitly with one all-reduce per optimizer step (:meth:`_sync_gradients`); every rank then takes the
same step and the weights stay identical.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from rvla_peft.algorithms.ppo import compute_gae, minibatch_indices, normalize_advantages, policy_loss, value_loss
from rvla_peft.config import TrainConfig, dump_yaml
from rvla_peft.envs import PerturbedEnv, make_envs
from rvla_peft.evaluation import evaluate_grid
from rvla_peft.hub.push import push_training_output
from rvla_peft.perturbations import suite_grid
from rvla_peft.perturbations.curriculum import Curriculum
from rvla_peft.policies.registry import base_model_id, build_policy, resolve_lora
from rvla_peft.regularizers import grad_norm_penalty, hutchinson_jacobian_sq_norm, smoothness_penalty
from rvla_peft.rollout import Rollout, collect
from rvla_peft.stats import explained_variance
from rvla_peft.utils.constants import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    METRICS_FILE,
    OPTIMIZER_FILE,
    RECIPE_FILE,
    TRAINER_STATE,
)
from rvla_peft.utils.io import atomic_save


@dataclass
class _Batch:
    """A rollout flattened to [T*N, ...] samples, with its advantages and returns."""

    actions: torch.Tensor
    log_probs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    means: torch.Tensor

    def __len__(self) -> int:
        return self.actions.shape[0]


@dataclass
class _Losses:
    total: torch.Tensor
    stats: dict[str, torch.Tensor]


class RobustPPOTrainer:
    def __init__(self, cfg: TrainConfig, accelerator: Accelerator | None = None):
        # The saved recipe records the LoRA actually used, family defaults included.
        cfg = dataclasses.replace(cfg, lora=resolve_lora(cfg.policy.family, cfg.lora))
        self.cfg = cfg
        self.accelerator = accelerator or Accelerator(
            cpu=cfg.cpu or not torch.cuda.is_available(),
            mixed_precision=cfg.mixed_precision,
            log_with=cfg.report_to or None,
            project_dir=cfg.output_dir,
        )
        acc = self.accelerator
        set_seed(cfg.seed)  # identical LoRA init on every rank
        self.output_dir = Path(cfg.output_dir)
        # Rank 0 first: under torch.distributed, transformers writes files on rank 0 only, so a built-in model is
        # built there while the other ranks wait, then load it.
        with acc.main_process_first():
            self.policy = build_policy(cfg, device=acc.device)
        self.params = self.policy.trainable_parameters()
        self._broadcast_parameters()
        self.optimizer = acc.prepare(torch.optim.AdamW(self.params, lr=cfg.ppo.learning_rate, eps=1e-5))

        # Each rank collects its own experience from different initial states.
        self.env_seed = cfg.seed + 100_003 * acc.process_index
        self.base_env = make_envs(cfg.env, device=acc.device)
        self.train_env = PerturbedEnv(
            self.base_env, cfg.perturb.train, seed=self.env_seed, sample_per_episode=cfg.perturb.sample_per_episode
        )
        self.curriculum = Curriculum(cfg.perturb.curriculum)
        self.sample_generator = torch.Generator(device="cpu").manual_seed(self.env_seed)
        torch.manual_seed(self.env_seed)  # action sampling differs per rank
        self.update_index = 0
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / RECIPE_FILE).write_text(dump_yaml(cfg))
        if cfg.report_to:
            acc.init_trackers("rvla_peft")

    # ---------------------------------------------------------------------------------------------------------
    # the loop

    def train(self) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        obs = self.train_env.reset(seed=self.env_seed)
        metrics: dict[str, float] = {}
        bar = tqdm(range(cfg.total_updates), desc="PPO updates", disable=not acc.is_local_main_process)
        for self.update_index in bar:
            start = time.perf_counter()
            # RobustVLA-C: the training perturbations' severity follows the schedule (fed last update's success).
            scale = self.curriculum.scale(self.update_index, metrics.get("rollout/success_rate"))
            self.train_env.set_severity_scale(scale)
            self.policy.eval()
            rollout, obs = collect(self.policy, self.train_env, obs, cfg.ppo.num_steps, cfg.ppo.gamma)
            rollout_s = time.perf_counter() - start
            self.policy.train()
            metrics = {**self._rollout_metrics(rollout), **self.update(rollout)}
            update_s = time.perf_counter() - start - rollout_s
            env_steps = rollout.env_steps * acc.num_processes
            metrics.update(
                {
                    "time/rollout_s": rollout_s,
                    "time/update_s": update_s,
                    "time/env_steps_per_s": env_steps / rollout_s,
                    "time/env_steps": float(env_steps * (self.update_index + 1)),
                    "perturb/severity_scale": scale,
                }
            )
            step = self.update_index + 1
            if cfg.eval_episodes and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.total_updates:
                metrics.update(self.evaluate())
                obs = self.train_env.reset(seed=self.env_seed + step)
            checkpoint = None
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.total_updates:
                checkpoint = self.output_dir / CHECKPOINTS_DIR / f"update-{step:06d}"
                self.save_checkpoint(checkpoint)
            self._log(metrics, step, bar)
            if checkpoint is not None and cfg.hub.push_checkpoints:
                self.push_to_hub(checkpoint, checkpoint=True)
        if cfg.eval_episodes:
            metrics.update(self.evaluate())
            self._log({k: v for k, v in metrics.items() if k.startswith("eval/")}, cfg.total_updates, bar)
        self.save_adapter()
        acc.end_training()
        if cfg.hub.push_to_hub:
            self.push_to_hub(self.output_dir / ADAPTER_DIR)
        return metrics

    def _rollout_metrics(self, rollout: Rollout) -> dict[str, float]:
        """Episode outcomes of this rollout, pooled over ranks."""
        ep = rollout.episodes
        sums = torch.stack(
            [ep["success"].sum(), ep["return"].sum(), ep["length"].sum(), torch.tensor(float(len(ep["success"])))]
        ).to(self.accelerator.device)
        sums = self.accelerator.reduce(sums, "sum")
        count = sums[3].item()
        metrics = {
            "rollout/episodes": count,
            "rollout/step_reward": self.accelerator.reduce(rollout.rewards.mean(), "mean").item(),
        }
        if count:
            metrics.update(
                {
                    "rollout/success_rate": sums[0].item() / count,
                    "rollout/return": sums[1].item() / count,
                    "rollout/episode_length": sums[2].item() / count,
                }
            )
        return metrics

    # ---------------------------------------------------------------------------------------------------------
    # PPO update

    def update(self, rollout: Rollout) -> dict[str, float]:
        ppo, acc = self.cfg.ppo, self.accelerator
        advantages, returns = compute_gae(
            rollout.rewards,
            rollout.values,
            rollout.dones,
            rollout.next_value,
            gamma=ppo.gamma,
            gae_lambda=ppo.gae_lambda,
        )
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # [T, N, ...] -> [T*N, ...]
        batch = _Batch(
            flat(rollout.actions), flat(rollout.log_probs), flat(rollout.values), flat(advantages), flat(returns),
            flat(rollout.means),
        )  # fmt: skip
        history: dict[str, list[torch.Tensor]] = {}
        epochs_run = 0
        for _epoch in range(ppo.update_epochs):
            epochs_run += 1
            epoch_kl = []
            for mb in minibatch_indices(len(batch), ppo.num_minibatches, self.sample_generator, batch.actions.device):
                # advantages are normalised over the whole minibatch, before it is split into micro-batches
                adv = (
                    normalize_advantages(batch.advantages[mb])
                    if ppo.norm_adv and len(mb) > 1
                    else batch.advantages[mb]
                )
                for micro in torch.tensor_split(
                    torch.arange(len(mb), device=mb.device), ppo.gradient_accumulation_steps
                ):
                    losses = self._losses(rollout, mb[micro], batch, adv[micro])
                    acc.backward(losses.total / ppo.gradient_accumulation_steps)
                    for k, v in losses.stats.items():
                        history.setdefault(k, []).append(v.detach())
                self._sync_gradients()
                grad_norm = acc.clip_grad_norm_(self.params, ppo.max_grad_norm)
                history.setdefault("ppo/grad_norm", []).append(torch.as_tensor(grad_norm, dtype=torch.float32))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                epoch_kl.append(history["ppo/approx_kl"][-1])
            if ppo.target_kl is not None:
                kl = acc.reduce(torch.stack(epoch_kl).mean().to(acc.device), "mean")  # same decision on every rank
                if kl.item() > ppo.target_kl:
                    break
        metrics = {
            k: acc.reduce(torch.stack(v).float().mean().to(acc.device), "mean").item() for k, v in history.items()
        }
        metrics["ppo/epochs"] = float(epochs_run)
        metrics["ppo/explained_variance"] = explained_variance(batch.values, batch.returns)
        metrics["ppo/learning_rate"] = ppo.learning_rate
        return metrics

    def _losses(self, rollout: Rollout, idx: torch.Tensor, batch: _Batch, adv: torch.Tensor) -> _Losses:
        cfg = self.cfg
        actions, old_log_probs, old_values, returns = (
            batch.actions[idx], batch.log_probs[idx], batch.values[idx], batch.returns[idx]
        )  # fmt: skip
        jac_cfg, smooth_cfg = cfg.regularizers.jacobian, cfg.regularizers.smoothness
        obs = rollout.observations(idx)
        with self.accelerator.autocast():
            out = self.policy.evaluate(obs, actions)
            pg_loss, pg_stats = policy_loss(out.log_prob, old_log_probs, adv, cfg.ppo.clip_coef)
            v_loss = value_loss(out.value, old_values, returns, cfg.ppo.clip_coef if cfg.ppo.clip_vloss else None)
            entropy = out.entropy.mean()
            total = pg_loss + cfg.ppo.vf_coef * v_loss - cfg.ppo.ent_coef * entropy
            stats = {
                "loss/ppo": pg_loss,
                "loss/value": v_loss,
                "loss/entropy": entropy,
                **{f"ppo/{k}": v for k, v in pg_stats.items()},
            }
            if jac_cfg.weight > 0:
                jac = self._jacobian_penalty(obs, actions, idx, jac_cfg)
                total = total + jac_cfg.weight * jac
                stats["loss/jacobian"] = jac
            if smooth_cfg.weight > 0:
                smooth = self._smoothness_penalty(rollout, idx, out.mean, batch.means[idx], smooth_cfg)
                total = total + smooth_cfg.weight * smooth
                stats["loss/smooth"] = smooth
        stats["loss/total"] = total
        return _Losses(total, stats)

    def _subset(self, n: int, fraction: float) -> int:
        return max(1, math.ceil(n * fraction))

    def _jacobian_penalty(self, obs, actions, idx, jac_cfg) -> torch.Tensor:
        k = self._subset(len(idx), jac_cfg.fraction)
        sub = {"rgb": obs["rgb"][:k], "instruction": obs["instruction"][:k]}
        # Double backward through attention needs the math SDPA kernel (flash / CPU-fused kernels have none);
        # only this pass pays for it.
        with sdpa_kernel(SDPBackend.MATH):
            if jac_cfg.form == "hutchinson":
                pixels = self.policy.observation_inputs(sub).detach().requires_grad_(True)
                out = self.policy.evaluate(sub, actions[:k], pixel_values=pixels)
                penalty = hutchinson_jacobian_sq_norm(
                    out.mean, pixels, jac_cfg.num_probes, generator=None, create_graph=True
                )
            else:
                with self.policy.capture_visual_embeddings() as captured:
                    out = self.policy.evaluate(sub, actions[:k])
                penalty = grad_norm_penalty(out.log_prob, captured[0], jac_cfg.g_max, create_graph=True)
        return penalty.mean()

    def _smoothness_penalty(self, rollout, idx, mean, old_means, smooth_cfg) -> torch.Tensor:
        if smooth_cfg.form == "old_policy":
            return smoothness_penalty(mean, old_means.detach())
        # temporal: the current policy's mean at s_t and at s_{t+1} of the same episode (teacher-forced on a_{t+1})
        k = self._subset(len(idx), smooth_cfg.fraction)
        idx, n_envs = idx[:k], rollout.num_envs
        t = idx // n_envs
        valid = (t + 1 < rollout.num_steps) & ~rollout.dones.reshape(-1)[idx]
        next_idx = torch.where(valid, idx + n_envs, idx)  # invalid rows are masked out below
        next_actions = rollout.actions.reshape(-1, *rollout.actions.shape[2:])[next_idx]
        next_mean = self.policy.evaluate(rollout.observations(next_idx), next_actions).mean
        return smoothness_penalty(mean[:k], next_mean, mask=valid)

    def _broadcast_parameters(self) -> None:
        """Start every rank from rank 0's LoRA and value-head weights, as DDP would."""
        if self.accelerator.num_processes == 1:
            return
        for p in self.params:
            torch.distributed.broadcast(p.data, src=0)

    def _sync_gradients(self) -> None:
        """Average the trainable parameters' gradients over ranks (see the module docstring)."""
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), "mean")
        offset = 0
        for p, g in zip(self.params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()

    # ---------------------------------------------------------------------------------------------------------
    # evaluation, logging, saving

    def evaluate(self) -> dict[str, float]:
        """``eval/<setting>/success_rate`` and ``/return``: clean and each ``perturb.eval`` setting, same episodes
        (``rvla_peft.evaluation.evaluate_grid``), averaged over ranks."""
        self.policy.eval()
        settings = suite_grid(self.cfg.perturb.eval_suite, specs=self.cfg.perturb.eval)
        cells = evaluate_grid(
            {"policy": self.policy},
            self.base_env,
            settings,
            self.cfg.eval_episodes,
            seed=self.env_seed + 7,
            max_steps=self.cfg.env.max_episode_steps,
        )
        metrics = {}
        for cell in cells:
            local = torch.tensor(
                [cell.success_rate, sum(cell.returns) / cell.episodes], device=self.accelerator.device
            )
            success_rate, mean_return = self.accelerator.reduce(local, "mean").tolist()
            metrics[f"eval/{cell.setting}/success_rate"] = success_rate
            metrics[f"eval/{cell.setting}/return"] = mean_return
        return metrics

    def _log(self, metrics: dict[str, float], step: int, bar) -> None:
        acc = self.accelerator
        if self.cfg.report_to:
            acc.log(metrics, step=step)
        if not acc.is_main_process:
            return
        with open(self.output_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps({"update": step, **metrics}) + "\n")
        shown = [
            "rollout/success_rate",
            "rollout/return",
            "rollout/step_reward",
            "loss/ppo",
            "loss/value",
            "loss/jacobian",
            "loss/smooth",
            "ppo/approx_kl",
            "ppo/clip_frac",
            "time/env_steps_per_s",
        ]
        line = " ".join(f"{k}={metrics[k]:.4g}" for k in shown if k in metrics)
        line += "".join(f" {k}={v:.3g}" for k, v in metrics.items() if k.startswith("eval/") and k.endswith("rate"))
        bar.write(f"[update {step}/{self.cfg.total_updates}] {line}")

    def save_adapter(self) -> Path:
        """OUTPUT/adapter: the LoRA adapter, the value head beside it, and the resolved recipe."""
        target = self.output_dir / ADAPTER_DIR
        self._save(target, lambda tmp: (tmp / RECIPE_FILE).write_text(dump_yaml(self.cfg)))
        return target

    def save_checkpoint(self, directory: Path) -> None:
        """The adapter and value head plus the optimizer state and the update reached."""

        def extra(tmp: Path) -> None:
            torch.save(self.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            (tmp / TRAINER_STATE).write_text(json.dumps({"update": self.update_index + 1}))

        self._save(directory, extra)

    def push_to_hub(self, directory: Path, checkpoint: bool = False) -> None:
        """Push ``directory`` with its card to ``hub.repo_id`` from the main process (see :mod:`rvla_peft.hub`).

        A checkpoint goes to ``hub.checkpoint_revision`` and a failure there only warns; the final push raises.
        """
        if self.accelerator.is_main_process:
            push_training_output(self.cfg, directory, checkpoint=checkpoint)
        self.accelerator.wait_for_everyone()

    def _save(self, directory: Path, extra) -> None:
        """Write the policy (and ``extra`` files) atomically from the main process; every rank waits for it."""
        if self.accelerator.is_main_process:
            base_id = base_model_id(self.cfg.model)

            def write(tmp: Path) -> None:
                self.policy.save_pretrained(tmp, base_model_id=base_id)
                extra(tmp)

            atomic_save(directory, write)
        self.accelerator.wait_for_everyone()
