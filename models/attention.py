"""Learnable aggregation ("LAG") over the members of a set, fully-connected version (SPEC 2.2).

One query per set (by default the plain mean of the members), keys and values from the members,
4 heads, softmax over the members scaled by 1/sqrt(head size). No output projection, no residual,
no normalisation, no dropout: the output is the per-head weighted sum of the values, heads concatenated.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

from torch import Tensor, nn


class TBlock(nn.Module):
    """Attention pooling of a set E (B, T, C) into one vector per set (B, C).

    Returns the pooled vector and the attention weights (B, heads, T) (they sum to 1 over T).
    """

    def __init__(self, dim: int, n_head: int = 4) -> None:
        super().__init__()
        if dim % n_head:
            raise ValueError(f"attention width {dim} is not divisible by {n_head} heads")
        self.dim = dim
        self.n_head = n_head
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(self, e: Tensor, query: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        b, t, c = e.shape
        if query is None:
            query = e.mean(dim=1)
        hs = c // self.n_head
        q = self.query(query).view(b, self.n_head, 1, hs)  # (B, h, 1, hs)
        k = self.key(e).view(b, t, self.n_head, hs).transpose(1, 2)  # (B, h, T, hs)
        v = self.value(e).view(b, t, self.n_head, hs).transpose(1, 2)  # (B, h, T, hs)
        sim = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, h, 1, T)
        weights = sim.softmax(dim=-1)
        out = (weights @ v).reshape(b, c)  # (B, h, 1, hs) -> (B, C), heads concatenated
        return out, weights.squeeze(2)
