"""A prototypical network (Snell et al., NeurIPS 2017): the feature space of the sample-quality job.

Embedding = `blocks` x [3x3 conv, BatchNorm, ReLU, 2x2 max-pool] (the "Conv-4" of the paper), flattened. A query
is classified by the nearest class prototype (the mean embedding of a class's support images) in squared
Euclidean distance. Trained with episodes of N-way K-shot classification on training classes only, it gives a
feature space in which characters it never saw form tight clusters: what Boutin et al. (NeurIPS 2022) use to
score one-shot samples without any pretrained (downloaded) network.

Pure torch, no I/O: trainer/evaluation/feature_model.py trains, stores and loads it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class ProtoNetConfig:
    """Architecture of the embedding (the card stores it; the same values rebuild the net)."""

    channels: int = 64  # width of every conv block
    blocks: int = 4  # 28 px -> 14 -> 7 -> 3 -> 1 with 4 blocks
    image_channels: int = 1
    image_size: int = 28

    def __post_init__(self) -> None:
        if self.channels < 1 or self.blocks < 1:
            raise ValueError(f"protonet channels and blocks must be >= 1, got {self.channels}, {self.blocks}")
        if self.image_size >> self.blocks < 1:
            raise ValueError(f"protonet: {self.blocks} pooling blocks leave nothing of a {self.image_size} px image")

    @property
    def feature_dim(self) -> int:
        side = self.image_size
        for _ in range(self.blocks):
            side //= 2
        return self.channels * side * side


class ProtoNet(nn.Module):
    def __init__(self, cfg: ProtoNetConfig):
        super().__init__()
        self.cfg = cfg
        layers = []
        c_in = cfg.image_channels
        for _ in range(cfg.blocks):
            layers += [nn.Conv2d(c_in, cfg.channels, 3, padding=1), nn.BatchNorm2d(cfg.channels), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c_in = cfg.channels
        self.encoder = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(..., C, H, W) images in [0, 1] -> (..., feature_dim) embeddings."""
        lead = x.shape[:-3]
        return self.encoder(x.reshape(-1, *x.shape[-3:])).flatten(1).reshape(*lead, -1)


def prototypes(support: Tensor) -> Tensor:
    """(ways, shots, D) support embeddings -> (ways, D) class prototypes (means)."""
    return support.mean(dim=-2)


def logits(queries: Tensor, protos: Tensor) -> Tensor:
    """(Q, D) query and (ways, D) prototype embeddings -> (Q, ways) logits = -squared Euclidean distance."""
    return -torch.cdist(queries.float(), protos.float()).pow(2)


def episode_loss(net: ProtoNet, support: Tensor, query: Tensor) -> tuple:
    """Prototypical loss of one episode. support (ways, shots, C, H, W), query (ways, q, C, H, W) -> (mean
    cross-entropy, accuracy) with query class i = support class i."""
    ways, q = query.shape[:2]
    emb = net(torch.cat([support.flatten(0, 1), query.flatten(0, 1)]))
    n_support = support.shape[0] * support.shape[1]
    protos = prototypes(emb[:n_support].reshape(ways, support.shape[1], -1))
    out = logits(emb[n_support:], protos)
    target = torch.arange(ways, device=out.device).repeat_interleave(q)
    loss = nn.functional.cross_entropy(out, target)
    acc = (out.argmax(1) == target).float().mean()
    return loss, acc
