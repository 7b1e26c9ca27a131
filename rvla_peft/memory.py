"""An ESTIMATE of the GPU memory one training process needs, from the recipe alone: nothing is downloaded or loaded.

    est = estimate_training_memory(load_config("recipes/openvla_qlora_maniskill.yaml"))
    print(est.summary())        # what ``python -m rvla_peft.train RECIPE --dry-run`` prints after the YAML

Why: a 7B run that does not fit fails after minutes of loading; the recipe's numbers (quantization, micro-batch,
Jacobian fraction, envs) decide whether it fits, so the dry run says it up front.

How, piece by piece (every formula is a small pure function below, checked by ``tests/test_memory.py``):

- **Architecture**: the model's config, from a local folder or built-in model, the Hugging Face cache, or, for
  known Hub ids, a table of published configs in the package (:data:`KNOWN_CONFIGS`). The model is built on the
  meta device (no memory, no weights), so parameter counts are exact, module by module.
- **Base weights**: 2 bytes per parameter in bf16/fp16, 4 in fp32. With bitsandbytes, the ``nn.Linear`` layers
  transformers quantizes (all but the output layer, as its ``get_keys_to_not_convert`` decides) take
  :func:`nf4_linear_bytes` (4-bit, 0.516 bytes per weight) or :func:`int8_linear_bytes` (8-bit, 1 byte + a scale
  per row); every other parameter is fp32, because ``peft.prepare_model_for_kbit_training`` (run by
  ``load_base``) upcasts them: for OpenVLA-7B the embeddings and the output layer alone are 1 GiB.
- **Trainable state**: the LoRA weights peft creates for the recipe's targets (``resolve_lora`` + ``lora_targets``,
  matched on the meta model by peft's rules, :func:`lora_target_modules`: ``r * (fan_in + fan_out)`` per adapted
  layer) and the value head (and the heads a family trains in full, e.g. OpenVLA-OFT's), in fp32, with an fp32
  gradient and AdamW's two fp32 moments: 16 bytes per trainable parameter.
- **Activations** of the largest micro-batch, ``env.num_envs * ppo.num_steps / ppo.num_minibatches /
  ppo.gradient_accumulation_steps`` samples: what autograd keeps per transformer layer and token
  (:func:`layer_activation_bytes`), after Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models" (arXiv 2205.05198, sec. 4.1: ``34 s b h + 5 a s^2 b`` bytes per layer in 16 bit), redone for
  what this code runs: no dropout, LoRA on every linear layer (each keeps its own 16-bit copy of its input under
  autocast), pre-norms that keep an fp32 copy, gated MLPs in the language models, and fused attention kernels
  (no ``s^2`` term) outside the Jacobian pass. It is applied to the language model over image + prompt + action
  tokens and to each vision tower over its own patch tokens, plus one layer's worth for the backward's working set
  and autocast's 16-bit copies of fp32 weights. It matches autograd's saved tensors of a Llama layer and of
  OpenVLA's ViT block within 3% (``saved_tensors_hooks``, in the tests). Against the live tensors of a real update of
  ``builtin:tiny-llava`` (``bench/bench_memory.py``, CPU, ``tiny_cpu.yaml``): 157 MiB estimated, 136 measured without
  the Jacobian penalty; 340 against 313 with it (``jacobian.fraction`` 0.25), 523 against 506 at 0.5.
- **Jacobian pass**: ``ceil(regularizers.jacobian.fraction * micro-batch)`` samples again, with the MATH attention
  kernel (fp32 scores, the only one with a double backward), times :data:`JACOBIAN_GRAPH_FACTOR` = 2.7: the
  forward plus the graph ``autograd.grad(create_graph=True)`` keeps for the final backward (measured 2.5-2.8x), and
  :data:`JACOBIAN_SCORE_TENSORS` = 8 fp32 attention-score tensors per layer instead of 2.7 (the double backward's
  transients through the softmax: the term the live tensors of a real update showed missing).
- **Rollout phase** (``collect``, no grad, every env at once): KV cache + hidden states of the prompt forward,
  instead of the update's activations when larger; plus the rollout buffer of images kept on the device.

What depends on the policy family (its trained heads, the tokens after the prompt, decoding with a KV cache, the
denoising passes, the size of a stored action) the family says through its ``memory_hooks``
(:class:`rvla_peft.policies.base.MemoryHooks`); nothing here asks which family it holds.

Not counted: ManiSkill's own GPU memory (simulation, rendering), the allocator's fragmentation and caching, and the
projector's, embeddings' and logits' activations (< 2% at 7B); :data:`CUDA_CONTEXT_GIB` stands for the CUDA
context. Assumed: LoRA on every linear layer of the towers and the language model (the families' default; narrower
targets keep less), no gradient checkpointing (as the trainer runs). Read the total as "about", with 10-20% headroom.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rvla_peft.config import TrainConfig
from rvla_peft.envs.maniskill import resolve_instruction
from rvla_peft.models.openvla.published import OPENVLA_7B_CONFIG
from rvla_peft.models.tiny import RANDOM_PREFIX, random_architecture, resolve_builtin
from rvla_peft.policies.base import MemoryHooks
from rvla_peft.policies.families import family_config
from rvla_peft.policies.registry import lora_targets, policy_class, resolve_lora
from rvla_peft.utils.constants import BUILTIN_PREFIX

if TYPE_CHECKING:
    from torch import nn


GIB = 2**30

# bitsandbytes 4-bit (what transformers' BitsAndBytesConfig sets up, QLoRA's nf4 + double quantization): two 4-bit
# codes per byte, one absmax per block of NF4_BLOCKSIZE weights; with double quantization the absmaxes are themselves
# quantized to 8 bit in blocks of NESTED_BLOCKSIZE, each with an fp32 absmax, plus one fp32 offset per tensor and the
# two code books (16 and 256 fp32). Per weight: 0.5 + 1/64 + 4/(64*256) = 0.5159 bytes (QLoRA paper: 4.127 bits).
NF4_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
FP32 = 4
BYTES_PER_DTYPE = {"float32": 4, "bfloat16": 2, "float16": 2}
# trainable parameter in fp32 + its fp32 gradient + AdamW's exp_avg and exp_avg_sq
TRAINABLE_BYTES = FP32
GRAD_BYTES = FP32
ADAM_BYTES = 2 * FP32
# saved tensors of the Jacobian pass (forward + the graph of the create_graph=True backward) over its forward's:
# 2.45-2.74 on tiny-llava / tiny-openvla, 2.62-2.79 on two Llama layers (saved_tensors_hooks, fp32 and bf16)
JACOBIAN_GRAPH_FACTOR = 2.7
# fp32 attention-score tensors [heads, s, keys] per layer and sample alive at the Jacobian pass's peak with the MATH
# kernel: the probabilities, their gradients and the products of the double backward through the softmax, most of them
# transient (not saved for backward, so outside the graph factor, which counts them 2.7 times). Live tensors of a real
# update of builtin:tiny-llava: 7.94 per Jacobian sample at jacobian.fraction 0.25 and 0.5 alike (bench/bench_memory.py
# measured 312.6 MiB at its peak against the 271.7 estimated without this term).
JACOBIAN_SCORE_TENSORS = 8
# what nvidia-smi shows beyond torch.cuda.max_memory_allocated: CUDA context, cuBLAS workspaces (typical, torch 2.x)
CUDA_CONTEXT_GIB = 0.5
# prompt length when no tokenizer is on disk: SentencePiece (Llama, Gemma) reads ~4 characters of English per token
CHARS_PER_TOKEN = 4


class EstimateUnavailable(Exception):
    """The architecture cannot be known offline (an unknown Hub id with no local copy, remote code, ...)."""


# ---------------------------------------------------------------------------------------------------------------
# pure formulas


def nf4_linear_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of one bitsandbytes 4-bit weight of ``numel`` entries (data, block absmaxes, offset, code books)."""
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    data = math.ceil(numel / 2)
    if not double_quant:
        return data + FP32 * blocks + FP32 * 16
    return data + blocks + FP32 * math.ceil(blocks / NESTED_BLOCKSIZE) + FP32 + FP32 * (16 + 256)


