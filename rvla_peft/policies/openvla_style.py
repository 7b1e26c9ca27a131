"""OpenVLA-style action-token policy over any Hugging Face image-text-to-text model.

The prompt ``In: What action should the robot take to {instruction}?\\nOut:`` and the camera image go in; each of
the 7 action dimensions comes out as one token among the last 256 vocabulary ids (``ActionTokenizer``). The
policy's distribution is the softmax over those 256 ids only, so sampling, log-probs and the mean action agree.

- ``act``: autoregressive sampling with the KV cache (one prefix forward + A-1 one-token forwards).
- ``evaluate``: one teacher-forced forward over prompt + action tokens gives every log-prob, the entropy, the
  value (from the last prompt token's hidden state) and the mean action (expected bin value per dimension).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor

from rvla_peft.policies.action_tokens import ActionTokenizer
from rvla_peft.policies.base import ActionSample, Observation, Policy, PolicyOutput, ValueHead
from rvla_peft.utils.constants import VALUE_HEAD_FILE


def _image_geometry(image_processor) -> tuple[tuple[int, int], Tensor, Tensor, float]:
    """Target (H, W), mean, std and rescale factor of a Hugging Face image processor."""
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


def _positions(mask: Tensor) -> Tensor:
    """Position ids that skip left padding, so a padded prompt sees the same positions as an unpadded one."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


