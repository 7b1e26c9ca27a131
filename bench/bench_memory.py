"""GPU memory of training, estimated and measured: rvla_peft.memory's figures for OpenVLA-7B (meta device, nothing
downloaded), then real PPO updates of the tiny model in fp32 and in 4-bit, each in a fresh process, against the
estimate for that same config.

    python bench/bench_memory.py                       # 7B estimates + tiny runs (CPU or GPU, whichever is here)
    python bench/bench_memory.py --tiny builtin:tiny-openvla --updates 3 env.num_envs=4
    python bench/bench_memory.py --full-7b             # GPU only: a random full-size OpenVLA-7B, bf16 vs 4-bit

A run = the real trainer: ``RobustPPOTrainer(cfg)``, one ``collect``, then ``--updates`` calls of ``update`` on that
rollout (the first allocates AdamW's states; the time is the median of the others). Measured on CPU: the process's
peak RSS (``ru_maxrss``: torch, ManiSkill and the renderer included) and the growth of the resident set during the
updates (``VmHWM`` after resetting it, minus the RSS before the first update, after ``malloc_trim``), which is what the
estimate's gradients + AdamW states + activations + Jacobian pass predict, allocator slack included. Anywhere: the peak
of the tensors alive at once during one more update (a ``TorchDispatchMode`` that follows every storage created), vs
gradients + activations + Jacobian pass. On CUDA also ``torch.cuda.max_memory_allocated`` over the process (vs the
estimate's total without the CUDA context) and its growth over the updates.

``--full-7b`` writes a randomly initialised OpenVLA-7B (the published architecture, bf16, ~15 GB) with the tiny
model's character tokenizer and a 224 px processor to ``--checkpoint-dir``, then runs ``openvla_qlora_maniskill.yaml``
on it with ``model.quantization`` none and 4bit (short rollouts: ``ppo.num_steps=8``, same micro-batch).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
MIB = 2**20
RUN_SETTINGS = ["report_to=[]", "eval_episodes=0", "total_updates=1"]


# ---------------------------------------------------------------------------------------------------------------
# measured: one configuration per fresh process


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    """VmHWM: the peak resident set since the last reset (``_reset_hwm``)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS to the current RSS (Linux >= 4.0)
        f.write("5")


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the block and alive at once: what the update itself holds,
    free of the allocator's slack (each storage counted once, released when Python frees it)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                if storage.data_ptr() and id(storage) not in self.live:
                    self.live[id(storage)] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._release, id(storage))
        return out


def child(recipe: str, overrides: list[str], updates: int) -> dict:
    """Build the trainer, collect once, run ``updates`` PPO updates; what they cost in time and memory."""
    from rvla_peft.config import load_config
    from rvla_peft.rollout import collect
    from rvla_peft.trainer import RobustPPOTrainer

    cfg = load_config(recipe, overrides)
    trainer = RobustPPOTrainer(cfg)
    cuda = trainer.accelerator.device.type == "cuda"
    obs = trainer.train_env.reset(seed=cfg.seed)
    trainer.policy.eval()
    rollout, _ = collect(trainer.policy, trainer.train_env, obs, cfg.ppo.num_steps, cfg.ppo.gamma)
    trainer.policy.train()

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so that RSS counts live memory
    rss_before = _rss_bytes()
    _reset_hwm()
    if cuda:
        torch.cuda.synchronize()
        allocated_before, peak_before = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(updates):
        start = time.perf_counter()
        trainer.update(rollout)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    result = {
        "device": str(trainer.accelerator.device),
        "update_s": statistics.median(seconds[1:] or seconds),
        "first_update_s": seconds[0],
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "update_rss_growth": _hwm_bytes() - rss_before,
    }
    if cuda:
        peak_update = torch.cuda.max_memory_allocated()
        result |= {"cuda_update_growth": peak_update - allocated_before, "cuda_peak": max(peak_before, peak_update)}
    with LiveTensorBytes() as live:  # one more update, untimed: AdamW's states exist, gradients are created anew
        trainer.update(rollout)
    result["update_live_peak"] = live.peak
    return result


