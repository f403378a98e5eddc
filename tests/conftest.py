"""Shared test fixtures: the real data in ../shared/data, prepared Omniglot shards, subprocess runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_data() -> Path:
    """../shared/data beside the repository; its absence is a broken checkout, never a reason to skip."""
    if not (SHARED_DATA / "omniglot" / "images_background.zip").is_file():
        pytest.fail(f"real test data missing: expected {SHARED_DATA}/omniglot/images_*.zip beside the repository")
    return SHARED_DATA


@pytest.fixture(scope="session")
def omniglot_raw() -> Path:
    return shared_data() / "omniglot"


@pytest.fixture(scope="session")
def omniglot_ns_shards(tmp_path_factory, omniglot_raw) -> Path:
    """omniglot_ns prepared once per session; tests pass this as data.shards_dir (read-only use)."""
    from data_pipeline.config import DataConfig
    from data_pipeline.prepare import prepare

    shards = tmp_path_factory.mktemp("shards")
    prepare(DataConfig(name="omniglot_ns", raw_dir=str(omniglot_raw), shards_dir=str(shards), download=False),
            progress=False)
    return shards


def run_module(module: str, *args: str, cwd: Path, timeout: int = 600, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m module args` from `cwd` with the repository importable; fail with its output."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{module} {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                    f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc
