"""Elementwise log-densities, entropies and samples of the continuous action distributions (pi0's flow-SDE steps,
OpenVLA-OFT's action head). One convention: a distribution is given by its mean and the log of its scale (the std of
a Gaussian, the b of a Laplace), which is what a network predicts and clamps."""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log N(x; mean, sigma^2) with sigma = exp(log_scale)."""
    return -0.5 * ((x - mean) * torch.exp(-log_scale)) ** 2 - log_scale - 0.5 * LOG_2PI


def gaussian_entropy(log_scale: Tensor) -> Tensor:
    """0.5 log(2 pi e sigma^2)."""
    return 0.5 + 0.5 * LOG_2PI + log_scale


def laplace_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log Laplace(x; mean, b) = -|x - mean| / b - log(2 b) with b = exp(log_scale)."""
    return -(x - mean).abs() * torch.exp(-log_scale) - log_scale - math.log(2.0)


def laplace_entropy(log_scale: Tensor) -> Tensor:
    """1 + log(2 b)."""
    return 1.0 + math.log(2.0) + log_scale


def action_log_prob(distribution: str, x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """``distribution``: "gaussian" or "laplace"."""
    return (laplace_log_prob if distribution == "laplace" else gaussian_log_prob)(x, mean, log_scale)


def action_entropy(distribution: str, log_scale: Tensor) -> Tensor:
    return (laplace_entropy if distribution == "laplace" else gaussian_entropy)(log_scale)


def sample_action(distribution: str, mean: Tensor, log_scale: Tensor) -> Tensor:
    """One draw per element (torch's global generator, so ``torch.manual_seed`` makes rollouts repeatable)."""
    dist = torch.distributions.Laplace if distribution == "laplace" else torch.distributions.Normal
    return dist(mean, torch.exp(log_scale)).sample()
