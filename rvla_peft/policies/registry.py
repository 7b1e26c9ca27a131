"""Building policies: the base model (``load_base``), LoRA (the family's defaults, ``lora_config``), the family's
policy class (from the catalogue, :mod:`rvla_peft.policies.families`), and ``load_policy`` (base + LoRA + value head
+ the family's extras, set up by an adapter's recipe). Pushed model cards import ``load_policy`` from here."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import warnings
from pathlib import Path

import torch

from rvla_peft.adapters import (
    HubError,
    adapter_recipe,
    check_base_match,
    check_warmup_adapter,
    resolve_adapter,
    with_base,
)
from rvla_peft.config import ConfigError, ModelConfig, load_config
from rvla_peft.config.policy import gripper_convention
from rvla_peft.models.tiny import RANDOM_PREFIX, random_architecture, resolve_builtin
from rvla_peft.policies.base import REFERENCE_ADAPTER, Policy
from rvla_peft.policies.families import LORA_DEFAULTS, POLICY_FAMILIES, family_config
from rvla_peft.utils.constants import POLICY_SETTINGS_FILE, VALUE_HEAD_FILE

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def policy_class(family: str) -> type[Policy]:
    """The policy class of a family (its ``modeling`` module is imported here, not by the light catalogue)."""
    import importlib

    module, cls = POLICY_FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), cls)


def load_device_map(device: torch.device | str | None) -> dict | None:
    """``device_map`` for ``from_pretrained``: on a GPU the weights load straight onto it, shard by shard, instead of
    the whole checkpoint staged in host memory first (15 GB at 7B bf16, on every rank of a multi-GPU run). None
    on the CPU (loaded where they are used) and where no device is given."""
    if device is None or torch.device(device).type != "cuda":
        return None
    return {"": torch.device(device)}


def load_base(model_cfg, device: torch.device | str | None = None):
    """The base model and processor through the Auto classes (the real ``from_pretrained`` path), on ``device``
    when it is a GPU (:func:`load_device_map`)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import rvla_peft.models.openvla  # noqa: F401  registers model_type "openvla" (native OpenVLA) with the Auto classes

    if model_cfg.name_or_path.startswith(RANDOM_PREFIX):
        model, processor = build_random_base(model_cfg, device)
        return _prepare_quantized(model, model_cfg), processor
    path = resolve_builtin(model_cfg.name_or_path)
    kwargs = dict(revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(
        path,
        dtype=_DTYPES[model_cfg.torch_dtype],
        attn_implementation=model_cfg.attn_implementation,
        quantization_config=quantization_config(model_cfg),
        device_map=load_device_map(device),
        # transformers 5 swaps layers for Hub kernels by default, on load and at every .train()/.eval(): code
        # downloaded at run time (on an offline GPU machine the load failed: kernels-community/rotary not in the
        # cache), not checked for the Jacobian penalty's double backward, and different numerics per machine.
        use_kernels=False,
        **kwargs,
    )
    model = _prepare_quantized(model, model_cfg)
    if model_cfg.processor_name_or_path:  # pi0 checkpoints ship without a processor
        processor = AutoProcessor.from_pretrained(model_cfg.processor_name_or_path)
    else:
        processor = AutoProcessor.from_pretrained(path, **kwargs)
    return model, processor


def _prepare_quantized(model, model_cfg):
    if model_cfg.quantization == "none":
        return model
    from peft import prepare_model_for_kbit_training

    # Freezes the base, keeps norms in float32 and lets gradients reach the (frozen) input embeddings' output.
    # No gradient checkpointing: rollouts are inference, and the Jacobian pass needs double backward.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    _keep_4bit_weights_trainable_on_cpu(model)
    return model


def build_random_base(model_cfg, device: torch.device | str | None = None):
    """``model.name_or_path: random:NAME`` (:func:`rvla_peft.models.tiny.random_architecture`): the architecture
    with random weights, built straight on ``device`` in ``model.torch_dtype`` (no checkpoint written or read, host
    memory untouched by the weights). With ``model.quantization=4bit``, the linear layers are then replaced and
    quantized in memory as ``from_pretrained`` would: transformers' bitsandbytes quantizer picks the layers (its
    skip list: the output layer, tied weights) and swaps in ``bnb`` modules, which quantize on their move to the
    device; the full-precision copy of each layer is freed as it is replaced."""
    from transformers import AutoModelForImageTextToText

    if model_cfg.quantization == "8bit":
        raise ValueError(
            f"model.name_or_path={model_cfg.name_or_path}: a random model is quantized in memory to 4bit only; set "
            "model.quantization=4bit or none"
        )
    config, processor = random_architecture(model_cfg.name_or_path)
    if model_cfg.attn_implementation:
        config._attn_implementation = model_cfg.attn_implementation
    device = torch.device(device or "cpu")
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=_DTYPES[model_cfg.torch_dtype])
    if model_cfg.quantization != "none":
        _quantize_in_memory(model, quantization_config(model_cfg), device)
    return model.eval(), processor


