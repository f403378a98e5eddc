"""Raw sources -> class-grouped webdataset shards plus ``manifest.json`` (DESIGN "Data contract" 2).

``prepare(cfg)`` always rebuilds ``{cfg.shards_dir}/{cfg.name}``; ``ensure_prepared(cfg)`` reuses it when the
manifest's preparation config matches and every shard verifies. Both hold an exclusive lock file
(``{shards_dir}/.{name}.lock``) so concurrent ranks or jobs prepare once; the dataset is written into a temp
directory beside the target and renamed into place, so an interrupted run never leaves a half dataset.

Class indices run over the splits in the order train, val, test (omniglot_ns: train 0-999, val 1000-1199,
test 1200-1622), so keys are unique within a dataset.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from . import omniglot
from .config import DataConfig
from .errors import DataError
from .shards import (
    FORMAT_VERSION,
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
        # only omniglot_ns draws a seeded class permutation; elsewhere split_seed does not change the bytes
        "split_seed": cfg.split_seed if cfg.name == "omniglot_ns" else None,
        "sources": dict(sorted(source_sha256.items())),
    }


# ------------------------------------------------------------------------------------------------ sources
def _check_cfg(cfg: DataConfig) -> None:
    if cfg.name.startswith("omniglot") and cfg.image_channels != 1:
        raise ValueError(f"data.image_channels must be 1 for {cfg.name} (greyscale), got {cfg.image_channels}")


def _omniglot_records(
    cfg: DataConfig, progress: bool, base_url: str | None
) -> tuple[dict[str, list[ClassRecord]], dict[str, str]]:
    sources = omniglot.locate_sources(cfg.raw_dir, cfg.download, base_url=base_url, progress=progress)
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


def _write_dataset(cfg: DataConfig, records: dict[str, list[ClassRecord]], prep: dict[str, Any], tmp: Path, progress: bool) -> None:
    shape = None
    splits: dict[str, Any] = {}
    n_shards = sum(-(-len(r) // cfg.classes_per_shard) for r in records.values())
    with tqdm(total=n_shards, desc=f"write {cfg.name} shards", unit="shard", disable=not progress) as bar:
        for split in SPLITS:
            recs = records[split]
            shards = []
            for index, start in enumerate(range(0, len(recs), cfg.classes_per_shard)):
                chunk = recs[start : start + cfg.classes_per_shard]
                for rec in chunk:
                    if shape is None:
                        shape = list(rec.images.shape[1:])
                    elif list(rec.images.shape[1:]) != shape:
                        raise DataError(f"class {rec.name}: image shape {rec.images.shape[1:]} differs from {shape}")
                shards.append(write_shard(tmp / shard_name(split, index), chunk))
                bar.update(1)
            splits[split] = {
                "classes": len(recs),
                "images": int(sum(len(r.images) for r in recs)),
                "shards": shards,
            }
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": cfg.name,
        "image_shape": shape,
        "dtype": "uint8",
        "pixel_values": "0..255, 255 = full ink (intensity = value / 255)",
        "record": {
            "__key__": "class_index as %05d",
            "images.npy": "numpy .npy, uint8 (n, C, H, W)",
            "meta.json": "{class_index, name, split}",
        },
        "classes": sum(s["classes"] for s in splits.values()),
        "images": sum(s["images"] for s in splits.values()),
        "splits": splits,
        "preparation": prep,
    }
    (tmp / MANIFEST).write_bytes(manifest_bytes(manifest))


def _prepare_locked(cfg: DataConfig, progress: bool, base_url: str | None) -> Path:
    _check_cfg(cfg)
    out = dataset_dir(cfg)
    if cfg.name.startswith("omniglot"):
        records, sources = _omniglot_records(cfg, progress, base_url)
    else:  # pragma: no cover - DataConfig validates the name
        raise ValueError(f"data.name {cfg.name!r} has no source")
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
def prepare(cfg: DataConfig, progress: bool = True, *, base_url: str | None = None) -> Path:
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
    directory = dataset_dir(cfg) if directory is None else Path(directory)
    if not (directory / MANIFEST).exists():
        return f"{directory / MANIFEST} does not exist"
    manifest = verify_shards(directory, cfg.name)  # a damaged dataset is an error, never silently rebuilt
    have = manifest["preparation"]
    want = preparation_config(cfg, have.get("sources", {}))
    for key in want:
        if key != "sources" and have.get(key) != want[key]:
            return f"{directory / MANIFEST}: preparation {key}={have.get(key)!r}, config asks for {want[key]!r}"
    if cfg.name.startswith("omniglot") and omniglot.sources_present(cfg.raw_dir):
        # raw data at hand: the shards must come from these very files
        local = {s: src.sha256 for s, src in omniglot.locate_sources(cfg.raw_dir, download=False).items()}
        if local != have.get("sources"):
            return f"{directory / MANIFEST}: shards were prepared from other raw files than those in {cfg.raw_dir}"
    return None


def ensure_prepared(cfg: DataConfig, progress: bool = True, *, base_url: str | None = None) -> Path:
    """Reuse ``{shards_dir}/{name}`` if its manifest matches ``cfg`` and every shard verifies; prepare it when it
    is absent or was prepared with other settings; raise DataError when it is damaged.

    When the raw data is not present locally (e.g. shards prepared by a separate job), a verified dataset with a
    matching config is reused without checking source digests.
    """
    with _locked(cfg):
        reason = stale_reason(cfg)
        if reason is None:
            return dataset_dir(cfg)
        log.info("preparing %s: %s", cfg.name, reason)
        return _prepare_locked(cfg, progress, base_url)
