"""The policy contract shared by every family, so rollout, PPO, regularisers and evaluation never ask which
family they hold."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

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


class ValueHead(nn.Module):
    """V(s) from the backbone's last hidden state at the last prompt token; kept in float32."""

    def __init__(self, hidden_size: int, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.net(hidden.to(self.net[0].weight.dtype)).squeeze(-1)


class Policy(nn.Module):
    """Base class. Subclasses hold ``peft_model`` (the PeftModel saved and pushed) and ``value_head``."""

    peft_model: nn.Module
    value_head: ValueHead

    @torch.no_grad()
    def act(self, obs: Observation, deterministic: bool = False) -> ActionSample:
        """Sample an action for the env (the most likely one when ``deterministic``)."""
        raise NotImplementedError

    def evaluate(self, obs: Observation, action: Tensor, pixel_values: Tensor | None = None) -> PolicyOutput:
        """Log-prob, entropy, value and mean action of ``action`` at ``obs``, with grad.

        ``pixel_values`` (from :meth:`observation_inputs`) may be passed in, e.g. with requires_grad for the
        Jacobian penalty, so that the mean is differentiable in the image the model sees."""
        raise NotImplementedError

    def observation_inputs(self, obs: Observation) -> Tensor:
        """The model's image input (the Jacobian is taken against it)."""
        raise NotImplementedError

    def value(self, obs: Observation) -> Tensor:
        """V(obs) alone, e.g. to bootstrap truncated episodes."""
        raise NotImplementedError

    @contextlib.contextmanager
    def capture_visual_embeddings(self) -> Iterator[list[Tensor]]:
        """Collect the visual embeddings fed to the language model during forwards inside the block (the input
        the paper's gradient penalty differentiates against)."""
        raise NotImplementedError
        yield []

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def save_pretrained(self, directory: str | Path) -> None:
        raise NotImplementedError