def _quantize_in_memory(model, quant_cfg, device: torch.device) -> None:
    """Replace ``model``'s linear layers by bitsandbytes 4-bit ones holding its own weights, quantized on
    ``device``."""
    import bitsandbytes as bnb
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(quant_cfg, pre_quantized=False)
    originals = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    quantizer.preprocess_model(model, device_map={"": device}, dtype=model.dtype)  # swaps in meta bnb modules
    for name, module in model.named_modules():
        if name not in originals or not isinstance(module, bnb.nn.Linear4bit):
            continue
        original = originals.pop(name)
        module.weight = bnb.nn.Params4bit(
            original.weight.data,
            requires_grad=False,
            quant_type=quant_cfg.bnb_4bit_quant_type,
            compress_statistics=quant_cfg.bnb_4bit_use_double_quant,
            quant_storage=quant_cfg.bnb_4bit_quant_storage,
            module=module,
        ).to(device)  # quantized here, on the device
        if original.bias is not None:
            module.bias = torch.nn.Parameter(original.bias.data, requires_grad=False)
        del original
    quantizer.postprocess_model(model)  # marks the model quantized (is_loaded_in_4bit, config), as from_pretrained
    model.hf_quantizer = quantizer


def _keep_4bit_weights_trainable_on_cpu(model) -> None:
    """bitsandbytes 0.50 repacks a 4-bit weight for a faster CPU kernel on its first no-grad eval-mode call and
    never unpacks it; that kernel has no backward, so the next training forward fails ("a view of a leaf Variable
    that requires grad is being used in an in-place operation"). Rollouts alternate with updates: keep the
    trainable layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quantization_config(model_cfg):
    """bitsandbytes settings for ``model.quantization`` (QLoRA: nf4 + double quantization), or None."""
    if model_cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=_DTYPES[model_cfg.torch_dtype],
    )


def lora_targets(model, lora_cfg) -> list[str] | str:
    """peft target_modules; with ``adapt_output_layer``, the output layer is added to the list."""
    targets = lora_cfg.target_modules
    if not lora_cfg.adapt_output_layer:
        return targets
    output = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    if targets == "all-linear":
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    return sorted(set(targets) | {output.rsplit(".", 1)[-1]})


def resolve_lora(family: str, lora_cfg):
    """``lora_cfg`` with its unset (None) fields taken from the family's ``LORA_DEFAULTS`` (its configuration)."""
    defaults = LORA_DEFAULTS.get(family, LORA_DEFAULTS["action_tokens"])
    unset = {k: v for k, v in defaults.items() if getattr(lora_cfg, k) is None}
    return dataclasses.replace(lora_cfg, **unset)


def lora_config(model, lora_cfg):
    from peft import LoraConfig

    return LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_targets(model, lora_cfg),
        exclude_modules=lora_cfg.exclude_modules,
        bias="none",
    )


def base_model_id(model_cfg) -> str:
    """The id written as the adapter's base_model_name_or_path: a Hub id or builtin name, never a local path."""
    if model_cfg.hub_id:
        return model_cfg.hub_id
    if Path(model_cfg.name_or_path).exists():
        logger.warning("model.hub_id is not set: the adapter records the local base path %s", model_cfg.name_or_path)
    return model_cfg.name_or_path


