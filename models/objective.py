"""The objective every model shares (SPEC 3.11): per-image ELBO terms and the alpha-weighted loss.

A model's forward pass returns a `ForwardOutput` with *unreduced* terms; the reductions live here once,
in fp32, so mixed precision never touches the likelihood or KL sums.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import Tensor


@dataclass
class ForwardOutput:
    """Unreduced per-image / per-set terms of one forward pass over a batch of B sets of S images.

    logpx: (B, S) log p(x | z, c) summed over pixels and channels.
    kl_z:  one (B, S) tensor per z layer, top layer first: KL(q(z_l|.) || p(z_l|.)) summed over elements.
    kl_c:  one (B,) tensor per c layer, top layer first: KL(q(c_l|.) || p(c_l|.)) summed over elements.
    px:    likelihood parameters (decoder output) of shape (B, S, ...), for reconstructions.
    extras: model-specific tensors (e.g. attention weights) that the objective ignores.
    """

    logpx: Tensor
    kl_z: List[Tensor]
    kl_c: List[Tensor] = field(default_factory=list)
    px: Optional[Tensor] = None
    extras: dict = field(default_factory=dict)


@dataclass
class ElboTerms:
    """Per-image reductions (divided by N = B*S), fp32 scalars; per-layer KLs as 1-D tensors."""

    logpx: Tensor
    kl_z: Tensor
    kl_c: Tensor
    kl_z_layers: Tensor
    kl_c_layers: Tensor

    @property
    def vlb(self) -> Tensor:
        return self.logpx - self.kl_z - self.kl_c


def elbo_terms(out: ForwardOutput) -> ElboTerms:
    b, s = out.logpx.shape
    n = float(b * s)
    logpx = out.logpx.float().sum() / n
    zero = logpx.new_zeros(1)
    kl_z_layers = torch.stack([k.float().sum() for k in out.kl_z]) / n if out.kl_z else zero
    kl_c_layers = torch.stack([k.float().sum() for k in out.kl_c]) / n if out.kl_c else zero
    return ElboTerms(logpx, kl_z_layers.sum(), kl_c_layers.sum(), kl_z_layers, kl_c_layers)


def training_loss(terms: ElboTerms, alpha: float, kl_z_weight: float = 1.0) -> Tensor:
    """-(w * logpx - (b * KL_z + KL_c) / w) with w = 1 + alpha (reference schedule; alpha=0 gives -ELBO) and
    b = kl_z_weight (1: the reference's loss; > 1 makes per-image information dearer than the set's context)."""
    w = 1.0 + alpha
    kl_z = terms.kl_z if kl_z_weight == 1.0 else kl_z_weight * terms.kl_z
    return -(w * terms.logpx - (kl_z + terms.kl_c) / w)


def gaussian_kl(q_mean: Tensor, q_logvar: Tensor, p_mean: Tensor, p_logvar: Tensor) -> Tensor:
    """Element-wise analytic KL(N(q) || N(p)) with (mean, logvar) parameterisation, computed in fp32."""
    q_mean, q_logvar, p_mean, p_logvar = (t.float() for t in (q_mean, q_logvar, p_mean, p_logvar))
    return 0.5 * (p_logvar - q_logvar + (q_logvar.exp() + (q_mean - p_mean) ** 2) / p_logvar.exp() - 1.0)


def gaussian_log_prob(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """Element-wise log N(x; mean, exp(logvar)) in fp32."""
    x, mean, logvar = x.float(), mean.float(), logvar.float()
    return -0.5 * (logvar + (x - mean) ** 2 / logvar.exp() + 1.8378770664093453)  # log(2*pi)
