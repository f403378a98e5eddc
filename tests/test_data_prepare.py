"""Omniglot source, deterministic shards, manifest and verification (real data from ../shared/data)."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import omniglot
from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.prepare import ensure_prepared, prepare, stale_reason
from data_pipeline.download import RawDataWarning, download_verified, md5_file
from data_pipeline.shards import MANIFEST, iter_shard, sha256_file, verify_shards
from http_files import FileServer as _Server, no_proxy  # noqa: F401  (no_proxy: a fixture)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def raw_dir() -> Path:
    if not (SHARED / "omniglot" / "images_background.zip").is_file():
        pytest.fail(f"real test data missing: expected {SHARED}/omniglot/images_background.zip beside the repository")
    return SHARED / "omniglot"


def cfg_for(name: str, shards: Path, raw: Path | None = None, **kw) -> DataConfig:
    return DataConfig(name=name, raw_dir=str(raw or raw_dir()), shards_dir=str(shards), download=False, **kw)


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="session")
def back_eval_shards(tmp_path_factory) -> Path:
    shards = tmp_path_factory.mktemp("back_eval_shards")
    prepare(cfg_for("omniglot_back_eval", shards), progress=False)
    return shards


# ------------------------------------------------------------------------------------------------ splits and format
def test_back_eval_splits_and_record_format(back_eval_shards):
    d = back_eval_shards / "omniglot_back_eval"
    m = verify_shards(d)
    assert m["dataset"] == "omniglot_back_eval" and m["image_shape"] == [1, 28, 28]
    counts = {s: (m["splits"][s]["classes"], m["splits"][s]["images"]) for s in ("train", "val", "test")}
    assert counts == {"train": (867, 17340), "val": (97, 1940), "test": (659, 13180)}
    assert m["classes"] == 1623 and m["images"] == 32460
    assert sorted(p.name for p in d.glob("*.tar")) == (
        [f"test-{i:06d}.tar" for i in range(7)] + [f"train-{i:06d}.tar" for i in range(9)] + ["val-000000.tar"]
    )
    bg = {c.name for c in omniglot.list_characters(omniglot.locate_sources(raw_dir(), False)["images_background"])}
    seen = {}
    for shard in sorted(d.glob("*.tar")):
        entry = next(s for sp in m["splits"].values() for s in sp["shards"] if s["file"] == shard.name)
        recs = list(iter_shard(shard))
        assert len(recs) == entry["records"] and [r.class_index for r in recs] == entry["class_indices"]
        for r in recs:
            assert r.images.dtype == np.uint8 and r.images.shape == (20, 1, 28, 28)
            assert r.split == shard.name.split("-")[0]
            seen[r.class_index] = (r.name, r.split)
    assert sorted(seen) == list(range(1623))
    # background -> train (first 867 sorted) / val (last 97); evaluation -> test
    names = {split: [seen[i][0] for i in sorted(seen) if seen[i][1] == split] for split in ("train", "val", "test")}
    assert set(names["train"]) | set(names["val"]) == bg and not set(names["test"]) & bg
    assert names["train"] + names["val"] == sorted(bg, key=lambda n: tuple(n.split("/")))
    assert all(n.count("/") == 1 and n.split("/")[1].startswith("character") for n in names["test"])
    # ink is white-on-black after inversion: mostly background (0), strokes up to 255
    first = next(iter_shard(d / "train-000000.tar")).images
    assert first.max() == 255 and (first == 0).mean() > 0.7


def test_back_eval_loader(back_eval_shards):
    from data_pipeline.sets import SetLoader

    cfg = cfg_for("omniglot_back_eval", back_eval_shards)
    lengths = {s: len(SetLoader(cfg, s)) for s in ("train", "val", "test")}
    assert lengths == {"train": 867 * 4 * 2 // 100, "val": 8, "test": 27}  # val 97*4*2=776, test 659*4=2636 sets
    x = next(iter(SetLoader(cfg, "val")))
    assert x.shape == (100, 5, 1, 28, 28) and set(x.unique().tolist()) == {0.0, 1.0}


def test_ns_splits_independent_of_alphabets(omniglot_ns_shards):
    d = omniglot_ns_shards / "omniglot_ns"
    m = verify_shards(d)
    assert {s: m["splits"][s]["classes"] for s in m["splits"]} == {"train": 1000, "val": 200, "test": 423}
    assert {s: m["splits"][s]["images"] for s in m["splits"]} == {"train": 20000, "val": 4000, "test": 8460}
    assert m["preparation"]["split_seed"] == 0
    assert m["preparation"]["sources"] == {s: sha256_file(raw_dir() / f"{s}.zip") for s in omniglot.SUBSETS}
    alphabets = {}
    for shard in sorted(d.glob("*.tar")):
        for r in iter_shard(shard):
            alphabets.setdefault(r.split, set()).add(r.name.split("/")[0])
    assert alphabets["test"] & alphabets["train"]  # test characters from alphabets also seen in training


def test_prepare_is_byte_deterministic(omniglot_ns_shards, tmp_path):
    omniglot.clear_decode_cache()  # decode the PNGs again rather than reuse the fixture's arrays
    again = prepare(cfg_for("omniglot_ns", tmp_path), progress=False)
    assert again == tmp_path / "omniglot_ns"
    assert files_of(again) == files_of(omniglot_ns_shards / "omniglot_ns")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".omniglot_ns.")] == [".omniglot_ns.lock"]


def test_split_seed_changes_ns_split(omniglot_ns_shards, tmp_path):
    out = prepare(cfg_for("omniglot_ns", tmp_path, split_seed=1), progress=False)
    a, b = verify_shards(out), verify_shards(omniglot_ns_shards / "omniglot_ns")
    assert a["splits"]["train"]["classes"] == 1000
    assert a["splits"]["train"]["shards"][0]["sha256"] != b["splits"]["train"]["shards"][0]["sha256"]


# ------------------------------------------------------------------------------------------------ verify / ensure
@pytest.fixture
def ns_copy(omniglot_ns_shards, tmp_path) -> Path:
    shutil.copytree(omniglot_ns_shards / "omniglot_ns", tmp_path / "omniglot_ns")
    return tmp_path


def test_verify_detects_damage(ns_copy):
    d = ns_copy / "omniglot_ns"
    shard = d / "train-000003.tar"
    original = shard.read_bytes()

    shard.write_bytes(original[: len(original) // 2])
    with pytest.raises(DataError, match=r"train-000003\.tar: shard is truncated"):
        verify_shards(d)

    flipped = bytearray(original)
    flipped[len(flipped) // 3] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match=r"train-000003\.tar: shard is corrupt: sha256"):
        verify_shards(d)

    shard.unlink()
    with pytest.raises(DataError, match=r"train-000003\.tar: shard listed in .*manifest\.json is missing"):
        verify_shards(d)

    other = ns_copy / "omniglot_back_eval"
    shutil.copytree(d, other)
    with pytest.raises(DataError, match=r"manifest is for dataset 'omniglot_ns', expected 'omniglot_back_eval'"):
        verify_shards(other)
    with pytest.raises(DataError, match=r"manifest\.json is missing"):
        verify_shards(ns_copy / "nothing")


def test_ensure_prepared_reuses_refuses_damage_and_rebuilds_on_config_change(ns_copy):
    cfg = cfg_for("omniglot_ns", ns_copy)
    d = ns_copy / "omniglot_ns"
    reference = files_of(d)
    inode = (d / MANIFEST).stat().st_ino
    assert stale_reason(cfg) is None
    assert ensure_prepared(cfg, progress=False) == d
    assert (d / MANIFEST).stat().st_ino == inode  # reused, not rewritten

    good = (d / "val-000001.tar").read_bytes()
    (d / "val-000001.tar").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"val-000001\.tar"):  # damaged storage fails fast, never rebuilt silently
        ensure_prepared(cfg, progress=False)
    assert (d / "val-000001.tar").read_bytes() == b"garbage"
    prepare(cfg, progress=False)  # the deliberate rebuild (`launch.prepare`) repairs it
    assert (d / "val-000001.tar").read_bytes() == good and files_of(d) == reference

    # a config that changes the bytes (fewer classes per shard) is not reused
    cfg50 = cfg_for("omniglot_ns", ns_copy, classes_per_shard=50)
    assert "classes_per_shard" in stale_reason(cfg50)
    m = verify_shards(ensure_prepared(cfg50, progress=False))
    assert len(m["splits"]["train"]["shards"]) == 20 and m["preparation"]["classes_per_shard"] == 50


# ------------------------------------------------------------------------------------------------ raw data problems
def test_missing_raw_data_without_download(tmp_path):
    cfg = cfg_for("omniglot_ns", tmp_path / "shards", raw=tmp_path / "raw")
    with pytest.raises(DataError) as e:
        prepare(cfg, progress=False)
    msg = str(e.value)
    assert "images_background.zip" in msg and "images_evaluation.zip" in msg and str(tmp_path / "raw") in msg
    assert "data.download=false" in msg
    assert not (tmp_path / "shards" / "omniglot_ns").exists()


def _zip_with(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_corrupt_or_foreign_archives(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "images_evaluation.zip").symlink_to(raw_dir() / "images_evaluation.zip")
    bad = raw / "images_background.zip"

    bad.write_bytes((raw_dir() / "images_background.zip").read_bytes()[:100_000])  # cut short
    with pytest.raises(DataError, match=r"images_background\.zip is not a readable zip archive"):
        prepare(cfg_for("omniglot_back_eval", tmp_path / "s", raw=raw), progress=False)

    _zip_with(bad, {"readme.txt": b"hello", "data/x.csv": b"1,2"})
    with pytest.raises(DataError, match=r"images_background\.zip is not an Omniglot archive"):
        prepare(cfg_for("omniglot_back_eval", tmp_path / "s", raw=raw), progress=False)

    png = io.BytesIO()
    from PIL import Image

    Image.new("1", (105, 105), 1).save(png, format="PNG")
    _zip_with(bad, {f"images_background/A/character01/0001_{i:02d}.png": png.getvalue() for i in range(1, 21)})
    with pytest.raises(DataError, match=r"images_background\.zip does not hold the expected Omniglot set: found 1 "):
        prepare(cfg_for("omniglot_back_eval", tmp_path / "s", raw=raw), progress=False)
    assert not (tmp_path / "s" / "omniglot_back_eval").exists()

    # a member that is not a PNG: named in the error
    src = omniglot.Source("images_background", _zip_with(tmp_path / "x.zip", {"A/c/1.png": b"not a png"}), "zip", "")
    ch = omniglot.Character("images_background", "A", "c", ("A/c/1.png",))
    with pytest.raises(DataError, match=r"x\.zip: A/c/1\.png is not a 105x105 Omniglot PNG"):
        omniglot.load_images(src, [ch], 28)


def test_extracted_folder_matches_zip(tmp_path):
    with zipfile.ZipFile(raw_dir() / "images_evaluation.zip") as z:
        z.extractall(tmp_path)
    (tmp_path / "images_background.zip").symlink_to(raw_dir() / "images_background.zip")
    sources = omniglot.locate_sources(tmp_path, download=False)
    assert sources["images_evaluation"].kind == "folder" and sources["images_background"].kind == "zip"
    folder_chars = omniglot.list_characters(sources["images_evaluation"])
    zip_src = omniglot.locate_sources(raw_dir(), download=False)["images_evaluation"]
    zip_chars = omniglot.list_characters(zip_src)
    assert [c.name for c in folder_chars] == [c.name for c in zip_chars] and len(zip_chars) == 659
    picks = [0, 311, 658]
    a = omniglot.load_images(sources["images_evaluation"], [folder_chars[i] for i in picks], 28)
    b = omniglot.load_images(zip_src, [zip_chars[i] for i in picks], 28)
    assert np.array_equal(a, b)


# ------------------------------------------------------------------------------------------------ download
def test_official_digests_are_the_ones_torchvision_checks():
    from torchvision.datasets import Omniglot

    assert omniglot.OFFICIAL_MD5 == Omniglot.zips_md5


def test_download_refuses_other_files_and_keeps_none(tmp_path, no_proxy):
    """The project's own copies are repacked (not the official bytes): a server sending them is refused."""
    copy = (raw_dir() / "images_background.zip").read_bytes()
    routes = {"/files/images_background.zip": (copy, "full"), "/files/images_evaluation.zip": (copy, "cut")}
    with _Server(routes) as srv:
        for subset, sent in (("images_background", copy), ("images_evaluation", copy[: len(copy) // 2])):
            url, dest = omniglot.official_url(subset, srv.url), tmp_path / f"{subset}.zip"
            with pytest.raises(DataError) as e:
                download_verified(url, dest, omniglot.OFFICIAL_MD5[subset], attempts=2, retry_wait=0)
            msg = str(e.value)
            assert url in msg and str(dest) in msg and omniglot.OFFICIAL_MD5[subset] in msg
            assert f"md5 {hashlib.md5(sent).hexdigest()} ({len(sent)} bytes)" in msg and "attempt 2" in msg
            assert list(tmp_path.iterdir()) == []  # neither the file nor a temp file is kept


def test_prepare_downloads_files_with_the_pinned_digest(tmp_path, no_proxy, omniglot_ns_shards, monkeypatch):
    """Served files whose md5 is the pinned one are kept and prepared. The official bytes are not available here,
    so the pins are pointed at the served copies' md5 (the refusal of any other file is tested above)."""
    served = {s: (raw_dir() / f"{s}.zip").read_bytes() for s in omniglot.SUBSETS}
    monkeypatch.setattr(omniglot, "OFFICIAL_MD5", {s: hashlib.md5(b).hexdigest() for s, b in served.items()})
    raw = tmp_path / "raw"
    with _Server({f"/files/{s}.zip": (b, "full") for s, b in served.items()}) as srv:
        cfg = DataConfig(name="omniglot_ns", raw_dir=str(raw), shards_dir=str(tmp_path / "s"), download=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RawDataWarning)  # the pinned digest: no warning
            out = prepare(cfg, progress=False, base_url=srv.url)
    assert sorted(p.name for p in raw.iterdir()) == ["images_background.zip", "images_evaluation.zip"]
    assert {s: md5_file(raw / f"{s}.zip") for s in served} == omniglot.OFFICIAL_MD5
    assert files_of(out) == files_of(omniglot_ns_shards / "omniglot_ns")


# ------------------------------------------------------------------------------------------------ local raw content
def test_unofficial_local_zip_is_accepted_with_a_warning():
    src = omniglot.locate_sources(raw_dir(), download=False)["images_evaluation"]
    with pytest.warns(RawDataWarning, match=r"images_evaluation\.zip: md5 [0-9a-f]{32} is not the official"):
        assert omniglot.check_official(src) is False


def test_blanked_images_are_refused_and_verified_shards_kept(tmp_path, back_eval_shards):
    """400 images of the evaluation zip replaced by blank PNGs: prepare names the zip and the count, and the
    previously verified shards stay as they were."""
    from PIL import Image

    blank = io.BytesIO()
    Image.new("1", (105, 105), 1).save(blank, format="PNG")  # white = no ink
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "images_background.zip").symlink_to(raw_dir() / "images_background.zip")
    with zipfile.ZipFile(raw_dir() / "images_evaluation.zip") as z, \
            zipfile.ZipFile(raw / "images_evaluation.zip", "w", zipfile.ZIP_STORED) as out:
        pngs = sorted(n for n in z.namelist() if n.endswith(".png"))
        blanked = set(pngs[::32][:400])
        for name in z.namelist():
            out.writestr(name, blank.getvalue() if name in blanked else z.read(name))
    assert len(blanked) == 400
    shards = tmp_path / "shards"
    shutil.copytree(back_eval_shards, shards)
    before = files_of(shards / "omniglot_back_eval")
    with pytest.raises(DataError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore", RawDataWarning)
        prepare(cfg_for("omniglot_back_eval", shards, raw=raw), progress=False)
    msg = str(e.value)
    assert str(raw / "images_evaluation.zip") in msg and "400 of 13180 images hold no ink" in msg
    assert sorted(blanked)[0] in msg
    assert files_of(shards / "omniglot_back_eval") == before
