"""Omniglot source: the official ``images_background.zip`` / ``images_evaluation.zip`` (or extracted folders).

What this module guarantees (SPEC 5.1, 5.2; DESIGN "Data contract" 1):

* **Locating raw data** (:func:`locate_sources`): for each of the two official sets, ``raw_dir/<set>.zip`` is used
  if it exists, else the extracted folder ``raw_dir/<set>/<Alphabet>/<characterNN>/*.png``. When neither exists and
  downloading is allowed, the official zip is downloaded, checked against the official md5 (the digests
  torchvision's ``Omniglot`` checks) and moved into place atomically (:mod:`.download`); otherwise a
  :class:`DataError` says which files to put where.
* **Local files are checked by content, not bytes**: a zip whose md5 is not the official one (a repacked copy, like
  the rebuilt zips of this project's test data) is accepted with a :class:`RawDataWarning` (:func:`check_official`),
  because every source, downloaded or not, is then validated image by image before any shard is written.
* **Validation**: an archive or folder that is not the expected Omniglot set (unreadable zip, no
  ``alphabet/character/*.png`` layout, wrong alphabet/character/image counts, images that are not 105x105 PNGs,
  images without any ink) raises :class:`DataError` naming the file.
* **Images**: ink is black (0) in the PNGs. Each image is converted to greyscale, inverted (ink = 255, i.e. the
  stored value is ``255 * (1 - v/255)``), and resized 105 -> ``image_size`` with PIL's BOX filter (each source
  pixel contributes to one output pixel with equal weight). The result is uint8, 255 = full ink. PIL's integer
  resampling is deterministic, so the same PNG always gives the same bytes.
* **Splits** (:func:`assign_splits`): ``omniglot_ns`` sorts all 1,623 characters by (alphabet, character) name,
  permutes them with ``numpy.random.default_rng(split_seed)`` and takes 1000 train / 200 val / 423 test, independent
  of alphabets. ``omniglot_back_eval`` sorts the 964 background characters, keeps the first 867 (90 %) for train and
  the last 97 for val; the 659 evaluation characters are test.

This module imports no torch (decode workers stay light).
"""
from __future__ import annotations

import hashlib
import io
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from .download import download_verified, md5_file, warn_unofficial
from .errors import DataError
from .shards import sha256_file

SUBSETS = ("images_background", "images_evaluation")
OFFICIAL_BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
# md5 of the official zips, as torchvision.datasets.Omniglot.zips_md5 checks them (tests compare the two)
OFFICIAL_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
EXPECTED_COUNTS = {"images_background": (30, 964), "images_evaluation": (20, 659)}  # (alphabets, characters)
IMAGES_PER_CHARACTER = 20
RAW_SIZE = 105
SPLIT_SIZES_NS = (1000, 200, 423)  # omniglot_ns train / val / test characters
BACK_EVAL_TRAIN_FRACTION = 0.9  # of the sorted background characters; the rest is val

_INVERT = [255 - i for i in range(256)]


@dataclass(frozen=True)
class Source:
    """One located official set: a zip file or an extracted folder, with a content digest."""

    subset: str
    path: Path
    kind: str  # "zip" | "folder"
    sha256: str  # of the zip file; for a folder, of the sorted (relative path, file sha256) list


@dataclass(frozen=True)
class Character:
    """One Omniglot character: its alphabet, folder name and image members sorted by file name."""

    subset: str
    alphabet: str
    character: str
    members: tuple[str, ...]  # zip member names, or file paths relative to the source folder

    @property
    def name(self) -> str:
        return f"{self.alphabet}/{self.character}"


# ------------------------------------------------------------------------------------------------ locating / download
def _folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.png")):
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def official_url(subset: str, base_url: str | None = None) -> str:
    base = OFFICIAL_BASE_URL if base_url is None else base_url
    return base.rstrip("/") + f"/{subset}.zip"


def _missing_message(raw_dir: Path, missing: Iterable[str]) -> str:
    names = " and ".join(f"{s}.zip" for s in missing)
    return (
        f"Omniglot raw data not found: {raw_dir} lacks {names}. Put the official files there "
        f"(from https://github.com/brendenlake/omniglot/tree/master/python: images_background.zip and "
        f"images_evaluation.zip), or the extracted folders {raw_dir}/images_background/<Alphabet>/<characterNN>/*.png "
        f"and {raw_dir}/images_evaluation/...; or set data.download=true to fetch them, or point data.raw_dir at "
        f"the folder that holds them."
    )


