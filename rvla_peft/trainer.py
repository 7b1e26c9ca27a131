"""RobustPPOTrainer: online RL with LoRA plus the RobustVLA penalties, on Accelerate.

    L = L_clip + vf_coef * L_value - ent_coef * H + kl_to_base * KL(pi || pi_base) + alpha * R_jac + beta * R_smooth

One iteration = collect experience under the training perturbations, then ``update_epochs`` passes of minibatch
clipped-surrogate optimisation over it. ``algorithm`` picks where the advantages come from:

- ``ppo``: T steps x N envs (:func:`rvla_peft.rollout.collect`), GAE from the value head;
- ``rloo`` / ``grpo``: groups of G whole episodes from one initial state and perturbation draw
  (:func:`rvla_peft.rollout.collect_groups`), each episode's advantage relative to its group, no critic (no value
  loss, the value head out of the optimizer).

The base policy (the reference of ``kl_to_base`` and of the ``policy/argmax_changed`` probe) is the same model with
the adapter switched off (``peft_model.disable_adapter()``), so it costs no second copy of the weights. Read
:meth:`RobustPPOTrainer.update` top to bottom for the whole algorithm.

Why the policy is not wrapped by ``accelerator.prepare``: DDP syncs gradients only for calls through its own
``forward`` and does not support double backward (``autograd.grad(create_graph=True)``), which the Jacobian
penalty needs. The trainable parameters (LoRA + value head) are small, so their gradients are averaged across
ranks explicitly with one all-reduce per optimizer step (:meth:`_sync_gradients`); every rank then takes the
same step and the weights stay identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from rvla_peft.algorithms.grad_share import grad_shares, term_grad_norms
from rvla_peft.algorithms.group import group_advantages, kl_k3
from rvla_peft.algorithms.ppo import compute_gae, minibatch_indices, normalize_advantages, policy_loss, value_loss
from rvla_peft.config import ConfigError, TrainConfig, dump_yaml
from rvla_peft.envs import PerturbedEnv, make_envs
from rvla_peft.evaluation import evaluate_grid
from rvla_peft.hub.push import push_training_output
from rvla_peft.perturbations import spec_label, suite_grid
from rvla_peft.perturbations.curriculum import Curriculum
from rvla_peft.policies.registry import base_model_id, build_policy, resolve_lora
from rvla_peft.regularizers import (
    grad_norm_penalty,
    hutchinson_jacobian_sq_norm,
    invariance_penalty,
    smoothness_penalty,
    token_invariance_kl,
)
from rvla_peft.rollout import GroupRollout, Rollout, collect, collect_groups
from rvla_peft.run_folder import (
    adapter_fingerprint,
    check_output_dir,
    check_resume_recipe,
    checkpoint_name,
    checkpoints,
    read_trainer_state,
    resolve_resume,
)
from rvla_peft.stats import explained_variance
from rvla_peft.utils.constants import (
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    CHECKPOINTS_DIR,
    METRICS_FILE,
    OPTIMIZER_FILE,
    RANK_STATES_FILE,
    RECIPE_FILE,
    TENSORBOARD_RUN,
    TRAINER_STATE,
    VALUE_HEAD_FILE,
)
from rvla_peft.utils.io import atomic_save, atomic_write_text
from rvla_peft.utils.threads import torch_threads

# A continuous action dimension counts as changed in policy/argmax_changed when its deterministic (normalised) value
# moved by more than one bin of OpenVLA's 256 over [-1, 1]; token actions are compared exactly.
CONTINUOUS_ACTION_CHANGE = 2.0 / 256


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT stopped the run after an update; the checkpoint and the (interrupted) adapter are written."""

    def __init__(self, signum: int, update: int, checkpoint: Path, adapter: Path) -> None:
        self.signum, self.update, self.checkpoint, self.adapter = signum, update, checkpoint, adapter
        super().__init__(f"stopped at update {update}; checkpoint {checkpoint}, adapter {adapter}")


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient, or a weight is not finite."""


class SaveError(RuntimeError):
    """The adapter could not be written; the message says where the trained state went instead."""


class _SaveFailed(Exception):
    """Raised on every rank when the main process could not write a folder (``error``: its OSError, rank 0 only)."""

    def __init__(self, error: OSError | None) -> None:
        self.error = error
        super().__init__(str(error) if error else "the main process could not write")


def _rng_state(*generators: torch.Generator) -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, *generators: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    for g, saved in zip(generators, state["generators"], strict=True):
        g.set_state(saved)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _detach_inputs(module, args):
    """Forward pre-hook: the module sees its inputs detached (ppo.value_detach_features)."""
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


@dataclass
class _Batch:
    """A rollout flattened to samples ([T*N, ...] for PPO, [S, ...] for groups), with its advantages."""

    actions: torch.Tensor
    log_probs: torch.Tensor
    values: torch.Tensor | None  # None without a critic
    advantages: torch.Tensor
    returns: torch.Tensor | None
    means: torch.Tensor
    ref_log_probs: torch.Tensor | None  # base's log-probs of the actions (kl_to_base > 0), on the kl_to_base_frames

    def __len__(self) -> int:
        return self.actions.shape[0]


@dataclass
class _Losses:
    total: torch.Tensor
    stats: dict[str, torch.Tensor]
    terms: dict[str, torch.Tensor]  # the weighted terms that sum to ``total`` (policy, value, kl_to_base, ...)


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
        self.critic_free = cfg.algorithm != "ppo"
        value_ids = {id(p) for p in self.policy.value_head.parameters()}
        trainable = self.policy.trainable_parameters()
        # Without a critic the value head is neither trained nor given optimizer state.
        self.params = [p for p in trainable if not (self.critic_free and id(p) in value_ids)]
        self.value_params = [p for p in self.params if id(p) in value_ids]
        self._broadcast_parameters()
        self.optimizer = acc.prepare(torch.optim.AdamW(self.params, lr=cfg.ppo.learning_rate, eps=1e-5))
        if cfg.ppo.value_detach_features and not self.critic_free:
            self.policy.value_head.register_forward_pre_hook(_detach_inputs)
        # The base policy is the adapter switched off, plus the initial values of any other trained weights (the
        # OpenVLA-OFT action and scale heads), swapped in while it is used.
        self._base_weights = {
            name: p.detach().clone()
            for name, p in self.policy.named_parameters()
            if p.requires_grad and "lora_" not in name and id(p) not in value_ids
        }

        # Each rank collects its own experience from different initial states.
        self.env_seed = cfg.seed + 100_003 * acc.process_index
        self.base_env = make_envs(cfg.env, device=acc.device)
        self.train_env = PerturbedEnv(
            self.base_env, cfg.perturb.train, seed=self.env_seed, sample_per_episode=cfg.perturb.sample_per_episode
        )
        self.train_env.keep_clean = cfg.regularizers.invariance.weight > 0 or self._kl_on_clean_frames
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
        self.resumed_from = resolve_resume(cfg)
        if self.resumed_from is not None:
            self.load_checkpoint(self.resumed_from)
        elif acc.is_main_process:
            self._start_fresh()
        # An adapter in the folder now is this run's own (an interrupted adapter it resumes) or one allowed by
        # overwrite_output_dir; one that appears later was written by another run (checked again at the end).
        self._adapter_at_start = adapter_fingerprint(self.output_dir)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output_dir / RECIPE_FILE, dump_yaml(cfg))
        if cfg.report_to:
            # TensorBoard continues a resumed run in the same folder, hiding what was logged after the checkpoint.
            kwargs = {"tensorboard": {"purge_step": self.start_update + 1}} if self.start_update else {}
            acc.init_trackers(TENSORBOARD_RUN, init_kwargs=kwargs)

    def _start_fresh(self) -> None:
        """A new run owns its folder: the logs and checkpoints of a run it replaces (overwrite_output_dir, or one
        killed before its first checkpoint) are removed, so metrics never interleave and ``latest`` is ours."""
        (self.output_dir / METRICS_FILE).unlink(missing_ok=True)
        for folder in (CHECKPOINTS_DIR, TENSORBOARD_RUN):
            shutil.rmtree(self.output_dir / folder, ignore_errors=True)

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
        for self.update_index in bar:
            start = time.perf_counter()
            # RobustVLA-C: the training perturbations' severity follows the schedule (fed last update's success).
            scale = self.curriculum.scale(self.update_index, self._last_success_rate)
            self.train_env.set_severity_scale(scale)
            self.policy.eval()
            # acting under the updates' autocast: the first minibatch's ratio is 1 under mixed precision too
            with self.policy.acting(), acc.autocast():  # the LoRA folded in while collecting (merge_lora_to_act)
                if self.critic_free:
                    rollout = self.collect_groups()
                else:
                    rollout, obs = collect(self.policy, self.train_env, obs, cfg.ppo.num_steps, cfg.ppo.gamma)
            rollout_s = time.perf_counter() - start
            with torch_threads(cfg.update_threads):  # the cores are the update's now (rollouts keep torch's count)
                metrics = {**self._rollout_metrics(rollout), **self.policy_metrics(rollout)}
                self._last_success_rate = metrics.get("rollout/success_rate")
                self.policy.train()
                metrics.update(self.update(rollout))
            update_s = time.perf_counter() - start - rollout_s
            env_steps = acc.reduce(torch.tensor(float(rollout.env_steps), device=acc.device), "sum").item()
            self.env_steps += int(env_steps)
            metrics.update(
                {
                    "time/rollout_s": rollout_s,
                    "time/update_s": update_s,
                    "time/env_steps_per_s": env_steps / rollout_s,
                    "time/env_steps": float(self.env_steps),
                    "perturb/severity_scale": scale,
                    **self._env_health(),
                }
            )
            step = self.update_index + 1
            restart = False
            if cfg.eval_episodes and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.total_updates:
                metrics.update(self.evaluate())
                restart = True
            self._log(metrics, step, bar)  # before the checkpoint: a run resumed from it has this update's line
            checkpoint = None
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.total_updates:
                checkpoint = self.checkpoint_dir(step)
                self.save_checkpoint(checkpoint)
                restart = True
            if restart:
                obs = self._restart_episodes(step)
            if checkpoint is not None and cfg.hub.push_checkpoints:
                self.push_to_hub(checkpoint, checkpoint=True)
            signum = self._stop_signal(stop)
            if signum and step < cfg.total_updates:
                self._interrupt(signum, step, checkpoint)
        if cfg.eval_episodes:
            metrics.update(self.evaluate())
            final = {k: v for k, v in metrics.items() if k.startswith(("eval/", "eval_sampled/"))}
            self._log(final, cfg.total_updates, bar)
        self.save_adapter()
        acc.end_training()
        if cfg.hub.push_to_hub:
            self.push_to_hub(self.output_dir / ADAPTER_DIR)
        return metrics

    def _env_health(self) -> dict[str, float]:
        """``env/dropped_episodes`` and ``env/worker_restarts`` so far, over ranks (CPU async envs restart workers
        that die; an episode they cut short is dropped from training, not counted as a failure)."""
        if not hasattr(self.base_env, "worker_restarts"):
            return {}
        local = torch.tensor([float(self.base_env.dropped_episodes), float(self.base_env.worker_restarts)])
        dropped, restarts = self.accelerator.reduce(local.to(self.accelerator.device), "sum").tolist()
        return {"env/dropped_episodes": dropped, "env/worker_restarts": restarts}

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

    def _rollout_metrics(self, rollout: Rollout | GroupRollout) -> dict[str, float]:
        """Episode outcomes of this rollout (every collected episode, dropped groups included), pooled over ranks."""
        acc = self.accelerator
        ep = rollout.episodes
        count = torch.tensor(float(len(ep["success"])))
        sums = torch.stack(
            [x.to(acc.device) for x in (ep["success"].sum(), ep["return"].sum(), ep["length"].sum(), count)]
        )
        sums = acc.reduce(sums, "sum")
        count = sums[3].item()
        metrics = {"rollout/episodes": count}
        if isinstance(rollout, Rollout):
            metrics["rollout/step_reward"] = acc.reduce(rollout.rewards.mean(), "mean").item()
        if count:
            metrics.update(
                {
                    "rollout/success_rate": sums[0].item() / count,
                    "rollout/return": sums[1].item() / count,
                    "rollout/episode_length": sums[2].item() / count,
                }
            )
        if self.setting_labels and "setting" in ep:  # success per training perturbation
            setting, success = ep["setting"].to(acc.device), ep["success"].to(acc.device)
            per = torch.stack(
                [
                    torch.stack([success[setting == i].sum(), (setting == i).sum().float()])
                    for i in range(len(self.setting_labels))
                ]
            )
            per = acc.reduce(per, "sum")
            for label, (wins, n) in zip(self.setting_labels, per.tolist(), strict=True):
                if n:
                    metrics[f"rollout/success_rate/{label}"] = wins / n
        if isinstance(rollout, GroupRollout):
            counts = torch.tensor(
                [float(rollout.groups_kept), float(rollout.groups_collected), float(len(rollout))], device=acc.device
            )
            kept, collected, samples = acc.reduce(counts, "sum").tolist()
            metrics.update(
                {"groups/kept_frac": kept / collected, "groups/kept": kept, "groups/collected": collected,
                 "groups/samples": samples}
            )  # fmt: skip
        return metrics

    # ---------------------------------------------------------------------------------------------------------
    # drift from the base policy

    @contextlib.contextmanager
    def base_policy(self) -> Iterator[None]:
        """Inside the block, ``self.policy`` is the base policy: the adapter switched off (no second copy of the
        model) and any other trained weights (OpenVLA-OFT's heads) at their initial values."""
        params = dict(self.policy.named_parameters())
        current = {name: params[name].data for name in self._base_weights}
        with self.policy.peft_model.disable_adapter():
            try:
                for name, initial in self._base_weights.items():
                    params[name].data = initial
                yield
            finally:
                for name, data in current.items():
                    params[name].data = data

    @property
    def _kl_on_clean_frames(self) -> bool:
        return self.cfg.kl_to_base > 0 and self.cfg.kl_to_base_frames == "clean"

    @torch.no_grad()
    def reference_log_probs(self, rollout: Rollout | GroupRollout, clean: bool = False) -> torch.Tensor:
        """Log-probs of the rollout's actions under the base policy, on the frames the policy saw or (``clean``) on
        the clean frames of the same steps; computed once per rollout and kept on it."""
        key = "ref_log_probs_clean" if clean else "ref_log_probs"
        if getattr(rollout, key) is None:
            actions = self._flat(rollout, rollout.actions)
            observations = rollout.clean_observations if clean else rollout.observations
            n = actions.shape[0]
            ppo = self.cfg.ppo
            size = max(1, math.ceil(n / (ppo.num_minibatches * ppo.gradient_accumulation_steps)))
            was_training = self.policy.training
            self.policy.eval()
            out = []
            with self.base_policy():
                for idx in torch.arange(n, device=actions.device).split(size) if n else ():
                    out.append(self.policy.evaluate(observations(idx), actions[idx]).log_prob.float())
            self.policy.train(was_training)
            flat = torch.cat(out) if out else actions.new_zeros(0, dtype=torch.float32)
            setattr(rollout, key, flat.reshape(rollout.log_probs.shape))
        return getattr(rollout, key)

    def policy_metrics(self, rollout: Rollout | GroupRollout) -> dict[str, float]:
        """``policy/kl_to_base`` (the k3 estimate of KL(pi || pi_base) on the rollout's own samples, i.e. of the
        policy that collected it), ``policy/argmax_changed`` (on the probe frames) and ``policy/temperature``."""
        acc = self.accelerator
        metrics = {"policy/temperature": self.cfg.policy.temperature}
        ref = self.reference_log_probs(rollout).reshape(-1)
        kl = kl_k3(rollout.log_probs.reshape(-1).float(), ref)
        local = torch.stack([kl.sum().to(acc.device), torch.tensor(float(kl.numel()), device=acc.device)])
        total, count = acc.reduce(local, "sum")
        if count.item():
            metrics["policy/kl_to_base"] = (total / count).item()
        if self.cfg.probe_frames:
            if self.probe is None and len(rollout.log_probs.reshape(-1)):
                self.probe = self.make_probe(rollout)
            if self.probe is not None:
                metrics.update(self.probe_drift())
        return metrics

    def make_probe(self, rollout: Rollout | GroupRollout) -> dict:
        """``probe_frames`` observations spread evenly over the rollout, kept on the device."""
        n = rollout.log_probs.numel()
        idx = torch.linspace(0, n - 1, min(self.cfg.probe_frames, n)).round().long().unique()
        return rollout.observations(idx.to(rollout.log_probs.device))

    @torch.no_grad()
    def probe_drift(self, probe: dict | None = None) -> dict[str, float]:
        """The deterministic actions on the probe frames against the base policy's, averaged over ranks.

        ``policy/argmax_changed``: the share of action dimensions that differ (the argmax token for token policies;
        for continuous ones, a move of the normalised mean by more than one bin of 256 over [-1, 1]); 0 before the
        first optimizer step, since LoRA starts as the identity. ``policy/argmax_shift``: the mean move in bins over
        all dimensions (in 256-bin widths for continuous actions): how far, not only how often."""
        probe = self.probe if probe is None else probe
        was_training = self.policy.training
        self.policy.eval()
        ours = self.policy.act(probe, deterministic=True)
        with self.base_policy():
            base = self.policy.act(probe, deterministic=True)
        self.policy.train(was_training)
        if ours.action.is_floating_point():
            shift = (ours.mean.float() - base.mean.float()).abs() / CONTINUOUS_ACTION_CHANGE
            changed = shift > 1
        else:
            shift = (ours.action - base.action).abs().float()
            changed = ours.action != base.action
        local = torch.stack([changed.float().mean(), shift.mean()]).to(self.accelerator.device)
        share, bins = self.accelerator.reduce(local, "mean").tolist()
        return {"policy/argmax_changed": share, "policy/argmax_shift": bins}

    # ---------------------------------------------------------------------------------------------------------
    # the update

    @staticmethod
    def _flat(rollout: Rollout | GroupRollout, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, *x.shape[2:]) if isinstance(rollout, Rollout) else x  # [T, N, ...] -> [T*N, ...]

    def _batch(self, rollout: Rollout | GroupRollout) -> _Batch:
        ppo = self.cfg.ppo
        ref = None
        if self.cfg.kl_to_base > 0:
            ref = self._flat(rollout, self.reference_log_probs(rollout, clean=self._kl_on_clean_frames))
        if isinstance(rollout, GroupRollout):
            advantages = rollout.step_advantages(group_advantages(rollout.outcomes, self.cfg.algorithm))
            return _Batch(rollout.actions, rollout.log_probs, None, advantages, None, rollout.means, ref)
        advantages, returns = compute_gae(
            rollout.rewards,
            rollout.values,
            rollout.dones,
            rollout.next_value,
            gamma=ppo.gamma,
            gae_lambda=ppo.gae_lambda,
        )
        flat = lambda x: self._flat(rollout, x)  # noqa: E731
        return _Batch(
            flat(rollout.actions), flat(rollout.log_probs), flat(rollout.values), flat(advantages), flat(returns),
            flat(rollout.means), ref,
        )  # fmt: skip

    @property
    def _value_clip(self) -> float | None:
        clip = self.cfg.ppo.clip_vloss
        if clip is True:
            return self.cfg.ppo.clip_coef
        return None if clip is False else float(clip)

    def _micro_batches(self, mb: torch.Tensor) -> list[torch.Tensor]:
        """Positions in ``mb`` of each micro-batch (never an empty one)."""
        parts = min(self.cfg.ppo.gradient_accumulation_steps, len(mb))
        return list(torch.tensor_split(torch.arange(len(mb), device=mb.device), parts))

    def update(self, rollout: Rollout | GroupRollout) -> dict[str, float]:
        ppo, acc = self.cfg.ppo, self.accelerator
        batch = self._batch(rollout)
        if not self.critic_free and self.update_index < ppo.critic_warmup_updates:
            return self._critic_warmup(rollout, batch)
        # Every rank must take the same number of optimizer steps (gradients are all-reduced at each): a group
        # rollout may keep too few samples somewhere, and then no rank updates.
        fewest = acc.gather(torch.tensor([len(batch)], device=acc.device)).min().item()
        if fewest < ppo.num_minibatches:
            return {"ppo/optimizer_steps": 0.0, "ppo/epochs": 0.0}
        advantages = batch.advantages
        if not self.critic_free and ppo.norm_adv == "batch":
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
                if not self.critic_free and ppo.norm_adv == "minibatch" and len(mb) > 1:
                    adv = normalize_advantages(adv)
                loss_values: dict[str, torch.Tensor] = {}  # this minibatch's, for the non-finite check
                for micro in self._micro_batches(mb):
                    losses = self._losses(rollout, mb[micro], batch, adv[micro])
                    if measure_shares:  # its first micro-batch, before the backward frees the graph
                        history.update(self._grad_share_metrics(losses.terms))
                        measure_shares = False
                    acc.backward(losses.total * (len(micro) / len(mb)))
                    for k, v in losses.stats.items():
                        history.setdefault(k, []).append(v.detach())
                        if k.startswith("loss/"):
                            loss_values[k] = loss_values.get(k, 0) + v.detach()
                    kl_sum = kl_sum + losses.stats["ppo/approx_kl"].detach().float().to(acc.device) * len(micro)
                    kl_count += len(micro)
                self._sync_gradients()
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
        if not self.critic_free:
            metrics["ppo/explained_variance"] = explained_variance(batch.values, batch.returns)
        metrics["ppo/learning_rate"] = ppo.learning_rate
        return metrics

    def _critic_warmup(self, rollout: Rollout, batch: _Batch) -> dict[str, float]:
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
                    for micro in self._micro_batches(mb):
                        idx = mb[micro]
                        with acc.autocast():
                            out = self.policy.evaluate(rollout.observations(idx), batch.actions[idx])
                            v_loss = value_loss(out.value, batch.values[idx], batch.returns[idx], self._value_clip)
                        acc.backward(ppo.vf_coef * v_loss * (len(micro) / len(mb)))
                        losses.append(v_loss.detach())
                        loss_values["loss/value"] = loss_values.get("loss/value", 0) + v_loss.detach()
                    self._sync_gradients(self.value_params)
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

    def _grad_share_metrics(self, terms: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """``grad/norm_<term>`` and ``grad/share_<term>`` (its norm over the sum of all terms' norms) on the
        trainable parameters, averaged over ranks, as one-element histories for :meth:`update`'s metrics."""
        norms = term_grad_norms(terms, self.params)
        out = {}
        for prefix, values in (("grad/norm_", norms), ("grad/share_", grad_shares(norms))):
            for name, value in values.items():
                out[prefix + name] = [torch.tensor(value)]
        return out

    def _step_if_finite(self, grad_norm: torch.Tensor | float, loss_values: dict[str, torch.Tensor]) -> bool:
        """``optimizer.step()``, unless a loss term or the gradient norm is not finite on some rank: then the step
        is skipped (the caller zeroes the gradients; weights and optimizer state stay as they were), counted and
        reported with the term; ``max_consecutive_skips`` in a row raise :class:`NonFiniteError`."""
        acc = self.accelerator
        bad = [k for k, v in loss_values.items() if k != "loss/total" and not torch.isfinite(v).all()]
        bad = bad or [k for k, v in loss_values.items() if not torch.isfinite(v).all()]
        finite = not bad and bool(torch.isfinite(torch.as_tensor(grad_norm)).all())
        # any rank's: one rank's non-finite loss reached every rank's gradient through the all-reduce
        if self._rank_max(float(not finite)) == 0:
            self.optimizer.step()
            self._consecutive_skips = 0
            return True
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

    def _losses(self, rollout: Rollout | GroupRollout, idx: torch.Tensor, batch: _Batch, adv: torch.Tensor) -> _Losses:
        cfg = self.cfg
        actions, old_log_probs = batch.actions[idx], batch.log_probs[idx]
        jac_cfg, smooth_cfg = cfg.regularizers.jacobian, cfg.regularizers.smoothness
        obs = rollout.observations(idx)
        with self.accelerator.autocast():
            out = self.policy.evaluate(obs, actions)
            pg_loss, pg_stats = policy_loss(out.log_prob, old_log_probs, adv, cfg.ppo.clip_coef)
            entropy = out.entropy.mean()
            terms = {"policy": pg_loss - cfg.ppo.ent_coef * entropy}
            stats = {"loss/ppo": pg_loss, "loss/entropy": entropy, **{f"ppo/{k}": v for k, v in pg_stats.items()}}
            if not self.critic_free:
                v_loss = value_loss(out.value, batch.values[idx], batch.returns[idx], self._value_clip)
                terms["value"] = cfg.ppo.vf_coef * v_loss
                stats["loss/value"] = v_loss
            if cfg.kl_to_base > 0:
                on_base_frames = out
                if self._kl_on_clean_frames:  # the same actions on the clean frames: one more forward pass
                    on_base_frames = self.policy.evaluate(rollout.clean_observations(idx), actions)
                kl = kl_k3(on_base_frames.log_prob, batch.ref_log_probs[idx]).mean()
                terms["kl_to_base"] = cfg.kl_to_base * kl
                stats["loss/kl_to_base"] = kl
            if jac_cfg.weight > 0:
                jac = self._jacobian_penalty(obs, actions, idx, jac_cfg)
                terms["jacobian"] = jac_cfg.weight * jac
                stats["loss/jacobian"] = jac
            if smooth_cfg.weight > 0:
                smooth = self._smoothness_penalty(rollout, idx, out.mean, batch, smooth_cfg)
                terms["smooth"] = smooth_cfg.weight * smooth
                stats["loss/smooth"] = smooth
            inv_cfg = cfg.regularizers.invariance
            if inv_cfg.weight > 0:
                inv = self._invariance_penalty(rollout, idx, actions, out, inv_cfg)
                terms["invariance"] = inv_cfg.weight * inv
                stats["loss/invariance"] = inv
            total = sum(terms.values())  # in this order: the same bits as adding them one by one
        stats["loss/total"] = total
        return _Losses(total, stats, terms)

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
                    out.mean, pixels, jac_cfg.num_probes, generator=self.penalty_generator, create_graph=True
                )
            else:
                with self.policy.capture_visual_embeddings() as captured:
                    out = self.policy.evaluate(sub, actions[:k])
                penalty = grad_norm_penalty(out.log_prob, captured[0], jac_cfg.g_max, create_graph=True)
        return penalty.mean()

    def _invariance_penalty(self, rollout, idx, actions, out, inv_cfg) -> torch.Tensor:
        """The policy on the perturbed frames (``out``, with gradient) against the same actions on the clean
        frames of the same steps (no gradient: the target; the base policy's with ``target: base``), on a share of
        the minibatch."""
        k = self._subset(len(idx), inv_cfg.fraction)
        teacher = self.base_policy() if inv_cfg.target == "base" else contextlib.nullcontext()
        with torch.no_grad(), teacher:
            clean = self.policy.evaluate(rollout.clean_observations(idx[:k]), actions[:k])
        if inv_cfg.form == "exact":
            return token_invariance_kl(out.logits[:k], clean.logits).mean()
        return invariance_penalty(out.log_prob[:k], clean.log_prob).mean()

    def _smoothness_penalty(self, rollout, idx, mean, batch: _Batch, smooth_cfg) -> torch.Tensor:
        if smooth_cfg.form == "old_policy":
            return smoothness_penalty(mean, batch.means[idx].detach())
        # temporal: the current policy's mean at s_t and at s_{t+1} of the same episode (teacher-forced on a_{t+1})
        k = self._subset(len(idx), smooth_cfg.fraction)
        next_idx, valid = rollout.next_indices(idx[:k])  # invalid rows point at themselves and are masked out
        next_mean = self.policy.evaluate(rollout.observations(next_idx), batch.actions[next_idx]).mean
        return smoothness_penalty(mean[:k], next_mean, mask=valid)

    def _broadcast_parameters(self) -> None:
        """Start every rank from rank 0's LoRA and value-head weights, as DDP would."""
        if self.accelerator.num_processes == 1:
            return
        for p in self.params:
            torch.distributed.broadcast(p.data, src=0)

    def _sync_gradients(self, params: list[torch.nn.Parameter] | None = None) -> None:
        """Average the trainable parameters' gradients over ranks (see the module docstring)."""
        if self.accelerator.num_processes == 1:
            return
        params = self.params if params is None else params
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), "mean")
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()

    # ---------------------------------------------------------------------------------------------------------
    # evaluation, logging, saving

    def evaluate(self) -> dict[str, float]:
        """``eval/<setting>/success_rate`` and ``/return``: clean and each ``perturb.eval`` setting, same episodes
        (``rvla_peft.evaluation.evaluate_grid``), argmax actions, averaged over ranks; with ``eval_sampled`` also
        ``eval_sampled/...``: the same episodes with sampled actions, the policy that RL optimises."""
        self.policy.eval()
        settings = suite_grid(self.cfg.perturb.eval_suite, specs=self.cfg.perturb.eval)
        modes = [("eval", True)] + ([("eval_sampled", False)] if self.cfg.eval_sampled else [])
        metrics = {}
        with self.policy.acting():  # merged once for every mode (policy.merge_lora_to_act)
            for prefix, deterministic in modes:
                cells = evaluate_grid(
                    {"policy": self.policy},
                    self.base_env,
                    settings,
                    self.cfg.eval_episodes,
                    seed=self.env_seed + 7,
                    max_steps=self.cfg.env.max_episode_steps,
                    deterministic=deterministic,
                )
                for cell in cells:
                    local = torch.tensor(
                        [cell.success_rate, sum(cell.returns) / cell.episodes], device=self.accelerator.device
                    )
                    success_rate, mean_return = self.accelerator.reduce(local, "mean").tolist()
                    metrics[f"{prefix}/{cell.setting}/success_rate"] = success_rate
                    metrics[f"{prefix}/{cell.setting}/return"] = mean_return
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
            "policy/kl_to_base",
            "policy/argmax_changed",
            "groups/kept_frac",
            "time/env_steps_per_s",
        ]
        line = " ".join(f"{k}={metrics[k]:.4g}" for k in shown if k in metrics)
        line += "".join(
            f" {k}={v:.3g}"
            for k, v in metrics.items()
            if k.startswith(("eval/", "eval_sampled/")) and k.endswith("rate")
        )
        bar.write(f"[update {step}/{self.cfg.total_updates}] {line}")

    # ---------------------------------------------------------------------------------------------------------
    # stopping, checkpoints and resuming

    def _stop_signal(self, stop: Callable[[], int | None] | None) -> int:
        """The signal that asked this run to stop (0: none), the same on every rank (each may get it at another
        time, or only one may)."""
        return int(self._rank_max((stop() or 0) if stop is not None else 0))

    def _rank_max(self, value: float) -> float:
        """The largest of every rank's ``value``: one decision all ranks take together (a collective call: every
        rank must make it); no communication in a single process."""
        if self.accelerator.num_processes == 1:
            return float(value)
        return self.accelerator.reduce(torch.tensor(float(value), device=self.accelerator.device), "max").item()

    def _interrupt(self, signum: int, step: int, checkpoint: Path | None) -> None:
        if checkpoint is None:
            checkpoint = self.checkpoint_dir(step)
            self.save_checkpoint(checkpoint)
        adapter = self.save_adapter(interrupted=True)
        self.accelerator.end_training()
        self.train_env.close()  # the run ends here: env workers are shut down now, not at interpreter exit
        raise TrainingInterrupted(signum, step, checkpoint, adapter)

    def checkpoint_dir(self, update: int) -> Path:
        return self.output_dir / CHECKPOINTS_DIR / checkpoint_name(update)

    def trainer_state(self, update: int, interrupted: bool = False) -> dict:
        return {
            "update": update,
            "total_updates": self.cfg.total_updates,
            "interrupted": interrupted,
            "env_steps": self.env_steps,
            "skipped_steps": self.skipped_steps,
            "last_success_rate": self._last_success_rate,
            "curriculum": self.curriculum.state_dict(),
        }

    def save_adapter(self, interrupted: bool = False) -> Path:
        """OUTPUT/adapter: the LoRA adapter, the value head beside it, the resolved recipe and the trainer state
        (``interrupted`` marks an adapter written when a signal stopped the run). Refuses to replace an adapter that
        another run wrote meanwhile. When the folder cannot be written (a full disk), the trained state goes to a
        checkpoint elsewhere and :class:`SaveError` names it: the run is not lost."""
        target = self.output_dir / ADAPTER_DIR
        self._check_no_new_adapter()
        update = self.update_index + 1 if interrupted else self.cfg.total_updates
        state = self.trainer_state(update, interrupted)

        def extra(tmp: Path) -> None:
            (tmp / RECIPE_FILE).write_text(dump_yaml(self.cfg))
            (tmp / TRAINER_STATE).write_text(json.dumps(state))

        try:
            self._save(target, extra)
        except _SaveFailed as failed:
            raise SaveError(self._rescue(target, failed.error, update, "the adapter")) from None
        return target

    def _check_no_new_adapter(self) -> None:
        """ConfigError on every rank when another run wrote an adapter into output_dir since this one started
        (unless overwrite_output_dir): rank 0 looks, all ranks learn it, so none waits for a save that never comes."""
        conflict = None
        if self.accelerator.is_main_process and adapter_fingerprint(self.output_dir) != self._adapter_at_start:
            try:
                check_output_dir(self.cfg)
            except ConfigError as e:
                conflict = e
        if self._rank_max(float(conflict is not None)) and conflict is None:
            conflict = ConfigError(f"output_dir: another run wrote an adapter into {self.output_dir} (see rank 0)")
        if conflict is not None:
            raise conflict

    def _rescue(self, target: Path, error: OSError | None, update: int, what: str) -> str:
        """Write the trained state to a checkpoint in the checkpoints folder or, failing that, the temp folder;
        the message for :class:`SaveError` (on other ranks: a pointer to rank 0's)."""
        reason = f"could not write {what} to {target} ({getattr(error, 'strerror', None) or error})"
        rescue = Path(tempfile.gettempdir()) / f"rvla_peft-rescue-{self.output_dir.name}" / checkpoint_name(update)
        candidates = [self.checkpoint_dir(update), rescue]
        for folder in candidates:
            if folder == target:
                continue
            try:
                self._write_checkpoint(folder)
            except _SaveFailed:
                continue
            then = "to write the adapter (it trains no further)" if update == self.cfg.total_updates else "to go on"
            return (
                f"{reason}; the trained state is saved in {folder}: free some space, then run the same command with "
                f"resume_from_checkpoint={folder} {then}"
            )
        found = checkpoints(self.output_dir)
        last = f"the last checkpoint is {found[-1]}" if found else "no checkpoint was written (save_every=0)"
        return f"{reason}, nor a checkpoint to {' or '.join(map(str, candidates))}; {last}"

    def save_checkpoint(self, directory: Path) -> None:
        """A resumable checkpoint: the adapter files, the optimizer, the trainer state (update reached, curriculum,
        counters) and every process's RNG states and probe frames (``rank_states.pt``). Where it cannot be written
        (a full disk) the state goes elsewhere and :class:`SaveError` names it."""
        try:
            self._write_checkpoint(directory)
        except _SaveFailed as failed:
            raise SaveError(self._rescue(directory, failed.error, self.update_index + 1, "the checkpoint")) from None

    def _write_checkpoint(self, directory: Path) -> None:
        rank = {"rng": _rng_state(self.sample_generator, self.penalty_generator)}
        if self.probe is not None:
            rank["probe"] = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in self.probe.items()}
        ranks = gather_object([rank])  # every rank's, in rank order (collective: all ranks call it)
        state = self.trainer_state(self.update_index + 1)

        def extra(tmp: Path) -> None:
            torch.save(self.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            torch.save(ranks, tmp / RANK_STATES_FILE)
            (tmp / RECIPE_FILE).write_text(dump_yaml(self.cfg))
            (tmp / TRAINER_STATE).write_text(json.dumps(state))

        self._save(directory, extra)

    def load_checkpoint(self, directory: Path) -> None:
        """Continue from ``directory`` (a :meth:`save_checkpoint` folder): the weights, optimizer, update index,
        curriculum, counters, and this rank's RNG states and probe frames. The next update collects from
        :meth:`_restart_episodes` as the uninterrupted run did, so on the CPU the run continues bit for bit."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        check_resume_recipe(yaml.safe_load(dump_yaml(self.cfg)), directory)
        acc = self.accelerator
        state = read_trainer_state(directory)
        # loaded on the CPU, copied into the parameters wherever they live
        loaded = set_peft_model_state_dict(self.policy.peft_model, load_file(directory / ADAPTER_WEIGHTS))
        if loaded.unexpected_keys:
            raise ValueError(f"{directory}: weights that are not in this model: {loaded.unexpected_keys[:3]}")
        self.policy.value_head.load_state_dict(load_file(directory / VALUE_HEAD_FILE))
        self.policy.load_adapter_extras(directory)
        # on the CPU first: the optimizer moves its state to its parameters' device
        self.optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location="cpu"))
        ranks = torch.load(directory / RANK_STATES_FILE, weights_only=False)  # our own file: RNG states, frames
        if len(ranks) != acc.num_processes:
            raise ValueError(
                f"{directory} was saved by {len(ranks)} processes, this run has {acc.num_processes}: resume with the "
                "same number of processes (accelerate launch --num_processes)"
            )
        rank = ranks[acc.process_index]
        _set_rng_state(rank["rng"], self.sample_generator, self.penalty_generator)
        if "probe" in rank:
            self.probe = {k: v.to(acc.device) if isinstance(v, torch.Tensor) else v for k, v in rank["probe"].items()}
        self.start_update = self.update_index = int(state["update"])
        self.env_steps = int(state["env_steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._last_success_rate = state.get("last_success_rate")
        self.curriculum.load_state_dict(state["curriculum"])
        if acc.is_main_process:
            self._truncate_metrics(self.start_update)
        if self.start_update > self.cfg.total_updates:
            raise ValueError(
                f"{directory} is at update {self.start_update}, past total_updates={self.cfg.total_updates}"
            )

    def _truncate_metrics(self, update: int) -> None:
        """metrics.jsonl as it was at ``update``: the lines logged after the checkpoint are logged again."""
        path = self.output_dir / METRICS_FILE
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines(keepends=True) if _update_of(line) <= update]
        atomic_write_text(path, "".join(kept))

    def push_to_hub(self, directory: Path, checkpoint: bool = False) -> None:
        """Push ``directory`` with its card to ``hub.repo_id`` from the main process (see :mod:`rvla_peft.hub`).

        A checkpoint goes to ``hub.checkpoint_revision`` and a failure there only warns; the final push raises.
        """
        if self.accelerator.is_main_process:
            push_training_output(self.cfg, directory, checkpoint=checkpoint)
        self.accelerator.wait_for_everyone()

    def _save(self, directory: Path, extra) -> None:
        """Write the policy (and ``extra`` files) atomically from the main process; every rank waits for it.
        A non-finite weight is never written (:class:`NonFiniteError`); a write that fails raises
        :class:`_SaveFailed` on every rank, leaving no partial folder."""
        bad = [name for name, p in self.policy.named_parameters() if p.requires_grad and not p.isfinite().all()]
        if bad:  # identical on every rank
            raise NonFiniteError(f"not writing {directory}: non-finite values in {len(bad)} weights ({bad[0]}, ...)")
        acc = self.accelerator
        error = None
        if acc.is_main_process:
            base_id = base_model_id(self.cfg.model)

            def write(tmp: Path) -> None:
                self.policy.save_pretrained(tmp, base_model_id=base_id)
                extra(tmp)

            try:
                atomic_save(directory, write)
            except OSError as e:
                error = e
        if self._rank_max(float(error is not None)):
            raise _SaveFailed(error)
        acc.wait_for_everyone()


def _update_of(line: str) -> float:
    try:
        return int(json.loads(line)["update"])
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line of a killed run: dropped with the lines after the checkpoint
