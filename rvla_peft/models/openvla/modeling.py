"""OpenVLA (Prismatic ``dinosiglip-vit-so-224px`` + Llama-2) for current transformers, without remote code or timm.

Architecture, as in the checkpoint's ``modeling_prismatic.py``:

- ``vision_backbone``: one or two timm ViTs (``featurizer`` = DINOv2 ViT-L/14 with registers, ``fused_featurizer`` =
  SigLIP So400m/14). Each sees its own 3 channels of the 6-channel ``pixel_values`` and returns the patch tokens of
  its *second-to-last* block (no class/register tokens, no final norm); the two are concatenated channel-wise.
- ``projector``: ``fc1 -> GELU -> fc2 -> GELU -> fc3`` for fused towers (``fc1 -> GELU -> fc2`` for one).
- ``language_model``: a ``LlamaForCausalLM``; the projected patches are inserted right after the BOS token.

The ViTs are written here in plain torch with timm's module names (``patch_embed.proj``, ``blocks.N.attn.qkv``,
``ls1.scale_factor``, ``attn_pool``, ...), so the published state dict loads unchanged: no key mapping, no copy.
Attention goes through transformers' attention interface (``attn_implementation``: eager, sdpa, flash).

Coordinates. ``input_ids``, ``attention_mask``, ``position_ids`` and ``labels`` index the *text* (what the processor
returns); the model shifts them over the image patches itself. The patches go after the first attended token, which
is the BOS token with or without left padding (the source inserts at index 1, i.e. assumes no left padding: both
agree on unpadded input). Outputs (``logits``, ``hidden_states``, the cache) cover the full multimodal sequence, as
in the source. In cached decoding the number of cached image slots is read off the cache length and the attention
mask, so a caller passes text-length masks and text positions throughout (without a mask, i.e. without padding, the
new tokens' positions follow the cache).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from rvla_peft.models.openvla.configuration import OpenVLAConfig

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------------------
# timm's ViT, with timm's parameter names


def eager_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Plain softmax attention (differentiable twice anywhere); returns [B, N, heads, head_dim] like the others."""
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class Attention(nn.Module):
    """timm ``Attention``: one fused ``qkv`` projection, bidirectional."""

    def __init__(self, config: OpenVLAConfig, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.config = config  # read at call time: ``attn_implementation`` may change after construction
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, _ = attention(self, q, k, v, None, scaling=self.scaling, dropout=0.0, is_causal=False)
        return self.proj(out.reshape(batch, tokens, dim))


class LayerScale(nn.Module):
    """timm ``LayerScale`` with its ``gamma`` renamed ``scale_factor``, as in the HF export (transformers used to
    rename any ``gamma`` parameter to ``weight`` on load)."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.init_values = init_values
        self.scale_factor = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale_factor


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str | None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACT2FN[act or "gelu"]  # timm's default nn.GELU is the exact (erf) GELU, ACT2FN["gelu"]
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(GradientCheckpointingLayer):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(self, config: OpenVLAConfig, tower: dict):
        super().__init__()
        dim, eps, ls = tower["embed_dim"], tower["layer_norm_eps"], tower["init_values"]
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(config, dim, tower["num_heads"], tower["qkv_bias"])
        self.ls1 = LayerScale(dim, ls) if ls else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * tower["mlp_ratio"]), tower["act_layer"])
        self.ls2 = LayerScale(dim, ls) if ls else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.proj(pixel_values).flatten(2).transpose(1, 2)  # [B, patches, dim]


class AttentionPoolLatent(nn.Module):
    """SigLIP's attention-pool head (timm ``global_pool="map"``). OpenVLA reads patch tokens and never calls it, but
    its weights are in the checkpoint, so it exists to load them (and is here for completeness)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), None)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        q = self.q(self.latent.expand(batch, -1, -1)).view(batch, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(batch, tokens, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, 1, dim)
        out = self.proj(out)
        return (out + self.mlp(self.norm(out)))[:, 0]


class VisionTransformer(nn.Module):
    """timm ``VisionTransformer`` (``num_classes=0``) reduced to what OpenVLA uses: ``forward`` is timm's
    ``get_intermediate_layers(x, n={depth - 2})``, the patch tokens after the second-to-last block."""

    def __init__(self, config: OpenVLAConfig, tower: dict):
        super().__init__()
        if tower["global_pool"] not in ("token", "map", ""):
            raise NotImplementedError(f"timm global_pool={tower['global_pool']!r} (a different head) is not supported")
        dim, patches = tower["embed_dim"], (tower["img_size"] // tower["patch_size"]) ** 2
        self.embed_dim, self.no_embed_class = dim, tower["no_embed_class"]
        self.num_prefix_tokens = int(tower["class_token"]) + tower["reg_tokens"]
        self.patch_embed = PatchEmbed(tower["patch_size"], dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if tower["class_token"] else None
        self.reg_token = nn.Parameter(torch.zeros(1, tower["reg_tokens"], dim)) if tower["reg_tokens"] else None
        positions = patches if self.no_embed_class else patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, positions, dim))
        self.blocks = nn.ModuleList(Block(config, tower) for _ in range(tower["depth"]))
        self.norm = nn.LayerNorm(dim, eps=tower["layer_norm_eps"])  # in the checkpoint, unused by OpenVLA
        if tower["global_pool"] == "map":
            self.attn_pool = AttentionPoolLatent(dim, tower["num_heads"], tower["mlp_ratio"], tower["layer_norm_eps"])
        # OpenVLA's features: the output of block depth-2; the last block runs only for the pooled head
        self.feature_layer = tower["depth"] - 2

    def _pos_embed(self, x: Tensor) -> Tensor:
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:  # DINOv2: positions cover the patches only, class/register tokens are prepended after
            return torch.cat([*prefix, x + self.pos_embed], dim=1)
        return torch.cat([*prefix, x], dim=1) + self.pos_embed

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self._pos_embed(self.patch_embed(pixel_values))
        for block in self.blocks[: self.feature_layer + 1]:
            x = block(x)
        return x[:, self.num_prefix_tokens :]


# ---------------------------------------------------------------------------------------------------------------
# Prismatic vision backbone and projector


class PrismaticVisionBackbone(nn.Module):
    """One tower, or two fused: ``pixel_values`` [B, 3 * towers, H, W] -> patch features [B, patches, sum(dims)]."""

    def __init__(self, config: OpenVLAConfig):
        super().__init__()
        self.use_fused_vision_backbone = config.use_fused_vision_backbone
        self.featurizer = VisionTransformer(config, config.featurizer_configs[0])
        if self.use_fused_vision_backbone:
            self.fused_featurizer = VisionTransformer(config, config.featurizer_configs[1])
        self.embed_dim = config.vision_embed_dim

    def forward(self, pixel_values: Tensor) -> Tensor:
        if not self.use_fused_vision_backbone:
            return self.featurizer(pixel_values)
        # channel-stacked input: the processor normalised the same image once per tower (DINOv2's, then SigLIP's)
        image, image_fused = torch.split(pixel_values, [3, 3], dim=1)
        return torch.cat([self.featurizer(image), self.fused_featurizer(image_fused)], dim=2)


class PrismaticProjector(nn.Module):
    def __init__(self, use_fused_vision_backbone: bool, vision_dim: int, llm_dim: int):
        super().__init__()
        self.use_fused_vision_backbone = use_fused_vision_backbone
        if not use_fused_vision_backbone:
            self.fc1 = nn.Linear(vision_dim, llm_dim)
            self.fc2 = nn.Linear(llm_dim, llm_dim)
            self.act_fn1 = nn.GELU()
        else:
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
            self.fc3 = nn.Linear(llm_dim, llm_dim)
            self.act_fn1 = nn.GELU()
            self.act_fn2 = nn.GELU()

    def forward(self, patches: Tensor) -> Tensor:
        x = self.fc2(self.act_fn1(self.fc1(patches)))
        if self.use_fused_vision_backbone:
            x = self.fc3(self.act_fn2(x))
        return x


# ---------------------------------------------------------------------------------------------------------------
# the model


@dataclass
class OpenVLACausalLMOutputWithPast(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` (over the multimodal sequence) plus the projected patch embeddings."""

    projector_features: torch.FloatTensor | None = None


def _insert_after(text: Tensor, image: Tensor, at: Tensor) -> Tensor:
    """Insert ``image`` [B, P, ...] into ``text`` [B, L, ...] right after index ``at`` [B] of each row (a gather, so
    values are copied exactly and gradients flow to both)."""
    (batch, length), n_image, extra = text.shape[:2], image.shape[1], text.dim() - 2
    j = torch.arange(length + n_image, device=text.device).expand(batch, -1)  # [B, L + P]
    start = at[:, None] + 1
    is_image = (j >= start) & (j < start + n_image)
    text_index = torch.where(j < start, j, j - n_image).clamp(0, length - 1)
    image_index = (j - start).clamp(0, n_image - 1)

    def gather(source: Tensor, index: Tensor) -> Tensor:
        index = index.view(*index.shape, *[1] * extra).expand(*index.shape, *source.shape[2:])
        return source.expand(batch, *source.shape[1:]).gather(1, index)

    return torch.where(
        is_image.view(*is_image.shape, *[1] * extra), gather(image, image_index), gather(text, text_index)
    )


class PrismaticPreTrainedModel(PreTrainedModel):
    config: OpenVLAConfig
    config_class = OpenVLAConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["PrismaticProjector", "Block"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module: nn.Module) -> None:
        """Random init for configs built from scratch (tests); pretrained weights overwrite all of it."""
        super()._init_weights(module)
        if isinstance(module, VisionTransformer):
            init.normal_(module.pos_embed, std=0.02)
            for token in (module.cls_token, module.reg_token):
                if token is not None:
                    init.normal_(token, std=1e-6)
        elif isinstance(module, LayerScale):
            init.constant_(module.scale_factor, module.init_values)
        elif isinstance(module, AttentionPoolLatent):
            init.normal_(module.latent, std=module.latent.shape[-1] ** -0.5)


class OpenVLAForActionPrediction(PrismaticPreTrainedModel, GenerationMixin):
    """OpenVLA: image + prompt in, next-token logits out (actions are tokens; see the module docstring for the
    coordinates of the inputs). Parameter names are the published checkpoint's, e.g.
    ``vision_backbone.featurizer.blocks.0.attn.qkv.weight``, ``projector.fc1.weight``,
    ``language_model.model.layers.0.self_attn.q_proj.weight``, ``language_model.lm_head.weight``."""

    def __init__(self, config: OpenVLAConfig):
        super().__init__(config)
        self.vision_backbone = PrismaticVisionBackbone(config)
        self.projector = PrismaticProjector(
            config.use_fused_vision_backbone, config.vision_embed_dim, config.text_config.hidden_size
        )
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        """Projected patch embeddings [B, num_image_tokens, hidden], the visual tokens the language model reads."""
        return self.projector(self.vision_backbone(pixel_values))

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        logits_to_keep: int | Tensor = 0,
        output_projector_features: bool | None = None,
        **kwargs,
    ) -> OpenVLACausalLMOutputWithPast:
        r"""
        input_ids / inputs_embeds: text tokens [B, L] (from the processor: BOS first; the image is not a token).
        attention_mask: [B, past + L] over the *text* tokens (left padding allowed).
        pixel_values: [B, 3 * towers, H, W] (prefill only); the patches go after each row's first attended token.
        position_ids: [B, L] text positions (e.g. ``cumsum(mask) - 1``); shifted here past the image patches.
        labels: [B, L] text labels; the image slots are ignored in the loss.
        cache / use_cache / logits_to_keep: as for ``LlamaForCausalLM`` (the cache holds the image slots too).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        past = cache.get_seq_length() if cache is not None else 0
        projected = None
        if pixel_values is not None:
            if past:
                raise ValueError("pixel_values go with the first forward only (the cache already holds the image)")
            projected = self.get_image_features(pixel_values.to(inputs_embeds.dtype)).to(inputs_embeds.device)
            inputs_embeds, attention_mask, position_ids, labels = self._merge_image(
                inputs_embeds, projected, attention_mask, position_ids, labels
            )
        elif past and attention_mask is not None:
            attention_mask, position_ids = self._decode_coordinates(inputs_embeds, attention_mask, position_ids, past)
        elif past:
            # No mask, no padding (``generate`` drops an all-ones mask): the new tokens follow the cache.
            position_ids = None

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        keep = (
            output_projector_features if output_projector_features is not None else self.config.output_projector_states
        )
        return OpenVLACausalLMOutputWithPast(
            loss=outputs.loss,
            logits=outputs.logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            projector_features=projected if keep else None,
        )

    def _merge_image(
        self,
        embeds: Tensor,
        image: Tensor,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        labels: Tensor | None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """Text-coordinate inputs -> multimodal ones, the image after each row's first attended token."""
        batch, n_image = embeds.shape[0], image.shape[1]
        if attention_mask is not None:
            at = attention_mask.long().argmax(-1)  # first attended token: the BOS, after any left padding
        else:
            at = torch.zeros(batch, dtype=torch.long, device=embeds.device)
        embeds = _insert_after(embeds, image, at)
        if attention_mask is not None:
            attention_mask = _insert_after(attention_mask, attention_mask.new_ones(batch, n_image), at)
        if position_ids is not None:
            position_ids = position_ids.expand(batch, -1)
            start = position_ids.gather(1, at[:, None])  # the BOS's position; the patches follow it
            after = torch.arange(position_ids.shape[1], device=position_ids.device)[None] > at[:, None]
            shifted = position_ids + n_image * after
            image_positions = start + 1 + torch.arange(n_image, device=position_ids.device)[None]
            position_ids = _insert_after(shifted, image_positions, at)
        elif attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if labels is not None:
            labels = _insert_after(labels, labels.new_full((batch, n_image), IGNORE_INDEX), at)
        return embeds, attention_mask, position_ids, labels

    def _decode_coordinates(
        self, embeds: Tensor, attention_mask: Tensor, position_ids: Tensor | None, past: int
    ) -> tuple[Tensor, Tensor]:
        """Cached decoding: the cache holds ``past`` slots, the text mask covers past text + new tokens; the
        difference is the image slots, which the mask gets back (after the BOS) and the new positions skip."""
        new = embeds.shape[1]
        n_image = past - (attention_mask.shape[1] - new)
        if n_image < 0:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} tokens, more than the {past} cached + {new} new ones"
            )
        if n_image:
            at = attention_mask.long().argmax(-1)
            ones = attention_mask.new_ones(attention_mask.shape[0], n_image)
            attention_mask = _insert_after(attention_mask, ones, at)
        if position_ids is not None:
            position_ids = position_ids + n_image  # every new token comes after the image
        else:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]
        return attention_mask, position_ids


__all__ = ["OpenVLAForActionPrediction", "PrismaticPreTrainedModel", "OpenVLACausalLMOutputWithPast"]
