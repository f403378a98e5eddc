"""Typed model configuration shared by the registry, the Hydra schema and the trainer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

LIKELIHOODS = ("bernoulli", "discretized_normal", "discretized_mix_logistic")
AGGREGATIONS = ("mean", "max", "lag")
ACTIVATION_CHECKPOINTING = ("none", "blocks")


@dataclass
class ModelConfig:
    """Hyper-parameters of one model of the zoo (SPEC section 3; names follow the reference flags)."""

    name: str = "ns"
    hidden_dim: int = 512  # W_h
    c_dim: int = 32
    z_dim: int = 32
    n_stochastic: int = 3  # L (SCHA-VAE derives it from its resolution strings)
    n_res: int = 3  # layers per residual block
    ch_enc: int = 64
    image_channels: int = 1
    image_size: int = 28
    likelihood: str = "bernoulli"
    n_mixtures: int = 10  # discretized_mix_logistic only
    aggregation: str = "mean"
    # SCHA-VAE resolution strings ("res-count,..."), SPEC 2.5
    str_enc: Optional[str] = None
    str_gen: Optional[str] = None
    str_dec: Optional[str] = None
    # SCHA-VAE size ladder (models/ladder.py): multiplies every block count of the resolution strings
    # (encoder blocks, stochastic layers, decoder blocks)
    depth: int = 1
    # SCHA-VAE activation checkpointing: "none", or "blocks" = recompute one block in every `checkpoint_every`
    # (encoder and decoder residual blocks, top-down layers; blocks 0, N, 2N, ... of each) in the backward pass
    activation_checkpointing: str = "none"
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        for key in ("hidden_dim", "c_dim", "z_dim", "n_stochastic", "n_res", "ch_enc", "image_channels"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.image_size not in (28, 32, 64):
            raise ValueError(f"model.image_size must be 28, 32 or 64, got {self.image_size}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"model.likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"model.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        for key in ("depth", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ValueError(f"model.activation_checkpointing must be one of {ACTIVATION_CHECKPOINTING}, "
                             f"got {self.activation_checkpointing!r}")
        if self.activation_checkpointing == "none" and self.checkpoint_every != 1:
            raise ValueError(f"model.checkpoint_every={self.checkpoint_every} needs "
                             "model.activation_checkpointing=blocks (it is 'none')")
        multiscale = self.name.startswith("schavae")
        if not multiscale and (self.depth != 1 or self.activation_checkpointing != "none"):
            raise ValueError(f"model.depth and model.activation_checkpointing apply to SCHA-VAE models only "
                             f"(model.name={self.name!r}); leave them at 1 / 'none'")
        if self.hidden_dim % 4:
            raise ValueError(f"model.hidden_dim must be divisible by 4 (attention heads), got {self.hidden_dim}")
