"""Tracking outages from the start: a run starts, and a preempted run resumes, while its `mlflow server` is
down; the fallback file is replayed by the next start or by `python -m launch.sync_tracking`; evaluation jobs
ride out a short outage and exit 8 (not 9, "model not found") on a long one."""
from __future__ import annotations

import json
import time

import pytest

from conftest import ROOT, run_module
from conftest import free_port, start_mlflow_server, stop_process
from trainer.metrics import read_step_records

SMOKE = ("experiment=smoke", "trainer.epochs=2", "data.limit_batches=3", "data.download=false",
         "tracking.retry_s=0.2", "tracking.flush_timeout_s=3", "tracking.model_name=outage")


def train(run_dir, raw, shards, uri, *extra):
    return run_module("launch.train", *SMOKE, f"run_dir={run_dir}", f"data.raw_dir={raw}",
                      f"data.shards_dir={shards}", f"tracking.uri={uri}", *extra, cwd=ROOT)


def fallback_calls(run_dir) -> list:
    return [json.loads(line)["what"] for line in (run_dir / "tracking_fallback.jsonl").read_text().splitlines()]


def check_everything_arrived(uri: str, run_dir) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == sorted(read_step_records(run_dir / "metrics.jsonl")) == list(range(6))
    assert len(client.get_metric_history(run_id, "val/vlb")) == 2
    assert client.get_run(run_id).info.status == "FINISHED"
    versions = client.search_model_versions("name='outage'")
    assert len(versions) == 2 and all(v.run_id == run_id for v in versions)
    assert client.get_model_version_by_alias("outage", "champion").run_id == run_id
    assert client.get_model_version_by_alias("outage", "last").version == str(max(int(v.version) for v in versions))
    assert not (run_dir / "tracking_fallback.jsonl").exists()
    assert not (run_dir / "tracking_fallback.replaying.jsonl").exists()
    assert not list((run_dir / "to_register").iterdir())  # every package was registered, then removed


def test_start_and_resume_while_down_then_the_next_start_replays(tmp_path, omniglot_raw, omniglot_ns_shards):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"  # nothing listens yet
    run_dir = tmp_path / "run"
    stopped = train(run_dir, omniglot_raw, omniglot_ns_shards, uri, "trainer.max_steps=2")
    # trained to its end with nothing sent (the outage warning may come after so short a run has ended)
    assert "MLflow unreachable at the end of the run" in stopped.stdout + stopped.stderr
    assert fallback_calls(run_dir)[0] == "open" and "metrics" in fallback_calls(run_dir)
    resumed = train(run_dir, omniglot_raw, omniglot_ns_shards, uri, "trainer.max_steps=4")  # still down
    out = resumed.stdout + resumed.stderr
    assert "replaying" in out and "resumed from" in out
    assert fallback_calls(run_dir).count("model") == 1  # the epoch-1 version waits with its package
    server = start_mlflow_server(tmp_path, port)
    try:
        # back up: replays, then finishes the run (waiting as long as sending takes)
        train(run_dir, omniglot_raw, omniglot_ns_shards, uri, "tracking.flush_timeout_s=300")
        check_everything_arrived(uri, run_dir)
    finally:
        stop_process(server)


def test_sync_tracking_sends_a_finished_run_and_evaluation_exit_codes(tmp_path, omniglot_raw, omniglot_ns_shards):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    run_dir = tmp_path / "run"
    train(run_dir, omniglot_raw, omniglot_ns_shards, uri)  # down from start to end
    assert fallback_calls(run_dir)[-1] == "end" and fallback_calls(run_dir).count("model") == 2

    start = time.monotonic()
    evaluated = run_module("launch.evaluate", "eval=kl_layer", "model_uri=models:/outage@champion",
                           f"tracking.uri={uri}", "tracking.outage_timeout_s=2", "tracking.retry_s=0.5",
                           f"run_dir={tmp_path / 'eval'}", f"data.shards_dir={omniglot_ns_shards}", cwd=ROOT,
                           check=False)
    assert evaluated.returncode == 8, evaluated.stderr[-3000:]  # TRACKING_UNAVAILABLE: transient
    assert "stayed unreachable for 2 s" in evaluated.stderr and "Traceback" not in evaluated.stderr
    assert time.monotonic() - start < 90

    server = start_mlflow_server(tmp_path, port)
    try:
        run_module("launch.sync_tracking", str(run_dir), "tracking.flush_timeout_s=300", cwd=ROOT)
        check_everything_arrived(uri, run_dir)
        missing = run_module("launch.evaluate", "eval=kl_layer", "model_uri=models:/no-such@champion",
                             f"tracking.uri={uri}", f"run_dir={tmp_path / 'eval'}", cwd=ROOT, check=False)
        assert missing.returncode == 9, missing.stderr[-3000:]  # MODEL_NOT_FOUND: never worth a retry
        again = run_module("launch.sync_tracking", str(run_dir), cwd=ROOT)
        assert "nothing to send" in again.stdout
    finally:
        stop_process(server)


def test_store_retry_classifies_outages_and_refusals():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, PERMISSION_DENIED

    from trainer.config import TrackingConfig
    from trainer.registry.resolve import RegistryError, TrackingUnavailable, with_store

    cfg = TrackingConfig(uri="http://127.0.0.1:1", retry_s=0.01, outage_timeout_s=1.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise MlflowException("API request failed with exception ConnectionError", error_code=INTERNAL_ERROR)
        return "ok"

    assert with_store(cfg, "test", flaky) == "ok" and len(calls) == 3

    def refused():
        raise MlflowException("nope", error_code=PERMISSION_DENIED)

    with pytest.raises(RegistryError, match="refused") as err:
        with_store(cfg, "test", refused)
    assert not isinstance(err.value, TrackingUnavailable)

    def down():
        raise ConnectionRefusedError(111, "Connection refused")

    def missing_file():
        raise FileNotFoundError(2, "No such file or directory", "mlruns/artifacts/x")

    with pytest.raises(RegistryError, match="refused"):  # a local store's missing file is not an outage
        with_store(cfg, "test", missing_file)

    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="stayed unreachable for 1 s"):
        with_store(cfg, "test", down)
    assert time.monotonic() - t0 < 5


