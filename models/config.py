"""Typed model configuration shared by the registry, the Hydra schema and the trainer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

LIKELIHOODS = ("bernoulli", "discretized_normal", "discretized_mix_logistic")
AGGREGATIONS = ("mean", "max", "lag")


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
        if self.hidden_dim % 4:
            raise ValueError(f"model.hidden_dim must be divisible by 4 (attention heads), got {self.hidden_dim}")