def int8_linear_bytes(out_features: int, in_features: int) -> int:
    """Bytes of one LLM.int8 weight: int8 entries and one fp32 scale per output row (``SCB``)."""
    return out_features * in_features + FP32 * out_features


def lora_param_count(fan_in: int, fan_out: int, r: int) -> int:
    """LoRA's A (r x fan_in) and B (fan_out x r); a convolution's fan_in is in_channels * kernel area."""
    return r * (fan_in + fan_out)


def value_head_param_count(hidden: int, width: int) -> int:
    """``ValueHead``: Linear(hidden, width) + GELU + Linear(width, 1)."""
    return hidden * width + width + width + 1


def autocast_copy_bytes(cfg: TrainConfig, lora_params: int, linear_params: int) -> int:
    """16-bit copies autocast makes and the backward keeps: of the fp32 LoRA weights (cached once per step), and,
    for an fp32 base, of every frozen linear weight at each forward (frozen weights are not cached)."""
    if cfg.mixed_precision == "no":
        return 0
    frozen = linear_params if cfg.model.torch_dtype == "float32" and cfg.model.quantization == "none" else 0
    return 2 * (lora_params + frozen)


def micro_batch_size(num_envs: int, num_steps: int, num_minibatches: int, accumulation: int) -> int:
    """The largest micro-batch of an update (``torch.tensor_split`` puts the remainder first)."""
    minibatch = math.ceil(num_envs * num_steps / num_minibatches)
    return math.ceil(minibatch / accumulation)


