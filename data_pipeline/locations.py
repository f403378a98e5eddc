"""Where a dataset's shards are, as text: a local path or an ``s3://<bucket>/<prefix>`` URL.

Syntax only, with no imports from the rest of the package, so that the config can check ``data.shards_dir`` without
importing the readers (data_pipeline/shard_source.py), which themselves read the config's dataset names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REMOTE_SCHEMES = ("s3",)


def is_remote(location: str | Path) -> bool:
    return urlsplit(str(location)).scheme in REMOTE_SCHEMES


def check_location(key: str, location: str) -> None:
    """A local path or an ``s3://bucket/prefix`` URL (ValueError naming `key` otherwise)."""
    parts = urlsplit(location)
    if len(parts.scheme) > 1 and parts.scheme not in REMOTE_SCHEMES:  # one letter: a Windows drive
        raise ValueError(f"{key} must be a local path or s3://<bucket>/<prefix>, got {location!r}")
    if parts.scheme in REMOTE_SCHEMES and not parts.netloc:
        raise ValueError(f"{key} must name a bucket: s3://<bucket>/<prefix>, got {location!r}")


def dataset_location(cfg: Any) -> str:
    """``{data.shards_dir}/{data.name}``: a local path or a bucket URL."""
    if is_remote(cfg.shards_dir):
        return f"{cfg.shards_dir.rstrip('/')}/{cfg.name}"
    return str(Path(cfg.shards_dir) / cfg.name)
