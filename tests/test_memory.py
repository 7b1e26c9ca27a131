"""The memory estimate (rvla_peft.memory): exact parameter counts and weight bytes against real models, the
activation formula against autograd's saved tensors, the QLoRA recipe under 24 GB, and the dry run's comment."""

import contextlib
import math
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import RECIPES
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from torch.nn.attention import SDPBackend, sdpa_kernel

from rvla_peft import memory
from rvla_peft.config import load_config
from rvla_peft.memory import (
    GIB,
    Stack,
    estimate_training_memory,
    format_estimate,
    layer_activation_bytes,
    nf4_linear_bytes,
    precision_of,
)
from rvla_peft.policies.registry import lora_config, resolve_lora

OPENVLA = RECIPES / "openvla_maniskill.yaml"


@pytest.fixture(scope="module")
def estimates_7b() -> dict:
    return {
        q: estimate_training_memory(load_config(OPENVLA, [f"model.quantization={q}"]))
        for q in ("none", "8bit", "4bit")
    }


def test_7b_counts_are_the_meta_models(estimates_7b):
    cfg = load_config(OPENVLA)
    config, local = memory.load_model_config(cfg.model)
    assert local is None and config.model_type == "openvla"  # from the published config, nothing downloaded
    model = memory.build_meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for n, m in model.named_modules() if type(m) is torch.nn.Linear)
    output = model.get_output_embeddings().weight.numel()
    for est in estimates_7b.values():
        assert est.base_params == total == 7_541_237_184
    assert estimates_7b["none"].quantized_params == 0
    assert estimates_7b["4bit"].quantized_params == estimates_7b["8bit"].quantized_params == linear - output

    # the LoRA count follows peft's own target matching (injected on the meta model, weights on meta)
    lora = resolve_lora(cfg.policy.family, cfg.lora)
    inject_adapter_in_model(lora_config(model, lora), model, low_cpu_mem_usage=True)
    assert estimates_7b["none"].lora_params == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert estimates_7b["none"].head_params == 4096 * 1024 + 1024 + 1024 + 1


