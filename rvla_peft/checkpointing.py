"""Saving, rescuing and resuming a training run, and the errors that end one.

A run folder (names in :mod:`rvla_peft.utils.constants`) holds ``recipe.yaml``, ``metrics.jsonl``, ``adapter/`` and
``checkpoints/update-NNNNNN/``. Every folder is written atomically from the main process (a temporary folder
renamed into place), so a crash never leaves a half-written adapter or checkpoint; a weight that is not finite is
never written; when the disk is full the trained state goes to a checkpoint elsewhere and the error names it.
A checkpoint holds the adapter files, the optimizer, the trainer state and every rank's RNG states and probe
frames, so that a resumed run continues bit for bit on the CPU.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate.utils import gather_object

from rvla_peft.config import ConfigError, TrainConfig, dump_yaml
from rvla_peft.policies.base import Policy
from rvla_peft.policies.registry import base_model_id
from rvla_peft.run_folder import (
    adapter_fingerprint,
    check_output_dir,
    check_resume_recipe,
    checkpoint_name,
    checkpoints,
    read_trainer_state,
)
from rvla_peft.utils.collectives import rank_max
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
from rvla_peft.utils.errors import NonFiniteError, SaveError
from rvla_peft.utils.io import atomic_save, atomic_write_text


class _SaveFailed(Exception):
    """Raised on every rank when the main process could not write a folder (``error``: its OSError, rank 0 only)."""

    def __init__(self, error: OSError | None) -> None:
        self.error = error
        super().__init__(str(error) if error else "the main process could not write")


def rng_state(*generators: torch.Generator) -> dict:
    """Every RNG this process draws from: Python's, numpy's, torch's (CUDA's too) and the run's own generators."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, *generators: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    for g, saved in zip(generators, state["generators"], strict=True):
        g.set_state(saved)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _update_of(line: str) -> float:
    try:
        return int(json.loads(line)["update"])
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line of a killed run: dropped with the lines after the checkpoint


def truncate_metrics(output_dir: Path, update: int) -> None:
    """metrics.jsonl as it was at ``update``: the lines logged after the checkpoint are logged again."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True) if _update_of(line) <= update]
    atomic_write_text(path, "".join(kept))


class Checkpointer:
    """Writes a run's adapter and checkpoints and reads a checkpoint back, for every rank (its methods are
    collective calls).

    ``state`` is a callable ``(update, interrupted) -> (trainer_state, rank_state)``: the JSON trainer state shared by
    the ranks and this rank's own (RNG states, probe frames), taken when a folder is written."""

    def __init__(
        self,
        accelerator,
        policy: Policy,
        optimizer,
        cfg: TrainConfig,
        state: Callable[[int, bool], tuple[dict, dict]],
    ):
        self.accelerator, self.policy, self.optimizer, self.cfg, self.state = (
            accelerator,
            policy,
            optimizer,
            cfg,
            state,
        )
        self.output_dir = Path(cfg.output_dir)
        self._adapter_at_start: str | None = None

    def checkpoint_dir(self, update: int) -> Path:
        return self.output_dir / CHECKPOINTS_DIR / checkpoint_name(update)

    def start_fresh(self) -> None:
        """A new run owns its folder: the logs and checkpoints of a run it replaces (overwrite_output_dir, or one
        killed before its first checkpoint) are removed, so metrics never interleave and ``latest`` is ours."""
        (self.output_dir / METRICS_FILE).unlink(missing_ok=True)
        for folder in (CHECKPOINTS_DIR, TENSORBOARD_RUN):
            shutil.rmtree(self.output_dir / folder, ignore_errors=True)

    def claim_output_dir(self) -> None:
        """Remember the adapter in the folder now: this run's own (an interrupted adapter it resumes) or one allowed
        by overwrite_output_dir; one that appears later was written by another run (checked before the final save)."""
        self._adapter_at_start = adapter_fingerprint(self.output_dir)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output_dir / RECIPE_FILE, dump_yaml(self.cfg))

    # ---------------------------------------------------------------------------------------------------------
    # saving

    def save_adapter(self, update: int, interrupted: bool = False) -> Path:
        """OUTPUT/adapter: the LoRA adapter, the value head beside it, the resolved recipe and the trainer state
        (``interrupted`` marks an adapter written when a signal stopped the run). Refuses to replace an adapter that
        another run wrote meanwhile. When the folder cannot be written (a full disk), the trained state goes to a
        checkpoint elsewhere and :class:`SaveError` names it: the run is not lost."""
        target = self.output_dir / ADAPTER_DIR
        self._check_no_new_adapter()
        trainer_state, _ = self.state(update, interrupted)

        def extra(tmp: Path) -> None:
            (tmp / RECIPE_FILE).write_text(dump_yaml(self.cfg))
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state))

        try:
            self._save(target, extra)
        except _SaveFailed as failed:
            raise SaveError(self._rescue(target, failed.error, update, "the adapter")) from None
        return target

    def save_checkpoint(self, directory: Path, update: int) -> None:
        """A resumable checkpoint of the run at ``update``. Where it cannot be written (a full disk) the state goes
        elsewhere and :class:`SaveError` names it."""
        try:
            self._write_checkpoint(directory, update)
        except _SaveFailed as failed:
            raise SaveError(self._rescue(directory, failed.error, update, "the checkpoint")) from None

    def _write_checkpoint(self, directory: Path, update: int) -> None:
        trainer_state, rank_state = self.state(update, False)
        ranks = gather_object([rank_state])  # every rank's, in rank order (collective: all ranks call it)

        def extra(tmp: Path) -> None:
            torch.save(self.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            torch.save(ranks, tmp / RANK_STATES_FILE)
            (tmp / RECIPE_FILE).write_text(dump_yaml(self.cfg))
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state))

        self._save(directory, extra)

    def _check_no_new_adapter(self) -> None:
        """ConfigError on every rank when another run wrote an adapter into output_dir since this one started
        (unless overwrite_output_dir): rank 0 looks, all ranks learn it, so none waits for a save that never comes."""
        conflict = None
        if self.accelerator.is_main_process and adapter_fingerprint(self.output_dir) != self._adapter_at_start:
            try:
                check_output_dir(self.cfg)
            except ConfigError as e:
                conflict = e
        if rank_max(self.accelerator, float(conflict is not None)) and conflict is None:
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
                self._write_checkpoint(folder, update)
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

    def _save(self, directory: Path, extra: Callable[[Path], None]) -> None:
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
        if rank_max(acc, float(error is not None)):
            raise _SaveFailed(error)
        acc.wait_for_everyone()

    # ---------------------------------------------------------------------------------------------------------
    # resuming

    def load_checkpoint(self, directory: Path) -> tuple[dict, dict]:
        """Load the weights and the optimizer of ``directory`` (a :meth:`save_checkpoint` folder); return its
        trainer state and this rank's state (RNG states, probe frames) for the trainer to take back."""
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
        update = int(state["update"])
        if acc.is_main_process:
            truncate_metrics(self.output_dir, update)
        if update > self.cfg.total_updates:
            raise ValueError(f"{directory} is at update {update}, past total_updates={self.cfg.total_updates}")
        return state, ranks[acc.process_index]