def locate_sources(
    raw_dir: str | Path,
    download: bool,
    base_url: str | None = None,
    attempts: int = 3,
    digest: bool = True,
) -> dict[str, Source]:
    """Find (or download) both official sets under ``raw_dir``. ``digest=False`` skips hashing (sha256 = "")."""
    raw_dir = Path(raw_dir)
    found: dict[str, Source] = {}
    missing = []
    for subset in SUBSETS:
        zpath, folder = raw_dir / f"{subset}.zip", raw_dir / subset
        if zpath.is_file():
            found[subset] = Source(subset, zpath, "zip", sha256_file(zpath) if digest else "")
        elif folder.is_dir():
            found[subset] = Source(subset, folder, "folder", _folder_digest(folder) if digest else "")
        else:
            missing.append(subset)
    if missing and not download:
        raise DataError(_missing_message(raw_dir, missing) + " (data.download=false, so nothing was downloaded)")
    for subset in missing:
        zpath = raw_dir / f"{subset}.zip"
        download_verified(official_url(subset, base_url), zpath, OFFICIAL_MD5[subset], attempts=attempts)
        found[subset] = Source(subset, zpath, "zip", sha256_file(zpath) if digest else "")
    return found


def check_official(source: Source) -> bool:
    """True when ``source`` is the official zip byte for byte; else warn (a folder has no official digest)."""
    if source.kind != "zip":
        return False
    md5 = md5_file(source.path)
    if md5 == OFFICIAL_MD5[source.subset]:
        return True
    alphabets, characters = EXPECTED_COUNTS[source.subset]
    warn_unofficial(source.path, md5, OFFICIAL_MD5[source.subset],
                    f"{alphabets} alphabets, {characters} characters, {IMAGES_PER_CHARACTER} inked "
                    f"{RAW_SIZE}x{RAW_SIZE} images each")
    return False


def sources_present(raw_dir: str | Path) -> bool:
    raw_dir = Path(raw_dir)
    return all((raw_dir / f"{s}.zip").is_file() or (raw_dir / s).is_dir() for s in SUBSETS)


# ------------------------------------------------------------------------------------------------ listing / validation
def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(
            f"{path} is not a readable zip archive ({e}); it is corrupt or truncated. Delete it and download or "
            f"copy the official file again."
        ) from e


def list_characters(source: Source) -> list[Character]:
    """List the characters of one set, sorted by (alphabet, character); validate layout and counts."""
    if source.kind == "zip":
        with _open_zip(source.path) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
    else:
        names = [p.relative_to(source.path).as_posix() for p in source.path.rglob("*") if p.is_file()]
    pngs = []
    for n in names:
        parts = n.split("/")
        if parts[0] == "__MACOSX" or parts[-1].startswith("."):
            continue
        if parts[-1].lower().endswith(".png") and len(parts) >= 3:
            pngs.append(parts)
    expected_alpha, expected_chars = EXPECTED_COUNTS[source.subset]
    what = (
        f"expected the Omniglot {source.subset} set: {expected_alpha} alphabets, {expected_chars} characters, "
        f"{IMAGES_PER_CHARACTER} PNGs each, laid out as <Alphabet>/<characterNN>/<id>_<drawer>.png"
    )
    if not pngs:
        raise DataError(f"{source.path} is not an Omniglot archive: it holds no <Alphabet>/<character>/*.png images; {what}")
    depths = {len(p) for p in pngs}
    if len(depths) != 1:
        raise DataError(f"{source.path} is not an Omniglot archive: PNGs sit at mixed folder depths {sorted(depths)}; {what}")
    groups: dict[tuple[str, str], list[str]] = {}
    for parts in pngs:
        groups.setdefault((parts[-3], parts[-2]), []).append("/".join(parts))
    alphabets = {a for a, _ in groups}
    bad = [(k, len(v)) for k, v in sorted(groups.items()) if len(v) != IMAGES_PER_CHARACTER]
    if len(alphabets) != expected_alpha or len(groups) != expected_chars or bad:
        detail = f"found {len(alphabets)} alphabets and {len(groups)} characters"
        if bad:
            (a, c), n = bad[0]
            detail += f"; {len(bad)} character(s) do not have {IMAGES_PER_CHARACTER} images (e.g. {a}/{c}: {n})"
        raise DataError(f"{source.path} does not hold the expected Omniglot set: {detail}; {what}")
    return [
        Character(source.subset, a, c, tuple(sorted(members, key=lambda m: (m.rsplit("/", 1)[-1], m))))
        for (a, c), members in sorted(groups.items())
    ]


# ------------------------------------------------------------------------------------------------ decoding
class BlankImage(ValueError):
    """A PNG without a single ink pixel: no Omniglot character is empty, so the file was blanked or damaged."""


