"""One acceptance command for a GPU: every GPU path of the project on random-weight models of the real
architectures, built in memory from their configs (no weights downloaded, no checkpoint written), in ~10 minutes
on one 80 GB GPU.

    python bench/gpu_acceptance.py [--out DIR]               # a CUDA GPU (two for the 2-rank launch)
    python bench/gpu_acceptance.py --cpu-smoke --out DIR     # the same code on the tiny architectures, on the CPU

Checks, each in a fresh process with its own timeout (a CUDA out-of-memory or a PhysX failure in one does not stop
the others):

- ``envs_64``, ``envs_256``: ManiSkill at 224 px, env-steps/s alone and with the policy acting
  (``bench/bench_gpu.py``'s measurement), on ``physx_cuda`` with GPU rendering; where SAPIEN's PhysX GPU library is
  missing, CPU simulation with GPU rendering of 16 envs (the table says so; ``python -m rvla_peft.renderer physx``
  installs the library).
- ``openvla_lora`` (2 updates), ``openvla_qlora`` (2 updates, 4-bit quantized in memory), ``openvla_oft`` and
  ``pi0`` (1 update each): the real trainer on the GPU recipes with ``model.name_or_path=random:...`` and short
  rollouts, in micro-batches of the recipe's size, one minibatch per update. Read through a ``TrainerCallback``: each
  update's ``ppo/approx_kl`` (one minibatch, before any optimizer step of the update: the first minibatch's, ~0
  when rollouts act as the update evaluates) and ``ppo/clip_frac``; ``torch.cuda.max_memory_allocated`` from the
  built model to the end (weights included) against ``rvla_peft.memory``'s estimate without the CUDA context.
- ``two_rank``: ``accelerate launch --config_file accelerate_configs/multi_gpu.yaml --num_processes 2`` of the
  LoRA check's training, one update, where two GPUs exist.

Tolerances (:data:`TOLERANCES`): measured peak <= estimate x 1.25; approx_kl <= 1e-3 at every update's first
minibatch; clip_frac 0 there; an optimizer step taken; env-steps/s > 0; a check that errors or times out fails.
Writes ``DIR/gpu_acceptance.json`` and ``DIR/gpu_acceptance.md``; exits 1 with one line per failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("USE_HUB_KERNELS", "0")  # transformers' Hub kernels: code fetched at run time

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
GIB = 2**30

TOLERANCES = {
    "memory_over_estimate": 1.25,  # measured peak allocated / estimate (without the CUDA context)
    "approx_kl": 1e-3,  # at each update's first minibatch (before any optimizer step of the update)
    "clip_frac": 0.0,  # there too: no sample's ratio outside [1 - clip, 1 + clip]
}


@dataclasses.dataclass
class Check:
    name: str
    kind: str  # "envs" | "ppo" | "launch"
    what: str  # one line for the table
    recipe: str = ""
    overrides: list[str] = dataclasses.field(default_factory=list)
    updates: int = 1
    num_envs: int = 0
    timeout_s: float = 300.0
    skip: str | None = None  # why it does not run here


# ---------------------------------------------------------------------------------------------------------------
# the plan


def physx_library() -> Path | None:
    """SAPIEN's PhysX GPU library where SAPIEN looks, or None when it is missing (it would download it)."""
    from rvla_peft.renderer import PHYSX_LIBRARY, physx_folder

    path = physx_folder() / PHYSX_LIBRARY
    return path if path.is_file() else None


def env_backends(cpu_smoke: bool, physx: bool) -> list[str]:
    if cpu_smoke:
        return ["env.sim_backend=physx_cpu", "env.render_backend=cpu"]
    if physx:
        return ["env.sim_backend=physx_cuda", "env.render_backend=gpu"]
    return ["env.sim_backend=physx_cpu", "env.render_backend=gpu"]


