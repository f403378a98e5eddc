"""CelebA source: ``img_align_celeba`` (folder or zip) plus ``identity_CelebA.txt`` (SPEC 5.5; DESIGN "Data contract" 1).

What this module guarantees:

* **Locating raw data** (:func:`locate_source`): the images are ``raw_dir/img_align_celeba.zip`` or the extracted
  folder ``raw_dir/img_align_celeba/`` (also accepted under ``raw_dir/Img/``, the official Google Drive layout, and
  the doubly nested folder an in-place unzip makes); the identity list is ``raw_dir/identity_CelebA.txt`` (or
  ``raw_dir/Anno/identity_CelebA.txt``). CelebA has no stable direct download URL and may not be redistributed, so a
  missing file is a :class:`DataError` that says what to put where.
* **Identities** (:func:`read_identities`): every line is ``<file name> <identity>``; a malformed line, an identity
  file without entries, or a listed image missing from the images raises :class:`DataError` naming the file (and
  line). Images of an identity are kept in file-name order. Identities with fewer than ``data.min_class_images``
  images are left out (0: keep all).
* **Split** (:func:`split_identities`): identities sorted by number; the first ``floor(0.7 n)`` are train, the next
  up to ``floor(0.8 n)`` val, the rest test (70/10/20 %; the reference's 6,349 identities give 4,444 / 635 / 1,270).
* **Images** (:func:`load_image`): RGB; the centred square of side ``data.center_crop`` (0: the largest, 178 px for
  the aligned 178x218 images) is cut out, then resized to ``image_size`` with PIL's BOX filter (area average, as the
  reference's preprocessing of the 64x64 RGB sets). uint8 ``(3, H, W)``; deterministic.

This module imports no torch.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from .errors import DataError
from .shards import sha256_file

IMAGES = "img_align_celeba"
IDENTITY_FILE = "identity_CelebA.txt"
ALIGNED_SHORT_SIDE = 178  # img_align_celeba images are 178 x 218
SPLIT_FRACTIONS = (0.7, 0.8)  # cumulative: train < 0.7 n <= val < 0.8 n <= test


@dataclass(frozen=True)
class Source:
    images: Path  # the zip or the folder holding the .jpg files
    kind: str  # "zip" | "folder"
    identity_file: Path
    sha256: str  # zip: of the zip file; folder: of the sorted (name, size) list; plus the identity file's digest


def _missing(raw_dir: Path, what: str) -> DataError:
    return DataError(
        f"CelebA raw data not found in {raw_dir}: {what} is missing. CelebA cannot be downloaded automatically (it is "
        f"distributed through Google Drive under a non-redistribution licence): download it from "
        f"https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html and put `{IMAGES}.zip` (from Img/, or the extracted "
        f"`{IMAGES}/` folder of .jpg files) and `{IDENTITY_FILE}` (from Anno/) into {raw_dir}"
    )


def _find_images(raw_dir: Path) -> tuple[Path, str] | None:
    for base in (raw_dir, raw_dir / "Img"):
        if (base / f"{IMAGES}.zip").is_file():
            return base / f"{IMAGES}.zip", "zip"
        folder = base / IMAGES
        if (folder / IMAGES).is_dir():  # `unzip img_align_celeba.zip -d img_align_celeba`
            folder = folder / IMAGES
        if folder.is_dir():
            return folder, "folder"
    return None


def _find_identity_file(raw_dir: Path) -> Path | None:
    for candidate in (raw_dir / IDENTITY_FILE, raw_dir / "Anno" / IDENTITY_FILE):
        if candidate.is_file():
            return candidate
    return None


def sources_present(raw_dir: str | Path) -> bool:
    raw_dir = Path(raw_dir)
    return _find_images(raw_dir) is not None and _find_identity_file(raw_dir) is not None


def locate_source(raw_dir: str | Path) -> Source:
    raw_dir = Path(raw_dir)
    found = _find_images(raw_dir)
    if found is None:
        raise _missing(raw_dir, f"`{IMAGES}.zip` or the folder `{IMAGES}/`")
    identity = _find_identity_file(raw_dir)
    if identity is None:
        raise _missing(raw_dir, f"`{IDENTITY_FILE}`")
    path, kind = found
    h = hashlib.sha256()
    if kind == "zip":
        h.update(sha256_file(path).encode())
    else:  # hashing 200k files would dominate ensure_prepared: names and sizes identify a folder copy
        for p in sorted(path.glob("*.jpg")):
            h.update(f"{p.name} {p.stat().st_size}\n".encode())
    h.update(sha256_file(identity).encode())
    return Source(path, kind, identity, h.hexdigest())


def read_identities(path: Path) -> dict[int, list[str]]:
    """``identity_CelebA.txt`` -> {identity: sorted image file names}."""
    out: dict[int, list[str]] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable identity file ({type(e).__name__}: {e})") from e
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or not parts[0].lower().endswith(".jpg"):
            raise DataError(f"{path}, line {number}: expected '<image>.jpg <identity number>', got {line.strip()!r}")
        out.setdefault(int(parts[1]), []).append(parts[0])
    if not out:
        raise DataError(f"{path}: no '<image>.jpg <identity>' lines")
    return {k: sorted(v) for k, v in out.items()}


def split_identities(identities: list[int]) -> dict[str, list[int]]:
    ids = sorted(identities)
    n = len(ids)
    a, b = (int(f * n) for f in SPLIT_FRACTIONS)
    return {"train": ids[:a], "val": ids[a:b], "test": ids[b:]}


class ImageReader:
    """Reads image files from the folder or the zip (one open zip per reader; use in one process)."""

    def __init__(self, source: Source):
        self.source = source
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, str] = {}
        if source.kind == "zip":
            try:
                self._zip = zipfile.ZipFile(source.images)
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"{source.images}: not a readable zip archive ({type(e).__name__}: {e})") from e
            self._members = {
                n.rsplit("/", 1)[-1]: n for n in self._zip.namelist() if n.lower().endswith(".jpg") and "__MACOSX" not in n
            }

    def names(self) -> set[str]:
        if self._zip is not None:
            return set(self._members)
        return {p.name for p in self.source.images.glob("*.jpg")}

    def read(self, name: str) -> bytes:
        try:
            if self._zip is not None:
                return self._zip.read(self._members[name])
            return (self.source.images / name).read_bytes()
        except (KeyError, OSError, zipfile.BadZipFile) as e:
            raise DataError(f"{self.source.images}: cannot read {name} ({type(e).__name__}: {e})") from e

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def load_image(data: bytes, image_size: int, center_crop: int = 0, name: str = "") -> np.ndarray:
    """JPEG bytes -> uint8 (3, image_size, image_size): centred square crop, then BOX resize."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"{name}: undecodable image ({type(e).__name__}: {e})") from e
    w, h = img.size
    if (center_crop or 0) > min(w, h):
        raise DataError(f"{name}: data.center_crop={center_crop} exceeds the {w}x{h} image")
    return np.asarray(crop_resize(img, image_size, center_crop or min(w, h)), dtype=np.uint8).transpose(2, 0, 1).copy()


