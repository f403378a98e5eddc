"""Download of official raw files, verified against the official md5 (torchvision's download/integrity helpers).

A file is fetched into a private temp folder beside its destination and renamed into place only when its md5 is the
pinned one, so a failed, cut-short or wrong download never leaves a file where the next run would pick it up.
torch (pulled in by torchvision) is imported only when a download or a digest is actually needed.
"""
from __future__ import annotations

import http.client
import os
import shutil
import time
import urllib.error
import warnings
from pathlib import Path
from typing import Sequence

from .errors import DataError


class RawDataWarning(UserWarning):
    """Raw data accepted by its content although its bytes are not the official file's."""


def md5_file(path: str | Path) -> str:
    from torchvision.datasets.utils import calculate_md5

    return calculate_md5(path)


def warn_unofficial(path: Path, md5: str, official: str, checked: str) -> None:
    warnings.warn(
        f"{path}: md5 {md5} is not the official file's ({official}); it is used because its content is checked "
        f"({checked}). If you downloaded it yourself, it may be a repacked copy.",
        RawDataWarning,
        stacklevel=3,
    )


def download_verified(
    urls: str | Sequence[str], dest: str | Path, md5: str, attempts: int = 3, retry_wait: float = 2.0
) -> Path:
    """Fetch the first of ``urls`` (mirrors, in order) that answers to ``dest``; its md5 must equal ``md5``.

    Every failure is retried ``attempts`` times per URL, a checksum mismatch too: torchvision's transfer does not
    notice a connection closed early, so a cut-short file shows up as a wrong digest. Failures raise
    :class:`DataError` naming each URL, the file, the expected and the actual digest and size; nothing is left at
    ``dest`` or beside it.
    """
    from torchvision.datasets.utils import check_integrity, download_url

    dest = Path(dest)
    urls = [urls] if isinstance(urls, str) else list(urls)
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in urls:
        for attempt in range(1, max(1, attempts) + 1):
            tmp_dir = dest.parent / f".{dest.name}.part-{os.getpid()}"
            try:
                # md5=None: we check below, so that the error can say which digest arrived
                download_url(url, str(tmp_dir), dest.name, md5=None)
                got = tmp_dir / dest.name
                if check_integrity(got, md5):
                    os.replace(got, dest)
                    return dest
                failures.append(f"{url} (attempt {attempt}): got md5 {md5_file(got)} ({got.stat().st_size} bytes), "
                                f"a cut-short transfer or not the official file")
            except (http.client.HTTPException, urllib.error.URLError, OSError, TimeoutError) as e:
                failures.append(f"{url} (attempt {attempt}): {type(e).__name__}: {e}")
                if isinstance(e, urllib.error.HTTPError) and 400 <= e.code < 500 and e.code not in (408, 429):
                    break  # the file is not there (or not for us): asking again will not change that; next mirror
            finally:
                shutil.rmtree(tmp_dir, ignore_errors=True)
            if attempt < attempts:
                time.sleep(min(retry_wait * attempt, 10.0))
    raise DataError(
        f"download of {dest.name} to {dest} failed: {'; '.join(failures)}. Expected the official md5 {md5}; "
        f"nothing was kept. Check the URL, or download the official file by hand and put it at {dest}."
    )