def test_restart_against_another_store_or_after_the_run_was_deleted(tmp_path, omniglot_raw, omniglot_ns_shards):
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    first, second = (f"sqlite:///{tmp_path / name}.db" for name in ("first", "second"))
    train(run_dir, omniglot_raw, omniglot_ns_shards, first, "trainer.max_steps=2")
    old = json.loads((run_dir / "mlflow_run.json").read_text())
    moved = train(run_dir, omniglot_raw, omniglot_ns_shards, second, "trainer.max_steps=4")
    out = moved.stdout + moved.stderr
    assert f"lives in {first}, not in {second}: continuing in a new MLflow run" in out and "Traceback" not in out
    new = json.loads((run_dir / "mlflow_run.json").read_text())
    assert new["tracking_uri"] == second and new["run_id"] != old["run_id"]
    MlflowClient(tracking_uri=second).delete_run(new["run_id"])
    again = train(run_dir, omniglot_raw, omniglot_ns_shards, second, "trainer.max_steps=6")
    assert "is gone from" in again.stdout + again.stderr
    latest = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    run = MlflowClient(tracking_uri=second).get_run(latest)
    assert latest != new["run_id"] and run.info.status == "FINISHED" and run.info.lifecycle_stage == "active"


def test_sigterm_during_an_outage_writes_the_fallback_inside_a_short_grace(tmp_path, omniglot_raw, omniglot_ns_shards):
    """Server down, SIGTERM at step 8, SIGKILL 10 s later (a 10 s grace, under Slurm's or a spot instance's 30 s):
    the run has exited 143 with its fallback written before the SIGKILL (flush_timeout_s stays at its 120 s
    default). Once the server is back, the next start, and separately `launch.sync_tracking` on a copy of the run
    directory, leave MLflow with every step and every version of what they had trained."""
    import os
    import shutil
    import signal
    import subprocess
    import sys

    from mlflow import MlflowClient

    from conftest import start_process

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    run_dir = tmp_path / "run"
    args = ["experiment=smoke", "data.download=false", "tracking.model_name=grace", "trainer.log_every=1",
            f"run_dir={run_dir}", f"data.raw_dir={omniglot_raw}", f"data.shards_dir={omniglot_ns_shards}",
            f"tracking.uri={uri}"]
    log_path = tmp_path / "train.log"
    proc = start_process([sys.executable, "-m", "launch.train", *args], ROOT, log_path)
    try:
        deadline = time.monotonic() + 300
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and 7 in read_step_records(metrics)):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"still running 10 s after SIGTERM (SIGKILLed):\n{log_path.read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 143, log_path.read_text()[-3000:]
    calls = fallback_calls(run_dir)
    assert calls.count("model") == 1 and "metrics" in calls and calls[-1] == "end", calls  # the epoch-1 version
    trained = sorted(read_step_records(run_dir / "metrics.jsonl"))
    assert trained[0] == 0 and trained[-1] >= 7
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)

    def arrived(directory, steps: list, versions: int) -> None:
        client = MlflowClient(tracking_uri=uri)
        run_id = json.loads((directory / "mlflow_run.json").read_text())["run_id"]
        assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == steps
        mine = [v for v in client.search_model_versions("name='grace'") if v.run_id == run_id]
        assert len(mine) == versions, mine
        assert not (directory / "tracking_fallback.jsonl").exists()
        assert not list((directory / "to_register").iterdir())

    server = start_mlflow_server(tmp_path, port)
    try:
        run_module("launch.train", *args, "tracking.flush_timeout_s=300", cwd=ROOT)  # the next start: to the end
        arrived(run_dir, list(range(12)), versions=2)
        run_module("launch.sync_tracking", str(copy), "tracking.flush_timeout_s=300", cwd=ROOT)
        arrived(copy, trained, versions=1)
    finally:
        stop_process(server)


def test_packages_left_in_to_register_are_registered_unless_the_fallback_names_them(tmp_path):
    """A start SIGKILLed after staging a package (no fallback written) leaves it in to_register/ with its
    registration call; the next start (or sync_tracking) queues it; incomplete packages are not touched."""
    from trainer.registry.tracking import REGISTER, orphan_packages

    root = tmp_path / "run" / "to_register"
    for name, complete in (("step000000012-b", True), ("step000000006-a", True), ("step000000018-c", False)):
        (root / name).mkdir(parents=True)
        if complete:
            tag = name.split("-")[0]
            (root / name / REGISTER).write_text(json.dumps({"model_name": "m", "tag": tag, "aliases": ["last"],
                                                            "package": f"to_register/{name}"}))
    found = orphan_packages(tmp_path / "run", [])
    assert [e["payload"]["tag"] for e in found] == ["step000000006", "step000000012"]
    assert found[0]["payload"]["package"] == "to_register/step000000006-a"
    named = [{"what": "model", "payload": {"package": "to_register/step000000006-a"}}]
    assert [e["payload"]["tag"] for e in orphan_packages(tmp_path / "run", named)] == ["step000000012"]
    absolute = [{"what": "model", "payload": {"package": str(root / "step000000012-b")}}]  # an older fallback
    assert [e["payload"]["tag"] for e in orphan_packages(tmp_path / "run", absolute)] == ["step000000006"]
