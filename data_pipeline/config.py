"""Typed data configuration shared by prepare, the readers and the Hydra schema."""
from __future__ import annotations

from dataclasses import dataclass

from data_pipeline.locations import check_location

DATASETS = ("omniglot_ns", "omniglot_back_eval", "celeba")
READERS = ("torch", "dali", "resident")
SAMPLING = ("global", "stream")
IMAGE_FORMATS = ("npy", "png", "jpeg")
DEVICES = ("auto", "cpu", "cuda")
BINARIZE = ("dynamic", "none")


@dataclass
class DataConfig:
    """Where the raw files and shards live, how records are encoded and how sets are sampled (SPEC 5; docs/data.md).

    Readers (``reader``): ``torch`` = webdataset + torch (CPU, DataLoader workers); ``dali`` = NVIDIA DALI decodes the
    class records and flips/rotates/normalises the augmented sets (GPU when CUDA is available, else CPU);
    ``resident`` = the rank's classes live in device memory and sets are gathered/augmented there with torch ops.
    Sampling (``sampling``): ``global`` = the rank's classes are read once and every epoch permutes all their sets
    (exact SPEC 5.1 semantics); ``stream`` = every epoch the split's shards are re-shuffled and partitioned over the
    ranks, records stream through a set shuffle buffer, and every rank yields the same number of batches.
    """

    name: str = "omniglot_ns"
    raw_dir: str = "data/raw/omniglot"  # official zips (or extracted folders); downloaded when absent
    shards_dir: str = "data/shards"  # shards go to {shards_dir}/{name}/; or s3://<bucket>/<prefix> (docs/data.md)
    cache_dir: str = ""  # shards_dir in a bucket: keep verified shards here between epochs and runs ("": none)
    download: bool = True
    image_size: int = 28
    image_channels: int = 1
    classes_per_shard: int = 100
    min_shards: int = 1  # prepare: fewer classes per shard where needed so every split has >= this many shards
    image_format: str = "npy"  # record encoding: npy array, or a PNG / JPEG strip of the class's images
    jpeg_quality: int = 95
    center_crop: int = 0  # celeba: side of the centred square cut before resizing (0: the largest square)
    min_class_images: int = 0  # celeba: identities with fewer images are left out at prepare time
    split_seed: int = 0  # seeded class permutation of omniglot_ns
    set_size: int = 5  # S
    set_size_test: int = 5
    batch_sets: int = 100  # B: sets per batch (per rank)
    augment: bool = True  # SPEC 5.1: flips + one rotation per set, augmented copies added
    augment_val: bool = True
    binarize: str = "dynamic"
    reader: str = "torch"
    sampling: str = "global"
    shuffle_buffer: int = 2048  # stream sampling: sets held for shuffling (per rank)
    device: str = "auto"  # dali / resident: where batches are made (auto: the current CUDA device when present)
    dali_threads: int = 2
    num_workers: int = 0
    seed: int = 0
    limit_batches: int = 0  # >0 caps batches per epoch (smoke and demo runs)

    def __post_init__(self) -> None:
        choices = {
            "name": DATASETS, "reader": READERS, "sampling": SAMPLING, "image_format": IMAGE_FORMATS,
            "device": DEVICES, "binarize": BINARIZE,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"data.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        for key in ("set_size", "set_size_test", "batch_sets", "classes_per_shard", "image_size", "image_channels",
                    "min_shards", "shuffle_buffer", "dali_threads"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        from data_pipeline.input_spec import MAX_SET_SIZE

        for key in ("set_size", "set_size_test"):
            if getattr(self, key) > MAX_SET_SIZE:
                raise ValueError(f"data.{key} must be <= {MAX_SET_SIZE} (data_pipeline/input_spec.py), got "
                                 f"{getattr(self, key)}")
        for key in ("num_workers", "limit_batches", "center_crop", "min_class_images"):
            if getattr(self, key) < 0:
                raise ValueError(f"data.{key} must be >= 0, got {getattr(self, key)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"data.jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.image_channels not in (1, 3):
            raise ValueError(f"data.image_channels must be 1 or 3, got {self.image_channels}")
        check_location("data.shards_dir", self.shards_dir)
        if self.reader == "resident" and self.sampling != "global":
            raise ValueError("data.sampling must be 'global' with data.reader=resident (the classes live on the device)")
