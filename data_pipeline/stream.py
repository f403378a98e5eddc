"""Streaming set sampler (``data.sampling=stream``): shards -> class records -> sets -> shuffle buffer -> batches.

For data that should not sit in every rank's memory (CelebA and larger RGB sets); Omniglot works too. Per epoch:

1. **Shards, re-drawn every epoch** ("resampled"): the split's shards are permuted with a generator seeded by
   ``(seed, split, epoch)`` -- the same permutation on every rank (val/test: epoch 0, test: stored order).
2. **Node split**: the records, in that shard order, are cut into ``world_size`` contiguous ranges
   ``[floor(N r / W), floor(N (r + 1) / W))``; rank ``r`` reads range ``r``. This is DALI's own
   ``shard_id``/``num_shards`` partition, so the torch and the DALI reader give a rank the same classes. Within an
   epoch the ranks' classes are disjoint and together cover the split; across epochs every rank sees every shard.
3. **Worker split** (``reader=torch``): the rank's shards are dealt round-robin to its ``num_workers`` DataLoader
   workers (webdataset ``split_by_worker``); ``reader=dali`` reads with ``dali_threads`` threads and also shuffles
   records in a buffer. A split with fewer shards than ``world_size x workers`` leaves readers idle (each rank's range
   still starts and ends mid-shard as needed): a warning says to prepare with smaller ``data.classes_per_shard`` or a
   larger ``data.min_shards``.
4. **Sets**: each class is cut into sets exactly as in :mod:`data_pipeline.sets` (its images shuffled, chunks of
   S, remainder dropped, plus an augmented copy of each set with one flip/rotation shared by its members), with a
   generator seeded by ``(seed, split, epoch, class)`` -- independent of the arrival order.
5. **Shuffle buffer**: sets wait in a buffer of ``data.shuffle_buffer`` sets; every batch takes ``batch_sets`` of
   them at random (train and val; the test split keeps the stream order).
6. **Fixed epoch length**: every rank yields ``len(loader)`` = the minimum over ranks of its batches this epoch
   (computed from the manifest, so all ranks agree without communication); extra sets of a richer rank are dropped.

Batches are the same float ``(B, S, C, H, W)`` as the global sampler's (augmentation and binarisation by
:func:`data_pipeline.sets.make_batch`). The stream is deterministic for a given world size and worker count, so
resuming at batch k replays the epoch's stream and skips k batches (records are re-read; no sets are augmented).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Iterator

import numpy as np
import torch

from .config import DataConfig
from .errors import DataError
from .reader import stream_classes
from .sets import _SPLIT_CODE, EpochState, loader_device, make_batch, short_class_warning
from .shard_source import source_of
from .shards import IMAGE_EXTENSIONS, SPLITS

_SHARD_ORDER, _CLASS_SETS, _BUFFER = 1, 2, 3  # seed-stream tags


def partition(records: list[tuple[int, int, str]], world_size: int) -> list[list[tuple[int, int, str]]]:
    """Contiguous ranges ``[floor(N r / W), floor(N (r + 1) / W))`` of ``records`` (DALI's shard partition)."""
    n = len(records)
    return [records[n * r // world_size : n * (r + 1) // world_size] for r in range(world_size)]


class StreamSetLoader(EpochState):
    """One rank's streamed batches of sets for one split (see the module docstring); same interface as
    :class:`data_pipeline.sets.SetLoader`: ``len()``, ``set_epoch``, ``state_dict``/``load_state_dict``, iteration,
    ``last_batch_classes``; ``class_indices`` are the classes this rank reads in the current epoch."""

    def __init__(self, cfg: DataConfig, split: str, rank: int = 0, world_size: int = 1):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if cfg.reader == "resident":
            raise ValueError("data.sampling=stream does not work with data.reader=resident")
        self.cfg, self.split, self.rank, self.world_size = cfg, split, rank, world_size
        self.source = source_of(cfg)  # data_pipeline/shard_source.py: a directory or a bucket
        self.directory = self.source.location
        self.manifest = self.source.verify(cfg.name, splits=[split])
        if split not in self.manifest["splits"]:
            raise DataError(f"dataset {cfg.name!r} has no split {split!r}")
        self.image_shape = tuple(int(v) for v in self.manifest["image_shape"])
        self.member = IMAGE_EXTENSIONS[self.manifest["preparation"].get("image_format", "npy")]
        self.set_size = cfg.set_size_test if split == "test" else cfg.set_size
        self.batch_sets = cfg.batch_sets
        self.augment = cfg.augment and (split == "train" or (split == "val" and cfg.augment_val))
        self.shuffle = split != "test" or cfg.limit_batches > 0  # a part of the test split: a random subset
        self.drop_last = split == "train"
        self.binarize = cfg.binarize == "dynamic"
        self.reader = cfg.reader
        self.device = loader_device(cfg)
        self._augmenter = None
        self.shards: list[dict[str, Any]] = self.manifest["splits"][split]["shards"]
        classes = [(int(ci), int(n), s["file"]) for s in self.shards for ci, n in zip(s["class_indices"], s["class_images"])]
        if not classes:
            raise DataError(f"{self.directory}: split {split!r} of {cfg.name} has no classes")
        short_class_warning(cfg.name, split, self.set_size, classes)
        if not any(n >= self.set_size for _, n, _ in classes):
            raise DataError(f"{self.directory}: split {split!r} has no class with at least S={self.set_size} images")
        readers = world_size * (max(1, cfg.num_workers) if cfg.reader == "torch" else 1)
        if len(self.shards) < readers:
            warnings.warn(
                f"{cfg.name}/{split}: {len(self.shards)} shards for {world_size} rank(s) x "
                f"{max(1, cfg.num_workers) if cfg.reader == 'torch' else 1} reader(s): ranks share shards (each "
                f"reads only its records) and some readers idle; prepare again with data.min_shards>={readers} "
                f"(or a smaller data.classes_per_shard)",
                stacklevel=2,
            )
        self.epoch = 0
        self._start = self._done = 0
        self.last_batch_classes: np.ndarray | None = None
        self._epoch_changed()

    # ---------------------------------------------------------------- the epoch's layout
    def _key(self) -> int:
        return self.epoch if self.split == "train" else 0

    def _seq(self, tag: int, *extra: int) -> np.random.SeedSequence:
        return np.random.SeedSequence([self.cfg.seed, _SPLIT_CODE[self.split], self._key(), tag, *extra])

    def shard_order(self) -> list[dict[str, Any]]:
        """This epoch's shard order (the same on every rank)."""
        if not self.shuffle:
            return list(self.shards)
        order = np.random.default_rng(self._seq(_SHARD_ORDER)).permutation(len(self.shards))
        return [self.shards[i] for i in order]

    def _epoch_changed(self) -> None:
        self._order = self.shard_order()
        records = [(int(ci), int(n), s["file"]) for s in self._order for ci, n in zip(s["class_indices"], s["class_images"])]
        parts = partition(records, self.world_size)
        copies = 2 if self.augment else 1
        sets = [copies * sum(n // self.set_size for _, n, _ in p) for p in parts]
        rounding = math.floor if self.drop_last else math.ceil
        batches = min(rounding(s / self.batch_sets) for s in sets)
        if self.cfg.limit_batches > 0:
            batches = min(batches, self.cfg.limit_batches)
        if batches == 0:
            poorest = int(np.argmin(sets))
            raise DataError(
                f"{self.directory}: split {self.split!r} yields no batch for rank {poorest} in epoch {self.epoch} "
                f"({sets[poorest]} sets of S={self.set_size}, batch_sets={self.batch_sets}, "
                f"world_size={self.world_size}); lower data.batch_sets or the world size"
            )
        self._len = batches
        self._part = parts[self.rank]
        self.class_indices = [ci for ci, _, _ in self._part]
        self.sets_per_epoch = sets[self.rank]

    # ---------------------------------------------------------------- records
    def _records(self) -> Iterator[tuple[int, torch.Tensor]]:
        part = self._part
        if not part:
            return
        keep = {ci for ci, _, _ in part}
        if self.reader == "dali":
            yield from self._dali_records(keep)
            return
        files = list(dict.fromkeys(f for _, _, f in part))
        workers = self.cfg.num_workers if len(files) > 1 else 0
        all_files = [s["file"] for s in self._order]
        for ci, images in stream_classes(self.source, all_files, files, keep, workers):
            yield ci, torch.from_numpy(images)

    def _dali_records(self, keep: set[int]) -> Iterator[tuple[int, torch.Tensor]]:
        from .dali import ClassReader

        indexed = all("index_file" in s for s in self._order)
        reader = ClassReader(
            [self.source.local_path(s["file"]) for s in self._order],
            [self.source.local_path(s["index_file"]) for s in self._order] if indexed else None,
            self.member, self.image_shape, len(self._part), self.device,
            shard_id=self.rank, num_shards=self.world_size, shuffle=self.shuffle,
            seed=int(self._seq(_BUFFER, self.rank, 1).generate_state(1)[0]), threads=self.cfg.dali_threads,
        )
        try:
            for ci, images in reader:
                if ci not in keep:
                    raise DataError(
                        f"{self.directory}: DALI gave rank {self.rank} class {ci}, outside its partition of split "
                        f"{self.split!r} (DALI's shard_id/num_shards rule changed?)"
                    )
                yield ci, images
        finally:
            reader.close()

    def _sets(self) -> Iterator[tuple[int, torch.Tensor, bool, bool, bool, float]]:
        """``(class, uint8 (S, C, H, W), augmented, hflip, vflip, angle)`` of every set, class by class."""
        s = self.set_size
        expected = {ci: n for ci, n, _ in self._part}
        for ci, images in self._records():
            if len(images) != expected[ci] or tuple(images.shape[1:]) != self.image_shape:
                raise DataError(
                    f"{self.directory}: class {ci} of split {self.split!r} holds {tuple(images.shape)} images, the "
                    f"manifest says {expected[ci]} x {self.image_shape}"
                )
            k = len(images) // s
            if k == 0:
                continue
            rng = np.random.default_rng(self._seq(_CLASS_SETS, ci))
            members = rng.permutation(len(images))[: k * s].reshape(k, s)
            hflip, vflip, angle = rng.random(k) < 0.5, rng.random(k) < 0.5, rng.uniform(0.0, 360.0, k)
            images = images.to(self.device)
            for j in range(k):
                x = images[torch.from_numpy(members[j]).to(self.device)]
                yield ci, x, False, False, False, 0.0
                if self.augment:
                    yield ci, x, True, bool(hflip[j]), bool(vflip[j]), float(angle[j])

    def _batches(self) -> Iterator[list[tuple]]:
        """Lists of set entries, one per batch, ``len(self)`` of them."""
        b_size = self.batch_sets
        capacity = max(self.cfg.shuffle_buffer, b_size) if self.shuffle else b_size
        rng = np.random.default_rng(self._seq(_BUFFER, self.rank, self.world_size))
        buffer: list[tuple] = []
        emitted = 0
        for entry in self._sets():
            buffer.append(entry)
            if len(buffer) >= capacity:
                if self.shuffle:
                    pick = rng.choice(len(buffer), b_size, replace=False)
                    chosen = set(pick.tolist())
                    batch = [buffer[i] for i in pick]
                    buffer = [e for i, e in enumerate(buffer) if i not in chosen]
                else:
                    batch, buffer = buffer[:b_size], buffer[b_size:]
                yield batch
                emitted += 1
                if emitted == self._len:
                    return
        if self.shuffle:
            buffer = [buffer[i] for i in rng.permutation(len(buffer))]
        while buffer and emitted < self._len:
            batch, buffer = buffer[:b_size], buffer[b_size:]
            if len(batch) < b_size and self.drop_last:
                break
            yield batch
            emitted += 1
        if emitted < self._len:
            raise DataError(
                f"{self.directory}: rank {self.rank} streamed {emitted} batches of split {self.split!r}, expected "
                f"{self._len} (shards changed since the manifest was written?)"
            )

    def __iter__(self) -> Iterator[torch.Tensor]:
        start, self._start = self._start, 0
        self._done = start
        for b, entries in enumerate(self._batches()):
            if b < start:
                continue
            classes, images, augmented, hflip, vflip, angle = zip(*entries)
            self.last_batch_classes = np.array(classes, dtype=np.int64)
            seed = np.random.SeedSequence(
                [self.cfg.seed, _SPLIT_CODE[self.split], self._key(), self.rank, self.world_size, b]
            )
            batch = make_batch(self, torch.stack(images), np.array(augmented, bool), np.array(hflip, bool),
                               np.array(vflip, bool), np.array(angle, np.float64), seed)
            self._done = b + 1
            yield batch
