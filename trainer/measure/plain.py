"""The DeepSpeed engine's training-step interface in plain torch, so that `launch.bench` measures on a host
where DeepSpeed is not importable."""
from __future__ import annotations

import torch
from torch import nn

from trainer.engine import add_gradient_clamp, apply_fast_path
from trainer.fastpath import FastPath, autocast_context


class PlainEngine:
    """What trainer/step.py and trainer/guard.py call on a DeepSpeed engine: Adam with the same gradient clamp,
    global-norm clipping, accumulation over `grad_accum` micro batches, and bf16 by autocast over fp32 weights
    (no bf16-weights mode, no ZeRO)."""

    def __init__(self, module: nn.Module, cfg, grad_accum: int, fast: FastPath, device: torch.device) -> None:
        self.module, self.t, self.grad_accum, self.micro = module, cfg.trainer, grad_accum, 0
        self.fast, self.device_type = fast, device.type
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=self.t.lr, weight_decay=self.t.weight_decay,
                                          fused=device.type == "cuda")
        if self.t.grad_clamp > 0:
            add_gradient_clamp(self.optimizer, self.t.grad_clamp)
        apply_fast_path(module, fast, device.type)

    def __call__(self, x: torch.Tensor):
        with autocast_context(self.fast, self.device_type):
            return self.module(x.float())

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro + 1) % self.grad_accum == 0

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            if self.t.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.t.grad_clip_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro += 1

    # what trainer/guard.py's discard_gradients asks
    def bfloat16_enabled(self) -> bool:
        return False

    zero_optimization = fp16_enabled = bfloat16_enabled

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.micro = 0
