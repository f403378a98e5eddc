"""Fully-connected building blocks of VAE, NS, NS-LAG, HFSGM and HFSGM-LAG (SPEC 2.1, 2.2, 3.7).

Conventions: sample-level tensors are (N, .) with N = B*S (sets contiguous), set-level tensors (B, .).
Every Gaussian head returns (mean, logvar); nothing is clamped. Activation ELU. Layers keep PyTorch's
default initialisation (the reference's own init is a no-op, SPEC 8.1).

Some embeddings are built but never used, as in the reference, so that parameter counts match it:
the z-embedding of the top z modules (there is no z above), and for the VAE the c-embeddings of the
z modules and of the decoder. They never receive a gradient.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import TBlock

IMAGE_SIDE = 28
DECODER_CHANNELS = 256  # hard-coded in the reference decoder


def _act(x: Tensor) -> Tensor:
    return F.elu(x)


class GlobalBatchNorm(nn.Module):
    """BatchNorm1d(1) over a whole parameter vector viewed as one channel (one gamma/beta for all)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(1, eps=1e-3, momentum=1e-2)

    def forward(self, e: Tensor) -> Tensor:
        return self.bn(e.unsqueeze(1)).squeeze(1)


class FCResBlock(nn.Module):
    """n layers of Linear + BatchNorm1d with ELU between them; output ELU(block(x) + x)."""

    def __init__(self, dim: int, n_layers: int) -> None:
        super().__init__()
        self.linears = nn.ModuleList([nn.Linear(dim, dim) for _ in range(n_layers)])
        self.norms = nn.ModuleList([nn.BatchNorm1d(dim) for _ in range(n_layers)])

    def forward(self, x: Tensor) -> Tensor:
        e = x
        last = len(self.linears) - 1
        for i, (fc, bn) in enumerate(zip(self.linears, self.norms)):
            e = bn(fc(e))
            if i < last:
                e = _act(e)
        return _act(e + x)


class SharedConvEncoder(nn.Module):
    """Nine 3x3 convs (+BN2d+ELU) on 28x28x1: ch,ch,ch/2, 2ch,2ch,2ch/2, 4ch,4ch,4ch/2 -> (N, 4ch, 4, 4)."""

    def __init__(self, ch: int, in_channels: int = 1) -> None:
        super().__init__()
        widths = [ch, ch, ch, 2 * ch, 2 * ch, 2 * ch, 4 * ch, 4 * ch, 4 * ch]
        convs, norms = [], []
        c_in = in_channels
        for i, c_out in enumerate(widths):
            stride = 2 if i % 3 == 2 else 1
            convs.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=stride))
            norms.append(nn.BatchNorm2d(c_out))
            c_in = c_out
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(norms)
        self.out_features = 4 * ch * 4 * 4

    def forward(self, x: Tensor) -> Tensor:
        h = x.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
        for conv, bn in zip(self.convs, self.norms):
            h = _act(bn(conv(h)))
        return h


class PreProj(nn.Module):
    """flatten -> Linear(n_features -> W_h) -> BatchNorm1d -> ELU."""

    def __init__(self, n_features: int, hid_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n_features, hid_dim)
        self.bn = nn.BatchNorm1d(hid_dim)

    def forward(self, h: Tensor) -> Tensor:
        return _act(self.bn(self.fc(h.flatten(1))))


class PostPool(nn.Module):
    """2 x [Linear, BN1d, ELU] -> Linear(W_h -> 2 d_c) -> global BN -> (mean, logvar)."""

    def __init__(self, hid_dim: int, c_dim: int) -> None:
        super().__init__()
        self.linears = nn.ModuleList([nn.Linear(hid_dim, hid_dim) for _ in range(2)])
        self.norms = nn.ModuleList([nn.BatchNorm1d(hid_dim) for _ in range(2)])
        self.linear_params = nn.Linear(hid_dim, 2 * c_dim)
        self.bn_params = GlobalBatchNorm()

    def forward(self, e: Tensor) -> Tuple[Tensor, Tensor]:
        for fc, bn in zip(self.linears, self.norms):
            e = _act(bn(fc(e)))
        e = self.bn_params(self.linear_params(e))
        mean, logvar = e.chunk(2, dim=-1)
        return mean, logvar


