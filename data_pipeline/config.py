"""Typed data configuration shared by prepare, the readers and the Hydra schema."""
from __future__ import annotations

from dataclasses import dataclass

DATASETS = ("omniglot_ns", "omniglot_back_eval")
READERS = ("torch",)
BINARIZE = ("dynamic", "none")


@dataclass
class DataConfig:
    """Where the raw files and shards live and how sets are sampled (SPEC 5)."""

    name: str = "omniglot_ns"
    raw_dir: str = "data/raw/omniglot"  # official zips (or extracted folders); downloaded when absent
    shards_dir: str = "data/shards"  # shards go to {shards_dir}/{name}/
    download: bool = True
    image_size: int = 28
    image_channels: int = 1
    classes_per_shard: int = 100
    split_seed: int = 0  # seeded class permutation of omniglot_ns
    set_size: int = 5  # S
    set_size_test: int = 5
    batch_sets: int = 100  # B: sets per batch (per rank)
    augment: bool = True  # SPEC 5.1: flips + one rotation per set, augmented copies added
    augment_val: bool = True
    binarize: str = "dynamic"
    reader: str = "torch"
    num_workers: int = 0
    seed: int = 0
    limit_batches: int = 0  # >0 caps batches per epoch (smoke and demo runs)

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"data.name must be one of {DATASETS}, got {self.name!r}")
        if self.reader not in READERS:
            raise ValueError(f"data.reader must be one of {READERS}, got {self.reader!r}")
        if self.binarize not in BINARIZE:
            raise ValueError(f"data.binarize must be one of {BINARIZE}, got {self.binarize!r}")
        for key in ("set_size", "set_size_test", "batch_sets", "classes_per_shard", "image_size", "image_channels"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("num_workers", "limit_batches"):
            if getattr(self, key) < 0:
                raise ValueError(f"data.{key} must be >= 0, got {getattr(self, key)}")
