"""Pieces the families share: images and prompts in, actions out, and OpenVLA checkpoints' conventions (read by the
``openvla`` and ``openvla_oft`` families). Pure functions; the policy classes keep the state (caches, buffers)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

# ----------------------------------------------------------------------------------------------------------------
# images


def image_geometry(image_processor) -> tuple[tuple[int, int], Tensor, Tensor, float]:
    """Target (H, W), mean, std [1, C, 1, 1] and rescale factor of a Hugging Face image processor."""
    size = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", False) else None
    size = size or image_processor.size
    if "height" in size:
        hw = (size["height"], size["width"])
    else:
        hw = (size["shortest_edge"], size["shortest_edge"])
    # 3 channels, or 3 per vision tower for processors that stack one normalisation per tower (OpenVLA's)
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, -1, 1, 1)
    return hw, mean, std, float(getattr(image_processor, "rescale_factor", 1 / 255))


def normalize_images(
    rgb: Tensor, image_hw: tuple[int, int], mean: Tensor, std: Tensor, rescale: float, dtype: torch.dtype
) -> Tensor:
    """uint8 [B,H,W,3] -> pixel_values [B,C,h,w] on rgb's device (no PIL, no host round trip): bicubic resize with
    antialiasing, rescale, normalise. With C = 3k channels (one normalisation per stacked tower) each tower sees the
    same image."""
    x = rgb.permute(0, 3, 1, 2).float()
    if tuple(x.shape[-2:]) != tuple(image_hw):
        x = F.interpolate(x, size=image_hw, mode="bicubic", antialias=True, align_corners=False)
    x = x.repeat(1, mean.shape[1] // 3, 1, 1)
    return ((x * rescale - mean) / std).to(dtype)


def center_crop(rgb: Tensor, area: float, out_hw: tuple[int, int]) -> Tensor:
    """uint8 [B, H, W, 3] -> uint8 [B, h, w, 3]: the centred box of ``area`` of the image, resized to ``out_hw``.

    openvla-oft's evaluation crop (``experiments/robot/openvla_utils.py``: ``center_crop_image`` with
    ``crop_scale=0.9``, through ``tf.image.crop_and_resize``): sides of ``sqrt(area)``, bilinear sampling on the
    box's corner-aligned grid (``in = y1 * (H - 1) + i * (y2 - y1) * (H - 1) / (h - 1)``, no antialiasing), in
    float32 on [0, 1], back to uint8 as ``tf.image.convert_image_dtype(saturate=True)`` does (``x * 255.5``,
    truncated)."""
    # float32 throughout, as TensorFlow computes the box and the sampling grid
    # (the float32 square root correctly rounded, through float64: torch's float32 sqrt
    # of a 0-d tensor was one ulp off here)
    side = torch.tensor(area, dtype=torch.float32).double().sqrt().float().clamp(0, 1).to(rgb.device)
    lo = (1 - side) / 2
    hi = lo + side
    x = rgb.to(torch.float32) * (1.0 / 255)

    def grid(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
        i = torch.arange(n_out, device=rgb.device, dtype=torch.float32)
        if n_out > 1:
            at = lo * (n_in - 1) + i * ((hi - lo) * (n_in - 1) / (n_out - 1))
        else:
            at = (0.5 * (lo + hi) * (n_in - 1)).expand(1)
        low = at.floor()
        return low.long(), at.ceil().long(), (at - low)

    top, bottom, y_lerp = grid(rgb.shape[1], out_hw[0])
    left, right, x_lerp = grid(rgb.shape[2], out_hw[1])
    x_lerp = x_lerp[None, None, :, None]

    def row(index: Tensor) -> Tensor:
        r = x[:, index]
        return r[:, :, left] + (r[:, :, right] - r[:, :, left]) * x_lerp

    upper, lower = row(top), row(bottom)
    out = upper + (lower - upper) * y_lerp[None, :, None, None]
    return (out.clamp(0, 1) * 255.5).to(torch.uint8)


def blank_image(image_hw: tuple[int, int]) -> Image.Image:
    """A black image of the model's size: the processor expands its image placeholders without a real frame."""
    return Image.fromarray(np.zeros((*image_hw, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------------------------
# prompts


def prompt_ids(processor, template: str, instruction: str, image_hw: tuple[int, int]) -> Tensor:
    """Token ids of an OpenVLA-style prompt: ``template`` with the instruction lower-cased and without its final
    period, image placeholders expanded by the processor (its image token put first when the text has none)."""
    text = template.format(instruction=instruction.lower().rstrip("."))
    image_token = getattr(processor, "image_token", None)
    if image_token and image_token not in text:
        text = image_token + text
    return processor(text=text, images=blank_image(image_hw), return_tensors="pt")["input_ids"][0]


def pad_prompts(seqs: list[Tensor], pad_id: int, side: str = "left") -> tuple[Tensor, Tensor]:
    """Prompt ids and attention mask [B, L]. Left padding ends every prompt at the same position (what decoding
    the next tokens needs); right padding keeps every real token's position (pi0's bidirectional prefix)."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, s in enumerate(seqs):
        span = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        ids[row, span] = s
        mask[row, span] = 1
    return ids, mask


def positions(mask: Tensor) -> Tensor:
    """Position ids that skip left padding, so a padded prompt sees the same positions as an unpadded one."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------------------------------------------
# actions


def unnormalize_actions(normalized: Tensor, low: Tensor | None, high: Tensor | None) -> Tensor:
    """Normalised actions [..., A] in [-1, 1] -> env actions: ``0.5 * (a + 1) * (high - low) + low`` per dimension
    (OpenVLA's q01 / q99 map). ``low`` / ``high`` None stand for -1 / 1; both None is the identity, exactly."""
    if low is None and high is None:
        return normalized
    low = torch.full_like(normalized[..., :1], -1.0) if low is None else low.to(normalized)
    high = torch.full_like(normalized[..., :1], 1.0) if high is None else high.to(normalized)
    return 0.5 * (normalized + 1) * (high - low) + low


def normalize_actions(action: Tensor, low: Tensor | list[float] | None, high: Tensor | list[float] | None) -> Tensor:
    """Env actions [..., A] -> [-1, 1]: the inverse of :func:`unnormalize_actions` (a dimension with low == high maps
    to 0). ``low`` / ``high`` None stand for -1 / 1; both None is the identity, exactly."""
    if low is None and high is None:
        return action
    lo = torch.as_tensor(low if low is not None else [-1.0] * action.shape[-1]).to(action)
    hi = torch.as_tensor(high if high is not None else [1.0] * action.shape[-1]).to(action)
    span = hi - lo
    return torch.where(span.abs() > 1e-8, 2 * (action - lo) / span.where(span.abs() > 1e-8, 1.0) - 1, 0.0)


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` [B, H, ...] over the entries whose ``mask`` [B, H] is true (all when None)."""
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype).reshape(*mask.shape, *([1] * (values.dim() - mask.dim()))).expand_as(values)
    return (values * weights).sum() / weights.sum().clamp(min=1)


def bounds_tensor(values: list[float] | None) -> Tensor | None:
    return None if values is None else torch.tensor(values, dtype=torch.float32)


def gripper_to_env(action: Tensor, convention: str | None) -> Tensor:
    """Actions [..., A] whose last dim is the gripper in ``convention`` -> ManiSkill's (-1 closed, +1 open).

    'zero_one' is OpenVLA's ``normalize_gripper_action`` (``experiments/robot/robot_utils.py``): ``2 * (x - 0) /
    (1 - 0) - 1``, and 'zero_one_binary' its ``binarize=True`` (``np.sign`` of that). OpenVLA's
    ``invert_gripper_action`` is not applied: it is for simulators where -1 opens (LIBERO); ManiSkill's -1 closes.
    'signed' and None (unresolved: as is) leave the action unchanged."""
    if convention in (None, "signed"):
        return action
    gripper = 2 * action[..., -1:] - 1
    if convention == "zero_one_binary":
        gripper = torch.sign(gripper)
    elif convention != "zero_one":
        raise ValueError(f"unknown gripper convention {convention!r}: use 'signed', 'zero_one' or 'zero_one_binary'")
    return torch.cat([action[..., :-1], gripper], dim=-1)


def gripper_from_env(action: Tensor, convention: str | None) -> Tensor:
    """ManiSkill's gripper command (-1 closed, +1 open) -> the policy's ``convention``: the inverse of
    :func:`gripper_to_env` on {-1, +1} (demonstrations recorded in ManiSkill, tokenised for an OpenVLA base)."""
    if convention in (None, "signed"):
        return action
    if convention not in ("zero_one", "zero_one_binary"):
        raise ValueError(f"unknown gripper convention {convention!r}: use 'signed', 'zero_one' or 'zero_one_binary'")
    return torch.cat([action[..., :-1], (action[..., -1:] + 1) / 2], dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# OpenVLA checkpoints (families openvla and openvla_oft)

OPENVLA_EMPTY_WORD = "\u2581"  # SentencePiece's word boundary alone: id 29871 in the Llama-2 vocabulary


def with_empty_word(ids: Tensor, empty_word_id: int | None) -> Tensor:
    """OpenVLA's prompt ends with the empty-word token, which its training prompts had before the first action token
    and its ``predict_action`` appends (only with a tokenizer that has it)."""
    if empty_word_id is None or ids[-1] == empty_word_id:
        return ids
    return F.pad(ids, (0, 1), value=empty_word_id)


def action_bounds_from_norm_stats(norm_stats: dict | None, unnorm_key: str) -> tuple[list[float], list[float]]:
    """``(low, high)`` from OpenVLA's dataset statistics.

    OpenVLA maps a normalised action ``a`` in [-1, 1] to ``0.5 * (a + 1) * (q99 - q01) + q01`` where ``mask`` is
    true and leaves it as is elsewhere (the gripper); the identity is the same map with ``low=-1, high=1``."""
    if not norm_stats or unnorm_key not in norm_stats:
        raise ValueError(
            f"policy.unnorm_key={unnorm_key!r} is not in the checkpoint's norm_stats; "
            f"available: {sorted(norm_stats or {})}"
        )
    stats = norm_stats[unnorm_key]["action"]
    q01, q99 = stats["q01"], stats["q99"]
    mask = stats.get("mask", [True] * len(q01))
    low = [float(lo) if m else -1.0 for lo, m in zip(q01, mask, strict=True)]
    high = [float(hi) if m else 1.0 for hi, m in zip(q99, mask, strict=True)]
    return low, high


def openvla_action_bounds(policy_cfg, model_config) -> tuple[list[float] | None, list[float] | None]:
    """The un-normalisation bounds of an OpenVLA policy: the checkpoint's ``norm_stats[policy.unnorm_key]`` when set,
    else ``policy.action_low/high``."""
    unnorm_key = getattr(policy_cfg, "unnorm_key", None)
    if unnorm_key is None:
        return policy_cfg.action_low, policy_cfg.action_high
    if policy_cfg.action_low is not None or policy_cfg.action_high is not None:
        raise ValueError("set either policy.unnorm_key or policy.action_low/action_high, not both")
    low, high = action_bounds_from_norm_stats(model_config.norm_stats, unnorm_key)
    if len(low) != policy_cfg.action_dim:
        raise ValueError(
            f"norm_stats[{unnorm_key!r}] has {len(low)} action dims, policy.action_dim {policy_cfg.action_dim}"
        )
    return low, high
