"""A launch proxy for one training step (issue 31): how many operations the host issues.

- eager: the ATen operations dispatched (forward, backward and optimizer; each would be at least one kernel
  launch on a GPU), counted by a dispatch mode.
- compiled: the calls the generated code makes (its kernels, extern ATen calls such as convolutions, and its
  buffer allocations: an upper bound on its launches), counted by a profile hook on the generated wrapper
  modules, which inductor writes under its cache directory. The optimizer, the guard and the loss reductions run
  outside the graph, as in eager, and are not in this count.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def eager_ops(fn: Callable[[], None]) -> int:
    """ATen operations dispatched by `fn()`, with compiled code run eagerly."""
    with torch.compiler.set_stance("force_eager"), _CountOps() as mode:
        fn()
    return mode.count


def generated_calls(fn: Callable[[], None], generated_dir: str) -> int:
    """Calls made by generated code under `generated_dir` while `fn()` runs (its kernels, extern ATen calls and
    buffer allocations). What runs outside the compiled graph (optimizer, guard, loss reductions) is not counted:
    it is the same in an eager step."""
    calls = 0

    def from_generated(frame) -> bool:
        return frame is not None and frame.f_code.co_filename.startswith(generated_dir)

    def profile(frame, event, arg):
        nonlocal calls
        if (event == "c_call" and from_generated(frame)) or (event == "call" and from_generated(frame.f_back)):
            calls += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls
