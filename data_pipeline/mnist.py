"""MNIST from its IDX files, and the transfer datasets MNIST / DoubleMNIST / TripleMNIST (SPEC 5.3, 5.4).

Nothing is written to disk but the raw files: the IDX files (``.gz`` or uncompressed) are read from ``raw_dir`` and
every set is built in memory, deterministically. Missing files can be fetched (:func:`download_missing`, or
``check_raw(..., download=True)``) from the official mirrors torchvision uses, checked against the canonical md5 of
the ``.gz`` files. Local files are checked by content instead: the md5 of the uncompressed IDX bytes (equal for
every re-compressed copy of the canonical files), and shape, dtype, image and label counts; a file whose content
digest is not the canonical one is used with a :class:`RawDataWarning` once those checks pass.

Splits of the digits: ``train`` = the first 90 % of ``train-images``, ``val`` = its last 10 %, ``test`` =
``t10k-images`` (SPEC 5.3; the reference's ``val`` is broken, ours is the held-out tenth).

Classes and images (one set = S images of one class):

- ``mnist``: 10 classes, the digits; a class holds the real images of its digit, in a fixed seeded order.
- ``doublemnist`` / ``triplemnist``: 100 / 1,000 classes, the strings ``"00".."99"`` / ``"000".."999"``, split
  64/16/20 and 640/160/200 (train/val/test) by a fixed seeded permutation, as in SPEC 5.4. A class holds 1,000
  generated images: its n digits, each a random MNIST image of that digit drawn from the MNIST split of the same
  name, are pasted left to right into n columns of an (28n x 28n) canvas, each at its own random height, and the
  canvas is reduced to 28 x 28 by n x n box averaging (what PIL's BOX resize does for an integer factor; the
  reference's files were made from torchmeta's multi-digit images with a BOX resize). Image j of a class is the
  same every time (its digit draws and heights come from a generator seeded by the dataset, split and class).

Sets (SPEC 5.2/5.4 protocol): a class's images keep their fixed order and are cut into consecutive chunks of S
(the remainder dropped), so set membership never changes; the list of all sets of a split is then put in a
seeded order, so a capped evaluation (``max_batches``) still covers many classes. Pixels are binarised
dynamically (each pixel ~ Bernoulli(intensity), seeded per batch) so that the Bernoulli likelihood applies to
all three datasets (the reference leaves Double/TripleMNIST grey, SPEC 8 item 21).
"""
from __future__ import annotations

import functools
import gzip
import itertools
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import torch

from .download import RawDataWarning, download_verified, warn_unofficial
from .errors import DataError

__all__ = ["RawDataWarning"]

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# As torchvision.datasets.MNIST lists them (tests compare): the .gz files as served, their mirrors in order
OFFICIAL_MD5_GZ = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
# md5 of the canonical uncompressed IDX files: what a re-compressed copy still matches
CONTENT_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
IMAGE_COUNTS = {"train": 60_000, "test": 10_000}
SPLITS = ("train", "val", "test")
TRAIN_FRACTION = 0.9
TRANSFER_DATASETS = {"mnist": 1, "doublemnist": 2, "triplemnist": 3}
CLASS_SPLITS = {2: (64, 16, 20), 3: (640, 160, 200)}  # train / val / test classes
IMAGES_PER_CLASS = 1000
SIDE = 28
_DATASET_SEED = 20_211_025  # fixes class splits and generated images (not an evaluation knob)
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


