"""Where a prepared dataset is read from: a local directory, or a bucket of S3-compatible object storage
(``data.shards_dir=s3://<bucket>/<prefix>``; the dataset is ``s3://<bucket>/<prefix>/<name>/``).

A bucket is reached through fsspec's S3 filesystem (s3fs), set up the way the S3 ecosystem is: ``AWS_ENDPOINT_URL``
for a store that is not AWS (MinIO, Ceph RGW, SeaweedFS, GCS's S3 API), ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` or ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``. None of it is a config key, so nothing secret
reaches a config, a log line, an MLflow param or a model card.

Every shard object is read whole and checked against the manifest's size and sha256 before any of its records is
used. A shard is small (``classes_per_shard`` records) and checking while streaming would hand out records of an
object that then turns out to be changed or cut short. A changed object is refused naming it (a data error); a
failed or short read is retried up to ``ATTEMPTS`` times within ``BUDGET_S``, then the run stops with
:class:`StoreUnavailable` (exit 11, worth a retry). ``data.cache_dir`` keeps verified shards, named by their
sha256, between epochs and runs; DALI's webdataset reader takes local paths only, so ``reader=dali`` reads from that
cache (a temporary one when ``data.cache_dir`` is empty).
"""
from __future__ import annotations

import atexit
import io
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator
from urllib.parse import urlsplit

from .errors import DataError, StoreUnavailable
from .locations import dataset_location, is_remote
from .shards import MANIFEST, ClassRecord, iter_shard, parse_manifest, read_manifest, sha256_file, verify_shards

log = logging.getLogger(__name__)

# How long a store that is away or stalled may hold a run, in one place (docs/data.md states the bound).
CONNECT_TIMEOUT_S = 5.0  # a TCP connection not made in this long fails the attempt
READ_TIMEOUT_S = 10.0  # an open connection that sends no byte for this long (a stalled store) fails the attempt
ATTEMPTS = 5  # reads of one object before the store counts as unavailable
FIRST_DELAY_S = 0.5  # then doubling: 0.5 + 1 + 2 + 4 = 7.5 s of waiting in all
# An attempt that fails by timing out costs at most two requests' timeouts (s3fs may ask for the object's size before
# reading it); no attempt starts that could end past BUDGET_S after the first one began. So a store that answers
# nothing (accepts connections, never replies) ends the run within BUDGET_S; one that refuses connections within
# the 7.5 s of delays. A slow read that is still receiving bytes is never cut short.
ATTEMPT_WORST_S = 2 * (CONNECT_TIMEOUT_S + READ_TIMEOUT_S)
BUDGET_S = 60.0


def source_of(cfg: Any) -> "LocalShards | BucketShards":
    """The shards of the dataset `cfg` (a DataConfig) names, where they are."""
    location = dataset_location(cfg)
    if is_remote(location):
        return BucketShards(location, getattr(cfg, "cache_dir", ""))
    return LocalShards(location)


class LocalShards:
    """A prepared dataset in a local (or mounted) directory: shards are hashed once, by `verify`."""

    remote = False

    def __init__(self, location: str | Path):
        self.directory = Path(location)
        self.location = str(self.directory)

    def exists(self) -> bool:
        return (self.directory / MANIFEST).is_file()

    def manifest_raw(self) -> bytes:
        read_manifest(self.directory)  # the missing-manifest message
        return (self.directory / MANIFEST).read_bytes()

    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.directory)

    def verify(self, name: str | None, splits: Iterable[str] | None = None, check_sha256: bool = True) -> dict:
        return verify_shards(self.directory, name, splits=splits, check_sha256=check_sha256)

    def url(self, file: str) -> str:
        return str(self.directory / file)

    def open(self, url: str) -> BinaryIO:
        return open(url, "rb")

    def local_path(self, file: str) -> str:
        return str(self.directory / file)

    def records(self, file: str) -> Iterator[ClassRecord]:
        return iter_shard(self.directory / file)


