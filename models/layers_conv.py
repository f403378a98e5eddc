"""Convolutional family building blocks (SPEC 2.3), used by CNS, CNS-LAG, CHFSGM and CHFSGM-LAG.

Every latent is a (channels, 4, 4) map and every "linear" layer of the FC family is a 1x1 convolution.
Set-level tensors have leading dim B, sample-level tensors leading dim N = B * S. ELU activations,
BatchNorm2d as in the reference, PyTorch default initialisation.

Gaussian heads return (mean, logvar); no clamping of logvar.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention_conv import ConvLAG

LATENT_SIZE = 4  # spatial side of every latent map of the conv family


def conv3x3(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=padding)


def conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1)


def pool_set(e: Tensor, mode: str) -> Tensor:
    """Aggregate (B, S, C, H, W) over the set members with 'mean' or 'max' -> (B, C, H, W)."""
    if mode == "max":
        return e.max(dim=1).values
    return e.mean(dim=1)


class ConvEncoder(nn.Module):
    """Shared encoder: nine 3x3 conv + BN + ELU layers, (N, C_img, H, W) -> (N, 4ch, 4, 4).

    Channels ch, ch, ch (stride 2), 2ch, 2ch, 2ch (stride 2), 4ch, 4ch, 4ch (stride 2); 28 -> 14 -> 7 -> 4 and
    32 -> 16 -> 8 -> 4. 64x64 inputs are 2x2 average-pooled to 32x32 first.
    """

    def __init__(self, in_channels: int, ch: int, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        widths = [ch, ch, ch, 2 * ch, 2 * ch, 2 * ch, 4 * ch, 4 * ch, 4 * ch]
        layers = []
        cin = in_channels
        for i, cout in enumerate(widths):
            layers += [conv3x3(cin, cout, stride=2 if i % 3 == 2 else 1), nn.BatchNorm2d(cout), nn.ELU()]
            cin = cout
        self.net = nn.Sequential(*layers)
        self.out_channels = 4 * ch

    def forward(self, x: Tensor) -> Tensor:
        if self.image_size == 64:
            x = F.avg_pool2d(x, kernel_size=2, stride=2)
        return self.net(x)


class ConvPreProj(nn.Module):
    """1x1 conv 4ch -> W_h + BatchNorm2d + ELU: the per-image features h (N, W_h, 4, 4)."""

    def __init__(self, in_channels: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(conv1x1(in_channels, hidden), nn.BatchNorm2d(hidden), nn.ELU())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvResBlock(nn.Module):
    """n_res x [3x3 conv + BatchNorm2d] with ELU between layers (not after the last); ELU(block(x) + x)."""

    def __init__(self, hidden: int, n_res: int) -> None:
        super().__init__()
        layers = []
        for i in range(n_res):
            if i:
                layers.append(nn.ELU())
            layers += [conv3x3(hidden, hidden), nn.BatchNorm2d(hidden)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return F.elu(self.block(x) + x)


class ConvPostPool(nn.Module):
    """Maps an aggregated set map (B, W_h, 4, 4) to Gaussian parameters: res block -> 1x1 conv -> BN2d -> split."""

    def __init__(self, hidden: int, out_dim: int, n_res: int) -> None:
        super().__init__()
        self.res = ConvResBlock(hidden, n_res)
        self.params = conv1x1(hidden, 2 * out_dim)
        self.bn = nn.BatchNorm2d(2 * out_dim)

    def forward(self, a: Tensor) -> Tuple[Tensor, Tensor]:
        mean, logvar = self.bn(self.params(self.res(a))).chunk(2, dim=1)
        return mean, logvar


class ConvStatistic(nn.Module):
    """q(c | X): aggregate the members' h (B, S, W_h, 4, 4) by mean / max / ConvLAG, then PostPool.

    Returns (mean, logvar, attention weights (B, 4, S) or None).
    """

    def __init__(self, hidden: int, c_dim: int, n_res: int, aggregation: str = "mean") -> None:
        super().__init__()
        self.aggregation = aggregation
        self.lag = ConvLAG(hidden) if aggregation == "lag" else None
        self.postpool = ConvPostPool(hidden, c_dim, n_res)

    def forward(self, h: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        att = None
        if self.lag is not None:
            a, att = self.lag(h)
        else:
            a = pool_set(h, self.aggregation)
        mean, logvar = self.postpool(a)
        return mean, logvar, att


def _expand_set(t: Tensor, s: int) -> Tensor:
    """(B, C, H, W) set-level map -> (B*S, C, H, W), repeated over the members."""
    b = t.shape[0]
    return t.unsqueeze(1).expand(b, s, *t.shape[1:]).reshape(b * s, *t.shape[1:])


class ConvLatentZ(nn.Module):
    """p(z_l | z_{l+1}, c) (with_h=False) or q(z_l | h, z_{l+1}, c) (with_h=True), maps (N, d_z, 4, 4).

    1x1-conv embeddings of z (per member), c (per set, broadcast to the members) and h (posterior only) are
    summed, ELU, conv residual block, 1x1 conv -> 2 d_z, BatchNorm2d, split into (mean, logvar).
    As in the reference, every layer owns a z embedding; the top layer (z_{l+1} = None) skips it, so its
    weights stay untouched (they are part of the reference's parameter count, SPEC 3.13).
    """

    def __init__(self, hidden: int, z_dim: int, c_dim: int, n_res: int, with_h: bool) -> None:
        super().__init__()
        self.hidden = hidden
        self.embed_z = conv1x1(z_dim, hidden)
        self.embed_c = conv1x1(c_dim, hidden)
        self.embed_h = conv1x1(hidden, hidden) if with_h else None
        self.res = ConvResBlock(hidden, n_res)
        self.params = conv1x1(hidden, 2 * z_dim)
        self.bn = nn.BatchNorm2d(2 * z_dim)

    def forward(self, z: Optional[Tensor], c: Tensor, set_size: int, h: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """z: (N, d_z, 4, 4) or None; c: (B, d_c, 4, 4); h: (N, W_h, 4, 4) for the posterior."""
        e = _expand_set(self.embed_c(c), set_size)
        if z is not None:
            e = e + self.embed_z(z)
        if self.embed_h is not None:
            if h is None:
                raise ValueError("the posterior over z needs the image features h")
            e = e + self.embed_h(h)
        mean, logvar = self.bn(self.params(self.res(F.elu(e)))).chunk(2, dim=1)
        return mean, logvar


class ConvLatentC(nn.Module):
    """p(c_l | z_{l+1}, c_{l+1}) (with_h=False) or q(c_l | H, z_{l+1}, c_{l+1}) (with_h=True), maps (B, d_c, 4, 4).

    1x1-conv embeddings of z (per member), c (per set) [and h] are summed with no nonlinearity, pooled over the
    set, and mapped by a PostPool. Mean / max pooling adds the c embedding again after pooling (skip); attention
    pooling (ConvLAG, query = set mean; CHFSGM-LAG posterior) has no skip.
    Returns (mean, logvar, attention weights (B, 4, S) or None).
    """

    def __init__(self, hidden: int, z_dim: int, c_dim: int, n_res: int, with_h: bool, aggregation: str = "mean") -> None:
        super().__init__()
        self.aggregation = aggregation
        self.embed_z = conv1x1(z_dim, hidden)
        self.embed_c = conv1x1(c_dim, hidden)
        self.embed_h = conv1x1(hidden, hidden) if with_h else None
        self.lag = ConvLAG(hidden) if aggregation == "lag" else None
        self.postpool = ConvPostPool(hidden, c_dim, n_res)

    def forward(
        self, z: Tensor, c: Tensor, set_size: int, h: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """z: (N, d_z, 4, 4); c: (B, d_c, 4, 4); h: (N, W_h, 4, 4) for the posterior."""
        ec = self.embed_c(c)
        e = self.embed_z(z)
        if self.embed_h is not None:
            if h is None:
                raise ValueError("the posterior over c needs the image features h")
            e = e + self.embed_h(h)
        b = ec.shape[0]
        e = e.view(b, set_size, *e.shape[1:]) + ec.unsqueeze(1)
        att = None
        if self.lag is not None:
            a, att = self.lag(e)
        else:
            a = pool_set(e, self.aggregation) + ec
        mean, logvar = self.postpool(a)
        return mean, logvar, att


class ConvObservationDecoder(nn.Module):
    """p(x | z_{1:L}, c_{1:K}): (N, L d_z, 4, 4) and (B, K d_c, 4, 4) -> likelihood parameters (N, out, H, W).

    1x1 conv of the concatenated z maps + 1x1 conv of the concatenated c maps (broadcast to the members), ELU,
    1x1 conv W_h -> 4ch, then conv 4ch, conv 4ch, ConvT -> 8x8, conv 2ch, conv 2ch, ConvT -> 16x16, conv ch,
    conv ch (padding 0 for 28x28 so 16 -> 14), ConvT -> 28 (or 32); BatchNorm2d + ELU after each of these nine;
    nearest x2 upsample for 64x64; final 1x1 conv to the likelihood's channel count (logits for Bernoulli).
    """

    def __init__(
        self, zs_dim: int, cs_dim: int, hidden: int, ch: int, out_channels: int, image_size: int
    ) -> None:
        super().__init__()
        self.image_size = image_size
        nc = 4 * ch
        self.embed_zs = conv1x1(zs_dim, hidden)
        self.embed_cs = conv1x1(cs_dim, hidden)
        self.post_proj = conv1x1(hidden, nc)
        last_pad = 0 if image_size == 28 else 1
        spec = [
            conv3x3(nc, nc),
            conv3x3(nc, nc),
            nn.ConvTranspose2d(nc, nc, kernel_size=2, stride=2),
            conv3x3(nc, nc // 2),
            conv3x3(nc // 2, nc // 2),
            nn.ConvTranspose2d(nc // 2, nc // 2, kernel_size=2, stride=2),
            conv3x3(nc // 2, nc // 4),
            conv3x3(nc // 4, nc // 4, padding=last_pad),
            nn.ConvTranspose2d(nc // 4, nc // 4, kernel_size=2, stride=2),
        ]
        layers = []
        for conv in spec:
            layers += [conv, nn.BatchNorm2d(conv.out_channels), nn.ELU()]
        self.net = nn.Sequential(*layers)
        self.final = conv1x1(nc // 4, out_channels)

    def forward(self, zs: Tensor, cs: Tensor) -> Tensor:
        """zs: (N, L d_z, 4, 4); cs: (B, K d_c, 4, 4) -> (N, out, H, W)."""
        s = zs.shape[0] // cs.shape[0]
        e = F.elu(self.embed_zs(zs) + _expand_set(self.embed_cs(cs), s))
        e = self.net(self.post_proj(e))
        if self.image_size == 64:
            e = F.interpolate(e, scale_factor=2.0, mode="nearest")
        return self.final(e)