def test_weight_bytes_by_quantization(estimates_7b):
    bf16, int8, nf4 = (estimates_7b[q].base_weights * GIB for q in ("none", "8bit", "4bit"))
    n, quantized = estimates_7b["none"].base_params, estimates_7b["4bit"].quantized_params
    assert bf16 == 2 * n
    rest = 4 * (n - quantized)  # prepare_model_for_kbit_training upcasts every other parameter to fp32
    assert quantized * 0.5159 < nf4 - rest < quantized * 0.5160  # 0.5 + 1/64 + 4/(64*256) bytes per weight
    assert quantized < int8 - rest < quantized * 1.002  # + one fp32 scale per row: 4 / in_features per weight
    assert nf4 < int8 < bf16
    assert nf4 / bf16 == pytest.approx(0.319, abs=0.002) and int8 / bf16 == pytest.approx(0.553, abs=0.002)
    assert nf4_linear_bytes(4096 * 4096) == 4096 * 4096 // 2 + 4096 * 4096 // 64 + 4 * 1024 + 4 + 4 * 272


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_weight_bytes_equal_the_loaded_quantized_tiny_model(tiny_cfg, quantization):
    """Every byte bitsandbytes and load_base keep: packed weights, quantization states, fp32 everything else."""
    import bitsandbytes as bnb

    from rvla_peft.policies.registry import load_base

    tiny_cfg.model.quantization = quantization
    model, _ = load_base(tiny_cfg.model)
    actual = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            extra = [state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
        elif isinstance(module, bnb.nn.Linear8bitLt):
            extra = [module.weight.SCB]
        else:
            continue
        actual += sum(t.numel() * t.element_size() for t in extra)
    assert estimate_training_memory(tiny_cfg).base_weights * GIB == actual


def test_the_rollout_counts_the_copy_that_acting_holds(tiny_cfg):
    from peft.tuners.lora import LoraLayer

    from rvla_peft.policies.registry import build_policy

    policy = build_policy(tiny_cfg)
    bases = [m.get_base_layer() for m in policy.peft_model.modules() if isinstance(m, LoraLayer)]
    held = sum(t.numel() * t.element_size() for b in bases for t in b.parameters(recurse=False))
    merged = estimate_training_memory(tiny_cfg)
    tiny_cfg.policy.merge_lora_to_act = False
    unmerged = estimate_training_memory(tiny_cfg)
    assert (merged.rollout_inference - unmerged.rollout_inference) * GIB == pytest.approx(held, abs=1)


@pytest.mark.parametrize("model", ["builtin:tiny-llava", "builtin:tiny-openvla"])
def test_trainable_counts_equal_what_build_policy_creates(tiny_cfg, model):
    from rvla_peft.policies.registry import build_policy

    tiny_cfg.model.name_or_path = model
    tiny_cfg.policy.family = "openvla" if "openvla" in model else "action_tokens"
    policy = build_policy(tiny_cfg)
    lora = sum(p.numel() for n, p in policy.peft_model.named_parameters() if "lora_" in n and p.requires_grad)
    est = estimate_training_memory(tiny_cfg)
    assert est.lora_params == lora
    assert est.lora_params + est.head_params == sum(p.numel() for p in policy.trainable_parameters())


def test_qlora_recipe_fits_24_gb():
    cfg = load_config(RECIPES / "openvla_qlora_maniskill.yaml")
    assert cfg.model.quantization == "4bit" and cfg.model.name_or_path == "openvla/openvla-7b"
    est = estimate_training_memory(cfg)
    assert est.total * GIB < 24e9
    bf16 = estimate_training_memory(load_config(RECIPES / "openvla_qlora_maniskill.yaml", ["model.quantization=none"]))
    assert est.base_weights < bf16.base_weights / 3


# ---------------------------------------------------------------------------------------------------------------
# the activation formula


def test_layer_formula_is_korthikanti_without_dropout_plus_the_fp32_copies():
    h, a, s = 1024, 16, 200
    gpt = Stack("gpt", 1, s, h, 4 * h, a, h // a, a, gated=False, qkv_linears=1)
    got = layer_activation_bytes(gpt, memory.Precision(act=2, lora_input=2, shared_inputs=True, residual=2), "eager")
    paper = s * (34 * h + 5 * a * s)  # Korthikanti et al. 2022, eq. (2), per sample
    assert got == paper - s * (2 * h + 3 * a * s) + s * (4 * h + 4 * a * s)


def _saved_bytes(module, x: torch.Tensor, autocast: bool, attention: str) -> int:
    """Bytes of the distinct storages autograd saves in one forward, parameters and buffers left out."""
    skip = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    kernel = sdpa_kernel(SDPBackend.MATH) if attention == "math" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp, kernel:
        module(x)
    return sum(saved.values())


LAYER_CASES = [  # (weights, norms, autocast, attention): fp32; bf16 LoRA under autocast; QLoRA-like (fp32 norms)
    ("float32", "float32", False, "fused"),
    ("bfloat16", "bfloat16", True, "fused"),
    ("bfloat16", "bfloat16", True, "math"),
    ("bfloat16", "float32", True, "fused"),
]


@pytest.mark.parametrize("weights, norms, autocast, attention", LAYER_CASES)
def test_llama_layer_formula_matches_autograd(weights, norms, autocast, attention):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    h, i, heads, s, b, r = 256, 688, 4, 96, 4, 8
    config = LlamaConfig(hidden_size=h, intermediate_size=i, num_attention_heads=heads, num_hidden_layers=1)
    config._attn_implementation = "sdpa"

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.rotary = LlamaDecoderLayer(config, 0), LlamaRotaryEmbedding(config)

        def forward(self, x):
            positions = torch.arange(x.shape[1])[None]
            return self.layer(x, position_embeddings=self.rotary(x, positions), position_ids=positions)

    layer = Layer().to(getattr(torch, weights))
    for name, p in layer.named_parameters():
        if "norm" in name:
            p.data = p.data.to(getattr(torch, norms))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    layer = get_peft_model(layer, LoraConfig(r=r, target_modules=targets))
    x = torch.randn(b, s, h, dtype=getattr(torch, norms), requires_grad=True)  # fp32 norms: an fp32 residual stream
    measured = _saved_bytes(layer, x, autocast, attention)

    quantization = "4bit" if norms != weights else "none"  # the precision rules of a QLoRA base
    precision = precision_of(weights, quantization, "bf16" if autocast else "no")
    stack = Stack("llama", 1, s, h, i, heads, h // heads, heads, gated=True)
    expected = b * layer_activation_bytes(stack, precision, attention, r)
    if autocast:  # the 16-bit copies of the LoRA weights (the estimate adds them once per step)
        expected += 2 * sum(p.numel() for n, p in layer.named_parameters() if "lora_" in n)
    assert measured == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("autocast, attention", [(False, "fused"), (True, "fused"), (True, "math")])
def test_openvla_vit_block_formula_matches_autograd(autocast, attention):
    from rvla_peft.models.openvla import OpenVLAConfig
    from rvla_peft.models.openvla.configuration import VIT_DEFAULTS
    from rvla_peft.models.openvla.modeling import Block

    config = OpenVLAConfig(vision_backbone_id="dinosiglip-vit-so-224px")
    config._attn_implementation = "sdpa"
    h, heads, s, b, r = 256, 4, 96, 4, 8
    tower = {**VIT_DEFAULTS, "embed_dim": h, "num_heads": heads, "mlp_ratio": 4.0, "init_values": 1e-5}
    block = get_peft_model(Block(config, tower), LoraConfig(r=r, target_modules=["qkv", "proj", "fc1", "fc2"]))
    measured = _saved_bytes(block, torch.randn(b, s, h, requires_grad=True), autocast, attention)

    precision = precision_of("float32", "none", "bf16" if autocast else "no")
    stack = Stack("vit", 1, s, h, 4 * h, heads, h // heads, heads, gated=False, qkv_linears=1)
    expected = b * layer_activation_bytes(stack, precision, attention, r)
    if autocast:  # 16-bit copies of the LoRA weights and of the frozen fp32 weights
        expected += 2 * sum(p.numel() for n, p in block.named_parameters() if p.dim() == 2)
    assert measured == pytest.approx(expected, rel=0.03)


def test_micro_batch_and_jacobian_samples():
    cfg = load_config(RECIPES / "openvla_qlora_maniskill.yaml")
    est = estimate_training_memory(cfg)
    assert est.micro_batch == 16 * 80 // 40 // 32 == 1 and est.jacobian_samples == 1
    assert memory.micro_batch_size(num_envs=2, num_steps=5, num_minibatches=3, accumulation=2) == math.ceil(4 / 2)
    off = estimate_training_memory(
        load_config(RECIPES / "openvla_qlora_maniskill.yaml", ["regularizers.jacobian.weight=0"])
    )
    assert off.jacobian_samples == 0 and off.jacobian_extra == 0 and off.total < est.total


# ---------------------------------------------------------------------------------------------------------------
# the dry run


@pytest.mark.integration
def test_dry_run_prints_the_estimate_as_yaml_comments():
    result = subprocess.run(
        [sys.executable, "-m", "rvla_peft.train", str(RECIPES / "openvla_qlora_maniskill.yaml"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    comment = [line for line in result.stdout.splitlines() if line.startswith("# estimated GPU memory")]
    assert len(comment) == 1 and "GiB (weights" in comment[0] and "an estimate" in comment[0], result.stdout
    assert yaml.safe_load(result.stdout)["model"]["quantization"] == "4bit"


def test_an_unknown_hub_id_makes_the_estimate_unavailable_not_the_dry_run():
    cfg = load_config(RECIPES / "tiny_cpu.yaml", ["model.name_or_path=nobody/unknown-vla"])
    with pytest.raises(memory.EstimateUnavailable, match="nobody/unknown-vla"):
        estimate_training_memory(cfg)
    line = format_estimate(cfg)
    assert line.startswith("# estimated GPU memory per process: unavailable: ") and line.count("\n") == 1


def test_the_jacobian_pass_is_counted_as_a_real_update_holds_it(tmp_path):
    """The live tensors of a real update (bench/bench_memory.py's LiveTensorBytes) with the Jacobian penalty on, minus
    with it off, against the estimate's Jacobian pass: its double backward's attention-score tensors were the
    missing term (57 MiB estimated against 88 measured here before JACOBIAN_SCORE_TENSORS)."""
    from helpers import load_bench_script

    from rvla_peft.rollout import collect
    from rvla_peft.trainer import RobustPPOTrainer

    live_tensor_bytes = load_bench_script("bench_memory").LiveTensorBytes
    peaks, estimates = {}, {}
    for weight in (0.0, 0.01):
        cfg = load_config(
            RECIPES / "tiny_cpu.yaml",
            [
                f"output_dir={tmp_path / str(weight)}",
                "model.name_or_path=builtin:tiny-llava",
                "report_to=[]",
                "eval_episodes=0",
                "env.num_envs=2",
                "env.max_episode_steps=8",
                "ppo.num_steps=16",
                "ppo.num_minibatches=1",
                "ppo.update_epochs=1",
                f"regularizers.jacobian.weight={weight}",
                "regularizers.jacobian.fraction=0.25",
            ],
        )
        torch.manual_seed(0)
        trainer = RobustPPOTrainer(cfg)
        obs = trainer.train_env.reset(seed=0)
        trainer.policy.eval()
        rollout, _ = collect(trainer.policy, trainer.train_env, obs, cfg.ppo.num_steps, cfg.ppo.gamma)
        trainer.policy.train()
        trainer.update(rollout)  # AdamW's states exist before the measured update
        with live_tensor_bytes() as live:
            trainer.update(rollout)
        trainer.train_env.close()
        peaks[weight], estimates[weight] = live.peak, memory.estimate_training_memory(cfg)
    assert estimates[0.0].jacobian_extra == 0 and estimates[0.01].jacobian_samples == 8
    measured = peaks[0.01] - peaks[0.0]
    estimated = estimates[0.01].jacobian_extra * memory.GIB
    assert abs(estimated - measured) <= 0.1 * measured, (estimated / 2**20, measured / 2**20)