@dataclass(frozen=True)
class Precision:
    """Bytes per element of what autograd keeps, from ``torch_dtype``, ``quantization`` and ``mixed_precision``."""

    act: int  # activations the layers compute (the compute dtype)
    lora_input: int  # the copy of its input each LoRA layer keeps
    shared_inputs: bool  # LoRA layers reading one tensor keep it once (no dtype cast in between)
    residual: int  # the residual stream / hidden states (fp32 when embeddings and norms are fp32)


def precision_of(torch_dtype: str, quantization: str, mixed_precision: str) -> Precision:
    """Under autocast, each LoRA layer gets its own 16-bit cast of its input (peft first casts it to the fp32 LoRA
    dtype). Without autocast a 16-bit input is upcast by peft, one fp32 copy per layer; an fp32 input is shared.
    Quantized bases have fp32 embeddings and norms (``prepare_model_for_kbit_training``): an fp32 residual stream."""
    autocast = mixed_precision != "no"
    fp32_residual = quantization != "none" or torch_dtype == "float32"
    act = 2 if autocast or torch_dtype != "float32" else 4
    return Precision(
        act=act,
        lora_input=2 if autocast else 4,
        shared_inputs=not autocast and fp32_residual,
        residual=4 if fp32_residual else 2,
    )


@dataclass(frozen=True)
class Stack:
    """One transformer stack a sample goes through with grad, and the tokens it sees."""

    name: str
    layers: int
    tokens: int  # query tokens per sample
    hidden: int
    intermediate: int
    heads: int
    head_dim: int
    kv_heads: int
    gated: bool  # gated MLP (Llama's SwiGLU, Gemma's GeGLU) or a plain MLP (ViT)
    qkv_linears: int = 3  # separate q/k/v projections (HF models) or one fused qkv (timm)
    mlp_saved: int = 1  # plain MLP: activation tensors kept (GELU 1: its input; quick-GELU 2: input and sigmoid)
    kv_tokens: int | None = None  # keys per query when it also attends to a cached prefix (pi0's action expert)
    passes: int = 1  # forwards per sample kept in the graph (pi0's expert: denoising steps x 2 lanes)
    hidden_states_kept: bool = False  # output_hidden_states=True: every layer's output lives until the forward returns
    kv_cached: bool = False  # the rollout keeps its keys and values (autoregressive decoding, pi0's prefix cache)


def layer_activation_bytes(stack: Stack, p: Precision, attention: str = "fused", lora_r: int = 0) -> float:
    """Bytes autograd keeps for one layer and one sample, all LoRA-adapted (Korthikanti et al. 2022, sec. 4.1,
    without dropout). ``attention``: "fused" (flash / memory-efficient SDPA: q, k, v and the output, no s^2 term),
    "math" (SDPA's MATH kernel: q, k, v and the probabilities upcast to fp32) or "eager" (fp32 softmax + a 16-bit
    copy). For a GPT layer (GELU MLP of 4h, fused qkv) with ``Precision(2, 2, True, 2)`` and "eager" attention it is
    the paper's ``34 s h + 5 a s^2`` without dropout (``- 2 s h - 3 a s^2``: the masks and the dropped-out
    probabilities) plus the fp32 copies kept here (``+ 4 s h`` by the two norms, ``+ 4 a s^2`` by the fp32 softmax)."""
    h, i, s = stack.hidden, stack.intermediate, stack.tokens
    q, kv = stack.heads * stack.head_dim, stack.kv_heads * stack.head_dim
    keys = stack.kv_tokens or s
    per_token = 2 * FP32 * h  # two pre-norms, each keeps its input in fp32
    # inputs of the LoRA-adapted linear layers: q/k/v, output projection, MLP up (and gate), MLP down
    up_linears = 2 if stack.gated else 1
    groups = [(h, stack.qkv_linears), (q, 1), (h, up_linears), (i, 1)]
    copies = 1 if p.shared_inputs else None
    per_token += p.lora_input * sum(width * (copies or n) for width, n in groups)
    per_token += p.act * (3 if stack.gated else stack.mlp_saved) * i  # gate, up, act(gate) / the activation's input
    per_token += p.act * lora_r * (stack.qkv_linears + 1 + up_linears + 1)  # each LoRA A's r-wide output
    if attention == "fused":
        # q, k, v; the output too unless it is the (shared) input of the output projection
        per_token += p.act * (q + 2 * kv + (0 if p.shared_inputs else q))
    elif attention == "math":
        per_token += FP32 * (q + 2 * kv) + FP32 * stack.heads * keys
    else:
        per_token += p.act * (q + 2 * kv) + stack.heads * keys * (FP32 + (p.act if p.act < FP32 else 0))
    return s * per_token


