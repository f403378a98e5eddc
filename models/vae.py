"""VAE baseline without context (SPEC 3.1): L layers of z, no c; each image is modelled on its own.

Generative: z_L ~ N(0, I); z_l ~ p(z_l | z_{l+1}) (L-1 PriorZ); x ~ Bernoulli(decoder(z_L..z_1)).
Inference: h = PreProj(Encoder(x)); z_L ~ q(z_L | h); z_l ~ q(z_l | h, z_{l+1}) (L PosteriorZ, same h).
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor, nn

from models.base import SetModel
from models.config import ModelConfig
from models.layers_fc import IMAGE_SIDE, ObservationDecoder, PosteriorZ, PreProj, PriorZ, SharedConvEncoder, check_fc_config
from models.likelihoods import Bernoulli
from models.objective import ForwardOutput
from models.sampling import (Latent, Trace, chunked_log_weights, no_grad_eval, reparameterize, standard_normal_latent,
                             to_images, trace_to_output)


class VAE(SetModel):
    has_context = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        check_fc_config(cfg, "VAE")
        w, dz, dc, n_layers = cfg.hidden_dim, cfg.z_dim, cfg.c_dim, cfg.n_stochastic
        self.encoder = SharedConvEncoder(cfg.ch_enc)
        self.proj = PreProj(self.encoder.out_features, w)
        # index 0 = top layer; prior_z[i] is p(z at layer i+1 (counted from the top) | z above)
        self.posterior_z = nn.ModuleList([PosteriorZ(cfg.n_res, w, dc, dz) for _ in range(n_layers)])
        self.prior_z = nn.ModuleList([PriorZ(cfg.n_res, w, dc, dz) for _ in range(n_layers - 1)])
        # the c-embeddings of the z modules and of the decoder exist (reference parity) but are never used
        self.observation_decoder = ObservationDecoder(w, dz, dc, n_layers, 1)
        self.likelihood = Bernoulli(1)

    # ------------------------------------------------------------------ inference
    def _trace(self, x: Tensor) -> Trace:
        bs, ns = x.shape[:2]
        h = self.proj(self.encoder(x))
        layers: List[Latent] = []
        z = None
        for i, posterior in enumerate(self.posterior_z):
            q_mean, q_logvar = posterior(h, z, None, bs, ns)
            z_new = reparameterize(q_mean, q_logvar)
            if i == 0:
                layers.append(standard_normal_latent(z_new, q_mean, q_logvar))
            else:
                p_mean, p_logvar = self.prior_z[i - 1](z, None, bs, ns)
                layers.append(Latent(z_new, q_mean, q_logvar, p_mean, p_logvar))
            z = z_new
        params = self._decode([layer.sample for layer in layers], bs, ns)
        return Trace(x=x, params=params, z=layers)

    def _decode(self, zs: List[Tensor], bs: int, ns: int) -> Tensor:
        logits = self.observation_decoder(torch.cat(zs, dim=-1), None, bs, ns)
        return logits.view(bs, ns, 1, IMAGE_SIDE, IMAGE_SIDE)

    def forward(self, x: Tensor) -> ForwardOutput:
        return trace_to_output(self._trace(x), self.likelihood)

    def log_weights(self, x: Tensor, k: int, chunk: int = 100) -> Tensor:
        return chunked_log_weights(self, self._trace, self.likelihood, x, k, chunk)

    # ------------------------------------------------------------------ sampling
    @no_grad_eval
    def reconstruct(self, x: Tensor, binary: bool = False) -> Tensor:
        """Stochastic reconstruction: decode one posterior sample (Bernoulli means unless binary)."""
        return to_images(self.likelihood, self._trace(x).params, binary)

    @no_grad_eval
    def sample_unconditional(self, num_sets: int, set_size: int, binary: bool = False) -> Tensor:
        ref = next(self.parameters())
        n = num_sets * set_size
        z = torch.randn(n, self.cfg.z_dim, device=ref.device, dtype=ref.dtype)
        zs = [z]
        for prior in self.prior_z:
            p_mean, p_logvar = prior(z, None, num_sets, set_size)
            z = reparameterize(p_mean, p_logvar)
            zs.append(z)
        return to_images(self.likelihood, self._decode(zs, num_sets, set_size), binary)

    def sample_conditional(self, x: Tensor, mode: str = "top", binary: bool = False) -> Tensor:
        raise NotImplementedError("the VAE has no context latent: conditional sampling is undefined")

    def sample_refined(self, x: Tensor, iterations: int = 10, variant: str = "v1", binary: bool = False,
                       return_all: bool = False) -> Tensor:
        raise NotImplementedError("the VAE has no context latent: refined conditional sampling is undefined")
