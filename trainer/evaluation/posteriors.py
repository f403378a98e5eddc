"""Reading a model's context posteriors q(c_l | X) and its attention weights, for every family of the zoo.

The model contract (models.base.SetModel) exposes ELBO terms and log-weights but not the posterior statistics
the few-shot KL rule needs; until a model defines `context_posteriors(x)` itself (used when present), they are
read here from one inference pass of each family:
- FC family (VAE excluded: no context): `_trace(x).c`;
- conv family (CNS, CHFSGM): `_infer(_encode(x), B, S)`;
- SCHA-VAE: the (mean, logvar) returned by each context block's `posterior_params` during `forward(x)`.
Lower context layers are conditioned on sampled latents above them, so for hierarchical models the statistics
of layers below the top are themselves random (as in the reference classifier, SPEC 7).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor, nn

from trainer.evaluation.common import EvalError

Gaussian = Tuple[Tensor, Tensor]  # (mean, logvar), leading dim = sets


def has_context(model: nn.Module) -> bool:
    return bool(getattr(model, "has_context", True))


def require_context(model: nn.Module, job: str) -> None:
    if not has_context(model):
        raise EvalError(f"eval={job} needs a model with a context latent c; {type(model).__name__} "
                        f"({getattr(getattr(model, 'cfg', None), 'name', '?')}) has none")


@torch.no_grad()
def context_posteriors(model: nn.Module, x: Tensor) -> List[Gaussian]:
    """[(mean, logvar)] of q(c_l | X) per context layer (top first), each (B, ...), for sets x (B, S, C, H, W)."""
    require_context(model, "fewshot")
    if hasattr(model, "context_posteriors"):
        return list(model.context_posteriors(x))
    was_training = model.training
    model.eval()
    try:
        b, s = x.shape[:2]
        if hasattr(model, "_trace"):
            return [(layer.q_mean, layer.q_logvar) for layer in model._trace(x).c]
        if hasattr(model, "_infer") and hasattr(model, "_encode"):
            cs, _, _ = model._infer(model._encode(x), b, s)
            return [(layer.q_mean, layer.q_logvar) for layer in cs]
        if hasattr(model, "blocks_c"):
            return _record_block_posteriors(model, x)
    finally:
        model.train(was_training)
    raise EvalError(f"{type(model).__name__}: cannot read its context posteriors (define context_posteriors(x))")


def _record_block_posteriors(model: nn.Module, x: Tensor) -> List[Gaussian]:
    recorded: List[Gaussian] = []
    blocks = list(model.blocks_c)

    def recorder(original):
        def wrapped(*args, **kwargs):
            mean, logvar, att = original(*args, **kwargs)
            recorded.append((mean, logvar))
            return mean, logvar, att
        return wrapped

    for block in blocks:
        block.posterior_params = recorder(block.posterior_params)  # instance attribute shadows the method
    try:
        model(x)
    finally:
        for block in blocks:
            del block.posterior_params
    if len(recorded) != len(blocks):
        raise EvalError(f"{type(model).__name__}: recorded {len(recorded)} context posteriors for {len(blocks)} layers")
    return recorded


def pairwise_kl(support: List[Gaussian], queries: List[Gaussian]) -> Tensor:
    """score[q, d] = sum_l sum_elements KL(q(c_l | X_d) || q(c_l | x_q)): support (D, ...), queries (Q, ...) -> (Q, D)."""
    if len(support) != len(queries):
        raise ValueError(f"{len(support)} support layers vs {len(queries)} query layers")
    total = None
    for (ms, ls), (mq, lq) in zip(support, queries):
        # float64: posteriors of similar images differ by little, and float32 KLs would round to ties
        ms, ls = ms.double().unsqueeze(0), ls.double().unsqueeze(0)
        mq, lq = mq.double().unsqueeze(1), lq.double().unsqueeze(1)
        kl = 0.5 * (lq - ls + (ls.exp() + (ms - mq) ** 2) / lq.exp() - 1.0)  # KL(N_s || N_q), (Q, D, ...)
        kl = kl.flatten(2).sum(-1)
        total = kl if total is None else total + kl
    return total


@torch.no_grad()
def attention_weights(model: nn.Module, x: Tensor) -> List[Tuple[str, Tensor]]:
    """[(layer label, weights (B, heads, S))] of every attentive aggregation in one inference pass over x.

    Raises EvalError for models without attention (mean / max aggregation, or no context).
    """
    name = getattr(getattr(model, "cfg", None), "name", type(model).__name__)
    aggregation = getattr(getattr(model, "cfg", None), "aggregation", None)
    if not has_context(model) or aggregation != "lag":
        raise EvalError(f"eval=attention needs a LAG model (aggregation=lag: ns_lag, cns_lag, hfsgm_lag, "
                        f"chfsgm_lag, schavae_lag); {name} uses {aggregation or 'no'} aggregation")
    was_training = model.training
    model.eval()
    try:
        extras = model(x).extras
    finally:
        model.train(was_training)
    raw = extras.get("attention_layers") or extras.get("attention")
    if raw is None:
        raise EvalError(f"{name}: the forward pass returned no attention weights")
    if isinstance(raw, Tensor):
        raw = [raw]
    layers = [(f"c{i}", w.float().cpu()) for i, w in enumerate(raw) if w is not None]
    b, s = x.shape[:2]
    for label, w in layers:
        if w.dim() != 3 or w.shape[0] != b or w.shape[2] != s:
            raise EvalError(f"{name}: attention weights of layer {label} have shape {tuple(w.shape)}, "
                            f"expected ({b}, heads, {s})")
    return layers
