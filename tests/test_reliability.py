"""Faults that long runs meet: non-finite steps, preemption, SIGKILL, tracking outages."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port, run_module, start_mlflow_server, stop_process
from trainer.fastpath import cpu_has_fast_bf16
from trainer.metrics import read_step_records

# fp32: the recorded losses below are fp32 numbers, and precision=auto is bf16 autocast on a CPU with AVX512-BF16 or
# AMX, whose kernels round differently (5e-4 apart after 18 steps, measured on such a VM)
COMMON = ("trainer.epochs=3", "trainer.eval_test=false", "trainer.log_every=1", "trainer.precision=fp32")


def args(run_dir: Path, raw: Path, shards: Path, *extra: str) -> list[str]:
    return ["experiment=smoke", f"run_dir={run_dir}", f"data.raw_dir={raw}", f"data.shards_dir={shards}",
            "data.download=false", f"tracking.root={run_dir.parent / 'mlruns'}", *COMMON, *extra]


def popen(*argv: str, cwd: Path = ROOT) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "launch.train", *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    jsonl = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if jsonl.exists() and any(r >= step for r in read_step_records(jsonl)):
            return
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"step {step} not reached in {timeout} s")


def killed_at_a_random_step_and_resumed(argv: list, run_dir: Path) -> dict:
    """Train with `argv`, SIGKILL the run at a random step of its second or third epoch, train again with the
    same arguments (it resumes), and return the per-step records of the finished run."""
    proc = popen(*argv)
    wait_for_step(run_dir, random.Random().randint(7, 15), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    run_module("launch.train", *argv, cwd=ROOT)
    return read_step_records(run_dir / "metrics.jsonl")


def val_elbos(run_dir: Path) -> dict:
    """epoch -> validation ELBO (a resumed run may repeat an epoch whose checkpoint it did not write)."""
    rows = [json.loads(line) for line in (run_dir / "epochs.jsonl").read_text().splitlines()]
    return {r["epoch"]: r["val/vlb"] for r in rows}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, omniglot_raw, omniglot_ns_shards) -> dict:
    """Per-step records of an uninterrupted 3-epoch (18-step) smoke run (its run directory under "run_dir")."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_module("launch.train", *args(run_dir, omniglot_raw, omniglot_ns_shards, "tracking.enabled=false"), cwd=ROOT)
    records = read_step_records(run_dir / "metrics.jsonl")
    records["run_dir"] = run_dir
    return records


def assert_same_losses(a: dict, b: dict) -> None:
    a = {k: v for k, v in a.items() if k != "run_dir"}
    assert sorted(a) == sorted(b) == list(range(18))
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6, abs=1e-6), step


# The losses of the reference run above, recorded at e7de96b (before the recipe options of issue 30, which are off
# by default), one thread: with them off the training is today's, step for step.
LOSSES_BEFORE_RECIPE_OPTIONS = [
    1435.9298095703125, 1356.93798828125, 1318.7066650390625, 1279.0797119140625, 1261.17919921875,
    1231.9390869140625, 1196.2818603515625, 1199.8780517578125, 1155.282958984375, 1133.682373046875,
    1121.844482421875, 1089.00341796875, 1071.1873779296875, 1067.6456298828125, 1037.015380859375,
    1045.3802490234375, 1017.6005859375, 1000.1177978515625]
VAL_BEFORE_RECIPE_OPTIONS = [-481.6765441894531, -448.14886474609375, -424.2989196777344]


def test_with_the_recipe_options_off_training_is_what_it_was(reference):
    """Bit for bit on the machine that recorded them; within 1e-6 elsewhere (other CPUs' kernels round
    differently), which any schedule, averaging or thread change would exceed by orders of magnitude."""
    losses = [reference[s]["loss"] for s in range(18)]
    assert losses == pytest.approx(LOSSES_BEFORE_RECIPE_OPTIONS, rel=1e-6)
    # the validation ELBOs of the same fp32 training differ by 1.6e-3 relative on a 2-core Intel Xeon VM with AMX
    # (losses within 1e-6; the same on the commit before this one: a property of that CPU's eval path, not found
    # yet), so they are held to 5e-3 there; the losses above, at 1e-6, are what shows the training unchanged
    rel = 5e-3 if cpu_has_fast_bf16() else 1e-6
    assert list(val_elbos(reference["run_dir"]).values()) == pytest.approx(VAL_BEFORE_RECIPE_OPTIONS, rel=rel)
    assert {reference[s]["lr"] for s in range(18)} == {1e-3}


