"""Learning-rate and alpha schedules (`trainer.lr_schedule`, `trainer.warmup_steps`, `trainer.alpha_schedule`).

The reference's recipe (SPEC 6) is `plateau` (halve the learning rate when the validation ELBO stalls) and an
alpha decayed once per epoch; it was tuned for 1000 GPU epochs. For a short budget the run's length is known in
advance, so the learning rate can follow it: a linear warm-up over `warmup_steps` optimizer steps, then a cosine
or linear decay to `min_lr` at the last step. torch's LambdaLR holds the step count (saved in checkpoints, so a
resumed run continues on the same curve); the formula lives in `lr_factor`.
"""
from __future__ import annotations

import functools
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

LR_SCHEDULES = ("plateau", "cosine", "linear", "constant")
ALPHA_SCHEDULES = ("epoch", "step")


def lr_factor(step: int, kind: str, total: int, warmup: int, floor: float) -> float:
    """Multiplier of the base learning rate for optimizer step `step` (counted from 0) of `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return floor + (1.0 - floor) * shape


def build_lr_scheduler(optimizer: Optimizer, t, total_steps: int) -> LRScheduler | ReduceLROnPlateau:
    """`t`: the TrainerConfig. `total_steps`: optimizer steps of the whole run (for the per-step schedules)."""
    if t.lr_schedule == "plateau":
        return ReduceLROnPlateau(optimizer, mode="max", patience=t.plateau_patience, factor=t.plateau_factor,
                                 min_lr=t.min_lr)
    factor = functools.partial(lr_factor, kind=t.lr_schedule, total=total_steps, warmup=t.warmup_steps,
                               floor=t.min_lr / t.lr)
    return LambdaLR(optimizer, factor)


def per_step(scheduler) -> bool:
    """Whether the scheduler steps after every optimizer step (else once per epoch on the validation ELBO)."""
    return not isinstance(scheduler, ReduceLROnPlateau)


def alpha_at(alpha: float, alpha_step: float, step: int, steps_per_epoch: int) -> float:
    """`trainer.alpha_schedule=step`: the reference's per-epoch decay spread evenly over the steps of an epoch
    (equal to the per-epoch value at every epoch boundary)."""
    return alpha * alpha_step ** (step / max(1, steps_per_epoch))
