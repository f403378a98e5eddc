"""CNS and CNS-LAG (SPEC 3.4, 3.5): the Neural Statistician with convolutional (d, 4, 4) latents.

Generative model of one set X = {x_1..x_S}: c ~ N(0, I) (B, d_c, 4, 4); z_L ~ p(z_L | c);
z_l ~ p(z_l | z_{l+1}, c); x ~ p(x | z_{1:L}, c).
Inference: h = PreProj(Encoder(x)); c ~ q(c | X) (mean pooling, or ConvLAG when cfg.aggregation == "lag");
z_L ~ q(z_L | h, c); z_l ~ q(z_l | h, z_{l+1}, c) (the same h feeds every layer).

`ConvSetModel` holds what the conv family shares (encoder, decoder, likelihood, objective terms, importance
weights and the sampling API); `CHFSGM` (models/chfsgm.py) derives from it too.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from models.base import SetModel
from models.config import ModelConfig
from models.layers_conv import (
    ConvEncoder,
    ConvLatentZ,
    ConvObservationDecoder,
    ConvPreProj,
    ConvStatistic,
)
from models.likelihoods import build_likelihood
from models.objective import ForwardOutput
from models.sampling import Latent, reparameterize, standard_normal_latent


def evaluation(method: Callable) -> Callable:
    """Run a method in eval mode (BatchNorm running statistics) without gradients, restoring the mode after."""

    @functools.wraps(method)
    def wrapper(self: nn.Module, *args, **kwargs):
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return method(self, *args, **kwargs)
        finally:
            self.train(was_training)

    return wrapper


class ConvSetModel(SetModel):
    """Shared machinery of the conv family. Subclasses implement `_infer` and `_generate`."""

    #: conditional mode the refinement starts from
    refine_start_mode = "top"

    def __init__(self, cfg: ModelConfig, n_context_layers: int) -> None:
        super().__init__(cfg)
        if cfg.aggregation not in ("mean", "max", "lag"):
            raise ValueError(f"unsupported aggregation {cfg.aggregation!r}")
        self.likelihood = build_likelihood(cfg.likelihood, cfg.image_channels, cfg.n_mixtures)
        self.encoder = ConvEncoder(cfg.image_channels, cfg.ch_enc, cfg.image_size)
        self.proj = ConvPreProj(self.encoder.out_channels, cfg.hidden_dim)
        self.statistic = ConvStatistic(cfg.hidden_dim, cfg.c_dim, cfg.n_res, cfg.aggregation)
        z_args = (cfg.hidden_dim, cfg.z_dim, cfg.c_dim, cfg.n_res)
        # index 0 = top layer L
        self.prior_z = nn.ModuleList([ConvLatentZ(*z_args, with_h=False) for _ in range(cfg.n_stochastic)])
        self.posterior_z = nn.ModuleList([ConvLatentZ(*z_args, with_h=True) for _ in range(cfg.n_stochastic)])
        self.decoder = ConvObservationDecoder(
            cfg.n_stochastic * cfg.z_dim,
            n_context_layers * cfg.c_dim,
            cfg.hidden_dim,
            cfg.ch_enc,
            self.likelihood.out_channels(),
            cfg.image_size,
        )

    # ------------------------------------------------------------------ pieces
    def _check_input(self, x: Tensor) -> None:
        cfg = self.cfg
        if x.dim() != 5 or tuple(x.shape[2:]) != (cfg.image_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"expected (B, S, {cfg.image_channels}, {cfg.image_size}, {cfg.image_size}) inputs, got {tuple(x.shape)}"
            )

    def _encode(self, x: Tensor) -> Tensor:
        """(B, S, C, H, W) -> h (B*S, W_h, 4, 4)."""
        self._check_input(x)
        return self.proj(self.encoder(x.flatten(0, 1)))

    def _decode(self, zs: List[Tensor], cs: List[Tensor]) -> Tensor:
        """Per-layer z maps (N, d_z, 4, 4) and c maps (B, d_c, 4, 4), top first -> parameters (N, out, H, W)."""
        return self.decoder(torch.cat(zs, dim=1), torch.cat(cs, dim=1))

    def _to_images(self, params: Tensor, b: int, s: int, binary: bool) -> Tensor:
        img = self.likelihood.sample(params, binary=binary)
        return img.reshape(b, s, *img.shape[1:])

    def _statistic(self, h: Tensor, b: int, s: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        return self.statistic(h.view(b, s, *h.shape[1:]))

    def _infer(
        self,
        h: Tensor,
        b: int,
        s: int,
        h_z: Optional[Tensor] = None,
        c_top: Optional[Tensor] = None,
        c_mean: bool = False,
    ) -> Tuple[List[Latent], List[Latent], List[Tensor]]:
        """Posterior pass. h: (B*S, W_h, 4, 4) features of the set.

        h_z: features the z posteriors see (default h; the refinement passes the generated images' features).
        c_top: use this top context instead of a sample of q(c_L | X) (its KL terms are then not meaningful).
        c_mean: use posterior means for the context latents instead of samples.
        Returns (context latents top first, z latents top first, attention weights).
        """
        raise NotImplementedError

    def _generate(self, c_top: Tensor, s: int, h: Optional[Tensor] = None) -> Tuple[List[Tensor], List[Tensor]]:
        """Ancestral pass from a top context (B, d_c, 4, 4): z's sampled from the priors. Returns (zs, cs)."""
        raise NotImplementedError

    def _z_layer(
        self, l: int, z: Optional[Tensor], c: Tensor, s: int, h: Tensor
    ) -> Latent:
        pm, plv = self.prior_z[l](z, c, s)
        qm, qlv = self.posterior_z[l](z, c, s, h)
        return Latent(reparameterize(qm, qlv), qm, qlv, pm, plv)

    def _prior_z_sample(self, l: int, z: Optional[Tensor], c: Tensor, s: int) -> Tensor:
        pm, plv = self.prior_z[l](z, c, s)
        return reparameterize(pm, plv)

    # ------------------------------------------------------------------ objective
    def forward(self, x: Tensor) -> ForwardOutput:
        b, s = x.shape[:2]
        h = self._encode(x)
        cs, zs, att = self._infer(h, b, s)
        params = self._decode([z.sample for z in zs], [c.sample for c in cs])
        logpx = self.likelihood.log_prob(params, x.flatten(0, 1)).view(b, s)
        extras = {"attention": att} if att else {}
        return ForwardOutput(
            logpx=logpx,
            kl_z=[z.kl().view(b, s) for z in zs],
            kl_c=[c.kl() for c in cs],
            px=params.view(b, s, *params.shape[1:]),
            extras=extras,
        )

    @evaluation
    def log_weights(self, x: Tensor, k: int, chunk: int = 100) -> Tensor:
        """log p(X | z, c) + log p(z, c) - log q(z, c | X) per set for k posterior samples: (k, B)."""
        b, s = x.shape[:2]
        h = self._encode(x)
        xf = x.flatten(0, 1)
        out = []
        done = 0
        while done < k:
            m = min(chunk, k - done)
            hr = h.repeat(m, 1, 1, 1)  # m copies of the batch: sets ordered (copy, set)
            cs, zs, _ = self._infer(hr, m * b, s)
            params = self._decode([z.sample for z in zs], [c.sample for c in cs])
            lw = self.likelihood.log_prob(params, xf.repeat(m, 1, 1, 1)).float().view(m, b, s).sum(-1)
            for c in cs:
                lw = lw + c.log_ratio().view(m, b)
            for z in zs:
                lw = lw + z.log_ratio().view(m, b, s).sum(-1)
            out.append(lw)
            done += m
        return torch.cat(out, dim=0)

    # ------------------------------------------------------------------ sampling
    @evaluation
    def reconstruct(self, x: Tensor, binary: bool = False) -> Tensor:
        b, s = x.shape[:2]
        cs, zs, _ = self._infer(self._encode(x), b, s)
        return self._to_images(self._decode([z.sample for z in zs], [c.sample for c in cs]), b, s, binary)

    @evaluation
    def sample_unconditional(self, num_sets: int, set_size: int, binary: bool = False) -> Tensor:
        """c_L ~ N(0, I), then ancestral sampling (means of the context priors, samples of the z priors)."""
        ref = next(self.parameters())
        shape = (num_sets, self.cfg.c_dim, 4, 4)
        c_top = torch.randn(shape, device=ref.device, dtype=ref.dtype)
        zs, cs = self._generate(c_top, set_size)
        return self._to_images(self._decode(zs, cs), num_sets, set_size, binary)

    @evaluation
    def sample_conditional(self, x: Tensor, mode: str = "top", binary: bool = False) -> Tensor:
        """"top": c_L = mean of q(c_L | X), the rest from the priors; "posterior": every c_l = mean of
        q(c_l | H, z_{l+1}, c_{l+1}) with z's from the priors (identical to "top" for a single context layer)."""
        return self._conditional(x, mode, binary)

    def _conditional(self, x: Tensor, mode: str, binary: bool) -> Tensor:
        if mode not in ("top", "posterior"):
            raise ValueError(f"unknown conditional mode {mode!r}: use 'top' or 'posterior'")
        b, s = x.shape[:2]
        h = self._encode(x)
        c_top, _, _ = self._statistic(h, b, s)
        zs, cs = self._generate(c_top, s, h if mode == "posterior" else None)
        return self._to_images(self._decode(zs, cs), b, s, binary)

    @evaluation
    def sample_refined(
        self,
        x: Tensor,
        iterations: int = 10,
        variant: str = "v1",
        binary: bool = False,
        return_all: bool = False,
    ) -> Tensor:
        """Iterative refinement (SPEC 3.12) of a conditional sample x_hat of the set X.

        v1: repeat: c from the given set (posterior means, q(c | X, ...)), z ~ q(z | x_hat, c), decode -> x_hat.
        v2: repeat: X~ = [X, x_hat] (union along the set axis); c, z ~ q(. | X~); decode X~; x_hat = the
            decoded generated half.
        Returns x_hat (B, S, C, H, W), or with return_all every iterate including the start
        (iterations + 1, B, S, C, H, W).
        """
        if variant not in ("v1", "v2"):
            raise ValueError(f"unknown refinement variant {variant!r}: use 'v1' or 'v2'")
        b, s = x.shape[:2]
        x_hat = self._conditional(x, self.refine_start_mode, binary)
        steps = [x_hat]
        h_x = self._encode(x)
        c_top = self._statistic(h_x, b, s)[0] if variant == "v1" else None
        for _ in range(iterations):
            if variant == "v1":
                h_hat = self._encode(x_hat.to(x.dtype))
                cs, zs, _ = self._infer(h_x, b, s, h_z=h_hat, c_top=c_top, c_mean=True)
                params = self._decode([z.sample for z in zs], [c.sample for c in cs])
                x_hat = self._to_images(params, b, s, binary)
            else:
                union = torch.cat([x, x_hat.to(x.dtype)], dim=1)
                cs, zs, _ = self._infer(self._encode(union), b, 2 * s)
                params = self._decode([z.sample for z in zs], [c.sample for c in cs])
                x_hat = self._to_images(params, b, 2 * s, binary)[:, s:]
            steps.append(x_hat)
        return torch.stack(steps) if return_all else x_hat


class ConvNeuralStatistician(ConvSetModel):
    """CNS (cfg.aggregation "mean"/"max") and CNS-LAG (cfg.aggregation "lag"): one context map c."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, n_context_layers=1)

    def _infer(self, h, b, s, h_z=None, c_top=None, c_mean=False):
        h_z = h if h_z is None else h_z
        att: List[Tensor] = []
        if c_top is None:
            qm, qlv, a = self._statistic(h, b, s)
            if a is not None:
                att.append(a)
            c = qm if c_mean else reparameterize(qm, qlv)
            cs = [standard_normal_latent(c, qm, qlv)]
        else:
            c = c_top
            cs = [standard_normal_latent(c, c_top, torch.zeros_like(c_top))]
        zs: List[Latent] = []
        z = None
        for l in range(self.cfg.n_stochastic):
            lat = self._z_layer(l, z, c, s, h_z)
            zs.append(lat)
            z = lat.sample
        return cs, zs, att

    def _generate(self, c_top, s, h=None):
        zs: List[Tensor] = []
        z = None
        for l in range(self.cfg.n_stochastic):
            z = self._prior_z_sample(l, z, c_top, s)
            zs.append(z)
        return zs, [c_top]
