"""Class-grouped webdataset shards: deterministic writing, DALI index files, the manifest, and verification.

Shard record format (one record = one class):

* tar members ``{key}.images.<ext>`` and ``{key}.meta.json`` (webdataset groups them into one sample with
  ``__key__ = key``), ``key = f"{class_index:05d}"``;
* the images, by ``data.image_format``:
  ``images.npy`` (``npy``): ``numpy.save`` of a uint8 array ``(n, C, H, W)``, 255 = full ink (Omniglot:
  ``(20, 1, 28, 28)``); ``images.png`` / ``images.jpg`` (``png`` / ``jpeg``): one image strip holding the class's
  ``n`` square images stacked vertically (``n*H`` x ``W``, greyscale or RGB), so DALI decodes a class in one call
  (on the GPU for JPEG) and a reshape gives ``(n, H, W, C)``;
* ``meta.json``: ``{"class_index": int, "name": str, "split": "train"|"val"|"test"}``.

Shards are ``{split}-{index:06d}.tar`` with ``classes_per_shard`` records each (the last one of a split may hold
fewer), each with a DALI/webdataset index ``{split}-{index:06d}.idx`` (format ``v1.2``: per sample, ``ext offset
size name`` of each member). Tar members carry fixed metadata (mtime 0, uid/gid 0, empty user/group names, mode
0644) in a fixed order, so the same records always give byte-identical shards. ``manifest.json`` (sorted keys) lists
the dataset, image shape, per-split class/image counts, every shard's and index's sha256, size and classes, and the
preparation config.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np

from .config import DATASETS
from .errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ClassRecord:
    """One class as stored in a shard."""

    class_index: int
    name: str
    split: str
    images: np.ndarray  # uint8 (n, C, H, W)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def record_key(class_index: int) -> str:
    return f"{class_index:05d}"


IMAGE_EXTENSIONS = {"npy": "images.npy", "png": "images.png", "jpeg": "images.jpg"}
IMAGE_MEMBERS = tuple(IMAGE_EXTENSIONS.values())


def encode_images(images: np.ndarray, image_format: str = "npy", jpeg_quality: int = 95) -> bytes:
    """uint8 ``(n, C, H, W)`` -> the bytes of ``images.npy`` or of a vertical PNG/JPEG strip (deterministic)."""
    if image_format == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(images), allow_pickle=False)
        return buf.getvalue()
    from PIL import Image

    n, c, h, w = images.shape
    if h != w or c not in (1, 3):
        raise ValueError(f"image strips need square greyscale or RGB images, got (n, C, H, W) = {images.shape}")
    strip = np.ascontiguousarray(images.transpose(0, 2, 3, 1).reshape(n * h, w, c))
    img = Image.fromarray(strip[:, :, 0] if c == 1 else strip, mode="L" if c == 1 else "RGB")
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif image_format == "jpeg":  # 4:4:4: no chroma subsampling at 64 px
        img.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0, optimize=False)
    else:
        raise ValueError(f"unknown image format {image_format!r}")
    return buf.getvalue()


def encode_record(rec: ClassRecord, image_format: str = "npy", jpeg_quality: int = 95) -> list[tuple[str, bytes]]:
    """The tar members of one record, in the order they are written."""
    if rec.images.dtype != np.uint8 or rec.images.ndim != 4:
        raise ValueError(f"class {rec.name}: images must be uint8 (n, C, H, W), got {rec.images.dtype} {rec.images.shape}")
    meta = {"class_index": int(rec.class_index), "name": rec.name, "split": rec.split}
    key = record_key(rec.class_index)
    return [
        (f"{key}.{IMAGE_EXTENSIONS[image_format]}", encode_images(rec.images, image_format, jpeg_quality)),
        (f"{key}.meta.json", json.dumps(meta, sort_keys=True).encode()),
    ]


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A USTAR archive of ``members`` with fixed metadata: identical input -> identical bytes."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def index_bytes(tar_data: bytes) -> bytes:
    """The DALI webdataset index (``v1.2``) of a shard: one line per sample, ``ext offset size name`` per member.

    Members are grouped into samples by their name up to the first dot, as webdataset and DALI do.
    """
    samples: list[list[str]] = []
    last_key = None
    with tarfile.open(fileobj=io.BytesIO(tar_data), mode="r") as tar:
        for info in tar:
            if not info.isreg():
                continue
            base = info.name.rsplit("/", 1)[-1]
            key, _, ext = info.name.partition(".")
            if base.startswith(".") or not ext:
                continue
            if key != last_key:
                samples.append([])
                last_key = key
            samples[-1].append(f"{ext} {info.offset_data} {info.size} {info.name}")
    return (f"v1.2 {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples)).encode()


def index_name(shard_file: str) -> str:
    return shard_file[: -len(".tar")] + ".idx" if shard_file.endswith(".tar") else shard_file + ".idx"


def write_shard(
    path: Path, records: list[ClassRecord], image_format: str = "npy", jpeg_quality: int = 95
) -> dict[str, Any]:
    """Write one shard and its index; return its manifest entry (file, sha256, bytes, index file and sha256,
    records, class indices and image counts)."""
    data = tar_bytes(m for rec in records for m in encode_record(rec, image_format, jpeg_quality))
    Path(path).write_bytes(data)
    index = index_bytes(data)
    index_path = Path(path).with_name(index_name(Path(path).name))
    index_path.write_bytes(index)
    return {
        "file": Path(path).name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "index_file": index_path.name,
        "index_sha256": hashlib.sha256(index).hexdigest(),
        "records": len(records),
        "class_indices": [int(r.class_index) for r in records],
        "class_images": [int(len(r.images)) for r in records],
    }


def decode_images(blob: bytes, member: str = "images.npy") -> np.ndarray:
    """The bytes of an ``images.npy`` / ``images.png`` / ``images.jpg`` member -> uint8 array (n, C, H, W)."""
    if member == "images.npy":
        arr = np.load(io.BytesIO(blob), allow_pickle=False)
        if arr.dtype != np.uint8 or arr.ndim != 4:
            raise DataError(f"images.npy holds {arr.dtype} {arr.shape}, expected uint8 (n, C, H, W)")
        return arr
    if member not in IMAGE_MEMBERS:
        raise DataError(f"unknown image member {member!r} (expected one of {IMAGE_MEMBERS})")
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as img:
            img.load()
            strip = np.asarray(img if img.mode in ("L", "RGB") else img.convert("RGB"))
    except (OSError, ValueError) as e:
        raise DataError(f"{member}: undecodable image strip ({type(e).__name__}: {e})") from e
    if strip.ndim == 2:
        strip = strip[:, :, None]
    h, w, c = strip.shape
    if h % w:
        raise DataError(f"{member}: strip of {h}x{w} pixels is not a stack of {w}x{w} images")
    return np.ascontiguousarray(strip.reshape(h // w, w, w, c).transpose(0, 3, 1, 2))


def image_member(sample: dict) -> str:
    """The images member name of a webdataset sample (``images.npy``, ``images.png`` or ``images.jpg``)."""
    for member in IMAGE_MEMBERS:
        if member in sample:
            return member
    raise KeyError("images.npy|images.png|images.jpg")


def iter_shard(path: Path | BinaryIO, name: str | None = None) -> Iterator[ClassRecord]:
    """Read a shard (a file, or a file object holding one, then `name` is what messages call it) with the standard
    library (tests and tools; the training reader uses webdataset)."""
    opened = dict(fileobj=path) if hasattr(path, "read") else dict(name=path)
    path = name or path
    try:
        with tarfile.open(mode="r", **opened) as tar:
            pending: dict[str, dict[str, bytes]] = {}
            for info in tar:
                key, _, suffix = info.name.partition(".")
                f = tar.extractfile(info)
                if f is None:
                    continue
                pending.setdefault(key, {})[suffix] = f.read()
                member = next((m for m in IMAGE_MEMBERS if m in pending[key]), None)
                if member is not None and "meta.json" in pending[key]:
                    parts = pending.pop(key)
                    meta = json.loads(parts["meta.json"])
                    images = decode_images(parts[member], member)
                    yield ClassRecord(meta["class_index"], meta["name"], meta["split"], images)
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise DataError(f"{path}: unreadable shard ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------------------------------------ manifest
def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_NUMBER_LIST = re.compile(r"\[\s*(-?\d+(?:\s*,\s*-?\d+)*)\s*\]")


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """Sorted-key, indented JSON with integer lists kept on one line (deterministic)."""
    text = json.dumps(manifest, indent=1, sort_keys=True)
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    return (text + "\n").encode()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{path} is missing: {directory} holds no prepared dataset. Run `python -m launch.prepare data=<name>` "
            f"(or data_pipeline.prepare.ensure_prepared) first."
        )
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: unreadable manifest ({type(e).__name__}: {e}); prepare the dataset again") from e
    return parse_manifest(raw, str(path))


def parse_manifest(raw: bytes, path: str) -> dict[str, Any]:
    """The manifest in `raw` (read from `path`, a file or an object URL), checked for the keys readers need."""
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({type(e).__name__}: {e}); prepare the dataset again") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise DataError(f"{path}: manifest format_version {version!r}, expected {FORMAT_VERSION}; prepare again")
    for key in ("dataset", "image_shape", "splits", "preparation"):
        if key not in manifest:
            raise DataError(f"{path}: manifest lacks {key!r}; prepare the dataset again")
    return manifest


def verify_shards(
    directory: str | Path,
    name: str | None = None,
    splits: Iterable[str] | None = None,
    check_sha256: bool = True,
) -> dict[str, Any]:
    """Check a prepared dataset directory against its manifest; return the manifest.

    ``name`` is the dataset the caller expects (default: the directory's name when it is a known dataset).
    Raises :class:`DataError` naming the file for: a missing or unreadable manifest, a manifest of another dataset,
    a missing shard, a shard of the wrong size (truncated or appended to), and a sha256 mismatch.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    expected = name if name is not None else (directory.name if directory.name in DATASETS else None)
    if expected is not None and manifest["dataset"] != expected:
        raise DataError(
            f"{directory / MANIFEST}: manifest is for dataset {manifest['dataset']!r}, expected {expected!r}; "
            f"the directory holds another dataset's shards"
        )
    for split in splits if splits is not None else manifest["splits"]:
        if split not in manifest["splits"]:
            raise DataError(f"{directory / MANIFEST}: dataset {manifest['dataset']!r} has no split {split!r}")
        for shard in manifest["splits"][split]["shards"]:
            path = directory / shard["file"]
            if not path.is_file():
                raise DataError(f"{path}: shard listed in {directory / MANIFEST} is missing")
            size = path.stat().st_size
            if size != shard["bytes"]:
                problem = "truncated" if size < shard["bytes"] else "larger than recorded"
                raise DataError(f"{path}: shard is {problem} ({size} bytes, manifest says {shard['bytes']})")
            if check_sha256:
                digest = sha256_file(path)
                if digest != shard["sha256"]:
                    raise DataError(
                        f"{path}: shard is corrupt: sha256 {digest} does not match the manifest's {shard['sha256']}"
                    )
            if "index_file" in shard:  # older datasets have none (DALI then builds the index itself)
                index = directory / shard["index_file"]
                if not index.is_file():
                    raise DataError(f"{index}: index listed in {directory / MANIFEST} is missing; prepare again")
                if check_sha256 and sha256_file(index) != shard["index_sha256"]:
                    raise DataError(f"{index}: index is corrupt (sha256 differs from the manifest); prepare again")
    return manifest


def split_classes(manifest: dict[str, Any], split: str) -> list[tuple[int, int, str]]:
    """``(class_index, n_images, shard file)`` of every class of ``split``, in stored order."""
    if split not in manifest["splits"]:
        raise DataError(f"dataset {manifest['dataset']!r} has no split {split!r} (has {sorted(manifest['splits'])})")
    return [
        (int(ci), int(n), shard["file"])
        for shard in manifest["splits"][split]["shards"]
        for ci, n in zip(shard["class_indices"], shard["class_images"])
    ]
