"""bench/gpu_acceptance.py: its tolerances (pure), its plan, the in-memory random architectures it builds, and the
command itself end to end in its --cpu-smoke mode (the same code on the tiny architectures)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import BENCH

from rvla_peft.config import load_config


@pytest.fixture(scope="module")
def acceptance():
    import importlib

    sys.path.insert(0, str(BENCH))  # a script of bench/, with dataclasses: imported by name
    try:
        return importlib.import_module("gpu_acceptance")
    finally:
        sys.path.remove(str(BENCH))


def ppo_record(kl=0.0, clip=0.0, steps=1.0, peak=10.0, estimate=10.0, updates=2):
    rows = [{"ppo/approx_kl": kl, "ppo/clip_frac": clip, "ppo/optimizer_steps": steps}] * updates
    return {
        "name": "openvla_lora",
        "kind": "ppo",
        "expected_updates": 2,
        "result": {"updates": rows, "peak_gib": peak, "estimate_gib": estimate},
    }


def test_judge_passes_within_tolerance_and_fails_past_it(acceptance):
    judge, tol = acceptance.judge, acceptance.TOLERANCES
    assert tol == {"memory_over_estimate": 1.25, "approx_kl": 1e-3, "clip_frac": 0.0}
    assert judge(ppo_record()) == []
    assert judge(ppo_record(peak=12.5, estimate=10.0)) == []  # exactly at x 1.25
    assert judge(ppo_record(kl=1e-3)) == []
    assert judge(ppo_record(peak=None)) == []  # CPU: no CUDA peak to compare
    # past each tolerance: one line per failure, naming the check and the numbers
    assert judge(ppo_record(peak=12.6, estimate=10.0)) == [
        "openvla_lora: peak allocated 12.60 GiB > estimate 10.00 GiB x 1.25"
    ]
    assert judge(ppo_record(kl=2e-3, updates=2)) == [
        "openvla_lora: update 1 first-minibatch approx_kl 0.002 > 0.001",
        "openvla_lora: update 2 first-minibatch approx_kl 0.002 > 0.001",
    ]
    assert judge(ppo_record(clip=0.25, updates=2))[0] == "openvla_lora: update 1 first-minibatch clip_frac 0.25 > 0.0"
    assert judge(ppo_record(steps=0.0, updates=2)) == [
        "openvla_lora: update 1 took no optimizer step",
        "openvla_lora: update 2 took no optimizer step",
    ]
    assert judge(ppo_record(updates=1)) == ["openvla_lora: 1 update(s) recorded, expected 2"]
    assert judge(ppo_record(peak=3.0, estimate=None)) == [
        "openvla_lora: no memory estimate to compare the measured 3.00 GiB with"
    ]
    assert judge(ppo_record(kl=float("nan")))[0].startswith("openvla_lora: update 1 first-minibatch approx_kl nan")
    # an error or a timeout fails; a skip does not; envs need a positive rate; a launch its exit 0
    assert judge({"name": "pi0", "kind": "ppo", "error": "timed out after 300 s"}) == ["pi0: timed out after 300 s"]
    assert judge({"name": "two_rank", "kind": "launch", "skip": "needs two GPUs (1 here)"}) == []
    assert judge({"name": "envs_64", "kind": "envs", "result": {"alone": 900.0, "policy": 0.0}}) == [
        "envs_64: env-steps/s (policy) is 0.0, expected > 0"
    ]
    assert judge({"name": "two_rank", "kind": "launch", "result": {"returncode": 1}}) == [
        "two_rank: the launch exited 1"
    ]


def test_the_plan_keeps_each_recipes_micro_batch(acceptance):
    from rvla_peft.memory import estimate_training_memory, micro_batch_size

    checks = {c.name: c for c in acceptance.plan(cpu_smoke=False, physx=False, gpus=1)}
    assert list(checks) == ["envs_16", "openvla_lora", "openvla_qlora", "openvla_oft", "pi0", "two_rank"]
    assert "PhysX GPU library missing" in checks["envs_16"].what and checks["two_rank"].skip
    with_physx = [c.name for c in acceptance.plan(cpu_smoke=False, physx=True, gpus=2)]
    assert with_physx[:2] == ["envs_64", "envs_256"]
    assert not acceptance.plan(cpu_smoke=False, physx=True, gpus=2)[-1].skip
    for name, model, micro in (
        ("openvla_lora", "random:openvla-7b", 8),  # 64 x 80 / 40 / 16
        ("openvla_qlora", "random:openvla-7b", 1),  # 16 x 80 / 40 / 32
        ("openvla_oft", "random:openvla-7b-oft", 8),  # 64 x 10 / 20 / 4
        ("pi0", "random:pi0", 16),  # 64 x 16 / 16 / 4
    ):
        check = checks[name]
        recipe = load_config(check.recipe)
        ppo = recipe.ppo
        assert micro == micro_batch_size(
            recipe.env.num_envs, ppo.num_steps, ppo.num_minibatches, ppo.gradient_accumulation_steps
        )
        cfg = load_config(check.recipe, check.overrides)
        assert cfg.model.name_or_path == model and cfg.model.adapter is None and cfg.ppo.num_minibatches == 1
        assert cfg.env.sim_backend == "physx_cpu" and cfg.env.render_backend == "gpu"
        # the estimate (meta device, the random architecture's config) sees the recipe's micro-batch, or all 32
        assert estimate_training_memory(cfg).micro_batch == min(micro, cfg.env.num_envs * cfg.ppo.num_steps)


def test_a_random_architecture_is_built_in_memory_as_its_checkpoint_loads():
    """random:tiny-openvla: the builtin's architecture, random weights, nothing written; 4-bit quantized in memory
    has the bitsandbytes layers (and skips) that from_pretrained gives the saved builtin."""
    import bitsandbytes as bnb

    from rvla_peft.config import ModelConfig
    from rvla_peft.policies.registry import load_base

    built, _ = load_base(ModelConfig(name_or_path="random:tiny-openvla"))
    loaded, _ = load_base(ModelConfig(name_or_path="builtin:tiny-openvla"))
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in loaded.state_dict().items()}
    projections = [k for k in loaded.state_dict() if k.endswith("proj.weight")]
    assert projections and not any(torch.equal(built.state_dict()[k], loaded.state_dict()[k]) for k in projections)
    q_built, _ = load_base(ModelConfig(name_or_path="random:tiny-openvla", quantization="4bit"))
    q_loaded, _ = load_base(ModelConfig(name_or_path="builtin:tiny-openvla", quantization="4bit"))
    kinds = {n: type(m).__name__ for n, m in q_loaded.named_modules() if isinstance(m, (torch.nn.Linear,))}
    assert {n: type(m).__name__ for n, m in q_built.named_modules() if isinstance(m, torch.nn.Linear)} == kinds
    assert (
        sum(isinstance(m, bnb.nn.Linear4bit) for m in q_built.modules())
        == sum(isinstance(m, bnb.nn.Linear4bit) for m in q_loaded.modules())
        > 0
    )
    assert q_built.is_loaded_in_4bit and not any(p.is_meta for p in q_built.parameters())
    with pytest.raises(ValueError, match="unknown random architecture 'random:openvla-13b'; available: random:"):
        load_base(ModelConfig(name_or_path="random:openvla-13b"))
    with pytest.raises(ValueError, match="quantized in memory to 4bit only"):
        load_base(ModelConfig(name_or_path="random:tiny-openvla", quantization="8bit"))


@pytest.mark.parametrize("name, hub_id", [("openvla-7b", "openvla/openvla-7b"), ("pi0", "lerobot/pi0_base")])
def test_the_full_size_random_architectures_are_the_published_ones(name, hub_id):
    """random:openvla-7b and random:pi0 (on the meta device here: a GPU builds them for real) have the parameters
    of the published configs the memory estimate knows, and a processor that reads a 224 px frame."""
    import numpy as np
    from transformers import AutoConfig

    from rvla_peft.config import ModelConfig
    from rvla_peft.memory import KNOWN_CONFIGS, build_meta_model
    from rvla_peft.policies.registry import load_base

    model, processor = load_base(ModelConfig(name_or_path=f"random:{name}", torch_dtype="bfloat16"), device="meta")
    published = build_meta_model(AutoConfig.for_model(**KNOWN_CONFIGS[hub_id]()))
    assert {k: v.shape for k, v in model.named_parameters()} == {k: v.shape for k, v in published.named_parameters()}
    assert sum(p.numel() for p in model.parameters()) > (7e9 if name == "openvla-7b" else 3e9)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    frame = np.zeros((224, 224, 3), dtype=np.uint8)
    text = "In: What action should the robot take to push the cube?\nOut:" if name == "openvla-7b" else "push the cube"
    inputs = processor(text=text, images=frame, return_tensors="pt")
    config = getattr(model.config, "vlm_config", model.config)  # pi0: its PaliGemma's
    assert int(inputs["input_ids"].max()) < config.get_text_config().vocab_size
    if name == "pi0":  # one image token per 14 px patch, the id the model places the image at
        assert int((inputs["input_ids"] == config.image_token_id).sum()) == (224 // 14) ** 2


@pytest.mark.integration
def test_cpu_smoke_runs_every_check_and_writes_the_table(tmp_path):
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(BENCH / "gpu_acceptance.py"), "--cpu-smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(BENCH.parent), "OMP_NUM_THREADS": "1"},
    )
    wall = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == ["envs_2", "openvla_lora", "openvla_qlora", "openvla_oft", "pi0", "two_rank"]
    assert checks["two_rank"]["skip"] == "needs two GPUs (0 here)"
    for name, check in checks.items():
        assert check["failures"] == [] and "error" not in check, name
        if name != "two_rank":
            assert check["result"], name
    for name in ("openvla_lora", "openvla_qlora", "openvla_oft", "pi0"):
        (row,) = checks[name]["result"]["updates"]
        assert row["ppo/approx_kl"] == 0.0 and row["ppo/optimizer_steps"] == 1.0, name  # fp32: exactly the same
        assert checks[name]["result"]["estimate_gib"] > 0
    assert checks["openvla_qlora"]["result"]["quantization"] == "4bit"
    assert checks["envs_2"]["result"]["alone"] > 0 and checks["envs_2"]["result"]["policy"] > 0
    table = (tmp_path / "gpu_acceptance.md").read_text()
    assert "| openvla_qlora | passed |" in table and "All checks passed." in table
    print(f"cpu smoke: {wall:.0f} s")
