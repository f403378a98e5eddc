"""Observation likelihoods (SPEC 4). A likelihood maps decoder outputs to log p(x|.) and to images."""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Bernoulli(nn.Module):
    """Bernoulli on binary pixels, parameterised by logits (the reference's sigmoid + Bernoulli, stably)."""

    def __init__(self, image_channels: int = 1) -> None:
        super().__init__()
        self.image_channels = image_channels

    def out_channels(self) -> int:
        return self.image_channels

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        """Per-image log p(x), summed over C, H, W: params and x are (..., C, H, W) -> (...)."""
        lp = -F.binary_cross_entropy_with_logits(params.float(), x.float(), reduction="none")
        return lp.flatten(-3).sum(-1)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params.float())

    def sample(self, params: Tensor, binary: bool = False) -> Tensor:
        """Bernoulli means by default (what the reference's figures show); binary draws on request."""
        p = self.mean(params)
        return torch.bernoulli(p) if binary else p


_DISCRETIZED = {
    "discretized_normal": "models.likelihood_discretized:DiscretizedNormal",
    "discretized_mix_logistic": "models.likelihood_discretized:DiscretizedMixLogistic",
}


def build_likelihood(name: str, image_channels: int, n_mixtures: int = 10) -> nn.Module:
    if name == "bernoulli":
        return Bernoulli(image_channels)
    if name not in _DISCRETIZED:
        raise ValueError(f"unknown likelihood {name!r}")
    module, cls = _DISCRETIZED[name].split(":")
    return getattr(importlib.import_module(module), cls)(image_channels, n_mixtures)
