"""Shared test fixtures: the real data in ../shared/data, prepared Omniglot shards, subprocess runs."""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# trainer.compile=auto reads this machine's bench measurements (trainer/compile_choice.py): the tests' own, empty
# at the start, never a developer's
_MEASURED = tempfile.mkdtemp(prefix="compile-measured-")
atexit.register(shutil.rmtree, _MEASURED, True)
os.environ["SCHA_VAE_COMPILE_MEASUREMENTS"] = os.path.join(_MEASURED, "measured_compile.json")
# Every command run by a test picks its own MLflow store; a developer's own variable must not send them elsewhere.
os.environ.pop("MLFLOW_TRACKING_URI", None)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


# Files whose tests take minutes (measured with `make test` on the 2-core CI-like VM, 2026-12-07), heaviest
# first: `make test` hands whole files to its two workers in collection order, so these start first and the
# short files fill in around them instead of one worker finishing a long file alone at the end.
LONG_FILES = ("test_object_store.py", "test_documented_commands_run.py", "test_mlflow_server.py",
              "test_distributed.py", "test_tracking_outage.py", "test_reliability.py", "test_k8s_multinode.py",
              "test_zoo_training.py", "test_bench.py", "test_k8s_object_store.py", "test_ladder_zero3.py",
              "test_run_integrity.py", "test_train.py", "test_gpu_check.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: file order kept otherwise


def shared_data() -> Path:
    """../shared/data beside the repository; its absence is a broken checkout, never a reason to skip."""
    if not (SHARED_DATA / "omniglot" / "images_background.zip").is_file():
        pytest.fail(f"real test data missing: expected {SHARED_DATA}/omniglot/images_*.zip beside the repository")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def no_inherited_tracking_uri():
    """A test's own `mlflow.set_tracking_uri(...)` exports MLFLOW_TRACKING_URI (MLflow does that for child
    processes): it must not reach the commands of the tests after it, which honour the variable."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


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


# ------------------------------------------------------------------------------------------------ processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(cmd: list, cwd: Path, log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """A server in its own session (so `stop_process` reaches its workers), output to `log_path`; the venv's bin on
    PATH (`mlflow models serve` execs uvicorn from it)."""
    venv_bin = str(Path(sys.executable).parent)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
                **(env or {})}
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=full_env)


def wait_http(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 180) -> None:
    """Until `url` answers 200; fails with the server's log if it exits or stays silent for `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:3]} exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{url} did not answer in {timeout} s:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def start_mlflow_server(root: Path, port: int, artifacts: str | None = None, env: dict | None = None) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:port (sqlite store under `root`; proxied artifacts under `root`, or at
    `artifacts`, e.g. an s3:// URL with its credentials in `env`), healthy."""
    mlflow = Path(sys.executable).with_name("mlflow")
    log_path = root / f"mlflow-server-{port}.log"
    proc = start_process([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                          "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                          "--artifacts-destination", artifacts or str(root / "artifacts")], root, log_path, env=env)
    wait_http(f"http://127.0.0.1:{port}/health", proc, log_path, timeout=120)
    return proc


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on 127.0.0.1 for the session (tests/s3_support.py); skipped, with the reason,
    where it cannot start."""
    from s3_support import start_s3_server, stop

    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    if isinstance(server, str):
        pytest.skip(f"no S3 server: {server}")
    yield server
    stop(server)
