"""The one exception the data pipeline raises for bad, missing or inconsistent data."""
from __future__ import annotations


class DataError(Exception):
    """Raw data or shards are missing, corrupt or do not match what was asked for.

    Messages always name the file (or directory) concerned and the problem, so the user can fix it without
    reading code.
    """
