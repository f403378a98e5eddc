"""The one way to build a split's set loader from the config: ``data.sampling`` picks the sampler, ``data.reader``
the reader inside it (docs/data.md has the table)."""
from __future__ import annotations

from typing import Union

from .config import DataConfig
from .sets import SetLoader
from .stream import StreamSetLoader

Loader = Union[SetLoader, StreamSetLoader]


def make_set_loader(cfg: DataConfig, split: str, rank: int = 0, world_size: int = 1) -> Loader:
    """``SetLoader`` (``sampling=global``: reader torch, dali or resident) or ``StreamSetLoader``
    (``sampling=stream``: reader torch or dali) of ``split`` for ``rank`` of ``world_size``."""
    if cfg.sampling == "stream":
        return StreamSetLoader(cfg, split, rank, world_size)
    return SetLoader(cfg, split, rank, world_size)
