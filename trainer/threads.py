"""Intra-op threads of a process (`trainer.threads`): training, evaluation, generation and the bench ask here.

`auto` follows the ecosystem's variable first: `OMP_NUM_THREADS`, when set, is the user's (or torchrun's, which
sets 1 for several processes per node) explicit choice, and the tests keep 1 thread through it. Without it, each
process takes its share of the cores it may run on: the affinity mask (what a container's cpuset or `taskset`
allows, not the machine's count) divided by the processes of this node. A number is taken as given.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Tuple

import torch

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def check_setting(setting: str, key: str = "trainer.threads") -> str:
    """`auto` or an integer >= 1, as a string; anything else is a ValueError naming `key`."""
    value = str(setting).strip().lower()
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise ValueError(f"{key} must be auto or an integer >= 1, got {setting!r}")
    return value


def resolve(setting: str, local_processes: int, env: Optional[dict] = None) -> Tuple[int, str]:
    """(threads, why) for `setting` in a node running `local_processes` processes."""
    env = os.environ if env is None else env
    value = check_setting(setting)
    if value != "auto":
        return int(value), f"trainer.threads={value}"
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return int(omp), f"auto: OMP_NUM_THREADS={omp}"
    cores, local = usable_cores(), max(1, local_processes)
    return max(1, cores // local), f"auto: {cores} usable core(s) / {local} process(es) on this node"


def apply(setting: str, device_type: str = "cpu", announce: bool = True) -> str:
    """Set torch's intra-op threads from `setting`; returns the line that says so (logged when `announce`)."""
    from trainer import distributed

    threads, why = resolve(setting, distributed.local_world_size())
    torch.set_num_threads(threads)
    where = "" if device_type == "cpu" else f" (host side of a {device_type} run)"
    line = f"intra-op threads: {threads} ({why}){where}"
    if announce:
        log.info(line)
    return line