# ------------------------------------------------------------------------------------------------ IDX files
def _locate(raw_dir: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (raw_dir / name).is_file():
            return raw_dir / name
    return None


def idx_file_source(split: str) -> str:
    return "train" if split in ("train", "val") else "test"


def missing_files(raw_dir: str | Path, splits: Sequence[str] = SPLITS) -> List[str]:
    """The IDX files (as ``<dir>/<name>.gz``) that ``splits`` need and ``raw_dir`` lacks."""
    raw = Path(raw_dir)
    sources = sorted({idx_file_source(s) for s in splits})
    return [str(raw / f"{stem}.gz") for src in sources for stem in IDX_FILES[src] if _locate(raw, stem) is None]


def download_missing(raw_dir: str | Path, splits: Sequence[str] = SPLITS, mirrors: Sequence[str] = MIRRORS,
                     attempts: int = 3) -> List[str]:
    """Fetch the IDX files ``splits`` need and ``raw_dir`` lacks, each verified against its official md5."""
    fetched = []
    for path in map(Path, missing_files(raw_dir, splits)):
        download_verified([m.rstrip("/") + "/" + path.name for m in mirrors], path, OFFICIAL_MD5_GZ[path.name],
                          attempts=attempts)
        fetched.append(str(path))
    return fetched


def check_raw(raw_dir: str | Path, splits: Sequence[str] = SPLITS, download: bool = False,
              mirrors: Sequence[str] = MIRRORS) -> None:
    """Raise DataError naming every missing MNIST file (cheap: only looks at file names); ``download`` fetches them
    first."""
    if download:
        download_missing(raw_dir, splits, mirrors)
    missing = missing_files(raw_dir, splits)
    if missing:
        raise DataError(
            f"MNIST is not available: missing {', '.join(missing)}. Put the MNIST IDX files "
            f"(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
            f"t10k-labels-idx1-ubyte.gz; .gz or uncompressed) in {Path(raw_dir)} or point eval.mnist_dir at them"
        )


def _read_bytes(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from e


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (optionally gzip-compressed) into an array of its stored dtype and shape."""
    path = Path(path)
    return _parse_idx(path, _read_bytes(path))


def _parse_idx(path: Path, data: bytes) -> np.ndarray:
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {data[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(v) for v in np.frombuffer(data[4:header], dtype=">u4")) if ndim else ()
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path}: {len(data) - header} bytes of data, the header's shape {shape} needs {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _check_content(path: Path, stem: str, data: bytes) -> None:
    import hashlib

    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if md5 != CONTENT_MD5[stem]:
        warn_unofficial(path, md5 + " (uncompressed)", CONTENT_MD5[stem], "IDX header, shape, dtype, counts")


def _read_checked(path: Path, stem: str) -> np.ndarray:
    data = _read_bytes(path)
    array = _parse_idx(path, data)  # a malformed file is an error before any digest talk
    _check_content(path, stem, data)
    return array


@functools.lru_cache(maxsize=4)
def _read_source(raw_dir: str, source: str) -> Tuple[np.ndarray, np.ndarray]:
    check_raw(raw_dir, [source])
    img_stem, lbl_stem = IDX_FILES[source]
    raw = Path(raw_dir)
    img_path, lbl_path = _locate(raw, img_stem), _locate(raw, lbl_stem)
    images, labels = _read_checked(img_path, img_stem), _read_checked(lbl_path, lbl_stem)
    n = IMAGE_COUNTS[source]
    if images.ndim != 3 or images.shape != (n, SIDE, SIDE) or images.dtype != np.uint8:
        raise DataError(f"{img_path}: expected the {n} uint8 MNIST {source} images (n, 28, 28), got "
                        f"{images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],) or labels.max(initial=0) > 9:
        raise DataError(f"{lbl_path}: expected {images.shape[0]} labels 0..9, got {labels.shape}")
    images.setflags(write=False)
    labels = labels.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


def load_digits(raw_dir: str | Path, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, 28, 28) and int64 labels (n,) of one MNIST split (train / val / test, see module doc)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, labels = _read_source(str(Path(raw_dir).resolve()), idx_file_source(split))
    if split == "test":
        return images, labels
    cut = int(round(TRAIN_FRACTION * len(images)))
    sl = slice(0, cut) if split == "train" else slice(cut, None)
    return images[sl], labels[sl]


def binarize(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Each pixel ~ Bernoulli(intensity) (x in [0, 1]), from a generator seeded by ``seed``; float32 0/1."""
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF))
    return (u < x).to(torch.float32)


