"""CHFSGM and CHFSGM-LAG (SPEC 3.8, 3.9): a hierarchy over the context with convolutional (d, 4, 4) latents.

Generative model (L layers of both c and z, index 0 = top layer L):
  c_L ~ N(0, I); z_L ~ p(z_L | c_L);
  for l = L-1..1: c_l ~ p(c_l | z_{l+1}, c_{l+1}) (mean-pooled PriorC); z_l ~ p(z_l | z_{l+1}, c_l);
  x ~ p(x | z_{1:L}, c_{1:L}).
Inference: c_L ~ q(c_L | X) (statistic); z_L ~ q(z_L | h, c_L); for l = L-1..1:
  c_l ~ q(c_l | H, z_{l+1}, c_{l+1}) (PosteriorC, conditioned on the posterior samples of the layer above),
  z_l ~ q(z_l | h, z_{l+1}, c_l). The same h feeds every layer.
CHFSGM-LAG (cfg.aggregation == "lag"): ConvLAG in the statistic and in every PosteriorC (no c skip); the prior
over c keeps mean pooling.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

from models.cns import ConvSetModel, evaluation
from models.sampling import Latent, reparameterize, standard_normal_latent
from models.config import ModelConfig
from models.layers_conv import ConvLatentC


class CHFSGM(ConvSetModel):
    """CHFSGM (cfg.aggregation "mean"/"max") and CHFSGM-LAG (cfg.aggregation "lag")."""

    refine_start_mode = "posterior"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, n_context_layers=cfg.n_stochastic)
        c_args = (cfg.hidden_dim, cfg.z_dim, cfg.c_dim, cfg.n_res)
        prior_agg = "max" if cfg.aggregation == "max" else "mean"
        # index i is the context layer i + 1 counted from the top (layer L is the statistic)
        self.prior_c = nn.ModuleList(
            [ConvLatentC(*c_args, with_h=False, aggregation=prior_agg) for _ in range(cfg.n_stochastic - 1)]
        )
        self.posterior_c = nn.ModuleList(
            [ConvLatentC(*c_args, with_h=True, aggregation=cfg.aggregation) for _ in range(cfg.n_stochastic - 1)]
        )

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
        lat = self._z_layer(0, None, c, s, h_z)
        zs: List[Latent] = [lat]
        z = lat.sample
        for l in range(1, self.cfg.n_stochastic):
            pm, plv, _ = self.prior_c[l - 1](z, c, s)
            qm, qlv, a = self.posterior_c[l - 1](z, c, s, h)
            if a is not None:
                att.append(a)
            c = qm if c_mean else reparameterize(qm, qlv)
            cs.append(Latent(c, qm, qlv, pm, plv))
            lat = self._z_layer(l, z, c, s, h_z)
            zs.append(lat)
            z = lat.sample
        return cs, zs, att

    def _generate(self, c_top, s, h=None, attention: Optional[list] = None):
        """z's sampled from the priors; lower contexts are the means of p(c_l | .) or, given the set's features h,
        of q(c_l | H, z_{l+1}, c_{l+1})."""
        c = c_top
        z = self._prior_z_sample(0, None, c, s)
        zs, cs = [z], [c]
        for l in range(1, self.cfg.n_stochastic):
            if h is None:
                c, _, _ = self.prior_c[l - 1](z, c, s)
            else:
                c, _, a = self.posterior_c[l - 1](z, c, s, h)
                if attention is not None and a is not None:
                    attention.append(a)
            z = self._prior_z_sample(l, z, c, s)
            zs.append(z)
            cs.append(c)
        return zs, cs

    @evaluation
    def sample_conditional_hierarchy(self, x: Tensor, binary: bool = False, return_attention: bool = False):
        """SPEC 3.9: contexts from the posterior (means), z's from the priors, decoded L times with the top
        1, 2, ..., L layers of c and z filled in and the others set to zero.

        Returns (L, B, S, C, H, W) images (the last one uses every layer); with return_attention also the
        attention weights [(B, 4, S)], top first (empty for mean aggregation).
        """
        b, s = x.shape[:2]
        h = self._encode(x)
        c_top, _, a = self._statistic(h, b, s)
        attention = [a] if a is not None else []
        zs, cs = self._generate(c_top, s, h, attention=attention)
        outs = []
        for i in range(len(zs)):
            zi = [z if j <= i else torch.zeros_like(z) for j, z in enumerate(zs)]
            ci = [c if j <= i else torch.zeros_like(c) for j, c in enumerate(cs)]
            outs.append(self._to_images(self._decode(zi, ci), b, s, binary))
        images = torch.stack(outs)
        return (images, attention) if return_attention else images
