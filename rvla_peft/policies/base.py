"""The policy contract shared by every family, so rollout, PPO, regularisers and evaluation never ask which
family they hold, and what every family does the same way: image preprocessing, prompt padding, the visual
embeddings hook, saving the adapter with the value head. A family (``rvla_peft/policies/<family>/modeling.py``)
writes only what differs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from rvla_peft.policies.common import normalize_images, pad_prompts
from rvla_peft.utils.constants import VALUE_HEAD_FILE

REFERENCE_ADAPTER = "reference"  # the frozen warm-up adapter that RL from model.adapter is anchored to

Observation = dict  # {"rgb": uint8 [B,H,W,3], "state": float [B,D], "instruction": list[str]}


@dataclass
class ActionSample:
    """What a rollout step stores. ``action`` is the policy's own action (tokens for token policies), ``env_action``
    the continuous action the env executes (before any action perturbation)."""

    action: Tensor  # [B, A] policy-space action (token slots for action-token policies)
    env_action: Tensor  # [B, A] float
    log_prob: Tensor  # [B]
    value: Tensor  # [B]
    mean: Tensor  # [B, A] mean normalised action, detached: the old-policy target of the smoothness term


@dataclass
class PolicyOutput:
    log_prob: Tensor  # [B] log pi(action | obs), summed over action dims
    entropy: Tensor  # [B]
    value: Tensor  # [B]
    mean: Tensor  # [B, A] differentiable mean action (normalised), what the regularisers act on
    logits: Tensor | None = None  # [B, A, n_bins] per-slot logits, teacher-forced (token policies only)


def image_array(image) -> np.ndarray:
    """A camera image as uint8 [H, W, 3]: a numpy array checked, a PIL image converted to RGB."""
    if not isinstance(image, np.ndarray):
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a uint8 numpy array [H, W, 3] or a PIL image, got {type(image).__name__}")
        image = np.asarray(image.convert("RGB"))
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"image must be uint8 [H, W, 3] (RGB), got {image.dtype} of shape {list(image.shape)}: convert it with "
            "np.asarray(PIL.Image.open(path).convert('RGB'))"
        )
    return image


def observation_batch(images: list, instructions: list[str], states: list | None = None) -> Observation:
    """The :data:`Observation` of a batch of camera images (numpy or PIL, one size) and instructions, as envs give
    it to ``act``."""
    arrays = [image_array(image) for image in images]
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"images of different sizes in one batch: {sorted({a.shape for a in arrays})}")
    if not all(isinstance(i, str) for i in instructions):
        raise TypeError("instruction must be a string")
    obs: Observation = {"rgb": torch.from_numpy(np.stack(arrays)), "instruction": list(instructions)}
    if states is not None:
        obs["state"] = torch.as_tensor(np.stack([np.asarray(s, dtype=np.float32) for s in states]))
    return obs


class ValueHead(nn.Module):
    """V(s) from the backbone's last hidden state at the last prompt token; kept in float32."""

    def __init__(self, hidden_size: int, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.net(hidden.to(self.net[0].weight.dtype)).squeeze(-1)


class MemoryHooks:
    """What the training-memory estimate (:mod:`rvla_peft.memory`) asks a family, from its config (and the model's
    config) alone: nothing is loaded. The defaults are the action-token families'; a family overrides what
    differs and sets its instance as its policy class's ``memory_hooks``."""

    # ``act`` decodes token by token (a KV cache over every env's prompt) and forwards keep every layer's hidden
    # states (``output_hidden_states=True``, for the value head)
    autoregressive: bool = True
    # the prompt can be counted with the tokenizer saved beside the model's weights
    tokenizer_in_checkpoint: bool = True

    def head_param_count(self, policy_cfg, hidden: int) -> int:
        """Parameters of the heads trained in full besides LoRA and the value head."""
        return 0

    def decoder_extra_tokens(self, policy_cfg) -> int:
        """Tokens after image + prompt in one training forward of the language model: the A - 1 teacher-forced
        action tokens."""
        return policy_cfg.action_dim - 1

    def denoise_steps(self, policy_cfg, model_config) -> int:
        """Denoising steps per action (flow-matching families); each is one action-expert pass."""
        return 0

    def rollout_action_bytes(self, policy_cfg, model_config) -> int:
        """Bytes of the policy's action per env step in the rollout buffer: int64 action-token slots."""
        return policy_cfg.action_dim * 8


class Policy(nn.Module):
    """Base class. Holds ``peft_model`` (the PeftModel saved and pushed), ``processor``, ``cfg`` (the family's
    policy section) and ``value_head``; a family's ``__init__`` calls :meth:`set_image_normalization`."""

    peft_model: nn.Module
    value_head: ValueHead
    memory_hooks: ClassVar[MemoryHooks] = MemoryHooks()
    padding_side: ClassVar[str] = "left"  # of batched prompts (see common.pad_prompts)

    def __init__(self, peft_model, processor, policy_cfg, hidden_size: int):
        super().__init__()
        self.peft_model = peft_model
        self.processor = processor
        self.cfg = policy_cfg
        self.value_head = ValueHead(hidden_size, policy_cfg.value_head_hidden)
        self._prompt_ids: dict[str, Tensor] = {}

    def set_image_normalization(self, image_hw: tuple[int, int], mean: Tensor, std: Tensor, rescale: float) -> None:
        self.image_hw, self.rescale = tuple(image_hw), rescale
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.value_head.net[0].weight.device

    @property
    def model_dtype(self) -> torch.dtype:
        return self.peft_model.get_input_embeddings().weight.dtype

    # ------------------------------------------------------------------------------------------------------------
    # the contract

    @torch.no_grad()
    def act(self, obs: Observation, deterministic: bool = False) -> ActionSample:
        """Sample an action for the env (the most likely one when ``deterministic``)."""
        raise NotImplementedError

    def predict_action(self, image, instruction: str, *, unnorm_key: str | None = None, state=None) -> np.ndarray:
        """The env action for one camera image (uint8 numpy [H, W, 3] or a PIL image) and an instruction, as
        OpenVLA's ``predict_action``: ``act(deterministic=True)``'s un-normalised action [A], or the
        executed chunk [k, A] for an action-chunking family, as a numpy array. ``unnorm_key`` may only name the
        statistics the policy was built with (``policy.unnorm_key``); ``state`` ([D] floats) feeds a pi0 policy
        with ``policy.use_state``. Call it in eval mode, inside :meth:`acting` for speed, as evaluation does."""
        return self.predict_actions(
            [image], [instruction], unnorm_key=unnorm_key, states=None if state is None else [state]
        )[0]

    def predict_actions(
        self, images: list, instructions: list[str], *, unnorm_key: str | None = None, states: list | None = None
    ) -> list[np.ndarray]:
        """:meth:`predict_action` for a batch, in one forward (the policy server's batches). The images must share
        one size."""
        own = getattr(self.cfg, "unnorm_key", None)
        if unnorm_key is not None and unnorm_key != own:
            raise ValueError(
                f"unnorm_key={unnorm_key!r}, but this policy un-normalises with policy.unnorm_key={own!r}: load it "
                f"with policy.unnorm_key={unnorm_key} to use those statistics"
            )
        if len(images) != len(instructions) or not images:
            raise ValueError(
                f"{len(images)} images and {len(instructions)} instructions: give one image per instruction"
            )
        obs = observation_batch(images, instructions, states)
        env_action = self.act(obs, deterministic=True).env_action
        return list(env_action.detach().cpu().numpy())

    def evaluate(self, obs: Observation, action: Tensor, pixel_values: Tensor | None = None) -> PolicyOutput:
        """Log-prob, entropy, value and mean action of ``action`` at ``obs``, with grad.

        ``pixel_values`` (from :meth:`observation_inputs`) may be passed in, e.g. with requires_grad for the
        Jacobian penalty, so that the mean is differentiable in the image the model sees."""
        raise NotImplementedError

    def value(self, obs: Observation) -> Tensor:
        """V(obs) alone, e.g. to bootstrap truncated episodes."""
        raise NotImplementedError

    def observation_inputs(self, obs: Observation) -> Tensor:
        """The model's image input, normalised on the device (the Jacobian is taken against it)."""
        return normalize_images(
            obs["rgb"].to(self.device), self.image_hw, self.pixel_mean, self.pixel_std, self.rescale, self.model_dtype
        )

    def visual_embedding_module(self) -> nn.Module:
        """The module whose output is the visual embeddings fed to the language model."""
        raise NotImplementedError

    @contextlib.contextmanager
    def capture_visual_embeddings(self) -> Iterator[list[Tensor]]:
        """Collect the visual embeddings fed to the language model during forwards inside the block (the input
        the paper's gradient penalty differentiates against)."""
        captured: list[Tensor] = []
        handle = self.visual_embedding_module().register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            yield captured
        finally:
            handle.remove()

    @contextlib.contextmanager
    def acting(self) -> Iterator[None]:
        """The block where the policy only acts (rollouts, evaluation). With ``merge_lora_to_act`` the active LoRA
        is folded into the weights it adapts, so each forward costs what the bare model's does (a small model on
        the CPU spends half of ``act`` in peft's LoRA layers), and the weights are put back bit for bit after: peft's
        unmerge subtracts the delta again, which would leave rounding in the base. Actions agree with the unmerged
        policy's to float rounding. Nothing is merged for a quantized base (merging would requantize it), an
        adapter switched off or already merged, or a model without LoRA layers."""
        from peft.tuners.lora import LoraLayer

        layers = [m for m in self.peft_model.modules() if isinstance(m, LoraLayer)]
        bases = [layer.get_base_layer() for layer in layers]
        tensors = [t for b in bases for t in (b.weight, getattr(b, "bias", None)) if t is not None]
        if (
            not self.cfg.merge_lora_to_act
            or not layers
            or any(layer.merged or layer.disable_adapters for layer in layers)
            or not all(t.dtype.is_floating_point for t in tensors)
        ):
            yield
            return
        saved = [t.detach().clone() for t in tensors]
        self.peft_model.merge_adapter()
        try:
            yield
        finally:
            self.peft_model.unmerge_adapter()  # peft's bookkeeping; the copies below restore the exact bits
            with torch.no_grad():
                for tensor, original in zip(tensors, saved, strict=True):
                    tensor.copy_(original)

    # ------------------------------------------------------------------------------------------------------------
    # the supervised objective (the warm-up on demonstrations, rvla_peft.sft)

    @property
    def action_horizon(self) -> int:
        """Expert actions per observation that :meth:`supervised_loss` reads: 1, or a family's chunk."""
        return 1

    def supervised_loss(
        self, obs: Observation, actions: Tensor, mask: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """The family's own supervised loss of expert ``actions`` at ``obs``, a scalar with grad.

        ``actions`` [B, H, A] are env actions (as the demonstrations record them), H >= :attr:`action_horizon`:
        row h is the expert's action h steps after the observation; ``mask`` [B, H] is false past the episode's end.
        ``generator`` draws what the loss samples (flow matching's noise and time), on the CPU."""
        raise NotImplementedError(f"policy family {self.cfg.family!r} has no supervised objective")

    @classmethod
    def has_supervised_objective(cls) -> bool:
        return cls.supervised_loss is not Policy.supervised_loss

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------------------------
    # the reference policy: the same model with the adapter switched off (no second copy of the weights), or, for RL
    # that continues from a warm-up adapter (``model.adapter``), the frozen copy of that adapter named "reference"

    def freeze_reference(self) -> None:
        """Take the current values of the trained weights that are neither LoRA nor the value head (OpenVLA-OFT's
        action and scale heads) as the reference policy's; call it before training changes them."""
        value_ids = {id(p) for p in self.value_head.parameters()}
        self._reference_weights = {
            name: p.detach().clone()
            for name, p in self.named_parameters()
            if p.requires_grad and "lora_" not in name and id(p) not in value_ids
        }

    @property
    def has_reference_adapter(self) -> bool:
        """Whether a frozen adapter named :data:`REFERENCE_ADAPTER` (the warm-up) is the reference's LoRA."""
        return REFERENCE_ADAPTER in getattr(self.peft_model, "peft_config", {})

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Inside the block this policy is the reference policy (the KL anchor, the invariance teacher with
        ``target: base``, the drift probes' baseline): the adapter switched off, or switched to the frozen
        "reference" adapter when there is one, and the weights of :meth:`freeze_reference` swapped in."""
        weights = getattr(self, "_reference_weights", None)
        if weights is None:
            raise RuntimeError("no reference policy: call freeze_reference() before training")
        params = dict(self.named_parameters())
        current = {name: params[name].data for name in weights}
        switch = self._reference_adapter() if self.has_reference_adapter else self.peft_model.disable_adapter()
        with switch:
            try:
                for name, initial in weights.items():
                    params[name].data = initial
                yield
            finally:
                for name, data in current.items():
                    params[name].data = data

    @contextlib.contextmanager
    def _reference_adapter(self) -> Iterator[None]:
        """Every LoRA layer computes with the "reference" adapter inside the block. The layers' active adapter is
        set directly: peft's ``set_adapter`` would also flip which weights require grad."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.peft_model.modules() if isinstance(m, BaseTunerLayer)]
        active = [layer._active_adapter for layer in layers]
        try:
            for layer in layers:
                layer._active_adapter = [REFERENCE_ADAPTER]
            yield
        finally:
            for layer, name in zip(layers, active, strict=True):
                layer._active_adapter = name

    # ------------------------------------------------------------------------------------------------------------
    # prompts

    def build_prompt(self, instruction: str) -> Tensor:
        """Token ids of the prompt for one instruction."""
        raise NotImplementedError

    def _prompt(self, instruction: str) -> Tensor:
        if instruction not in self._prompt_ids:
            self._prompt_ids[instruction] = self.build_prompt(instruction)
        return self._prompt_ids[instruction]

    def encode_prompts(self, instructions: list[str]) -> tuple[Tensor, Tensor]:
        """Padded prompt ids and attention mask [B, L] on the device (``padding_side``)."""
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        ids, mask = pad_prompts(
            [self._prompt(i) for i in instructions], tokenizer.pad_token_id or 0, self.padding_side
        )
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------------------------------------------------
    # saving and loading

    def save_pretrained(self, directory: str | Path, base_model_id: str | None = None) -> None:
        """The LoRA adapter (adapter_config.json + adapter_model.safetensors, recording ``base_model_id`` as its
        base) and, beside it, the value head."""
        directory = Path(directory)
        if base_model_id is not None:
            for config in self.peft_model.peft_config.values():
                config.base_model_name_or_path = base_model_id
        # embeddings are not adapted: skip peft's vocabulary check, which would look the base id up online
        # only the trained adapter: a frozen "reference" adapter (the warm-up RL started from) is not part of it
        self.peft_model.save_pretrained(
            str(directory), safe_serialization=True, save_embedding_layers=False, selected_adapters=["default"]
        )
        state = {k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()}
        save_file(
            state, str(directory / VALUE_HEAD_FILE), metadata={"hidden_size": str(state["net.0.weight"].shape[1])}
        )

    def load_adapter_extras(self, directory: str | Path) -> None:
        """Load what a family saves beside the adapter besides the value head (``build_policy`` calls it)."""
