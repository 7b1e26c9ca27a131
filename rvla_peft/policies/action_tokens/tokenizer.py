"""OpenVLA's action tokenizer: each action dimension is one token among the last ``n_bins`` vocabulary ids.

The convention follows OpenVLA (``prismatic/vla/action_tokenizer.py``) so that published checkpoints decode
the same way: ``n_bins`` uniform edges over [-1, 1], ``n_bins - 1`` bin centres; an action ``a`` is digitised
to ``d = digitize(a, edges)`` in [1, n_bins] and written as token ``vocab_size - d``. Decoding maps token
``t`` back to centre ``min(vocab_size - t - 1, n_bins - 2)`` (so the two outermost ids share a centre).
Normalised actions are then mapped to the env's range with per-dimension statistics (OpenVLA's q01 / q99).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rvla_peft.policies.common import gripper_from_env, gripper_to_env, normalize_actions, unnormalize_actions


class ActionTokenizer:
    def __init__(
        self,
        vocab_size: int,
        n_bins: int = 256,
        low: list[float] | None = None,
        high: list[float] | None = None,
        action_dim: int = 7,
        gripper: str | None = None,
    ):
        if vocab_size <= n_bins:
            raise ValueError(
                f"vocab_size ({vocab_size}) must exceed n_bins ({n_bins}): the action ids would overlap text"
            )
        self.vocab_size, self.n_bins, self.action_dim = vocab_size, n_bins, action_dim
        self.gripper = gripper  # the gripper convention (policy.gripper): applied after un-normalising
        self.first_id = vocab_size - n_bins  # ids [first_id, vocab_size) are action tokens
        edges = torch.linspace(-1.0, 1.0, n_bins, dtype=torch.float64)
        centres = (edges[:-1] + edges[1:]) / 2
        # value_of_slot[k]: normalised action of token first_id + k (slot k = vocab_size - 1 - token id reversed)
        slot_digit = n_bins - torch.arange(n_bins)  # token first_id + k  <=>  d = n_bins - k
        self.edges = edges.float()
        self.slot_values = centres[(slot_digit - 1).clamp(max=n_bins - 2)].float()
        self.low = torch.tensor(low if low is not None else [-1.0] * action_dim, dtype=torch.float32)
        self.high = torch.tensor(high if high is not None else [1.0] * action_dim, dtype=torch.float32)

    def encode(self, normalized: Tensor) -> Tensor:
        """[..., D] actions in [-1, 1] -> slots [..., D] in [0, n_bins) (token id = first_id + slot)."""
        d = torch.bucketize(normalized.clamp(-1, 1).contiguous(), self.edges.to(normalized.device), right=True)
        d = d.clamp(1, self.n_bins)  # np.digitize semantics: 1..n_bins
        return self.n_bins - d

    def slot_to_normalized(self, slots: Tensor) -> Tensor:
        return self.slot_values.to(slots.device)[slots]

    def expected_normalized(self, probs: Tensor) -> Tensor:
        """Expected normalised action under per-dimension slot probabilities [..., D, n_bins]."""
        return probs @ self.slot_values.to(probs.device, probs.dtype)

    def unnormalize(self, normalized: Tensor) -> Tensor:
        """[-1, 1] -> env range with q01 / q99 (-1 / 1 by default), the gripper in ManiSkill's convention."""
        return gripper_to_env(unnormalize_actions(normalized, self.low, self.high), self.gripper)

    def env_to_slots(self, action: Tensor) -> Tensor:
        """Env actions [..., A] -> the action slots [..., A] that decode nearest to them (the gripper in the policy's
        convention, normalised with the policy's statistics, then digitised): the supervised targets of expert
        actions."""
        action = gripper_from_env(action.float(), self.gripper)
        return self.encode(normalize_actions(action, self.low, self.high))