def decode_png(data: bytes, image_size: int) -> np.ndarray:
    """PNG bytes (105x105, ink black) -> uint8 ``(image_size, image_size)`` with 255 = full ink (BOX resize).

    Raises :class:`BlankImage` when the image holds no ink (checked at full resolution, before resizing).
    """
    with Image.open(io.BytesIO(data)) as im:
        if im.size != (RAW_SIZE, RAW_SIZE):
            raise ValueError(f"image is {im.size[0]}x{im.size[1]}, expected {RAW_SIZE}x{RAW_SIZE}")
        ink = im.convert("L").point(_INVERT)
    if ink.getbbox() is None:
        raise BlankImage("image holds no ink")
    if image_size != RAW_SIZE:
        ink = ink.resize((image_size, image_size), Image.BOX)
    return np.asarray(ink, dtype=np.uint8)


def _read_members(source: Source, z: zipfile.ZipFile | None, ch: Character) -> list[bytes]:
    blobs = []
    for m in ch.members:
        try:
            blobs.append(z.read(m) if z is not None else (source.path / m).read_bytes())
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise DataError(f"{source.path}: cannot read {m} ({type(e).__name__}: {e}); the archive is corrupt") from e
    return blobs


def load_images(
    source: Source,
    characters: list[Character],
    image_size: int,
    on_progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Decode the characters of one source -> uint8 ``(n_chars, 20, 1, image_size, image_size)``."""
    out = np.empty((len(characters), IMAGES_PER_CHARACTER, 1, image_size, image_size), dtype=np.uint8)
    z = _open_zip(source.path) if source.kind == "zip" else None
    blank: list[str] = []  # all of them are reported: one blanked image is rarely alone
    try:
        for i, ch in enumerate(characters):
            for j, blob in enumerate(_read_members(source, z, ch)):
                try:
                    out[i, j, 0] = decode_png(blob, image_size)
                except BlankImage:
                    blank.append(ch.members[j])
                except (OSError, SyntaxError, ValueError, zlib.error) as e:
                    raise DataError(
                        f"{source.path}: {ch.members[j]} is not a {RAW_SIZE}x{RAW_SIZE} Omniglot PNG "
                        f"({type(e).__name__}: {e})"
                    ) from e
            if on_progress is not None:
                on_progress(IMAGES_PER_CHARACTER)
    finally:
        if z is not None:
            z.close()
    if blank:
        raise DataError(
            f"{source.path}: {len(blank)} of {len(characters) * IMAGES_PER_CHARACTER} images hold no ink (blank), "
            f"e.g. {', '.join(blank[:3])}; every Omniglot image shows a drawn character, so the archive was altered "
            f"or damaged. Replace it with the official file; no shards were written."
        )
    return out


# Decoded images memoised per process by (set, source digest, image size): preparing both Omniglot datasets in one
# process (tests, a prepare-all job) decodes the 32,460 PNGs once. Holds at most one entry per official set.
_DECODED: dict[tuple[str, str, int], np.ndarray] = {}


def clear_decode_cache() -> None:
    _DECODED.clear()


def load_source(
    source: Source,
    characters: list[Character],
    image_size: int,
    on_progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """:func:`load_images` for all characters of ``source`` (as listed), memoised when the digest is known."""
    key = (source.subset, source.sha256, image_size)
    if source.sha256 and key in _DECODED and len(_DECODED[key]) == len(characters):
        if on_progress is not None:
            on_progress(len(characters) * IMAGES_PER_CHARACTER)
        return _DECODED[key]
    images = load_images(source, characters, image_size, on_progress)
    if source.sha256:
        for k in [k for k in _DECODED if k[0] == source.subset]:
            del _DECODED[k]
        images.setflags(write=False)
        _DECODED[key] = images
    return images


# ------------------------------------------------------------------------------------------------ splits
def assign_splits(
    name: str, background: list[Character], evaluation: list[Character], split_seed: int
) -> dict[str, list[Character]]:
    """Characters of each split, in the order their class indices are assigned (see module doc)."""
    key = lambda c: (c.alphabet, c.character)  # noqa: E731
    if name == "omniglot_ns":
        everything = sorted(background + evaluation, key=key)
        perm = np.random.default_rng(split_seed).permutation(len(everything))
        ordered = [everything[i] for i in perm]
        n_train, n_val, n_test = SPLIT_SIZES_NS
        if len(ordered) != n_train + n_val + n_test:
            raise DataError(f"omniglot_ns needs {n_train + n_val + n_test} characters, found {len(ordered)}")
        return {
            "train": ordered[:n_train],
            "val": ordered[n_train : n_train + n_val],
            "test": ordered[n_train + n_val :],
        }
    if name == "omniglot_back_eval":
        bg = sorted(background, key=key)
        n_train = int(len(bg) * BACK_EVAL_TRAIN_FRACTION)  # 867 of 964
        return {"train": bg[:n_train], "val": bg[n_train:], "test": sorted(evaluation, key=key)}
    raise ValueError(f"data.name must be an Omniglot dataset, got {name!r}")
