"""Supervised warm-up of any policy family on scripted-expert demonstrations, before robust RL.

    rvla-demos --task PushCube-v1 --episodes 200 --seed 10000 --out demos/push
    rvla-sft recipes/sft_tiny_cpu.yaml demos=[demos/push] output_dir=outputs/warmup
    rvla-train recipes/tiny_cpu.yaml model.adapter=outputs/warmup/adapter     # RL goes on from the warm-up

Each family trains with its own objective, :meth:`Policy.supervised_loss` (next to the family's code): the action
tokens' cross-entropy (``action_tokens``, ``openvla``), OpenVLA-OFT's L1 regression of the action chunk
(``openvla_oft``), pi0's flow matching (``pi0``). A LoRA by default, saved as RL saves its adapter (loads with
``PeftModel.from_pretrained``, and with ``model.adapter`` starts RL); ``full_finetune: true`` trains every weight
and saves a whole model folder instead.

Demonstration episodes are split into training and held-out ones (``pretrain.split_episodes``). Every
``eval_every`` optimizer steps (and at the end) the held-out loss is measured and, with ``eval_episodes`` > 0, the
success of the deterministic policy closed loop on each task (``pretrain.ClosedLoop``, reset seeds ``eval_seed + e``).
The best state (highest success where measured, then lowest held-out loss) is written atomically to
``output_dir/adapter`` (``output_dir/model`` when fully fine-tuned) with ``recipe.yaml`` (the recipe RL and
evaluation load it with), ``sft.json`` (the history) and a model card; ``output_dir/checkpoint`` (every
``save_every`` steps and at the end) resumes the run bit for bit (``resume_from_checkpoint: latest``). The batch
order, the augmentation and the loss's own draws (flow matching's noise and time) are functions of the seed and the
step, so a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from torch import Tensor
from tqdm.auto import tqdm

from rvla_peft.cards import warmup_card
from rvla_peft.config import EnvConfig, LoraSettings, ModelConfig, PolicyConfig, TrainConfig, dump_yaml
from rvla_peft.config.parsing import check
from rvla_peft.config.schema import load_recipe
from rvla_peft.policies.action_tokens.configuration import ActionTokenPolicyConfig
from rvla_peft.policies.families import POLICY_VARIANTS, family_config
from rvla_peft.pretrain import (
    BCData,
    ClosedLoop,
    PretrainError,
    augment,
    dataset_from,
    lr_at,
    read_demos,
    split_episodes,
)
from rvla_peft.utils.constants import (
    ACTION_HEADS_FILE,
    ADAPTER_DIR,
    CARD_FILE,
    OPTIMIZER_FILE,
    RECIPE_FILE,
    SFT_RECORD_FILE,
    VALUE_HEAD_FILE,
)
from rvla_peft.utils.errors import NonFiniteError
from rvla_peft.utils.io import atomic_save, atomic_write_text

MODEL_DIR = "model"  # output_dir/model: the fully fine-tuned model (full_finetune)
CHECKPOINT_DIR = "checkpoint"  # output_dir/checkpoint: the latest state, to resume from
TRAINABLE_FILE = "trainable.safetensors"  # a checkpoint's trained weights, by parameter name
STATE_FILE = "state.json"


class SFTError(ValueError):
    """Input the warm-up cannot train on; the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------------------------
# the recipe


