"""Raw sources -> class-grouped webdataset shards -> set batches ``(B, S, C, H, W)``.

Public API (imported lazily so ``prepare`` works without importing torch):

* ``prepare(cfg, progress=True) -> Path`` / ``ensure_prepared(cfg, progress=True) -> Path`` (data_pipeline.prepare)
* ``verify_shards(directory, name=None) -> manifest`` (data_pipeline.shards)
* ``make_set_loader(cfg, split, rank=0, world_size=1)`` (data_pipeline.loaders): ``SetLoader`` (data_pipeline.sets,
  ``data.sampling=global``) or ``StreamSetLoader`` (data_pipeline.stream, ``data.sampling=stream``); readers torch,
  dali (data_pipeline.dali) or resident by ``data.reader``
* ``DataError`` (data_pipeline.errors), ``DataConfig`` (data_pipeline.config)
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DataConfig": "config",
    "DataError": "errors",
    "prepare": "prepare",
    "ensure_prepared": "prepare",
    "verify_shards": "shards",
    "SetLoader": "sets",
    "StreamSetLoader": "stream",
    "make_set_loader": "loaders",
    "augment_sets": "sets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
