"""Failures the entry points turn into documented exit codes (trainer/exit_codes.py)."""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Union


class RunIOError(OSError):
    """Writing one of the run's files failed; the message names the path and the OS error."""

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


class RunDirBusy(RuntimeError):
    """Another live training owns the run directory."""


class RunMismatch(ValueError):
    """A restart's model or data config differs from the run's."""


class CollectiveFailed(RuntimeError):
    """A collective did not complete: a peer stalled past the timeout or its connection was lost."""
