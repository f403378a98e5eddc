"""Neural Statistician (SPEC 3.2) and NS-LAG (3.3, aggregation="lag"), and the shared FC machinery of the
hierarchical FC models (HFSGM / HFSGM-LAG in models/hfsgm.py subclass this and switch `hierarchical` on).

Generative (NS): c ~ N(0, I); z_L ~ p(z_L | c); z_l ~ p(z_l | z_{l+1}, c); x ~ p(x | z_{1:L}, c).
Inference (NS): h = PreProj(Encoder(x)); c ~ q(c | X) (statistic: mean/max/attention pooling of h);
z_L ~ q(z_L | h, c); z_l ~ q(z_l | h, z_{l+1}, c) (the same h at every layer).
Hierarchical: for l < L also c_l ~ p(c_l | z_{l+1}, c_{l+1}) / q(c_l | H, z_{l+1}, c_{l+1}), and z_l is
conditioned on c_l; the decoder reads every c_l.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from models.base import SetModel
from models.config import ModelConfig
from models.layers_fc import (IMAGE_SIDE, ObservationDecoder, PosteriorZ, PreProj, PriorZ, SharedConvEncoder,
                              StatisticNetwork, check_fc_config)
from models.likelihoods import Bernoulli
from models.objective import ForwardOutput
from models.sampling import (Latent, Trace, chunked_log_weights, no_grad_eval, reparameterize, standard_normal_latent,
                             to_images, trace_to_output)

SAMPLE_MODES = ("top", "posterior")
REFINE_VARIANTS = ("v1", "v2")


class NeuralStatistician(SetModel):
    """NS with mean/max pooling in q(c|X), or NS-LAG with cfg.aggregation == "lag"."""

    #: a hierarchy of L context layers (HFSGM) instead of one
    hierarchical: bool = False
    #: FiLM conditioning of the z modules on c (HFSGM-LAG)
    film: bool = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        check_fc_config(cfg, type(self).__name__)
        w, dz, dc, n_layers = cfg.hidden_dim, cfg.z_dim, cfg.c_dim, cfg.n_stochastic
        self.encoder = SharedConvEncoder(cfg.ch_enc)
        self.proj = PreProj(self.encoder.out_features, w)
        self.statistic = StatisticNetwork(w, dc, self._statistic_aggregation())
        # index 0 = top layer (L), index L-1 = bottom layer (1)
        self.posterior_z = nn.ModuleList([PosteriorZ(cfg.n_res, w, dc, dz, film=self.film) for _ in range(n_layers)])
        self.prior_z = nn.ModuleList([PriorZ(cfg.n_res, w, dc, dz, film=self.film) for _ in range(n_layers)])
        self._build_context_hierarchy()
        n_c = n_layers if self.hierarchical else 1
        self.observation_decoder = ObservationDecoder(w, dz, dc, n_layers, n_c)
        self.likelihood = Bernoulli(1)

    # hooks for the hierarchical subclasses -------------------------------------------------------
    def _statistic_aggregation(self) -> str:
        return self.cfg.aggregation

    def _build_context_hierarchy(self) -> None:
        """NS has a single context latent; HFSGM adds prior_c / posterior_c here."""

    def _prior_c(self, i: int, z: Tensor, c: Tensor, bs: int, ns: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        raise NotImplementedError

    def _posterior_c(self, i: int, h: Tensor, z: Tensor, c: Tensor, bs: int, ns: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared pieces
    @property
    def n_layers(self) -> int:
        return self.cfg.n_stochastic

    def _encode(self, x: Tensor) -> Tensor:
        return self.proj(self.encoder(x))

    def _decode(self, zs: List[Tensor], cs: List[Tensor], bs: int, ns: int) -> Tensor:
        logits = self.observation_decoder(torch.cat(zs, dim=-1), torch.cat(cs, dim=-1), bs, ns)
        return logits.view(bs, ns, 1, IMAGE_SIDE, IMAGE_SIDE)

    def _top_down_posterior(self, h_z: Tensor, h_c: Tensor, c_top: Tensor, bs: int, ns: int,
                            with_priors: bool = True) -> Tuple[List[Latent], List[Latent], List[Optional[Tensor]]]:
        """Top-down inference given the top context sample c_top (B, d_c).

        h_z feeds q(z_l | .), h_c feeds q(c_l | H, .) (the same h during training; the refinement of SPEC 3.12
        uses the generated set for z and the given set for c). Returns z layers, lower c layers (l < L) and the
        attention weights of q(c_l | .) (None for mean/max pooling). Without priors, p-statistics are q's copies.
        """
        z_layers: List[Latent] = []
        c_layers: List[Latent] = []
        attn: List[Optional[Tensor]] = []
        c, z = c_top, None
        for i in range(self.n_layers):
            if i > 0 and self.hierarchical:
                q_mean, q_logvar, att = self._posterior_c(i, h_c, z, c, bs, ns)
                c_new = reparameterize(q_mean, q_logvar)
                if with_priors:
                    p_mean, p_logvar, _ = self._prior_c(i, z, c, bs, ns)
                else:
                    p_mean, p_logvar = q_mean, q_logvar
                c_layers.append(Latent(c_new, q_mean, q_logvar, p_mean, p_logvar))
                attn.append(att)
                c = c_new
            q_mean, q_logvar = self.posterior_z[i](h_z, z, c, bs, ns)
            z_new = reparameterize(q_mean, q_logvar)
            if with_priors:
                p_mean, p_logvar = self.prior_z[i](z, c, bs, ns)
            else:
                p_mean, p_logvar = q_mean, q_logvar
            z_layers.append(Latent(z_new, q_mean, q_logvar, p_mean, p_logvar))
            z = z_new
        return z_layers, c_layers, attn

    def _trace(self, x: Tensor) -> Trace:
        """Full inference pass (posterior samples, priors evaluated at the posterior parents)."""
        bs, ns = x.shape[:2]
        h = self._encode(x)
        c_mean, c_logvar, att_top = self.statistic(h, bs)
        c_top = standard_normal_latent(reparameterize(c_mean, c_logvar), c_mean, c_logvar)
        z_layers, c_lower, attn = self._top_down_posterior(h, h, c_top.sample, bs, ns)
        c_layers = [c_top] + c_lower
        params = self._decode([l.sample for l in z_layers], [l.sample for l in c_layers], bs, ns)
        extras = {}
        if att_top is not None:
            extras["attention"] = att_top
        if any(a is not None for a in attn):
            extras["attention_layers"] = [att_top] + attn
        return Trace(x=x, params=params, z=z_layers, c=c_layers, extras=extras)

    def forward(self, x: Tensor) -> ForwardOutput:
        return trace_to_output(self._trace(x), self.likelihood)

    def log_weights(self, x: Tensor, k: int, chunk: int = 100) -> Tensor:
        return chunked_log_weights(self, self._trace, self.likelihood, x, k, chunk)

    # ------------------------------------------------------------------ sampling (SPEC 3.12)
    def _generate(self, c_top: Tensor, bs: int, ns: int, h_c: Optional[Tensor] = None) -> Tensor:
        """Ancestral sampling below a given top context: z from the priors (samples); lower c's are the
        means of p(c_l | z_{l+1}, c_{l+1}) or, when h_c is given, of q(c_l | H, z_{l+1}, c_{l+1})."""
        cs, zs = [c_top], []
        c, z = c_top, None
        for i in range(self.n_layers):
            if i > 0 and self.hierarchical:
                if h_c is None:
                    c, _, _ = self._prior_c(i, z, c, bs, ns)
                else:
                    c, _, _ = self._posterior_c(i, h_c, z, c, bs, ns)
                cs.append(c)
            p_mean, p_logvar = self.prior_z[i](z, c, bs, ns)
            z = reparameterize(p_mean, p_logvar)
            zs.append(z)
        return self._decode(zs, cs, bs, ns)

    @no_grad_eval
    def reconstruct(self, x: Tensor, binary: bool = False) -> Tensor:
        """Stochastic reconstruction: decode one posterior sample (Bernoulli means unless binary)."""
        return to_images(self.likelihood, self._trace(x).params, binary)

    @no_grad_eval
    def sample_unconditional(self, num_sets: int, set_size: int, binary: bool = False) -> Tensor:
        """c_L ~ N(0, I), then ancestral sampling (means of the lower c priors, z samples)."""
        ref = next(self.parameters())
        c_top = torch.randn(num_sets, self.cfg.c_dim, device=ref.device, dtype=ref.dtype)
        return to_images(self.likelihood, self._generate(c_top, num_sets, set_size), binary)

    @no_grad_eval
    def sample_conditional(self, x: Tensor, mode: str = "top", binary: bool = False) -> Tensor:
        """c_L = mean of q(c_L | X); "top": lower c's from the priors; "posterior": lower c's = means of
        q(c_l | H, z_{l+1}, c_{l+1}) with z's drawn from the priors. One generated image per member of X."""
        if mode not in SAMPLE_MODES:
            raise ValueError(f"mode must be one of {SAMPLE_MODES}, got {mode!r}")
        bs, ns = x.shape[:2]
        h = self._encode(x)
        c_top, _, _ = self.statistic(h, bs)
        params = self._generate(c_top, bs, ns, h_c=h if mode == "posterior" else None)
        return to_images(self.likelihood, params, binary)

    @no_grad_eval
    def sample_refined(self, x: Tensor, iterations: int = 10, variant: str = "v1", binary: bool = False,
                       return_all: bool = False) -> Tensor:
        """Iterative refinement (SPEC 3.12) starting from a conditional sample x_hat.

        v1: repeat: z ~ q(z | x_hat, c) with c from the given set X (c_L = mean of q(c_L|X); lower c's sampled
            from q(c_l | H_X, z_{l+1}, c_{l+1})), decode -> new x_hat.
        v2: repeat: full inference on the union X u x_hat (c re-inferred from both), decode, keep the x_hat part.
        Returns (B, S, C, H, W), or (iterations + 1, B, S, C, H, W) with every iterate when return_all.
        """
        if variant not in REFINE_VARIANTS:
            raise ValueError(f"variant must be one of {REFINE_VARIANTS}, got {variant!r}")
        bs, ns = x.shape[:2]
        x_hat = self.sample_conditional(x, mode="posterior" if self.hierarchical else "top", binary=binary)
        iterates = [x_hat]
        h_x = self._encode(x)
        c_top, _, _ = self.statistic(h_x, bs)
        for _ in range(iterations):
            if variant == "v1":
                z_layers, c_lower, _ = self._top_down_posterior(self._encode(x_hat), h_x, c_top, bs, ns,
                                                                with_priors=False)
                params = self._decode([l.sample for l in z_layers], [c_top] + [l.sample for l in c_lower], bs, ns)
            else:
                params = self._trace(torch.cat([x, x_hat.to(x.dtype)], dim=1)).params[:, ns:]
            x_hat = to_images(self.likelihood, params, binary)
            iterates.append(x_hat)
        return torch.stack(iterates) if return_all else x_hat