def stack_activation_bytes(stack: Stack, p: Precision, attention: str = "fused", lora_r: int = 0) -> float:
    """Per sample: every layer of every kept pass, plus the hidden-states tuple when the policy asks for it."""
    total = stack.passes * stack.layers * layer_activation_bytes(stack, p, attention, lora_r)
    if stack.gated:  # a decoder ends with a norm, which keeps its fp32 input
        total += stack.passes * stack.tokens * stack.hidden * FP32
    if stack.hidden_states_kept:
        total += (stack.layers + 1) * stack.tokens * stack.hidden * p.residual
    return total


def attention_score_bytes(stack: Stack) -> float:
    """Per sample: one fp32 attention-score tensor [heads, tokens, keys] in every layer of every kept pass."""
    return stack.passes * stack.layers * stack.heads * stack.tokens * (stack.kv_tokens or stack.tokens) * FP32


def kv_cache_bytes(stack: Stack, p: Precision) -> float:
    """Per sample: keys and values of every layer over the stack's tokens (the rollout's cached prompt)."""
    return 2 * stack.layers * stack.kv_heads * stack.head_dim * stack.tokens * p.act


def inference_bytes(stack: Stack, p: Precision) -> float:
    """Per env, during ``collect`` (no grad): the KV cache, the hidden-states tuple and one layer's MLP."""
    total = stack.tokens * (3 if stack.gated else 2) * stack.intermediate * p.act
    if stack.kv_cached:
        total += kv_cache_bytes(stack, p)
    if stack.hidden_states_kept:
        total += (stack.layers + 1) * stack.tokens * stack.hidden * p.residual
    return total


# ---------------------------------------------------------------------------------------------------------------
# the estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """GPU memory of one training process in GiB (2**30 bytes), with the parameter counts it rests on. An
    estimate: see the module docstring for what each figure counts and what it leaves out."""

    model: str
    quantization: str
    base_params: int
    quantized_params: int  # inside the bitsandbytes Linear layers (0 without quantization)
    lora_params: int
    head_params: int  # value head (+ OpenVLA-OFT's action and scale heads), trained in full
    micro_batch: int
    jacobian_samples: int  # 0 when the Jacobian penalty is off
    base_weights: float
    trainable_params: float  # LoRA + value head, fp32
    gradients: float
    optimizer_states: float  # AdamW's two moments
    activations: float  # one micro-batch forward + backward (main pass)
    jacobian_extra: float  # the Jacobian pass on top of it
    rollout_inference: float  # collect: KV cache + hidden states of every env, + the adapted weights' copy while
    # merged (policy.merge_lora_to_act); when larger, replaces activations
    rollout_buffer: float  # the rollout's images (and actions) kept on the device
    cuda_context: float

    @property
    def trainable_total(self) -> float:
        """LoRA + value head, their gradients and AdamW's states."""
        return self.trainable_params + self.gradients + self.optimizer_states

    @property
    def peak_activations(self) -> float:
        """The larger of the update phase (activations + Jacobian pass) and the rollout phase."""
        return max(self.activations + self.jacobian_extra, self.rollout_inference)

    @property
    def total(self) -> float:
        return (
            self.base_weights + self.trainable_total + self.peak_activations + self.rollout_buffer + self.cuda_context
        )

    def summary(self) -> str:
        """Two YAML comment lines: the total and its parts, then what it assumed."""
        if self.rollout_inference > self.activations + self.jacobian_extra:
            acts = f"activations {self.peak_activations:.1f} in the rollout (KV cache of every env, merged-LoRA copy)"
        else:
            jac = f" incl. Jacobian pass {self.jacobian_extra:.1f}" if self.jacobian_samples else ""
            acts = f"activations {self.peak_activations:.1f}{jac}"
        bits = {"4bit": "4-bit", "8bit": "8-bit"}.get(self.quantization)
        quantized = f" ({self.quantized_params / 1e9:.2f}B of them {bits})" if bits else ""
        jacobian = f", Jacobian pass on {self.jacobian_samples}" if self.jacobian_samples else ""
        return (
            f"# estimated GPU memory per process: {self.total:.1f} GiB (weights {self.base_weights:.1f}, "
            f"LoRA+optimizer {self.trainable_total:.1f}, {acts}, rollout buffer {self.rollout_buffer:.1f}, "
            f"CUDA context {self.cuda_context:.1f}) — an estimate, see rvla_peft/memory.py\n"
            f"# {self.model}: {self.base_params / 1e9:.2f}B base params{quantized}, "
            f"{(self.lora_params + self.head_params) / 1e6:.1f}M trainable; micro-batch {self.micro_batch}"
            f"{jacobian}; ManiSkill's own GPU memory not included\n"
        )


