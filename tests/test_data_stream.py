"""Streaming sampler (data.sampling=stream): per-epoch shard re-draw, disjoint covering rank partitions, fixed epoch
length, worker split, resume, the shards >= ranks x workers warning; two ranks under torchrun."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig
from data_pipeline.stream import StreamSetLoader, partition
from data_pipeline.synthetic import write_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    """16x16 RGB PNG classes: train 16 classes of 10 images in 8 shards; val/test 4 classes."""
    root = tmp_path_factory.mktemp("stream")
    write_shards(root, "celeba", {"train": [10] * 16, "val": [10] * 4, "test": [10] * 4}, image_shape=(3, 16, 16),
                 image_format="png", classes_per_shard=2)
    return root


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> Path:
    """Classes of 3..17 images (some shorter than S=5) in shards of 3 classes."""
    root = tmp_path_factory.mktemp("uneven")
    sizes = [int(n) for n in np.random.default_rng(1).integers(3, 18, 30)]
    write_shards(root, "celeba", {"train": sizes, "val": [6] * 3, "test": [6] * 3}, image_shape=(3, 16, 16),
                 image_format="npy", classes_per_shard=3)
    return root


def cfg_for(shards: Path, **kw) -> DataConfig:
    base = dict(name="celeba", shards_dir=str(shards), raw_dir="unused", download=False, image_size=16,
                image_channels=3, binarize="none", augment=False, batch_sets=4, sampling="stream")
    return DataConfig(**{**base, **kw})


def run_epoch(loader, epoch: int) -> tuple[list[torch.Tensor], list[int]]:
    loader.set_epoch(epoch)
    batches, classes = [], []
    for x in loader:
        batches.append(x)
        classes += loader.last_batch_classes.tolist()
    return batches, classes


def test_partition_is_contiguous_disjoint_and_covering():
    records = [(i, 5, "f") for i in range(21)]
    parts = partition(records, 2)
    assert [len(p) for p in parts] == [10, 11]  # DALI's floor(N r / W) rule
    assert [r[0] for p in parts for r in p] == list(range(21))


@pytest.mark.filterwarnings("ignore:.*fewer than S=5", "ignore:.*shards for")
def test_ranks_disjoint_covering_same_length_and_shards_redrawn(uneven_shards):
    world = 3
    cfg = cfg_for(uneven_shards, augment=True)
    loaders = [StreamSetLoader(cfg, "train", r, world) for r in range(world)]
    read_by_epoch = []
    for epoch in (0, 1):
        read, seen = [], []
        for loader in loaders:
            batches, classes = run_epoch(loader, epoch)
            assert len(batches) == len(loader) == len(loaders[0])  # fixed epoch length: ranks stay in step
            assert all(b.shape == (4, 5, 3, 16, 16) for b in batches)
            read.append(set(loader.class_indices))
            seen.append(set(classes))
            assert set(classes) <= set(loader.class_indices)
        assert sum(len(r) for r in read) == 30 and set().union(*read) == set(range(30))  # disjoint + covering
        assert all(not (seen[i] & seen[j]) for i in range(world) for j in range(i + 1, world))
        read_by_epoch.append(read)
    assert read_by_epoch[0][0] != read_by_epoch[1][0]  # shards re-drawn every epoch
    val = [StreamSetLoader(cfg, "val", r, world) for r in range(world)]
    assert [run_epoch(v, 0)[1] for v in val] == [run_epoch(v, 5)[1] for v in val]  # val fixed across epochs


def test_workers_split_shards_and_resume_replays_the_stream(small_shards):
    cfg = cfg_for(small_shards, augment=True, binarize="dynamic")
    plain, _ = run_epoch(StreamSetLoader(cfg, "train", 1, 2), 3)
    workers, _ = run_epoch(StreamSetLoader(replace(cfg, num_workers=2), "train", 1, 2), 3)
    assert len(plain) == len(workers) == 8  # 8 classes x 2 sets x 2 copies / 4
    mean = lambda bs: torch.stack([b.mean() for b in bs]).mean().item()  # noqa: E731
    assert abs(mean(plain) - mean(workers)) < 0.02  # same sets, another interleaving
    first = StreamSetLoader(cfg, "train", 1, 2)
    first.set_epoch(3)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    assert state == {"epoch": 3, "batches_done": 3}
    resumed = StreamSetLoader(cfg, "train", 1, 2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 5 and all(torch.equal(a, b) for a, b in zip(rest, plain[3:]))
    dali = StreamSetLoader(replace(cfg, reader="dali"), "train", 1, 2)
    d1, _ = run_epoch(dali, 3)
    d2, _ = run_epoch(StreamSetLoader(replace(cfg, reader="dali"), "train", 1, 2), 3)
    assert all(torch.equal(a, b) for a, b in zip(d1, d2))  # DALI's stream is deterministic too


def test_fewer_shards_than_ranks_times_workers_warns(small_shards, tmp_path):
    with pytest.warns(UserWarning, match=r"8 shards for 3 rank\(s\) x 4 reader\(s\).*data.min_shards>=12"):
        StreamSetLoader(cfg_for(small_shards, num_workers=4), "train", 0, 3)
    # prepare honours data.min_shards: 16 classes, at least 5 shards -> 3 classes per shard
    out = write_shards(tmp_path, "celeba", {"train": [6] * 16}, image_shape=(3, 8, 8), image_format="npy",
                       classes_per_shard=100)
    assert len(list(out.glob("train-*.tar"))) == 1
    from data_pipeline.prepare import shard_classes

    assert shard_classes(DataConfig(min_shards=5), 16) == 3 and shard_classes(DataConfig(min_shards=5), 3) == 1


def test_two_ranks_under_torchrun_see_disjoint_covering_data(small_shards, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [str(torchrun) if torchrun.exists() else shutil.which("torchrun"), "--standalone", "--nproc_per_node=2",
         str(ROOT / "tests" / "scripts" / "stream_ranks.py"), str(small_shards), str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    for reader in ("torch", "dali"):
        for epoch in ("0", "1"):
            a, b = (r[reader][epoch] for r in ranks)
            assert a["len"] == b["len"] == 4  # 8 classes x 2 sets / 4 per batch, on both ranks
            assert not set(a["sets"]) & set(b["sets"])  # disjoint
            assert sorted(set(a["sets"]) | set(b["sets"])) == list(range(16))  # together they cover the split
            assert sorted(a["sets"] + b["sets"]) == sorted(list(range(16)) * 2)  # every set of every class once
            assert set(a["read"]) == set(a["sets"])
        assert ranks[0]["torch"]["0"]["read"] != ranks[0]["torch"]["1"]["read"]  # shards re-drawn per epoch
        assert set(ranks[0]["torch"][epoch]["read"]) == set(ranks[0]["dali"][epoch]["read"])  # same partition rule


@pytest.mark.parametrize("kw, needle", [
    ({"reader": "pil"}, "data.reader"),
    ({"sampling": "random"}, "data.sampling"),
    ({"image_format": "webp"}, "data.image_format"),
    ({"device": "tpu"}, "data.device"),
    ({"shuffle_buffer": 0}, "data.shuffle_buffer"),
    ({"min_shards": 0}, "data.min_shards"),
    ({"jpeg_quality": 101}, "data.jpeg_quality"),
    ({"reader": "resident", "sampling": "stream"}, "data.sampling"),
])
def test_bad_reader_settings_name_the_key(kw, needle):
    with pytest.raises(ValueError, match=needle):
        DataConfig(**kw)