class BucketShards:
    """A prepared dataset under ``s3://bucket/prefix/<name>`` (see the module docstring)."""

    remote = True

    def __init__(self, location: str, cache_dir: str = ""):
        self.location = location.rstrip("/")
        self.cache_dir = cache_dir
        self._expected: dict[str, tuple[str, int]] = {}  # object URL -> (sha256, bytes), from the manifest
        self._fs_pid: tuple[int, Any] | None = None
        self._temp_cache: str | None = None

    def __getstate__(self) -> dict:  # DataLoader workers build their own client (s3fs's is not fork-safe)
        return {**self.__dict__, "_fs_pid": None}

    # ------------------------------------------------------------------ the store
    def _fs(self):
        if self._fs_pid is None or self._fs_pid[0] != os.getpid():
            import s3fs

            # one bounded retry loop, ours (`_read`), with a message per failure: s3fs's and botocore's own
            # retries would multiply it and stay silent
            fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={
                "retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": CONNECT_TIMEOUT_S,
                "read_timeout": READ_TIMEOUT_S})
            fs.retries = 1
            self._fs_pid = (os.getpid(), fs)
        return self._fs_pid[1]

    def url(self, file: str) -> str:
        return f"{self.location}/{file}"

    @staticmethod
    def _key(url: str) -> str:
        return url.split("://", 1)[1]

    def _call(self, what: str, url: str, fn):
        """`fn()` with up to ATTEMPTS tries within BUDGET_S against a store that may be briefly away; a refusal
        (no such bucket or object, bad credentials) is a DataError at once."""
        delay = FIRST_DELAY_S
        start = time.monotonic()
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return fn()
            except FileNotFoundError as exc:
                raise DataError(f"{url}: not found ({exc}); check the bucket and prefix of data.shards_dir") from exc
            except PermissionError as exc:
                raise DataError(f"{url}: access denied ({exc}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                                f"(or AWS_PROFILE) and AWS_ENDPOINT_URL") from exc
            except _Partial as exc:
                problem = str(exc)
            except _transient() as exc:  # connection refused / reset, timeouts, 5xx: the store may come back
                if _is_refusal(exc):
                    raise DataError(f"{url}: the store refused {what}: {type(exc).__name__}: {exc}; check the "
                                    f"credentials (AWS_*) and the endpoint (AWS_ENDPOINT_URL)") from exc
                problem = f"{type(exc).__name__}: {exc}"
            elapsed = time.monotonic() - start
            if attempt == ATTEMPTS or elapsed + delay + ATTEMPT_WORST_S > BUDGET_S:
                raise StoreUnavailable(f"{url}: {what} failed {attempt} times in {elapsed:.0f} s (at most "
                                       f"{ATTEMPTS} tries within {BUDGET_S:.0f} s), last: {problem}")
            log.warning("%s: %s failed (%s); retry %d/%d in %.1f s", url, what, problem, attempt, ATTEMPTS - 1, delay)
            time.sleep(delay)
            delay *= 2

    def _get(self, url: str, size: int | None = None) -> bytes:
        def read() -> bytes:
            data = self._fs().cat_file(self._key(url))
            if size is not None and len(data) != size:  # the connection was cut, or the object changed size
                raise _Partial(f"read {len(data)} of {size} bytes")
            return data

        return self._call("read", url, read)

    def exists(self) -> bool:
        return bool(self._call("lookup", self.url(MANIFEST), lambda: self._fs().exists(self._key(self.url(MANIFEST)))))

    def check_access(self) -> None:
        """The bucket exists and these credentials may list it (DataError otherwise), before any long work."""
        bucket = urlsplit(self.location).netloc
        self._call("listing", f"s3://{bucket}", lambda: self._fs().ls(bucket, refresh=True))

    # ------------------------------------------------------------------ the dataset
    def manifest_raw(self) -> bytes:
        url = self.url(MANIFEST)
        if not self.exists():
            raise DataError(f"{url} is missing: {self.location} holds no prepared dataset. Run `python -m "
                            f"launch.prepare data=<name> data.shards_dir={self.location.rsplit('/', 1)[0]}` first.")
        return self._get(url)

    def manifest(self) -> dict[str, Any]:
        return parse_manifest(self.manifest_raw(), self.url(MANIFEST))

    def verify(self, name: str | None, splits: Iterable[str] | None = None, check_sha256: bool = True) -> dict:
        """The manifest, after checking that every object it lists for `splits` is in the bucket with its size
        (one listing; the sha256 of each object is checked when it is read)."""
        manifest = self.manifest()
        if name is not None and manifest["dataset"] != name:
            raise DataError(f"{self.url(MANIFEST)}: manifest is for dataset {manifest['dataset']!r}, expected "
                            f"{name!r}; the prefix holds another dataset's shards")
        listing = self._call("listing", self.location,
                             lambda: {f"s3://{o['name']}": o["size"]
                                      for o in self._fs().ls(self._key(self.location), detail=True, refresh=True)})
        for split in splits if splits is not None else manifest["splits"]:
            if split not in manifest["splits"]:
                raise DataError(f"{self.url(MANIFEST)}: dataset {manifest['dataset']!r} has no split {split!r}")
            for shard in manifest["splits"][split]["shards"]:
                objects = [(shard["file"], shard["sha256"], shard["bytes"])]
                if "index_file" in shard:
                    objects.append((shard["index_file"], shard["index_sha256"], None))
                for file, sha, size in objects:
                    url = self.url(file)
                    if url not in listing:
                        raise DataError(f"{url}: object listed in {self.url(MANIFEST)} is missing")
                    if size is not None and listing[url] != size:
                        raise DataError(f"{url}: object changed: {listing[url]} bytes, the manifest says {size}")
                    self._expected[url] = (sha, listing[url])
        return manifest

    def fetch(self, url: str) -> bytes:
        """The bytes of a shard or index object named in the verified manifest, checked against its sha256."""
        import hashlib

        if url not in self._expected:
            raise DataError(f"{url}: not in the verified manifest of {self.location}")
        sha, size = self._expected[url]
        cached = self._cache_path(sha)
        if cached is not None and cached.is_file():
            data = cached.read_bytes()
            if hashlib.sha256(data).hexdigest() == sha:
                return data
            cached.unlink(missing_ok=True)  # a damaged cache entry: read the object again
        data = self._get(url, size)
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha:
            raise DataError(f"{url}: object changed: sha256 {digest} does not match the manifest's {sha}; "
                            f"prepare the dataset again")
        if cached is not None:
            _write_atomically(cached, data)
        return data

    def _cache_path(self, sha: str) -> Path | None:
        return Path(self.cache_dir) / sha if self.cache_dir else None

    def open(self, url: str) -> BinaryIO:
        return io.BytesIO(self.fetch(url))

    def local_path(self, file: str) -> str:
        """A verified local copy of `file` (DALI reads local paths): in data.cache_dir, else a temporary cache."""
        url = self.url(file)
        sha, _ = self._expected[url]
        if not self.cache_dir:
            if self._temp_cache is None:
                self._temp_cache = tempfile.mkdtemp(prefix="shard-cache-")
                atexit.register(shutil.rmtree, self._temp_cache, True)
            path = Path(self._temp_cache) / sha
        else:
            path = self._cache_path(sha)
        if path.is_file() and sha256_file(path) == sha:
            return str(path)
        data = self.fetch(url)
        if not path.is_file():  # fetch wrote data.cache_dir's copy already
            _write_atomically(path, data)
        return str(path)

    def records(self, file: str) -> Iterator[ClassRecord]:
        if not self._expected:
            self.verify(None)
        return iter_shard(self.open(self.url(file)), self.url(file))

    def publish(self, local: Path) -> tuple[int, int]:
        """Upload the prepared dataset in `local` here: shards and indexes first, the manifest last (readers see
        a complete dataset or the previous one); an object the current manifest lists with the same sha256 and
        size is kept, not rewritten. Returns (objects written, objects kept)."""
        new_raw = (Path(local) / MANIFEST).read_bytes()
        new = parse_manifest(new_raw, str(Path(local) / MANIFEST))
        old_raw = self.manifest_raw() if self.exists() else None
        old: dict[str, str] = {}
        if old_raw is not None:
            try:
                for split in self.verify(None)["splits"].values():
                    for s in split["shards"]:
                        old[s["file"]] = s["sha256"]
                        if "index_file" in s:
                            old[s["index_file"]] = s["index_sha256"]
            except DataError:  # an incomplete or damaged earlier upload: write everything
                old = {}
        written = kept = 0
        for split in new["splits"].values():
            for s in split["shards"]:
                pairs = [(s["file"], s["sha256"])] + ([(s["index_file"], s["index_sha256"])] if "index_file" in s else [])
                for file, sha in pairs:
                    if old.get(file) == sha:
                        kept += 1
                        continue
                    url = self.url(file)
                    self._call("upload", url, lambda f=file, u=url: self._fs().put_file(str(Path(local) / f), self._key(u)))
                    written += 1
        if new_raw != old_raw:
            url = self.url(MANIFEST)
            self._call("upload", url, lambda: self._fs().pipe_file(self._key(url), new_raw))
            written += 1
        else:
            kept += 1
        return written, kept


class _Partial(Exception):
    """A read returned fewer bytes than the object has (retried like a lost connection)."""


def _transient() -> tuple:
    """What a store that is briefly away raises through s3fs: socket errors and timeouts, aiohttp's and botocore's
    connection errors, an HTTP error answer (a refusal among them is told apart by `_is_refusal`)."""
    import asyncio

    import aiohttp
    import botocore.exceptions

    return (OSError, asyncio.TimeoutError, aiohttp.ClientError, botocore.exceptions.BotoCoreError,
            botocore.exceptions.ClientError)


def _is_refusal(exc: Exception) -> bool:
    """botocore's answers that no retry changes (bad signature or key, no such bucket, a profile the AWS files do
    not have)."""
    text = f"{type(exc).__name__} {exc}"
    return any(code in text for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket",
                                         "AccessDenied", "PartialCredentialsError", "NoCredentialsError",
                                         "ProfileNotFound"))


def _write_atomically(path: Path, data: bytes) -> None:
    """Rename into place, so concurrent ranks on a node never read a half-written cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