def estimate_training_memory(cfg: TrainConfig, prompt_tokens: int | None = None) -> MemoryEstimate:
    """The estimate for a resolved recipe (see the module docstring). ``prompt_tokens``: the prompt's length in
    tokens, BOS included (default: counted with the model's tokenizer when it is on disk, else ~4 characters per
    token). Raises :class:`EstimateUnavailable` when the architecture cannot be known offline."""

    config, local = load_model_config(cfg.model)
    model = build_meta_model(config)
    base = _weights(model, cfg.model.quantization, cfg.model.torch_dtype)
    hidden = getattr(config, "vlm_config", config).get_text_config().hidden_size
    hooks = memory_hooks(cfg)
    heads = value_head_param_count(hidden, cfg.policy.value_head_hidden)
    heads += hooks.head_param_count(family_config(cfg.policy), hidden)
    lora_cfg = resolve_lora(cfg.policy.family, cfg.lora)
    lora = count_lora_params(model, lora_cfg)
    trainable = lora + heads

    if prompt_tokens is None:
        prompt_tokens = count_prompt_tokens(cfg, local)
    stacks = stacks_of(config, cfg, prompt_tokens)
    p = precision_of(cfg.model.torch_dtype, cfg.model.quantization, cfg.mixed_precision)
    ppo, jac = cfg.ppo, cfg.regularizers.jacobian
    micro = micro_batch_size(cfg.env.num_envs, ppo.num_steps, ppo.num_minibatches, ppo.gradient_accumulation_steps)
    per_sample = sum(stack_activation_bytes(s, p, _main_attention(cfg), lora_cfg.r) for s in stacks)
    # + the backward's working set: the gradients of about one layer's activations at a time
    working = max(layer_activation_bytes(s, p, _main_attention(cfg), lora_cfg.r) for s in stacks)
    activations = micro * (per_sample + working)
    activations += autocast_copy_bytes(cfg, lora, base["linear_params"])
    smooth = cfg.regularizers.smoothness
    if smooth.weight > 0 and smooth.form == "temporal":  # a second forward on the next states, kept for backward
        activations += math.ceil(smooth.fraction * micro) * per_sample
    jac_samples = math.ceil(jac.fraction * micro) if jac.weight > 0 else 0
    jac_attention = "eager" if cfg.model.attn_implementation == "eager" else "math"
    jac_per_sample = sum(stack_activation_bytes(s, p, jac_attention, lora_cfg.r) for s in stacks)
    jacobian = jac_samples * JACOBIAN_GRAPH_FACTOR * jac_per_sample
    if jac_attention == "math":  # the score tensors the graph factor undercounts
        scores = sum(attention_score_bytes(s) for s in stacks)
        jacobian += jac_samples * (JACOBIAN_SCORE_TENSORS - JACOBIAN_GRAPH_FACTOR) * scores
    if jac_samples:  # its forward casts the frozen fp32 weights again (autocast caches only trainable leaves)
        jacobian += autocast_copy_bytes(cfg, 0, base["linear_params"])
    rollout = cfg.env.num_envs * max(inference_bytes(s, p) for s in stacks)
    if cfg.policy.merge_lora_to_act and cfg.model.quantization == "none":
        rollout += merged_copy_bytes(model, lora_cfg, cfg.model.torch_dtype)
    return MemoryEstimate(
        model=cfg.model.name_or_path,
        quantization=cfg.model.quantization,
        base_params=base["params"],
        quantized_params=base["quantized_params"],
        lora_params=lora,
        head_params=heads,
        micro_batch=micro,
        jacobian_samples=jac_samples,
        base_weights=base["bytes"] / GIB,
        trainable_params=trainable * TRAINABLE_BYTES / GIB,
        gradients=trainable * GRAD_BYTES / GIB,
        optimizer_states=trainable * ADAM_BYTES / GIB,
        activations=activations / GIB,
        jacobian_extra=jacobian / GIB,
        rollout_inference=rollout / GIB,
        rollout_buffer=_rollout_buffer_bytes(cfg, config) / GIB,
        cuda_context=CUDA_CONTEXT_GIB,
    )


