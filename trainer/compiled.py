"""Graph capture of the training forward (`trainer.compile`): torch.compile of the model's forward pass as one
graph (`fullgraph=True`: a graph break is an error, not a silent fall back to eager), its backward through
AOTAutograd, for the training forward only.

- **What is compiled.** The module's `forward` while the module trains with gradients on. Evaluation
  (`model.eval()`, `torch.no_grad()`) runs the eager forward: a second graph for it would double the compile time
  for a pass that runs once an epoch. Forward hooks stay outside the graph (`module.compile()` would capture them),
  so `data_parallel=invariant`'s noise stream (trainer/invariant.py: generator state swapped around the forward)
  works unchanged.
- **Repeated blocks compiled once.** SCHA-VAE's bottleneck blocks are marked `torch.compiler.nested_compile_region`
  (models/layers_multiscale.py): the whole forward is one graph, and each distinct block shape is traced and
  compiled once and reused for its repeats (a no-op in eager).
- **Same numbers.** Inductor draws random numbers with its own generator unless told otherwise; with
  `fallback_random` the compiled reparameterisation draws are `torch.randn_like`'s own, so a compiled run draws
  the noise an eager run draws, and checkpoints resume either way.
- **The on-disk cache.** Inductor's and AOTAutograd's caches live in `TORCHINDUCTOR_CACHE_DIR`; where that is unset
  we point it at `$XDG_CACHE_HOME/scha-vae/inductor` (default `~/.cache/scha-vae/inductor`), which survives
  restarts, rather than torch's default under /tmp. A warm start skips AOTAutograd's tracing only for a graph
  without custom autograd.Functions (its cache refuses those): models/gelu_conv.py traces its plain form under
  compile for that reason (warm first step 77 s -> 21 s, paper SCHA-VAE on 2 cores).
- `trainer.compile_backend`: `inductor` (generated kernels) or `aot_eager` (the same capture of forward and
  backward, running ATen ops: for debugging a capture, and for tests that check capture without paying for code
  generation).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

BACKENDS = ("inductor", "aot_eager")
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def default_cache_dir(env=os.environ) -> Path:
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "scha-vae" / "inductor"


def configure() -> str:
    """Process-wide settings for capture; returns the cache directory in use."""
    import torch._inductor.config as inductor_config

    if not os.environ.get(CACHE_ENV):
        os.environ[CACHE_ENV] = str(default_cache_dir())
    inductor_config.fallback_random = True
    # inductor's own NCHW->NHWC choice for convolutions can hand a repeated block's backward differently strided
    # gradients at two call sites, which its nested-region check rejects ("subgraph args must have consistent
    # values", torch 2.14); trainer.channels_last chooses the layout instead (on for GPUs)
    inductor_config.layout_optimization = False
    return os.environ[CACHE_ENV]


class TrainingForward:
    """The module's forward: compiled while training with gradients (`calls` counts those), eager otherwise."""

    def __init__(self, module: nn.Module, mode: Optional[str], backend: str) -> None:
        self.module = module
        self.eager: Callable = module.forward
        self.compiled: Callable = torch.compile(self.eager, fullgraph=True, dynamic=False, mode=mode, backend=backend)
        self.calls = 0

    def __call__(self, *args, **kwargs):
        if not (self.module.training and torch.is_grad_enabled()):
            return self.eager(*args, **kwargs)
        self.calls += 1
        return self.compiled(*args, **kwargs)


def compile_training_forward(module: nn.Module, device_type: str, backend: str = "inductor") -> TrainingForward:
    """Replace `module.forward` (an instance attribute: parameters, buffers and state-dict keys are untouched)."""
    if backend not in BACKENDS:
        raise ValueError(f"compile backend must be one of {BACKENDS}, got {backend!r}")
    cache = configure()
    mode = "reduce-overhead" if device_type == "cuda" and backend == "inductor" else None
    wrapper = TrainingForward(module, mode, backend)
    module.forward = wrapper
    log.info("trainer.compile: the training forward and backward are compiled (%s%s, one graph) at the first "
             "step; cache %s", backend, f", {mode}" if mode else "", cache)
    return wrapper


def compiled_forward(module: nn.Module) -> Optional[TrainingForward]:
    forward = module.__dict__.get("forward")
    return forward if isinstance(forward, TrainingForward) else None
