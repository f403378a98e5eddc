"""The speed settings a run actually uses, resolved once from the config and the device.

`trainer.precision`, `trainer.channels_last`, `trainer.guard_every` and `trainer.compile` accept `auto`; this module
turns them into what the engine, the loop and the benchmark use, so all three agree (docs/performance.md):

- precision `auto`: `amp_bf16` where bf16 has fast kernels (CUDA compute capability >= 8.0; a CPU with AMX or
  AVX512-BF16, through oneDNN), else `fp32`. `amp_bf16` is DeepSpeed's `torch_autocast`: fp32 weights, gradients and
  Adam state, convolutions and matmuls in bf16 (the likelihood and KL sums stay fp32: models/objective.py).
  `bf16` is DeepSpeed's bf16 mode (bf16 weights, fp32 master copy) -- half the weight memory, for the big rungs.
- channels_last `auto`: on a GPU, or with amp_bf16 on a CPU, at ZeRO stage 0 without DeepSpeed's bf16 mode
  (stages 1-3 and the bf16 optimizer keep the weights as views of flat contiguous buffers, which a layout change
  would cut loose); NHWC lets oneDNN's bf16 kernels and cuDNN skip a layout reorder around every convolution (fp32
  on a CPU gains nothing from it).
- guard_every `auto` (0): 1 on a CPU (a host sync costs nothing there), 20 on a GPU (trainer/guard.py).
- compile `auto`: what the training loop decided from this machine's measurements (trainer/compile_choice.py:
  on where the bench measured this configuration faster compiled and the run's planned steps repay the compile;
  off where nothing was measured, e.g. on a GPU before `make gpu-check`); elsewhere (the bench, evaluation) off.
  `true` compiles the training step (trainer/compiled.py): 1.3x per step for the paper SCHA-VAE on a 2-core CPU in
  fp32 after a ~230 s first step (docs/performance.md).
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache

import torch

GPU_GUARD_EVERY = 20


def device_name(device: torch.device) -> str:
    """The device as the bench and `trainer.compile=auto` name it: a GPU's name; a CPU's model, its cpus and
    torch's intra-op threads (which set a CPU step's speed)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} cpus, {torch.get_num_threads()} torch threads)"


@lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 instructions (Linux /proc/cpuinfo): oneDNN then runs bf16 convolutions natively."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def bf16_is_fast(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    return cpu_has_fast_bf16()


def resolve_precision(setting: str, device_type: str) -> str:
    """`fp32`, `bf16` or `amp_bf16` for a `trainer.precision` setting on this kind of device."""
    if setting != "auto":
        return setting
    return "amp_bf16" if bf16_is_fast(device_type) else "fp32"


@dataclass(frozen=True)
class FastPath:
    precision: str  # fp32 | bf16 | amp_bf16
    channels_last: bool
    guard_every: int
    compile: bool
    compile_backend: str = "inductor"

    @property
    def input_dtype(self) -> torch.dtype:
        """What batches are cast to before the forward: DeepSpeed's bf16 mode takes bf16 inputs; autocast
        casts by itself."""
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @property
    def autocast(self) -> bool:
        return self.precision == "amp_bf16"


def resolve(trainer_cfg, device_type: str, compile_auto: bool = False) -> FastPath:
    """The settings for `trainer_cfg` on this kind of device; `compile_auto` is what `compile=auto` stands for
    (trainer/compile_choice.py decides it for a training run)."""
    t = trainer_cfg
    precision = resolve_precision(t.precision, device_type)
    flat_weights = t.zero_stage > 0 or precision == "bf16"
    pays = device_type == "cuda" or precision == "amp_bf16"  # fp32 on a CPU: no faster NHWC kernels (measured)
    channels_last = (pays and not flat_weights) if t.channels_last == "auto" else t.channels_last == "true"
    guard_every = t.guard_every or (GPU_GUARD_EVERY if device_type == "cuda" else 1)
    compile_ = t.compile == "true" or (t.compile == "auto" and compile_auto)
    return FastPath(precision, channels_last, guard_every, compile_, t.compile_backend)


def autocast_context(fast: FastPath, device_type: str):
    """The forward's autocast outside the DeepSpeed engine (evaluation on `engine.module`, the plain-torch bench)."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=fast.autocast)