@pytest.mark.parametrize("tracking", ["on"])
def test_sigkill_at_a_random_step_then_resume_reproduces_the_run(tmp_path, reference, omniglot_raw,
                                                                 omniglot_ns_shards, tracking):
    """With tracking on, every epoch registers a model version; that must not change a single number (the
    reference ran with tracking off). A kill with tracking off: tests/test_recipe.py, with every recipe option."""
    run_dir = tmp_path / "run"
    flag = f"tracking.enabled={'true' if tracking == 'on' else 'false'}"
    kill_after = random.Random().randint(7, 15)  # inside epoch 2 or 3: resumes from an epoch-end checkpoint
    proc = popen(*args(run_dir, omniglot_raw, omniglot_ns_shards, flag))
    wait_for_step(run_dir, kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    run_module("launch.train", *args(run_dir, omniglot_raw, omniglot_ns_shards, flag), cwd=ROOT)
    records = read_step_records(run_dir / "metrics.jsonl")
    assert_same_losses(reference, records)
    assert all(records[s]["loss"] == reference[s]["loss"] for s in records)  # to the last digit
    assert val_elbos(run_dir) == val_elbos(reference["run_dir"])
    # one record per step and epoch in the files, and in MLflow: the re-run steps are not sent twice
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 18
    assert len((run_dir / "epochs.jsonl").read_text().splitlines()) == 3
    if tracking == "on":
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlruns' / 'mlflow.db'}")
        run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
        assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(18))
        assert len(client.get_metric_history(run_id, "val/vlb")) == 3


