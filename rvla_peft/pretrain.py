"""Behaviour cloning of a small action-token VLA on scripted-expert demonstrations: the embedded pretrained base.

    python -m rvla_peft.demos --task PushCube-v1 --task PullCube-v1 --task PickCube-v1 --episodes 500 \\
        --seed 10000 --out demos/
    python -m rvla_peft.pretrain --demos demos/ --out my-base/ --epochs 20 --seed 0
    python -m rvla_peft.eval --base my-base/ --recipe recipes/tiny_cpu.yaml --task PushCube-v1 --episodes 100

The model is the tiny Llava of ``rvla_peft.models.tiny`` (sized with ``--hidden-size`` / ``--num-layers`` / ...)
or any checkpoint given with ``--init``, fully fine-tuned (no LoRA). The forward is the project's own
:class:`~rvla_peft.policies.action_tokens.modeling.ActionTokenPolicy`, so image pre-processing, prompt and action-token
mapping are exactly what RL and evaluation use: each expert action is normalised with the policy's statistics
(``--action-low`` / ``--action-high``, identity by default) and digitised into the policy's ``--n-bins`` bins
(``ActionTokenizer.encode``), and the loss is the cross-entropy of ``policy.action_logits(obs, slots)``
(teacher-forced over the 7 action tokens), multi-task through each episode's instruction.

Episodes (not steps) are split into training and held-out validation ones. After every epoch the validation loss
and token accuracy are measured; every ``--eval-every`` epochs the policy also runs closed loop (argmax actions) on
``--eval-episodes`` episodes of each task, from reset seeds ``--eval-seed + e`` (keep them away from the demos'
seeds and from the seeds a final evaluation uses). The best checkpoint (highest mean closed-loop success, then
lowest validation loss) is written to ``--out`` with ``save_pretrained`` (model + processor, atomically: a
temporary folder swapped in), so that it loads with ``AutoModelForImageTextToText.from_pretrained`` and
``AutoProcessor.from_pretrained`` like a Hub checkpoint, with:

    policy.json     the policy settings it was trained with (n_bins, action_low/high, prompt, image size, camera,
                    control mode): a recipe that uses the checkpoint must set the same ``policy.*`` keys
    pretrain.json   the command, arguments, dataset, per-epoch metrics, the selected epoch and the wall time
    README.md       a model card saying how it was made (``rvla_peft.cards``, template ``base_card.md``)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from rvla_peft.cards import base_card
from rvla_peft.config import EnvConfig, PolicyConfig
from rvla_peft.demos import INDEX, load_demos
from rvla_peft.envs import make_envs
from rvla_peft.envs.maniskill import INSTRUCTIONS
from rvla_peft.models.tiny import CHARS, build_tiny_llava, fast_tokenizer, resolve_builtin
from rvla_peft.policies.action_tokens.configuration import ActionTokenPolicyConfig
from rvla_peft.policies.action_tokens.modeling import ActionTokenPolicy
from rvla_peft.policies.common import normalize_actions  # noqa: F401  (re-exported)
from rvla_peft.rollout import run_episodes
from rvla_peft.utils.commands import portable_command_line, portable_path
from rvla_peft.utils.constants import CARD_FILE, POLICY_SETTINGS_FILE, PRETRAIN_RECORD_FILE
from rvla_peft.utils.io import atomic_save
from rvla_peft.utils.threads import torch_threads


class PretrainError(ValueError):
    """Input that cannot be trained on (missing or empty demos, a bad option); the message says what to fix."""


# --------------------------------------------------------------------------------------------------------------
# data


@dataclass
class BCData:
    """Demo steps: images, the policy's target action slots, and each step's episode and instruction."""

    rgb: Tensor  # [T, H, W, 3] uint8
    slots: Tensor | None  # [T, A] int64, the policy's action slots of the expert actions (token policies)
    action: Tensor  # [T, A] float32, the expert actions as recorded
    step_episode: Tensor  # [T] int64
    episode_task: Tensor  # [E] int64
    episode_seed: Tensor  # [E] int64
    instructions: list[str]  # [E]
    tasks: list[str]
    index: list[dict]  # the index.json of each demo folder

    def __len__(self) -> int:
        return self.rgb.shape[0]

    @property
    def num_episodes(self) -> int:
        return len(self.instructions)


def read_demos(dirs: list[str | Path]) -> tuple[dict, list[dict]]:
    """Every episode of the demo folders ``dirs`` concatenated; a clear error for a missing, foreign or empty one."""

    parts, indexes = [], []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise PretrainError(f"demos folder {d} does not exist: record one with `python -m rvla_peft.demos`")
        if not (d / INDEX).is_file():
            raise PretrainError(f"{d} is not a demo dataset (no {INDEX}): record one with `python -m rvla_peft.demos`")
        try:
            index = json.loads((d / INDEX).read_text())
            if not sum(entry.get("episodes", 0) for entry in index.get("tasks", {}).values()):
                raise PretrainError(
                    f"{d} holds no episodes (empty dataset): record some with `python -m rvla_peft.demos`"
                )
            data = load_demos(d)
        except (ValueError, OSError, KeyError) as e:
            if isinstance(e, PretrainError):
                raise
            raise PretrainError(f"cannot read demos in {d}: {type(e).__name__}: {e}") from None
        if len(data["action"]) == 0:
            raise PretrainError(f"{d} holds no demonstration steps (empty dataset)")
        parts.append(data)
        indexes.append(index)
    if not parts:
        raise PretrainError("no demos given: pass --demos DIR")
    sizes = {tuple(p["rgb"].shape[1:]) for p in parts}
    if len(sizes) > 1:
        raise PretrainError(f"demo folders have different image shapes {sorted(sizes)}: record them at one size")
    tasks = list(dict.fromkeys(t for p in parts for t in p["tasks"]))
    merged = {key: torch.cat([p[key] for p in parts]) for key in ("rgb", "action", "episode_length", "episode_seed")}
    merged["episode_task"] = torch.cat(
        [torch.tensor([tasks.index(p["tasks"][i]) for i in p["episode_task"]]) for p in parts]
    )
    merged["instruction"] = [i for p in parts for i in p["instruction"]]
    merged["tasks"] = tasks
    return merged, indexes


def action_slots(action_tokenizer, action: Tensor) -> Tensor:
    """Expert env actions [..., A] -> the policy's action slots [..., A] (token id = first_id + slot)."""
    return action_tokenizer.env_to_slots(action)


