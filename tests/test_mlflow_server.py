"""A real `mlflow server` (sqlite backend, 127.0.0.1, one worker), started and stopped by the test: a smoke model
is trained against it over HTTP, registered, and an evaluation job loads it by alias over HTTP and logs its table
and figure back through the server's artifact proxy."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, run_module

MODEL = "server-smoke"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on a free 127.0.0.1 port, ready once /health answers; stopped (its process group) after."""
    port = free_port()
    workdir = tmp_path / "server"
    workdir.mkdir()
    log_path = workdir / "server.log"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_cli), "server", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer {url}/health in 180 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url, workdir
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def test_train_register_and_evaluate_over_http(mlflow_server, tmp_path, omniglot_raw, omniglot_ns_shards):
    import mlflow
    from mlflow import MlflowClient

    url, server_dir = mlflow_server
    common = [f"data.raw_dir={omniglot_raw}", f"data.shards_dir={omniglot_ns_shards}", f"tracking.uri={url}"]
    train_dir = tmp_path / "train"
    run_module("launch.train", "experiment=smoke", "trainer.epochs=1", "data.limit_batches=3",
               f"tracking.model_name={MODEL}", "data.download=false", f"run_dir={train_dir}", *common, cwd=ROOT)
    client = MlflowClient(tracking_uri=url)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    training_run = json.loads((train_dir / "mlflow_run.json").read_text())["run_id"]
    assert champion.run_id == training_run

    eval_dir = tmp_path / "eval"
    run_module("launch.evaluate", "eval=kl_layer", f"model_uri=models:/{MODEL}@champion", f"run_dir={eval_dir}",
               "eval.batch_sets=4", "eval.max_batches=1", *common, cwd=ROOT)
    summary = json.loads((eval_dir / "eval_kl_layer.json").read_text())
    assert summary["model_name"] == MODEL and summary["model_version"] == str(champion.version)
    run = client.get_run(summary["eval_run_id"])
    assert run.data.tags["training_run_id"] == training_run
    assert run.data.tags["model_version"] == str(champion.version)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"kl_layer.json", "kl_layer.csv",
                                                                         "kl_per_layer.png"}
    png = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="kl_per_layer.png",
                                              dst_path=str(tmp_path / "dl"), tracking_uri=url)
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # artifacts went through the server's proxy into its own artifact root
    assert list(server_dir.glob(f"mlartifacts/**/{run.info.run_id}/**/kl_per_layer.png"))
