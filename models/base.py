"""The contract every model of the zoo implements (DESIGN "Model contract")."""
from __future__ import annotations

from torch import Tensor, nn

from models.config import ModelConfig
from models.objective import ForwardOutput


class SetModel(nn.Module):
    """A generative model of sets. Inputs are (B, S, C, H, W) floats in [0, 1].

    Device and dtype follow the inputs; no hidden global state.
    """

    #: whether the model has a context latent c (False only for the VAE)
    has_context: bool = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, x: Tensor) -> ForwardOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def log_weights(self, x: Tensor, k: int, chunk: int = 100) -> Tensor:  # pragma: no cover - interface
        """Importance log-weights log p(X, z, c) - log q(z, c | X) per set, for k samples: (k, B).

        Computed `chunk` samples at a time so that k = 1000 fits in memory.
        """
        raise NotImplementedError
