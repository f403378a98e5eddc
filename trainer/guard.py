"""Non-finite guard and preemption: an all-reduced flag pair decides, identically on every rank, whether a step's
update counts and whether to stop (SIGTERM) -- read on the host every step or, on a GPU, every N steps. Also the
test-only fault injection."""
from __future__ import annotations

import os
import signal
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from trainer.run import exit_codes


class NonFiniteLoss(RuntimeError):
    """trainer.max_consecutive_skips non-finite steps in a row."""

    exit_code = exit_codes.DIVERGED
    label = "training stopped"


class NonFiniteGuard:
    """Watches the loss and every gradient as autograd produces it (before any clamp, under any ZeRO stage).

    Register it before the DeepSpeed engine so that it sees the raw gradients. Two modes (`every`):
    - 1: `decide` after each backward reads one all-reduced flag pair on the host (a sync per step) and the loop
      skips the update of a non-finite step on every rank.
    - N > 1: `mark` finds a non-finite step on the device (the flag is all-reduced without a host read); the
      optimizer's pre-step hook (`attach`) then zeroes the gradients it steps with, so the bad batch adds nothing
      (Adam still advances its moments by one step: the weights coast on their momentum). `check`, every N steps,
      reads the counts and the stop request on the host: the only sync.
    """

    def __init__(self, model: nn.Module, max_consecutive: int, every: int = 1,
                 device: torch.device = torch.device("cpu")) -> None:
        self.max_consecutive = max_consecutive
        self.every = every
        self.device = device
        self.sums: List[torch.Tensor] = []
        self.consecutive = 0
        self.stop_requested = False
        self.bad: Optional[torch.Tensor] = None  # device mode: this step's agreed flag (float 0/1)
        self._run = self._worst = self._count = None  # device mode: run of bad steps, longest since check, count
        self._window: Optional[torch.Tensor] = None  # device mode: bad so far in this gradient accumulation
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(self._observe)

    def _observe(self, grad: torch.Tensor) -> None:
        self.sums.append(grad.detach().float().sum())  # NaN/Inf anywhere makes the sum non-finite

    def _total(self, loss: torch.Tensor) -> torch.Tensor:
        total = loss.detach().float() + (torch.stack(self.sums).sum() if self.sums else 0.0)
        self.sums.clear()
        return total

    def decide(self, loss: torch.Tensor) -> Tuple[bool, bool]:
        """(skip this update, stop now), agreed by all ranks; the step's single host sync."""
        total = self._total(loss)
        flags = torch.stack([(~torch.isfinite(total)).float(), total.new_tensor(float(self.stop_requested))])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        skip, stop = (bool(v) for v in flags.tolist())
        self.consecutive = self.consecutive + 1 if skip else 0
        return skip, stop

    def mark(self, loss: torch.Tensor, boundary: bool = True) -> torch.Tensor:
        """Device mode: this micro batch's non-finite flag (float 0/1 on the device), agreed by all ranks, no host
        read. The update at the accumulation `boundary` is zeroed if any micro batch since the last one was bad."""
        bad = (~torch.isfinite(self._total(loss))).float().reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self._window = bad[0] if self._window is None else torch.maximum(self._window, bad[0])
        self.bad = self._window
        if boundary:
            self._window = None
        self._start_counting(bad.device)
        self._run = (self._run + 1) * bad[0]
        self._worst = torch.maximum(self._worst, self._run)
        self._count = self._count + bad[0]
        return bad[0]

    def _start_counting(self, device: torch.device) -> None:
        if self._run is None:
            self._run, self._worst, self._count = (torch.zeros((), device=device) for _ in range(3))

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Device mode: zero the gradients the optimizer steps with when the step was marked bad."""

        def zero_if_bad(opt: torch.optim.Optimizer, args, kwargs) -> None:
            if self.bad is None:
                return
            grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
            if grads:
                keep = self.bad == 0
                torch._foreach_copy_(grads, [torch.where(keep, g, torch.zeros_like(g)) for g in grads])

        optimizer.register_step_pre_hook(zero_if_bad)

    def check(self) -> Tuple[int, bool]:
        """Device mode: (bad steps since the last check, stop now), agreed by all ranks; a host sync. Sets
        `consecutive` to the longest run of bad steps seen since the last check."""
        self._start_counting(self.device)
        flags = torch.stack([self._count, self._worst, self._count.new_tensor(float(self.stop_requested))])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        count, worst, stop = flags.tolist()
        self.consecutive = int(worst)
        self._worst, self._count = self._run.clone(), torch.zeros_like(self._count)
        return int(count), bool(stop)

    def stop_message(self, step: int, checkpoint) -> str:
        """What happened to the run of bad steps that stops the run, as it happened in this mode."""
        n = self.consecutive
        if self.every == 1:
            what = (f"{n} consecutive steps with a non-finite loss or gradient, the last at step {step}; each was "
                    "skipped: its gradients were discarded and no optimizer step ran, so the weights and the "
                    "optimizer state are those of the last finite step")
        else:
            what = (f"{n} consecutive steps with a non-finite loss or gradient (the longest run found by the "
                    f"device-side guard, checked every {self.every} steps; checked at step {step}); their "
                    "gradients were zeroed before the optimizer step, so no non-finite value reached the weights, "
                    "but each still counted as an optimizer step: Adam's moments decayed and its step count "
                    "advanced, and the weights moved by the remaining momentum")
        return f"{what}. Last good checkpoint: {checkpoint}"

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
