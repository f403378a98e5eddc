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


def load_average() -> Optional[float]:
    """The node's 1-minute load average (runnable processes), None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_warning(threads: int, cores: int, load: Optional[float]) -> Optional[str]:
    """A warning when several threads start on a node whose `cores` (all of them: the load average counts the
    whole node's runnable processes, also inside a container limited to fewer cores) other work already fills.

    An intra-op thread that the OS deschedules holds up the others at every synchronisation, so on an
    oversubscribed node more threads are slower, not faster: the demo's step (16 sets of 5, 2-core Intel Xeon VM,
    3 busy processes beside it) took 3.9 s with 2 threads and 1.3 s with 1 (idle: 0.46 s and 0.52 s;
    docs/performance.md). The load is only read once, at the start, so this warns rather than decides."""
    if threads < 2 or load is None or load < cores:
        return None
    return (f"the node is busy (1-minute load average {load:.1f} on its {cores} core(s)) before this process "
            f"starts its {threads} intra-op threads: on an oversubscribed node fewer threads run faster (measured "
            "3x, docs/performance.md); set trainer.threads=1 if the other work stays")


def apply(setting: str, device_type: str = "cpu", announce: bool = True) -> str:
    """Set torch's intra-op threads from `setting`; returns the line that says so (logged when `announce`)."""
    from trainer import distributed

    threads, why = resolve(setting, distributed.local_world_size())
    torch.set_num_threads(threads)
    where = "" if device_type == "cpu" else f" (host side of a {device_type} run)"
    line = f"intra-op threads: {threads} ({why}){where}"
    if announce:
        log.info(line)
        warning = busy_warning(threads, os.cpu_count() or 1, load_average()) if device_type == "cpu" else None
        if warning:
            log.warning(warning)
    return line
