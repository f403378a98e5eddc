"""Importance-sampled marginal likelihood: -log p(X) ~ -(logsumexp_k log w_k - log K), per image (nats)."""
from __future__ import annotations

import math
from typing import Dict, Iterable

import torch
from torch import nn


@torch.no_grad()
def marginal_nll(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device, k: int,
                 chunk: int) -> Dict[str, float]:
    """Mean per-image NLL over all sets and its standard error across sets; also the 1-sample NELBO-style
    mean of -log w for comparison (what the reference printed as "NLL (1k)")."""
    model.eval()
    per_set_nll, per_set_single = [], []
    for x in batches:
        x = x.to(device)
        s = x.shape[1]
        log_w = model.log_weights(x, k, chunk=min(chunk, k)).double()  # (K, B)
        bound = torch.logsumexp(log_w, dim=0) - math.log(k)
        per_set_nll.append(-bound / s)
        per_set_single.append(-log_w.mean(0) / s)
    if not per_set_nll:
        raise ValueError("marginal likelihood got no batches")
    nll = torch.cat(per_set_nll)
    single = torch.cat(per_set_single)
    n = nll.numel()
    se = (nll.std(unbiased=True) / math.sqrt(n)).item() if n > 1 else float("nan")
    return {"nll": nll.mean().item(), "nll_se": se, "neg_log_w_mean": single.mean().item(),
            "sets": n, "importance_samples": k}
