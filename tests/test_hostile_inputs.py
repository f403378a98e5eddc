"""Hostile inputs the readers meet: each gives a clear error naming the file and the problem (or a documented
skip with a warning), never a silent wrong result or a hang. (Damaged shards, foreign manifests, corrupt or
foreign zips and bad downloads are covered in test_data_prepare.py / test_data_reader.py.)"""
import json
import shutil

import numpy as np
import pytest

from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.sets import SetLoader
from data_pipeline.shards import MANIFEST, encode_record, iter_shard, manifest_bytes, tar_bytes, write_shard


@pytest.fixture
def dataset(tmp_path, omniglot_ns_shards):
    root = tmp_path / "shards"
    shutil.copytree(omniglot_ns_shards, root)
    return root


def rewrite_first_record(root, shard_file, change):
    """Rewrite `shard_file` with its first record altered by `change(members) -> members`; keep the manifest's
    checksums consistent, so only the record-level checks can catch the problem."""
    d = root / "omniglot_ns"
    records = list(iter_shard(d / shard_file))
    members = [m for i, r in enumerate(records) for m in (change(encode_record(r)) if i == 0 else encode_record(r))]
    data = tar_bytes(members)
    (d / shard_file).write_bytes(data)
    manifest = json.loads((d / MANIFEST).read_text())
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            if entry["file"] == shard_file:
                import hashlib

                entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (d / MANIFEST).write_bytes(manifest_bytes(manifest))


def loader(root, split="train"):
    cfg = DataConfig(name="omniglot_ns", shards_dir=str(root), download=False, batch_sets=8)
    return SetLoader(cfg, split)


def drain(ld):
    ld.set_epoch(0)
    for _ in ld:
        pass


def test_non_image_bytes_in_a_record_name_the_shard(dataset):
    rewrite_first_record(dataset, "train-000000.tar",
                         lambda ms: [(n, b"this is not an image" if n.endswith("images.npy") else b) for n, b in ms])
    with pytest.raises(DataError, match=r"train-000000\.tar"):
        drain(loader(dataset))


def test_wrong_image_shape_names_the_shard_and_the_shapes(dataset):
    def bigger(ms):
        import io

        out = []
        for n, b in ms:
            if n.endswith("images.npy"):
                buf = io.BytesIO()
                np.save(buf, np.zeros((20, 1, 32, 32), np.uint8))
                b = buf.getvalue()
            out.append((n, b))
        return out

    rewrite_first_record(dataset, "train-000000.tar", bigger)
    with pytest.raises(DataError, match=r"train-000000\.tar.*(shape|32)"):
        drain(loader(dataset))


def test_empty_split_is_an_error_naming_the_split(dataset):
    d = dataset / "omniglot_ns"
    manifest = json.loads((d / MANIFEST).read_text())
    for entry in manifest["splits"]["val"]["shards"]:
        (d / entry["file"]).unlink()
    manifest["splits"]["val"]["shards"] = []
    manifest["splits"]["val"]["classes"] = 0
    manifest["splits"]["val"]["images"] = 0
    (d / MANIFEST).write_bytes(manifest_bytes(manifest))
    with pytest.raises(DataError, match="val"):
        drain(loader(dataset, "val"))
