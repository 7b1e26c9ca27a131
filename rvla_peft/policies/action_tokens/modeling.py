"""OpenVLA-style action-token policy over any Hugging Face image-text-to-text model.

The prompt ``In: What action should the robot take to {instruction}?\\nOut:`` and the camera image go in; each of
the 7 action dimensions comes out as one token among the last 256 vocabulary ids (``ActionTokenizer``). The
policy's distribution is the softmax over those 256 ids only, so sampling, log-probs and the mean action agree.

- ``act``: autoregressive sampling with the KV cache (one prefix forward + A-1 one-token forwards).
- ``evaluate``: one teacher-forced forward over prompt + action tokens gives every log-prob, the entropy, the
  value (from the last prompt token's hidden state) and the mean action (expected bin value per dimension).
"""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import Tensor

from rvla_peft.policies.action_tokens.tokenizer import ActionTokenizer
from rvla_peft.policies.base import ActionSample, Observation, Policy, PolicyOutput
from rvla_peft.policies.common import image_geometry, positions, prompt_ids


def token_cross_entropy(logits: Tensor, slots: Tensor) -> Tensor:
    """Mean cross-entropy of the action slots ``slots`` [B, A] under per-slot ``logits`` [B, A, n_bins] (in float32
    at least): the action-token families' supervised loss, as OpenVLA fine-tunes its action tokens."""
    log_probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    return -log_probs.gather(-1, slots.to(log_probs.device)[..., None]).mean()


class ActionTokenPolicy(Policy):
    def __init__(self, peft_model, processor, policy_cfg, hidden_size: int):
        super().__init__(peft_model, processor, policy_cfg, hidden_size)
        vocab_size = peft_model.get_output_embeddings().weight.shape[0]
        self.action_tokenizer = ActionTokenizer(
            vocab_size,
            policy_cfg.n_bins,
            policy_cfg.action_low,
            policy_cfg.action_high,
            policy_cfg.action_dim,
            policy_cfg.gripper,
        )
        self.set_image_normalization(*image_geometry(processor.image_processor))
        # act()'s forwards: a small model decoding token by token on the CPU spends most of its time in Python and
        # per-op dispatch, which compiled kernels remove. dynamic=True: the KV cache grows by a token per forward
        # and the batch changes between rollouts and evaluation, one graph for all of them. A compiled function,
        # not a compiled module: as a submodule it would list every parameter a second time.
        self._compiled = torch.compile(peft_model.__call__, dynamic=True) if policy_cfg.compile else None

    @property
    def _act_model(self):
        return self._compiled or self.peft_model

    # ---------------------------------------------------------------------------------------------------------
    # inputs

    def build_prompt(self, instruction: str) -> Tensor:
        """Token ids of the prompt for one instruction (image placeholders expanded by the processor)."""
        return prompt_ids(self.processor, self.cfg.prompt_template, instruction, self.image_hw)

    # ---------------------------------------------------------------------------------------------------------
    # forward passes

    def _dist_logits(self, logits: Tensor) -> Tensor:
        """Full-vocabulary logits [..., V] -> logits over the action slots [..., n_bins], temperature applied."""
        logits = logits[..., self.action_tokenizer.first_id :]
        # at least float32 for the softmax (bf16 logits are too coarse), float64 kept for exact checks
        return logits.to(torch.promote_types(logits.dtype, torch.float32)) / self.cfg.temperature

    def _env_action(self, slots: Tensor) -> Tensor:
        return self.action_tokenizer.unnormalize(self.action_tokenizer.slot_to_normalized(slots))

    def _prompt_forward(self, obs: Observation, use_cache: bool, model=None):
        """One forward over image + prompt: the next-token logits and the last prompt token's hidden state."""
        ids, mask = self.encode_prompts(obs["instruction"])
        position_ids = positions(mask)
        out = (self.peft_model if model is None else model)(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=self.observation_inputs(obs),
            position_ids=position_ids,
            use_cache=use_cache,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        return out, mask, position_ids

    def act(self, obs: Observation, deterministic: bool = False) -> ActionSample:
        # Inference mode, not just no-grad: the forwards of a small model on the CPU cost mostly per-op overhead,
        # and inference mode drops autograd's share of it (version counters, view tracking): 5-10% of ``act`` for
        # the tiny model (bench/bench_decoding.py), with the same kernels, so the same bits. Its tensors cannot
        # be changed in place outside it (an action perturbation may), so the sample leaves as ordinary tensors.
        with torch.inference_mode():
            sample = self._decode(obs, deterministic)
        return ActionSample(**{f.name: getattr(sample, f.name).clone() for f in fields(sample)})

    def _decode(self, obs: Observation, deterministic: bool) -> ActionSample:
        """``act``'s decoding: one prefix forward filling the KV cache, then one one-token forward per action dim."""
        out, mask, position_ids = self._prompt_forward(obs, use_cache=True, model=self._act_model)
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
                out = self._act_model(
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
            position_ids=positions(mask),
            output_hidden_states=True,
            logits_to_keep=n,
        )
        return out, prompt_len

    def action_logits(self, obs: Observation, action: Tensor, pixel_values: Tensor | None = None) -> Tensor:
        """Logits over the action slots [B, A, n_bins], teacher-forced on ``action``."""
        out, _ = self._teacher_forced(obs, action, pixel_values)
        return self._dist_logits(out.logits)

    def supervised_loss(self, obs: Observation, actions: Tensor, mask=None, generator=None) -> Tensor:
        """Cross-entropy of the expert's next action digitised into the policy's action tokens (teacher-forced)."""
        slots = self.action_tokenizer.env_to_slots(actions[:, 0])
        return token_cross_entropy(self.action_logits(obs, slots), slots)

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
            logits=logits,
        )

    @torch.no_grad()
    def value(self, obs: Observation) -> Tensor:
        out, _, _ = self._prompt_forward(obs, use_cache=False)
        return self.value_head(out.hidden_states[-1][:, -1])

    def visual_embedding_module(self) -> torch.nn.Module:
        for name, module in self.peft_model.named_modules():
            if name.endswith("multi_modal_projector"):
                return module
        raise NotImplementedError(
            "No 'multi_modal_projector' in this model: the 'grad_penalty' Jacobian form needs the visual embeddings; "
            "use regularizers.jacobian.form=hutchinson"
        )