class SetPool(nn.Module):
    """Aggregates member vectors (B, S, D) -> (B, D) by mean, max or attention (LAG, query = mean).

    Returns (pooled, attention weights (B, heads, S) or None).
    """

    def __init__(self, dim: int, mode: str = "mean") -> None:
        super().__init__()
        if mode not in ("mean", "max", "lag"):
            raise ValueError(f"unknown aggregation {mode!r}")
        self.mode = mode
        self.attention = TBlock(dim) if mode == "lag" else None

    def forward(self, e: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        if self.mode == "mean":
            return e.mean(dim=1), None
        if self.mode == "max":
            return e.max(dim=1).values, None
        return self.attention(e)


class StatisticNetwork(nn.Module):
    """q(c_L | X): pool the members' h (mean / max / attention) -> PostPool -> (mean, logvar) (B, d_c)."""

    def __init__(self, hid_dim: int, c_dim: int, aggregation: str = "mean") -> None:
        super().__init__()
        self.postpool = PostPool(hid_dim, c_dim)
        self.pool = SetPool(hid_dim, aggregation)

    def forward(self, h: Tensor, bs: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        a, att = self.pool(h.view(bs, -1, h.shape[-1]))
        mean, logvar = self.postpool(a)
        return mean, logvar, att


class _ZNet(nn.Module):
    """Shared body of p(z_l | z_{l+1}, c) and q(z_l | h, z_{l+1}, c).

    Additive mode: e = ELU(E_z z + E_c c [+ E_h h]). FiLM mode (HFSGM-LAG): Linear(c) -> (gamma, beta),
    e = ELU(gamma * (E_z z [+ E_h h]) + beta). Then FC residual block -> Linear(W_h -> 2 d_z) -> global BN.
    A missing z (top layer) or c (VAE) contributes zeros (its embedding is not applied).
    """

    def __init__(self, n_res: int, hid_dim: int, c_dim: int, z_dim: int, use_h: bool, film: bool = False) -> None:
        super().__init__()
        self.hid_dim = hid_dim
        self.film = film
        self.linear_h = nn.Linear(hid_dim, hid_dim) if use_h else None
        self.linear_c = nn.Linear(c_dim, (2 if film else 1) * hid_dim)
        self.linear_z = nn.Linear(z_dim, hid_dim)
        self.residual_block = FCResBlock(hid_dim, n_res)
        self.linear_params = nn.Linear(hid_dim, 2 * z_dim)
        self.bn_params = GlobalBatchNorm()

    def _body(self, h: Optional[Tensor], z: Optional[Tensor], c: Optional[Tensor], bs: int, ns: int) -> Tuple[Tensor, Tensor]:
        n = bs * ns
        ref = next(t for t in (h, z, c) if t is not None)
        e = ref.new_zeros(bs, ns, self.hid_dim)
        if z is not None:
            e = e + self.linear_z(z).view(bs, ns, self.hid_dim)
        if h is not None:
            e = e + self.linear_h(h).view(bs, ns, self.hid_dim)
        if c is not None:
            ec = self.linear_c(c).view(bs, 1, -1)
            if self.film:
                gamma, beta = ec.chunk(2, dim=-1)
                e = gamma * e + beta
            else:
                e = e + ec
        e = _act(e.reshape(n, self.hid_dim))
        e = self.residual_block(e)
        e = self.bn_params(self.linear_params(e))
        mean, logvar = e.chunk(2, dim=-1)
        return mean, logvar


class PriorZ(_ZNet):
    """p(z_l | z_{l+1}, c): z (N, d_z) or None, c (B, d_c) or None -> (mean, logvar) (N, d_z)."""

    def __init__(self, n_res: int, hid_dim: int, c_dim: int, z_dim: int, film: bool = False) -> None:
        super().__init__(n_res, hid_dim, c_dim, z_dim, use_h=False, film=film)

    def forward(self, z: Optional[Tensor], c: Optional[Tensor], bs: int, ns: int) -> Tuple[Tensor, Tensor]:
        return self._body(None, z, c, bs, ns)


class PosteriorZ(_ZNet):
    """q(z_l | h, z_{l+1}, c): h (N, W_h) -> (mean, logvar) (N, d_z)."""

    def __init__(self, n_res: int, hid_dim: int, c_dim: int, z_dim: int, film: bool = False) -> None:
        super().__init__(n_res, hid_dim, c_dim, z_dim, use_h=True, film=film)

    def forward(self, h: Tensor, z: Optional[Tensor], c: Optional[Tensor], bs: int, ns: int) -> Tuple[Tensor, Tensor]:
        return self._body(h, z, c, bs, ns)


class _CNet(nn.Module):
    """Shared body of p(c_l | z_{l+1}, c_{l+1}) and q(c_l | H, z_{l+1}, c_{l+1}) (hierarchical models).

    Plain (HFSGM): e_s = ELU(E_z z_s + E_c c [+ E_h h_s]) -> FC residual block -> pool over the set
    (mean/max) -> + E_c c (skip) -> PostPool.
    Attentive (HFSGM-LAG): e_s = E_z z_s + E_c c [+ E_h h_s] -> attention pool (query = set mean) -> PostPool
    (no nonlinearity, no residual block, no skip).
    """

    def __init__(self, n_res: int, hid_dim: int, c_dim: int, z_dim: int, use_h: bool, aggregation: str = "mean") -> None:
        super().__init__()
        self.hid_dim = hid_dim
        self.attentive = aggregation == "lag"
        self.linear_h = nn.Linear(hid_dim, hid_dim) if use_h else None
        self.linear_c = nn.Linear(c_dim, hid_dim)
        self.linear_z = nn.Linear(z_dim, hid_dim)
        self.residual_block = None if self.attentive else FCResBlock(hid_dim, n_res)
        self.pool = SetPool(hid_dim, aggregation)
        self.postpool = PostPool(hid_dim, c_dim)

    def _body(self, h: Optional[Tensor], z: Tensor, c: Tensor, bs: int, ns: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        ec = self.linear_c(c).view(bs, 1, self.hid_dim)
        e = self.linear_z(z).view(bs, ns, self.hid_dim) + ec
        if h is not None:
            e = e + self.linear_h(h).view(bs, ns, self.hid_dim)
        if self.residual_block is not None:
            e = self.residual_block(_act(e.reshape(bs * ns, self.hid_dim))).view(bs, ns, self.hid_dim)
        a, att = self.pool(e)
        if not self.attentive:
            a = a + ec.squeeze(1)
        mean, logvar = self.postpool(a)
        return mean, logvar, att


class PriorC(_CNet):
    """p(c_l | z_{l+1}, c_{l+1}): z (N, d_z), c (B, d_c) -> (mean, logvar) (B, d_c), attention or None."""

    def __init__(self, n_res: int, hid_dim: int, c_dim: int, z_dim: int, aggregation: str = "mean") -> None:
        super().__init__(n_res, hid_dim, c_dim, z_dim, use_h=False, aggregation=aggregation)

    def forward(self, z: Tensor, c: Tensor, bs: int, ns: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        return self._body(None, z, c, bs, ns)


class PosteriorC(_CNet):
    """q(c_l | H, z_{l+1}, c_{l+1}): h (N, W_h), z (N, d_z), c (B, d_c) -> (mean, logvar) (B, d_c), attention."""

    def __init__(self, n_res: int, hid_dim: int, c_dim: int, z_dim: int, aggregation: str = "mean") -> None:
        super().__init__(n_res, hid_dim, c_dim, z_dim, use_h=True, aggregation=aggregation)

    def forward(self, h: Tensor, z: Tensor, c: Tensor, bs: int, ns: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        return self._body(h, z, c, bs, ns)


class ObservationDecoder(nn.Module):
    """p(x | z_{1:L}, c_{1:K}) for 28x28x1 images; returns Bernoulli logits (N, 1, 28, 28).

    ELU(Linear(L d_z -> W_h) zs + Linear(K d_c -> W_h) cs) -> Linear(W_h -> 256*4*4) -> (N, 256, 4, 4)
    -> conv 256, conv 256, convT -> 8, conv 128, conv 128, convT -> 16, conv 64, conv 64 (no padding) -> 14,
    convT -> 28 (each with BN2d + ELU) -> 1x1 conv -> 1 channel.
    """

    def __init__(self, hid_dim: int, z_dim: int, c_dim: int, n_z: int, n_c: int) -> None:
        super().__init__()
        self.hid_dim = hid_dim
        self.linear_zs = nn.Linear(n_z * z_dim, hid_dim)
        self.linear_cs = nn.Linear(n_c * c_dim, hid_dim)
        d = DECODER_CHANNELS
        self.linear_initial = nn.Linear(hid_dim, d * 4 * 4)
        layers = [
            nn.Conv2d(d, d, 3, padding=1),
            nn.Conv2d(d, d, 3, padding=1),
            nn.ConvTranspose2d(d, d, kernel_size=2, stride=2),
            nn.Conv2d(d, d // 2, 3, padding=1),
            nn.Conv2d(d // 2, d // 2, 3, padding=1),
            nn.ConvTranspose2d(d // 2, d // 2, kernel_size=2, stride=2),
            nn.Conv2d(d // 2, d // 4, 3, padding=1),
            nn.Conv2d(d // 4, d // 4, 3, padding=0),
            nn.ConvTranspose2d(d // 4, d // 4, kernel_size=2, stride=2),
        ]
        self.convs = nn.ModuleList(layers)
        self.norms = nn.ModuleList([nn.BatchNorm2d(m.out_channels) for m in layers])
        self.conv_final = nn.Conv2d(d // 4, 1, kernel_size=1)

    def forward(self, zs: Tensor, cs: Optional[Tensor], bs: int, ns: int) -> Tensor:
        e = self.linear_zs(zs).view(bs, ns, self.hid_dim)
        if cs is not None:
            e = e + self.linear_cs(cs).view(bs, 1, self.hid_dim)
        e = _act(e.reshape(bs * ns, self.hid_dim))
        e = self.linear_initial(e).view(bs * ns, DECODER_CHANNELS, 4, 4)
        for conv, bn in zip(self.convs, self.norms):
            e = _act(bn(conv(e)))
        return self.conv_final(e)


def check_fc_config(cfg, model: str) -> None:
    """The FC family is hard-wired to 28x28 binary images (SPEC 2.1, 4)."""
    if cfg.image_size != IMAGE_SIDE or cfg.image_channels != 1 or cfg.likelihood != "bernoulli":
        raise ValueError(
            f"{model} supports only 28x28x1 images with a Bernoulli likelihood, got image_size={cfg.image_size}, "
            f"image_channels={cfg.image_channels}, likelihood={cfg.likelihood!r}; use a conv model for other data"
        )

