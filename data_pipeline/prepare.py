"""Raw sources -> class-grouped webdataset shards plus ``manifest.json`` (DESIGN "Data contract" 2).

``prepare(cfg)`` always rebuilds ``{cfg.shards_dir}/{cfg.name}``; ``ensure_prepared(cfg)`` reuses it when the
manifest's preparation config matches and every shard verifies. Both hold an exclusive lock file
(``{shards_dir}/.{name}.lock``) so concurrent ranks or jobs prepare once; the dataset is written into a temp
directory beside the target and renamed into place, so an interrupted run never leaves a half dataset.

Class indices run over the splits in the order train, val, test (omniglot_ns: train 0-999, val 1000-1199,
test 1200-1622), so keys are unique within a dataset.

Shard count: a split of ``n`` classes is cut into shards of ``max(1, min(classes_per_shard, n // min_shards))``
classes, so it has at least ``min_shards`` shards when it has that many classes. Streaming readers want at least
(ranks x workers) shards per split (``data.min_shards``); with fewer they warn (ranks then share shards, each
keeping only its records, and some workers idle).
CelebA is decoded and written identity by identity (it does not fit in memory as a whole).

``data.shards_dir=s3://<bucket>/<prefix>``: the dataset is built and verified in a local temporary directory, then
published to the bucket (data_pipeline/shard_source.py: objects first, the manifest last, unchanged objects kept).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

from tqdm import tqdm

from . import celeba, omniglot
from .config import DataConfig
from .errors import DataError
from .locations import dataset_location, is_remote
from .shard_source import BucketShards, LocalShards, source_of
from .shards import (
    FORMAT_VERSION,
    IMAGE_EXTENSIONS,
    MANIFEST,
    SPLITS,
    ClassRecord,
    manifest_bytes,
    shard_name,
    verify_shards,
    write_shard,
)

log = logging.getLogger(__name__)


def dataset_dir(cfg: DataConfig) -> Path:
    return Path(cfg.shards_dir) / cfg.name


def preparation_config(cfg: DataConfig, source_sha256: dict[str, str]) -> dict[str, Any]:
    """The fields that determine the shards' bytes (stored in the manifest, compared by ensure_prepared)."""
    return {
        "format_version": FORMAT_VERSION,
        "name": cfg.name,
        "image_size": cfg.image_size,
        "image_channels": cfg.image_channels,
        "classes_per_shard": cfg.classes_per_shard,
        "min_shards": cfg.min_shards,
        "image_format": cfg.image_format,
        "jpeg_quality": cfg.jpeg_quality if cfg.image_format == "jpeg" else None,
        # only omniglot_ns draws a seeded class permutation; elsewhere split_seed does not change the bytes
        "split_seed": cfg.split_seed if cfg.name == "omniglot_ns" else None,
        "center_crop": cfg.center_crop if cfg.name == "celeba" else None,
        "min_class_images": cfg.min_class_images if cfg.name == "celeba" else None,
        "sources": dict(sorted(source_sha256.items())),
    }