def format_estimate(cfg: TrainConfig) -> str:
    """The dry run's YAML comment lines; never raises (the dry run must not fail on an estimate)."""
    try:
        return estimate_training_memory(cfg).summary()
    except Exception as e:  # noqa: BLE001 - any failure here is reported, never fatal
        reason = " ".join(str(e).split()) or type(e).__name__
        return f"# estimated GPU memory per process: unavailable: {reason}\n"


# ---------------------------------------------------------------------------------------------------------------
# the architecture, offline


def _pi0_base() -> dict[str, Any]:
    # transformers' PI0Config defaults are lerobot/pi0_base's (its docstring is written for that checkpoint)
    return {"model_type": "pi0"}


def _openvla_7b() -> dict[str, Any]:

    return OPENVLA_7B_CONFIG


# Hub id -> its published config.json, for estimates without a download. The OpenVLA-OFT checkpoints are openvla-7b
# fine-tuned (LoRA merged): the same architecture; only their norm_stats, which the estimate does not read, differ.
KNOWN_CONFIGS = {
    "openvla/openvla-7b": _openvla_7b,
    "moojink/openvla-7b-oft-finetuned-libero-spatial": _openvla_7b,
    "lerobot/pi0_base": _pi0_base,
}


def load_model_config(model_cfg) -> tuple[Any, Path | None]:
    """The model's config and its local folder (None when it came from :data:`KNOWN_CONFIGS`), without network:
    a built-in model (built into its cache if needed), a local folder, the Hugging Face cache, then the table."""
    from transformers import AutoConfig

    import rvla_peft.models.openvla  # noqa: F401  registers model_type "openvla"

    name = model_cfg.name_or_path
    kwargs = dict(revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    if name.startswith(RANDOM_PREFIX):  # built in memory by load_base: its config, no folder
        return random_architecture(name)[0], None
    if name.startswith(BUILTIN_PREFIX) or Path(name).is_dir():
        path = Path(resolve_builtin(name))
        return AutoConfig.from_pretrained(path, **kwargs), path
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True, **kwargs), None
    except (OSError, ValueError):
        pass
    if name in KNOWN_CONFIGS:
        data = copy.deepcopy(KNOWN_CONFIGS[name]())
        return AutoConfig.for_model(**data), None
    raise EstimateUnavailable(
        f"{name!r} has no config.json on this machine and is not in rvla_peft.memory.KNOWN_CONFIGS "
        f"(known: {', '.join(sorted(KNOWN_CONFIGS))}); the estimate needs no weights, only the config: download it "
        f"with `hf download {name} config.json`"
    )


