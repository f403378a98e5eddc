"""HFSGM (SPEC 3.6) and HFSGM-LAG (3.7): FC models with a hierarchy of L context latents.

Generative: c_L ~ N(0, I); z_L ~ p(z_L | c_L); for l = L-1..1: c_l ~ p(c_l | z_{l+1}, c_{l+1}) (pools over the
set's z_{l+1}), z_l ~ p(z_l | z_{l+1}, c_l); x ~ p(x | z_{1:L}, c_{1:L}).
Inference: c_L ~ q(c_L | X); z_L ~ q(z_L | h, c_L); c_l ~ q(c_l | H, z_{l+1}, c_{l+1}); z_l ~ q(z_l | h, z_{l+1}, c_l).

HFSGM-LAG: attention statistic, attentive PriorC / PosteriorC (no residual block, no c skip) and
FiLM-conditioned PriorZ / PosteriorZ. Unlike the reference (SPEC 8.12), every sampling mode works.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

from models.layers_fc import PosteriorC, PriorC
from models.ns import NeuralStatistician


class HFSGM(NeuralStatistician):
    hierarchical = True

    def _statistic_aggregation(self) -> str:
        if self.cfg.aggregation == "lag":
            raise ValueError("HFSGM with aggregation='lag' is HFSGM-LAG: use the model 'hfsgm_lag' (HFSGMLAG)")
        return self.cfg.aggregation

    def _context_aggregation(self) -> str:
        return self.cfg.aggregation

    def _build_context_hierarchy(self) -> None:
        cfg, agg = self.cfg, self._context_aggregation()
        args = (cfg.n_res, cfg.hidden_dim, cfg.c_dim, cfg.z_dim)
        # index i-1 serves layer i counted from the top (i = 1..L-1)
        self.prior_c = nn.ModuleList([PriorC(*args, aggregation=agg) for _ in range(cfg.n_stochastic - 1)])
        self.posterior_c = nn.ModuleList([PosteriorC(*args, aggregation=agg) for _ in range(cfg.n_stochastic - 1)])

    def _prior_c(self, i: int, z: Tensor, c: Tensor, bs: int, ns: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        return self.prior_c[i - 1](z, c, bs, ns)

    def _posterior_c(self, i: int, h: Tensor, z: Tensor, c: Tensor, bs: int, ns: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        return self.posterior_c[i - 1](h, z, c, bs, ns)


class HFSGMLAG(HFSGM):
    """HFSGM with attention in every context module and FiLM z modules (requires aggregation='lag')."""

    film = True

    def _statistic_aggregation(self) -> str:
        if self.cfg.aggregation != "lag":
            raise ValueError(
                f"HFSGM-LAG is attentive by construction; got aggregation={self.cfg.aggregation!r} "
                "(set aggregation='lag', or use 'hfsgm' for mean/max pooling)"
            )
        return "lag"

    def _context_aggregation(self) -> str:
        return "lag"