def test_sigterm_checkpoints_exits_143_and_resumes_automatically(tmp_path, reference, omniglot_raw,
                                                                 omniglot_ns_shards):
    run_dir = tmp_path / "run"
    proc = popen(*args(run_dir, omniglot_raw, omniglot_ns_shards, "tracking.enabled=false"))
    wait_for_step(run_dir, 8, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    assert "preempted" in out
    stopped_at = max(read_step_records(run_dir / "metrics.jsonl")) + 1
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{stopped_at:09d}"
    assert stopped_at < 18
    run_module("launch.train", *args(run_dir, omniglot_raw, omniglot_ns_shards, "tracking.enabled=false"), cwd=ROOT)
    assert_same_losses(reference, read_step_records(run_dir / "metrics.jsonl"))


def test_non_finite_loss_and_gradient_skip_the_update(tmp_path, reference, omniglot_raw, omniglot_ns_shards):
    run_dir = tmp_path / "run"
    run_module("launch.train", *args(run_dir, omniglot_raw, omniglot_ns_shards, "tracking.enabled=false",
                                     "trainer.fault_nan_loss_steps=[2]", "trainer.fault_nan_grad_steps=[4]"),
               cwd=ROOT)
    records = read_step_records(run_dir / "metrics.jsonl")
    assert [s for s, r in records.items() if r["skipped"]] == [2, 4]
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():  # strict JSON: no NaN / Infinity tokens
        json.loads(line, parse_constant=lambda token: pytest.fail(f"non-standard JSON token {token}"))
    assert records[2]["loss"] is None and "loss" in records[2]["non_finite"]
    # the first skipped update leaves the weights as they were: step 2's forward equals the reference's
    assert records[2]["vlb"] == pytest.approx(reference[2]["vlb"], rel=1e-6)
    assert all(r["loss"] == r["loss"] for s, r in records.items() if s not in (2,))  # no NaN leaks afterwards
    last_epoch = json.loads((run_dir / "epochs.jsonl").read_text().splitlines()[-1])
    assert last_epoch["skipped_total"] == 2 and last_epoch["val/vlb"] > -1e4


def test_consecutive_non_finite_steps_stop_with_a_clear_error(tmp_path, omniglot_raw, omniglot_ns_shards):
    run_dir = tmp_path / "run"
    proc = run_module("launch.train", *args(run_dir, omniglot_raw, omniglot_ns_shards, "tracking.enabled=false",
                                            "trainer.fault_nan_loss_steps=[7,8,9]",
                                            "trainer.max_consecutive_skips=3"), cwd=ROOT, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "3 consecutive steps" in proc.stderr and "step 9" in proc.stderr
    assert "no optimizer step ran" in proc.stderr and "Adam's moments" not in proc.stderr  # what this mode did
    assert str(run_dir / "checkpoints" / "step000000006") in proc.stderr  # the last good checkpoint


def test_guard_checked_every_n_steps_zeroes_bad_updates_on_the_device(tmp_path, omniglot_raw, omniglot_ns_shards):
    """trainer.guard_every=3 (the GPU default is 20): no host read per step; a non-finite step's update arrives
    zeroed, the flags are logged per step and counted at the checks."""
    run_dir = tmp_path / "run"
    run_module("launch.train", *args(run_dir, omniglot_raw, omniglot_ns_shards, "tracking.enabled=false",
                                     "trainer.guard_every=3", "trainer.fault_nan_loss_steps=[2]",
                                     "trainer.fault_nan_grad_steps=[4]"), cwd=ROOT)
    records = read_step_records(run_dir / "metrics.jsonl")
    assert [s for s, r in records.items() if r["skipped"]] == [2, 4]
    assert all(r["loss"] == r["loss"] for s, r in records.items() if s != 2)  # no NaN reached the weights
    last_epoch = json.loads((run_dir / "epochs.jsonl").read_text().splitlines()[-1])
    assert last_epoch["skipped_total"] == 2 and last_epoch["val/vlb"] > -1e4


def test_guard_every_n_steps_stops_on_a_run_of_bad_steps(tmp_path, omniglot_raw, omniglot_ns_shards):
    run_dir = tmp_path / "run"
    proc = run_module("launch.train", *args(run_dir, omniglot_raw, omniglot_ns_shards, "tracking.enabled=false",
                                            "trainer.guard_every=3", "trainer.fault_nan_loss_steps=[7,8,9]",
                                            "trainer.max_consecutive_skips=3"), cwd=ROOT, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    # found at the first check after the run (step 11, the epoch's last batch)
    assert "3 consecutive steps" in proc.stderr and "step 11" in proc.stderr
    # zeroed updates still step Adam: the message must not claim they were skipped
    assert "Adam's moments decayed and its step count advanced" in proc.stderr
    assert "no optimizer step ran" not in proc.stderr
    assert str(run_dir / "checkpoints" / "step000000006") in proc.stderr


def test_a_nan_on_one_rank_skips_the_update_on_every_rank(tmp_path, omniglot_raw, omniglot_ns_shards):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node=2", "--master_port", str(free_port()), "-m", "launch.train",
         *args(run_dir, omniglot_raw, omniglot_ns_shards, "tracking.enabled=false", "trainer.epochs=1",
               "trainer.fault_rank=1", "trainer.fault_nan_loss_steps=[3]")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = read_step_records(run_dir / "metrics.jsonl")  # written by rank 0, whose own forward was finite
    assert [s for s, r in records.items() if r["skipped"]] == [3]
    assert records[3]["vlb"] == records[3]["vlb"]  # (the logged loss is DeepSpeed's mean over ranks: NaN)
    assert all(r["loss"] == r["loss"] for s, r in records.items() if s != 3)


def test_tracking_outage_loses_nothing(tmp_path, omniglot_raw, omniglot_ns_shards):
    import mlflow
    from mlflow import MlflowClient

    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    run_dir = tmp_path / "run"
    proc = popen(*args(run_dir, omniglot_raw, omniglot_ns_shards, f"tracking.uri={uri}", "tracking.retry_s=0.5",
                       "tracking.model_name=outage"))
    try:
        wait_for_step(run_dir, 3, proc)
        stop_process(server)
        wait_for_step(run_dir, 12, proc)  # training goes on while the server is down
        server = start_mlflow_server(tmp_path, port)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]
        assert out.count("MLflow tracking unavailable") == 1  # warned once
        mlflow.set_tracking_uri(uri)
        client = MlflowClient()
        run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
        steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
        assert steps == list(range(18))
        assert len(client.get_metric_history(run_id, "val/vlb")) == 3
        assert client.get_run(run_id).info.status == "FINISHED"
        assert client.get_model_version_by_alias("outage", "last").run_id == run_id
        assert not (run_dir / "tracking_fallback.jsonl").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_process(server)


def torchrun(run_dir: Path, raw: Path, shards: Path, *extra: str, restarts: int) -> tuple:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    exe = Path(sys.executable).with_name("torchrun")
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(exe), "--nproc_per_node=2", f"--max-restarts={restarts}", "--rdzv-backend=c10d",
         f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "launch.train",
         *args(run_dir, raw, shards, "tracking.enabled=false", *extra)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, time.monotonic() - t0


def test_a_dead_rank_ends_the_job_instead_of_hanging(tmp_path, omniglot_raw, omniglot_ns_shards):
    proc, seconds = torchrun(tmp_path / "run", omniglot_raw, omniglot_ns_shards, "trainer.fault_rank=1",
                             "trainer.fault_exit_step=3", restarts=0)
    assert proc.returncode != 0
    assert "exitcode: 17" in proc.stderr, proc.stderr[-3000:]
    assert seconds < 180  # the survivor does not wait for gloo's 30-minute collective timeout


def test_elastic_restart_resumes_from_the_last_checkpoint(tmp_path, omniglot_raw, omniglot_ns_shards):
    run_dir = tmp_path / "run"
    proc, _ = torchrun(run_dir, omniglot_raw, omniglot_ns_shards, "trainer.fault_rank=1",
                       "trainer.fault_exit_step=8", restarts=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    assert "exitcode: 17" in out  # the first attempt lost rank 1 ...
    assert "resumed from" in out and "step000000006" in out  # ... the restart resumed from the epoch-1 checkpoint
    records = read_step_records(run_dir / "metrics.jsonl")
    assert sorted(records) == list(range(18))
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "epochs.jsonl").read_text().splitlines()]
    assert epochs[-1] == 3
