"""SCHA-VAE (SPEC 3.10; the reference's `chfsgm_multiscale`): a VDVAE-style top-down hierarchy with one
set-level context latent c_i and one per-member latent z_i at each of L layers (18 at the paper config,
resolutions 1x1 ... 8x8), aggregation over the set by mean, max or conv attention (LAG).

Differences from the reference, all deliberate:
- The CHFSGM modules the reference inherits but never uses (SPEC 8 item 2) are not built, nor is the
  top context layer's z_proj (it has no z-state to read). What remains is exactly the set of reference
  parameters that get a gradient: 4,761,793 (mean) / 5,653,441 (LAG) at the paper config.
- Bernoulli decoder outputs are logits (the reference applies a sigmoid; same model).
- `sample_conditional(mode="top")` and `sample_refined(variant="v2")` crash in the reference (SPEC 8
  item 13); they are defined here as documented on the methods.
Kept on purpose, because they define the model behind the paper numbers:
- the context prior p(c_i | c_<i) reads only the c-state, never z (SPEC 8 item 3);
- the observation decoder reads the c-state through a nearest resize to 1x1, i.e. its top-left pixel;
- `limit_layer`: layers i > limit_layer draw their latents but do not update the states, except that the
  z-state still receives c_proj(c-state) at every layer (as in the reference).

The top-down pass is written once (`_top_down`) and reused by training, importance weighting and every
sampling mode; per layer it works on whole (B, S) batches, with set aggregation as a reshape + reduce.
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from models.autocast import autocast_dtype
from models.base import SetModel
from models.config import ModelConfig
from models.layers_multiscale import (
    DecBlockC,
    DecBlockZ,
    Encoder,
    ObservationDec,
    TopStates,
    resize,
    resolve_multiscale_strings,
    run_block,
)
from models.likelihoods import build_likelihood
from models.objective import ForwardOutput, gaussian_kl, gaussian_log_prob
from models.sampling import normal_like


def _rename_top_states(state_dict, prefix, *args) -> None:
    """State dicts written before the top states moved into `TopStates` name them x_c / x_z."""
    for key in ("x_c", "x_z"):
        if prefix + key in state_dict:
            state_dict[f"{prefix}top.{key}"] = state_dict.pop(prefix + key)


class SCHAVAE(SetModel):
    """SCHA-VAE; `cfg.aggregation` selects mean / max / lag (SCHA-VAE-LAG).

    Resolution strings come from cfg.str_enc / str_gen / str_dec (defaults: the reference script's, and a
    64-level set for 64x64 inputs, see models.layers_multiscale.DEFAULT_STRINGS_64).
    """

    has_context = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        enc_groups, gen_groups, dec_groups = (
            [(r, n * cfg.depth) for r, n in groups]  # the size ladder's depth multiplier (models/ladder.py)
            for groups in resolve_multiscale_strings(cfg.image_size, cfg.str_enc, cfg.str_gen, cfg.str_dec)
        )
        self.enc_groups, self.gen_groups, self.dec_groups = enc_groups, gen_groups, dec_groups
        # activation checkpointing: one block (encoder / decoder residual block, top-down layer) in every N
        # is recomputed in the backward pass; 0 = off
        self.checkpoint_every = cfg.checkpoint_every if cfg.activation_checkpointing == "blocks" else 0
        width = cfg.hidden_dim
        self.likelihood = build_likelihood(cfg.likelihood, cfg.image_channels, cfg.n_mixtures)
        self.layer_res: List[int] = [r for r, n in gen_groups for _ in range(n)]  # top-down
        self.n_layers = len(self.layer_res)
        self.encoder = Encoder(cfg.image_channels, width, enc_groups, self.checkpoint_every)
        self.blocks_c = nn.ModuleList(
            DecBlockC(width, cfg.c_dim, r, self.n_layers, cfg.aggregation, first=i == 0)
            for i, r in enumerate(self.layer_res)
        )
        self.blocks_z = nn.ModuleList(DecBlockZ(width, cfg.z_dim, r, self.n_layers) for r in self.layer_res)
        self.decoder = ObservationDec(
            width, self.likelihood.out_channels(), dec_groups, cfg.image_size, self.checkpoint_every
        )
        # learned top states (reference: zeros); state-dict keys top.x_c / top.x_z (older x_c / x_z load too)
        self.top = TopStates(width)
        self._register_load_state_dict_pre_hook(_rename_top_states)

    @property
    def x_c(self) -> nn.Parameter:
        """The learned top c-state (1, W_h, 1, 1)."""
        return self.top.x_c

    @property
    def x_z(self) -> nn.Parameter:
        """The learned top z-state (1, W_h, 1, 1)."""
        return self.top.x_z

    # ------------------------------------------------------------------------------------------
    # the top-down pass

    def _top_down(
        self,
        b: int,
        s: int,
        h_c: Optional[Mapping[int, Tensor]],
        h_z: Optional[Mapping[int, Tensor]],
        c_mode: str,
        z_mode: str,
        limit_layer: Optional[int] = None,
        stats: Optional[str] = None,
    ) -> Tuple[Tensor, Tensor, List[Tensor], List[Tensor], List[Tensor]]:
        """Run the L layers for b sets of s members.

        h_c / h_z: encoder features {res: (b*s, W, r, r)} feeding q(c) / q(z) (None when unused).
        c_mode: "q" (all c from q), "top" (first layer from q, the rest from the priors) or "p".
        z_mode: "q" or "p".
        stats: None, "kl" (analytic KL per layer: c (b,), z (b, s)) or "logw" (log p - log q of the
        drawn sample per layer, summed per set: c (b,), z (b,)). Needs the corresponding "q" modes.
        Returns (z-state (b*s, W, r, r), c-state (b, W, r, r), c terms, z terms, attention weights).

        Each layer's noise is drawn before the layer runs (c first, then z: the draws `randn_like` of the
        posterior / prior means would make, in the same order), so that a layer is a deterministic function
        of its inputs and can be recomputed under activation checkpointing (models.layers_multiscale.run_block).
        """
        # copies, not views of the parameters: a recomputed layer 0 must not read parameter storage that
        # ZeRO-3 has released after the forward
        x_c, x_z = self.top(b)
        c_terms: List[Tensor] = []
        z_terms: List[Tensor] = []
        attention: List[Tensor] = []
        for i, r in enumerate(self.layer_res):
            c_from_q = c_mode == "q" or (c_mode == "top" and i == 0)
            eps_c = self._noise((b, self.cfg.c_dim, r, r), x_c)
            eps_z = self._noise((b * s, self.cfg.z_dim, r, r), x_c)
            x_c, x_z, c_term, z_term, att = run_block(
                self.checkpoint_every, i, self._layer, i, x_c, x_z,
                None if h_c is None or not c_from_q else h_c[r], None if h_z is None or z_mode != "q" else h_z[r],
                eps_c, eps_z, s, c_from_q, z_mode == "q", limit_layer is None or i <= limit_layer, stats,
            )
            if att is not None:
                attention.append(att)
            if c_term is not None:
                c_terms.append(c_term)
            if z_term is not None:
                z_terms.append(z_term)
        return x_z, x_c, c_terms, z_terms, attention

    @staticmethod
    def _noise(shape: Tuple[int, ...], like: Tensor) -> Tensor:
        """Standard normal noise of `shape` in the dtype the layer's statistics will have (autocast's when on),
        drawn by `models.sampling.normal_like` (which trainer/invariant.py's shared training noise can lend)."""
        dtype = autocast_dtype(like) or like.dtype
        return normal_like(torch.empty(shape, dtype=dtype, device=like.device))

    def _layer(
        self,
        i: int,
        x_c: Tensor,
        x_z: Tensor,
        h_c: Optional[Tensor],
        h_z: Optional[Tensor],
        eps_c: Tensor,
        eps_z: Tensor,
        s: int,
        c_from_q: bool,
        z_from_q: bool,
        update: bool,
        stats: Optional[str],
    ) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """Top-down layer i (SPEC 3.10 steps 1-10) with the given noise: (c-state, z-state, c term, z term,
        attention weights); the terms are None unless `stats` asks for them (and the latent comes from q)."""
        bc, bz = self.blocks_c[i], self.blocks_z[i]
        r, b = bc.res, x_c.shape[0]
        c_term = z_term = att = None
        # context step
        x_c = resize(x_c, r)
        pm, pv, xpp = bc.prior_params(x_c)
        if c_from_q:
            z_in = None if i == 0 else resize(x_z, r)  # the previous layer's z-state
            qm, qv, att = bc.posterior_params(x_c, h_c, z_in, s)
            c = qm + torch.exp(0.5 * qv) * eps_c
            if stats == "kl":
                c_term = gaussian_kl(qm, qv, pm, pv).flatten(1).sum(1)
            elif stats == "logw":
                c_term = (gaussian_log_prob(c, pm, pv) - gaussian_log_prob(c, qm, qv)).flatten(1).sum(1)
        else:
            c = pm + torch.exp(0.5 * pv) * eps_c
        if update:
            x_c = bc.update(x_c, xpp, c)
        # sample step
        x_z = bz.input_state(x_z, x_c, s)
        pm, pv, xpp = bz.prior_params(x_z)
        if z_from_q:
            qm, qv = bz.posterior_params(x_z, h_z)
            z = qm + torch.exp(0.5 * qv) * eps_z
            if stats == "kl":
                z_term = gaussian_kl(qm, qv, pm, pv).flatten(1).sum(1).view(b, s)
            elif stats == "logw":
                z_term = (gaussian_log_prob(z, pm, pv) - gaussian_log_prob(z, qm, qv)).flatten(1).sum(1).view(b, s).sum(1)
        else:
            z = pm + torch.exp(0.5 * pv) * eps_z
        if update:
            x_z = bz.update(x_z, xpp, z)
        return x_c, x_z, c_term, z_term, att

    def _decode(self, x_z: Tensor, x_c: Tensor, s: int) -> Tensor:
        """States -> likelihood parameters (b, s, C_out, H, W)."""
        return self.decoder(x_z, x_c, s).unflatten(0, (x_c.shape[0], s))

    def _to_images(self, params: Tensor, binary: bool) -> Tensor:
        """(b, s, C_out, H, W) parameters -> (b, s, C, H, W) images in [0, 1]."""
        out = self.likelihood.sample(params.flatten(0, 1), binary=binary)
        return out.unflatten(0, params.shape[:2])

    # ------------------------------------------------------------------------------------------
    # training / evaluation

    def forward(self, x: Tensor, limit_layer: Optional[int] = None) -> ForwardOutput:
        """x (B, S, C, H, W) in [0, 1] -> per-image log p(x|.) (B, S), per-layer KLs (top first)."""
        b, s = x.shape[:2]
        xf = x.flatten(0, 1)
        h = self.encoder(xf)
        x_z, x_c, kl_c, kl_z, attention = self._top_down(b, s, h, h, "q", "q", limit_layer, stats="kl")
        px = self.decoder(x_z, x_c, s)
        logpx = self.likelihood.log_prob(px, xf).view(b, s)
        extras = {"attention": attention} if self.cfg.aggregation == "lag" else {}
        return ForwardOutput(logpx=logpx, kl_z=kl_z, kl_c=kl_c, px=px.unflatten(0, (b, s)), extras=extras)

    def log_weights(self, x: Tensor, k: int, chunk: int = 100) -> Tensor:
        """Importance log-weights log p(X|z,c) + log p(z,c) - log q(z,c|X) per set for k samples: (k, B).

        Single-sample log densities (models.objective.gaussian_log_prob) summed over every c and z layer;
        `chunk` samples at a time by repeating the batch (the deterministic encoder runs once). Eval mode.
        """
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                b, s = x.shape[:2]
                xf = x.flatten(0, 1)
                h_all = self.encoder(xf)
                h = {r: h_all[r] for r in set(self.layer_res)}
                out = []
                for start in range(0, k, chunk):
                    m = min(chunk, k - start)
                    hm = {r: t.repeat(m, 1, 1, 1) for r, t in h.items()}  # layout (m, b, s)
                    x_z, x_c, lw_c, lw_z, _ = self._top_down(m * b, s, hm, hm, "q", "q", stats="logw")
                    px = self.decoder(x_z, x_c, s)
                    logpx = self.likelihood.log_prob(px, xf.repeat(m, 1, 1, 1)).view(m * b, s).sum(1)
                    lw = logpx.float() + torch.stack(lw_c).sum(0) + torch.stack(lw_z).sum(0)
                    out.append(lw.view(m, b))
                return torch.cat(out, 0)
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------------------------------
    # sampling (SPEC 3.12); every method returns (B, S, C, H, W) images in [0, 1]

    @torch.no_grad()
    def reconstruct(self, x: Tensor, binary: bool = False) -> Tensor:
        """Decode the posterior sample of every member of every set."""
        return self._to_images(self.forward(x).px, binary)

    @torch.no_grad()
    def sample_unconditional(self, num_sets: int, set_size: int, binary: bool = False) -> Tensor:
        """Learned top states, then ancestral sampling of every c and z from the priors."""
        x_z, x_c, *_ = self._top_down(num_sets, set_size, None, None, "p", "p")
        return self._to_images(self._decode(x_z, x_c, set_size), binary)

    @torch.no_grad()
    def sample_conditional(self, x: Tensor, mode: str = "posterior", binary: bool = False) -> Tensor:
        """S new members for each given set X (B, S, ...).

        mode "posterior": every c_i ~ q(c_i | X, c-state, z-state) with every z_i from its prior (the
        reference's conditional_sample_cq). mode "top": only the first (top, 1x1) context layer from
        q(c_1 | X); every later c_i and every z_i from the priors (the reference's cqL, which crashes
        for SCHA-VAE: SPEC 8 item 13).
        """
        if mode not in ("posterior", "top"):
            raise ValueError(f"mode must be 'posterior' or 'top', got {mode!r}")
        b, s = x.shape[:2]
        h = self.encoder(x.flatten(0, 1))
        x_z, x_c, *_ = self._top_down(b, s, h, None, "q" if mode == "posterior" else "top", "p")
        return self._to_images(self._decode(x_z, x_c, s), binary)

    @torch.no_grad()
    def sample_refined(
        self, x: Tensor, iterations: int = 10, variant: str = "v1", binary: bool = False, return_all: bool = False
    ) -> Tensor:
        """Iterative refinement of a conditional sample x̂ (SPEC 3.12; paper Algorithm 1).

        Start: x̂ = sample_conditional(X, "posterior"). Each iteration:
        v1: c_i ~ q(c_i | X, ...) from the given set (with the z-state of x̂'s inference), z_i ~ q(z_i | x̂, .),
            decode -> new x̂ (the reference's mcmc_v1);
        v2: the union X̃ = [X, x̂] (2S members) is one set: c and every z from q(. | X̃), decode, and the
            members at x̂'s positions become the new x̂ (the reference's mcmc_v2 with use_q, which crashes).
        Returns the final x̂ (B, S, C, H, W), or with return_all every iterate (iterations + 1, B, S, C, H, W),
        the initial conditional sample first.
        """
        if variant not in ("v1", "v2"):
            raise ValueError(f"variant must be 'v1' or 'v2', got {variant!r}")
        b, s = x.shape[:2]
        h_x = self.encoder(x.flatten(0, 1))
        x_z, x_c, *_ = self._top_down(b, s, h_x, None, "q", "p")
        x_hat = self._to_images(self._decode(x_z, x_c, s), binary)
        iterates = [x_hat]
        for _ in range(iterations):
            h_hat = self.encoder(x_hat.flatten(0, 1))
            if variant == "v1":
                x_z, x_c, *_ = self._top_down(b, s, h_x, h_hat, "q", "q")
            else:
                h_u = {
                    r: torch.cat([h_x[r].unflatten(0, (b, s)), h_hat[r].unflatten(0, (b, s))], 1).flatten(0, 1)
                    for r in set(self.layer_res)
                }
                x_z, x_c, *_ = self._top_down(b, 2 * s, h_u, h_u, "q", "q")
                x_z = x_z.unflatten(0, (b, 2 * s))[:, s:].flatten(0, 1)  # decode only x̂'s positions
            x_hat = self._to_images(self._decode(x_z, x_c, s), binary)
            iterates.append(x_hat)
        return torch.stack(iterates) if return_all else x_hat
