"""Discretized likelihoods for 8-bit images (SPEC 4.2, 4.3), same interface as models.likelihoods.Bernoulli.

Images x are given in [0, 1] (multiples of 1/255) and mapped internally to y = 2x - 1 in [-1, 1]; each of the
256 values owns the bin y +- 1/255, the two extreme bins extend to -inf / +inf, so the probabilities of the 256
values of a sub-pixel sum to one. All computations run in fp32.

- DiscretizedNormal: decoder outputs 2C channels (means, then log-variances clamped to <= 1). Uses the exact
  normal CDF (the reference uses a tanh approximation of it).
- DiscretizedMixLogistic: the PixelCNN++ mixture of discretized logistics with autoregressive channel coupling,
  generalised to any channel count C: per component 1 logit, C means, C log-scales (clamped >= -7) and
  C(C-1)/2 tanh coupling coefficients; channel c's mean is shifted by sum_{j<c} coeff_{c,j} * y_j.
  Channel layout of the decoder output: [M logits | C*M means | C*M log-scales | C(C-1)/2*M coefficients],
  each block channel-major ((C, M) and (pairs, M)); pairs are ordered (1,0), (2,0), (2,1), (3,0), ...
  For C = 3 this is exactly the PixelCNN++ loss (G depends on R; B on R and G).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_HALF_BIN = 1.0 / 255.0  # half the bin width in [-1, 1]
_EDGE = 0.999
_LOG_HALF_LEVELS = math.log(127.5)  # log of 1 / bin width


def _to_signed(x: Tensor) -> Tensor:
    return x.float() * 2.0 - 1.0


def _to_unit(y: Tensor) -> Tensor:
    return (y.clamp(-1.0, 1.0) + 1.0) * 0.5


def _bin_log_prob(y: Tensor, log_cdf_plus: Tensor, log_sf_min: Tensor, cdf_delta: Tensor, log_pdf_mid: Tensor) -> Tensor:
    """Select the edge / interior / tiny-mass case per sub-pixel (the PixelCNN++ rule)."""
    interior = torch.where(
        cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid - _LOG_HALF_LEVELS
    )
    return torch.where(y < -_EDGE, log_cdf_plus, torch.where(y > _EDGE, log_sf_min, interior))


class DiscretizedNormal(nn.Module):
    """Per-sub-pixel Normal(mean, exp(logvar)) integrated over the 8-bit bins."""

    def __init__(self, image_channels: int = 3, n_mixtures: int = 1) -> None:
        super().__init__()
        self.image_channels = image_channels

    def out_channels(self) -> int:
        return 2 * self.image_channels

    def _split(self, params: Tensor) -> Tuple[Tensor, Tensor]:
        mean, logvar = params.float().chunk(2, dim=-3)
        return mean, logvar.clamp(max=1.0)

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        """params (..., 2C, H, W), x (..., C, H, W) in [0, 1] -> per-image log p(x) (...)."""
        mean, logvar = self._split(params)
        y = _to_signed(x)
        inv_std = torch.exp(-0.5 * logvar)
        plus = (y + _HALF_BIN - mean) * inv_std
        minus = (y - _HALF_BIN - mean) * inv_std
        # Phi(plus) - Phi(minus), computed on the side of the mode where it does not cancel
        upper = minus > 0
        cdf_delta = torch.where(
            upper, torch.special.ndtr(-minus) - torch.special.ndtr(-plus), torch.special.ndtr(plus) - torch.special.ndtr(minus)
        )
        mid = (y - mean) * inv_std
        log_pdf_mid = -0.5 * mid**2 - 0.5 * logvar - 0.5 * math.log(2 * math.pi)
        lp = _bin_log_prob(y, torch.special.log_ndtr(plus), torch.special.log_ndtr(-minus), cdf_delta, log_pdf_mid)
        return lp.flatten(-3).sum(-1)

    def mean(self, params: Tensor) -> Tensor:
        return _to_unit(self._split(params)[0])

    def sample(self, params: Tensor, binary: bool = False) -> Tensor:
        mean, logvar = self._split(params)
        return _to_unit(mean + torch.exp(0.5 * logvar) * torch.randn_like(mean))


class DiscretizedMixLogistic(nn.Module):
    """Mixture of n_mixtures discretized logistics with channel coupling, for any image channel count."""

    def __init__(self, image_channels: int = 3, n_mixtures: int = 10) -> None:
        super().__init__()
        if n_mixtures < 1:
            raise ValueError(f"n_mixtures must be >= 1, got {n_mixtures}")
        self.image_channels = image_channels
        self.n_mixtures = n_mixtures
        self.n_coeffs = image_channels * (image_channels - 1) // 2
        # pair index of (c, j), j < c, in the coefficient block
        pairs = {}
        for c in range(1, image_channels):
            for j in range(c):
                pairs[(c, j)] = len(pairs)
        self._pairs = pairs

    def out_channels(self) -> int:
        return self.n_mixtures * (1 + 2 * self.image_channels + self.n_coeffs)

    def _split(self, params: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(..., K, H, W) -> logits (..., H, W, M), means and log-scales (..., H, W, C, M), coeffs (..., H, W, P, M)."""
        m, c, p = self.n_mixtures, self.image_channels, self.n_coeffs
        if params.shape[-3] != self.out_channels():
            raise ValueError(f"expected {self.out_channels()} parameter channels, got {params.shape[-3]}")
        q = params.float().movedim(-3, -1)
        lead = q.shape[:-1]
        logits = q[..., :m]
        means = q[..., m : m + c * m].reshape(*lead, c, m)
        log_scales = q[..., m + c * m : m + 2 * c * m].reshape(*lead, c, m).clamp(min=-7.0)
        coeffs = torch.tanh(q[..., m + 2 * c * m :].reshape(*lead, p, m))
        return logits, means, log_scales, coeffs

    def _couple(self, means: Tensor, coeffs: Tensor, y: Tensor) -> Tensor:
        """means (..., C, M) shifted by the coupling with the (earlier) channel values y (..., C, M or 1)."""
        out = [means[..., 0, :]]
        for c in range(1, self.image_channels):
            mc = means[..., c, :]
            for j in range(c):
                mc = mc + coeffs[..., self._pairs[(c, j)], :] * y[..., j, :]
            out.append(mc)
        return torch.stack(out, dim=-2)

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        """params (..., K, H, W), x (..., C, H, W) in [0, 1] -> per-image log p(x) (...)."""
        logits, means, log_scales, coeffs = self._split(params)
        y = _to_signed(x).movedim(-3, -1).unsqueeze(-1)  # (..., H, W, C, 1)
        means = self._couple(means, coeffs, y)
        centered = y - means
        inv_s = torch.exp(-log_scales)
        plus_in = inv_s * (centered + _HALF_BIN)
        min_in = inv_s * (centered - _HALF_BIN)
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        log_cdf_plus = plus_in - F.softplus(plus_in)
        log_sf_min = -F.softplus(min_in)
        mid_in = inv_s * centered
        log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
        lp = _bin_log_prob(y.expand_as(means), log_cdf_plus, log_sf_min, cdf_delta, log_pdf_mid)
        lp = lp.sum(dim=-2) + torch.log_softmax(logits, dim=-1)  # (..., H, W, M)
        return torch.logsumexp(lp, dim=-1).flatten(-2).sum(-1)

    def mean(self, params: Tensor) -> Tensor:
        """Mixture mean of the (unclamped) coupled logistics, clamped to the image range."""
        logits, means, _, coeffs = self._split(params)
        comp = []  # per-component channel means, computed channel by channel
        for c in range(self.image_channels):
            mc = means[..., c, :]
            for j in range(c):
                mc = mc + coeffs[..., self._pairs[(c, j)], :] * comp[j]
            comp.append(mc)
        mix = (torch.stack(comp, dim=-2) * torch.softmax(logits, dim=-1).unsqueeze(-2)).sum(-1)  # (..., H, W, C)
        return _to_unit(mix).movedim(-1, -3)

    def sample(self, params: Tensor, binary: bool = False) -> Tensor:
        """Gumbel-max component choice, logistic sample, channel coupling, clamp to [-1, 1], map to [0, 1]."""
        logits, means, log_scales, coeffs = self._split(params)
        u = torch.rand_like(logits).clamp(1e-5, 1.0 - 1e-5)
        pick = F.one_hot((logits - torch.log(-torch.log(u))).argmax(-1), self.n_mixtures).to(means.dtype)
        means = (means * pick.unsqueeze(-2)).sum(-1)  # (..., H, W, C)
        log_scales = (log_scales * pick.unsqueeze(-2)).sum(-1)
        coeffs = (coeffs * pick.unsqueeze(-2)).sum(-1)  # (..., H, W, P)
        v = torch.rand_like(means).clamp(1e-5, 1.0 - 1e-5)
        raw = means + torch.exp(log_scales) * (torch.log(v) - torch.log1p(-v))
        out = []
        for c in range(self.image_channels):
            yc = raw[..., c]
            for j in range(c):
                yc = yc + coeffs[..., self._pairs[(c, j)]] * out[j]
            out.append(yc.clamp(-1.0, 1.0))
        return _to_unit(torch.stack(out, dim=-1)).movedim(-1, -3)
