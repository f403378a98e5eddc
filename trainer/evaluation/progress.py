"""What a long evaluation says about itself: at start, how much work each pass holds (classes, sets, images,
importance samples), counted from the loaders; while it runs, one tqdm bar per pass on stderr with the time left.

Bars are on even when stderr is not a terminal: a job run by a scheduler or a test shows its progress in the log
(at most one refresh a second).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Work:
    """One pass over a loader: `sets` sets of `set_size` images from `classes` classes (`of_sets`: what the
    split holds at this set size; fewer are read when eval.max_batches caps the batches)."""

    what: str  # e.g. "test classes", "mnist test classes"
    classes: int
    sets: int
    of_sets: int
    set_size: int

    @property
    def images(self) -> int:
        return self.sets * self.set_size


def loader_work(loader, what: str) -> Work:
    """The work of one pass over a SetLoader (data_pipeline/sets.py) or TransferSets (data_pipeline/mnist.py):
    `len(loader)` batches of `batch_sets` sets, the last one partial when the split runs out."""
    if hasattr(loader, "sets_per_epoch"):  # SetLoader: this rank's usable classes and their sets
        classes, total = len(loader.class_indices), loader.sets_per_epoch
    else:  # TransferSets
        classes, total = len(loader.data.classes), len(loader.sets)
    return Work(what, classes, min(total, len(loader) * loader.batch_sets), total, loader.set_size)


def describe(job: str, work: Work, k: Optional[int] = None, chunk: Optional[int] = None) -> str:
    text = (f"eval={job}: {work.classes} {work.what} -> {work.sets} sets x {work.set_size} images = "
            f"{work.images} images")
    if work.sets < work.of_sets:
        text += f" (a seeded random subset of its {work.of_sets} sets: eval.max_batches)"
    if k is not None:
        text += f", K={k} importance samples each ({work.images * k:,} forward images)"
        if chunk is not None:
            text += f" in chunks of {chunk}"
    return text


def announce(job: str, work: Work, k: Optional[int] = None, chunk: Optional[int] = None) -> None:
    log.info("%s", describe(job, work, k, chunk))


def bar(total: int, desc: str, unit: str = "set") -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, mininterval=1.0, dynamic_ncols=True)


def tracked(batches: Iterable[torch.Tensor], work: Work, desc: str) -> Iterator[torch.Tensor]:
    """The batches, advancing a bar by each batch's sets once the consumer is done with it."""
    with bar(work.sets, desc) as progress:
        for x in batches:
            yield x
            progress.update(x.shape[0])
