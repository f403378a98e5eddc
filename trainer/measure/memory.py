"""Peak memory of a step above a base point: live tensors (what trainer/measure/planning.py predicts) and what the
allocator held, on a GPU or a Linux CPU host.

On a CPU, live tensor bytes are read from the kernel's peak resident set (VmHWM, reset through
/proc/self/clear_refs) while glibc serves every block of 128 KiB or more by mmap, so that a freed tensor leaves
the resident set at once; where clear_refs cannot be written, a thread samples the RSS every millisecond.
"""
from __future__ import annotations

import ctypes
import gc
import os
import threading
from typing import Optional

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def vmhwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def release_free_memory() -> None:
    """Collect garbage and hand free heap pages back to the OS (glibc), so RSS reflects live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def set_malloc_thresholds(mmap: int, trim: Optional[int] = None) -> bool:
    """Fix glibc's mmap threshold (blocks of at least `mmap` bytes are served by mmap and unmapped when freed) and
    optionally its trim threshold; this ends glibc's dynamic adjustment of both for the process. False where
    unavailable (not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, mmap))
        if trim is not None:
            ok = ok and bool(libc.mallopt(M_TRIM_THRESHOLD, trim))
        return ok
    except (OSError, AttributeError):
        return False


def fixed_mmap_threshold() -> bool:
    """Blocks of 128 KiB or more by mmap from now on: the peak resident set then follows live tensor bytes."""
    return set_malloc_thresholds(128 << 10)


class PeakMemory:
    """Peak memory of the process above a base point (`start`), by device.

    cuda: `torch.cuda.max_memory_allocated` minus the allocated bytes at `start` (tensors only; no allocator
    cache, no CUDA context). cpu: VmHWM, reset at `start` by writing "5" to /proc/self/clear_refs, minus the RSS
    at `start`; without that, the largest RSS seen by a thread sampling every millisecond (can miss spikes
    shorter than that).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = self.base_reserved = self.base_total = 0
        self._sampler: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._max = 0
        if device.type == "cuda":
            self.method = "cuda_max_memory_allocated"
        elif self._can_reset_hwm():
            self.method = "cpu_vmhwm_reset"
        else:
            self.method = "cpu_rss_sampled_1ms"

    @staticmethod
    def _can_reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            vmhwm_bytes()
            return True
        except OSError:
            return False

    def start(self) -> None:
        release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.base_reserved = self.base_total = torch.cuda.memory_reserved(self.device)
        else:
            self.base = self.base_total = rss_bytes()
        self.reset_peak()

    def reset_peak(self) -> None:
        """Start a new peak (the base stays)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method == "cpu_vmhwm_reset":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self.stop()
            self._max = rss_bytes()
            self._stop.clear()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._max = max(self._max, rss_bytes())

    def stop(self) -> None:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self._sampler = None

    def held(self) -> int:
        """What the allocator held at its highest since the last reset, above the base: the CUDA caching
        allocator's reserved bytes; on a CPU the resident set (the same as `peak`)."""
        if self.device.type == "cuda":
            return max(0, torch.cuda.max_memory_reserved(self.device) - self.base_reserved)
        return self.peak()

    def peak(self) -> int:
        """Bytes above the base at the highest point since the last reset."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            top = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "cpu_vmhwm_reset":
            top = vmhwm_bytes()
        else:
            top = max(self._max, rss_bytes())
        return max(0, top - self.base)