def shard_classes(cfg: DataConfig, n_classes: int) -> int:
    """Classes per shard of a split of ``n_classes`` (see the module docstring)."""
    return max(1, min(cfg.classes_per_shard, n_classes // cfg.min_shards))


class LazyRecords:
    """A split's records made on demand, in order: ``len()`` is known up front, iteration decodes."""

    def __init__(self, count: int, make: Callable[[], Iterator[ClassRecord]]):
        self.count, self.make = count, make

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[ClassRecord]:
        return self.make()


Records = Union[Sequence[ClassRecord], LazyRecords]


# ------------------------------------------------------------------------------------------------ sources
def _check_cfg(cfg: DataConfig) -> None:
    if cfg.name.startswith("omniglot") and cfg.image_channels != 1:
        raise ValueError(f"data.image_channels must be 1 for {cfg.name} (greyscale), got {cfg.image_channels}")
    if cfg.name == "celeba" and cfg.image_channels != 3:
        raise ValueError(f"data.image_channels must be 3 for celeba (RGB), got {cfg.image_channels}")


def _celeba_records(cfg: DataConfig, progress: bool) -> tuple[dict[str, Records], dict[str, str]]:
    source, splits = celeba.plan(cfg.raw_dir, cfg.min_class_images)
    total = sum(len(files) for ids in splits.values() for _, files in ids)
    bar = tqdm(total=total, desc=f"decode {cfg.name}", unit="img", disable=not progress)
    records: dict[str, Records] = {}
    first = 0
    for split in SPLITS:
        ids = splits[split]

        def make(ids=ids, first=first, split=split) -> Iterator[ClassRecord]:
            images = celeba.iter_identity_images(source, ids, cfg.image_size, cfg.center_crop)
            for k, ((identity, _), imgs) in enumerate(zip(ids, images)):
                bar.update(len(imgs))
                yield ClassRecord(first + k, str(identity), split, imgs)

        records[split] = LazyRecords(len(ids), make)
        first += len(ids)
    return records, {"celeba": source.sha256}


def _omniglot_records(
    cfg: DataConfig, progress: bool, base_url: str | None
) -> tuple[dict[str, list[ClassRecord]], dict[str, str]]:
    sources = omniglot.locate_sources(cfg.raw_dir, cfg.download, base_url=base_url)
    for src in sources.values():
        omniglot.check_official(src)  # a warning only: the content checks below decide
    chars = {s: omniglot.list_characters(src) for s, src in sources.items()}
    total = sum(len(c) for c in chars.values()) * omniglot.IMAGES_PER_CHARACTER
    images = {}
    with tqdm(total=total, desc=f"decode {cfg.name}", unit="img", disable=not progress) as bar:
        for subset, src in sources.items():
            images[subset] = omniglot.load_source(src, chars[subset], cfg.image_size, on_progress=bar.update)
    position = {(s, c.name): (s, i) for s, cs in chars.items() for i, c in enumerate(cs)}
    splits = omniglot.assign_splits(cfg.name, chars["images_background"], chars["images_evaluation"], cfg.split_seed)
    records: dict[str, list[ClassRecord]] = {}
    class_index = 0
    for split in SPLITS:
        records[split] = []
        for ch in splits[split]:
            subset, i = position[(ch.subset, ch.name)]
            records[split].append(ClassRecord(class_index, ch.name, split, images[subset][i]))
            class_index += 1
    return records, {s: src.sha256 for s, src in sources.items()}


# ------------------------------------------------------------------------------------------------ locking / writing
@contextlib.contextmanager
def _locked(cfg: DataConfig) -> Iterator[None]:
    if is_remote(cfg.shards_dir):  # no lock across nodes; concurrent preparations upload the same bytes
        yield
        return
    root = Path(cfg.shards_dir)
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    with open(root / f".{cfg.name}.lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write_dataset(cfg: DataConfig, records: dict[str, Records], prep: dict[str, Any], tmp: Path, progress: bool) -> None:
    shape = None
    splits: dict[str, Any] = {}
    n_shards = sum(math.ceil(len(r) / shard_classes(cfg, len(r))) for r in records.values())
    with tqdm(total=n_shards, desc=f"write {cfg.name} shards", unit="shard", disable=not progress) as bar:
        for split in SPLITS:
            recs: Iterable[ClassRecord] = records.get(split, [])
            n = len(recs)  # type: ignore[arg-type]
            per_shard = shard_classes(cfg, n)
            it = iter(recs)
            shards, images = [], 0
            for index in range(math.ceil(n / per_shard)):
                chunk = list(itertools.islice(it, per_shard))
                for rec in chunk:
                    if shape is None:
                        shape = list(rec.images.shape[1:])
                    elif list(rec.images.shape[1:]) != shape:
                        raise DataError(f"class {rec.name}: image shape {rec.images.shape[1:]} differs from {shape}")
                    images += len(rec.images)
                shards.append(write_shard(tmp / shard_name(split, index), chunk, cfg.image_format, cfg.jpeg_quality))
                bar.update(1)
            splits[split] = {"classes": n, "images": int(images), "shards": shards}
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": cfg.name,
        "image_shape": shape,
        "dtype": "uint8",
        "pixel_values": "0..255 (intensity = value / 255; Omniglot: 255 = full ink)",
        "record": {
            "__key__": "class_index as %05d",
            IMAGE_EXTENSIONS[cfg.image_format]: (
                "numpy .npy, uint8 (n, C, H, W)" if cfg.image_format == "npy"
                else f"{cfg.image_format} strip: the n square images stacked vertically (n*H x W)"
            ),
            "meta.json": "{class_index, name, split}",
        },
        "classes": sum(s["classes"] for s in splits.values()),
        "images": sum(s["images"] for s in splits.values()),
        "splits": splits,
        "preparation": prep,
    }
    (tmp / MANIFEST).write_bytes(manifest_bytes(manifest))


def _records_of(cfg: DataConfig, progress: bool, base_url: str | None) -> tuple[dict[str, Records], dict[str, str]]:
    if cfg.name.startswith("omniglot"):
        return _omniglot_records(cfg, progress, base_url)
    if cfg.name == "celeba":
        return _celeba_records(cfg, progress)
    raise ValueError(f"data.name {cfg.name!r} has no source")  # pragma: no cover - DataConfig validates the name


def _prepare_to_bucket(cfg: DataConfig, progress: bool, base_url: str | None) -> str:
    """Build the dataset in a local temporary directory, verify it, then publish it to the bucket (objects the
    bucket's manifest already lists with the same sha256 are kept: re-running rewrites nothing)."""
    bucket = BucketShards(dataset_location(cfg))
    bucket.check_access()  # bad credentials or a missing bucket: before minutes of decoding
    records, sources = _records_of(cfg, progress, base_url)
    tmp = Path(tempfile.mkdtemp(prefix=f"prepare-{cfg.name}-"))
    try:
        _write_dataset(cfg, records, preparation_config(cfg, sources), tmp, progress)
        verify_shards(tmp, cfg.name)
        written, kept = bucket.publish(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %s in %s (%d objects written, %d unchanged)", cfg.name, bucket.location, written, kept)
    return bucket.location


def _prepare_locked(cfg: DataConfig, progress: bool, base_url: str | None) -> Path | str:
    _check_cfg(cfg)
    if is_remote(cfg.shards_dir):
        return _prepare_to_bucket(cfg, progress, base_url)
    out = dataset_dir(cfg)
    records, sources = _records_of(cfg, progress, base_url)
    prep = preparation_config(cfg, sources)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed run (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    for stale in out.parent.glob(f".{out.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.with_name(f".{out.name}.tmp-{tag}")
    old = out.with_name(f".{out.name}.old-{tag}")
    tmp.mkdir(parents=True)
    try:
        _write_dataset(cfg, records, prep, tmp, progress)
        verify_shards(tmp, cfg.name)
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
    log.info("prepared %s in %s", cfg.name, out)
    return out


# ------------------------------------------------------------------------------------------------ public API
def prepare(cfg: DataConfig, progress: bool = True, *, base_url: str | None = None) -> Path | str:
    """(Re)build the shards of ``cfg.name`` under ``{cfg.shards_dir}/{cfg.name}``; return that directory.

    ``base_url`` overrides the official download location (tests serve files from a local HTTP server).
    """
    with _locked(cfg):
        return _prepare_locked(cfg, progress, base_url)


def stale_reason(cfg: DataConfig, directory: Path | None = None) -> str | None:
    """Why the prepared dataset cannot be reused (None: it can). Never downloads; hashes local raw data if present.

    Raises DataError when the dataset is there but damaged (missing, truncated or altered shard, or a manifest of
    another dataset): storage that changed under us must be looked at, not papered over. `launch.prepare`
    rebuilds it deliberately.
    """
    source = source_of(cfg) if directory is None else LocalShards(directory)
    where = source.url(MANIFEST)
    if not source.exists():
        return f"{where} does not exist"
    # a damaged dataset is an error, never silently rebuilt (a bucket: every object there with its size; each
    # object's sha256 is checked as it is read)
    manifest = source.verify(cfg.name)
    have = manifest["preparation"]
    want = preparation_config(cfg, have.get("sources", {}))
    for key in want:
        if key != "sources" and have.get(key) != want[key]:
            return f"{where}: preparation {key}={have.get(key)!r}, config asks for {want[key]!r}"
    if cfg.name.startswith("omniglot") and omniglot.sources_present(cfg.raw_dir):
        # raw data at hand: the shards must come from these very files
        local = {s: src.sha256 for s, src in omniglot.locate_sources(cfg.raw_dir, download=False).items()}
        if local != have.get("sources"):
            return f"{where}: shards were prepared from other raw files than those in {cfg.raw_dir}"
    if cfg.name == "celeba" and celeba.sources_present(cfg.raw_dir):
        if {"celeba": celeba.locate_source(cfg.raw_dir).sha256} != have.get("sources"):
            return f"{where}: shards were prepared from other raw files than those in {cfg.raw_dir}"
    return None


def ensure_prepared(cfg: DataConfig, progress: bool = True, *, base_url: str | None = None) -> Path | str:
    """Reuse ``{shards_dir}/{name}`` if its manifest matches ``cfg`` and every shard verifies; prepare it when it
    is absent or was prepared with other settings; raise DataError when it is damaged.

    When the raw data is not present locally (e.g. shards prepared by a separate job), a verified dataset with a
    matching config is reused without checking source digests.
    """
    with _locked(cfg):
        reason = stale_reason(cfg)
        if reason is None:
            return dataset_dir(cfg) if not is_remote(cfg.shards_dir) else dataset_location(cfg)
        log.info("preparing %s: %s", cfg.name, reason)
        return _prepare_locked(cfg, progress, base_url)