def ppo_overrides(recipe: Path, model: str, samples_per_env: int, num_envs: int, run: list[str]) -> list[str]:
    """Short rollouts, one minibatch per update in micro-batches of the recipe's own size (what its memory is)."""
    from rvla_peft.config import load_config
    from rvla_peft.memory import micro_batch_size

    ppo = load_config(recipe).ppo
    env = load_config(recipe).env
    micro = micro_batch_size(env.num_envs, ppo.num_steps, ppo.num_minibatches, ppo.gradient_accumulation_steps)
    samples = num_envs * samples_per_env
    accumulation = max(1, min(samples, samples // micro))
    return [
        f"model.name_or_path={model}",
        "model.adapter=null",  # no warm-up adapter: a fresh LoRA
        "model.hub_id=null",
        f"env.num_envs={num_envs}",
        f"ppo.num_steps={samples_per_env}",
        "ppo.num_minibatches=1",
        "ppo.update_epochs=1",
        f"ppo.gradient_accumulation_steps={accumulation}",
        "eval_every=0",
        "eval_episodes=0",
        "save_every=0",
        "report_to=[]",
        *run,
    ]


def plan(cpu_smoke: bool, physx: bool, gpus: int) -> list[Check]:
    backends = env_backends(cpu_smoke, physx)
    if cpu_smoke:
        run = [
            "model.torch_dtype=float32",
            "mixed_precision='no'",  # quoted: YAML reads a bare no as False
            "env.image_size=64",
            "env.max_episode_steps=8",
            *backends,
        ]
        models = {"openvla": "random:tiny-openvla", "oft": "random:tiny-openvla", "pi0": "random:tiny-pi0"}
        num_envs, steps, updates, timeout = 2, 4, (1, 1), 110.0
    else:
        run = backends
        models = {"openvla": "random:openvla-7b", "oft": "random:openvla-7b-oft", "pi0": "random:pi0"}
        num_envs, steps, updates, timeout = 8, 4, (2, 1), 300.0
    sim = "physx_cuda + GPU rendering" if physx else "CPU simulation + GPU rendering (PhysX GPU library missing)"
    if cpu_smoke:
        sim = "CPU simulation + CPU rendering (smoke)"
    env_sizes = [2] if cpu_smoke else ([64, 256] if physx else [16])
    image = 64 if cpu_smoke else 224
    checks = [
        Check(
            f"envs_{n}",
            "envs",
            f"{n} envs, {image} px, {sim}",
            recipe=str(RECIPES / "tiny_cpu.yaml"),
            overrides=[f"env.image_size={image}", "env.max_episode_steps=50", *backends],
            num_envs=n,
            timeout_s=timeout if cpu_smoke else 240.0,
        )
        for n in env_sizes
    ]
    ppo = [
        ("openvla_lora", "openvla_maniskill.yaml", models["openvla"], [], updates[0], "OpenVLA LoRA PPO"),
        ("openvla_qlora", "openvla_qlora_maniskill.yaml", models["openvla"], [], updates[0], "OpenVLA QLoRA PPO"),
        ("openvla_oft", "openvla_oft_maniskill.yaml", models["oft"], ["policy.action_head_file=null"], updates[1],
         "OpenVLA-OFT LoRA PPO (fresh action head)"),
        ("pi0", "pi0_maniskill.yaml", models["pi0"], ["model.processor_name_or_path=null"], updates[1],
         "pi0 LoRA PPO"),
    ]  # fmt: skip
    precision = "fp32" if cpu_smoke else "bf16"
    for name, recipe, model, extra, n_updates, what in ppo:
        overrides = ppo_overrides(RECIPES / recipe, model, steps, num_envs, [*run, *extra])
        what = f"{what}, {model} {precision}, {num_envs} envs x {steps} steps, {n_updates} update(s)"
        checks.append(Check(name, "ppo", what, str(RECIPES / recipe), overrides, n_updates, timeout_s=timeout))
    lora = next(c for c in checks if c.name == "openvla_lora")
    two = Check("two_rank", "launch", "2-rank accelerate launch of openvla_lora, 1 update", lora.recipe,
                lora.overrides, 1, timeout_s=timeout if cpu_smoke else 360.0)  # fmt: skip
    if gpus < 2:
        two.skip = f"needs two GPUs ({gpus} here)"
    checks.append(two)
    return checks


# ---------------------------------------------------------------------------------------------------------------
# the tolerances (pure)


def judge(check: dict, tolerances: dict[str, float] = TOLERANCES) -> list[str]:
    """The failures of one check's record, one line each (empty: passed). ``check`` holds ``name``, ``kind`` and
    either ``error`` or ``result``."""
    name = check["name"]
    if check.get("skip"):
        return []
    if check.get("error"):
        return [f"{name}: {check['error']}"]
    result = check.get("result") or {}
    failures = []
    if check["kind"] == "envs":
        for key in ("alone", "policy"):
            if not result.get(key, 0) > 0:
                failures.append(f"{name}: env-steps/s ({key}) is {result.get(key)}, expected > 0")
    elif check["kind"] == "ppo":
        updates = result.get("updates") or []
        if len(updates) != check.get("expected_updates", len(updates)) or not updates:
            failures.append(f"{name}: {len(updates)} update(s) recorded, expected {check.get('expected_updates')}")
        for i, row in enumerate(updates, 1):
            kl, clip = row.get("ppo/approx_kl"), row.get("ppo/clip_frac")
            if kl is None or not abs(kl) <= tolerances["approx_kl"]:
                failures.append(f"{name}: update {i} first-minibatch approx_kl {kl} > {tolerances['approx_kl']}")
            if clip is None or clip > tolerances["clip_frac"]:
                failures.append(f"{name}: update {i} first-minibatch clip_frac {clip} > {tolerances['clip_frac']}")
            if not row.get("ppo/optimizer_steps", 0) >= 1:
                failures.append(f"{name}: update {i} took no optimizer step")
        peak, estimate = result.get("peak_gib"), result.get("estimate_gib")
        if peak is not None:
            if estimate is None:
                failures.append(f"{name}: no memory estimate to compare the measured {peak:.2f} GiB with")
            elif peak > estimate * tolerances["memory_over_estimate"]:
                failures.append(
                    f"{name}: peak allocated {peak:.2f} GiB > estimate {estimate:.2f} GiB x "
                    f"{tolerances['memory_over_estimate']}"
                )
    elif check["kind"] == "launch" and result.get("returncode", 1) != 0:
        failures.append(f"{name}: the launch exited {result.get('returncode')}")
    return failures


# ---------------------------------------------------------------------------------------------------------------
# one check, in its own process


def run_envs(check: Check, device: str) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_gpu import child

    autocast = "none" if device == "cpu" else "bf16"
    steps = 4 if device == "cpu" else 40
    return child(check.recipe, [], check.num_envs, steps, autocast, backends=check.overrides, device=device) | {
        "steps": steps
    }


def run_ppo(check: Check, out: Path) -> dict:
    import torch

    from rvla_peft.callbacks import TrainerCallback
    from rvla_peft.config import load_config
    from rvla_peft.memory import EstimateUnavailable, estimate_training_memory
    from rvla_peft.trainer import RobustPPOTrainer

    cfg = load_config(check.recipe, [*check.overrides, f"total_updates={check.updates}", f"output_dir={out}"])
    try:
        estimate = estimate_training_memory(cfg)
        estimate_gib = estimate.total - estimate.cuda_context
    except EstimateUnavailable:
        estimate, estimate_gib = None, None

    class Record(TrainerCallback):
        def __init__(self) -> None:
            self.rows: list[dict] = []

        def on_update_end(self, trainer, update, metrics):
            row = {k: metrics.get(k) for k in ("ppo/approx_kl", "ppo/clip_frac", "ppo/optimizer_steps")}
            if torch.cuda.is_available():
                row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
            self.rows.append(row)

    record = Record()
    start = time.perf_counter()
    trainer = RobustPPOTrainer(cfg, callbacks=[record])
    built_s = time.perf_counter() - start
    cuda = trainer.accelerator.device.type == "cuda"
    if cuda:  # the peak of training (weights included), not the transient of building a 4-bit base in bf16 first
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    result = {
        "device": str(trainer.accelerator.device),
        "build_s": built_s,
        "train_s": time.perf_counter() - start - built_s,
        "updates": record.rows,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "estimate_gib": estimate_gib,
        "quantization": cfg.model.quantization,
        "micro_batch": estimate.micro_batch if estimate else None,
        "samples": cfg.env.num_envs * cfg.ppo.num_steps,
    }
    if cfg.model.quantization != "none":
        result["note"] = "quantized in memory (bitsandbytes layers chosen by transformers' quantizer)"
    return result


def run_launch(check: Check, out: Path) -> dict:
    config = ROOT / "accelerate_configs" / "multi_gpu.yaml"  # what a user launches with; the count given here
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2"]
    cmd += ["-m", "rvla_peft.train", check.recipe, *check.overrides, "total_updates=1", f"output_dir={out}"]
    done = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, timeout=check.timeout_s, stdin=subprocess.DEVNULL
    )
    tail = (done.stdout + done.stderr)[-1500:]
    return {"returncode": done.returncode, "log_tail": tail if done.returncode else ""}


def child_main(spec: dict) -> None:
    check = Check(**spec["check"])
    with tempfile.TemporaryDirectory(prefix=f"rvla_accept_{check.name}.") as out:
        if check.kind == "envs":
            result = run_envs(check, spec["device"])
        elif check.kind == "ppo":
            result = run_ppo(check, Path(out) / "run")
        else:
            result = run_launch(check, Path(out) / "run")
    print("RESULT " + json.dumps(result), flush=True)


def run_check(check: Check, device: str) -> dict:
    record = {"name": check.name, "kind": check.kind, "what": check.what, "expected_updates": check.updates}
    if check.skip:
        return record | {"skip": check.skip, "wall_s": 0.0}
    spec = json.dumps({"check": dataclasses.asdict(check), "device": device})
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--child", spec], capture_output=True, text=True, cwd=ROOT,
            timeout=check.timeout_s, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                str(ROOT), os.environ.get("PYTHONPATH")]))},
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return record | {"error": f"timed out after {check.timeout_s:.0f} s", "wall_s": time.perf_counter() - start}
    record["wall_s"] = time.perf_counter() - start
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        last = [x for x in done.stderr.strip().splitlines() if x.strip()][-1:] or [f"exit {done.returncode}"]
        record["error"] = f"exited {done.returncode}: {last[0][:300]}"
        record["log_tail"] = done.stderr[-3000:]
        return record
    return record | {"result": json.loads(lines[-1][len("RESULT ") :])}


