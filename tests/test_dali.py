"""The DALI reader (CPU mode here; the GPU path is the same pipelines with device="mixed"/"gpu", tested only on a GPU
machine) against the torch reader: same shapes, dtypes, value ranges and per-pixel means, one transform per set."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig
from data_pipeline.dali import SetAugmenter
from data_pipeline.loaders import make_set_loader
from data_pipeline.sets import SetLoader, augment_sets
from data_pipeline.synthetic import write_shards

CPU = torch.device("cpu")


def omniglot(shards: Path, **kw) -> DataConfig:
    return DataConfig(name="omniglot_ns", shards_dir=str(shards), raw_dir="unused", download=False, **kw)


@pytest.fixture(scope="module")
def rgb_shards(tmp_path_factory) -> Path:
    """Generated 64x64 RGB classes as JPEG strips, named celeba (24 train classes of 10 images, 6 shards)."""
    root = tmp_path_factory.mktemp("rgb")
    write_shards(root, "celeba", {"train": [10] * 24, "val": [10] * 4, "test": [10] * 4}, image_format="jpeg")
    return root


def rgb(shards: Path, **kw) -> DataConfig:
    base = dict(name="celeba", shards_dir=str(shards), raw_dir="unused", download=False, image_size=64,
                image_channels=3, image_format="jpeg", binarize="none", batch_sets=8)
    return DataConfig(**{**base, **kw})


def epoch_stats(loader, epoch: int = 0) -> tuple[list[torch.Size], torch.dtype, float, float, torch.Tensor, int]:
    """Shapes, dtype, min, max and the per-pixel mean image (C, H, W) over one epoch of batches."""
    loader.set_epoch(epoch)
    shapes, total, count, lo, hi, dtype = [], None, 0, 1.0, 0.0, None
    for x in loader:
        shapes.append(x.shape)
        dtype = x.dtype
        lo, hi = min(lo, x.min().item()), max(hi, x.max().item())
        flat = x.reshape(-1, *x.shape[2:]).double()
        total = flat.sum(0) if total is None else total + flat.sum(0)
        count += flat.shape[0]
    return shapes, dtype, lo, hi, total / count, count


def assert_same_distribution(a, b, tol: float = 0.01) -> None:
    sa, da, loa, hia, ma, na = a
    sb, db, lob, hib, mb, nb = b
    assert sa == sb and da == db == torch.float32 and na == nb
    assert 0.0 <= loa and hia <= 1.0 and 0.0 <= lob and hib <= 1.0
    assert abs(hia - hib) < 0.02 and abs(loa - lob) < 0.02
    assert (ma - mb).abs().max().item() <= tol  # per-pixel mean (intensities in [0, 1])
    assert abs(ma.mean().item() - mb.mean().item()) <= tol * ma.mean().item()  # overall mean within 1 %


# ------------------------------------------------------------------------------------------------ augmentation
@pytest.mark.parametrize("channels", [1, 3])
def test_dali_augmenter_matches_torch_and_shares_one_transform_per_set(channels):
    g = torch.Generator().manual_seed(0)
    n, s, size = 6, 5, 28
    one = torch.randint(0, 256, (n, 1, channels, size, size), generator=g, dtype=torch.uint8)
    x8 = one.expand(n, s, channels, size, size).contiguous()  # every set = 5 copies of one image
    hflip = np.array([0, 1, 0, 1, 0, 1], bool)
    vflip = np.array([0, 0, 1, 1, 0, 1], bool)
    angle = np.array([0.0, 0.0, 0.0, 33.0, 90.0, 271.5])
    out = SetAugmenter(channels, CPU, max_sets=4)(x8, hflip, vflip, angle)  # 2 runs of the pipeline
    assert out.shape == (n, s, channels, size, size) and out.dtype == torch.float32
    assert torch.equal(out, out[:, :1].expand_as(out))  # one transform per set, shared by its members
    ref = augment_sets(x8.float() / 255, torch.from_numpy(hflip), torch.from_numpy(vflip), torch.from_numpy(angle))
    assert (out - ref.clamp(0, 1)).abs().max().item() < 1e-4
    assert torch.allclose(out[4], torch.rot90(x8[4].float() / 255, 1, dims=(-2, -1)), atol=1e-5)  # counter-clockwise


def test_one_set_shares_its_augmentation_under_the_dali_reader(omniglot_ns_shards):
    """Every image replaced by its class's first image: each set of a DALI batch, original or augmented, is
    uniform; an augmented set equals the torch transform of that image with the plan's flip/rotation."""
    loader = SetLoader(omniglot(omniglot_ns_shards, binarize="none", limit_batches=2, reader="dali"), "train")
    loader.load()
    loader._images = loader._images[torch.from_numpy(np.repeat(loader._offsets, loader._counts))]
    loader.set_epoch(0)
    x = next(iter(loader))
    plan = loader._plan()
    assert torch.equal(x, x[:, :1].expand_as(x))
    k = int(np.flatnonzero(plan["augmented"][:100])[0])  # inspect one augmented set
    first = loader._images[plan["members"][k, 0]].float() / 255
    expect = augment_sets(first[None, None], torch.tensor([plan["hflip"][k]]), torch.tensor([plan["vflip"][k]]),
                          torch.tensor([plan["angle"][k]]))[0, 0].clamp(0, 1)
    assert (x[k, 3] - expect).abs().max().item() < 1e-4 and not torch.allclose(x[k, 3], first, atol=1e-2)


