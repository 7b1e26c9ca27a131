"""Policy families: name -> class, default LoRA settings, and ``load_policy`` (base + LoRA + value head)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from rvla_peft.policies.base import VALUE_HEAD_FILE, Policy

logger = logging.getLogger(__name__)

# Importing the classes is deferred (transformers is heavy); config validation only needs the names.
POLICY_FAMILIES = {"action_tokens": "rvla_peft.policies.openvla_style:ActionTokenPolicy"}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _family_class(name: str) -> type[Policy]:
    import importlib

    module, cls = POLICY_FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_base(model_cfg):
    """The base model and processor through the Auto classes (the real ``from_pretrained`` path)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from rvla_peft.policies.tiny import resolve_builtin

    path = resolve_builtin(model_cfg.name_or_path)
    kwargs = dict(revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=_DTYPES[model_cfg.torch_dtype], attn_implementation=model_cfg.attn_implementation, **kwargs
    )
    processor = AutoProcessor.from_pretrained(path, **kwargs)
    return model, processor


def lora_targets(model, lora_cfg) -> list[str] | str:
    """peft target_modules; with ``adapt_output_layer``, the output layer is added to the list."""
    targets = lora_cfg.target_modules
    if not lora_cfg.adapt_output_layer:
        return targets
    output = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    if targets == "all-linear":
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    return sorted(set(targets) | {output.rsplit(".", 1)[-1]})


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


def build_policy(cfg, adapter: str | Path | None = None, device: torch.device | str = "cpu") -> Policy:
    """Base model + LoRA (fresh from ``cfg.lora``, or loaded from ``adapter``) + value head, on ``device``."""
    from peft import PeftModel, get_peft_model
    from safetensors.torch import load_file

    model, processor = load_base(cfg.model)
    if adapter is None:
        peft_model = get_peft_model(model, lora_config(model, cfg.lora))
    else:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    hidden = model.config.get_text_config().hidden_size
    policy = _family_class(cfg.policy.family)(peft_model, processor, cfg.policy, hidden)
    if adapter is not None and (Path(adapter) / VALUE_HEAD_FILE).exists():
        policy.value_head.load_state_dict(load_file(str(Path(adapter) / VALUE_HEAD_FILE)))
    return policy.to(device)
