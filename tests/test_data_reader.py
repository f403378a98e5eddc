"""SetLoader: batches of sets from the Omniglot shards (shapes, augmentation, binarisation, resume, ranks)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.prepare import _write_dataset, preparation_config
from data_pipeline.sets import SetLoader, augment_sets
from data_pipeline.shards import ClassRecord, iter_shard


def cfg_for(shards: Path, **kw) -> DataConfig:
    return DataConfig(name="omniglot_ns", shards_dir=str(shards), raw_dir="unused", download=False, **kw)


def epoch(loader: SetLoader, e: int) -> list[torch.Tensor]:
    loader.set_epoch(e)
    return list(loader)


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_batches_shape_dtype_and_lengths(omniglot_ns_shards):
    train = SetLoader(cfg_for(omniglot_ns_shards), "train")
    assert len(train) == 80 and train.sets_per_epoch == 8000  # 1000 classes x 4 sets x 2 (augmented copies)
    batches = epoch(train, 0)
    assert len(batches) == 80
    for x in batches[:3]:
        assert x.shape == (100, 5, 1, 28, 28) and x.dtype == torch.float32
        assert set(x.unique().tolist()) == {0.0, 1.0}
    val = SetLoader(cfg_for(omniglot_ns_shards), "val")
    assert len(val) == 16 and val.sets_per_epoch == 1600
    test = SetLoader(cfg_for(omniglot_ns_shards, set_size_test=10), "test")
    assert test.set_size == 10 and test.sets_per_epoch == 846 and len(test) == 9  # test: no augmentation, keep last
    tb = epoch(test, 0)
    assert [b.shape[0] for b in tb] == [100] * 8 + [46] and tb[0].shape[1] == 10
    plain = SetLoader(cfg_for(omniglot_ns_shards, binarize="none", augment=False, batch_sets=64), "train")
    assert len(plain) == 4000 // 64  # drop_last for train
    x = next(iter(plain))
    assert x.shape == (64, 5, 1, 28, 28) and 0.0 <= x.min() and x.max() <= 1.0
    assert ((x > 0) & (x < 1)).any()  # grey intensities when not binarised


def test_limit_batches(omniglot_ns_shards):
    loader = SetLoader(cfg_for(omniglot_ns_shards, limit_batches=3), "train")
    assert len(loader) == 3 and len(epoch(loader, 0)) == 3


def test_sets_hold_one_class_and_test_split_is_untouched(omniglot_ns_shards):
    """Test split: stored images / 255, no augmentation, sets in class order, each set within one class."""
    d = omniglot_ns_shards / "omniglot_ns"
    first = next(iter_shard(d / "test-000000.tar"))
    loader = SetLoader(cfg_for(omniglot_ns_shards, binarize="none"), "test")
    x = next(iter(loader))
    stored = torch.from_numpy(first.images).float() / 255
    for k in range(4):  # class 1200 gives the first 4 sets (20 images / S=5)
        for img in x[k]:
            assert any(torch.equal(img, s) for s in stored)
    flat = x[:4].reshape(20, -1)
    assert len({tuple(r.tolist()) for r in flat}) == 20  # the 4 sets partition the class's 20 images


def test_augmentation_shares_one_transform_per_set():
    torch.manual_seed(0)
    base = torch.rand(6, 1, 1, 28, 28)
    x = base.expand(6, 5, 1, 28, 28).clone()  # every set = 5 copies of one image
    out = augment_sets(x, torch.tensor([0, 1, 0, 1, 0, 1]).bool(), torch.tensor([0, 0, 1, 1, 0, 1]).bool(),
                       torch.tensor([0.0, 0.0, 0.0, 33.0, 90.0, 271.5]))
    assert torch.equal(out, out[:, :1].expand_as(out))
    assert torch.allclose(out[1], x[1].flip(-1), atol=1e-5) and torch.allclose(out[2], x[2].flip(-2), atol=1e-5)
    assert torch.allclose(out[4], torch.rot90(x[4], 1, dims=(-2, -1)), atol=1e-5)  # positive = counter-clockwise
    assert not torch.allclose(out[3], x[3], atol=1e-2)


def test_loader_adds_augmented_copies_with_shared_transform(omniglot_ns_shards):
    """Replace every image by its class's first image: each set, original or augmented, must stay uniform."""
    loader = SetLoader(cfg_for(omniglot_ns_shards, binarize="none", limit_batches=5), "train")
    loader.load()
    first_of_class = torch.from_numpy(np.repeat(loader._offsets, loader._counts))
    originals = loader._images.clone()
    loader._images = originals[first_of_class]
    batches = epoch(loader, 0)
    n_aug = 0
    stored = {tuple(originals[i].flatten().tolist()) for i in loader._offsets}
    for x in batches:
        assert torch.equal(x, x[:, :1].expand_as(x))
        n_aug += sum(tuple((s[0] * 255).round().to(torch.uint8).flatten().tolist()) not in stored for s in x)
    assert 200 <= n_aug <= 300  # about half of the 500 sets are augmented copies


