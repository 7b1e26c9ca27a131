"""``policy.predict_action(image, instruction)`` on every family: OpenVLA's one-call inference, the same bits as
``act(deterministic=True)`` on the observation an env would give, numpy or PIL in, the un-normalised action (or the
executed chunk) out; bad input refused with the fix named."""

import numpy as np
import pytest
import torch
from conftest import RECIPES
from PIL import Image

from rvla_peft.config import load_config
from rvla_peft.policies.registry import build_policy
from rvla_peft.utils.threads import torch_threads

FAMILIES = {
    # the shipped pretrained base, as tiny_cpu.yaml decodes it (64 bins)
    "action_tokens": ["model.name_or_path=builtin:tiny-vla-maniskill"],
    # OpenVLA's statistics-free un-normalisation to a box other than [-1, 1], so that un-normalising is visible
    "openvla": [
        "model.name_or_path=builtin:tiny-openvla",
        "policy.family=openvla",
        "policy.n_bins=256",
        "policy.action_low=[-2, -2, -2, -1, -1, -1, 0]",
        "policy.action_high=[2, 2, 2, 1, 1, 1, 1]",
    ],
    "openvla_oft": [
        "model.name_or_path=builtin:tiny-openvla",
        "policy.family=openvla_oft",
        "policy.chunk_size=4",
        "policy.execute_steps=2",
        "lora.target_modules=null",
        "lora.adapt_output_layer=false",
    ],
    "pi0": [
        "model.name_or_path=builtin:tiny-pi0",
        "policy.family=pi0",
        "policy.prompt_template='{instruction}'",
        "policy.execute_steps=3",
        "lora.target_modules=null",
        "lora.adapt_output_layer=false",
    ],
}
EXPECTED_SHAPE = {"action_tokens": (7,), "openvla": (7,), "openvla_oft": (2, 7), "pi0": (3, 7)}


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    with torch_threads(1):
        yield


def _policy(family: str):
    torch.manual_seed(0)
    cfg = load_config(RECIPES / "tiny_cpu.yaml", [*FAMILIES[family], "report_to=[]"])
    policy = build_policy(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a LoRA that changes the actions, so that the adapter is part of what is compared
        for p in policy.trainable_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return policy


def _images(n: int, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_predict_action_is_acts_deterministic_env_action_bit_for_bit(family):
    policy = _policy(family)
    images = _images(3)
    instructions = ["push the cube to the goal", "pick up the red cube", "Push the cube."]
    for image, instruction in zip(images, instructions, strict=True):
        action = policy.predict_action(image, instruction)
        obs = {"rgb": torch.from_numpy(image[None].copy()), "instruction": [instruction]}
        expected = policy.act(obs, deterministic=True).env_action[0].numpy()
        assert isinstance(action, np.ndarray) and action.shape == EXPECTED_SHAPE[family]
        assert action.dtype == expected.dtype and np.array_equal(action, expected)
        # a PIL image of the same pixels is the same observation
        assert np.array_equal(policy.predict_action(Image.fromarray(image), instruction), action)
    # a batch in one forward: the same actions as act on the same batch
    batch = policy.predict_actions(images, instructions)
    obs = {"rgb": torch.from_numpy(np.stack(images)), "instruction": instructions}
    assert np.array_equal(np.stack(batch), policy.act(obs, deterministic=True).env_action.numpy())
    # the actions differ from image to image: the image reaches the output
    assert len({a.tobytes() for a in batch}) == 3


def test_predict_action_returns_the_un_normalised_action():
    policy = _policy("openvla")
    action = policy.predict_action(_images(1)[0], "pick up the cube")
    tokenizer = policy.action_tokenizer
    obs = {"rgb": torch.from_numpy(_images(1)[0][None]), "instruction": ["pick up the cube"]}
    slots = policy.act(obs, deterministic=True).action
    normalized = tokenizer.slot_to_normalized(slots)[0].numpy()
    low, high = np.array([-2, -2, -2, -1, -1, -1, 0.0]), np.array([2, 2, 2, 1, 1, 1, 1.0])
    np.testing.assert_allclose(action, 0.5 * (normalized + 1) * (high - low) + low, atol=1e-6)
    assert not np.allclose(action, normalized)  # the box is not [-1, 1]: un-normalising shows


def test_predict_action_refuses_bad_input_with_the_fix_named():
    policy = _policy("action_tokens")
    image = _images(1)[0]
    with pytest.raises(ValueError, match=r"must be uint8 \[H, W, 3\] \(RGB\), got float32 of shape \[64, 64, 3\]"):
        policy.predict_action(image.astype(np.float32), "push")
    with pytest.raises(ValueError, match=r"got uint8 of shape \[64, 64\]"):
        policy.predict_action(image[..., 0], "push")
    with pytest.raises(TypeError, match="image must be a uint8 numpy array"):
        policy.predict_action(torch.from_numpy(image), "push")
    with pytest.raises(TypeError, match="instruction must be a string"):
        policy.predict_action(image, ["push"])
    with pytest.raises(ValueError, match="policy.unnorm_key=None: load it with policy.unnorm_key=bridge_orig"):
        policy.predict_action(image, "push", unnorm_key="bridge_orig")
    with pytest.raises(ValueError, match="images of different sizes"):
        policy.predict_actions([image, _images(1, size=32)[0]], ["push", "push"])
    # a greyscale PIL image is converted to RGB, as OpenVLA's processor does
    grey = Image.fromarray(image[..., 0])
    rgb = np.asarray(grey.convert("RGB"))
    assert np.array_equal(policy.predict_action(grey, "push"), policy.predict_action(rgb, "push"))
