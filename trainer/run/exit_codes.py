"""The one table of process exit codes of this project's entry points (training and evaluation jobs).

Schedulers act on these numbers (k8s/train-*/ failure policies, docs/reliability.md): a code in `FAIL_FAST`
means a retry cannot help (same config, same data, same divergence), a code in `RETRY` means the next attempt
may succeed (preemption, a lost peer, a transient outage). The table is the same under `python -m`, torchrun
(`launch.torchrun` passes the workers' code through instead of torchrun's 1) and the deepspeed launcher.
Codes stay below 126 except the signal ones (128 + signal), which the shell and Kubernetes use already.
"""
from __future__ import annotations

from typing import Dict

OK = 0
UNEXPECTED = 1  # an error we did not anticipate (traceback printed): a bug or an unknown environment fault
CONFIG_ERROR = 2  # bad config key or value, bad launcher environment, data error, restart that does not match the run
DIVERGED = 3  # trainer.max_consecutive_skips non-finite steps in a row
IO_ERROR = 4  # a checkpoint / metrics / run-directory write failed (disk full, read-only, quota): path + OS error named
RUN_DIR_BUSY = 5  # another live training owns the run directory (its host, PID and start time are named)
COLLECTIVE_FAILED = 6  # a peer rank stalled past trainer.collective_timeout_s or died (connection lost)
LAUNCHER_LOST = 7  # the worker's launcher (torchrun / deepspeed) died: the worker stopped on its own
TRACKING_UNAVAILABLE = 8  # evaluation: the tracking server stayed unreachable through every retry (transient)
MODEL_NOT_FOUND = 9  # evaluation: the model URI names no registered model / version / alias
CHECKS_FAILED = 10  # launch.gpu_check: a marked test failed or a speed row raised (the report says which)
DATA_UNAVAILABLE = 11  # the object store holding the shards stayed unreachable through every retry (transient)
KILLED = 137  # 128 + SIGKILL: OOM killer, node loss, or the grace period ran out (no checkpoint written now)
PREEMPTED = 143  # 128 + SIGTERM: checkpoint written at the current step; the next start resumes

MEANING: Dict[int, str] = {
    OK: "done",
    UNEXPECTED: "unexpected error (traceback)",
    CONFIG_ERROR: "config or data error",
    DIVERGED: "diverged: too many consecutive non-finite steps",
    IO_ERROR: "I/O failure writing the run's files",
    RUN_DIR_BUSY: "run directory owned by another live training",
    COLLECTIVE_FAILED: "a peer rank stalled or died",
    LAUNCHER_LOST: "the launcher died; worker stopped",
    TRACKING_UNAVAILABLE: "tracking server unavailable (transient)",
    MODEL_NOT_FOUND: "model not found in the registry",
    CHECKS_FAILED: "acceptance checks failed (see the report)",
    DATA_UNAVAILABLE: "data store unavailable (transient)",
    KILLED: "killed (SIGKILL)",
    PREEMPTED: "preempted (SIGTERM): checkpoint written",
}

# never worth a retry: the next attempt sees the same config, data or trajectory
FAIL_FAST = (CONFIG_ERROR, DIVERGED, IO_ERROR, MODEL_NOT_FOUND)
# worth a retry: the cause is outside the run (scheduler, node, network, a previous attempt still exiting)
RETRY = (PREEMPTED, KILLED, COLLECTIVE_FAILED, RUN_DIR_BUSY, TRACKING_UNAVAILABLE, DATA_UNAVAILABLE, LAUNCHER_LOST)

# when several ranks fail differently, the job reports the most specific cause: a rank's config error or
# divergence explains its peers' lost connections, not the other way round; a SIGKILL next to a collective failure is
# mostly the launcher stopping the stalled rank, so the collective failure names the cause
_PRIORITY = (CONFIG_ERROR, DIVERGED, IO_ERROR, MODEL_NOT_FOUND, RUN_DIR_BUSY, PREEMPTED, TRACKING_UNAVAILABLE,
             DATA_UNAVAILABLE, UNEXPECTED, COLLECTIVE_FAILED, KILLED, LAUNCHER_LOST)


def from_returncode(returncode: int) -> int:
    """A child's status as an exit code (Python's negative `-signal` becomes the shell's 128 + signal)."""
    return 128 - returncode if returncode < 0 else returncode


def most_specific(codes) -> int:
    """The one code a job reports for its failed processes' codes (unknown codes rank after known ones)."""
    codes = [from_returncode(c) for c in codes if c != OK]
    if not codes:
        return OK
    rank = {c: i for i, c in enumerate(_PRIORITY)}
    return min(codes, key=lambda c: rank.get(c, len(_PRIORITY)))