def load_adapter_strict(model, adapter: str | Path):
    """``PeftModel.from_pretrained``, but adapter weights that do not land in the model are an error, not peft's
    "Found missing adapter keys" warning: a silently half-loaded adapter evaluates as a different policy."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    for w in caught:
        if "missing adapter keys" in str(w.message):
            raise ValueError(
                f"adapter {adapter}: some of its weights did not load into the base model ({w.message}) Is it an "
                "adapter for this base and policy family? Modules that peft cannot round-trip must be excluded "
                "when training (lora.exclude_modules)."
            )
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return peft_model


def check_trained_policy_settings(name_or_path: str, policy_cfg) -> None:
    """Warn when ``policy_cfg`` decodes actions otherwise than a base made by ``rvla_peft.pretrain`` was trained to
    (its ``policy.json``): other bins or statistics give wrong actions without any error."""
    import json

    if not name_or_path.startswith("builtin:") and not Path(name_or_path).is_dir():
        return  # a Hub id: nothing local to read
    settings = Path(resolve_builtin(name_or_path)) / POLICY_SETTINGS_FILE
    if not settings.is_file():
        return
    trained = json.loads(settings.read_text())
    for key in ("family", "n_bins", "action_low", "action_high", "prompt_template"):
        if key in trained and getattr(policy_cfg, key, trained[key]) != trained[key]:
            logger.warning(
                "policy.%s=%r but %s was trained with %r (its policy.json): set policy.%s=%s",
                key, getattr(policy_cfg, key), name_or_path, trained[key], key, json.dumps(trained[key]),
            )  # fmt: skip


@contextlib.contextmanager
def _bitsandbytes_only_if(quantized: bool):
    """Within: bitsandbytes is importable only if ``quantized``. peft imports it whenever it is installed (``import
    peft``, and every LoRA injection asks whether 4-bit layers exist), and its import costs a second and on a CPU
    with AVX512-BF16 logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." although nothing is
    quantised. Hidden, it reads as not installed (``None`` in ``sys.modules``). The "installed?" answers that peft and
    transformers cache stay False afterwards (later peft calls on the model do not import it either) and are cleared
    before a quantised model is built."""
    if quantized:
        for module, flag in _BITSANDBYTES_FLAGS:
            if hasattr(cached := getattr(sys.modules.get(module), flag, None), "cache_clear"):
                cached.cache_clear()
        yield
    elif "bitsandbytes" in sys.modules:  # already loaded (or already hidden by an enclosing call)
        yield
    else:
        sys.modules["bitsandbytes"] = None
        try:
            yield
        finally:
            if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
                del sys.modules["bitsandbytes"]


# functools.cache'd "is bitsandbytes installed?" answers, which read False while it is hidden
_BITSANDBYTES_FLAGS = [
    ("peft.import_utils", "is_bnb_available"),
    ("peft.import_utils", "is_bnb_4bit_available"),
    ("transformers.utils.import_utils", "is_bitsandbytes_available"),
]


def build_policy(cfg, adapter: str | Path | None = None, device: torch.device | str = "cpu") -> Policy:
    """Base model + LoRA + value head, on ``device``. The LoRA is loaded from ``adapter`` when given (a trained
    policy: ``cfg.model.adapter`` is then ignored), else from the warm-up adapter ``cfg.model.adapter`` (trainable,
    plus a frozen copy named "reference" that :meth:`Policy.reference` switches to), else fresh from ``cfg.lora``."""
    warmup = None
    if adapter is None and getattr(cfg.model, "adapter", None):
        warmup = resolve_adapter(cfg.model.adapter)  # before the base loads: a missing or damaged adapter, by name
        check_warmup_adapter(warmup, base_model_id(cfg.model), family_config(cfg.policy).family, cfg.model.adapter)
    with _bitsandbytes_only_if(cfg.model.quantization != "none"):
        return _build_policy(cfg, adapter if warmup is None else warmup, device, reference=warmup is not None)


def _build_policy(cfg, adapter: str | Path | None, device: torch.device | str, reference: bool = False) -> Policy:
    from peft import get_peft_model
    from safetensors.torch import load_file

    policy_cfg = family_config(cfg.policy)  # the family's class, also for a config whose family was changed
    policy_cfg = dataclasses.replace(policy_cfg, gripper=gripper_convention(policy_cfg, cfg.model.name_or_path))
    model, processor = load_base(cfg.model, device)
    check_trained_policy_settings(cfg.model.name_or_path, policy_cfg)
    if adapter is None:
        peft_model = get_peft_model(model, lora_config(model, resolve_lora(policy_cfg.family, cfg.lora)))
    else:
        peft_model = load_adapter_strict(model, adapter)
    if reference:  # the same weights again, frozen: the reference policy's LoRA; "default" stays the active one
        peft_model.load_adapter(str(adapter), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        peft_model.set_adapter("default")
    hidden = getattr(model.config, "vlm_config", model.config).get_text_config().hidden_size  # pi0: vlm_config
    policy = policy_class(policy_cfg.family)(peft_model, processor, policy_cfg, hidden)
    if adapter is not None and (Path(adapter) / VALUE_HEAD_FILE).exists():
        policy.value_head.load_state_dict(load_file(str(Path(adapter) / VALUE_HEAD_FILE)))
    if adapter is not None:
        policy.load_adapter_extras(Path(adapter))  # fully trained modules beside the adapter (OpenVLA-OFT's heads)
    return policy.to(device)


def load_policy(
    base: str | ModelConfig | None,
    adapter: str | Path,
    device: torch.device | str = "cpu",
    *,
    revision: str | None = None,
    allow_base_mismatch: bool = False,
    token: str | None = None,
) -> Policy:
    """The policy an adapter was trained as: ``base`` + its LoRA + its value head, set up by its ``recipe.yaml``.

    ``adapter`` is a local folder or a Hub id (downloaded with ``snapshot_download``, at ``revision``). ``base`` is
    a model id or folder, a ``ModelConfig``, or None for the base the recipe names. An adapter on another base gives
    garbage actions without any error, so a base other than the adapter's ``base_model_name_or_path`` raises
    ``BaseMismatchError`` unless ``allow_base_mismatch`` (the same weights under another name).
    """
    local = resolve_adapter(adapter, revision=revision, token=token)
    recipe = adapter_recipe(local)
    try:
        cfg = load_config(recipe)
    except ConfigError as e:
        raise HubError(f"{recipe} (the recipe of adapter {adapter}): {e}") from None
    cfg.model = with_base(cfg.model, base)
    check_base_match(local, base_model_id(cfg.model), allow=allow_base_mismatch, adapter_name=str(adapter))
    return build_policy(cfg, adapter=local, device=device)
