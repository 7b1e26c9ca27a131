"""The ``openvla_oft`` policy family: OpenVLA-OFT (Kim, Finn, Liang 2025, "Fine-Tuning Vision-Language-Action Models:
Optimizing Speed and Success") as a PPO policy, on the native OpenVLA (``rvla_peft.models.openvla``).

The forward pass is OFT's parallel decoding (``predict_action`` in moojink/openvla-oft's ``modeling_prismatic.py``):

- text = OpenVLA's prompt (ending with ``"▁"`` where the tokenizer has it) + ``chunk_size * action_dim`` placeholder
  tokens whose input embeddings are zero + the stop token ``</s>``; the image patches go after BOS, as in OpenVLA.
- ONE pass of the language model with *full bidirectional attention* over the whole sequence (image, prompt,
  placeholders, stop token), only padding masked. That is what OFT trains and runs with: its transformers fork
  (moojink/transformers-openvla-oft, "Full bidirectional attention") drops the causal mask in Llama's SDPA attention
  for every position, not only among the action placeholders. A fine-tuned OFT checkpoint has only seen features
  computed that way.
- the action head reads the final hidden state *before* each action slot (the last prompt token and the first
  ``chunk_size * action_dim - 1`` placeholders): OFT trains with next-token alignment (the state at position i is
  matched with label i + 1) and its ``predict_action`` slices the same positions, so its released heads expect them.
- :class:`L1RegressionActionHead` concatenates the ``action_dim`` hidden states of each chunk step and maps them with
  an MLP-ResNet to ``action_dim`` normalised actions (nominally in [-1, 1]; like OFT's, the head has no squashing).
  Module and parameter names are OFT's (``model.fc1.weight``, ``model.mlp_resnet_blocks.0.ffn.1.weight``, ...), so
  a released ``action_head--*.pt`` loads unchanged once DDP's ``module.`` prefix is dropped
  (``policy.action_head_file``).

For PPO the deterministic head becomes a factorised distribution over the chunk (as RIPT-VLA does):
``a ~ Laplace(mu, b)`` or ``Normal(mu, sigma)`` per step and dimension, with ``mu`` the head's output and the log-scale
either a learned ``[chunk_size, action_dim]`` parameter (``policy.scale_head=state_independent``) or RIPT-VLA's
``LaplaceScaleHead`` (an MLP-ResNet trunk over the same features + a linear layer; its names ``trunk.*`` and
``log_b_head.*``), clamped to ``policy.log_scale_bounds``. Sampling, log-probs and the closed-form entropy are the pure
functions of :mod:`rvla_peft.policies.distributions`.

Action chunking: ``act`` returns the whole sampled chunk as the policy's ``action`` [N, chunk_size, A]; the first
``execute_steps`` = k of its steps, clipped to [-1, 1] and un-normalised (q01 / q99 from the checkpoint's norm_stats
via ``policy.unnorm_key``, or ``policy.action_low/high``, else as is), are the ``env_action`` [N, k, A] that the
rollout executes open-loop as one macro step (:func:`rvla_peft.rollout.step_chunk`). The log-prob, the entropy and
the mean action cover those k executed steps only (see :meth:`OpenVLAOFTPolicy.evaluate` for why).

The value head reads the last prompt token's final hidden state, as in the ``openvla`` family (under bidirectional
attention it has seen the whole sequence). The action head and the scale head are trained in full, not with LoRA:
they are saved in ``action_heads.safetensors`` beside the adapter (like the value head), while the adapter itself
stays loadable alone by ``PeftModel.from_pretrained``; :func:`~rvla_peft.policies.registry.build_policy` loads them
back.

Not supported (yet): OFT's second (wrist) image and its proprio projector (the LIBERO checkpoints were fine-tuned with
both; this policy feeds one image and no state), FiLM, and the diffusion action head.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers.masking_utils import create_bidirectional_mask

from rvla_peft.policies.base import ActionSample, MemoryHooks, Observation, Policy, PolicyOutput
from rvla_peft.policies.common import (
    OPENVLA_EMPTY_WORD,
    bounds_tensor,
    center_crop,
    gripper_from_env,
    gripper_to_env,
    image_geometry,
    masked_mean,
    normalize_actions,
    normalize_images,
    openvla_action_bounds,
    positions,
    prompt_ids,
    unnormalize_actions,
    with_empty_word,
)
from rvla_peft.policies.distributions import action_entropy, action_log_prob, sample_action
from rvla_peft.utils.constants import ACTION_HEADS_FILE

logger = logging.getLogger(__name__)

_BIDIRECTIONAL_ATTENTION = ("eager", "sdpa")  # implementations that take the 4D bidirectional mask


# ----------------------------------------------------------------------------------------------------------------
# OFT's action head and RIPT-VLA's scale head, with their module names (so released weights load unchanged)


class MLPResNetBlock(nn.Module):
    """Pre-LayerNorm residual feed-forward block: ``x + ReLU(Linear(LayerNorm(x)))``."""

    def __init__(self, dim: int):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    """OFT's ``MLPResNet``: LayerNorm -> Linear -> ReLU -> residual blocks -> LayerNorm -> Linear."""

    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList(MLPResNetBlock(hidden_dim) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


def _per_step(features: Tensor, action_dim: int) -> Tensor:
    """[B, chunk * A, D] hidden states -> [B, chunk, A * D]: the A states of each chunk step side by side."""
    return features.reshape(features.shape[0], -1, action_dim * features.shape[-1])


class L1RegressionActionHead(nn.Module):
    """OFT's continuous action head (``prismatic/models/action_heads.py``): [B, chunk * A, D] -> [B, chunk, A]."""

    def __init__(self, input_dim: int, hidden_dim: int, action_dim: int):
        super().__init__()
        self.action_dim = action_dim
        self.model = MLPResNet(
            num_blocks=2, input_dim=input_dim * action_dim, hidden_dim=hidden_dim, output_dim=action_dim
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.model(_per_step(features.to(self.model.fc1.weight.dtype), self.action_dim))


class StateIndependentScale(nn.Module):
    """A learned log-scale per chunk step and action dimension, the same for every observation."""

    def __init__(self, chunk_size: int, action_dim: int, init_log_scale: float):
        super().__init__()
        self.log_scale = nn.Parameter(torch.full((chunk_size, action_dim), float(init_log_scale)))

    def forward(self, features: Tensor) -> Tensor:
        return self.log_scale.expand(features.shape[0], -1, -1)


class StateDependentScale(nn.Module):
    """RIPT-VLA's ``LaplaceScaleHead``: an MLP-ResNet trunk over the action features, then a linear log-scale layer
    started near ``init_log_scale`` everywhere (bias = init_log_scale, weights xavier-uniform with gain 0.01)."""

    def __init__(self, input_dim: int, hidden_dim: int, action_dim: int, init_log_scale: float):
        super().__init__()
        self.action_dim = action_dim
        self.trunk = MLPResNet(
            num_blocks=2, input_dim=input_dim * action_dim, hidden_dim=hidden_dim, output_dim=hidden_dim
        )
        self.log_b_head = nn.Linear(hidden_dim, action_dim)
        nn.init.constant_(self.log_b_head.bias, float(init_log_scale))
        nn.init.xavier_uniform_(self.log_b_head.weight, gain=0.01)

    def forward(self, features: Tensor) -> Tensor:
        return self.log_b_head(self.trunk(_per_step(features.to(self.log_b_head.weight.dtype), self.action_dim)))


def l1_regression_loss(predicted: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """OFT's fine-tuning loss: the mean absolute error between the action head's chunk [B, H, A] and the expert's
    normalised chunk, over the steps whose ``mask`` [B, H] is true (steps past an episode's end left out)."""
    return masked_mean((predicted.float() - target.float()).abs(), mask)


def make_scale_head(policy_cfg, hidden_size: int) -> nn.Module:
    """The scale head ``policy.scale_head`` names, started at ``policy.init_log_scale``."""
    if policy_cfg.scale_head == "state_dependent":
        return StateDependentScale(hidden_size, hidden_size, policy_cfg.action_dim, policy_cfg.init_log_scale)
    return StateIndependentScale(policy_cfg.chunk_size, policy_cfg.action_dim, policy_cfg.init_log_scale)


def load_oft_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict saved by OFT's ``torch.save(module.state_dict())`` (or a safetensors file), without the
    ``module.`` prefix that DistributedDataParallel adds (OFT's ``load_component_state_dict`` drops it too)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v for k, v in state.items()}


def resolve_head_file(name: str, base_name_or_path: str, revision: str | None = None) -> Path:
    """``name`` as a path, else a file of that name in the base model's folder, else in its Hub repo (at the commit
    the base was loaded from, when known)."""
    if Path(name).is_file():
        return Path(name)
    if (Path(base_name_or_path) / name).is_file():
        return Path(base_name_or_path) / name
    if Path(base_name_or_path).is_dir():
        raise FileNotFoundError(
            f"policy.action_head_file={name!r} is neither a file nor in the base model's folder {base_name_or_path}"
        )
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(base_name_or_path, name, revision=revision))


# ----------------------------------------------------------------------------------------------------------------


class OFTMemoryHooks(MemoryHooks):
    """One bidirectional pass over image, prompt, placeholders and the stop token; heads trained in full."""

    autoregressive = False

    def head_param_count(self, policy_cfg, hidden: int) -> int:
        with torch.device("meta"):
            heads = [
                L1RegressionActionHead(hidden, hidden, policy_cfg.action_dim),
                make_scale_head(policy_cfg, hidden),
            ]
        return sum(p.numel() for head in heads for p in head.parameters())

    def decoder_extra_tokens(self, policy_cfg) -> int:
        return policy_cfg.chunk_size * policy_cfg.action_dim + 1

    def rollout_action_bytes(self, policy_cfg, model_config) -> int:
        return policy_cfg.chunk_size * policy_cfg.action_dim * 4  # the sampled chunk, float32


class OpenVLAOFTPolicy(Policy):
    """OpenVLA-OFT with LoRA as a PPO policy (module docstring for the forward pass and the conventions).

    The input side (OpenVLA's prompt, left padding, device-side image normalisation, norm_stats, the projector as the
    visual embeddings) follows the ``openvla`` family through :mod:`rvla_peft.policies.common`; the output side is
    OFT's parallel decoding with a continuous head instead of action tokens.
    """

    memory_hooks = OFTMemoryHooks()

    def __init__(self, peft_model, processor, policy_cfg, hidden_size: int):
        super().__init__(peft_model, processor, policy_cfg, hidden_size)
        self.set_image_normalization(*image_geometry(processor.image_processor))
        model = self.model
        low, high = openvla_action_bounds(policy_cfg, model.config)
        self.register_buffer("action_low", bounds_tensor(low), persistent=False)
        self.register_buffer("action_high", bounds_tensor(high), persistent=False)
        self.empty_word_id = processor.tokenizer.get_vocab().get(OPENVLA_EMPTY_WORD)
        implementation = model.language_model.config._attn_implementation
        if implementation not in _BIDIRECTIONAL_ATTENTION:
            raise ValueError(
                f"policy.family=openvla_oft needs bidirectional attention, which attn_implementation="
                f"{implementation!r} cannot take here; use model.attn_implementation=sdpa or eager"
            )
        self.chunk_size, self.action_dim = policy_cfg.chunk_size, policy_cfg.action_dim
        self.execute_steps = policy_cfg.execute_steps or self.chunk_size
        if not 1 <= self.execute_steps <= self.chunk_size:
            raise ValueError(f"policy.execute_steps={self.execute_steps} must be in [1, chunk_size={self.chunk_size}]")
        self.distribution = policy_cfg.action_distribution
        self.log_scale_bounds = tuple(policy_cfg.log_scale_bounds)
        self.stop_token_id = processor.tokenizer.eos_token_id  # OFT's STOP_INDEX: '</s>' (2) for Llama-2

        self.action_head = L1RegressionActionHead(hidden_size, hidden_size, self.action_dim)
        self.scale_head_kind = policy_cfg.scale_head
        self.scale_head = make_scale_head(policy_cfg, hidden_size)
        if policy_cfg.action_head_file:
            config = model.config
            path = resolve_head_file(
                policy_cfg.action_head_file, config._name_or_path, getattr(config, "_commit_hash", None)
            )
            self.load_heads(load_oft_state_dict(path))
            logger.info("action head loaded from %s", path)

    @property
    def model(self):
        """The OpenVLAForActionPrediction under the adapter (its LoRA layers are injected in place)."""
        return self.peft_model.get_base_model()

    def build_prompt(self, instruction: str) -> Tensor:
        """OpenVLA's prompt (``openvla`` family), without the action placeholders."""
        ids = prompt_ids(self.processor, self.cfg.prompt_template, instruction, self.image_hw)
        return with_empty_word(ids, self.empty_word_id)

    def visual_embedding_module(self) -> nn.Module:
        """The projector: its output is the patch embeddings the language model reads."""
        return self.model.projector

    # ------------------------------------------------------------------------------------------------------------
    # forward passes

    def _features(self, obs: Observation, pixel_values: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One bidirectional pass over image + prompt + placeholders + stop token.

        Returns the action features [B, chunk * A, D] (the final hidden state before each action slot) and the
        last prompt token's final hidden state [B, D] (the value head's input)."""
        model = self.model
        ids, mask = self.encode_prompts(obs["instruction"])
        batch, n_actions = ids.shape[0], self.chunk_size * self.action_dim
        embed = model.get_input_embeddings()
        text = embed(ids)
        stop = embed(ids.new_full((batch, 1), self.stop_token_id))
        placeholders = text.new_zeros(batch, n_actions, text.shape[-1])  # OFT zeroes the action tokens' embeddings
        embeds = torch.cat([text, placeholders, stop], dim=1)
        mask = torch.cat([mask, mask.new_ones(batch, n_actions + 1)], dim=1)
        if pixel_values is None:
            pixel_values = self.observation_inputs(obs)
        patches = model.get_image_features(pixel_values.to(embeds.dtype))
        # text coordinates -> multimodal ones (patches after each row's BOS), as OpenVLAForActionPrediction.forward
        embeds, mask, position_ids, _ = model._merge_image(embeds, patches, mask, positions(mask), None)
        attention = create_bidirectional_mask(
            config=model.language_model.config,
            inputs_embeds=embeds,
            attention_mask=mask,
            allow_is_bidirectional_skip=False,  # always a 4D mask: None would make Llama build a causal one
        )
        hidden = model.get_decoder()(
            inputs_embeds=embeds, attention_mask=attention, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        before_first_action = hidden.shape[1] - (n_actions + 1) - 1
        return hidden[:, before_first_action : before_first_action + n_actions], hidden[:, before_first_action]

    def observation_inputs(self, obs: Observation) -> Tensor:
        """OFT's evaluation crop (policy.center_crop_area of the image, resized back), then the shared normalisation.
        Deterministic, so rollouts and updates see the same pixels."""
        area = self.cfg.center_crop_area
        if area is None:
            return super().observation_inputs(obs)
        rgb = center_crop(obs["rgb"].to(self.device), area, self.image_hw)
        return normalize_images(rgb, self.image_hw, self.pixel_mean, self.pixel_std, self.rescale, self.model_dtype)

    def _heads(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Mean [B, chunk, A] and clamped log-scale [B, chunk, A] of the action distribution, in float32."""
        mean = self.action_head(features).float()
        log_scale = self.scale_head(features).float().clamp(*self.log_scale_bounds)
        return mean, log_scale

    def _env_action(self, block: Tensor) -> Tensor:
        """Executed steps [B, k, A], clipped to [-1, 1], un-normalised (q01 / q99 where set), the gripper in
        ManiSkill's convention (policy.gripper)."""
        env_action = unnormalize_actions(block.clamp(-1, 1), self.action_low, self.action_high)
        return gripper_to_env(env_action, self.cfg.gripper)

    @torch.no_grad()
    def act(self, obs: Observation, deterministic: bool = False) -> ActionSample:
        """Sample a chunk (its mean when ``deterministic``); the first ``execute_steps`` steps go to the env."""
        features, prompt_hidden = self._features(obs)
        mean, log_scale = self._heads(features)
        chunk = mean if deterministic else sample_action(self.distribution, mean, log_scale)
        k = self.execute_steps
        log_prob = action_log_prob(self.distribution, chunk[:, :k], mean[:, :k], log_scale[:, :k])
        return ActionSample(
            action=chunk,
            env_action=self._env_action(chunk[:, :k]),
            log_prob=log_prob.sum((1, 2)),
            value=self.value_head(prompt_hidden),
            mean=mean[:, :k],
        )

    def evaluate(self, obs: Observation, action: Tensor, pixel_values: Tensor | None = None) -> PolicyOutput:
        """Log-prob, entropy, value and mean of the chunk ``action`` [B, chunk, A] (or its executed block), with grad.

        Log-prob and entropy are sums over the *executed* steps and all action dims, and ``mean`` is the executed block
        [B, k, A]. PPO runs an MDP over chunks whose action is what the env executes: the reward depends on the first
        k steps only, and the remaining steps are drawn, stored and thrown away. Their terms would add (chunk - k) * A
        independent factors to every importance ratio that carry no reward signal (noise that inflates the ratio's
        variance and the clip fraction) and would let the entropy bonus and the regularisers act on outputs that
        never reach the env. With ``execute_steps = chunk_size`` (OFT's own open-loop setting) nothing is dropped.
        """
        features, prompt_hidden = self._features(obs, pixel_values)
        mean, log_scale = self._heads(features)
        k = self.execute_steps
        executed = action.to(self.device, mean.dtype)[:, :k]
        log_prob = action_log_prob(self.distribution, executed, mean[:, :k], log_scale[:, :k])
        return PolicyOutput(
            log_prob=log_prob.sum((1, 2)),
            entropy=action_entropy(self.distribution, log_scale[:, :k]).sum((1, 2)),
            value=self.value_head(prompt_hidden),
            mean=mean[:, :k],
        )

    @property
    def action_horizon(self) -> int:
        return self.chunk_size

    def supervised_loss(self, obs: Observation, actions: Tensor, mask=None, generator=None) -> Tensor:
        """OFT's L1 regression (``vla-scripts/finetune.py``): the action head's chunk against the expert's next
        ``chunk_size`` actions, normalised with the policy's statistics and clipped to [-1, 1] as OpenVLA's q01 / q99
        normalisation does. The scale head is not trained by it."""
        features, _ = self._features(obs)
        predicted = self.action_head(features)
        chunk = gripper_from_env(actions[:, : self.chunk_size].to(self.device, torch.float32), self.cfg.gripper)
        target = normalize_actions(chunk, self.action_low, self.action_high).clamp(-1, 1)
        step_mask = None if mask is None else mask[:, : self.chunk_size].to(self.device)
        return l1_regression_loss(predicted, target, step_mask)

    @torch.no_grad()
    def value(self, obs: Observation) -> Tensor:
        # Under bidirectional attention the prompt's states depend on the placeholders: the same pass as ``act``.
        return self.value_head(self._features(obs)[1])

    # ------------------------------------------------------------------------------------------------------------
    # saving and loading

    def _heads_metadata(self) -> dict[str, str]:
        return {
            "chunk_size": str(self.chunk_size),
            "action_dim": str(self.action_dim),
            "scale_head": self.scale_head_kind,
            "action_distribution": self.distribution,
        }

    def save_pretrained(self, directory: str | Path, base_model_id: str | None = None) -> None:
        """The LoRA adapter and the value head (as every family), plus the action and scale heads in
        ``action_heads.safetensors``: keys ``action_head.*`` (OFT's names after the prefix) and ``scale_head.*``."""
        super().save_pretrained(directory, base_model_id=base_model_id)
        state = {
            f"{prefix}.{k}": v.detach().cpu().contiguous()
            for prefix, module in (("action_head", self.action_head), ("scale_head", self.scale_head))
            for k, v in module.state_dict().items()
        }
        save_file(state, str(Path(directory) / ACTION_HEADS_FILE), metadata=self._heads_metadata())

    def load_adapter_extras(self, directory: str | Path) -> None:
        """Load the trained action and scale heads saved beside an adapter (called by ``build_policy``)."""
        path = Path(directory) / ACTION_HEADS_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: an openvla_oft adapter is the LoRA weights plus its trained action and scale "
                "heads, and without them the policy would act with untrained heads"
            )
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            saved = f.metadata() or {}
        expected = self._heads_metadata()
        for key, value in expected.items():
            if key in saved and saved[key] != value:
                raise ValueError(
                    f"{path} was saved with {key}={saved[key]}, this policy has {key}={value}: set policy.{key} as "
                    "in the adapter's recipe"
                )
        self.load_heads(load_file(str(path)))

    def load_heads(self, state: dict[str, Tensor]) -> None:
        """OFT's released action head (its own key names), or this family's ``action_heads.safetensors`` (keys
        ``action_head.*`` and ``scale_head.*``: the trained action and scale heads, as a merged export ships them)."""
        if not any(k.startswith("action_head.") for k in state):
            self.action_head.load_state_dict(state)
            return
        for prefix, module in (("action_head", self.action_head), ("scale_head", self.scale_head)):
            module.load_state_dict({k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")})
