"""The gripper convention (``policy.gripper``): OpenVLA-family checkpoints emit 0 = close, 1 = open, ManiSkill's Panda
takes -1 closed, +1 open; the map is OpenVLA's own evaluation formula, each family's default matches its
checkpoints, and the recipes say which they use."""

import numpy as np
import pytest
import torch
from conftest import RECIPES

from rvla_peft import pretrain
from rvla_peft.config import ConfigError, load_config
from rvla_peft.config.policy import gripper_convention
from rvla_peft.policies.action_tokens.tokenizer import ActionTokenizer
from rvla_peft.policies.common import gripper_from_env, gripper_to_env
from rvla_peft.policies.openvla.configuration import OpenVLAPolicyConfig
from rvla_peft.policies.openvla_oft.configuration import OpenVLAOFTPolicyConfig
from rvla_peft.policies.pi0.configuration import Pi0PolicyConfig


def openvla_normalize_gripper_action(action: np.ndarray, binarize: bool = True) -> np.ndarray:
    """OpenVLA's ``experiments/robot/robot_utils.py`` ``normalize_gripper_action``, as written there."""
    action = action.copy()
    orig_low, orig_high = 0.0, 1.0
    action[..., -1] = 2 * (action[..., -1] - orig_low) / (orig_high - orig_low) - 1
    if binarize:
        action[..., -1] = np.sign(action[..., -1])
    return action


GRIPPERS = np.array([0.0, 0.02, 0.3, 0.5, 0.7, 0.98, 1.0])


def actions_with_gripper(gripper: np.ndarray) -> np.ndarray:
    arm = np.linspace(-0.9, 0.9, 6 * len(gripper)).reshape(len(gripper), 6)
    return np.concatenate([arm, gripper[:, None]], axis=1).astype(np.float32)


@pytest.mark.parametrize("convention, binarize", [("zero_one", False), ("zero_one_binary", True)])
def test_zero_one_is_openvlas_normalize_gripper_action(convention, binarize):
    action = actions_with_gripper(GRIPPERS)
    ours = gripper_to_env(torch.from_numpy(action), convention).numpy()
    np.testing.assert_array_equal(ours, openvla_normalize_gripper_action(action, binarize))
    np.testing.assert_array_equal(ours[:, :6], action[:, :6])  # the arm is untouched
    # "close" (0) is ManiSkill's -1 (fingers at -0.01 m, gripping); executed as is it was 0, a 3 cm gap
    assert ours[0, -1] == -1 and ours[-1, -1] == 1
    if binarize:
        assert ours[:, -1].tolist() == [-1, -1, -1, 0, 1, 1, 1]


def test_signed_and_unresolved_leave_the_action_as_is():
    action = torch.from_numpy(actions_with_gripper(GRIPPERS * 2 - 1))
    for convention in ("signed", None):
        assert gripper_to_env(action, convention) is action
        assert gripper_from_env(action, convention) is action
    with pytest.raises(ValueError, match="unknown gripper convention 'inverted'"):
        gripper_to_env(action, "inverted")


def test_demonstrations_tokenise_into_the_bases_convention_and_decode_back():
    """ManiSkill demonstrations (-1 / +1 gripper) for a base in the 0 / 1 convention: tokenised as 0 / 1, and the
    env action decoded from those tokens is the demonstration's command again."""
    action = torch.from_numpy(actions_with_gripper(np.array([-1.0, 1.0, 1.0, -1.0])))
    assert torch.equal(gripper_from_env(action, "zero_one")[:, -1], torch.tensor([0.0, 1.0, 1.0, 0.0]))
    tok = ActionTokenizer(512, 256, gripper="zero_one_binary")
    slots = pretrain.action_slots(tok, action)
    back = tok.unnormalize(tok.slot_to_normalized(slots))
    assert torch.equal(back[:, -1], action[:, -1])
    assert (back[:, :6] - action[:, :6]).abs().max() <= 1 / 255 + 1e-6
    # "closed" is token -1 for a signed base, token 0 for this one
    plain = ActionTokenizer(512, 256)
    assert not torch.equal(pretrain.action_slots(plain, action)[:, -1], slots[:, -1])


def test_defaults_follow_the_checkpoint_family_and_builtin_bases_keep_theirs():
    openvla, oft, pi0 = OpenVLAPolicyConfig(), OpenVLAOFTPolicyConfig(), Pi0PolicyConfig()
    assert gripper_convention(openvla, "openvla/openvla-7b") == "zero_one_binary"
    assert gripper_convention(oft, "moojink/openvla-7b-oft-finetuned-libero-spatial") == "zero_one_binary"
    assert gripper_convention(openvla, "/data/openvla-7b") == "zero_one_binary"  # a local copy
    assert gripper_convention(openvla, "builtin:tiny-openvla") == "signed"
    assert gripper_convention(pi0, "lerobot/pi0_base") == "signed"
    openvla.gripper = "zero_one"
    assert gripper_convention(openvla, "builtin:tiny-openvla") == "zero_one"  # set: always what it says


@pytest.mark.parametrize(
    "recipe, expected",
    [
        ("openvla_maniskill.yaml", "zero_one_binary"),
        ("openvla_qlora_maniskill.yaml", "zero_one_binary"),
        ("openvla_oft_maniskill.yaml", "zero_one_binary"),
        ("pi0_maniskill.yaml", "signed"),
        ("tiny_cpu.yaml", "signed"),
        ("tiny_learn.yaml", "signed"),
    ],
)
def test_recipes_state_their_convention(recipe, expected):
    cfg = load_config(RECIPES / recipe)
    assert cfg.policy.gripper == expected
    assert gripper_convention(cfg.policy, cfg.model.name_or_path) == expected


def test_an_unknown_convention_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"policy.gripper: 'zero-one' is not one of .*did you mean 'zero_one'"):
        load_config(None, ["policy.gripper=zero-one"])


def test_the_resolved_convention_is_saved_with_the_recipe(tmp_path):
    """A run's recipe.yaml keeps the convention its base had: an export or a copy of the base under another path
    (not builtin:, so it would resolve otherwise) acts the same."""
    from rvla_peft.config import dump_yaml

    cfg = load_config(None, ["policy.family=openvla", "model.name_or_path=builtin:tiny-openvla"])
    assert cfg.policy.gripper == "signed"
    saved = tmp_path / "recipe.yaml"
    saved.write_text(dump_yaml(cfg))
    assert load_config(saved, ["model.name_or_path=/exports/merged"]).policy.gripper == "signed"
    assert load_config(None, ["policy.family=openvla", "model.name_or_path=/exports/merged"]).policy.gripper == (
        "zero_one_binary"
    )