def test_val_is_fixed_train_is_redrawn(omniglot_ns_shards):
    """Val (sets, augmentation, binarisation) repeats every epoch; train is redrawn per epoch, reproducibly."""
    val = SetLoader(cfg_for(omniglot_ns_shards), "val")
    v0, v1 = epoch(val, 0), epoch(val, 7)
    assert same(v0, v1)
    train = SetLoader(cfg_for(omniglot_ns_shards, limit_batches=4), "train")
    t0, t1 = epoch(train, 0), epoch(train, 1)
    assert not any(torch.equal(a, b) for a, b in zip(t0, t1))
    again = SetLoader(cfg_for(omniglot_ns_shards, limit_batches=4), "train")
    assert same(epoch(again, 1), t1)  # deterministic given (seed, epoch, rank)
    other_seed = SetLoader(cfg_for(omniglot_ns_shards, limit_batches=4, seed=1), "train")
    assert not torch.equal(epoch(other_seed, 1)[0], t1[0])
    # binarisation on its own: same sets and intensities, different draws per train epoch, equal for val
    grey = SetLoader(cfg_for(omniglot_ns_shards, limit_batches=1, binarize="none", augment=False), "train")
    binary = SetLoader(cfg_for(omniglot_ns_shards, limit_batches=1, augment=False), "train")
    p, b = epoch(grey, 5)[0], epoch(binary, 5)[0]
    assert set(b.unique().tolist()) == {0.0, 1.0} and torch.all(b[p == 0] == 0) and torch.all(b[p == 1] == 1)
    assert abs(b.mean().item() - p.mean().item()) < 0.01
    g0 = torch.get_rng_state()
    epoch(train, 2)
    assert torch.equal(g0, torch.get_rng_state())  # the global RNG is never touched


def test_resume_mid_epoch(omniglot_ns_shards):
    cfg = cfg_for(omniglot_ns_shards, batch_sets=150)
    reference = epoch(SetLoader(cfg, "train"), 3)
    first = SetLoader(cfg, "train")
    first.set_epoch(3)
    it = iter(first)
    for _ in range(7):
        next(it)
    state = first.state_dict()
    assert state == {"epoch": 3, "batches_done": 7}
    resumed = SetLoader(cfg, "train")
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert same(rest, reference[7:])
    assert resumed.state_dict() == {"epoch": 3, "batches_done": len(reference)}
    assert same(epoch(resumed, 3), reference)  # a fresh pass over the epoch starts from batch 0 again
    other_order = SetLoader(cfg, "train")  # load_state_dict then set_epoch of the same epoch keeps the position
    other_order.load_state_dict(state)
    other_order.set_epoch(3)
    assert same(list(other_order), reference[7:])
    with pytest.raises(ValueError, match="batches_done"):
        resumed.load_state_dict({"epoch": 0, "batches_done": len(reference) + 1})


