"""CelebA prepare from a generated CelebA-layout tree (folder or zip + identity_CelebA.txt): identity split
70/10/20 (sorted, deterministic), 64x64x3 records (centre crop, then resize), errors naming the file, `data=celeba`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline import celeba
from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.prepare import ensure_prepared, prepare
from data_pipeline.shards import iter_shard, verify_shards
from data_pipeline.synthetic import BAND, identity_ids, make_celeba_tree

from conftest import run_module

IDENTITIES = 30  # -> 21 train / 3 val / 6 test


def cfg_for(raw: Path, shards: Path, **kw) -> DataConfig:
    base = dict(name="celeba", raw_dir=str(raw), shards_dir=str(shards), download=False, image_size=64,
                image_channels=3, image_format="png", min_shards=4)
    return DataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict[int, list[str]]]:
    root = tmp_path_factory.mktemp("celeba_raw")
    return root, make_celeba_tree(root, IDENTITIES, images=(3, 7), seed=0)


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory) -> Path:
    shards = tmp_path_factory.mktemp("celeba_shards")
    return prepare(cfg_for(tree[0], shards), progress=False)


def records(directory: Path) -> dict[str, list]:
    out: dict[str, list] = {}
    for shard in sorted(directory.glob("*.tar")):
        out.setdefault(shard.name.split("-")[0], []).extend(iter_shard(shard))
    return {s: sorted(r, key=lambda rec: rec.class_index) for s, r in out.items()}


def test_identity_split_and_64x64x3_records(tree, prepared):
    raw, table = tree
    m = verify_shards(prepared, "celeba")
    assert m["image_shape"] == [3, 64, 64] and m["classes"] == IDENTITIES
    assert {s: m["splits"][s]["classes"] for s in m["splits"]} == {"train": 21, "val": 3, "test": 6}
    assert m["images"] == sum(len(v) for v in table.values())
    assert all(len(m["splits"][s]["shards"]) >= min(4, m["splits"][s]["classes"]) for s in m["splits"])  # min_shards
    recs = records(prepared)
    ids = sorted(identity_ids(IDENTITIES))  # numeric order (2 < 9 < 102 ...), not string order
    assert [int(r.name) for s in ("train", "val", "test") for r in recs[s]] == ids
    assert [r.class_index for s in ("train", "val", "test") for r in recs[s]] == list(range(IDENTITIES))
    assert [int(r.name) for r in recs["val"]] == ids[21:24]
    for split, rs in recs.items():
        for r in rs:
            assert r.split == split and r.images.dtype == np.uint8 and r.images.shape == (len(table[int(r.name)]), 3, 64, 64)
    # first image of the first identity: the centred 178x178 square of the 178x218 JPEG, BOX-resized to 64x64
    first = recs["train"][0]
    name = sorted(table[int(first.name)])[0]
    with Image.open(raw / "img_align_celeba" / name) as img:
        expect = np.asarray(img.convert("RGB").crop((0, BAND, 178, 178 + BAND)).resize((64, 64), Image.BOX))
    assert np.array_equal(first.images[0].transpose(1, 2, 0), expect)
    red = np.array([r.images[:, 0].mean() - r.images[:, 1:].mean() for rs in recs.values() for r in rs])
    assert red.max() < 200  # the red bands outside the centre square were cut away


def test_prepare_is_deterministic_and_zip_gives_the_same_shards(tree, prepared, tmp_path):
    zipped = tmp_path / "raw_zip"
    make_celeba_tree(zipped, IDENTITIES, images=(3, 7), seed=0, as_zip=True)  # Img/*.zip + Anno/*.txt
    out = prepare(cfg_for(zipped, tmp_path / "shards"), progress=False)
    tars = lambda d: {p.name: p.read_bytes() for p in d.iterdir() if p.suffix in (".tar", ".idx")}  # noqa: E731
    assert tars(out) == tars(prepared)
    m = json.loads((out / "manifest.json").read_text())
    assert m["preparation"]["image_format"] == "png" and m["preparation"]["center_crop"] == 0
    assert ensure_prepared(cfg_for(zipped, tmp_path / "shards"), progress=False) == out  # reused as is
    jpeg = prepare(cfg_for(zipped, tmp_path / "jpeg", image_format="jpeg", min_shards=1), progress=False)
    rec = next(iter_shard(jpeg / "train-000000.tar"))
    assert rec.images.shape[1:] == (3, 64, 64) and (jpeg / "train-000000.idx").is_file()
    assert "images.jpg" in json.loads((jpeg / "manifest.json").read_text())["record"]


def test_missing_or_malformed_raw_data_names_the_file(tree, tmp_path):
    raw, table = tree
    with pytest.raises(DataError, match=r"img_align_celeba.zip.*identity_CelebA.txt.*into"):
        prepare(cfg_for(tmp_path / "empty", tmp_path / "s"), progress=False)
    bad = tmp_path / "bad"
    (bad / "img_align_celeba").mkdir(parents=True)
    for name in sorted(table[identity_ids(IDENTITIES)[0]]):
        (bad / "img_align_celeba" / name).write_bytes((raw / "img_align_celeba" / name).read_bytes())
    with pytest.raises(DataError, match="identity_CelebA.txt` is missing"):
        prepare(cfg_for(bad, tmp_path / "s"), progress=False)
    (bad / "identity_CelebA.txt").write_text("000001.jpg 2\nnot a line\n")
    with pytest.raises(DataError, match=r"identity_CelebA.txt, line 2"):
        prepare(cfg_for(bad, tmp_path / "s"), progress=False)
    (bad / "identity_CelebA.txt").write_text("".join(f"{n} 5\n" for n in ["999999.jpg", *table[identity_ids(IDENTITIES)[0]]]))
    with pytest.raises(DataError, match=r"1 images listed in .*identity_CelebA.txt are missing \(e.g. 999999.jpg\)"):
        prepare(cfg_for(bad, tmp_path / "s"), progress=False)
    with pytest.raises(ValueError, match="data.image_channels must be 3"):
        prepare(cfg_for(raw, tmp_path / "s", image_channels=1), progress=False)
    # the reference's 6,349 identities split 4,444 / 635 / 1,270 (SPEC 5.5)
    assert [len(v) for v in celeba.split_identities(list(range(6349))).values()] == [4444, 635, 1270]


def test_launch_prepare_data_celeba(tree, tmp_path):
    raw, table = tree
    proc = run_module("launch.prepare", "data=celeba", f"data.raw_dir={raw}", f"data.shards_dir={tmp_path}",
                      f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path, timeout=300)
    assert "shards written to" in proc.stdout
    m = verify_shards(tmp_path / "celeba", "celeba")
    assert m["image_shape"] == [3, 64, 64] and m["preparation"]["image_format"] == "jpeg"
    assert m["splits"]["train"]["classes"] == 21 and len(m["splits"]["train"]["shards"]) == 21  # min_shards 32
    from data_pipeline.loaders import make_set_loader

    cfg = DataConfig(name="celeba", shards_dir=str(tmp_path), raw_dir=str(raw), image_size=64, image_channels=3,
                     binarize="none", augment=False, sampling="stream", batch_sets=4)
    with pytest.warns(UserWarning, match="fewer than S=5 images"):  # identities of 3 or 4 images
        loader = make_set_loader(cfg, "train")
    x = next(iter(loader))
    assert x.shape == (4, 5, 3, 64, 64) and x.dtype == torch.float32
    assert 0.0 <= x.min().item() and x.max().item() <= 1.0 and 0.1 < x.mean().item() < 0.9


def test_schavae_logistic_mixture_smoke_training_at_64x64(tmp_path):
    """`experiment=celeba_schavae` (SCHA-VAE, discretized logistic mixture, 64x64x3, streamed shards) shrunk to a
    tiny width and depth: the validation loss (-ELBO per image) decreases from epoch 1 to epoch 2 (3 steps each)."""
    raw = tmp_path / "raw"
    make_celeba_tree(raw, 40, images=10, seed=1)  # train 28 identities x 2 sets, val 4 x 2
    run_dir = tmp_path / "run"
    run_module("launch.train", "experiment=celeba_schavae", f"run_dir={run_dir}", f"data.raw_dir={raw}",
               f"data.shards_dir={tmp_path / 'shards'}", "model.hidden_dim=8", "model.c_dim=2", "model.z_dim=2",
               "data.batch_sets=2", "data.limit_batches=3", "trainer.epochs=2", "trainer.eval_test=false",
               "trainer.progress=false", "trainer.lr=1e-3", "tracking.enabled=false",
               # one block per resolution (64 ... 1) instead of the 64-level defaults: same model, a third the time
               "model.str_enc='64-1,32-1,16-1,8-1,4-1,2-1,1-1'", "model.str_gen='8-1,4-1,2-1,1-1'",
               "model.str_dec='64-1,32-1,16-1,8-1'", cwd=tmp_path, timeout=600)
    epochs = [json.loads(line) for line in (run_dir / "epochs.jsonl").read_text().splitlines()]
    val = [-e["val/vlb"] for e in epochs]
    assert len(val) == 2 and val[1] < val[0], val
    resolved = (run_dir / "config.yaml").read_text()
    assert "discretized_mix_logistic" in resolved and "image_size: 64" in resolved