class ActionTokenPolicy(Policy):
    def __init__(self, peft_model, processor, policy_cfg, hidden_size: int):
        super().__init__()
        self.peft_model = peft_model
        self.processor = processor
        self.cfg = policy_cfg
        vocab_size = peft_model.get_output_embeddings().weight.shape[0]
        self.action_tokenizer = ActionTokenizer(
            vocab_size, policy_cfg.n_bins, policy_cfg.action_low, policy_cfg.action_high, policy_cfg.action_dim
        )
        self.value_head = ValueHead(hidden_size, policy_cfg.value_head_hidden)
        (self.image_hw, mean, std, self.rescale) = _image_geometry(processor.image_processor)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        self._prompt_ids: dict[str, Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.value_head.net[0].weight.device

    @property
    def model_dtype(self) -> torch.dtype:
        return self.peft_model.get_input_embeddings().weight.dtype

    # ---------------------------------------------------------------------------------------------------------
    # inputs

    def observation_inputs(self, obs: Observation) -> Tensor:
        """uint8 [B,H,W,3] -> normalised pixel_values [B,3,h,w], on the device (no PIL, no host round trip)."""
        x = obs["rgb"].to(self.device).permute(0, 3, 1, 2).float()
        if tuple(x.shape[-2:]) != self.image_hw:
            x = F.interpolate(x, size=self.image_hw, mode="bicubic", antialias=True, align_corners=False)
        x = x.repeat(1, self.pixel_mean.shape[1] // 3, 1, 1)  # channel-stacked towers see the same image
        x = (x * self.rescale - self.pixel_mean) / self.pixel_std
        return x.to(self.model_dtype)

    def _prompt(self, instruction: str) -> Tensor:
        """Token ids of the prompt for one instruction (image placeholders expanded by the processor); cached."""
        if instruction not in self._prompt_ids:
            text = self.cfg.prompt_template.format(instruction=instruction.lower().rstrip("."))
            image_token = getattr(self.processor, "image_token", None)
            if image_token and image_token not in text:
                text = image_token + text
            h, w = self.image_hw
            blank = Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8))
            enc = self.processor(text=text, images=blank, return_tensors="pt")
            self._prompt_ids[instruction] = enc["input_ids"][0]
        return self._prompt_ids[instruction]

    def encode_prompts(self, instructions: list[str]) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids and attention mask [B, L], so every prompt ends at the same position."""
        seqs = [self._prompt(i) for i in instructions]
        length = max(len(s) for s in seqs)
        pad_id = self.processor.tokenizer.pad_token_id or 0
        ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, length - len(s) :] = s
            mask[row, length - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device)

    # ---------------------------------------------------------------------------------------------------------
    # forward passes

    def _dist_logits(self, logits: Tensor) -> Tensor:
        """Full-vocabulary logits [..., V] -> logits over the action slots [..., n_bins], temperature applied."""
        logits = logits[..., self.action_tokenizer.first_id :]
        # at least float32 for the softmax (bf16 logits are too coarse), float64 kept for exact checks
        return logits.to(torch.promote_types(logits.dtype, torch.float32)) / self.cfg.temperature

    def _env_action(self, slots: Tensor) -> Tensor:
        return self.action_tokenizer.unnormalize(self.action_tokenizer.slot_to_normalized(slots))

    def _prompt_forward(self, obs: Observation, use_cache: bool):
        """One forward over image + prompt: the next-token logits and the last prompt token's hidden state."""
        ids, mask = self.encode_prompts(obs["instruction"])
        position_ids = _positions(mask)
        out = self.peft_model(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=self.observation_inputs(obs),
            position_ids=position_ids,
            use_cache=use_cache,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        return out, mask, position_ids

    @torch.no_grad()
    def act(self, obs: Observation, deterministic: bool = False) -> ActionSample:
        out, mask, position_ids = self._prompt_forward(obs, use_cache=True)
        value = self.value_head(out.hidden_states[-1][:, -1])
        slots, log_probs, means = [], [], []
        for dim in range(self.cfg.action_dim):
            logits = self._dist_logits(out.logits[:, -1])
            probs = logits.softmax(-1)
            slot = probs.argmax(-1) if deterministic else torch.multinomial(probs, 1).squeeze(-1)
            slots.append(slot)
            log_probs.append(logits.log_softmax(-1).gather(-1, slot[:, None]).squeeze(-1))
            means.append(self.action_tokenizer.expected_normalized(probs))
            if dim + 1 < self.cfg.action_dim:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                position_ids = position_ids[:, -1:] + 1
                out = self.peft_model(
                    input_ids=(slot + self.action_tokenizer.first_id)[:, None],
                    attention_mask=mask,
                    position_ids=position_ids,
                    cache=out.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
        slots = torch.stack(slots, dim=1)
        return ActionSample(
            action=slots,
            env_action=self._env_action(slots),
            log_prob=torch.stack(log_probs, dim=1).sum(1),
            value=value,
            mean=torch.stack(means, dim=1),
        )

    def _teacher_forced(self, obs: Observation, slots: Tensor, pixel_values: Tensor | None):
        ids, mask = self.encode_prompts(obs["instruction"])
        prompt_len, n = ids.shape[1], self.cfg.action_dim
        tokens = slots.to(self.device) + self.action_tokenizer.first_id
        # Inputs: prompt + the first A-1 action tokens; the last A logits predict the A action tokens.
        ids = torch.cat([ids, tokens[:, :-1]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], n - 1)], dim=1)
        out = self.peft_model(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=self.observation_inputs(obs) if pixel_values is None else pixel_values,
            position_ids=_positions(mask),
            output_hidden_states=True,
            logits_to_keep=n,
        )
        return out, prompt_len

    def action_logits(self, obs: Observation, action: Tensor, pixel_values: Tensor | None = None) -> Tensor:
        """Logits over the action slots [B, A, n_bins], teacher-forced on ``action``."""
        out, _ = self._teacher_forced(obs, action, pixel_values)
        return self._dist_logits(out.logits)

    def evaluate(self, obs: Observation, action: Tensor, pixel_values: Tensor | None = None) -> PolicyOutput:
        out, prompt_len = self._teacher_forced(obs, action, pixel_values)
        logits = self._dist_logits(out.logits)  # [B, A, n_bins]
        log_probs = logits.log_softmax(-1)
        probs = log_probs.exp()
        action = action.to(self.device)
        return PolicyOutput(
            log_prob=log_probs.gather(-1, action[..., None]).squeeze(-1).sum(-1),
            entropy=-(probs * log_probs).sum(-1).sum(-1),
            value=self.value_head(out.hidden_states[-1][:, prompt_len - 1]),
            mean=self.action_tokenizer.expected_normalized(probs),
        )

    @torch.no_grad()
    def value(self, obs: Observation) -> Tensor:
        out, _, _ = self._prompt_forward(obs, use_cache=False)
        return self.value_head(out.hidden_states[-1][:, -1])

    def visual_embedding_module(self) -> torch.nn.Module:
        """The module whose output is the visual embeddings fed to the language model."""
        for name, module in self.peft_model.named_modules():
            if name.endswith("multi_modal_projector"):
                return module
        raise NotImplementedError(
            "No 'multi_modal_projector' in this model: the 'grad_penalty' Jacobian form needs the visual embeddings; "
            "use regularizers.jacobian.form=hutchinson"
        )

    @contextlib.contextmanager
    def capture_visual_embeddings(self) -> Iterator[list[Tensor]]:
        captured: list[Tensor] = []
        handle = self.visual_embedding_module().register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            yield captured
        finally:
            handle.remove()

    def save_pretrained(self, directory: str | Path, base_model_id: str | None = None) -> None:
        """The LoRA adapter (adapter_config.json + adapter_model.safetensors) and, beside it, the value head."""
        directory = Path(directory)
        if base_model_id is not None:
            for config in self.peft_model.peft_config.values():
                config.base_model_name_or_path = base_model_id
        # embeddings are not adapted: skip peft's vocabulary check, which would look the base id up online
        self.peft_model.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False)
        state = {k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()}
        save_file(
            state, str(directory / VALUE_HEAD_FILE), metadata={"hidden_size": str(state["net.0.weight"].shape[1])}
        )