def test_ranks_get_disjoint_covering_classes(omniglot_ns_shards):
    cfg = cfg_for(omniglot_ns_shards, batch_sets=64)
    ranks = [SetLoader(cfg, "train", rank=r, world_size=2) for r in range(2)]
    loaded = [set(r.load()) for r in ranks]
    assert not loaded[0] & loaded[1] and loaded[0] | loaded[1] == set(range(1000))
    assert [len(r._images) for r in ranks] == [500 * 20, 500 * 20]
    assert len(ranks[0]) == len(ranks[1]) == (500 * 4 * 2) // 64
    b0, b1 = next(iter(ranks[0])), next(iter(ranks[1]))
    assert b0.shape == b1.shape == (64, 5, 1, 28, 28) and not torch.equal(b0, b1)
    three = [SetLoader(cfg_for(omniglot_ns_shards), "val", rank=r, world_size=3) for r in range(3)]
    assert len({len(r) for r in three}) == 1
    assert sorted(c for r in three for c in r.class_indices) == list(range(1000, 1200))


def test_num_workers_gives_same_batches(omniglot_ns_shards):
    a = SetLoader(cfg_for(omniglot_ns_shards, limit_batches=2), "val")
    b = SetLoader(cfg_for(omniglot_ns_shards, limit_batches=2, num_workers=2), "val")
    assert same(epoch(a, 0), epoch(b, 0))


# ------------------------------------------------------------------------------------------------ edge cases
def synthetic(tmp_path: Path, sizes: dict[str, list[int]]) -> Path:
    """A tiny dataset (named omniglot_ns) whose classes hold the given numbers of random images."""
    cfg = cfg_for(tmp_path, classes_per_shard=2)
    out = tmp_path / "omniglot_ns"
    out.mkdir()
    rng = np.random.default_rng(0)
    records, ci = {}, 0
    for split in ("train", "val", "test"):
        records[split] = []
        for n in sizes.get(split, []):
            images = rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)
            records[split].append(ClassRecord(ci, f"A/character{ci:02d}", split, images))
            ci += 1
    _write_dataset(cfg, records, preparation_config(cfg, {}), out, progress=False)
    return tmp_path


def test_short_classes_skipped_with_one_warning(tmp_path):
    shards = synthetic(tmp_path, {"train": [3, 12, 7, 2, 10], "val": [], "test": [4]})
    with pytest.warns(UserWarning, match=r"2 classes have fewer than S=5 images and are skipped") as rec:
        loader = SetLoader(cfg_for(shards, batch_sets=2, augment=False), "train")
    assert len(rec) == 1
    assert loader.class_indices == [1, 2, 4] and loader.sets_per_epoch == 2 + 1 + 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        batches = epoch(loader, 0)
    assert [b.shape[0] for b in batches] == [2, 2]
    with pytest.raises(DataError, match=r"split 'val' of omniglot_ns has no classes"):
        SetLoader(cfg_for(shards), "val")
    with pytest.raises(DataError, match=r"split 'test' has no class with at least S=5 images"), pytest.warns(UserWarning):
        SetLoader(cfg_for(shards), "test")
    with pytest.raises(DataError, match=r"yields no batch .*lower data.batch_sets"), pytest.warns(UserWarning):
        SetLoader(cfg_for(shards, batch_sets=100), "train")


def test_loader_rejects_corrupt_or_missing_shards(omniglot_ns_shards, tmp_path):
    with pytest.raises(DataError, match=r"manifest\.json is missing"):
        SetLoader(cfg_for(tmp_path), "train")
    import shutil

    shutil.copytree(omniglot_ns_shards / "omniglot_ns", tmp_path / "omniglot_ns")
    shard = tmp_path / "omniglot_ns" / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"val-000000\.tar: shard is corrupt"):
        SetLoader(cfg_for(tmp_path), "val")
    SetLoader(cfg_for(tmp_path), "train")  # other splits are unaffected
