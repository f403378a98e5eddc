"""Global batch, micro batch and gradient accumulation, derived once from the config and the world size; the
training loader that feeds each rank its part of the global batch.

    G (sets per optimizer step, all ranks) = m (sets per rank and micro step) x A (trainer.grad_accum) x W (ranks)

- `trainer.global_batch_sets: 0` (default): m = `data.batch_sets`, G follows the world size.
- `trainer.global_batch_sets: G`: G is fixed and m = G / (A x W) is derived; it must divide exactly.

`plan_batches` needs only the world size from the launcher's environment, so `launch.train` checks the
combination before any process-group work and a bad one fails with a message that names the numbers.

Training data by `trainer.data_parallel`:
- `invariant`: the sequence of global batches does not depend on W: a `SetLoader` with `batch_sets = G` as
  rank 0 of 1 (the whole split, the same seeds as a single process), and rank r keeps, in accumulation step a
  of global batch b, the sets `[(a W + r) m, (a W + r + 1) m)` of it. One process with the same G (and A) sees
  exactly the union of what the W ranks see. Every rank reads the whole split and builds the whole global batch
  (augmentation, binarisation) before slicing: W times the data work of `sharded` (Omniglot: small).
- `sharded`: `SetLoader(batch_sets = m, rank, W)`: each rank samples its own classes (ordinal r mod W).
Validation and test use `SetLoader(data.batch_sets, rank, W)` in both modes (the evaluation all-reduces sums).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, Iterator

import torch

from data_pipeline.config import DataConfig
from data_pipeline.loaders import make_set_loader
from data_pipeline.sets import SetLoader
from trainer.config import Config
from trainer.run.errors import ConfigError


class BatchConfigError(ConfigError):
    """The global batch cannot be split over this world size."""


@dataclass(frozen=True)
class BatchPlan:
    global_sets: int  # G: sets per optimizer step over all ranks
    micro_sets: int  # m: sets per rank per forward/backward
    grad_accum: int  # A
    world_size: int  # W

    def describe(self) -> str:
        return (f"global batch {self.global_sets} sets = {self.micro_sets} per rank x {self.grad_accum} "
                f"accumulation step(s) x {self.world_size} rank(s)")


def plan_batches(cfg: Config, world_size: int) -> BatchPlan:
    """G, m, A for `world_size` ranks; BatchConfigError (naming the numbers) when they do not fit."""
    t = cfg.trainer
    if world_size < 1:
        raise BatchConfigError(f"world size must be >= 1, got {world_size}")
    if t.global_batch_sets == 0:
        m = cfg.data.batch_sets
        return BatchPlan(m * t.grad_accum * world_size, m, t.grad_accum, world_size)
    per_step = t.grad_accum * world_size
    if t.global_batch_sets % per_step:
        raise BatchConfigError(
            f"trainer.global_batch_sets={t.global_batch_sets} is not divisible by world size {world_size} x "
            f"trainer.grad_accum={t.grad_accum} (= {per_step}): the per-rank micro batch would be "
            f"{t.global_batch_sets / per_step:g} sets. Use a global batch that is a multiple of {per_step}, or "
            f"another number of processes or trainer.grad_accum"
        )
    return BatchPlan(t.global_batch_sets, t.global_batch_sets // per_step, t.grad_accum, world_size)


class GlobalBatchSlices:
    """This rank's micro batches of a world-size-independent sequence of global batches (`invariant` mode).

    The interface of `SetLoader` that the loop uses: `len()` (micro batches per epoch, equal on every rank),
    `set_epoch`, `state_dict` / `load_state_dict` with `{"epoch", "batches_done"}` counted in micro batches,
    and iteration. A position inside an accumulation group resumes exactly too.
    """

    def __init__(self, data: DataConfig, split: str, plan: BatchPlan, rank: int) -> None:
        self.plan, self.rank = plan, rank
        self.inner = SetLoader(replace(data, batch_sets=plan.global_sets), split, rank=0, world_size=1)
        self.image_shape = self.inner.image_shape
        self.epoch = 0
        self._done = 0
        self._skip = 0  # micro batches of the first global batch already consumed (resume)
        self._pending = False  # a position loaded by load_state_dict, not yet iterated

    def __len__(self) -> int:
        return len(self.inner) * self.plan.grad_accum

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch, unless a position in this very epoch was just loaded."""
        if self._pending and int(epoch) == self.epoch:
            return
        self.epoch, self._done, self._skip = int(epoch), 0, 0
        self.inner.set_epoch(epoch)

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self._done}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        done = int(state["batches_done"])
        if not 0 <= done <= len(self):
            raise ValueError(f"batches_done={done} outside 0..{len(self)} for the training loader")
        a = self.plan.grad_accum
        self.epoch, self._done, self._skip, self._pending = int(state["epoch"]), done, done % a, True
        self.inner.load_state_dict({"epoch": self.epoch, "batches_done": done // a})

    def _slice(self, x: torch.Tensor, a: int) -> torch.Tensor:
        m, w = self.plan.micro_sets, self.plan.world_size
        start = (a * w + self.rank) * m
        return x[start:start + m]

    def __iter__(self) -> Iterator[torch.Tensor]:
        skip, self._skip, self._pending = self._skip, 0, False
        for x in self.inner:
            for a in range(skip, self.plan.grad_accum):
                self._done += 1
                yield self._slice(x, a)
            skip = 0


def make_loader(cfg: Config, split: str, rank: int, world_size: int):
    """The loader of `split` for this rank (see the module docstring).

    `make_set_loader` (data_pipeline.loaders) picks the set sampler by `data.sampling` (global / stream); the reader
    (`data.reader`: torch / dali / resident) is chosen inside it. The `invariant` training loader samples globally
    whatever `data.sampling` says: it forms the whole global batch on every rank.
    """
    if split != "train":
        return make_set_loader(cfg.data, split, rank, world_size)
    plan = plan_batches(cfg, world_size)
    if cfg.trainer.data_parallel == "invariant":
        return GlobalBatchSlices(cfg.data, split, plan, rank)
    return make_set_loader(replace(cfg.data, batch_sets=plan.micro_sets), split, rank, world_size)
