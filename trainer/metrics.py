"""Per-step training metrics kept on the device and flushed every N steps (the loop's only host syncs).

The files are strict JSON lines: a non-finite value (the loss of a skipped step) is written as `null` and the
record names it in `"non_finite": [keys]`; the records handed back to the caller keep the float (MLflow takes NaN).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from trainer import distributed
from trainer.run.errors import RunIOError

STEP_KEYS = ("loss", "vlb", "logpx", "kl_z", "kl_c", "skipped")


class StepMetrics:
    """Buffers one small device tensor per step; `flush` syncs once and returns one record per step."""

    def __init__(self, jsonl: Path, enabled: bool) -> None:
        self.jsonl = Path(jsonl)
        self.enabled = enabled
        self.rows: List[torch.Tensor] = []
        self.first_step = 0
        self.t0 = time.perf_counter()
        self.images = 0

    def add(self, step: int, values: torch.Tensor, images: int) -> None:
        if not self.rows:
            self.first_step = step
        self.rows.append(values.detach())
        self.images += images

    def flush(self, extra: Dict[str, float]) -> List[Dict[str, float]]:
        if not self.rows:
            return []
        # every rank's micro batch has the same size: the mean over ranks is the global batch's value
        values = distributed.mean_over_ranks(torch.stack(self.rows).float()).cpu().tolist()
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        img_s = self.images * distributed.world_size() / elapsed
        records = [
            {"step": self.first_step + i, **dict(zip(STEP_KEYS, row)), **extra, "img_per_s": img_s}
            for i, row in enumerate(values)
        ]
        self.rows, self.images, self.t0 = [], 0, time.perf_counter()
        if self.enabled:
            append_jsonl(self.jsonl, records)
        return records


def jsonable(value: Any) -> Any:
    """`value` as strict JSON takes it: non-finite floats -> None (strict readers reject NaN), numpy / torch
    scalars -> Python numbers, tuples -> lists, at any depth."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def strict_record(record: Dict[str, object]) -> Dict[str, object]:
    """`record` as strict JSON, its non-finite keys named in "non_finite"."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    return {**jsonable(record), "non_finite": bad} if bad else record


def non_finite_paths(value: Any, prefix: str = "") -> List[str]:
    """Where `value` holds NaN / infinity, as dotted paths (`a.b`, `rows.2.vlb`), at any depth."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite_paths(v, f"{prefix}{k}.")]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in non_finite_paths(v, f"{prefix}{i}.")]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # an array of several values
            return non_finite_paths(value.tolist(), prefix)
    return [prefix[:-1]] if isinstance(value, float) and not math.isfinite(value) else []


def strict_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Result rows as strict JSON: non-finite numbers become null and each row lists them in "non_finite"."""
    out = []
    for row in rows:
        bad = non_finite_paths(row)
        out.append({**jsonable(row), "non_finite": bad} if bad else jsonable(row))
    return out


def append_jsonl(path: Path, records: List[Dict[str, object]]) -> None:
    """Append whole records: a write that fails part-way (a full disk) is truncated back to the file's size
    before it, so the file never ends in a torn record; RunIOError names the file."""
    text = "".join(json.dumps(strict_record(r), allow_nan=False) + "\n" for r in records)
    path = Path(path)
    data = text.encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # unbuffered: no write at close
    except OSError as exc:
        raise RunIOError("writing metrics to", path, exc) from exc
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            os.ftruncate(fd, start)  # the records written in part are cut away, the space given back
            raise RunIOError("writing metrics to", path, exc) from exc
    finally:
        os.close(fd)


def repair_jsonl(path: Path) -> int:
    """Cut a torn last record (no final newline: a process killed or a disk full mid-write by an older
    release) from a JSON-lines file of the run; returns the number of bytes removed (0: intact or absent)."""
    path = Path(path)
    if not path.is_file():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as f:
        tail = min(size, 1 << 20)
        f.seek(size - tail)
        chunk = f.read()
        if chunk.endswith(b"\n"):
            return 0
        cut = chunk.rfind(b"\n")
        keep = size - tail + cut + 1 if cut >= 0 else (0 if tail == size else size)
        if keep == size:  # a record longer than the window: leave it to the reader
            return 0
        f.truncate(keep)
    return size - keep


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    """The records of a JSON-lines file of the run; a torn last line (no newline, not JSON) is skipped."""
    text = Path(path).read_text()
    lines = text.splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1 and not text.endswith("\n"):
                break  # the torn tail of an interrupted write
            raise
    return records


def cut_records_from(path: Path, step: int, inclusive: bool) -> int:
    """Remove the records of a JSON-lines file of the run whose "step" is past `step` (at or past it when
    `inclusive`): what a resumed run is about to do again, so the file keeps one record per step or epoch.
    Replaced atomically (temp file + rename); returns the number of records removed."""
    path = Path(path)
    if not path.is_file():
        return 0
    records = read_jsonl(path)
    kept = [r for r in records if not (r.get("step", -1) > step or (inclusive and r.get("step", -1) == step))]
    if len(kept) == len(records):
        return 0
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
    except OSError as exc:
        raise RunIOError("rewriting", path, exc) from exc
    return len(records) - len(kept)


def write_text(path: Path, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise RunIOError("writing", path, exc) from exc


def read_step_records(jsonl: Path) -> Dict[int, Dict[str, float]]:
    """Last record per step (a resumed run rewrites the steps after its checkpoint)."""
    return {r["step"]: r for r in read_jsonl(jsonl)}