def build_dataset(dirs: list[str | Path], action_tokenizer) -> BCData:
    return dataset_from(*read_demos(dirs), action_tokenizer)


def dataset_from(data: dict, indexes: list[dict], action_tokenizer=None) -> BCData:
    """:func:`read_demos`' output as a :class:`BCData`; the action slots only with an ``action_tokenizer``."""
    lengths = data["episode_length"]
    return BCData(
        rgb=data["rgb"],
        slots=None if action_tokenizer is None else action_slots(action_tokenizer, data["action"]),
        action=data["action"],
        step_episode=torch.repeat_interleave(torch.arange(len(lengths)), lengths),
        episode_task=data["episode_task"],
        episode_seed=data["episode_seed"],
        instructions=data["instruction"],
        tasks=data["tasks"],
        index=indexes,
    )


def split_episodes(data: BCData, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Step indices of training and validation episodes: ``val_fraction`` of each task's episodes (at least one
    when a task has two or more), drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    val_episodes = []
    for task in range(len(data.tasks)):
        episodes = (data.episode_task == task).nonzero().squeeze(-1)
        k = round(val_fraction * len(episodes))
        if val_fraction > 0 and len(episodes) >= 2:
            k = max(k, 1)
        k = min(k, len(episodes) - 1)
        val_episodes.append(episodes[torch.randperm(len(episodes), generator=gen)[:k]])
    is_val = torch.zeros(data.num_episodes, dtype=torch.bool)
    is_val[torch.cat(val_episodes)] = True
    step_val = is_val[data.step_episode]
    return (~step_val).nonzero().squeeze(-1), step_val.nonzero().squeeze(-1)


# --------------------------------------------------------------------------------------------------------------
# augmentation (uint8 in, uint8 out: the policy's own pre-processing runs after it)


