"""OpenVLA-OFT's centre crop: the same pixels as openvla-oft's ``center_crop_image`` (``tf.image.crop_and_resize``
of the centred box of 0.9 of the area, back to 224, ``convert_image_dtype`` both ways), and the OFT policy feeds the
cropped frame to its vision towers."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fixed_obs

from rvla_peft.config import ConfigError, load_config
from rvla_peft.policies.common import center_crop, normalize_images
from rvla_peft.policies.registry import build_policy

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def tf_crop_and_resize(image: np.ndarray, box: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """``tf.image.crop_and_resize`` for one float32 image [H, W, C] and box [y1, x1, y2, x2] (bilinear), written
    from TensorFlow's kernel (``crop_and_resize_op.cc``): float32 coordinates, top and bottom rows lerped in x, then
    in y."""
    height, width = image.shape[:2]
    y1, x1, y2, x2 = (np.float32(v) for v in box)
    crop_h, crop_w = crop_hw
    height_scale = (y2 - y1) * np.float32(height - 1) / np.float32(crop_h - 1)
    width_scale = (x2 - x1) * np.float32(width - 1) / np.float32(crop_w - 1)
    out = np.zeros((crop_h, crop_w, image.shape[2]), dtype=np.float32)
    for y in range(crop_h):
        in_y = y1 * np.float32(height - 1) + np.float32(y) * height_scale
        top, bottom = int(math.floor(in_y)), int(math.ceil(in_y))
        y_lerp = np.float32(in_y - np.float32(top))
        for x in range(crop_w):
            in_x = x1 * np.float32(width - 1) + np.float32(x) * width_scale
            left, right = int(math.floor(in_x)), int(math.ceil(in_x))
            x_lerp = np.float32(in_x - np.float32(left))
            top_row = image[top, left] + (image[top, right] - image[top, left]) * x_lerp
            bottom_row = image[bottom, left] + (image[bottom, right] - image[bottom, left]) * x_lerp
            out[y, x] = top_row + (bottom_row - top_row) * y_lerp
    return out


def openvla_oft_center_crop_image(image: np.ndarray, crop_scale: float = 0.9, size: int = 224) -> np.ndarray:
    """openvla-oft's ``center_crop_image`` / ``crop_and_resize`` (``experiments/robot/openvla_utils.py``), with
    TensorFlow's ops written out: uint8 -> [0, 1] float32, the centred box of sides sqrt(crop_scale), resized to
    ``size``, clipped, back to uint8 (``convert_image_dtype(saturate=True)``: x * 255.5, truncated)."""
    x = image.astype(np.float32) * np.float32(1.0 / 255)
    side = np.clip(np.sqrt(np.float32(crop_scale)), 0, 1).astype(np.float32)
    offset = (np.float32(1) - side) / np.float32(2)
    box = np.array([offset, offset, offset + side, offset + side], dtype=np.float32)
    out = np.clip(tf_crop_and_resize(x, box, (size, size)), 0, 1)
    return (out * np.float32(255.5)).astype(np.uint8)


def fixed_image(size: int) -> np.ndarray:
    """A deterministic frame with edges, gradients and saturated pixels (where rounding differences would show)."""
    yy, xx = np.mgrid[0:size, 0:size]
    r = (yy * 255 // (size - 1)).astype(np.uint8)
    g = ((xx * 7 + yy * 3) % 256).astype(np.uint8)
    b = np.where((xx // 16 + yy // 16) % 2 == 0, 255, 0).astype(np.uint8)
    return np.stack([r, g, b], axis=-1)


@pytest.mark.parametrize("size", [224, 64])
def test_center_crop_is_openvla_ofts(size):
    image = fixed_image(size)
    expected = openvla_oft_center_crop_image(image, 0.9, size)
    ours = center_crop(torch.from_numpy(image)[None], 0.9, (size, size))[0].numpy()
    assert ours.dtype == np.uint8 and ours.shape == (size, size, 3)
    np.testing.assert_array_equal(ours, expected)
    # it is a crop: the corners come from inside the frame, the centre stays put
    assert not np.array_equal(ours, image)
    assert np.array_equal(ours[size // 2 - 1 : size // 2 + 1, :, 0], expected[size // 2 - 1 : size // 2 + 1, :, 0])


def test_the_whole_area_is_the_image_itself():
    image = torch.from_numpy(fixed_image(32))[None]
    assert torch.equal(center_crop(image, 1.0, (32, 32)), image)


def test_the_oft_policy_sees_the_cropped_frame_and_null_turns_it_off(tmp_path):
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        "model.name_or_path=builtin:tiny-openvla",
        "policy.family=openvla_oft",
        "policy.chunk_size=2",
        "lora.target_modules=null",
        "lora.adapt_output_layer=false",
    ]
    torch.manual_seed(0)
    policy = build_policy(load_config(RECIPES / "tiny_cpu.yaml", overrides))
    assert policy.cfg.center_crop_area == 0.9
    obs = fixed_obs(2)
    cropped = center_crop(obs["rgb"], 0.9, policy.image_hw)
    expected = normalize_images(
        cropped, policy.image_hw, policy.pixel_mean, policy.pixel_std, policy.rescale, policy.model_dtype
    )
    assert torch.equal(policy.observation_inputs(obs), expected)
    policy.cfg.center_crop_area = None
    plain = normalize_images(
        obs["rgb"], policy.image_hw, policy.pixel_mean, policy.pixel_std, policy.rescale, policy.model_dtype
    )
    assert torch.equal(policy.observation_inputs(obs), plain) and not torch.equal(plain, expected)
    with pytest.raises(ConfigError, match="policy.center_crop_area"):
        load_config(RECIPES / "tiny_cpu.yaml", [*overrides, "policy.center_crop_area=1.5"])