# ------------------------------------------------------------------------------------------------ DALI vs torch
def test_dali_and_torch_readers_agree_on_omniglot(omniglot_ns_shards):
    grey = omniglot(omniglot_ns_shards, binarize="none", limit_batches=6)
    # global sampling: the same plan, so the same batches up to float rounding (DALI vs torch bilinear)
    a, b = SetLoader(grey, "train"), SetLoader(replace(grey, reader="dali"), "train")
    for xa, xb in zip(a, b):
        assert xa.shape == xb.shape == (100, 5, 1, 28, 28) and xa.dtype == xb.dtype == torch.float32
        assert (xa - xb).abs().max().item() < 1e-4
    binary = SetLoader(omniglot(omniglot_ns_shards, limit_batches=2, reader="dali"), "train")
    xb = next(iter(binary))
    assert xb.dtype == torch.float32 and set(xb.unique().tolist()) == {0.0, 1.0}
    # a whole epoch of each reader's own sampling (torch global vs DALI stream): per-pixel means within 1 %
    full = omniglot(omniglot_ns_shards, binarize="none")
    torch_global = epoch_stats(SetLoader(full, "train"))
    dali_stream = epoch_stats(make_set_loader(replace(full, reader="dali", sampling="stream"), "train"))
    assert_same_distribution(torch_global, dali_stream)
    assert torch_global[0][0] == (100, 5, 1, 28, 28) and torch_global[-1] == 8000 * 5


def test_dali_and_torch_readers_agree_on_rgb_shards(rgb_shards):
    for sampling in ("global", "stream"):
        for augment in (False, True):
            cfg = rgb(rgb_shards, sampling=sampling, augment=augment)
            t = epoch_stats(make_set_loader(cfg, "train"), epoch=1)
            d = epoch_stats(make_set_loader(replace(cfg, reader="dali"), "train"), epoch=1)
            assert t[0][0] == (8, 5, 3, 64, 64)
            assert_same_distribution(t, d)
            if not augment:  # the same JPEG strips decoded by PIL and by DALI (libjpeg-turbo): the same images
                assert (t[4] - d[4]).abs().max().item() < 1e-5


def test_resident_reader_gives_the_torch_batches(omniglot_ns_shards):
    cfg = omniglot(omniglot_ns_shards, limit_batches=3)
    for xa, xb in zip(SetLoader(cfg, "val"), SetLoader(replace(cfg, reader="resident"), "val")):
        assert torch.equal(xa, xb)  # on a CPU-only machine the device is the CPU: identical
    with pytest.raises(ValueError, match="data.sampling"):
        replace(cfg, reader="resident", sampling="stream")


@pytest.mark.gpu
def test_dali_gpu_reader_matches_torch(omniglot_ns_shards, rgb_shards):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (DALI device='mixed'/'gpu'); this machine has none")
    grey = omniglot(omniglot_ns_shards, binarize="none", limit_batches=4)
    for xa, xb in zip(SetLoader(grey, "train"), SetLoader(replace(grey, reader="dali"), "train")):
        assert xb.is_cuda and (xa - xb.cpu()).abs().max().item() < 1e-4
    cfg = rgb(rgb_shards, sampling="stream", augment=True)
    t = epoch_stats(make_set_loader(cfg, "train"))
    d = epoch_stats(make_set_loader(replace(cfg, reader="dali"), "train"))
    assert_same_distribution(t, (d[0], d[1], d[2], d[3], d[4].cpu(), d[5]), tol=0.02)  # nvJPEG vs libjpeg
