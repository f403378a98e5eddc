"""The failures we anticipate, each carrying its exit code (trainer/run/exit_codes.py) and the word its message
starts with; trainer/run/exits.py turns them into the process's exit. Anything else is a bug or an unknown
environment fault: exit 1 with its traceback.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Union

from trainer.run import exit_codes


class Refused(Exception):
    """An anticipated refusal: the message names what is wrong and how to fix it, and no traceback is shown."""

    exit_code = exit_codes.CONFIG_ERROR
    label = "error"


class ConfigError(Refused, ValueError):
    """A bad config key or value, command-line option or launcher environment."""

    label = "config error"


class RunIOError(OSError):
    """Writing one of the run's files failed; the message names the path and the OS error."""

    exit_code = exit_codes.IO_ERROR
    label = "I/O error"

    def __init__(self, what: str, path: Union[str, Path], cause: BaseException) -> None:
        code = getattr(cause, "errno", None) or errno.EIO
        reason = os.strerror(code) if getattr(cause, "errno", None) else str(cause)
        super().__init__(code, f"{what} {path} failed: [Errno {errno.errorcode.get(code, code)}] {reason}")
        self.path = str(path)

    def __str__(self) -> str:
        return self.strerror


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind `exc` (itself, or in its cause/context chain), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class RunDirBusy(Refused):
    """Another live training owns the run directory."""

    exit_code = exit_codes.RUN_DIR_BUSY
    label = "refused"


class RunMismatch(ConfigError):
    """A restart's model or data config differs from the run's."""


class CheckpointsUnusable(ConfigError):
    """Checkpoints are present and none can be resumed from (damaged, or of another model): starting over would
    silently discard the run, and retrying reads the same files."""

    label = "refused"


class CollectiveFailed(Refused):
    """A collective did not complete: a peer stalled past the timeout or its connection was lost."""

    exit_code = exit_codes.COLLECTIVE_FAILED
    label = "collective failed"


class ModelNotFound(Refused):
    """The model URI names no registered model, alias, version, run or path (never worth a retry)."""

    exit_code = exit_codes.MODEL_NOT_FOUND
    label = "model error"


class TrackingUnavailable(Refused):
    """The tracking store stayed unreachable for tracking.outage_timeout_s (transient: retry later)."""

    exit_code = exit_codes.TRACKING_UNAVAILABLE
    label = "tracking unavailable"
