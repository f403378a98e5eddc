"""The one exception the data pipeline raises for bad, missing or inconsistent data."""
from __future__ import annotations


class DataError(Exception):
    """Raw data or shards are missing, corrupt or do not match what was asked for.

    Messages always name the file (or directory) concerned and the problem, so the user can fix it without
    reading code.
    """


class StoreUnavailable(DataError):
    """The object store holding the shards stayed unreachable through every retry: transient, worth a retry.

    Carries its exit code like trainer/run/errors.py's `Refused` (data_pipeline imports nothing of trainer/; the
    number is trainer/run/exit_codes.py's DATA_UNAVAILABLE, checked by tests/test_exits.py)."""

    exit_code = 11
    label = "data store unavailable"
