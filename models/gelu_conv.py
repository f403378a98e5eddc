"""`conv(gelu(x))` that keeps only `x` for the backward pass and recomputes the GELU there.

Autograd would keep both the GELU's input (for its own backward) and its output (the convolution's input): two
activation-sized tensors per pair, most of SCHA-VAE's training memory. Recomputing the element-wise GELU costs
one cheap kernel per pair in the backward pass; the gradients are those of the plain composition, bit for bit
(the same ATen kernels run on the same values), with or without autocast.

Under torch.compile the plain composition is traced instead: AOTAutograd's partitioner already recomputes cheap
element-wise ops such as the GELU in the backward pass rather than saving them, and a custom autograd.Function in
the graph makes AOTAutograd bypass its on-disk cache, so every warm start would trace forward and backward again.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.autocast import autocast_dtype


class _GeluConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], padding, cast: Optional[torch.dtype]):
        a, w, b = F.gelu(x), weight, bias
        if cast is None:
            y = F.conv2d(a, w, b, padding=padding)
        else:  # what autocast does to a convolution's operands, done here once
            a, w = a.to(cast), w.to(cast)
            b = b.to(cast) if b is not None else None
            with torch.autocast(x.device.type, enabled=False):
                y = F.conv2d(a, w, b, padding=padding)
        ctx.save_for_backward(x, w)  # the weight as the convolution used it (cast once)
        ctx.padding, ctx.cast, ctx.has_bias, ctx.weight_dtype = tuple(padding), cast, bias is not None, weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        a = F.gelu(x)
        if ctx.cast is not None:
            a = a.to(ctx.cast)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        ga, gw, gb = torch.ops.aten.convolution_backward(
            grad, a, w, [w.shape[0]] if ctx.has_bias else None, [1, 1], list(ctx.padding), [1, 1], False, [0, 0], 1,
            [need_x, need_w, need_b and ctx.has_bias])
        gx = torch.ops.aten.gelu_backward(ga.to(x.dtype), x) if need_x else None
        gw = gw.to(ctx.weight_dtype) if need_w else None
        gb = gb.to(ctx.bias_dtype) if need_b and ctx.has_bias else None
        return gx, gw, gb, None, None


class GeluConv2d(nn.Conv2d):
    """An `nn.Conv2d` (same parameters, initialisation and state-dict keys) whose forward is `conv(gelu(x))`,
    keeping only `x` for the backward pass. Stride 1, no dilation, one group, numeric padding."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.stride != (1, 1) or self.dilation != (1, 1) or self.groups != 1 or isinstance(self.padding, str):
            raise ValueError("GeluConv2d supports stride 1, dilation 1, groups 1 and numeric padding only")

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return super().forward(F.gelu(x))
        return _GeluConv.apply(x, self.weight, self.bias, self.padding, autocast_dtype(x))
