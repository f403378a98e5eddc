"""webdataset + torch reader: stream class records of one split from the shards.

Distribution rule (documented in :mod:`data_pipeline.sets`): a rank owns the classes whose ordinal in the split's
class list (manifest order, classes with fewer than S images removed) is ``rank`` modulo ``world_size``. The
explicit node splitter keeps only the shards that hold at least one of the rank's classes and a ``select`` stage
drops the other records; DataLoader workers then split the rank's shards with ``wds.split_by_worker``. Records come
back sorted by class index, so the result does not depend on the number of workers.

:func:`stream_classes` is the streaming form used by ``data.sampling=stream``: the records of the given shards, in
shard order (each DataLoader worker reads every K-th shard; the loader interleaves workers round-robin, so the order
is deterministic for a given number of workers), without holding the split in memory.
"""
from __future__ import annotations

import json
from typing import Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from .errors import DataError
from .shards import decode_images, image_member, record_key


class _KeepShards:
    """Explicit node splitter: pass through only the shard URLs assigned to this rank (picklable for workers)."""

    def __init__(self, keep: Iterable[str]):
        self.keep = frozenset(keep)

    def __call__(self, src):
        for item in src:
            if item["url"] in self.keep:
                yield item


class _OpenShards:
    """Open each shard through its source (a local file, or a bucket object read whole and checked against the
    manifest: data_pipeline/shard_source.py) for the tar expander, and close it once the expander asks for the
    next one. Picklable for DataLoader workers."""

    def __init__(self, source):
        self.source = source

    def __call__(self, src):
        for item in src:
            with self.source.open(item["url"]) as stream:
                yield {"url": item["url"], "stream": stream}


class _KeepClasses:
    def __init__(self, keep: Iterable[int]):
        self.keep = frozenset(record_key(i) for i in keep)

    def __call__(self, sample) -> bool:
        return sample["__key__"] in self.keep


def _decode(sample) -> tuple[int, np.ndarray]:
    try:
        meta = json.loads(sample["meta.json"])
        member = image_member(sample)
        images = decode_images(sample[member], member)
    except KeyError as e:
        raise DataError(f"record {sample.get('__key__')} in {sample.get('__url__')} lacks {e}") from e
    except (DataError, ValueError, OSError, EOFError) as e:  # bytes that are not an image array
        raise DataError(f"record {sample.get('__key__')} in {sample.get('__url__')}: undecodable images "
                        f"({type(e).__name__}: {e})") from e
    if record_key(meta["class_index"]) != sample["__key__"]:
        raise DataError(f"record {sample['__key__']} in {sample.get('__url__')} has meta class_index {meta['class_index']}")
    return int(meta["class_index"]), images


def read_classes(
    source, shard_files: list[str], keep_shards: Iterable[str], keep_classes: Iterable[int], num_workers: int = 0
) -> list[tuple[int, np.ndarray]]:
    """Stream ``shard_files`` of ``source`` (data_pipeline/shard_source.py, verified) and return
    ``(class_index, uint8 images)`` for ``keep_classes``, sorted by class index."""
    records = list(stream_classes(source, shard_files, keep_shards, keep_classes, num_workers))
    records.sort(key=lambda r: r[0])
    return records


def stream_classes(
    source, shard_files: list[str], keep_shards: Iterable[str], keep_classes: Iterable[int], num_workers: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(class_index, uint8 images (n, C, H, W))`` of ``keep_classes`` from ``keep_shards`` (a subset of
    ``shard_files``), in shard order (see the module docstring)."""
    urls = [source.url(f) for f in shard_files]
    keep_urls = [source.url(f) for f in keep_shards]
    # webdataset's own stages (node split, worker split, tar expansion, grouping into samples) composed as a
    # DataPipeline -- what wds.WebDataset(urls, nodesplitter=..., workersplitter=wds.split_by_worker,
    # shardshuffle=False) builds -- except for the opener: WebDataset's leaves every shard file open until garbage
    # collection (a ResourceWarning per shard) and opens local files only; _OpenShards closes each one as soon as it has
    # been read, and reads bucket objects through the source.
    dataset = wds.DataPipeline(
        wds.SimpleShardList(urls),
        _KeepShards(keep_urls),
        wds.split_by_worker,
        _OpenShards(source),
        tar_file_expander,
        group_by_keys,
        wds.select(_KeepClasses(keep_classes)),
        wds.map(_decode),
    )
    source = (
        dataset
        if num_workers == 0
        else torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_identity)
    )
    try:
        for ci, images in source:
            yield int(ci), np.asarray(images)
    except DataError:
        raise
    except Exception as e:  # tar / npy errors surface from webdataset with the shard URL in their args
        raise DataError(f"reading shards in {source.location} failed: {type(e).__name__}: {e}") from e


def _identity(x):
    return x
