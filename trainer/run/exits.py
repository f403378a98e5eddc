"""The one exit policy of every entry point: run its work, turn an anticipated failure into its exit code and a
one-line message on stderr, and let nothing else pass as one of them.

- a `Refused` (trainer/run/errors.py), `RunIOError` or `NonFiniteLoss` carries its code and label;
- `data_pipeline.errors.DataError` is a config or data error (data_pipeline imports nothing of trainer/);
- `SystemExit` passes through (argparse's usage errors, a code chosen deliberately);
- anything else is exit 1 with its traceback: a bug of ours or an unknown fault, never "config error".
"""
from __future__ import annotations

import sys
import traceback
from typing import Callable, Optional, Tuple

from trainer.run import exit_codes

OnFailure = Callable[[int, str], None]


def classify(exc: BaseException) -> Tuple[int, str]:
    """(exit code, message) for an exception; exit_codes.UNEXPECTED for one we did not anticipate."""
    from data_pipeline.errors import DataError

    code = getattr(type(exc), "exit_code", None)
    if isinstance(code, int):
        return code, f"{type(exc).label}: {exc}"
    if isinstance(exc, DataError):
        return exit_codes.CONFIG_ERROR, f"data error: {exc}"
    return exit_codes.UNEXPECTED, f"unexpected error: {type(exc).__name__}: {exc}"


def run(work: Callable[[], Optional[int]], on_failure: Optional[OnFailure] = None) -> int:
    """work()'s exit code (None is 0); an exception becomes its code, `on_failure(code, message)` is told."""
    try:
        return int(work() or 0)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 128 + 2
    except Exception as exc:
        code, message = classify(exc)
        if code == exit_codes.UNEXPECTED:
            traceback.print_exc()
        print(message, file=sys.stderr, flush=True)
        if on_failure is not None:
            on_failure(code, message)
        return code


def exit_with(work: Callable[[], Optional[int]], on_failure: Optional[OnFailure] = None) -> None:
    """`run` for a Hydra task function (Hydra reports an escaping exception as exit 1): raise SystemExit
    with the code unless it is 0."""
    code = run(work, on_failure)
    if code:
        raise SystemExit(code)