def build_meta_model(config) -> nn.Module:
    """The model on the meta device: exact shapes, no memory (0.1 s for OpenVLA-7B)."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def _weights(model: nn.Module, quantization: str, torch_dtype: str) -> dict[str, int]:
    """Parameter count and bytes of the base, quantized as transformers + bitsandbytes do for ``load_base``."""
    from torch import nn
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = list(get_keys_to_not_convert(model)) + list(model._keep_in_fp32_modules or [])
    fp32 = model._keep_in_fp32_modules or []
    params = total = quantized = linear = 0
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        if isinstance(module, nn.Linear):
            linear += module.weight.numel()
        if quantization != "none" and type(module) is nn.Linear and should_convert_module(name, skip):
            weight = module.weight
            quantized += weight.numel()
            if quantization == "4bit":
                total += nf4_linear_bytes(weight.numel())
            else:
                total += int8_linear_bytes(*weight.shape)
            own = [(n, t) for n, t in own if n != "weight"]
        keep_fp32 = quantization != "none" or (bool(fp32) and not should_convert_module(name, fp32))
        bytes_each = FP32 if keep_fp32 else BYTES_PER_DTYPE[torch_dtype]
        total += sum(t.numel() for _, t in own) * bytes_each
        params += sum(t.numel() for _, t in module.named_parameters(recurse=False))
    return {"params": params, "bytes": total, "quantized_params": quantized, "linear_params": linear}


def lora_target_modules(model: nn.Module, lora_cfg) -> list[tuple[str, nn.Module]]:
    """The modules peft adapts for ``lora_cfg`` (already resolved), by peft's own rules (``lora_targets`` for the
    list, then ``check_target_module_exists``: exclusions first, a string is a full regex, a list matches whole
    names or name suffixes, "all-linear" every ``nn.Linear`` but the output layer). Written out here so that the dry
    run does not import peft (and bitsandbytes with it); ``tests/test_memory.py`` checks it against peft."""
    from torch import nn

    def matches(patterns, key: str) -> bool:
        if isinstance(patterns, str):
            return re.fullmatch(patterns, key) is not None
        return key in patterns or any(key.endswith(f".{p}") for p in patterns)

    targets = lora_targets(model, lora_cfg)
    if targets == "all-linear":
        output = model.get_output_embeddings()
        targets = {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not output}
    exclude = lora_cfg.exclude_modules or []
    return [
        (name, module)
        for name, module in model.named_modules()
        if name and not matches(exclude, name) and matches(targets, name)
    ]


def merged_copy_bytes(model: nn.Module, lora_cfg, torch_dtype: str) -> int:
    """The copy of the adapted layers' weights that ``Policy.acting`` holds while it acts with the LoRA merged
    (``policy.merge_lora_to_act``), to put them back bit for bit."""
    numel = sum(sum(t.numel() for t in m.parameters(recurse=False)) for _, m in lora_target_modules(model, lora_cfg))
    return numel * BYTES_PER_DTYPE[torch_dtype]


def count_lora_params(model: nn.Module, lora_cfg) -> int:
    """LoRA parameters for ``lora_cfg`` (already resolved): ``r * (fan_in + fan_out)`` per adapted layer."""
    from torch import nn

    total = 0
    for name, module in lora_target_modules(model, lora_cfg):
        if isinstance(module, nn.Linear):
            fan_in, fan_out = module.in_features, module.out_features
        elif isinstance(module, nn.modules.conv._ConvNd):  # LoRA's A is a conv of the same kernel, B a 1x1 conv
            fan_in, fan_out = module.in_channels * math.prod(module.kernel_size), module.out_channels
        else:
            raise EstimateUnavailable(f"LoRA on {name} ({type(module).__name__}) is not counted by the estimate")
        total += lora_param_count(fan_in, fan_out, lora_cfg.r)
    return total


def memory_hooks(cfg: TrainConfig) -> MemoryHooks:
    """What the recipe's policy family says about its memory (``memory_hooks`` of its policy class)."""
    return policy_class(cfg.policy.family).memory_hooks


def count_prompt_tokens(cfg: TrainConfig, local: Path | None) -> int:
    """Tokens of the formatted prompt with BOS: by the model's own tokenizer when on disk, else from its length."""

    instruction = (cfg.env.instruction or resolve_instruction(cfg.env)).lower().rstrip(".")
    text = cfg.policy.prompt_template.format(instruction=instruction)
    tokenizer_here = memory_hooks(cfg).tokenizer_in_checkpoint
    if cfg.model.name_or_path.startswith(RANDOM_PREFIX):  # the character tokenizer load_base gives it
        tokenizer = random_architecture(cfg.model.name_or_path)[1].tokenizer
        return len(tokenizer(text)["input_ids"]) + 1  # OpenVLA's trailing empty token / pi0's "\n"
    if local is not None and tokenizer_here and (local / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(local)(text)["input_ids"])
    return math.ceil(len(text) / CHARS_PER_TOKEN) + 2  # BOS, and OpenVLA's trailing empty token / pi0's "\n"


def _main_attention(cfg: TrainConfig) -> str:
    return "eager" if cfg.model.attn_implementation == "eager" else "fused"


def _decoder(name: str, text_config, tokens: int, **kw) -> Stack:
    heads = text_config.num_attention_heads
    return Stack(
        name=name,
        layers=text_config.num_hidden_layers,
        tokens=tokens,
        hidden=text_config.hidden_size,
        intermediate=text_config.intermediate_size,
        heads=heads,
        head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
        kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
        gated=True,
        **kw,
    )


