"""The ``openvla`` policy family: the action-token policy on the native OpenVLA (``rvla_peft.models.openvla``), with
OpenVLA's own conventions where they differ from the generic family:

- action tokens are the last ``n_bins`` ids below ``text_config.vocab_size - pad_to_multiple_of`` (31744..31999 for
  openvla-7b, whose embedding matrix has 64 padding rows beyond them), not the last ids of the output layer;
- un-normalisation can come from the checkpoint: ``policy.unnorm_key`` picks ``config.norm_stats[key]["action"]``
  (q01 / q99 where ``mask`` is true, identity elsewhere), as ``OpenVLAForActionPrediction.predict_action`` does;
- with a Llama tokenizer the prompt ends with the empty-word token ``"▁"`` (29871), which OpenVLA's training prompts
  had before the first action token and its ``predict_action`` appends;
- the image patches are part of the sequence the model returns, so positions are counted from its end.

``builtin:tiny-openvla`` (:func:`build_tiny_openvla`) is a random OpenVLA of the same architecture, small enough for
tests: two 3-block ViTs (DINOv2-style with registers and LayerScale, SigLIP-style with an attention-pool head), the
3-layer fused projector and a 2-layer Llama, all widths multiples of 64.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from rvla_peft.policies.action_tokens import ActionTokenizer
from rvla_peft.policies.openvla_style import ActionTokenPolicy

logger = logging.getLogger(__name__)

EMPTY_WORD_TOKEN = "\u2581"  # SentencePiece's word boundary alone: id 29871 in the Llama-2 vocabulary


def action_bounds_from_norm_stats(norm_stats: dict | None, unnorm_key: str) -> tuple[list[float], list[float]]:
    """``(low, high)`` for :class:`ActionTokenizer` from OpenVLA's dataset statistics.

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


class OpenVLAPolicy(ActionTokenPolicy):
    """:class:`ActionTokenPolicy` with OpenVLA's action vocabulary, statistics and prompt (module docstring)."""

    def __init__(self, peft_model, processor, policy_cfg, hidden_size: int):
        super().__init__(peft_model, processor, policy_cfg, hidden_size)
        config = peft_model.get_base_model().config
        low, high = policy_cfg.action_low, policy_cfg.action_high
        unnorm_key = getattr(policy_cfg, "unnorm_key", None)
        if unnorm_key is not None:
            if low is not None or high is not None:
                raise ValueError("set either policy.unnorm_key or policy.action_low/action_high, not both")
            low, high = action_bounds_from_norm_stats(config.norm_stats, unnorm_key)
            if len(low) != policy_cfg.action_dim:
                raise ValueError(
                    f"norm_stats[{unnorm_key!r}] has {len(low)} action dims, policy.action_dim {policy_cfg.action_dim}"
                )
        if policy_cfg.n_bins != config.n_action_bins:
            logger.warning(
                "policy.n_bins=%d but the checkpoint was trained with %d bins", policy_cfg.n_bins, config.n_action_bins
            )
        self.action_tokenizer = ActionTokenizer(
            config.action_vocab_size, policy_cfg.n_bins, low, high, policy_cfg.action_dim
        )
        vocab = processor.tokenizer.get_vocab()
        self.empty_word_id = vocab.get(EMPTY_WORD_TOKEN)

    def _prompt(self, instruction: str) -> Tensor:
        if instruction not in self._prompt_ids:
            ids = super()._prompt(instruction)
            if self.empty_word_id is not None and ids[-1] != self.empty_word_id:
                ids = nn.functional.pad(ids, (0, 1), value=self.empty_word_id)
            self._prompt_ids[instruction] = ids
        return self._prompt_ids[instruction]

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
