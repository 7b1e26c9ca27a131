"""The ``openvla`` policy family: the action-token policy on the native OpenVLA (``rvla_peft.models.openvla``), with
OpenVLA's own conventions where they differ from the generic family:

- action tokens are the last ``n_bins`` ids below ``text_config.vocab_size - pad_to_multiple_of`` (31744..31999 for
  openvla-7b, whose embedding matrix has 64 padding rows beyond them), not the last ids of the output layer;
- un-normalisation can come from the checkpoint: ``policy.unnorm_key`` picks ``config.norm_stats[key]["action"]``
  (q01 / q99 where ``mask`` is true, identity elsewhere), as ``OpenVLAForActionPrediction.predict_action`` does;
- with a Llama tokenizer the prompt ends with the empty-word token ``"▁"`` (29871), which OpenVLA's training prompts
  had before the first action token and its ``predict_action`` appends;
- the image patches are part of the sequence the model returns, so positions are counted from its end.

``builtin:tiny-openvla`` (``rvla_peft.models.tiny``) is a random OpenVLA of the same architecture, small enough for
tests.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from rvla_peft.policies.action_tokens.modeling import ActionTokenPolicy
from rvla_peft.policies.action_tokens.tokenizer import ActionTokenizer
from rvla_peft.policies.common import OPENVLA_EMPTY_WORD, openvla_action_bounds, with_empty_word

logger = logging.getLogger(__name__)


class OpenVLAPolicy(ActionTokenPolicy):
    """:class:`ActionTokenPolicy` with OpenVLA's action vocabulary, statistics and prompt (module docstring)."""

    def __init__(self, peft_model, processor, policy_cfg, hidden_size: int):
        super().__init__(peft_model, processor, policy_cfg, hidden_size)
        config = peft_model.get_base_model().config
        low, high = openvla_action_bounds(policy_cfg, config)
        if policy_cfg.n_bins != config.n_action_bins:
            logger.warning(
                "policy.n_bins=%d but the checkpoint was trained with %d bins", policy_cfg.n_bins, config.n_action_bins
            )
        self.action_tokenizer = ActionTokenizer(
            config.action_vocab_size, policy_cfg.n_bins, low, high, policy_cfg.action_dim, policy_cfg.gripper
        )
        self.empty_word_id = processor.tokenizer.get_vocab().get(OPENVLA_EMPTY_WORD)

    def build_prompt(self, instruction: str) -> Tensor:
        return with_empty_word(super().build_prompt(instruction), self.empty_word_id)

    def _dist_logits(self, logits: Tensor) -> Tensor:
        """As the generic family's, but the action ids end below the output layer's padding rows."""
        first = self.action_tokenizer.first_id
        logits = logits[..., first : first + self.action_tokenizer.n_bins]
        return logits.to(torch.promote_types(logits.dtype, torch.float32)) / self.cfg.temperature

    def _teacher_forced(self, obs, slots: Tensor, pixel_values: Tensor | None):
        out, _ = super()._teacher_forced(obs, slots, pixel_values)
        # The image patches sit inside the returned sequence: the last prompt token is action_dim tokens from its end
        # (the A-1 teacher-forced action tokens follow it).
        return out, out.hidden_states[-1].shape[1] - (self.cfg.action_dim - 1)

    def visual_embedding_module(self) -> nn.Module:
        """The projector: its output is the patch embeddings the language model reads."""
        return self.peft_model.get_base_model().projector