def _hf_vision_tower(vision_config, feature_layer: int | list[int] = -1) -> Stack:
    """A transformers ViT (CLIP, SigLIP) run up to the layer whose features the model reads."""
    layers = vision_config.num_hidden_layers
    deepest = max(feature_layer) if isinstance(feature_layer, list) else feature_layer
    used = deepest if deepest >= 0 else layers + 1 + deepest
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    heads = vision_config.num_attention_heads
    return Stack(
        name=vision_config.model_type,
        layers=used,
        tokens=patches + (1 if vision_config.model_type.startswith("clip") else 0),  # CLIP's class token
        hidden=vision_config.hidden_size,
        intermediate=vision_config.intermediate_size,
        heads=heads,
        head_dim=vision_config.hidden_size // heads,
        kv_heads=heads,
        gated=False,
        mlp_saved=2 if vision_config.hidden_act == "quick_gelu" else 1,
    )


def stacks_of(config, cfg: TrainConfig, prompt_tokens: int) -> list[Stack]:
    """The transformer stacks one training sample goes through, vision first, with their token counts."""
    hooks, policy = memory_hooks(cfg), family_config(cfg.policy)
    extra_tokens = hooks.decoder_extra_tokens(policy)  # e.g. the A-1 teacher-forced action tokens
    decoding = dict(hidden_states_kept=hooks.autoregressive, kv_cached=hooks.autoregressive)
    if config.model_type == "openvla":
        towers = []
        for tower in config.featurizer_configs:
            patches = (tower["img_size"] // tower["patch_size"]) ** 2
            dim, heads = tower["embed_dim"], tower["num_heads"]
            towers.append(
                Stack(
                    name=f"vit-{dim}",
                    layers=tower["depth"] - 1,  # OpenVLA reads the second-to-last block's output
                    tokens=patches + int(tower["class_token"]) + tower["reg_tokens"],
                    hidden=dim,
                    intermediate=int(dim * tower["mlp_ratio"]),
                    heads=heads,
                    head_dim=dim // heads,
                    kv_heads=heads,
                    gated=False,
                    qkv_linears=1,
                    mlp_saved=2 if tower["act_layer"] == "quick_gelu" else 1,
                )
            )
        tokens = config.num_image_tokens + prompt_tokens + extra_tokens
        return [*towers, _decoder("llm", config.text_config, tokens, **decoding)]
    if config.model_type == "pi0":
        vlm = config.vlm_config
        vision = _hf_vision_tower(vlm.vision_config)
        prefix = vision.tokens + prompt_tokens
        suffix = 1 + config.chunk_size  # the state token and the action chunk
        steps = hooks.denoise_steps(policy, config)
        expert = _decoder("action expert", config.dit_config, suffix, kv_tokens=prefix + suffix, passes=2 * steps)
        return [vision, _decoder("vlm", vlm.text_config, prefix, kv_cached=True), expert]
    vision_config = getattr(config, "vision_config", None)
    if vision_config is None or not hasattr(config, "text_config"):
        raise EstimateUnavailable(f"no activation model for model_type {config.model_type!r}")
    vision = _hf_vision_tower(vision_config, getattr(config, "vision_feature_layer", -1))
    image_tokens = (vision_config.image_size // vision_config.patch_size) ** 2
    tokens = image_tokens + prompt_tokens + extra_tokens
    return [vision, _decoder("llm", config.get_text_config(), tokens, **decoding)]


def _rollout_buffer_bytes(cfg: TrainConfig, config) -> int:
    """``Rollout`` on the device: uint8 images of T+1 steps, the policy's actions and the per-step floats."""
    steps, envs, size = cfg.ppo.num_steps, cfg.env.num_envs, cfg.env.image_size
    action = memory_hooks(cfg).rollout_action_bytes(family_config(cfg.policy), config)  # tokens, chunk or chain
    per_step = action + cfg.policy.action_dim * FP32 + 5 * FP32  # + mean, log-prob, value, reward, done, ...
    return (steps + 1) * envs * size * size * 3 + steps * envs * per_step


__all__ = [
    "EstimateUnavailable",
    "MemoryEstimate",
    "estimate_training_memory",
    "format_estimate",
    "layer_activation_bytes",
    "nf4_linear_bytes",
    "int8_linear_bytes",
    "lora_param_count",
]
