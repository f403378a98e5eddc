"""Small latent-variable helpers shared by the models: reparameterised sampling, a record of one
forward pass (posterior/prior statistics per layer), its reduction to ELBO terms or to an importance
log-weight, chunked importance sampling, and an eval/no-grad guard for sampling methods.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, List

import torch
from torch import Tensor, nn

from models.objective import ForwardOutput, gaussian_kl, gaussian_log_prob


# How a training forward draws standard normal noise: `torch.randn_like`, unless trainer/invariant.py lends a draw
# for the global batch (data_parallel=invariant at world size > 1) for the length of a forward. A module global
# read at every draw, rather than a torch function mode, so that torch.compile traces the lent draw too.
draw_normal_like: Callable[[Tensor], Tensor] = torch.randn_like


def normal_like(t: Tensor) -> Tensor:
    """Standard normal noise shaped like `t` (see `draw_normal_like`)."""
    return draw_normal_like(t)


def reparameterize(mean: Tensor, logvar: Tensor) -> Tensor:
    """A sample of N(mean, exp(logvar)) that is differentiable in mean and logvar."""
    return mean + torch.exp(0.5 * logvar) * normal_like(mean)


@dataclass
class Latent:
    """One stochastic layer of a forward pass: the sample drawn from q and the (q, p) Gaussian statistics.

    Sample-level layers are (N, ...) with N = B*S; set-level layers (B, ...).
    """

    sample: Tensor
    q_mean: Tensor
    q_logvar: Tensor
    p_mean: Tensor
    p_logvar: Tensor

    def kl(self) -> Tensor:
        """Analytic KL(q || p), summed over all but the leading dim."""
        return gaussian_kl(self.q_mean, self.q_logvar, self.p_mean, self.p_logvar).flatten(1).sum(-1)

    def log_ratio(self) -> Tensor:
        """Single-sample log p(sample) - log q(sample), summed over all but the leading dim."""
        lp = gaussian_log_prob(self.sample, self.p_mean, self.p_logvar)
        lq = gaussian_log_prob(self.sample, self.q_mean, self.q_logvar)
        return (lp - lq).flatten(1).sum(-1)


def standard_normal_latent(sample: Tensor, q_mean: Tensor, q_logvar: Tensor) -> Latent:
    """A layer whose prior is N(0, I)."""
    return Latent(sample, q_mean, q_logvar, torch.zeros_like(q_mean), torch.zeros_like(q_logvar))


@dataclass
class Trace:
    """Everything one inference pass over a batch of B sets of S images produced (lists top layer first)."""

    x: Tensor  # (B, S, C, H, W)
    params: Tensor  # likelihood parameters (B, S, ...)
    z: List[Latent]
    c: List[Latent] = field(default_factory=list)
    extras: dict = field(default_factory=dict)


def trace_to_output(trace: Trace, likelihood: nn.Module) -> ForwardOutput:
    b, s = trace.x.shape[:2]
    logpx = likelihood.log_prob(trace.params, trace.x)  # (B, S)
    kl_z = [layer.kl().view(b, s) for layer in trace.z]
    kl_c = [layer.kl().view(b) for layer in trace.c]
    return ForwardOutput(logpx=logpx, kl_z=kl_z, kl_c=kl_c, px=trace.params, extras=trace.extras)


def trace_log_weight(trace: Trace, likelihood: nn.Module) -> Tensor:
    """log p(X | z, c) + log p(z, c) - log q(z, c | X) per set, single-sample densities: (B,)."""
    b, s = trace.x.shape[:2]
    logw = likelihood.log_prob(trace.params, trace.x).float().sum(1)
    for layer in trace.z:
        logw = logw + layer.log_ratio().view(b, s).sum(1)
    for layer in trace.c:
        logw = logw + layer.log_ratio().view(b)
    return logw


class eval_mode:
    """Context manager: eval mode (BatchNorm uses running statistics) and no grad; restores the mode after."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.no_grad = torch.no_grad()

    def __enter__(self) -> nn.Module:
        self.was_training = self.module.training
        self.module.eval()
        self.no_grad.__enter__()
        return self.module

    def __exit__(self, *exc) -> None:
        self.no_grad.__exit__(*exc)
        self.module.train(self.was_training)


def no_grad_eval(method: Callable) -> Callable:
    """Decorator for sampling methods: run under `eval_mode(self)`."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with eval_mode(self):
            return method(self, *args, **kwargs)

    return wrapper


def chunked_log_weights(model: nn.Module, trace_fn: Callable[[Tensor], Trace], likelihood: nn.Module,
                        x: Tensor, k: int, chunk: int = 100) -> Tensor:
    """(k, B) importance log-weights: the batch is repeated up to `chunk` times per pass (B -> chunk*B sets).

    Runs in eval mode without gradients, so BatchNorm uses running statistics and the repeats are exact.
    """
    if k < 1 or chunk < 1:
        raise ValueError(f"k and chunk must be >= 1, got k={k}, chunk={chunk}")
    b = x.shape[0]
    out: List[Tensor] = []
    with eval_mode(model):
        done = 0
        while done < k:
            n = min(chunk, k - done)
            xr = x.repeat(n, *([1] * (x.dim() - 1)))  # (n*B, S, ...), copy j of set i at j*B + i
            out.append(trace_log_weight(trace_fn(xr), likelihood).view(n, b))
            done += n
    return torch.cat(out, dim=0)


def to_images(likelihood: nn.Module, params: Tensor, binary: bool = False) -> Tensor:
    """Likelihood parameters -> images: Bernoulli means, or {0,1} draws with binary=True."""
    return likelihood.sample(params, binary=binary)