# ---------------------------------------------------------------------------------------------------------------
# the report


def measured(check: dict) -> str:
    r = check.get("result") or {}
    if check["kind"] == "envs" and r:
        peak = "" if r.get("peak_gib") is None else f"; peak {r['peak_gib']:.2f} GiB allocated"
        return f"{r['alone']:.0f} env-steps/s alone, {r['policy']:.0f} with the policy{peak}"
    if check["kind"] == "ppo" and r:
        kls = ", ".join(f"{row['ppo/approx_kl']:.1e}" for row in r["updates"])
        peak = "n/a (CPU)" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f} GiB"
        est = "n/a" if r.get("estimate_gib") is None else f"{r['estimate_gib']:.2f} GiB"
        note = f"; {r['note']}" if r.get("note") else ""
        return f"approx_kl {kls}; peak {peak} vs estimate {est}; micro-batch {r.get('micro_batch')}{note}"
    if check["kind"] == "launch" and r:
        return f"exit {r['returncode']}"
    return ""


def markdown(report: dict) -> str:
    lines = [
        f"# GPU acceptance ({report['mode']}): {report['device']}",
        "",
        f"torch {report['torch']}, {report['started']}; PhysX GPU library: {report['physx']}. Tolerances: peak "
        f"allocated <= estimate x {TOLERANCES['memory_over_estimate']}, first-minibatch approx_kl <= "
        f"{TOLERANCES['approx_kl']} and clip_frac {TOLERANCES['clip_frac']}, every check without error.",
        "",
        "| check | status | what | measured | wall s |",
        "|---|---|---|---|---|",
    ]
    for c in report["checks"]:
        status = "skipped: " + c["skip"] if c.get("skip") else ("FAILED" if c["failures"] else "passed")
        text = measured(c) or "; ".join(c["failures"])
        lines.append(f"| {c['name']} | {status} | {c['what']} | {text} | {c.get('wall_s', 0):.0f} |")
    failures = [f for c in report["checks"] for f in c["failures"]]
    lines += ["", "Failures:" if failures else "All checks passed.", *[f"- {f}" for f in failures]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_acceptance")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same code on the tiny architectures, on CPU")
    parser.add_argument("--only", nargs="+", help="run only these checks (names as in the table)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return 0
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_acceptance needs a CUDA GPU; on the CPU run it with --cpu-smoke")
    library = None if args.cpu_smoke else physx_library()
    gpus = 0 if args.cpu_smoke else torch.cuda.device_count()
    checks = plan(args.cpu_smoke, library is not None, gpus)
    if args.only:
        unknown = set(args.only) - {c.name for c in checks}
        if unknown:
            raise SystemExit(f"--only: unknown checks {sorted(unknown)}; known: {[c.name for c in checks]}")
        checks = [c for c in checks if c.name in args.only]
    device = "cpu" if args.cpu_smoke else "cuda"
    report = {
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
        "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "physx": "n/a (CPU smoke)" if args.cpu_smoke else (str(library) if library else "missing"),
        "tolerances": TOLERANCES,
        "checks": [],
    }
    for check in checks:
        record = run_check(check, device)
        record["failures"] = judge(record)
        report["checks"].append(record)
        status = "skipped" if record.get("skip") else ("FAILED" if record["failures"] else "passed")
        print(f"{check.name:14s} {status:8s} {record.get('wall_s', 0):6.1f} s  {measured(record)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_acceptance.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu_acceptance.md").write_text(markdown(report))
    failures = [f for c in report["checks"] for f in c["failures"]]
    for failure in failures:
        print(failure, file=sys.stderr)
    print(f"wrote {args.out / 'gpu_acceptance.json'} and gpu_acceptance.md", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
