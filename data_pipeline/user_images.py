"""A user's own images (PNG / JPEG files of any size) prepared as a model's training data was.

Greyscale models with ink (Omniglot): each image is converted to greyscale; when its border is light (dark
strokes on paper, as in the Omniglot PNGs) it is inverted so that ink is 1, as in the shards; it is padded to a
square with its background and resized with PIL's BOX filter (as `data_pipeline.omniglot.decode_png`).
RGB models (CelebA): the centred square of the card's crop is cut out and BOX-resized (`data_pipeline.celeba.crop_resize`,
as the shards were).
Bernoulli models then see every pixel drawn Bernoulli(intensity) from a seeded generator, as test sets are.

`load_set` reads a set in this order, so that no file is decoded before the set is known to be acceptable:
1. the number of files against the model's `inputs.max_set_size` (nothing opened yet);
2. each file's header (format and dimensions, no pixel decoded) against `MAX_PIXELS`, naming the file;
3. only then each file is decoded, checked (colour vs greyscale) and reduced to the model's size, one at a time
   (at most one full-size image is in memory).
All of it runs before any model work starts.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .celeba import crop_resize, user_crop_side
from .errors import DataError
from .input_spec import InputSpec

SUFFIXES = (".png", ".jpg", ".jpeg")
# the largest image (width x height) decoded: 25 megapixels, e.g. a 6000 x 4000 camera photo
MAX_PIXELS = 25_000_000
# channels of an RGB image may differ by this many levels (of 255) and it still counts as grey (JPEG noise)
GREY_TOLERANCE = 8


def list_images(paths: Sequence[str | Path]) -> List[Path]:
    """The image files named by `paths` (files, or folders whose PNG / JPEG files are taken in name order)."""
    if not paths:
        raise DataError("images= is required: a folder of PNG / JPEG files, or files separated by commas")
    files: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES)
            if not found:
                raise DataError(f"{p} holds no PNG or JPEG files ({', '.join(SUFFIXES)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return files


def check_count(files: Sequence[Path], spec: InputSpec) -> None:
    """At most the model's `max_set_size` files (counted before any is opened)."""
    if len(files) > spec.max_set_size:
        raise DataError(f"{len(files)} images given; the model conditions on at most {spec.max_set_size} "
                        f"(pass fewer images)")


def check_header(f: Path) -> None:
    """A PNG / JPEG of at most MAX_PIXELS, from its header alone (no pixel is decoded)."""
    try:
        with warnings.catch_warnings():  # PIL's warning above ~89 MP: our own limit below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f) as img:
                fmt, (w, h) = img.format, img.size
    except Image.DecompressionBombError as exc:  # PIL refuses to even open it (over 2 x its own limit)
        raise DataError(f"{f}: too large to decode ({exc}); images of at most {MAX_PIXELS:,} pixels are "
                        f"accepted") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{f}: not a readable PNG / JPEG image ({exc})") from exc
    if fmt not in ("PNG", "JPEG"):
        raise DataError(f"{f}: a {fmt} image; PNG or JPEG files are accepted")
    if w * h > MAX_PIXELS:
        raise DataError(f"{f}: {w} x {h} pixels ({w * h:,}) is above the limit of {MAX_PIXELS:,} pixels; "
                        f"scale it down first")


def load_set(files: Sequence[Path], spec: InputSpec, seed: int = 0) -> torch.Tensor:
    """The files as one prepared set (S, C, size, size), as `prepare_set(open_images(files))` gives it, after
    the count and every header were checked; decoded one at a time."""
    check_count(files, spec)
    for f in files:
        check_header(f)
    prepared = []
    for f in files:
        (img,) = open_images([f])
        check_images([f], [img], spec)
        prepared.append(prepare_image(img, spec))
        del img
    x = torch.from_numpy(np.stack(prepared))
    if spec.binarize:
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(seed))
    return x


def _is_grey(img: Image.Image) -> bool:
    if img.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return True
    rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    return int(np.abs(rgb - rgb[..., :1]).max()) <= GREY_TOLERANCE


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Transparent pixels become white paper (drawings exported with an alpha channel)."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(paper, rgba).convert("RGB")
    return img


def open_images(files: Sequence[Path]) -> List[Image.Image]:
    """Decode every file (transparent pixels become white paper); DataError names the first unreadable one."""
    images = []
    for f in files:
        try:
            with Image.open(f) as img:
                img.load()
                images.append(_flatten_alpha(img))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"{f}: not a readable PNG / JPEG image ({exc})") from exc
    return images


def check_images(files: Sequence[Path], images: Sequence[Image.Image], spec: InputSpec) -> None:
    """The set must suit the model: at most `max_set_size`, greyscale for a greyscale model, colour for RGB."""
    check_count(images, spec)
    for f, img in zip(files, images):
        grey = _is_grey(img)
        if spec.channels == 1 and not grey:
            raise DataError(f"{f} is a colour image; this model was trained on greyscale images")
        if spec.channels == 3 and grey:
            raise DataError(f"{f} is a greyscale image; this model was trained on colour (RGB) images")


def _square(img: Image.Image, fill: int) -> Image.Image:
    w, h = img.size
    side = max(w, h)
    if w == h:
        return img
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def prepare_image(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """One image -> float32 (C, size, size) in [0, 1] (before binarisation)."""
    if spec.channels == 1:
        grey = img.convert("L")
        if spec.ink == "high":
            a = np.asarray(grey)
            border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
            if np.median(border) > 127:  # light paper, dark strokes: make ink high as in the shards
                grey = ImageOps.invert(grey)
        grey = _square(grey, 0 if spec.ink == "high" else int(np.median(np.asarray(grey))))
        if grey.size != (spec.size, spec.size):
            grey = grey.resize((spec.size, spec.size), Image.BOX)
        return (np.asarray(grey, dtype=np.float32) / 255.0)[None]
    rgb = img.convert("RGB")
    rgb = crop_resize(rgb, spec.size, user_crop_side(*rgb.size, spec.center_crop))
    return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0


def prepare_set(images: Sequence[Image.Image], spec: InputSpec, seed: int = 0) -> torch.Tensor:
    """The given images as one set (S, C, size, size) float32, binarised for Bernoulli models."""
    x = torch.from_numpy(np.stack([prepare_image(img, spec) for img in images]))
    if spec.binarize:
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(seed))
    return x