@dataclass
class SFTConfig:
    """A warm-up recipe: the run's own keys, then the model, policy, LoRA and env sections of a training recipe."""

    demos: list[str] = field(
        default_factory=list,
        metadata={"help": "Demonstration folders recorded by `rvla-demos` (their episodes are concatenated)."},
    )
    output_dir: str = field(default="outputs/sft", metadata={"help": "Where adapter/, checkpoint/ and sft.json go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over in an output_dir that already holds a warm-up."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "'latest' (output_dir/checkpoint) or a checkpoint folder: continue that run bit for bit."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the LoRA init, the split, the batch order and draws."})
    full_finetune: bool = field(
        default=False,
        metadata={
            "help": "Train every weight (a random or small base) instead of a LoRA; writes output_dir/model (a "
            "from_pretrained folder), not an adapter."
        },
    )
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=16, metadata={"help": "Samples per micro-batch and process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(
        default=5e-4, metadata={"help": "Peak AdamW learning rate (OFT's LoRA fine-tuning used 5e-4)."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps, then a cosine decay to 5%."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    random_crop: int = field(
        default=0,
        metadata={
            "help": "Augmentation: a random crop, the image shifted by up to this many pixels with the edges "
            "repeated (OFT trains with random crops); 0: none."
        },
    )
    val_fraction: float = field(default=0.1, metadata={"help": "Share of each task's episodes held out."})
    eval_every: int = field(
        default=100, metadata={"help": "Held-out loss (and closed-loop success) every N steps; 0: at the end only."}
    )
    eval_episodes: int = field(default=0, metadata={"help": "Closed-loop episodes per task at each evaluation."})
    eval_seed: int = field(
        default=1_000_000, metadata={"help": "Closed-loop reset seeds eval_seed + e (away from the demos' seeds)."}
    )
    save_every: int = field(default=0, metadata={"help": "Write output_dir/checkpoint every N steps (0: at the end)."})
    max_consecutive_skips: int = field(
        default=5,
        metadata={"help": "A step whose loss or gradient is not finite is skipped; this many in a row stop the run."},
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = field(
        default="no", metadata={"help": "Autocast precision of the forward passes (Accelerate)."}
    )
    cpu: bool = field(default=False, metadata={"help": "Force the CPU even where CUDA exists."})
    model: ModelConfig = field(default_factory=ModelConfig)
    policy: PolicyConfig = field(default_factory=ActionTokenPolicyConfig, metadata={"variants": POLICY_VARIANTS})
    lora: LoraSettings = field(default_factory=LoraSettings)
    env: EnvConfig = field(
        default_factory=EnvConfig,
        metadata={"help": "The env RL will run: image_size and camera must be the demos'; tasks come from the demos."},
    )

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "gradient_accumulation_steps"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
        check(self.learning_rate > 0, "learning_rate", "must be > 0")
        check(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        check(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")
        for key in ("warmup_steps", "random_crop", "eval_every", "eval_episodes", "save_every"):
            check(getattr(self, key) >= 0, key, "must be >= 0")
        check(self.max_consecutive_skips >= 1, "max_consecutive_skips", "must be >= 1")

    def train_config(self) -> TrainConfig:
        """The training recipe of the policy this warm-up trains: written beside its adapter, so that evaluation
        (``load_policy``) and RL (``model.adapter``) build the same policy."""
        model = dataclasses.replace(self.model, adapter=None)
        return TrainConfig(model=model, policy=self.policy, lora=self.lora, env=self.env, report_to=[])

    def validate(self) -> None:
        """The model, policy and LoRA sections as training checks them, and what the warm-up itself needs."""
        check(bool(self.demos), "demos", "no demonstrations: set demos=[DIR, ...] (record them with `rvla-demos`)")
        self.train_config().validate()
        policy = family_config(self.policy)
        from rvla_peft.policies.registry import policy_class  # imports the family's modeling, loads no model

        check(
            policy_class(policy.family).has_supervised_objective(),
            "policy.family",
            f"{policy.family!r} has no supervised objective to warm up with",
        )
        check(
            not getattr(policy, "use_state", False),
            "policy.use_state",
            "must be false: the demonstrations' observations for the warm-up are the image and the instruction",
        )
        check(
            not (self.full_finetune and self.model.quantization != "none"),
            "full_finetune",
            "cannot train a quantized base's weights: set model.quantization=none or train a LoRA",
        )


def load_sft_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SFTConfig:
    """A warm-up recipe plus ``key=value`` overrides, parsed and checked as training recipes are."""
    return load_recipe(SFTConfig, path, overrides)


# --------------------------------------------------------------------------------------------------------------
# data


def check_demos(cfg: SFTConfig) -> BCData:
    """The demonstrations, read and checked against the policy before any model loads: a folder that is not a
    demonstrations dataset, another action dimension, another camera or image size are one-line errors."""
    try:
        merged, indexes = read_demos(cfg.demos)
    except PretrainError as e:
        raise SFTError(str(e).replace("pass --demos DIR", "set demos=[DIR]")) from None
    action_dim = merged["action"].shape[-1]
    if action_dim != cfg.policy.action_dim:
        raise SFTError(
            f"the demonstrations' actions have {action_dim} dimensions, policy.action_dim={cfg.policy.action_dim}: "
            "record demonstrations for this policy's action space or set policy.action_dim"
        )
    size = tuple(merged["rgb"].shape[1:3])
    if size != (cfg.env.image_size, cfg.env.image_size):
        raise SFTError(
            f"the demonstrations' images are {size[0]}x{size[1]}, env.image_size={cfg.env.image_size}: the policy "
            f"would warm up on other images than RL shows it; set env.image_size={size[0]} or record them at "
            f"--image-size {cfg.env.image_size}"
        )
    for d, index in zip(cfg.demos, indexes, strict=True):
        for key in ("camera", "control_mode"):
            if key in index and index[key] != getattr(cfg.env, key):
                raise SFTError(
                    f"{d} was recorded with {key}={index[key]!r}, env.{key}={getattr(cfg.env, key)!r}: set "
                    f"env.{key}={index[key]}"
                )
    return dataset_from(merged, indexes)


def action_chunks(action: Tensor, step_episode: Tensor, idx: Tensor, horizon: int) -> tuple[Tensor, Tensor]:
    """The expert's next ``horizon`` actions from each step ``idx`` [B] within its episode: chunks [B, H, A] and a
    mask [B, H], false past the episode's end (where the chunk repeats the episode's last action)."""
    n = len(step_episode)
    episode_end = torch.searchsorted(step_episode, step_episode, right=True) - 1  # steps of an episode are adjacent
    ahead = idx[:, None] + torch.arange(horizon)[None, :]
    last = episode_end[idx][:, None]
    mask = ahead <= last
    return action[torch.minimum(ahead, last).clamp(max=n - 1)], mask


def sample_stream(train_idx: Tensor, start: int, count: int, seed: int) -> Tensor:
    """Samples ``start`` .. ``start + count`` of the training stream: epoch after epoch over ``train_idx``, each
    in its own order drawn from (seed, epoch). A pure function of its arguments (what resuming relies on)."""
    n = len(train_idx)
    positions = torch.arange(start, start + count)
    out = torch.empty(count, dtype=train_idx.dtype)
    for epoch in positions.div(n, rounding_mode="floor").unique().tolist():
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        here = positions.div(n, rounding_mode="floor") == epoch
        out[here] = train_idx[order[positions[here] % n]]
    return out


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The generator of one micro-batch's augmentation and loss draws."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + micro) * 101 + rank)


def batch_inputs(data: BCData, idx: Tensor, horizon: int, crop: int = 0, generator: torch.Generator | None = None):
    """(observations, expert action chunks, mask) of the steps ``idx``."""
    rgb = data.rgb[idx]
    if crop > 0:
        rgb = augment(rgb, generator, shift=crop)
    obs = {"rgb": rgb, "instruction": [data.instructions[e] for e in data.step_episode[idx].tolist()]}
    actions, mask = action_chunks(data.action, data.step_episode, idx, horizon)
    return obs, actions, mask


@torch.no_grad()
def validation_loss(policy, data: BCData, idx: Tensor, batch_size: int, seed: int, autocast) -> float | None:
    """The supervised loss over the held-out steps ``idx``, its draws fixed by ``seed`` (comparable across steps)."""
    if len(idx) == 0:
        return None
    policy.eval()
    total = 0.0
    for b, start in enumerate(range(0, len(idx), batch_size)):
        batch = idx[start : start + batch_size]
        obs, actions, mask = batch_inputs(data, batch, policy.action_horizon)
        with autocast():
            loss = policy.supervised_loss(obs, actions, mask, torch.Generator().manual_seed(seed + b))
        total += loss.float().item() * len(batch)
    return total / len(idx)


# --------------------------------------------------------------------------------------------------------------
# saving and resuming


def trained_parameters(policy, full: bool) -> dict[str, torch.nn.Parameter]:
    """What the warm-up trains, by name: the active LoRA and the family's heads (OFT's), or with ``full`` every
    weight of the base besides; never the value head (no returns here) nor a LoRA when fully fine-tuning."""
    value = {id(p) for p in policy.value_head.parameters()}
    named = {}
    for name, p in policy.named_parameters():
        if id(p) in value:
            p.requires_grad_(False)
            continue
        if full:
            p.requires_grad_("lora_" not in name)  # LoRA B stays zero: the adapter adds nothing, the base learns
        if p.requires_grad:
            named[name] = p
    return named


def save_full_model(policy, directory: Path) -> None:
    """The base with its trained weights as a ``from_pretrained`` folder (the LoRA wrappers' names undone, the
    untrained zero LoRA left out), its processor, and the family's heads (``action_heads.safetensors``: OFT's)."""
    from safetensors.torch import save_file

    model = policy.peft_model.get_base_model()
    state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    model.save_pretrained(str(directory), state_dict=state, safe_serialization=True)
    policy.processor.save_pretrained(str(directory))
    heads = {
        n: p.detach().cpu().contiguous()
        for n, p in policy.named_parameters()
        if n.startswith(("action_head.", "scale_head."))
    }
    if heads:
        save_file(heads, str(directory / ACTION_HEADS_FILE))


def save_checkpoint(directory: Path, params: dict, optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    def write(staging: Path) -> None:
        save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, str(staging / TRAINABLE_FILE))
        torch.save(optimizer.state_dict(), staging / OPTIMIZER_FILE)
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    atomic_save(directory, write)


def load_checkpoint(directory: Path, params: dict, optimizer) -> dict:
    from safetensors.torch import load_file

    saved = load_file(str(directory / TRAINABLE_FILE))
    if set(saved) != set(params):
        raise SFTError(f"{directory} holds other trained weights than this run's: resume with its recipe")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location="cpu"))
    return json.loads((directory / STATE_FILE).read_text())


def check_output_dir(cfg: SFTConfig) -> Path | None:
    """The checkpoint to resume from, or None; refuse a used output_dir without resume or overwrite."""
    out = Path(cfg.output_dir)
    if cfg.resume_from_checkpoint:
        path = out / CHECKPOINT_DIR if cfg.resume_from_checkpoint == "latest" else Path(cfg.resume_from_checkpoint)
        if not (path / STATE_FILE).is_file():
            raise SFTError(f"resume_from_checkpoint: no warm-up checkpoint in {path}")
        return path
    used = [n for n in (ADAPTER_DIR, MODEL_DIR, CHECKPOINT_DIR) if (out / n).exists()]
    if used and not cfg.overwrite_output_dir:
        raise SFTError(
            f"{out} already holds a warm-up ({', '.join(used)}): set resume_from_checkpoint=latest, "
            "overwrite_output_dir=true or another output_dir"
        )
    return None


# --------------------------------------------------------------------------------------------------------------
# the run


def sft(cfg: SFTConfig, command: str = "") -> dict:
    """Warm up ``cfg``'s policy on its demonstrations; returns the run's record (also ``output_dir/sft.json``)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from rvla_peft.policies.registry import build_policy, resolve_lora
    from rvla_peft.utils.collectives import average_gradients, broadcast_parameters, rank_max
    from rvla_peft.utils.runlock import RunLock

    start_time = time.perf_counter()
    cfg = dataclasses.replace(cfg, lora=resolve_lora(family_config(cfg.policy).family, cfg.lora))
    data = check_demos(cfg)  # before any model loads
    resume = check_output_dir(cfg)
    out = Path(cfg.output_dir)
    acc = Accelerator(
        cpu=cfg.cpu or not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
    )
    lock = RunLock(out, command=command or None) if acc.is_main_process else None
    if lock is not None:
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    closed_loop = None
    try:
        set_seed(cfg.seed)
        with acc.main_process_first():
            policy = build_policy(cfg.train_config(), device=acc.device)
        params = trained_parameters(policy, cfg.full_finetune)
        broadcast_parameters(acc, list(params.values()))
        decayed = [p for p in params.values() if p.dim() >= 2]
        others = [p for p in params.values() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decayed, "weight_decay": cfg.weight_decay}, {"params": others, "weight_decay": 0.0}],
            lr=cfg.learning_rate,
        )
        train_idx, val_idx = split_episodes(data, cfg.val_fraction, cfg.seed)
        if len(train_idx) == 0:
            raise SFTError("no training steps left after holding out validation episodes: lower val_fraction")
        record = {
            "format": "rvla_peft.sft/1",
            "command": command,
            "config": yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg))),
            "family": cfg.policy.family,
            "dataset": {
                "demos": cfg.demos,
                "tasks": data.tasks,
                "episodes": data.num_episodes,
                "train_steps": len(train_idx),
                "val_steps": len(val_idx),
            },  # fmt: skip
            "trained_parameters": sum(p.numel() for p in params.values()),
            "history": [],
            "best": None,
            "skipped_steps": 0,
        }
        step, best_key = 0, None
        if resume is not None:
            state = load_checkpoint(resume, params, optimizer)
            step, record = state["step"], state["record"]
            best_key = tuple(state["best_key"]) if state["best_key"] is not None else None
        if cfg.eval_episodes > 0 and acc.is_main_process:
            env = cfg.env
            closed_loop = ClosedLoop(data.tasks, env.image_size, env.num_envs, env.max_episode_steps, env)
        horizon, world, rank = policy.action_horizon, acc.num_processes, acc.process_index
        micro_samples = cfg.batch_size
        consecutive_skips = 0
        print(
            f"{record['trained_parameters'] / 1e6:.2f} M trained parameters ({'full' if cfg.full_finetune else 'LoRA'}"
            f"); {len(train_idx)} training / {len(val_idx)} held-out steps of {data.num_episodes} episodes "
            f"({', '.join(data.tasks)}); {cfg.policy.family} objective; steps {step} -> {cfg.max_steps}",
            flush=True,
        )
        bar = tqdm(total=cfg.max_steps, initial=step, desc="warm-up steps", disable=not acc.is_local_main_process)
        while step < cfg.max_steps:
            policy.train()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg.max_steps, cfg.warmup_steps, cfg.learning_rate)
            optimizer.zero_grad(set_to_none=True)
            losses = []
            for micro in range(cfg.gradient_accumulation_steps):
                first = ((step * cfg.gradient_accumulation_steps + micro) * world + rank) * micro_samples
                idx = sample_stream(train_idx, first, micro_samples, cfg.seed)
                generator = step_generator(cfg.seed, step, micro, rank)
                obs, actions, mask = batch_inputs(data, idx, horizon, cfg.random_crop, generator)
                with acc.autocast():
                    loss = policy.supervised_loss(obs, actions, mask, generator)
                (loss / cfg.gradient_accumulation_steps).backward()
                losses.append(loss.detach().float())
            average_gradients(acc, list(params.values()))
            train_loss = torch.stack(losses).mean()
            grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            finite = math.isfinite(train_loss.item()) and math.isfinite(grad_norm.item())
            if rank_max(acc, 0.0 if finite else 1.0) > 0:  # every rank skips together
                optimizer.zero_grad(set_to_none=True)
                consecutive_skips += 1
                record["skipped_steps"] += 1
                if consecutive_skips >= cfg.max_consecutive_skips:
                    raise NonFiniteError(
                        f"{consecutive_skips} warm-up steps in a row had a non-finite loss or gradient (step {step}):"
                        " lower learning_rate, or use mixed_precision=no"
                    )
            else:
                optimizer.step()
                consecutive_skips = 0
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss.item():.4g}", refresh=False)
            due_eval = step == cfg.max_steps or (cfg.eval_every and step % cfg.eval_every == 0)
            due_save = step == cfg.max_steps or (cfg.save_every and step % cfg.save_every == 0)
            if due_eval:
                metrics = {"step": step, "train_loss": train_loss.item()}
                val = validation_loss(policy, data, val_idx, cfg.batch_size, cfg.seed, acc.autocast)
                if val is not None:
                    metrics["val_loss"] = val
                if closed_loop is not None:
                    metrics["success"] = closed_loop(policy, cfg.eval_episodes, cfg.eval_seed)
                    metrics["mean_success"] = sum(metrics["success"].values()) / len(metrics["success"])
                metrics["elapsed_s"] = round(time.perf_counter() - start_time, 1)
                record["history"].append(metrics)
                bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
                key = (metrics.get("mean_success", 0.0), -metrics.get("val_loss", metrics["train_loss"]))
                if best_key is None or key > best_key:
                    best_key, record["best"] = key, metrics
                    if acc.is_main_process:
                        save_best(policy, cfg, record, out)
            if due_save and acc.is_main_process:
                state = {"step": step, "best_key": best_key, "record": record}
                save_checkpoint(out / CHECKPOINT_DIR, params, optimizer, state)
        bar.close()
        record["wall_time_s"] = round(time.perf_counter() - start_time, 1)
        if acc.is_main_process:
            atomic_write_text(out / SFT_RECORD_FILE, json.dumps(record, indent=2) + "\n")
        return record
    finally:
        if closed_loop is not None:
            closed_loop.close()
        if lock is not None:
            lock.release()


def save_best(policy, cfg: SFTConfig, record: dict, out: Path) -> None:
    """The best state so far: ``out/adapter`` (or ``out/model``), with its recipe, the record and the card."""
    full = cfg.full_finetune
    train_cfg = cfg.train_config()
    if full:  # RL from a fully fine-tuned model: it is the base, its heads (OFT's) the starting heads
        train_cfg.model = dataclasses.replace(train_cfg.model, name_or_path=str(out / MODEL_DIR), hub_id=None)
        if any(n.startswith("action_head.") for n, _ in policy.named_parameters()):
            heads = str(out / MODEL_DIR / ACTION_HEADS_FILE)
            train_cfg.policy = dataclasses.replace(train_cfg.policy, action_head_file=heads)
    target = out / (MODEL_DIR if full else ADAPTER_DIR)

    def write(staging: Path) -> None:
        if full:
            save_full_model(policy, staging)
        else:
            from rvla_peft.policies.registry import base_model_id

            policy.save_pretrained(staging, base_model_id=base_model_id(cfg.model))
            (staging / VALUE_HEAD_FILE).unlink(missing_ok=True)  # untrained here: RL starts its own critic
        (staging / RECIPE_FILE).write_text(dump_yaml(train_cfg))
        (staging / SFT_RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        (staging / CARD_FILE).write_text(str(warmup_card(record, full=full)))

    atomic_save(target, write)


if __name__ == "__main__":  # the command lives in rvla_peft/cli/sft.py
    import sys

    from rvla_peft.cli.sft import main

    sys.exit(main())
