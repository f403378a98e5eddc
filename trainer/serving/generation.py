"""Few-shot generation from one given set: N new members (conditional or refined sampling, SPEC 3.12) and the
set's per-image ELBO. Shared by `launch.generate` and the served model (trainer/serving/pyfunc.py)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from tqdm import tqdm

from trainer.run.errors import Refused

MODES = ("conditional", "refined")
MAX_SAMPLES = 1024
# A served request's work, counted in FLOPs of the model's own forward pass (measured per model and set size:
# `flops_per_image`): images drawn x passes over them (1; 1 + iterations when refined) + the given set's ELBO.
# 2e11 is about 10 s on a 2-core CPU (the demo SCHA-VAE forward runs at ~10-25 GFLOP/s there), well inside
# MLflow's 60 s request timeout; `launch.serve max_request_flops=` changes it (docs/serving.md).
MAX_REQUEST_FLOPS = 2e11


class GenerationError(Refused, ValueError):
    """A request the model cannot serve; the message says which value and why."""

    label = "request error"


def check_request(model: nn.Module, samples: int, mode: str, iterations: int) -> None:
    from trainer.evaluation.posteriors import has_context

    if not has_context(model):
        raise GenerationError(f"model {model.cfg.name!r} has no context (a plain VAE): it cannot condition on a set")
    if not 1 <= samples <= MAX_SAMPLES:
        raise GenerationError(f"samples must be in 1..{MAX_SAMPLES}, got {samples}")
    if mode not in MODES:
        raise GenerationError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not 0 <= iterations <= 100:
        raise GenerationError(f"iterations must be in 0..100, got {iterations}")


@torch.no_grad()
def flops_per_image(model: nn.Module, x: Tensor) -> float:
    """FLOPs of the model's forward pass per image of a set shaped like x (S, C, H, W), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
        model(torch.zeros_like(x).unsqueeze(0))
    return counter.get_total_flops() / x.shape[0]


def request_flops(per_image: float, set_size: int, samples: int, mode: str, iterations: int) -> float:
    """A request's work: every sampling pass draws whole copies of the set (generate), refined ones 1 +
    iterations times, and the set's ELBO is one forward."""
    images = math.ceil(samples / set_size) * set_size
    passes = 1 + (iterations if mode == "refined" else 0)
    return per_image * (images * passes + set_size)


def check_cost(per_image: float, set_size: int, samples: int, mode: str, iterations: int, limit: float) -> None:
    cost = request_flops(per_image, set_size, samples, mode, iterations)
    if cost > limit:
        passes = 1 + (iterations if mode == "refined" else 0)
        raise GenerationError(
            f"the request's work is {cost:.3g} FLOPs ({math.ceil(samples / set_size) * set_size} images x {passes} "
            f"pass(es) + the set's ELBO, at {per_image:.3g} FLOPs per image of this model), above the limit of "
            f"{limit:.3g} per request: ask for fewer samples or iterations")


@torch.no_grad()
def set_elbo(model: nn.Module, x: Tensor) -> Tensor:
    """Per-image ELBO (nats) of the members of one set x (S, C, H, W): log p(x_s|.) - KL_z(s) - KL_c / S."""
    out = model(x.unsqueeze(0))
    s = x.shape[0]
    elbo = out.logpx.float()
    for kl in out.kl_z:
        elbo = elbo - kl.float()
    for kl in out.kl_c:
        elbo = elbo - kl.float().unsqueeze(-1) / s
    return elbo[0]


@torch.no_grad()
def generate(model: nn.Module, x: Tensor, samples: int, mode: str = "conditional", iterations: int = 10,
             sets_per_pass: int = 8, progress: bool = False) -> Tensor:
    """`samples` new members (N, C, H, W) in [0, 1] of the set x (S, C, H, W).

    Every sampling pass draws S members per copy of the set, each copy with its own context sample, so the
    set is repeated ceil(N / S) times, `sets_per_pass` copies per forward pass."""
    check_request(model, samples, mode, iterations)
    s = x.shape[0]
    copies = math.ceil(samples / s)
    out = []
    with tqdm(total=samples, desc=f"{mode} samples", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, copies, sets_per_pass):
            xs = x.unsqueeze(0).repeat(min(sets_per_pass, copies - start), 1, 1, 1, 1)
            if mode == "conditional":
                y = model.sample_conditional(xs, mode="posterior")
            else:
                y = model.sample_refined(xs, iterations=iterations, variant="v1")
            out.append(y.flatten(0, 1).float())
            bar.update(min(y.shape[0] * s, samples - bar.n))
    return torch.cat(out)[:samples].clamp_(0.0, 1.0)
