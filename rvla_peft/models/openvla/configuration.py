"""OpenVLA's configuration, field for field the published ``openvla/openvla-7b`` ``config.json``.

The checkpoint's own ``configuration_prismatic.py`` (``OpenVLAConfig`` < ``PrismaticConfig``, transformers 4.40) names
its vision towers by timm model id and its language model by a Prismatic backbone id; ``from_pretrained`` of that
``config.json`` must give this class the same values, so the fields, their defaults and the id tables below are the
source's. One field is new, ``featurizer_configs``: the timm hyper-parameters of each vision tower, which the
original reads from timm's model registry. It is filled from :data:`TIMM_VIT_ARCHS` when a checkpoint does not carry
it (the published one does not), and written out explicitly by small test models, whose towers have no timm id.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import AutoConfig

# === Prismatic id tables (prismatic/extern/hf/configuration_prismatic.py) ===
VISION_BACKBONE_TO_RESOLUTION: dict[str, list[int]] = {
    "clip-vit-l": [224],
    "siglip-vit-so400m": [224],
    "dinov2-vit-l": [224],
    "in1k-vit-l": [224],
    "clip-vit-l-336px": [336],
    "siglip-vit-so400m-384px": [384],
    "dinoclip-vit-l-336px": [336, 336],
    "dinosiglip-vit-so-224px": [224, 224],
    "dinosiglip-vit-so-384px": [384, 384],
}
VISION_BACKBONE_TO_TIMM_ID: dict[str, list[str]] = {
    "clip-vit-l": ["vit_large_patch14_clip_224.openai"],
    "clip-vit-l-336px": ["vit_large_patch14_clip_336.openai"],
    "dinov2-vit-l": ["vit_large_patch14_reg4_dinov2.lvd142m"],
    "in1k-vit-l": ["vit_large_patch16_224.augreg_in21k_ft_in1k"],
    "siglip-vit-so400m": ["vit_so400m_patch14_siglip_224"],
    "siglip-vit-so400m-384px": ["vit_so400m_patch14_siglip_384"],
    "dinoclip-vit-l-336px": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_large_patch14_clip_336.openai"],
    "dinosiglip-vit-so-224px": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
    "dinosiglip-vit-so-384px": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_384"],
}
TIMM_OVERRIDE_ACT_LAYER: dict[str, list[str | None]] = {
    "clip-vit-l": ["quick_gelu"],
    "clip-vit-l-336px": ["quick_gelu"],
    "dinov2-vit-l": [None],
    "in1k-vit-l": [None],
    "siglip-vit-so400m": [None],
    "siglip-vit-so400m-384px": [None],
    "dinoclip-vit-l-336px": [None, "quick_gelu"],
    "dinosiglip-vit-so-224px": [None, None],
    "dinosiglip-vit-so-384px": [None, None],
}
LLM_BACKBONE_TO_HF_PATH: dict[str, str] = {
    "llama2-7b-pure": "meta-llama/Llama-2-7b-hf",
    "llama2-13b-pure": "meta-llama/Llama-2-13b-hf",
    "llama2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "llama2-13b-chat": "meta-llama/Llama-2-13b-chat-hf",
    "vicuna-v15-7b": "lmsys/vicuna-7b-v1.5",
    "vicuna-v15-13b": "lmsys/vicuna-13b-v1.5",
    "mistral-v0.1-7b-pure": "mistralai/Mistral-7B-v0.1",
    "mistral-v0.1-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.1",
    "phi-2-3b": "microsoft/phi-2",
}
LLM_BACKBONE_TO_HF_METACLASS: dict[str, str] = {
    "llama2-7b-pure": "llama",
    "llama2-13b-pure": "llama",
    "llama2-7b-chat": "llama",
    "llama2-13b-chat": "llama",
    "vicuna-v15-7b": "llama",
    "vicuna-v15-13b": "llama",
    "mistral-v0.1-7b-pure": "mistral",
    "mistral-v0.1-7b-instruct": "mistral",
    "phi-2-3b": "phi",
}

# === timm ViT hyper-parameters (timm 0.9.10, OpenVLA's pin: timm/models/vision_transformer.py) ===
# Keys are timm's ``VisionTransformer`` arguments; anything left out takes timm's default (VIT_DEFAULTS).
_SIGLIP_SO400M = dict(
    patch_size=14, embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, class_token=False, global_pool="map"
)
TIMM_VIT_ARCHS: dict[str, dict[str, Any]] = {
    # vit_large_patch14_reg4_dinov2: DINOv2 ViT-L/14 with 4 register tokens and LayerScale
    "vit_large_patch14_reg4_dinov2.lvd142m": dict(
        patch_size=14, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5, reg_tokens=4, no_embed_class=True
    ),
    # vit_so400m_patch14_siglip_{224,384}: SigLIP So400m/14, no class token, attention-pool head ("map")
    "vit_so400m_patch14_siglip_224": _SIGLIP_SO400M,
    "vit_so400m_patch14_siglip_384": _SIGLIP_SO400M,
}
VIT_DEFAULTS: dict[str, Any] = dict(
    img_size=224,
    patch_size=16,
    embed_dim=768,
    depth=12,
    num_heads=12,
    mlp_ratio=4.0,
    qkv_bias=True,
    init_values=None,  # LayerScale off
    class_token=True,
    reg_tokens=0,
    no_embed_class=False,  # position embeddings also cover the class/register tokens
    global_pool="token",  # "map": SigLIP's attention-pool head (its weights are in the checkpoint, unused)
    act_layer=None,  # None: exact GELU (timm's default); "quick_gelu" for CLIP
    layer_norm_eps=1e-6,
)


def resolve_featurizer_config(timm_model_id: str, image_size: int, act_layer: str | None) -> dict[str, Any]:
    """The full timm hyper-parameters of one vision tower, as Prismatic creates it (``timm.create_model(id,
    num_classes=0, img_size=image_size, act_layer=act_layer)``)."""
    if timm_model_id not in TIMM_VIT_ARCHS:
        raise NotImplementedError(
            f"vision tower {timm_model_id!r} is not implemented natively (known: {sorted(TIMM_VIT_ARCHS)}); "
            "give its hyper-parameters in `featurizer_configs`"
        )
    return {**VIT_DEFAULTS, **TIMM_VIT_ARCHS[timm_model_id], "img_size": image_size, "act_layer": act_layer}


class OpenVLAConfig(PreTrainedConfig):
    r"""Configuration of :class:`~rvla_peft.models.openvla.OpenVLAForActionPrediction`.

    The defaults are Prismatic's (``siglip-224px+7b``); ``openvla/openvla-7b`` sets ``vision_backbone_id=
    "dinosiglip-vit-so-224px"``, ``llm_backbone_id="llama2-7b-pure"``, ``arch_specifier="no-align+fused-gelu-mlp"``,
    ``image_resize_strategy="resize-naive"``, ``text_config={"vocab_size": 32064, "pad_token_id": 32000}`` and its
    ``norm_stats``.

    Args:
        vision_backbone_id (`str`): Prismatic vision backbone id; picks ``timm_model_ids``, ``image_sizes`` and
            ``timm_override_act_layers`` when those are not given.
        llm_backbone_id (`str`): Prismatic LLM id; picks the language model type (``llama``, ``mistral``, ``phi``)
            when ``text_config`` has none, and ``hf_llm_id``.
        arch_specifier (`str`): projector recipe; informational (the projector follows
            ``use_fused_vision_backbone``: ``fc1, GELU, fc2`` for one tower, ``fc1, GELU, fc2, GELU, fc3`` with a
            4x wider first layer for fused towers).
        use_fused_vision_backbone (`bool`, *optional*): two towers whose patch features are concatenated channel-wise
            (DINOv2 + SigLIP); defaults to whether ``vision_backbone_id`` starts with ``dinoclip``/``dinosiglip``.
        image_resize_strategy (`str`): ``resize-naive``, ``resize-crop`` or ``letterbox`` (the processor's).
        text_config (`dict` or `PreTrainedConfig`, *optional*): the language model's config. As in the source, a
            missing value means the library defaults of that model type (for Llama: the 7B shapes, RMSNorm eps 1e-6,
            2048 positions) -- ``openvla-7b`` relies on them.
        llm_max_length (`int`): the tokenizer's model_max_length during training.
        pad_token_id (`int`): the ``<PAD>`` token Prismatic added to the Llama tokenizer (32000).
        pad_to_multiple_of (`int`): rows added to the embedding matrix beyond the tokenizer; the action tokens are
            the last ``n_action_bins`` ids *below* ``text_config.vocab_size - pad_to_multiple_of``.
        output_projector_states (`bool`): return the projected patch embeddings as ``projector_features``.
        timm_model_ids (`list[str]`, *optional*): timm id of each tower (derived from ``vision_backbone_id``).
        timm_override_act_layers (`list[str | None]`, *optional*): activation override of each tower.
        image_sizes (`list[int]`, *optional*): input resolution of each tower.
        hf_llm_id (`str`, *optional*): the Hub id the language model was initialised from (informational).
        featurizer_configs (`list[dict]`, *optional*): timm ``VisionTransformer`` arguments of each tower
            (``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``, ``init_values``,
            ``class_token``, ``reg_tokens``, ``no_embed_class``, ``global_pool``, ``act_layer``, ...). Not in the
            published checkpoint: resolved from ``timm_model_ids`` through :data:`TIMM_VIT_ARCHS` when missing.
        norm_stats (`dict`, *optional*): per-dataset statistics, ``norm_stats[dataset]["action"]`` with ``q01``,
            ``q99`` and ``mask`` (dimensions un-normalised with q01/q99 where ``mask`` is true).
        n_action_bins (`int`): uniform bins over [-1, 1] for each action dimension.
    """

    model_type = "openvla"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    vision_backbone_id: str = "siglip-vit-so400m"
    llm_backbone_id: str = "vicuna-v15-7b"
    arch_specifier: str = "no-align+gelu-mlp"
    use_fused_vision_backbone: bool | None = None
    image_resize_strategy: str = "letterbox"
    text_config: dict | PreTrainedConfig | None = None
    llm_max_length: int = 2048
    pad_token_id: int = 32000
    pad_to_multiple_of: int = 64
    output_projector_states: bool = False
    timm_model_ids: list[str] | None = None
    timm_override_act_layers: list[str | None] | None = None
    image_sizes: list[int] | None = None
    hf_llm_id: str | None = None
    featurizer_configs: list[dict] | None = None
    norm_stats: dict | None = None
    n_action_bins: int = 256

    def __post_init__(self, **kwargs):
        known = self.vision_backbone_id in VISION_BACKBONE_TO_TIMM_ID
        if self.featurizer_configs is None and not known:
            raise ValueError(
                f"unknown vision_backbone_id {self.vision_backbone_id!r} (known: "
                f"{sorted(VISION_BACKBONE_TO_TIMM_ID)}); a custom backbone needs `featurizer_configs`"
            )
        if self.use_fused_vision_backbone is None:
            self.use_fused_vision_backbone = self.vision_backbone_id.startswith(("dinoclip", "dinosiglip"))
        if self.timm_model_ids is None and known:
            self.timm_model_ids = list(VISION_BACKBONE_TO_TIMM_ID[self.vision_backbone_id])
        if self.timm_override_act_layers is None and known:
            self.timm_override_act_layers = list(TIMM_OVERRIDE_ACT_LAYER[self.vision_backbone_id])
        if self.image_sizes is None and known:
            self.image_sizes = list(VISION_BACKBONE_TO_RESOLUTION[self.vision_backbone_id])
        if self.hf_llm_id is None:
            self.hf_llm_id = LLM_BACKBONE_TO_HF_PATH.get(self.llm_backbone_id)
        if self.featurizer_configs is None:
            self.featurizer_configs = [
                resolve_featurizer_config(*tower)
                for tower in zip(self.timm_model_ids, self.image_sizes, self.timm_override_act_layers, strict=True)
            ]
        else:  # complete partial tower configs with timm's defaults
            self.featurizer_configs = [{**VIT_DEFAULTS, **tower} for tower in self.featurizer_configs]
        towers = 2 if self.use_fused_vision_backbone else 1
        if len(self.featurizer_configs) != towers:
            raise ValueError(f"use_fused_vision_backbone={self.use_fused_vision_backbone} needs {towers} tower(s)")
        if len({self._num_patches(tower) for tower in self.featurizer_configs}) != 1:
            raise ValueError("fused towers must give the same number of patches (their features are concatenated)")
        # The source builds the default text config from the LLM id's model type (llama / mistral / phi).
        if self.text_config is None:
            self.text_config = {"model_type": LLM_BACKBONE_TO_HF_METACLASS.get(self.llm_backbone_id, "llama")}
        super().__post_init__(**kwargs)

    @staticmethod
    def _num_patches(tower: dict[str, Any]) -> int:
        return (tower["img_size"] // tower["patch_size"]) ** 2

    @property
    def num_image_tokens(self) -> int:
        """Patch embeddings the projector inserts into the sequence (after BOS): 256 for 224 px / patch 14."""
        return self._num_patches(self.featurizer_configs[0])

    @property
    def vision_embed_dim(self) -> int:
        """Width of the (concatenated) patch features the projector reads: 1024 + 1152 for DINOv2 + SigLIP."""
        return sum(tower["embed_dim"] for tower in self.featurizer_configs)

    @property
    def action_vocab_size(self) -> int:
        """The id below which the action tokens sit: the tokenizer's size before ``pad_to_multiple_of`` rows were
        added (OpenVLAForActionPrediction.vocab_size in the source: 32064 - 64 = 32000)."""
        return self.text_config.vocab_size - self.pad_to_multiple_of


__all__ = ["OpenVLAConfig"]
