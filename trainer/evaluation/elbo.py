"""ELBO terms over a whole split: per-image means summed on the device, all-reduced across ranks."""
from __future__ import annotations

from typing import Dict, Iterable

import torch
import torch.distributed as dist
from torch import nn

from models.objective import elbo_terms

TERMS = ("vlb", "logpx", "kl_z", "kl_c")


@torch.no_grad()
def evaluate_elbo(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device,
                  dtype: torch.dtype = torch.float32) -> Dict[str, float]:
    """Per-image ELBO terms (nats) averaged over every image of the split, plus per-layer KLs."""
    was_training = model.training
    model.eval()
    sums = None
    images = torch.zeros((), device=device, dtype=torch.float64)
    for x in batches:
        x = x.to(device, dtype, non_blocking=True)
        n = x.shape[0] * x.shape[1]
        t = elbo_terms(model(x))
        row = torch.cat([torch.stack([t.vlb, t.logpx, t.kl_z, t.kl_c]), t.kl_z_layers, t.kl_c_layers]).double() * n
        sums = row if sums is None else sums + row
        images += n
    model.train(was_training)
    if sums is None:
        raise ValueError("evaluation got no batches: the split is empty for this rank")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
        dist.all_reduce(images)
    means = (sums / images).tolist()  # the one host sync of the evaluation
    out = dict(zip(TERMS, means[:4]))
    n_z = len(t.kl_z_layers)
    out.update({f"kl_z_layer{i}": v for i, v in enumerate(means[4:4 + n_z])})
    out.update({f"kl_c_layer{i}": v for i, v in enumerate(means[4 + n_z:])})
    return out
