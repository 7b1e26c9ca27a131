"""RobustPPOTrainer: online RL with LoRA plus the RobustVLA penalties, on Accelerate. The loop, read top to bottom:

    for each update:
        collect experience under the training perturbations      (rvla_peft.rollout)
        for each epoch, minibatch, micro-batch:
            losses = compute_losses(policy, rollout, idx, batch)  (rvla_peft.objective: every term, one function)
            backward; average gradients over ranks; clip; step unless non-finite
        log (metrics.jsonl, trackers, callbacks); evaluate and checkpoint every N updates

``algorithm`` picks where the advantages come from:

- ``ppo``: T steps x N envs (:func:`rvla_peft.rollout.collect`), GAE from the value head;
- ``rloo`` / ``grpo``: groups of G whole episodes from one initial state and perturbation draw
  (:func:`rvla_peft.rollout.collect_groups`), each episode's advantage relative to its group, no critic (no value
  loss, the value head out of the optimizer);
- ``distill``: T steps x N envs as ppo, no reward and no critic: the reference's clean-frame actions are the target.

The reference policy (of ``kl_to_base``, the invariance teacher, distillation and the drift probes) is the same model
with the adapter switched off, or with the frozen warm-up adapter when RL starts from one (:meth:`Policy.reference`),
so it costs no second copy of the weights. Saving, rescue and
resume live in :mod:`rvla_peft.checkpointing`, the run's other metrics in :mod:`rvla_peft.metrics`, the
collectives (and why the policy is not wrapped in DDP) in :mod:`rvla_peft.utils.collectives`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from rvla_peft import metrics as run_metrics
from rvla_peft.algorithms.grad_share import grad_share_history, term_grad_norms
from rvla_peft.algorithms.ppo import minibatch_indices, normalize_advantages
from rvla_peft.callbacks import CallbackList, TrainerCallback
from rvla_peft.checkpointing import Checkpointer, rng_state, set_rng_state
from rvla_peft.config import TrainConfig
from rvla_peft.envs import PerturbedEnv, make_envs
from rvla_peft.hub.push import push_training_output
from rvla_peft.objective import compute_losses, make_batch, micro_batches, value_only_loss
from rvla_peft.perturbations import spec_label
from rvla_peft.perturbations.curriculum import Curriculum
from rvla_peft.perturbations.sampler import build_sampler
from rvla_peft.policies.registry import build_policy, resolve_lora
from rvla_peft.rollout import Batch, GroupRollout, Rollout, collect, collect_groups
from rvla_peft.run_folder import resolve_resume
from rvla_peft.stats import explained_variance
from rvla_peft.tracking import check_reporting, init_trackers, log_rollout_clip
from rvla_peft.utils.collectives import average_gradients, broadcast_parameters, rank_max, rank_sum
from rvla_peft.utils.constants import ADAPTER_DIR, METRICS_FILE
from rvla_peft.utils.errors import NonFiniteError, SaveError, TrainingInterrupted
from rvla_peft.utils.threads import torch_threads

__all__ = ["NonFiniteError", "RobustPPOTrainer", "SaveError", "TrainerCallback", "TrainingInterrupted"]


def _detach_inputs(module, args):
    """Forward pre-hook: the module sees its inputs detached (ppo.value_detach_features)."""
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


class RobustPPOTrainer:
    def __init__(
        self, cfg: TrainConfig, accelerator: Accelerator | None = None, callbacks: list[TrainerCallback] | None = None
    ):
        # The saved recipe records the LoRA actually used, family defaults included.
        cfg = dataclasses.replace(cfg, lora=resolve_lora(cfg.policy.family, cfg.lora))
        check_reporting(cfg)  # a tracker or the video writer missing: before anything is built
        self.cfg = cfg
        self.callbacks = CallbackList(callbacks)
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
        value_ids = {id(p) for p in self.policy.value_head.parameters()}
        # Without a critic the value head is neither trained nor given optimizer state.
        self.params = [p for p in self.policy.trainable_parameters() if cfg.uses_critic or id(p) not in value_ids]
        self.value_params = [p for p in self.params if id(p) in value_ids]
        broadcast_parameters(acc, self.params)
        self.optimizer = acc.prepare(torch.optim.AdamW(self.params, lr=cfg.ppo.learning_rate, eps=1e-5))
        if cfg.ppo.value_detach_features and cfg.uses_critic:
            self.policy.value_head.register_forward_pre_hook(_detach_inputs)
        self.policy.freeze_reference()  # before any update: the reference is the policy as built

        # Each rank collects its own experience from different initial states.
        self.env_seed = cfg.seed + 100_003 * acc.process_index
        self.base_env = make_envs(cfg.env, device=acc.device)
        self.train_env = PerturbedEnv(
            self.base_env, cfg.perturb.train, seed=self.env_seed, sample_per_episode=cfg.perturb.sample_per_episode,
            sampler=build_sampler(cfg.perturb, max(len(cfg.perturb.train), 1)),
        )  # fmt: skip
        self.train_env.keep_clean = (
            cfg.regularizers.invariance.weight > 0 or cfg.kl_on_clean_frames or cfg.algorithm == "distill"
        )
        # rollout/success_rate/<label> for each perturb.train entry, where each episode draws one
        self.setting_labels = [spec_label(s) for s in cfg.perturb.train] if self.train_env.sample_per_episode else []
        self.curriculum = Curriculum(cfg.perturb.curriculum)
        self.sample_generator = torch.Generator(device="cpu").manual_seed(self.env_seed)
        # The penalties' own random draws (Hutchinson probes): switching a penalty on or off leaves every rollout
        # and minibatch unchanged, so two arms that differ only in a penalty are paired.
        self.penalty_generator = torch.Generator(device=acc.device).manual_seed(self.env_seed + 1)
        torch.manual_seed(self.env_seed)  # action sampling differs per rank
        self.update_index = 0
        self.start_update = 0
        self.env_steps = 0  # over all ranks
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient, over the run
        self._consecutive_skips = 0
        self._last_success_rate: float | None = None  # fed to the curriculum at the next update
        self.probe: dict | None = None  # frames of the first rollout, for policy/argmax_changed
        self.checkpointer = Checkpointer(acc, self.policy, self.optimizer, cfg, self.run_state)
        self.resumed_from = resolve_resume(cfg)
        if self.resumed_from is not None:
            self.load_checkpoint(self.resumed_from)
        elif acc.is_main_process:
            self.checkpointer.start_fresh()
        self.checkpointer.claim_output_dir()
        init_trackers(acc, cfg, self.start_update)

    # ---------------------------------------------------------------------------------------------------------
    # the loop

    def _restart_episodes(self, update: int) -> dict[str, torch.Tensor]:
        """Restart the envs, scenes rebuilt, from a seed of ``update``: at the start, after an evaluation and after
        a checkpoint. A simulator's state cannot be saved, so this is where a resumed run picks up exactly as the
        uninterrupted run did (the group algorithms then reset from their own seeds, in the rebuilt scenes)."""
        return self.train_env.reset(seed=self.env_seed + update, rebuild=True)

    def train(self, stop: Callable[[], int | None] | None = None) -> dict[str, float]:
        """Run the updates left; ``stop()`` returns a signal number once the run should stop (SIGTERM / Ctrl-C):
        the update in progress finishes, a checkpoint and the adapter are written, :class:`TrainingInterrupted`."""
        cfg, acc = self.cfg, self.accelerator
        obs = self._restart_episodes(self.start_update)
        metrics: dict[str, float] = {}
        bar = tqdm(
            range(self.start_update, cfg.total_updates),
            desc=f"{cfg.algorithm} updates",
            disable=not acc.is_local_main_process,
            initial=self.start_update,
            total=cfg.total_updates,
        )
        self.callbacks.on_train_begin(self)
        for self.update_index in bar:
            start = time.perf_counter()
            # RobustVLA-C: the training perturbations' severity follows the schedule (fed last update's success).
            scale = self.curriculum.scale(self.update_index, self._last_success_rate)
            self.train_env.set_severity_scale(scale)
            self.policy.eval()
            # acting under the updates' autocast: the first minibatch's ratio is 1 under mixed precision too
            with self.policy.acting(), acc.autocast():  # the LoRA folded in while collecting (merge_lora_to_act)
                if cfg.uses_groups:
                    rollout = self.collect_groups()
                else:
                    rollout, obs = collect(self.policy, self.train_env, obs, cfg.ppo.num_steps, cfg.ppo.gamma)
            rollout_s = time.perf_counter() - start
            with torch_threads(cfg.update_threads):  # the cores are the update's now (rollouts keep torch's count)
                metrics = {
                    **run_metrics.rollout_metrics(acc, rollout, self.setting_labels),
                    **self.policy_metrics(rollout),
                }
                self._last_success_rate = metrics.get("rollout/success_rate")
                self.policy.train()
                metrics.update(self.update(rollout))
            update_s = time.perf_counter() - start - rollout_s
            (env_steps,) = rank_sum(acc, [rollout.env_steps])
            self.env_steps += int(env_steps)
            metrics.update(
                {
                    "time/rollout_s": rollout_s,
                    "time/update_s": update_s,
                    "time/env_steps_per_s": env_steps / rollout_s,
                    "time/env_steps": float(self.env_steps),
                    "perturb/severity_scale": scale,
                    **self.train_env.sampler_metrics(),  # this process's episodes (each rank has its own sampler)
                    **run_metrics.env_health(acc, self.base_env),
                }
            )
            step = self.update_index + 1
            restart = False
            if cfg.eval_episodes and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.total_updates:
                metrics.update(self.evaluate())
                restart = True
            if cfg.video_every and step % cfg.video_every == 0:
                log_rollout_clip(acc, rollout, step, self.output_dir)
            self.callbacks.on_update_end(self, step, metrics)
            self.log(metrics, step, bar)  # before the checkpoint: a run resumed from it has this update's line
            checkpoint = None
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.total_updates:
                checkpoint = self.save_checkpoint(step)
                restart = True
            if restart:
                obs = self._restart_episodes(step)
            if checkpoint is not None and cfg.hub.push_checkpoints:
                self.push_to_hub(checkpoint, checkpoint=True)
            signum = int(rank_max(acc, (stop() or 0) if stop is not None else 0))  # the same on every rank
            if signum and step < cfg.total_updates:
                self._interrupt(signum, step, checkpoint)
        if cfg.eval_episodes:
            metrics.update(self.evaluate())
            final = {k: v for k, v in metrics.items() if k.startswith(("eval/", "eval_sampled/"))}
            self.log(final, cfg.total_updates, bar)
        self.save_adapter()
        acc.end_training()
        if cfg.hub.push_to_hub:
            self.push_to_hub(self.output_dir / ADAPTER_DIR)
        self.callbacks.on_train_end(self, metrics)
        return metrics

    def collect_groups(self) -> GroupRollout:
        """This update's groups (rloo / grpo); reset seeds never repeat across updates and rounds of a rank."""
        group, n = self.cfg.group, self.train_env.num_envs
        rounds = math.ceil(group.num_groups / n) + group.max_resample
        return collect_groups(
            self.policy,
            self.train_env,
            group.num_groups,
            group.size,
            seed=self.env_seed + self.update_index * rounds * n,
            max_steps=self.cfg.env.max_episode_steps,
            max_resample=group.max_resample,
            outcome=group.outcome,
            dynamic_sampling=group.dynamic_sampling,
        )

    def policy_metrics(self, rollout: Rollout | GroupRollout) -> dict[str, float]:
        """``policy/kl_to_base``, ``policy/argmax_changed`` / ``argmax_shift`` (on the first rollout's probe frames)
        and ``policy/temperature`` (see :mod:`rvla_peft.metrics`)."""
        metrics = {"policy/temperature": self.cfg.policy.temperature}
        metrics.update(run_metrics.kl_to_reference(self.accelerator, self.policy, rollout, self.cfg))
        if self.cfg.probe_frames:
            if self.probe is None and len(rollout.log_probs.reshape(-1)):
                self.probe = run_metrics.make_probe(rollout, self.cfg.probe_frames)
            if self.probe is not None:
                metrics.update(run_metrics.probe_drift(self.accelerator, self.policy, self.probe))
        return metrics

    # ---------------------------------------------------------------------------------------------------------
    # the update
    def update(self, rollout: Rollout | GroupRollout) -> dict[str, float]:
        cfg, ppo, acc = self.cfg, self.cfg.ppo, self.accelerator
        batch = make_batch(self.policy, rollout, cfg)
        if cfg.uses_critic and self.update_index < ppo.critic_warmup_updates:
            return self._critic_warmup(rollout, batch)
        # Every rank must take the same number of optimizer steps (gradients are all-reduced at each): a group
        # rollout may keep too few samples somewhere, and then no rank updates.
        fewest = acc.gather(torch.tensor([len(batch)], device=acc.device)).min().item()
        if fewest < ppo.num_minibatches:
            return {"ppo/optimizer_steps": 0.0, "ppo/epochs": 0.0}
        advantages = batch.advantages
        if cfg.uses_critic and ppo.norm_adv == "batch":
            advantages = normalize_advantages(advantages)
        history: dict[str, list[torch.Tensor]] = {}
        every = self.cfg.grad_share_every
        measure_update = bool(every) and self.update_index % every == 0
        epochs_run = steps = skipped = 0
        stopped = False
        for epoch in range(ppo.update_epochs):
            epochs_run += 1
            kl_sum, kl_count = torch.zeros((), device=acc.device), 0
            minibatches = minibatch_indices(
                len(batch), ppo.num_minibatches, self.sample_generator, batch.actions.device
            )
            for i, mb in enumerate(minibatches):
                # shares on the first epoch's last minibatch: the old-policy smoothness is 0 until the first step
                measure_shares = measure_update and epoch == 0 and i == len(minibatches) - 1
                adv = advantages[mb]
                # normalised over the whole minibatch, before it is split into micro-batches
                if cfg.uses_critic and ppo.norm_adv == "minibatch" and len(mb) > 1:
                    adv = normalize_advantages(adv)
                loss_values: dict[str, torch.Tensor] = {}  # this minibatch's, for the non-finite check
                for micro in micro_batches(mb, ppo.gradient_accumulation_steps):
                    with acc.autocast():
                        losses = compute_losses(
                            self.policy, rollout, mb[micro], batch, adv[micro], cfg, self.penalty_generator
                        )
                    if measure_shares:  # its first micro-batch, before the backward frees the graph
                        history.update(grad_share_history(term_grad_norms(losses.terms, self.params)))
                        measure_shares = False
                    acc.backward(losses.total * (len(micro) / len(mb)))
                    for k, v in losses.stats.items():
                        history.setdefault(k, []).append(v.detach())
                        if k.startswith("loss/"):
                            loss_values[k] = loss_values.get(k, 0) + v.detach()
                    kl_sum = kl_sum + losses.stats["ppo/approx_kl"].detach().float().to(acc.device) * len(micro)
                    kl_count += len(micro)
                average_gradients(acc, self.params)
                grad_norm = acc.clip_grad_norm_(self.params, ppo.max_grad_norm)
                history.setdefault("ppo/grad_norm", []).append(torch.as_tensor(grad_norm, dtype=torch.float32))
                if self._step_if_finite(grad_norm, loss_values):
                    steps += 1
                else:
                    skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
                if ppo.target_kl is not None:
                    # the running mean over the epoch's samples so far, the same decision on every rank
                    kl = acc.reduce(kl_sum / kl_count, "mean")
                    if kl.item() > ppo.target_kl:
                        stopped = True
                        break
            if stopped:
                break
        metrics = {
            k: acc.reduce(torch.stack(v).float().mean().to(acc.device), "mean").item() for k, v in history.items()
        }
        metrics["ppo/epochs"] = float(epochs_run)
        metrics["ppo/optimizer_steps"] = float(steps)
        metrics["train/skipped_steps"] = float(skipped)
        metrics["ppo/early_stopped"] = float(stopped)
        if cfg.uses_critic:
            metrics["ppo/explained_variance"] = explained_variance(batch.values, batch.returns)
        metrics["ppo/learning_rate"] = ppo.learning_rate
        return metrics

    def _critic_warmup(self, rollout: Rollout, batch: Batch) -> dict[str, float]:
        """Value-only epochs over the rollout with the policy frozen (ppo.critic_warmup_updates)."""
        ppo, acc = self.cfg.ppo, self.accelerator
        value_ids = {id(p) for p in self.value_params}
        frozen = [p for p in self.params if id(p) not in value_ids]
        for p in frozen:  # no graph through the backbone, no gradient, no AdamW step (weight decay included)
            p.requires_grad_(False)
        losses = []
        skipped = 0
        try:
            for _epoch in range(ppo.update_epochs):
                for mb in minibatch_indices(
                    len(batch), ppo.num_minibatches, self.sample_generator, batch.actions.device
                ):
                    loss_values: dict[str, torch.Tensor] = {}
                    for micro in micro_batches(mb, ppo.gradient_accumulation_steps):
                        with acc.autocast():
                            v_loss = value_only_loss(self.policy, rollout, mb[micro], batch, self.cfg)
                        acc.backward(ppo.vf_coef * v_loss * (len(micro) / len(mb)))
                        losses.append(v_loss.detach())
                        loss_values["loss/value"] = loss_values.get("loss/value", 0) + v_loss.detach()
                    average_gradients(acc, self.value_params)
                    grad_norm = acc.clip_grad_norm_(self.value_params, ppo.max_grad_norm)
                    skipped += not self._step_if_finite(grad_norm, loss_values)
                    self.optimizer.zero_grad(set_to_none=True)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        return {
            "loss/value": acc.reduce(torch.stack(losses).float().mean().to(acc.device), "mean").item(),
            "ppo/critic_warmup": 1.0,
            "train/skipped_steps": float(skipped),
            "ppo/explained_variance": explained_variance(batch.values, batch.returns),
            "ppo/learning_rate": ppo.learning_rate,
        }

    def _step_if_finite(self, grad_norm: torch.Tensor | float, loss_values: dict[str, torch.Tensor]) -> bool:
        """``optimizer.step()``, unless a loss term or the gradient norm is not finite on some rank: then the step
        is skipped (the caller zeroes the gradients; weights and optimizer state stay as they were), counted and
        reported with the term; ``max_consecutive_skips`` in a row raise :class:`NonFiniteError`."""
        acc = self.accelerator
        bad = [k for k, v in loss_values.items() if k != "loss/total" and not torch.isfinite(v).all()]
        bad = bad or [k for k, v in loss_values.items() if not torch.isfinite(v).all()]
        finite = not bad and bool(torch.isfinite(torch.as_tensor(grad_norm)).all())
        # any rank's: one rank's non-finite loss reached every rank's gradient through the all-reduce
        self.callbacks.on_before_optimizer_step(self)
        if rank_max(acc, float(not finite)) == 0:
            self.optimizer.step()
            self._consecutive_skips = 0
            self.callbacks.on_optimizer_step(self, True)
            return True
        self.callbacks.on_optimizer_step(self, False)
        self.skipped_steps += 1
        self._consecutive_skips += 1
        term = bad[0] if bad else "gradient norm (a loss on this or another rank)"
        what = f"update {self.update_index + 1}: non-finite {term}"
        if self._consecutive_skips >= self.cfg.max_consecutive_skips:
            raise NonFiniteError(
                f"{what}, {self._consecutive_skips} optimizer steps in a row (max_consecutive_skips="
                f"{self.cfg.max_consecutive_skips}); nothing was saved from them. Lower ppo.learning_rate or the "
                "penalty weights, or check the reward"
            )
        if acc.is_main_process:
            tqdm.write(f"warning: {what}; optimizer step skipped, weights unchanged", file=sys.stderr)
        return False

    # ---------------------------------------------------------------------------------------------------------
    # evaluation and logging

    def evaluate(self) -> dict[str, float]:
        """``eval/<setting>/success_rate`` and ``/return`` on fixed episodes (see :func:`evaluation_metrics`)."""
        self.policy.eval()
        with self.policy.acting():  # merged once for every mode (policy.merge_lora_to_act)
            return run_metrics.evaluation_metrics(
                self.accelerator, self.policy, self.base_env, self.cfg, seed=self.env_seed + 7
            )

    def log(self, metrics: dict[str, float], step: int, bar=None) -> None:
        """Write ``metrics`` of update ``step`` to the trackers and metrics.jsonl, show the main ones on the progress
        bar's line, then call the callbacks' ``on_log``."""
        acc = self.accelerator
        if self.cfg.report_to:
            acc.log(metrics, step=step)
        if acc.is_main_process:
            with open(self.output_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps({"update": step, **metrics}) + "\n")
            (bar or tqdm).write(run_metrics.progress_line(metrics, step, self.cfg.total_updates))
        self.callbacks.on_log(self, step, metrics)

    # ---------------------------------------------------------------------------------------------------------
    # saving, stopping and resuming (rvla_peft.checkpointing)

    def run_state(self, update: int, interrupted: bool = False) -> tuple[dict, dict]:
        """The trainer state at ``update`` (shared by the ranks) and this rank's own (RNG states, probe frames)."""
        trainer_state = {
            "update": update,
            "total_updates": self.cfg.total_updates,
            "interrupted": interrupted,
            "env_steps": self.env_steps,
            "skipped_steps": self.skipped_steps,
            "last_success_rate": self._last_success_rate,
            "curriculum": self.curriculum.state_dict(),
        }
        rank = {"rng": rng_state(self.sample_generator, self.penalty_generator)}
        rank["sampler"] = self.train_env.sampler_state_dict()  # per rank: each chooses from its own episodes
        if self.probe is not None:
            rank["probe"] = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in self.probe.items()}
        return trainer_state, rank

    def checkpoint_dir(self, update: int) -> Path:
        return self.checkpointer.checkpoint_dir(update)

    def save_checkpoint(self, update: int) -> Path:
        directory = self.checkpoint_dir(update)
        self.checkpointer.save_checkpoint(directory, update)
        self.callbacks.on_save(self, directory)
        return directory

    def save_adapter(self, interrupted: bool = False) -> Path:
        update = self.update_index + 1 if interrupted else self.cfg.total_updates
        path = self.checkpointer.save_adapter(update, interrupted)
        self.callbacks.on_save(self, path)
        return path

    def load_checkpoint(self, directory: Path) -> None:
        """Continue from ``directory``: the weights, optimizer, update index, curriculum, counters, and this rank's
        RNG states and probe frames. The next update collects from :meth:`_restart_episodes` as the uninterrupted
        run did, so on the CPU the run continues bit for bit."""
        state, rank = self.checkpointer.load_checkpoint(directory)
        set_rng_state(rank["rng"], self.sample_generator, self.penalty_generator)
        if "sampler" in rank:  # checkpoints written before perturb.sampler existed: uniform, nothing to restore
            self.train_env.load_sampler_state_dict(rank["sampler"])
        if "probe" in rank:
            device = self.accelerator.device
            self.probe = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in rank["probe"].items()}
        self.start_update = self.update_index = int(state["update"])
        self.env_steps = int(state["env_steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._last_success_rate = state.get("last_success_rate")
        self.curriculum.load_state_dict(state["curriculum"])

    def _interrupt(self, signum: int, step: int, checkpoint: Path | None) -> None:
        if checkpoint is None:
            checkpoint = self.save_checkpoint(step)
        adapter = self.save_adapter(interrupted=True)
        self.accelerator.end_training()
        self.train_env.close()  # the run ends here: env workers are shut down now, not at interpreter exit
        raise TrainingInterrupted(signum, step, checkpoint, adapter)

    def push_to_hub(self, directory: Path, checkpoint: bool = False) -> None:
        """Push ``directory`` with its card to ``hub.repo_id`` from the main process (see :mod:`rvla_peft.hub`).

        A checkpoint goes to ``hub.checkpoint_revision`` and a failure there only warns; the final push raises.
        """
        if self.accelerator.is_main_process:
            push_training_output(self.cfg, directory, checkpoint=checkpoint)
        self.accelerator.wait_for_everyone()
