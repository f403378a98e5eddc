"""World-size-invariant data parallelism (`trainer.data_parallel=invariant`): what makes W processes that each
hold a slice of the global batch compute what one process computes on the whole of it.

Three things would otherwise differ, besides the data (trainer/batching.py slices one global batch):

1. **BatchNorm statistics** in training mode are those of the batch a process sees. `replace_batchnorm`
   puts in every BatchNorm layer's place a `PreciseBatchNorm` whose mean and variance are those of the global
   batch (torch's `nn.SyncBatchNorm` refuses CPU tensors; this one works over any backend, gloo included).
   Parameter and buffer names are unchanged, so checkpoints and exported state dicts do not depend on the world
   size. (bf16 training uses the same layer without sync, for its float32 statistics: trainer/engine.py.)
2. **Sampling noise** (the reparameterisation draws, `models.sampling.normal_like`) comes from a process's random
   stream. `SharedNoise` gives training its own stream, identical on every rank and saved in checkpoints, lent to
   the default generator for the length of a training forward: at W = 1 the draws are exactly `randn_like` on
   it; at W > 1 the models' draws are lent a draw made for the global batch (leading dimension W times the local
   one) of which the rank keeps its slice -- the slice one process would have drawn for the same sets, because
   rank r holds sets [r m, (r+1) m) of each global micro batch and per-image tensors are set-major. The lending
   goes through a module global that a compiled forward traces (trainer/compiled.py); in an eager forward a torch
   function mode also draws any direct `randn_like` / `rand_like` for the global batch and refuses other random
   ops at W > 1.
3. **Gradient clamping** must act on the reduced gradient: see `trainer/engine.py`.

Evaluation (model.eval()) is untouched: running BatchNorm statistics, the process's own random stream.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from models import sampling
from trainer.distributed import World


# -- 1. BatchNorm over the global batch --------------------------------------------------------------------
class _GatherRows(torch.autograd.Function):
    """Differentiable all-gather of a 1-D tensor into (world size, n); the gradient of row r goes to rank r
    after summing every rank's gradient of the gathered tensor."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.new_empty(dist.get_world_size() * t.numel())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.14
        gather(out, t.contiguous())
        return out.view(dist.get_world_size(), t.numel())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[dist.get_rank()]


class PreciseBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (input rank >= 2) that normalises in float32 whatever the input dtype, with float32 running
    statistics (so bf16 training works on every device and the running statistics keep their precision), and
    with `sync=True` uses the statistics of every rank's batch together in training mode.

    The sync path all-gathers each rank's (count, mean, centred sum of squares) per channel and combines them
    exactly (Chan et al.), one differentiable collective per call on any backend, gloo included; it matches one
    process on the concatenated batch to float precision. Evaluation uses the running statistics.
    """

    def __init__(self, *args, sync: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sync = sync

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _factor(self) -> float:
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / float(self.num_batches_tracked)
        return self.momentum or 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        weight = self.weight.float() if self.affine else None
        bias = self.bias.float() if self.affine else None
        use_batch = self.training or self.running_mean is None
        if not (use_batch and self.sync and dist.is_initialized() and dist.get_world_size() > 1):
            keep = not self.training or self.track_running_stats  # as nn.BatchNorm: buffers used or updated
            return F.batch_norm(x.float(), self.running_mean if keep else None, self.running_var if keep else None,
                                weight, bias, use_batch, self._factor(), self.eps).to(x.dtype)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        n_local = x.numel() // c
        mean_local = xf.mean(dims)
        shape = [1, c] + [1] * (x.dim() - 2)
        m2_local = (xf - mean_local.view(shape)).square().sum(dims)
        rows = _GatherRows.apply(torch.cat([mean_local.new_full((1,), float(n_local)), mean_local, m2_local]).double())
        n_r, mean_r, m2_r = rows[:, :1], rows[:, 1:c + 1], rows[:, c + 1:]
        n = n_r.sum()
        mean = (n_r * mean_r).sum(0) / n
        var = (m2_r.sum(0) + (n_r * (mean_r - mean).square()).sum(0)) / n  # biased, what training normalises with
        y = (xf - mean.float().view(shape)) * torch.rsqrt(var.float().view(shape) + self.eps)
        if self.affine:
            y = y * weight.view(shape) + bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                f = self._factor()
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.mul_(1 - f).add_(mean.to(self.running_mean.dtype), alpha=f)
                self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)
        return y.to(x.dtype)


def replace_batchnorm(module: nn.Module, sync: bool) -> nn.Module:
    """Every BatchNorm layer of `module` replaced by a `PreciseBatchNorm` (global-batch statistics when `sync`).
    Parameters, buffers and their names stay -- the very same Parameter objects, so hooks registered on them
    stay too -- and checkpoints and exported state dicts do not change."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, PreciseBatchNorm):
        new = PreciseBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, sync=sync)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = replace_batchnorm(child, sync)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


# -- 2. one noise stream for the global batch ----------------------------------------------------------
_SAMPLERS = {torch.randn_like: torch.randn, torch.rand_like: torch.rand}
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
             torch.dropout, torch.feature_dropout, torch.alpha_dropout, torch.feature_alpha_dropout}