def crop_resize(img: Image.Image, image_size: int, side: int) -> Image.Image:
    """The centred square of `side` pixels, BOX-resized to `image_size` (the shards' and a user's images alike)."""
    w, h = img.size
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img if side == image_size else img.resize((image_size, image_size), Image.BOX)


def user_crop_side(w: int, h: int, center_crop: int) -> int:
    """The crop of a user's w x h image matching data.center_crop of the 178 x 218 aligned images: the same
    fraction of the short side (exactly the training crop for an aligned CelebA image)."""
    short = min(w, h)
    return short if not center_crop else max(1, min(short, round(short * center_crop / ALIGNED_SHORT_SIDE)))


def plan(cfg_raw_dir: str | Path, min_class_images: int = 0) -> tuple[Source, dict[str, list[tuple[int, list[str]]]]]:
    """Locate and check the raw data; return the source and, per split, ``(identity, image names)`` in order."""
    source = locate_source(cfg_raw_dir)
    identities = read_identities(source.identity_file)
    reader = ImageReader(source)
    try:
        present = reader.names()
    finally:
        reader.close()
    missing = sorted({f for files in identities.values() for f in files} - present)
    if missing:
        raise DataError(
            f"{source.images}: {len(missing)} images listed in {source.identity_file} are missing "
            f"(e.g. {', '.join(missing[:3])})"
        )
    kept = [i for i, files in identities.items() if len(files) >= max(1, min_class_images)]
    if not kept:
        raise DataError(f"{source.identity_file}: no identity has at least data.min_class_images={min_class_images} images")
    splits = split_identities(kept)
    return source, {s: [(i, identities[i]) for i in ids] for s, ids in splits.items()}


def iter_identity_images(
    source: Source, identities: list[tuple[int, list[str]]], image_size: int, center_crop: int = 0
) -> Iterator[np.ndarray]:
    """uint8 ``(n, 3, H, W)`` of each identity, in order (reads the zip once, sequentially by identity)."""
    reader = ImageReader(source)
    try:
        for _, files in identities:
            yield np.stack([load_image(reader.read(f), image_size, center_crop, f"{source.images}/{f}") for f in files])
    finally:
        reader.close()