# ------------------------------------------------------------------------------------------------ datasets
class DigitDataset:
    """The classes of one transfer dataset split and their images (uint8 (n, 28, 28), fixed order per class)."""

    def __init__(self, name: str, raw_dir: str | Path, split: str = "test") -> None:
        if name not in TRANSFER_DATASETS:
            raise ValueError(f"transfer dataset must be one of {tuple(TRANSFER_DATASETS)}, got {name!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.name, self.split, self.digits = name, split, TRANSFER_DATASETS[name]
        self.images, self.labels = load_digits(raw_dir, split)
        self._pool = [np.flatnonzero(self.labels == d) for d in range(10)]
        if any(len(p) == 0 for p in self._pool):
            raise DataError(f"MNIST {split} split lacks some digit (counts {[len(p) for p in self._pool]})")
        n = self.digits
        if n == 1:
            self.classes = [str(d) for d in range(10)]
        else:
            all_classes = ["".join(t) for t in itertools.product("0123456789", repeat=n)]
            order = np.random.default_rng([_DATASET_SEED, n]).permutation(len(all_classes))
            n_train, n_val, _ = CLASS_SPLITS[n]
            bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(order))}
            lo, hi = bounds[split]
            self.classes = [all_classes[i] for i in sorted(order[lo:hi])]
        self._plans: dict[int, Tuple[np.ndarray, np.ndarray]] = {}

    def class_size(self, ci: int) -> int:
        return len(self._pool[int(self.classes[ci])]) if self.digits == 1 else IMAGES_PER_CLASS

    def _plan(self, ci: int) -> Tuple[np.ndarray, np.ndarray]:
        """(source image index (m, n), vertical offset (m, n)) of every image of class ci, in its fixed order."""
        if ci not in self._plans:
            n, label = self.digits, self.classes[ci]
            rng = np.random.default_rng([_DATASET_SEED, n, _SPLIT_CODE[self.split], int(label)])
            if n == 1:
                pool = self._pool[int(label)]
                src = pool[rng.permutation(len(pool))][:, None]
                off = np.zeros_like(src)
            else:
                src = np.stack([rng.choice(self._pool[int(ch)], IMAGES_PER_CLASS) for ch in label], axis=1)
                off = rng.integers(0, SIDE * n - SIDE + 1, size=(IMAGES_PER_CLASS, n))
            self._plans[ci] = (src, off)
        return self._plans[ci]

    def class_images(self, ci: int, index: np.ndarray | None = None) -> np.ndarray:
        """Images ``index`` (default: all) of class ``ci`` as uint8 (m, 28, 28)."""
        src, off = self._plan(ci)
        if index is not None:
            src, off = src[index], off[index]
        n = self.digits
        if n == 1:
            return self.images[src[:, 0]]
        m = len(src)
        canvas = np.zeros((m, SIDE * n, SIDE * n), np.float32)
        rows = off[:, :, None] + np.arange(SIDE)  # (m, n, 28)
        for p in range(n):
            cols = SIDE * p + np.arange(SIDE)
            canvas[np.arange(m)[:, None, None], rows[:, p, :, None], cols[None, None, :]] = self.images[src[:, p]]
        box = canvas.reshape(m, SIDE, n, SIDE, n).mean(axis=(2, 4))
        return np.clip(np.rint(box), 0, 255).astype(np.uint8)


class TransferSets:
    """Batches ``(B, S, 1, 28, 28)`` float32 of binarised sets of one transfer dataset split (module doc)."""

    def __init__(self, name: str, raw_dir: str | Path, split: str = "test", set_size: int = 5,
                 batch_sets: int = 100, max_batches: int = 0, seed: int = 0, binary: bool = True) -> None:
        if set_size < 1 or batch_sets < 1 or max_batches < 0:
            raise ValueError(f"need set_size >= 1, batch_sets >= 1, max_batches >= 0; got {set_size}, "
                             f"{batch_sets}, {max_batches}")
        self.data = DigitDataset(name, raw_dir, split)
        self.set_size, self.batch_sets, self.seed, self.binary = set_size, batch_sets, seed, binary
        sets = [(ci, j) for ci in range(len(self.data.classes)) for j in range(self.data.class_size(ci) // set_size)]
        if not sets:
            raise DataError(f"{name}/{split}: no class has {set_size} images")
        order = np.random.default_rng([seed, TRANSFER_DATASETS[name], _SPLIT_CODE[split], set_size]).permutation(len(sets))
        self.sets = [sets[i] for i in order]
        n_batches = -(-len(self.sets) // batch_sets)
        self._len = min(n_batches, max_batches) if max_batches else n_batches

    def __len__(self) -> int:
        return self._len

    def batch(self, b: int) -> torch.Tensor:
        chosen = self.sets[b * self.batch_sets:(b + 1) * self.batch_sets]
        s = self.set_size
        imgs = np.stack([self.data.class_images(ci, np.arange(j * s, (j + 1) * s)) for ci, j in chosen])
        x = torch.from_numpy(imgs).to(torch.float32).div_(255.0).unsqueeze(2)  # (B, S, 1, 28, 28)
        if self.binary:
            x = binarize(x, int(np.random.SeedSequence([self.seed, TRANSFER_DATASETS[self.data.name],
                                                         _SPLIT_CODE[self.data.split], s, b]).generate_state(1)[0]))
        return x

    def __iter__(self) -> Iterator[torch.Tensor]:
        for b in range(self._len):
            yield self.batch(b)