def augment(rgb: Tensor, generator: torch.Generator, shift: int = 0, jitter: float = 0.0) -> Tensor:
    """Random translation by up to ``shift`` pixels (edge pixels repeated, as DrQ) and brightness / contrast
    factors in [1 - jitter, 1 + jitter], per image. [B, H, W, 3] uint8 -> same."""
    if shift <= 0 and jitter <= 0:
        return rgb
    b, h, w, _ = rgb.shape
    x = rgb.float()
    if shift > 0:
        padded = F.pad(x.permute(0, 3, 1, 2), (shift, shift, shift, shift), mode="replicate").permute(0, 2, 3, 1)
        dy = torch.randint(0, 2 * shift + 1, (b, 1, 1), generator=generator)
        dx = torch.randint(0, 2 * shift + 1, (b, 1, 1), generator=generator)
        rows = dy + torch.arange(h).view(1, h, 1)
        cols = dx + torch.arange(w).view(1, 1, w)
        x = padded[torch.arange(b).view(b, 1, 1), rows, cols]  # [B, H, W, 3]
    if jitter > 0:
        brightness = 1 + (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * jitter
        contrast = 1 + (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * jitter
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean * brightness
    return x.round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------------------------
# the loss


def observations(data: BCData, idx: Tensor, rgb: Tensor | None = None) -> dict:
    return {
        "rgb": data.rgb[idx] if rgb is None else rgb,
        "instruction": [data.instructions[e] for e in data.step_episode[idx].tolist()],
    }


def bc_loss(policy, obs: dict, slots: Tensor, label_sigma: float = 0.0) -> tuple[Tensor, Tensor]:
    """Cross-entropy of the teacher-forced action-token logits; returns (loss, logits [B, A, n_bins]).

    ``label_sigma`` > 0 spreads each target over its neighbouring bins (a Gaussian of that many bins, over the
    bin values' order), which tells the loss that a neighbouring bin is a smaller error than a far one."""
    logits = policy.action_logits(obs, slots)
    log_probs = logits.float().log_softmax(-1)
    slots = slots.to(log_probs.device)
    if label_sigma <= 0:
        loss = -log_probs.gather(-1, slots[..., None]).mean()
    else:
        order = torch.arange(logits.shape[-1], device=log_probs.device, dtype=torch.float32)
        target = torch.exp(-0.5 * ((order - slots[..., None].float()) / label_sigma) ** 2)
        target = target / target.sum(-1, keepdim=True)
        loss = -(target * log_probs).sum(-1).mean()
    return loss, logits


@torch.no_grad()
def validate(policy, data: BCData, idx: Tensor, batch_size: int) -> dict[str, float]:
    """Mean CE, token accuracy (teacher-forced argmax = demo token), per-sample all-7-tokens accuracy and the mean
    absolute error of the decoded argmax action, over ``idx``."""
    if len(idx) == 0:
        return {}
    policy.eval()
    total, correct, exact, abs_err = 0.0, 0, 0, 0.0
    tok = policy.action_tokenizer
    for start in range(0, len(idx), batch_size):
        batch = idx[start : start + batch_size]
        slots = data.slots[batch]
        loss, logits = bc_loss(policy, observations(data, batch), slots)
        pred = logits.argmax(-1).cpu()
        total += loss.item() * len(batch)
        correct += (pred == slots).sum().item()
        exact += (pred == slots).all(-1).sum().item()
        decoded = tok.unnormalize(tok.slot_to_normalized(pred))
        abs_err += (decoded - data.action[batch]).abs().mean(-1).sum().item()
    n = len(idx)
    return {"loss": total / n, "token_acc": correct / (n * data.slots.shape[1]), "exact": exact / n,
            "action_mae": abs_err / n}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# closed-loop success


class ClosedLoop:
    """One CPU env per task, kept open between evaluations; argmax actions, episodes from ``seed + e``."""

    def __init__(
        self, tasks: list[str], image_size: int, num_envs: int, max_episode_steps: int, env: EnvConfig | None = None
    ) -> None:
        """``env``: the other env settings (simulation and render backends, camera, ...; ManiSkill's defaults when
        None)."""
        self.max_steps = max_episode_steps
        self.envs = {}
        for task in tasks:
            cfg = dataclasses.replace(
                env or EnvConfig(), task=task, num_envs=num_envs, image_size=image_size,
                max_episode_steps=max_episode_steps,
            )  # fmt: skip
            self.envs[task] = make_envs(cfg)

    def __call__(self, policy, episodes: int, seed: int) -> dict[str, float]:

        policy.eval()
        # One torch thread beside the software renderer's: two spin-waiting OpenMP threads next to a busy
        # renderer (or any other process) on a 2-core machine made each forward 10-100x slower.
        with torch_threads(1), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return {
                task: run_episodes(policy, env, episodes, seed, self.max_steps, deterministic=True).success_rate
                for task, env in self.envs.items()
            }

    def close(self) -> None:
        for env in self.envs.values():
            env.close()


# --------------------------------------------------------------------------------------------------------------
# model and saving


def word_tokenizer(text_vocab: int = 256):
    """A BPE tokenizer whose merges are learnt from the prompts of the project's built-in instructions, over the
    same specials and characters as the tiny Llava's per-character one (ids below ``text_vocab``): a known prompt
    is ~15 tokens instead of ~80, and any other text still tokenises, by pieces down to single characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    template = PolicyConfig().prompt_template
    corpus = [template.format(instruction=i.lower().rstrip(".")) for i in sorted(set(INSTRUCTIONS.values()))]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
    backend.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=text_vocab, special_tokens=specials, initial_alphabet=CHARS, limit_alphabet=len(CHARS),
        show_progress=False,
    )  # fmt: skip
    backend.train_from_iterator(corpus, trainer)
    return fast_tokenizer(backend)


def build_initial_model(args, directory: Path) -> Path:
    """``--init`` as given (a folder, Hub id or builtin:NAME), or a fresh tiny Llava of the requested size (with
    ``--tokenizer words``, its processor gets :func:`word_tokenizer`)."""
    from transformers import AutoProcessor, LlavaProcessor

    if args.init:
        return Path(resolve_builtin(args.init)) if args.init.startswith("builtin:") else Path(args.init)
    build_tiny_llava(
        directory,
        seed=args.seed,
        image_size=args.image_size,
        patch_size=args.patch_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        vision_hidden_size=args.vision_hidden_size,
        vision_layers=args.vision_layers,
    )
    if args.tokenizer == "words":
        chars = AutoProcessor.from_pretrained(str(directory))
        tokenizer = word_tokenizer()
        if tokenizer.convert_tokens_to_ids("<image>") != chars.tokenizer.convert_tokens_to_ids("<image>"):
            raise RuntimeError("the word tokenizer must keep the image token's id")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (directory / name).unlink(missing_ok=True)
        LlavaProcessor(
            image_processor=chars.image_processor,
            tokenizer=tokenizer,
            patch_size=args.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        ).save_pretrained(str(directory))
    return directory


def make_policy(model_path: str | Path, policy_cfg):
    """The raw model (no LoRA: BC trains every weight) behind the project's ActionTokenPolicy."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    # no Hub kernels, as in policies.registry.load_base: transformers 5 would fetch them at load and at .train()
    model = AutoModelForImageTextToText.from_pretrained(str(model_path), dtype=torch.float32, use_kernels=False)
    processor = AutoProcessor.from_pretrained(str(model_path))
    hidden = model.config.get_text_config().hidden_size
    return ActionTokenPolicy(model, processor, policy_cfg, hidden)


def policy_settings(policy_cfg, image_size: int, index: dict) -> dict:
    return {
        "family": "action_tokens",
        "prompt_template": policy_cfg.prompt_template,
        "action_dim": policy_cfg.action_dim,
        "n_bins": policy_cfg.n_bins,
        "action_low": policy_cfg.action_low,
        "action_high": policy_cfg.action_high,
        "image_size": image_size,
        "camera": index.get("camera", "base_camera"),
        "control_mode": index.get("control_mode", "pd_ee_delta_pose"),
    }


def save_checkpoint(policy, out: Path, files: dict[str, str]) -> None:
    """Model + processor via save_pretrained, plus ``files`` (name -> text), swapped in atomically (the trainer's
    ``atomic_save``): a reader never sees a half-written checkpoint."""

    def write(staging: Path) -> None:
        policy.peft_model.save_pretrained(str(staging), safe_serialization=True)
        policy.processor.save_pretrained(str(staging))
        for name, text in files.items():
            (staging / name).write_text(text)
        for path in staging.iterdir():
            path.chmod(0o644)  # safetensors writes 0600, not what a shipped folder should have

    atomic_save(out, write)


def demo_sources(dirs: list, indexes: list[dict]) -> list[dict]:
    """One row per (demo folder, task): what the card and pretrain.json say about the data."""
    rows = []
    for d, index in zip(dirs, indexes, strict=True):
        for task, entry in index["tasks"].items():
            seeds = entry.get("seeds") or [index.get("seed", 0)]
            rows.append({
                "folder": str(d), "task": task, "instruction": entry["instruction"], "episodes": entry["episodes"],
                "steps": entry["steps"], "dropped": entry.get("dropped", 0), "first_seed": index.get("seed", 0),
                "last_seed": max(seeds), "action_noise": index.get("action_noise", 0.0),
            })  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------------------------
# training


def lr_at(step: int, total: int, warmup: int, base: float, final_fraction: float = 0.05) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def check_inputs(args: argparse.Namespace) -> Path:
    """Refuse a non-empty ``--out`` (without --overwrite) and missing demo folders before building anything."""
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise PretrainError(f"{out} exists and is not empty: choose another --out or pass --overwrite")
    for d in args.demos:
        if not Path(d).is_dir():
            raise PretrainError(f"demos folder {d} does not exist: record one with `python -m rvla_peft.demos`")
    return out


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on embeddings, norms or biases)."""
    decayed = {n for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n}
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decayed], "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n not in decayed], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def new_record(args, command: str, out: Path, settings: dict, n_params: int, data: BCData, split) -> dict:
    """What pretrain.json records: the command, the data, the model, then the history epoch by epoch. Folders are
    named as the command line does, never by this machine's absolute paths (``portable_path``): the record ships."""
    train_idx, val_idx = split
    demos = [portable_path(d) for d in args.demos]
    recorded_args = {
        **vars(args),
        "out": portable_path(args.out),
        "demos": demos,
        "init": args.init and portable_path(args.init),
        "demos_command": [portable_command_line(c) for c in args.demos_command or []] or None,
    }
    return {
        "format": "rvla_peft.pretrain/1",
        "name": args.name,
        "command": command,
        "out": portable_path(out),
        "args": recorded_args,
        "machine": args.machine_note,
        "policy": settings,
        "model": {
            "init": recorded_args["init"]
            or (
                f"tiny Llava: text hidden {args.hidden_size} x {args.num_layers} layers, vision hidden "
                f"{args.vision_hidden_size} x {args.vision_layers} layers, patch {args.patch_size}"
            ),
            "parameters": n_params,
        },
        "dataset": {
            "demos": demos,
            "tasks": data.tasks,
            "sources": demo_sources(demos, data.index),
            "train_steps": len(train_idx),
            "val_steps": len(val_idx),
            "episodes": data.num_episodes,
            "commands": recorded_args["demos_command"] or [],
        },
        "history": [],
        "best": {"epoch": 0},
        "wall_time_s": 0.0,
    }


def train_epoch(policy, optimizer, data: BCData, train_idx: Tensor, args, gen, step: int, total_steps: int, bar):
    """One pass over the training steps in a random order; returns the mean loss, samples seen and the next step."""
    policy.train()
    perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
    running, seen = 0.0, 0
    for b in range(math.ceil(len(train_idx) / args.batch_size)):
        batch = perm[b * args.batch_size : (b + 1) * args.batch_size]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, args.warmup_steps, args.lr)
        rgb = augment(data.rgb[batch], gen, args.shift, args.jitter)
        loss, _ = bc_loss(policy, observations(data, batch, rgb), data.slots[batch], args.label_sigma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.peft_model.parameters(), args.max_grad_norm)
        optimizer.step()
        step += 1
        running += loss.item() * len(batch)
        seen += len(batch)
        bar.update(1)
        bar.set_postfix(loss=f"{running / seen:.3f}")
    return running / seen, seen, step


