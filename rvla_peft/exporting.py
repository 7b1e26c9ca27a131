"""Merged export: a trained LoRA folded into its base's weights, written as a standalone checkpoint.

    export_merged("outputs/tiny_cpu", "exports/tiny_cpu_merged")

The folder loads with ``AutoModelForImageTextToText.from_pretrained`` alone (no peft; the ``openvla`` families after
``import rvla_peft.models.openvla``), and as an ``rvla_peft`` policy from its own ``recipe.yaml`` with
``model.name_or_path`` set to the folder (``python -m rvla_peft.eval --base FOLDER`` reads it): a fresh LoRA starts at
zero, so that policy acts as the merged weights do. What it holds:

- the merged model (safetensors) and the processor, via ``save_pretrained``;
- ``recipe.yaml``: the training recipe, its model section rewritten for the folder (``model.name_or_path: .``, a
  marker for "this folder": a path written at export time would break when the folder moves; no quantization, no
  base hub_id or revision, the processor saved here) and ``hub`` reset (so that training from it never pushes over
  the adapter's repo);
- ``policy.json``: the ``policy.*`` settings the weights were trained with, as ``rvla_peft.pretrain`` writes it
  (``build_policy`` warns when a recipe decodes actions otherwise). OpenVLA's ``norm_stats`` stay in ``config.json``;
- OpenVLA-OFT: its trained action and scale heads (fully trained modules, not LoRA), in ``action_heads.safetensors``
  as the adapter has them; the recipe names that file as ``policy.action_head_file``, so ``build_policy`` loads
  both heads;
- a short model card (``README.md``, ``rvla_peft/templates/merged_card.md``).

The value head is dropped: it is PPO's critic, used only in training. A base quantized in training (QLoRA) is refused
unless ``dequantize``: the LoRA is then merged into the base loaded unquantized in ``model.torch_dtype``, whose weights
differ from the quantized ones the LoRA was trained against (the card says so).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from rvla_peft.adapters import HubError, adapter_recipe, is_hub_id, resolve_adapter, with_base
from rvla_peft.cards import merged_card
from rvla_peft.config import HubConfig, ModelConfig, TrainConfig, dump_yaml, load_config
from rvla_peft.hub.run_files import RunFiles
from rvla_peft.policies.registry import base_model_id, load_policy
from rvla_peft.utils.commands import portable_path
from rvla_peft.utils.constants import (
    ACTION_HEADS_FILE,
    CARD_FILE,
    POLICY_SETTINGS_FILE,
    RECIPE_FILE,
)
from rvla_peft.utils.io import atomic_save

logger = logging.getLogger(__name__)

THIS_FOLDER = "."  # model.name_or_path in an export's recipe.yaml: the folder that holds it


class ExportError(ValueError):
    """An export that cannot go on (no adapter, an existing output, a quantized base); the message names the fix."""


def find_adapter(output_dir_or_adapter: str | Path) -> tuple[Path, Path]:
    """``(adapter folder, recipe)`` of a training run's output_dir, an adapter folder or a Hub adapter id; the recipe
    is the one ``load_policy`` reads."""
    given = str(output_dir_or_adapter)
    try:
        if not Path(given).exists() and is_hub_id(given):
            local = resolve_adapter(given)
        elif not Path(given).is_dir():
            raise ExportError(f"{given} does not exist: pass a training run's output_dir or an adapter folder")
        else:
            local = RunFiles.find(given, report_dir=False).adapter_dir
        return local, adapter_recipe(local)
    except HubError as e:  # no adapter or no recipe there, or a Hub id that cannot be downloaded
        raise ExportError(str(e)) from None


def base_model_config(model_cfg: ModelConfig, dequantize: bool) -> ModelConfig:
    """The base to merge into: refused when quantized (merging into 4-/8-bit weights is lossy and peft cannot save
    them as a plain checkpoint) unless ``dequantize``, which loads it unquantized in ``model.torch_dtype``."""
    if model_cfg.quantization == "none":
        return model_cfg
    if not dequantize:
        raise ExportError(
            f"the adapter was trained on a {model_cfg.quantization} base (model.quantization={model_cfg.quantization})"
            ", which cannot hold merged weights: pass --dequantize (dequantize=True) to merge into the base loaded "
            f"unquantized in model.torch_dtype={model_cfg.torch_dtype}"
        )
    logger.warning(
        "de-quantizing: the LoRA was trained on the %s base and is merged into its unquantized %s weights; the merged "
        "model's actions can differ slightly from the quantized policy's",
        model_cfg.quantization,
        model_cfg.torch_dtype,
    )
    return dataclasses.replace(model_cfg, quantization="none")


def untie_adapted_weights(peft_model) -> list[str]:
    """Give every LoRA-adapted weight that is tied to another parameter its own copy, and mark the configs untied.

    An output layer tied to the input embeddings (``tie_word_embeddings``, e.g. PaliGemma's) and adapted with
    ``lora.adapt_output_layer`` would otherwise take the merge into the input embeddings too: the merged model would
    read its prompt through other embeddings than the trained policy did. Returns the names of the untied layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from torch import nn

    model = peft_model.get_base_model()
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[p.data_ptr()] = owners.get(p.data_ptr(), 0) + 1
    untied = []
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        base = module.get_base_layer()
        weight = getattr(base, "weight", None)
        if weight is not None and owners.get(weight.data_ptr(), 0) > 1:
            base.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            untied.append(name)
    if untied:
        configs = [model.config, *(getattr(model.config, k) for k in getattr(model.config, "sub_configs", {}))]
        for config in configs:
            if config is not None and getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False
    return untied


def merged_recipe(cfg: TrainConfig) -> TrainConfig:
    """The training recipe for the merged folder: the model is the folder itself (``THIS_FOLDER``), unquantized,
    with its own processor; the hub section reset; OpenVLA-OFT's trained action head read from the folder."""
    model = dataclasses.replace(
        cfg.model,
        name_or_path=THIS_FOLDER,
        hub_id=None,
        revision=None,
        quantization="none",
        processor_name_or_path=None,
    )
    policy = cfg.policy
    if policy.family == "openvla_oft":
        policy = dataclasses.replace(policy, action_head_file=ACTION_HEADS_FILE)
    return dataclasses.replace(cfg, model=model, policy=policy, hub=HubConfig())


def recipe_text(cfg: TrainConfig) -> str:
    header = (
        "# Recipe of a merged export (python -m rvla_peft.export): the base is this folder, so set\n"
        "# model.name_or_path=PATH_TO_THIS_FOLDER ('.' stands for it); `python -m rvla_peft.eval --base PATH` does.\n"
    )
    return header + dump_yaml(cfg)


def export_merged(
    output_dir_or_adapter: str | Path,
    out: str | Path,
    *,
    base: str | None = None,
    dequantize: bool = False,
    overwrite: bool = False,
    allow_base_mismatch: bool = False,
) -> Path:
    """Merge a trained adapter into its base and write the standalone folder ``out`` (module docstring); returns it.

    ``output_dir_or_adapter``: a training run's output_dir, an adapter folder or a Hub adapter id. ``base``: the
    base to merge into (None: the recipe's; another name must be the same weights, see ``allow_base_mismatch``).
    Everything that can be refused (no adapter, an existing ``out``, a quantized base) is refused before any model
    loads. ``out`` is written atomically: a reader never sees a half-written folder.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file: choose a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty: choose another --out or pass --overwrite")
    adapter_dir, recipe = find_adapter(output_dir_or_adapter)
    for source in (adapter_dir, recipe.parent):
        if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
            raise ExportError(f"--out {out} would replace the run or adapter it exports ({source}): choose another")
    cfg = load_config(recipe)
    model_cfg = with_base(cfg.model, base)
    quantized = model_cfg.quantization if model_cfg.quantization != "none" else None
    model_cfg = base_model_config(model_cfg, dequantize)
    base_id = base_model_id(model_cfg)

    policy = load_policy(model_cfg, adapter_dir, allow_base_mismatch=allow_base_mismatch)
    untied = untie_adapted_weights(policy.peft_model)
    if untied:
        logger.info("untied %s from the weights tied to them before merging", ", ".join(untied))
    model = policy.peft_model.merge_and_unload(safe_merge=True)  # W + scale * B @ A, with a NaN check
    leftover = [n for n, _ in model.named_parameters() if "lora_" in n]
    if leftover:
        raise ExportError(f"merge left LoRA weights in the model: {leftover[:3]}")
    heads = adapter_dir / ACTION_HEADS_FILE
    oft_heads = cfg.policy.family == "openvla_oft" and heads.is_file()
    adapter = portable_path(output_dir_or_adapter)  # the card is shared: no absolute path of this machine
    card = str(merged_card(out.name, base_id, adapter, cfg, quantized, oft_heads))

    def write(staging: Path) -> None:
        model.save_pretrained(str(staging), safe_serialization=True)
        policy.processor.save_pretrained(str(staging))
        if heads.is_file():
            (staging / ACTION_HEADS_FILE).write_bytes(heads.read_bytes())
        exported = merged_recipe(dataclasses.replace(cfg, model=model_cfg))
        (staging / RECIPE_FILE).write_text(recipe_text(exported))
        (staging / POLICY_SETTINGS_FILE).write_text(json.dumps(dataclasses.asdict(exported.policy), indent=2) + "\n")
        (staging / CARD_FILE).write_text(card)
        for path in staging.iterdir():
            if path.is_file():
                path.chmod(0o644)  # safetensors writes 0600, not what a shipped folder should have

    atomic_save(out, write)
    logger.info("merged %s into %s: %s", adapter_dir, base_id, out)
    return out
