"""Learnable aggregation ("LAG") over the members of a set, convolutional version (SPEC 2.4).

One query per set (the plain mean of the members' feature maps), keys and values from the members,
`heads` heads (4 in every model of the zoo). q, k, v are 1x1 convolutions; each head owns C/heads channels of
a (C/heads, H, W) map and the similarity is the full dot product over channels x height x width, scaled by
1/sqrt(H * W * C / heads). Softmax over the S members gives one weight per (set, head, member). No output
projection, no residual, no normalisation, no dropout. Works at any spatial size (SCHA-VAE uses 1x1 to 8x8).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor, nn


class ConvLAG(nn.Module):
    """Attention pooling of a set of maps e (B, S, C, H, W) into one map per set (B, C, H, W).

    Returns (aggregate (B, C, H, W), weights (B, heads, S)); the weights sum to 1 over S.
    """

    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention width {channels} is not divisible by {heads} heads")
        self.channels = channels
        self.heads = heads
        self.query = nn.Conv2d(channels, channels, kernel_size=1)
        self.key = nn.Conv2d(channels, channels, kernel_size=1)
        self.value = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, e: Tensor) -> Tuple[Tensor, Tensor]:
        b, s, c, h, w = e.shape
        nh = self.heads
        members = e.reshape(b * s, c, h, w)
        q = self.query(e.mean(dim=1)).reshape(b, nh, 1, -1)  # (B, nh, 1, d), d = C/nh * H * W
        k = self.key(members).reshape(b, s, nh, -1).transpose(1, 2)  # (B, nh, S, d)
        v = self.value(members).reshape(b, s, nh, -1).transpose(1, 2)  # (B, nh, S, d)
        sim = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))  # (B, nh, 1, S)
        weights = torch.softmax(sim, dim=-1)
        out = (weights @ v).reshape(b, c, h, w)  # heads concatenated along channels
        return out, weights.squeeze(2)
