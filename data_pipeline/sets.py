"""Set sampler: class records -> epochs of ``(B, S, C, H, W)`` float32 batches (SPEC 5.1; DESIGN "Data contract" 4).

Per epoch, for this rank's classes (in class-index order):

1. **Sets**: each class's images are shuffled, the remainder mod S dropped, and consecutive chunks of S form its
   sets (S = ``set_size``, ``set_size_test`` for the test split). Classes with fewer than S images are skipped (one
   warning).
2. **Augmentation** (train: ``augment``; val: ``augment and augment_val``; never test): every set gets an augmented
   copy, added to the originals (2x sets): horizontal flip p=1/2, vertical flip p=1/2, then one rotation angle
   U[0, 360) degrees about the image centre, shared by all members of the set (bilinear, zero fill, same size).
3. **Order**: sets are shuffled for train and val; the test split keeps class order, unless ``limit_batches``
   takes part of it: then its sets are shuffled (seeded), so the part is a random subset.
4. **Batches** of B = ``batch_sets`` sets: train drops the last partial batch, val/test keep it.
5. **Binarisation** (``binarize="dynamic"``): each pixel ~ Bernoulli(intensity), drawn as ``u < intensity`` with
   ``u ~ U[0, 1)``. Otherwise intensities in [0, 1].

Randomness: numpy/torch generators seeded from ``(seed, split, epoch, rank, world_size)`` (train) or
``(seed, split, 0, rank, world_size)`` (val/test: the same sets, augmentations and binarisation every epoch). No
global RNG is touched. Each batch is built from the epoch plan and its own seed, so resuming at batch k
(:meth:`SetLoader.load_state_dict`) yields exactly the batches an uninterrupted epoch yields from k on.

Distribution: with ``world_size > 1`` a rank owns the classes whose ordinal in the split (manifest order, short
classes removed) is ``rank`` modulo ``world_size`` -- disjoint, covering, balanced to one class, whatever the number
of shards. Each rank reads the shards holding its classes (with 100 classes per shard: all of them; Omniglot is
25 MB) and keeps its records. ``len()`` is the minimum over ranks of the batches per epoch (computed from the
manifest), so ranks stay in step; a rank with more sets drops its last ones. Records are read once per loader and
kept in memory as uint8.

Readers (``data.reader``) follow the same plan and seeds, so they give the same batches up to float rounding:

* ``torch``: webdataset stream (``num_workers`` DataLoader workers), host memory, torch augmentation on the CPU;
* ``dali``: DALI decodes the records (:class:`data_pipeline.dali.ClassReader`) and flips/rotates/normalises the
  augmented sets (:class:`data_pipeline.dali.SetAugmenter`), on the GPU when there is one (``data.device``);
* ``resident``: webdataset read once, then the rank's images live in device memory and sets are gathered,
  augmented (:func:`augment_sets`) and binarised there -- no host work per batch.

:class:`data_pipeline.stream.StreamSetLoader` is the streaming alternative (``data.sampling=stream``).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .config import DataConfig
from .errors import DataError
from .reader import read_classes
from .shard_source import source_of
from .shards import IMAGE_EXTENSIONS, SPLITS, split_classes

_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


def augment_sets(x: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor, angle_deg: torch.Tensor) -> torch.Tensor:
    """Flip and rotate every set of ``x`` ``(n, S, C, H, W)`` with one transform per set.

    ``hflip``/``vflip`` are bool ``(n,)``, ``angle_deg`` float ``(n,)``. Output = rotate(flip(x)) about the image
    centre (positive angles turn the image counter-clockwise as displayed, like skimage ``rotate``), bilinear with
    zero fill, same size; values stay in the input's range.
    """
    n, s, c, h, w = x.shape
    a = torch.deg2rad(angle_deg.to(torch.float64))
    cos, sin = torch.cos(a), torch.sin(a)
    sx = 1.0 - 2.0 * hflip.to(torch.float64)
    sy = 1.0 - 2.0 * vflip.to(torch.float64)
    # affine_grid maps output -> input coordinates in normalised units (x/(W/2), y/(H/2)); the inverse of
    # rotate(flip(.)) in pixel units is flip(rotate(-a)), conjugated by the normalisation for non-square images.
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = sx * cos
    theta[:, 0, 1] = -sx * sin * (h / w)
    theta[:, 1, 0] = sy * sin * (w / h)
    theta[:, 1, 1] = sy * cos
    grid = F.affine_grid(theta.to(x.device, x.dtype), [n, c, h, w], align_corners=False)  # one grid per set ...
    grid = grid.unsqueeze(1).expand(n, s, h, w, 2).reshape(n * s, h, w, 2)  # ... shared by its members
    out = F.grid_sample(x.reshape(n * s, c, h, w), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(n, s, c, h, w)


class EpochState:
    """Epoch / resume bookkeeping shared by the set loaders: ``len()`` (batches this epoch, equal on all ranks),
    :meth:`set_epoch`, and ``state_dict()`` / ``load_state_dict()`` holding ``{"epoch", "batches_done"}``."""

    cfg: DataConfig
    split: str
    epoch: int = 0
    _start: int = 0
    _done: int = 0
    _len: int = 0

    def __len__(self) -> int:
        return self._len

    def _epoch_changed(self) -> None:
        """Hook: recompute per-epoch quantities (stream sampling: the shard partition and ``len()``)."""

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch -- unless a resume position for this very epoch was just loaded
        with :meth:`load_state_dict` and not yet iterated (so set_epoch/load_state_dict may come in either order)."""
        if int(epoch) == self.epoch and self._start > 0:
            return
        self.epoch = int(epoch)
        self._start = self._done = 0
        self._epoch_changed()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self._done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        previous = self.epoch
        self.epoch = int(state["epoch"])
        self._epoch_changed()
        done = int(state["batches_done"])
        if not 0 <= done <= self._len:
            self.epoch = previous
            self._epoch_changed()
            raise ValueError(f"batches_done={done} outside 0..{self._len} for {self.cfg.name}/{self.split}")
        self._start = self._done = done