def run_child(recipe: str, overrides: list[str], updates: int) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps({"recipe": recipe, "overrides": overrides})]
    out = subprocess.run([*cmd, "--updates", str(updates)], capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# ---------------------------------------------------------------------------------------------------------------
# estimated


def _row(label: str, est) -> str:
    return (
        f"  {label:26s} weights {est.base_weights:6.2f}  LoRA+optim {est.trainable_total:5.2f}  "
        f"activations {est.activations:6.2f} + Jacobian {est.jacobian_extra:5.2f}  "
        f"rollout {est.rollout_inference:5.2f}  total {est.total:6.1f} GiB"
    )


def print_7b_estimates() -> None:
    from rvla_peft.config import load_config
    from rvla_peft.memory import estimate_training_memory

    print("estimated GPU memory per process, OpenVLA-7B (rvla_peft.memory, meta device; an estimate):")
    for recipe in ("openvla_maniskill.yaml", "openvla_qlora_maniskill.yaml"):
        for quantization, label in (("none", "bf16 LoRA"), ("8bit", "8-bit LoRA"), ("4bit", "4-bit QLoRA")):
            cfg = load_config(RECIPES / recipe, [f"model.quantization={quantization}"])
            start = time.perf_counter()
            est = estimate_training_memory(cfg)
            elapsed = time.perf_counter() - start
            print(_row(f"{recipe.split('.')[0][:14]} {label}", est) + f"  ({elapsed:.2f} s)")
        print(
            f"    micro-batch {est.micro_batch}, Jacobian pass on {est.jacobian_samples}; base {est.base_params:,} "
            f"params, {est.quantized_params:,} in quantized layers; trainable {est.lora_params + est.head_params:,}"
        )


def compare(label: str, recipe: str, overrides: list[str], updates: int) -> None:
    from rvla_peft.config import load_config
    from rvla_peft.memory import GIB, estimate_training_memory

    est = estimate_training_memory(load_config(recipe, overrides))
    got = run_child(str(recipe), overrides, updates)
    live = (est.gradients + est.activations + est.jacobian_extra) * GIB
    predicted = live + est.optimizer_states * GIB
    print(
        f"  {label:22s} {got['device']}: update {got['update_s']:.2f} s (first {got['first_update_s']:.2f} s), "
        f"peak RSS {got['peak_rss'] / MIB:.0f} MiB\n"
        f"  {'':22s} update RSS growth {got['update_rss_growth'] / MIB:6.1f} MiB vs estimated "
        f"{predicted / MIB:6.1f} MiB (gradients + AdamW + activations + Jacobian)\n"
        f"  {'':22s} update live tensors {got['update_live_peak'] / MIB:6.1f} MiB vs estimated {live / MIB:6.1f} MiB "
        f"(gradients + activations + Jacobian)"
    )
    if "cuda_peak" in got:
        print(
            f"  {'':22s} CUDA allocated: peak {got['cuda_peak'] / GIB:6.2f} GiB vs estimated "
            f"{est.total - est.cuda_context:6.2f} GiB (total without the CUDA context); "
            f"update growth {got['cuda_update_growth'] / GIB:6.2f} GiB vs {predicted / GIB:6.2f} GiB"
        )


# ---------------------------------------------------------------------------------------------------------------
# a random full-size OpenVLA-7B (GPU machines)


def write_random_openvla_7b(directory: Path) -> Path:
    """The published architecture with random bf16 weights, built on the GPU, saved with a processor: the tiny
    model's character tokenizer (any id it makes exists in the 7B vocabulary) and OpenVLA's 224 px image processor."""
    if (directory / "config.json").exists():
        return directory
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    from rvla_peft.models.openvla import PrismaticImageProcessor, PrismaticProcessor
    from rvla_peft.models.openvla.processing import DINOSIGLIP_MEANS, DINOSIGLIP_STDS
    from rvla_peft.models.openvla.published import OPENVLA_7B_CONFIG
    from rvla_peft.models.tiny import resolve_builtin

    config = AutoConfig.for_model(**copy.deepcopy(OPENVLA_7B_CONFIG))
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    staging = Path(tempfile.mkdtemp(prefix=".openvla7b.", dir=directory.parent))
    model.save_pretrained(staging)
    del model
    image_processor = PrismaticImageProcessor(
        use_fused_vision_backbone=True,
        image_resize_strategy="resize-naive",
        input_sizes=[[3, 224, 224]] * 2,
        interpolations=["bicubic", "bicubic"],
        means=DINOSIGLIP_MEANS,
        stds=DINOSIGLIP_STDS,
    )
    tokenizer = AutoTokenizer.from_pretrained(resolve_builtin("builtin:tiny-openvla"))
    PrismaticProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(staging)
    staging.rename(directory)
    return directory


def full_7b(checkpoint_dir: Path, updates: int, extra: list[str]) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--full-7b needs a CUDA GPU")
    checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    directory = write_random_openvla_7b(checkpoint_dir)
    print(f"random OpenVLA-7B at {directory} ({time.perf_counter() - start:.0f} s)")
    recipe = RECIPES / "openvla_qlora_maniskill.yaml"
    base = [f"model.name_or_path={directory}", "model.hub_id=openvla/openvla-7b", "ppo.num_steps=8"]
    base += ["ppo.num_minibatches=4", *RUN_SETTINGS, *extra]  # 16 envs x 8 steps / 4 = 32: micro-batches of 1
    for quantization, label in (("none", "7B bf16 LoRA"), ("4bit", "7B 4-bit QLoRA")):
        compare(label, str(recipe), [*base, f"model.quantization={quantization}"], updates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", default="builtin:tiny-llava", help="tiny model of the measured runs")
    parser.add_argument("--updates", type=int, default=3, help="PPO updates per run (the first allocates AdamW)")
    parser.add_argument("--full-7b", action="store_true", help="GPU: also a random full-size OpenVLA-7B")
    parser.add_argument("--checkpoint-dir", type=Path, default=Path(tempfile.gettempdir()) / "rvla_openvla7b_random")
    parser.add_argument("--threads", type=int, help="CPU threads of the runs (a shared machine: 1 times steadily)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the measured runs")
    args = parser.parse_intermixed_args()
    if args.threads:  # inherited by the runs: OpenMP reads it at start-up
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    if args.child:
        spec = json.loads(args.child)
        with tempfile.TemporaryDirectory(prefix="rvla_bench_mem.") as out:
            result = child(spec["recipe"], [f"output_dir={out}", *spec["overrides"]], args.updates)
        print("RESULT " + json.dumps(result), flush=True)
        return

    print_7b_estimates()
    family = "openvla" if "openvla" in args.tiny else "action_tokens"
    print(f"\nmeasured: recipes/tiny_cpu.yaml with {args.tiny}, {args.updates} PPO updates per fresh process")
    for quantization, label in (("none", "fp32"), ("4bit", "4-bit (fp32 compute)")):
        overrides = [
            f"model.name_or_path={args.tiny}",
            f"policy.family={family}",
            f"model.quantization={quantization}",
        ]
        compare(label, str(RECIPES / "tiny_cpu.yaml"), [*overrides, *RUN_SETTINGS, *args.overrides], args.updates)
    if args.full_7b:
        print("\nmeasured: random OpenVLA-7B, recipes/openvla_qlora_maniskill.yaml (ppo.num_steps=8)")
        full_7b(args.checkpoint_dir, max(args.updates - 1, 1), args.overrides)


if __name__ == "__main__":
    main()
