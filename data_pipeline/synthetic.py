"""A generated CelebA-layout tree (CelebA itself may not be redistributed): ``img_align_celeba/`` (or
``Img/img_align_celeba.zip``) of 178x218 RGB JPEGs plus ``identity_CelebA.txt`` (or ``Anno/identity_CelebA.txt``).

Every identity gets a base colour and a few soft blobs; its images vary them slightly, with a plain 20-pixel band at
the top and bottom (the part the centre crop removes). Deterministic for a seed. Used by the tests, the reader
benchmark and anyone trying ``data=celeba`` without the real data::

    python -m data_pipeline.synthetic OUT_DIR [--identities 40] [--images 6] [--zip]
"""
from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 178, 218
BAND = 20  # rows at top and bottom outside the centred 178 x 178 square
BAND_COLOUR = (255, 0, 0)


def identity_ids(n: int) -> list[int]:
    """Identity numbers that sort differently as strings and as numbers (2 < 10 < 100 ...)."""
    return [2 + 7 * i + (i % 3) * 100 for i in range(n)]


def make_image(rng: np.random.Generator, base: np.ndarray, blobs: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    img = np.broadcast_to(base, (HEIGHT, WIDTH, 3)).astype(np.float32).copy()
    for cy, cx, r, *colour in blobs:
        cy, cx = cy + rng.normal(0, 3), cx + rng.normal(0, 3)
        w = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - w) + np.array(colour, np.float32) * w
    img += rng.normal(0, 4, img.shape)
    img[:BAND] = BAND_COLOUR
    img[-BAND:] = BAND_COLOUR
    return np.clip(img, 0, 255).astype(np.uint8)


def make_celeba_tree(
    root: str | Path, identities: int = 40, images: int | tuple[int, int] = 6, seed: int = 0, as_zip: bool = False
) -> dict[int, list[str]]:
    """Write the tree under ``root``; return {identity: image names}. ``images``: per identity, or a (low, high)
    range drawn per identity."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    counts = (
        [images] * identities if isinstance(images, int) else rng.integers(images[0], images[1] + 1, identities).tolist()
    )
    table: dict[int, list[str]] = {}
    files: list[tuple[str, bytes]] = []
    number = 1
    # CelebA numbers images globally and interleaves identities: assign names, then shuffle the identity order
    owners = [ident for ident, c in zip(identity_ids(identities), counts) for _ in range(c)]
    owners = [owners[i] for i in rng.permutation(len(owners))]
    params = {
        ident: (rng.uniform(40, 215, 3), np.column_stack([rng.uniform(60, 160, (3, 2)), rng.uniform(10, 30, 3),
                                                           rng.uniform(0, 255, (3, 3))]))
        for ident in identity_ids(identities)
    }
    for ident in owners:
        name = f"{number:06d}.jpg"
        number += 1
        base, blobs = params[ident]
        buf = io.BytesIO()
        Image.fromarray(make_image(rng, base, blobs)).save(buf, format="JPEG", quality=90)
        files.append((name, buf.getvalue()))
        table.setdefault(ident, []).append(name)
    lines = "".join(f"{name} {owner}\n" for (name, _), owner in zip(files, owners))
    if as_zip:
        (root / "Img").mkdir(parents=True, exist_ok=True)
        (root / "Anno").mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(root / "Img" / "img_align_celeba.zip", "w", zipfile.ZIP_STORED) as z:
            for name, data in files:
                z.writestr(f"img_align_celeba/{name}", data)
        (root / "Anno" / "identity_CelebA.txt").write_text(lines)
    else:
        (root / "img_align_celeba").mkdir(parents=True, exist_ok=True)
        for name, data in files:
            (root / "img_align_celeba" / name).write_bytes(data)
        (root / "identity_CelebA.txt").write_text(lines)
    return table


def write_shards(
    shards_dir: str | Path,
    name: str = "celeba",
    sizes: dict[str, list[int]] | None = None,
    image_shape: tuple[int, int, int] = (3, 64, 64),
    image_format: str = "jpeg",
    classes_per_shard: int = 4,
    seed: int = 0,
) -> Path:
    """Prepared-looking shards of generated classes straight from arrays (no raw tree): ``sizes[split]`` lists the
    images per class. Each class has its own colour and blobs; returns ``{shards_dir}/{name}``."""
    from .config import DataConfig
    from .prepare import _write_dataset, preparation_config
    from .shards import ClassRecord

    sizes = sizes or {"train": [8] * 24, "val": [6] * 4, "test": [6] * 4}
    c, h, w = image_shape
    cfg = DataConfig(name=name, shards_dir=str(shards_dir), raw_dir="generated", image_size=h, image_channels=c,
                     image_format=image_format, classes_per_shard=classes_per_shard)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    records: dict[str, list] = {}
    ci = 0
    for split in ("train", "val", "test"):
        records[split] = []
        for n in sizes.get(split, []):
            base = rng.uniform(30, 220, c)
            blobs = [(rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1.5, max(2.0, w / 4)), rng.uniform(0, 255, c))
                     for _ in range(3)]
            images = []
            for _ in range(n):
                img = np.broadcast_to(base, (h, w, c)).astype(np.float32).copy()
                for cy, cx, r, colour in blobs:
                    cy, cx = cy + rng.normal(0, 2), cx + rng.normal(0, 2)
                    weight = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
                    img = img * (1 - weight) + colour * weight
                images.append(np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8).transpose(2, 0, 1))
            records[split].append(ClassRecord(ci, f"class{ci}", split, np.stack(images)))
            ci += 1
    out = Path(shards_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    _write_dataset(cfg, records, preparation_config(cfg, {}), out, progress=False)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--identities", type=int, default=40)
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zip", action="store_true")
    a = p.parse_args()
    table = make_celeba_tree(a.out, a.identities, a.images, a.seed, a.zip)
    print(f"{sum(len(v) for v in table.values())} images of {len(table)} identities in {a.out}")


if __name__ == "__main__":
    main()
