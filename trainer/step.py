"""One training step exactly as the trainer runs it; trainer/loop.py and the benchmark (trainer/measure/) call it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from models.objective import elbo_terms, training_loss
from trainer.guard import FaultInjector, NonFiniteGuard, discard_gradients


@dataclass
class StepResult:
    row: torch.Tensor  # on the device: loss, vlb, logpx, kl_z, kl_c, skipped (trainer/metrics.py's columns)
    checked: bool  # the guard read its flags on the host in this step (always, with guard_every=1)
    skipped: int  # updates found non-finite by that read (0 when not checked)
    preempted: bool


class TrainingStep:
    """Forward, the alpha-weighted loss, backward, the non-finite guard, the engine's step (clipping, clamp,
    optimizer). `engine`: a DeepSpeed engine, or anything with its `__call__`, `backward`, `step`,
    `is_gradient_accumulation_boundary` (trainer/measure/plain.py); `optimizer`: the torch optimizer
    it steps (trainer/engine.py's second result)."""

    def __init__(self, engine, optimizer: torch.optim.Optimizer, guard: NonFiniteGuard,
                 faults: Optional[FaultInjector] = None, kl_z_weight: float = 1.0) -> None:
        self.engine, self.guard, self.faults, self.kl_z_weight = engine, guard, faults, kl_z_weight
        if guard.every > 1:
            guard.attach(optimizer)

    def __call__(self, x: torch.Tensor, alpha: float, step: int, check: bool = False) -> StepResult:
        engine, guard = self.engine, self.guard
        terms = elbo_terms(engine(x))
        loss = training_loss(terms, alpha, self.kl_z_weight)
        if self.faults is not None:
            loss = self.faults.loss(loss, step)
        engine.backward(loss)
        if guard.every == 1:
            skip, preempted = guard.decide(loss)
            if skip:
                discard_gradients(engine)
            else:
                engine.step()
            flag, checked, skipped = loss.new_tensor(float(skip)), True, int(skip)
        else:
            flag = guard.mark(loss, engine.is_gradient_accumulation_boundary())
            engine.step()  # a bad update arrives zeroed (NonFiniteGuard.attach)
            checked, skipped, preempted = check or (step + 1) % guard.every == 0, 0, False
            if checked:
                skipped, preempted = guard.check()
        row = torch.stack([loss.detach().float(), terms.vlb, terms.logpx, terms.kl_z, terms.kl_c, flag.float()])
        return StepResult(row, checked, skipped, preempted)
