"""MNIST raw files: downloads verified against the canonical md5 (served from 127.0.0.1), local files checked by
content (the md5 of the uncompressed IDX bytes, counts) rather than by the bytes of their .gz."""
from __future__ import annotations

import gzip
import hashlib
import shutil
import warnings

import pytest

from conftest import shared_data
from data_pipeline import mnist
from data_pipeline.download import RawDataWarning
from data_pipeline.errors import DataError
from http_files import FileServer, no_proxy  # noqa: F401  (no_proxy: a fixture)

TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def test_pins_are_torchvision_s():
    from torchvision.datasets import MNIST

    assert mnist.OFFICIAL_MD5_GZ == dict(MNIST.resources) and mnist.MIRRORS == tuple(MNIST.mirrors)


def test_download_tries_mirrors_and_keeps_only_the_pinned_digest(tmp_path, no_proxy, monkeypatch):
    served = {name: (shared_data() / "mnist" / name).read_bytes() for name in TEST_FILES}
    with FileServer({f"/files/{n}": (b, "full") for n, b in served.items()}) as srv:
        mirrors = (srv.url.replace("/files/", "/gone/"), srv.url)  # the first mirror answers 404
        # the canonical digests: this project's re-compressed copies are refused, nothing is kept
        with pytest.raises(DataError) as e:
            mnist.download_missing(tmp_path / "a", ["test"], mirrors, attempts=2)
        msg = str(e.value)
        assert "HTTP Error 404" in msg and mnist.OFFICIAL_MD5_GZ[TEST_FILES[0]] in msg
        # a 404 is not asked again; a wrong digest is (a cut-short transfer looks the same)
        assert "gone/t10k-images-idx3-ubyte.gz (attempt 2)" not in msg
        assert "files/t10k-images-idx3-ubyte.gz (attempt 2)" in msg
        assert not any((tmp_path / "a").iterdir())
        # pins pointed at the served copies (the official bytes are not available here): kept and readable
        monkeypatch.setattr(mnist, "OFFICIAL_MD5_GZ", {n: hashlib.md5(b).hexdigest() for n, b in served.items()})
        mnist.check_raw(tmp_path / "b", ["test"], download=True, mirrors=mirrors)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(TEST_FILES)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RawDataWarning)  # canonical content: no warning
        images, labels = mnist.load_digits(tmp_path / "b", "test")
    assert images.shape == (10_000, 28, 28) and labels.shape == (10_000,)


def test_local_files_are_checked_by_content(tmp_path):
    src = shared_data() / "mnist"
    for case in ("altered", "short"):
        raw = tmp_path / case
        raw.mkdir()
        shutil.copy(src / TEST_FILES[1], raw / TEST_FILES[1])
        data = bytearray(gzip.decompress((src / TEST_FILES[0]).read_bytes()))
        if case == "altered":
            data[16 + 14 * 28 + 14] ^= 0xFF  # one pixel of the first image
        else:  # a consistent IDX file with 9,999 images: not the MNIST test set
            data = data[:4] + (9_999).to_bytes(4, "big") + data[8:-784]
        (raw / "t10k-images-idx3-ubyte").write_bytes(data)
        if case == "altered":
            with pytest.warns(RawDataWarning, match=r"t10k-images-idx3-ubyte: md5 [0-9a-f]{32} \(uncompressed\) "
                                                    r"is not the official"):
                assert mnist.load_digits(raw, "test")[0].shape == (10_000, 28, 28)
        else:
            with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: expected the 10000 uint8 MNIST test"):
                mnist.load_digits(raw, "test")