_OTHER_RANDOM = {
    torch.randn, torch.rand, torch.randint, torch.randint_like, torch.randperm, torch.normal, torch.bernoulli,
    torch.multinomial, torch.poisson, torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.bernoulli_,
    torch.Tensor.bernoulli, torch.Tensor.exponential_, torch.Tensor.random_, torch.Tensor.cauchy_,
    torch.Tensor.geometric_, torch.Tensor.log_normal_, torch.Tensor.multinomial,
}


def _dense_but_permuted(t: torch.Tensor) -> bool:
    """Non-contiguous yet dense: randn_like would fill it in memory order, not in index order."""
    if t.is_contiguous():
        return False
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class _GlobalDraws(TorchFunctionMode):
    def __init__(self, noise: "SharedNoise") -> None:
        super().__init__()
        self.noise = noise

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.noise.drawing:  # the global draw itself
            return func(*args, **kwargs)
        if func in _SAMPLERS:
            return self.noise.draw(_SAMPLERS[func], *args, **kwargs)
        if func in _DROPOUTS:
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            training = args[2] if len(args) > 2 else kwargs.get("training", kwargs.get("train", True))
            if training and p > 0:
                self.noise.unsupported(func)
        elif func in _OTHER_RANDOM:
            self.noise.unsupported(func)
        return func(*args, **kwargs)


class SharedNoise:
    """The training forward's random stream, the same on every rank and independent of the world size.

    Installed as forward hooks on the model: active only while the model is in training mode.
    `state_dict()` / `load_state_dict()` carry the stream across checkpoints (any world size).
    """

    def __init__(self, model: nn.Module, world: World, seed: int) -> None:
        self.rank, self.world_size, self.device = world.rank, world.world_size, world.device
        self.generator = torch.Generator(device=world.device)
        # a stream of its own, not the one that initialised the weights
        self.generator.manual_seed(int(np.random.SeedSequence([seed, 0x5E7]).generate_state(1, np.uint64)[0] >> 1))
        self._mode: Optional[_GlobalDraws] = None
        self.drawing = False
        self._normal_like = functools.partial(self.draw, torch.randn)  # one object: a compiled forward guards on it
        self._lent = None
        self._saved: Optional[torch.Tensor] = None
        self._active = False
        model.register_forward_pre_hook(self._enter)
        model.register_forward_hook(self._exit, always_call=True)

    def _default_generator(self) -> torch.Generator:
        if self.device.type == "cuda":
            return torch.cuda.default_generators[self.device.index or 0]
        return torch.default_generator

    def _enter(self, module: nn.Module, args) -> None:
        if not module.training or self._active:
            return
        self._active = True
        # the forward's draws come from the default generator, lent this stream for the forward: at W = 1 they are
        # randn_like's own; at W > 1 each is a draw for the global batch. No generator object reaches the forward,
        # so a compiled forward (trainer/compiled.py) traces the draws
        default = self._default_generator()
        self._saved = default.get_state()
        default.set_state(self.generator.get_state())
        if self.world_size > 1:
            # the models' draws (models.sampling.normal_like) are lent the global-batch draw; the mode catches
            # other random ops in an eager forward (torch.compile traces the lent draw but not the mode)
            self._lent, sampling.draw_normal_like = sampling.draw_normal_like, self._normal_like
            self._mode = _GlobalDraws(self)
            self._mode.__enter__()

    def _exit(self, module: nn.Module, args, output) -> None:
        if not self._active:
            return
        self._active = False
        if self.world_size > 1:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
            sampling.draw_normal_like, self._lent = self._lent, None
        default = self._default_generator()
        self.generator.set_state(default.get_state())
        default.set_state(self._saved)
        self._saved = None

    def draw(self, sampler, t: torch.Tensor, *, dtype=None, device=None, layout=None, pin_memory=None,
             requires_grad: bool = False, memory_format=None) -> torch.Tensor:
        """This rank's slice of `sampler` drawn for the global batch (`t` is this rank's part of it)."""
        if t.dim() == 0 or _dense_but_permuted(t):
            raise RuntimeError(
                "trainer.data_parallel=invariant draws noise for the global batch along the leading dimension; "
                f"got randn_like/rand_like of a tensor with shape {tuple(t.shape)} and strides {t.stride()}. "
                "Draw noise like a contiguous (batch, ...) tensor, or use trainer.data_parallel=sharded")
        shape = (self.world_size * t.shape[0], *t.shape[1:])
        self.drawing = True
        try:
            full = sampler(shape, dtype=dtype or t.dtype, device=device or t.device)  # the lent default generator
        finally:
            self.drawing = False
        part = full[self.rank * t.shape[0]:(self.rank + 1) * t.shape[0]]
        return part.requires_grad_(requires_grad) if requires_grad else part

    def unsupported(self, func) -> None:
        name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
        raise RuntimeError(
            f"{name} in a training forward at world size {self.world_size}: trainer.data_parallel=invariant "
            "supports randn_like / rand_like as the only random ops (their draws are made for the global batch); "
            "use trainer.data_parallel=sharded for models with other random ops")

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
