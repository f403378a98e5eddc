"""Non-finite guard and preemption: per step, one all-reduced flag pair decides, identically on every rank,
whether to apply the update and whether to stop (SIGTERM). Also the test-only fault injection."""
from __future__ import annotations

import os
import signal
from typing import Iterable, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn


class NonFiniteLoss(RuntimeError):
    pass


class NonFiniteGuard:
    """Watches the loss and every gradient as autograd produces it (before any clamp, under any ZeRO stage).

    Register it before the DeepSpeed engine so that it sees the raw gradients.
    """

    def __init__(self, model: nn.Module, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.sums: List[torch.Tensor] = []
        self.consecutive = 0
        self.stop_requested = False
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(self._observe)

    def _observe(self, grad: torch.Tensor) -> None:
        self.sums.append(grad.detach().float().sum())  # NaN/Inf anywhere makes the sum non-finite

    def decide(self, loss: torch.Tensor) -> Tuple[bool, bool]:
        """(skip this update, stop now), agreed by all ranks; the step's single host sync."""
        total = loss.detach().float() + (torch.stack(self.sums).sum() if self.sums else 0.0)
        self.sums.clear()
        flags = torch.stack([(~torch.isfinite(total)).float(), total.new_tensor(float(self.stop_requested))])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        skip, stop = (bool(v) for v in flags.tolist())
        self.consecutive = self.consecutive + 1 if skip else 0
        return skip, stop

    def request_stop(self, *_: object) -> None:
        self.stop_requested = True

    def install_signal_handlers(self, signals: Iterable[int] = (signal.SIGTERM,)) -> None:
        for sig in signals:
            signal.signal(sig, self.request_stop)


def discard_gradients(engine) -> None:
    """Drop the accumulated gradients without an optimizer step, wherever DeepSpeed keeps them."""
    if engine.bfloat16_enabled() or engine.zero_optimization() or engine.fp16_enabled():
        engine.optimizer.zero_grad()
    else:
        engine.zero_grad()


class FaultInjector:
    """Test-only faults at chosen steps on chosen ranks (trainer.fault_*): a NaN loss, a NaN gradient, or the
    process dying (only in the first attempt of an elastic job, so that a restart can get past it)."""

    def __init__(self, model: nn.Module, loss_steps: Sequence[int], grad_steps: Sequence[int], rank: int,
                 fault_rank: int, exit_step: int = -1) -> None:
        mine = fault_rank < 0 or fault_rank == rank
        self.loss_steps = set(loss_steps) if mine else set()
        self.grad_steps = set(grad_steps) if mine else set()
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        self.exit_step = exit_step if mine and first_attempt else -1
        self.armed = False
        if self.grad_steps:
            first = next(p for p in model.parameters() if p.requires_grad)
            first.register_hook(lambda g: g * float("nan") if self.armed else None)

    def loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        if step == self.exit_step:
            os._exit(17)  # a crash: no cleanup, no checkpoint, peers left waiting in their next collective
        self.armed = step in self.grad_steps
        return loss * float("nan") if step in self.loss_steps else loss
