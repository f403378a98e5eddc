"""Who owns a run directory, and whether a restart matches the run it continues.

Ownership is an exclusive `flock` on `<run_dir>/owner.lock`, taken by rank 0 before any process-group or data
work and held for the life of the process: the kernel drops it when the process dies however it dies (SIGKILL,
OOM, node loss on a local disk; on NFS when the client's lease expires), so nothing stale is ever left to clean
up. The file's text names the holder for the refusal message only; the lock itself is the truth.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import OmegaConf

from trainer import distributed

from trainer.run.errors import RunDirBusy, RunIOError, RunMismatch

LOCK_FILE = "owner.lock"
_held: Dict[str, int] = {}  # run dir -> fd kept open (closing it would release the lock)

# keys that move files or tune speed without changing what is trained: a restart may change them
MAY_CHANGE = {"data": {"raw_dir", "shards_dir", "cache_dir", "download", "num_workers", "dali_threads", "device", "reader",
                       "batch_sets"},
              "model": {"activation_checkpointing", "checkpoint_every"}}


def check_writable(run_dir: Path) -> None:
    """Refuse a run directory (or its checkpoints/) that cannot be written -- a read-only mount, a directory
    of another user -- with RunIOError naming the path and the OS error (EROFS, EACCES), before Hydra writes its
    config copies there and before any training work. Probed by creating a file: permission bits alone do not
    tell (root ignores them; a read-only mount is not in them)."""
    run_dir = Path(run_dir)
    for directory in (run_dir, run_dir / "checkpoints"):
        if directory != run_dir and not directory.exists():
            continue  # made later inside a run directory just shown writable (nothing is created here early)
        try:
            directory.mkdir(parents=True, exist_ok=True)  # the run directory: Hydra would make it next anyway
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as exc:
            raise RunIOError("writing to", directory, exc) from None


def claim(run_dir: Path) -> None:
    """Take the run directory for this process, or raise RunDirBusy naming the live holder."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:
        return
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunIOError("creating the run directory lock", path, exc) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunDirBusy(f"run directory {run_dir} is in use by another training ({holder}); wait for it to end, "
                         f"stop it, or choose another run_dir") from None
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_id": os.environ.get("TORCHELASTIC_RUN_ID", "")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    _held[key] = fd


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return f"host {info.get('host')}, PID {info.get('pid')}, started {info.get('started')}"


def check_restart(run_dir: Path, model: dict, data: dict) -> None:
    """Refuse a restart whose model or data config differs from the run's (its saved config.yaml), naming
    the differing keys. Call only when the run will resume from one of its checkpoints."""
    saved_file = Path(run_dir) / "config.yaml"
    if not saved_file.is_file():
        return
    saved = OmegaConf.to_container(OmegaConf.load(saved_file), resolve=False)
    diffs: List[str] = []
    for section, now in (("model", model), ("data", data)):
        before = saved.get(section, {}) or {}
        for key in sorted(set(before) | set(now)):
            if key in MAY_CHANGE[section]:
                continue
            if before.get(key) != now.get(key):
                diffs.append(f"{section}.{key}: run has {before.get(key)!r}, this start {now.get(key)!r}")
    if diffs:
        raise RunMismatch(
            f"{run_dir} holds checkpoints of a run with another model or data config ({saved_file}):\n  "
            + "\n  ".join(diffs)
            + "\nrestart with the run's values, choose another run_dir, or start it over with trainer.resume=never")


def watch_launcher(poll_s: float = 1.0, on_lost=None) -> Optional[threading.Thread]:
    """Under a launcher (torchrun, deepspeed), stop this worker when the launcher dies: the worker is then
    re-parented and nobody would collect, restart or stop it. Polls the parent PID (no signal is sent to an
    orphan on every platform, so polling is the portable check); bounded by `poll_s`."""
    parent = os.getppid()
    if not distributed.launched() or parent <= 1:
        return None

    def run() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        (on_lost or _lost)(parent)

    thread = threading.Thread(target=run, name="launcher-watch", daemon=True)
    thread.start()
    return thread


def _lost(parent: int) -> None:
    import sys

    from trainer.run import exit_codes

    print(f"launcher (PID {parent}) died: this worker (PID {os.getpid()}) stops; the run resumes from its last "
          f"checkpoint when the job is started again", file=sys.stderr, flush=True)
    os._exit(exit_codes.LAUNCHER_LOST)
