"""An exponential moving average of the weights (`trainer.ema_decay`): what validation, figures, checkpoints'
registered weights and exports use when it is on.

Our own rather than torch.optim.swa_utils.AveragedModel: that keeps a deep copy of the module in the training
dtype (bf16 weights under DeepSpeed's bf16, where an average with 1 - decay = 1e-3 rounds away) and has no
warm-up; this keeps an fp32 copy of the parameters only, and swaps it into the live module for a validation pass
(the module's own buffers, e.g. BatchNorm statistics, stay as trained). Only parameters are averaged.

The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so a short run's average is not dominated
by the initial weights (0.999 ** 1500 = 0.22 of them would remain after 1500 steps without it).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch
from torch import nn


def decay_at(decay: float, updates: int) -> float:
    """The decay applied by update number `updates` (counted from 0)."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class WeightAverage:
    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names: List[str] = [n for n, _ in named]
        self.params: List[nn.Parameter] = [p for _, p in named]
        self.shadow: List[torch.Tensor] = [p.detach().float().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Fold the module's current parameters in: one fused kernel per dtype group, no host sync."""
        weight = 1.0 - decay_at(self.decay, self.updates)
        current = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in self.params]
        torch._foreach_lerp_(self.shadow, current, weight)
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in the live module for the duration; the trained ones restored bit for bit."""
        with torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
            torch._foreach_copy_([p.data for p in self.params], self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], backup)

    def averaged(self) -> Dict[str, torch.Tensor]:
        """Parameter name -> averaged fp32 tensor (state-dict names of the module)."""
        return {n: s.detach().clone() for n, s in zip(self.names, self.shadow)}

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "weights": dict(zip(self.names, self.shadow))}

    def load_state_dict(self, state: dict) -> None:
        weights = state["weights"]
        missing = [n for n in self.names if n not in weights]
        if missing or len(weights) != len(self.names):
            raise RuntimeError(f"the averaged weights do not match the model ({len(weights)} saved, "
                               f"{len(self.names)} expected; missing e.g. {missing[:3]})")
        with torch.no_grad():
            for n, s in zip(self.names, self.shadow):
                s.copy_(weights[n])
        self.updates = int(state["updates"])