def short_class_warning(name: str, split: str, set_size: int, classes: list[tuple[int, int, str]]) -> None:
    short = [c for c in classes if c[1] < set_size]
    if short:
        warnings.warn(
            f"{name}/{split}: {len(short)} classes have fewer than S={set_size} images and are skipped "
            f"(e.g. class {short[0][0]} with {short[0][1]})",
            stacklevel=3,
        )


def loader_device(cfg: DataConfig) -> torch.device:
    if cfg.reader == "torch":
        return torch.device("cpu")
    from .dali import batch_device  # imports no DALI by itself

    return batch_device(cfg.device)


class SetLoader(EpochState):
    """One rank's batches of sets for one split; iterate once per epoch (call :meth:`set_epoch` before).

    ``len(loader)`` is the number of batches per epoch (equal on all ranks). ``state_dict()`` /
    ``load_state_dict()`` hold ``{"epoch", "batches_done"}``: a loader restored from a state yields, on its next
    iteration, the remaining batches of that epoch exactly as the original would have. ``last_batch_classes`` holds
    the class index of each set of the batch yielded last.
    """

    def __init__(self, cfg: DataConfig, split: str, rank: int = 0, world_size: int = 1):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.cfg, self.split, self.rank, self.world_size = cfg, split, rank, world_size
        self.source = source_of(cfg)  # data_pipeline/shard_source.py: a directory or a bucket
        self.directory = self.source.location
        manifest = self.source.verify(cfg.name, splits=[split])
        self.manifest = manifest
        self.image_shape = tuple(int(v) for v in manifest["image_shape"])
        self.member = IMAGE_EXTENSIONS[manifest["preparation"].get("image_format", "npy")]
        self.set_size = cfg.set_size_test if split == "test" else cfg.set_size
        self.batch_sets = cfg.batch_sets
        self.augment = cfg.augment and (split == "train" or (split == "val" and cfg.augment_val))
        # a limited pass over the test split (eval.max_batches) is a seeded random subset of its sets, not
        # its first classes in class order (a biased sample)
        self.shuffle = split != "test" or cfg.limit_batches > 0
        self.drop_last = split == "train"
        self.binarize = cfg.binarize == "dynamic"
        self.reader = cfg.reader
        self.device = loader_device(cfg)
        self._augmenter = None  # the DALI augmentation pipeline (reader=dali), built on first use

        classes = split_classes(manifest, split)
        if not classes:
            raise DataError(f"{self.directory}: split {split!r} of {cfg.name} has no classes")
        usable = [c for c in classes if c[1] >= self.set_size]
        short_class_warning(cfg.name, split, self.set_size, classes)
        if not usable:
            raise DataError(f"{self.directory}: split {split!r} has no class with at least S={self.set_size} images")
        per_rank = [usable[r::world_size] for r in range(world_size)]
        copies = 2 if self.augment else 1
        sets = [copies * sum(n // self.set_size for _, n, _ in mine) for mine in per_rank]
        rounding = math.floor if self.drop_last else math.ceil
        batches = min(rounding(s / self.batch_sets) for s in sets)
        if cfg.limit_batches > 0:
            batches = min(batches, cfg.limit_batches)
        if batches == 0:
            poorest = int(np.argmin(sets))
            raise DataError(
                f"{self.directory}: split {split!r} yields no batch for rank {poorest} ({sets[poorest]} sets of "
                f"S={self.set_size}, batch_sets={self.batch_sets}, world_size={world_size}); "
                f"lower data.batch_sets or the world size"
            )
        self._len = batches
        self._mine = sorted(per_rank[rank])  # class-index order, as read_classes returns the records
        self._files = list(dict.fromkeys(f for _, _, f in classes))
        self.class_indices = [ci for ci, _, _ in self._mine]
        self.sets_per_epoch = sets[rank]
        self.epoch = 0
        self._start = 0
        self._done = 0
        self._images: torch.Tensor | None = None
        self._offsets: np.ndarray | None = None
        self._counts: np.ndarray | None = None
        self._class_of: np.ndarray | None = None
        self._plan_cache: tuple[int, dict[str, np.ndarray]] | None = None
        self.last_batch_classes: np.ndarray | None = None

    # ---------------------------------------------------------------- data
    def _read_dali(self, keep: set[int], mine_files: list[str]) -> list[tuple[int, torch.Tensor]]:
        from .dali import ClassReader

        entries = {s["file"]: s for s in self.manifest["splits"][self.split]["shards"]}
        chosen = [entries[f] for f in mine_files]
        indexed = all("index_file" in e for e in chosen)
        reader = ClassReader(
            [self.source.local_path(e["file"]) for e in chosen],
            [self.source.local_path(e["index_file"]) for e in chosen] if indexed else None,
            self.member, self.image_shape, sum(e["records"] for e in chosen), self.device,
            threads=self.cfg.dali_threads,
        )
        try:
            records = [(ci, images) for ci, images in reader if ci in keep]
        finally:
            reader.close()
        records.sort(key=lambda r: r[0])
        return records

    def load(self) -> list[int]:
        """Read this rank's class records from the shards (once); return the class indices read."""
        if self._images is None:
            keep = {ci for ci, _, _ in self._mine}
            mine_files = list(dict.fromkeys(f for _, _, f in self._mine))
            if self.reader == "dali":
                records = self._read_dali(keep, mine_files)
            else:
                records = read_classes(self.source, self._files, mine_files, keep, self.cfg.num_workers)
            got = [ci for ci, _ in records]
            if got != sorted(keep):
                missing = sorted(keep - set(got))
                problem = f"lack classes {missing[:5]} listed in the manifest" if missing else "hold duplicate records"
                raise DataError(f"{self.directory}: shards of split {self.split!r} {problem}")
            counts = np.array([len(im) for _, im in records], dtype=np.int64)
            expected = np.array([n for _, n, _ in self._mine], dtype=np.int64)
            if not np.array_equal(counts, expected):
                raise DataError(f"{self.directory}: image counts of split {self.split!r} differ from the manifest")
            file_of = {ci: f for ci, _, f in self._mine}
            for ci, im in records:
                if tuple(im.shape[1:]) != self.image_shape:
                    raise DataError(f"{self.source.url(file_of[ci])}: record {ci} holds images of shape "
                                    f"{tuple(im.shape[1:])}, the manifest says {self.image_shape}")
            self._images = torch.cat([torch.as_tensor(im) for _, im in records]).to(self.device)
            self._counts = counts
            self._offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
            self._class_of = np.repeat(np.array(got, dtype=np.int64), counts)
        return [ci for ci, _, _ in self._mine]

    def _seed(self, *extra: int) -> np.random.SeedSequence:
        epoch_key = self.epoch if self.split == "train" else 0
        return np.random.SeedSequence(
            [self.cfg.seed, _SPLIT_CODE[self.split], epoch_key, self.rank, self.world_size, *extra]
        )

    def _plan(self) -> dict[str, np.ndarray]:
        key = self.epoch if self.split == "train" else 0
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        rng = np.random.default_rng(self._seed())
        s = self.set_size
        members = []
        for off, n in zip(self._offsets, self._counts):
            k = n // s
            members.append(off + rng.permutation(n)[: k * s].reshape(k, s))
        members_arr = np.concatenate(members)
        n_sets = len(members_arr)
        if self.augment:
            source = np.concatenate([np.arange(n_sets), np.arange(n_sets)])
            augmented = np.concatenate([np.zeros(n_sets, bool), np.ones(n_sets, bool)])
        else:
            source, augmented = np.arange(n_sets), np.zeros(n_sets, bool)
        total = len(source)
        hflip = rng.random(total) < 0.5
        vflip = rng.random(total) < 0.5
        angle = rng.uniform(0.0, 360.0, total)
        order = rng.permutation(total) if self.shuffle else np.arange(total)
        plan = {
            "members": members_arr[source[order]],
            "augmented": augmented[order],
            "hflip": hflip[order],
            "vflip": vflip[order],
            "angle": angle[order],
        }
        self._plan_cache = (key, plan)
        return plan

    def _batch(self, plan: dict[str, np.ndarray], b: int) -> torch.Tensor:
        sl = slice(b * self.batch_sets, (b + 1) * self.batch_sets)
        members = plan["members"][sl]
        n, s = members.shape
        x8 = self._images[torch.from_numpy(members.reshape(-1)).to(self.device)].reshape(n, s, *self.image_shape)
        self.last_batch_classes = self._class_of[members[:, 0]]
        return make_batch(self, x8, plan["augmented"][sl], plan["hflip"][sl], plan["vflip"][sl], plan["angle"][sl],
                          self._seed(b))

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.load()
        plan = self._plan()
        start, self._start = self._start, 0
        self._done = start
        for b in range(start, self._len):
            batch = self._batch(plan, b)
            self._done = b + 1
            yield batch


def make_batch(
    loader: Any, x8: torch.Tensor, augmented: np.ndarray, hflip: np.ndarray, vflip: np.ndarray, angle: np.ndarray,
    seed: np.random.SeedSequence,
) -> torch.Tensor:
    """uint8 sets ``(n, S, C, H, W)`` on the loader's device -> the float batch: intensities in [0, 1]; the sets
    flagged ``augmented`` flipped and rotated (torch; DALI for ``reader=dali``); then binarised when asked.

    ``loader`` provides ``reader``, ``device``, ``image_shape``, ``batch_sets``, ``cfg``, ``binarize`` and the
    ``_augmenter`` slot (the DALI pipeline, built on first use).
    """
    x = x8.to(torch.float32).div_(255.0)
    if augmented.any():
        idx = np.flatnonzero(augmented)
        sel = torch.from_numpy(idx).to(x.device)
        if loader.reader == "dali":
            if loader._augmenter is None:
                from .dali import SetAugmenter

                loader._augmenter = SetAugmenter(loader.image_shape[0], loader.device, loader.batch_sets,
                                                 threads=loader.cfg.dali_threads)
            x[sel] = loader._augmenter(x8[sel], hflip[idx], vflip[idx], angle[idx])
        else:
            x[sel] = augment_sets(
                x[sel], torch.from_numpy(hflip[idx]), torch.from_numpy(vflip[idx]), torch.from_numpy(angle[idx])
            ).clamp_(0.0, 1.0)
    if loader.binarize:
        value = int(seed.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
        generator = torch.Generator(device=x.device).manual_seed(value)
        # Bernoulli(p) as u < p with u ~ U[0, 1): same law as torch.bernoulli, ~3x faster on CPU
        x = torch.rand(x.shape, generator=generator, device=x.device).lt_(x)
    return x
