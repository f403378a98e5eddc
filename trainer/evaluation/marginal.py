"""Importance-sampled marginal likelihood: -log p(X) ~ -(logsumexp_k log w_k - log K), per image (nats).

This is the IWAE bound the paper calls "NLL (1k)", computed with K samples for real (the reference overwrote K
with 1, SPEC 8 item 22). Log-weights come from `model.log_weights(x, K, chunk)` (K, B), reduced with logsumexp
in float64.

Smaller K on the same draws: for every K' in `ks` (each dividing the next, the largest = K) the K draws are cut
into K/K' disjoint groups and the bound is averaged over the groups. That is an unbiased estimate of the K'-sample
bound, and by Jensen's inequality (log of a mean >= mean of logs) the estimated NLL can only go down from one K'
to the next: the table shows how the bound tightens with K, never a noise-made increase.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn


def _mean_se(values: torch.Tensor) -> tuple:
    n = values.numel()
    mean = values.mean().item()
    se = (values.std(unbiased=True) / math.sqrt(n)).item() if n > 1 else float("nan")
    return mean, se


def group_bounds(log_w: torch.Tensor, ks: Sequence[int]) -> Dict[int, torch.Tensor]:
    """log_w (K, B) -> {K': (B,) group-averaged K'-sample bound log p^(X)} for each K' dividing K."""
    k_max, b = log_w.shape
    out = {}
    for k in ks:
        if k_max % k:
            raise ValueError(f"K'={k} does not divide the {k_max} importance samples")
        groups = log_w.view(k_max // k, k, b)
        out[k] = (torch.logsumexp(groups, dim=1) - math.log(k)).mean(0)
    return out


def pass_chunk(chunk: int, k: int, x: torch.Tensor, max_images: int) -> int:
    """Importance samples per forward pass: at most `chunk`, and few enough that one pass holds at most
    `max_images` images (chunk x B x S), so K = 1000 on a batch of 100 sets of 20 does not exhaust memory."""
    return chunk_for(chunk, k, x.shape[0] * x.shape[1], max_images)


def chunk_for(chunk: int, k: int, images: int, max_images: int) -> int:
    """`pass_chunk` for a batch of `images` images (what a job announces before it has a batch)."""
    return max(1, min(chunk, k, max_images // images))


@torch.no_grad()
def marginal_nll(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device, k: int,
                 chunk: int, ks: Optional[Sequence[int]] = None, with_elbo: bool = False,
                 max_images: int = 4096) -> Dict[str, object]:
    """Per-image NLL (mean over sets of -log p^(X) / S) with its standard error across sets, for K and every K'
    of `ks`; `neg_log_w_mean` is the mean of -log w / S (the single-sample estimate the reference printed).

    with_elbo: also the analytic negative ELBO per image on the same sets (one forward pass per batch;
    `nelbo`, `nelbo_se`, and the terms `logpx`, `kl_z`, `kl_c`), to compare the bound with the NLL.
    """
    ks = sorted({kk for kk in (ks or []) if kk < k} | {k})
    was_training = model.training
    model.eval()
    per_k: Dict[int, List[torch.Tensor]] = {kk: [] for kk in ks}
    single: List[torch.Tensor] = []
    elbo_rows: List[torch.Tensor] = []
    for x in batches:
        x = x.to(device)
        s = x.shape[1]
        log_w = model.log_weights(x, k, chunk=pass_chunk(chunk, k, x, max_images)).double()  # (K, B)
        for kk, bound in group_bounds(log_w, ks).items():
            per_k[kk].append(-bound / s)
        single.append(-log_w.mean(0) / s)
        if with_elbo:
            elbo_rows.append(set_elbo_terms(model, x).double() / s)
    model.train(was_training)
    if not single:
        raise ValueError("marginal likelihood got no batches")
    nll, nll_se = _mean_se(torch.cat(per_k[k]))
    out: Dict[str, object] = {"nll": nll, "nll_se": nll_se, "neg_log_w_mean": torch.cat(single).mean().item(),
                              "sets": int(torch.cat(single).numel()), "importance_samples": k}
    out["by_k"] = [dict(zip(("k", "nll", "nll_se"), (kk, *_mean_se(torch.cat(per_k[kk]))))) for kk in ks]
    if with_elbo:
        terms = torch.cat(elbo_rows)  # (sets, 4): vlb, logpx, kl_z, kl_c per image
        out["nelbo"], out["nelbo_se"] = _mean_se(-terms[:, 0])
        for i, name in enumerate(("logpx", "kl_z", "kl_c"), start=1):
            out[name] = terms[:, i].mean().item()
    return out


def set_elbo_terms(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 4) per-set sums of (ELBO, log p(x|.), KL_z, KL_c) from one forward pass (analytic KLs, SPEC 3.11)."""
    out = model(x)
    logpx = out.logpx.float().sum(1)
    kl_z = sum((t.float().sum(1) for t in out.kl_z), torch.zeros_like(logpx))
    kl_c = sum((t.float() for t in out.kl_c), torch.zeros_like(logpx))
    return torch.stack([logpx - kl_z - kl_c, logpx, kl_z, kl_c], dim=1)
