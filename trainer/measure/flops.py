"""FLOPs of a step as executed (torch.utils.flop_counter) and the dense peak FLOP/s of known accelerators, for MFU."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense peak FLOP/s by device-name substring (first match): bf16 tensor cores, TF32 tensor cores, fp32 CUDA cores.
PEAK_FLOPS = (
    ("H200", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12}),
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    ("H100 NVL", {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12}),
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
)


def count_flops(fn: Callable[[], None]) -> Optional[int]:
    """FLOPs of one call of `fn` (with activation checkpointing the recomputed forward counts); None if counting
    fails, so that a counting failure never loses the timings."""
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops())
    except Exception:
        return None


def peak_flops(device: torch.device, name: str, precision: str) -> Tuple[Optional[float], Optional[str]]:
    """The device's dense peak for the precision the step computes in, with its basis (None where unknown).
    `precision` is trainer/fastpath.py's resolved one: bf16 weights and bf16 autocast both run on bf16 tensor
    cores."""
    if device.type != "cuda":
        return None, None
    for key, peaks in PEAK_FLOPS:
        if key in name:
            if precision in ("bf16", "amp_bf16"):
                return peaks["bf16"], "bf16 tensor"
            if torch.backends.cudnn.allow_tf32:  # convolutions (most of the work) run in TF32 by default
                return peaks["tf32"], "tf32 tensor (cudnn.allow_tf32)"
            return peaks["fp32"], "fp32"
    return None, None