def epoch_line(metrics: dict) -> str:
    line = " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if k != "success"
    )
    if "success" in metrics:
        line += " success " + " ".join(f"{t}={r:.2f}" for t, r in metrics["success"].items())
    return line


def pretrain(args: argparse.Namespace, command: str = "") -> dict:
    start_time = time.perf_counter()
    out = check_inputs(args)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    policy_cfg = ActionTokenPolicyConfig(n_bins=args.n_bins, action_low=args.action_low, action_high=args.action_high)

    with tempfile.TemporaryDirectory(prefix="rvla_pretrain_init.") as init_dir:
        init_path = build_initial_model(args, Path(init_dir))
        policy = make_policy(init_path, policy_cfg)
    data = build_dataset(args.demos, policy.action_tokenizer)
    image_size = data.rgb.shape[1]
    if policy.image_hw != (image_size, image_size):
        print(f"note: demos are {image_size} px, the model takes {policy.image_hw}: images are resized", flush=True)
    train_idx, val_idx = split_episodes(data, args.val_fraction, args.seed)
    if len(train_idx) == 0:
        raise PretrainError("no training steps left after holding out validation episodes: lower --val-fraction")
    n_params = sum(p.numel() for p in policy.peft_model.parameters())
    optimizer = make_optimizer(policy.peft_model, args)
    steps_per_epoch = math.ceil(len(train_idx) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    gen = torch.Generator().manual_seed(args.seed)
    settings = policy_settings(policy_cfg, image_size, data.index[0])
    record = new_record(args, command, out, settings, n_params, data, (train_idx, val_idx))
    print(
        f"{n_params / 1e6:.2f} M parameters; {len(train_idx)} training / {len(val_idx)} validation steps of "
        f"{data.num_episodes} episodes ({', '.join(data.tasks)}); {args.epochs} epochs x {steps_per_epoch} steps",
        flush=True,
    )

    closed_loop = None
    if args.eval_episodes > 0 and args.eval_every > 0:
        closed_loop = ClosedLoop(args.eval_tasks or data.tasks, image_size, args.eval_num_envs, args.max_episode_steps)
    best_key, step = None, 0
    try:
        bar = tqdm(total=total_steps, desc="BC", unit="step", dynamic_ncols=True)
        for epoch in range(1, args.epochs + 1):
            epoch_start = time.perf_counter()
            train_loss, seen, step = train_epoch(policy, optimizer, data, train_idx, args, gen, step, total_steps, bar)
            train_s = time.perf_counter() - epoch_start
            metrics = {"epoch": epoch, "train_loss": train_loss, "train_s": round(train_s, 1),
                       "samples_per_s": round(seen / train_s, 1)}  # fmt: skip
            metrics.update({f"val_{k}": v for k, v in validate(policy, data, val_idx, args.batch_size * 2).items()})
            due = closed_loop is not None and (epoch % args.eval_every == 0 or epoch == args.epochs)
            if due:
                eval_start = time.perf_counter()
                success = closed_loop(policy, args.eval_episodes, args.eval_seed)
                metrics["success"] = success
                metrics["mean_success"] = sum(success.values()) / len(success)
                metrics["eval_s"] = round(time.perf_counter() - eval_start, 1)
            metrics["elapsed_s"] = round(time.perf_counter() - start_time, 1)
            record["history"].append(metrics)
            bar.write(epoch_line(metrics))
            # The best: highest closed-loop success where measured, then the lowest validation loss.
            if closed_loop is None or due:
                key = (metrics.get("mean_success", 0.0), -metrics.get("val_loss", metrics["train_loss"]))
                if best_key is None or key > best_key:
                    best_key = key
                    record["best"] = metrics
                    record["wall_time_s"] = round(time.perf_counter() - start_time, 1)
                    save_checkpoint(policy, out, _files(record))
                    bar.write(f"saved epoch {epoch} to {out}")
        bar.close()
    finally:
        if closed_loop is not None:
            closed_loop.close()
    record["wall_time_s"] = round(time.perf_counter() - start_time, 1)
    (out / PRETRAIN_RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")  # full history, final wall time
    (out / CARD_FILE).write_text(str(base_card(record)))
    print(f"best epoch {record['best']['epoch']}; wrote {out} in {record['wall_time_s'] / 60:.1f} min", flush=True)
    return record


def _files(record: dict) -> dict[str, str]:
    return {
        POLICY_SETTINGS_FILE: json.dumps(record["policy"], indent=2) + "\n",
        PRETRAIN_RECORD_FILE: json.dumps(record, indent=2) + "\n",
        CARD_FILE: str(base_card(record)),
    }


if __name__ == "__main__":  # the command lives in rvla_peft/cli/pretrain.py
    import sys

    from rvla_peft.cli.pretrain import main

    sys.exit(main())
