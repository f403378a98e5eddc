"""Run integrity (issue 14): one owner per run directory, restarts that match the run, checkpoints that always
resume, bounded hangs, strict configs, documented exit codes, I/O failures that name the path and the OS error."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_module
from trainer.run import exit_codes
from trainer.checkpoint import COMPLETE, Checkpointer
from trainer.metrics import read_step_records

TORCHRUN = [sys.executable, "-m", "launch.torchrun"]


def base(run_dir: Path, raw: Path, shards: Path, *extra: str) -> list:
    return ["experiment=smoke", f"run_dir={run_dir}", f"data.raw_dir={raw}", f"data.shards_dir={shards}",
            "data.download=false", "tracking.enabled=false", "trainer.eval_test=false", *extra]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, omniglot_raw, omniglot_ns_shards) -> Path:
    """A finished 2-epoch smoke run: checkpoints step6 and step12."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_module("launch.train", *base(run_dir, omniglot_raw, omniglot_ns_shards), cwd=ROOT)
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("owner.lock"))
    return dst


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: process exited early ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"{what} not within {timeout} s")


def steps_written(run_dir: Path) -> int:
    f = run_dir / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


# -- 1. one owner per run directory ---------------------------------------------------------------------------
def test_a_busy_run_dir_is_refused_naming_the_holder_and_the_claim_dies_with_it(tmp_path, finished_run,
                                                                               omniglot_raw, omniglot_ns_shards):
    run_dir = copy_of(finished_run, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from trainer.run.rundir import claim; "
                               "claim(sys.argv[1]); print('held', flush=True); time.sleep(120)", str(run_dir)],
                              env=env(), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = run_module("launch.train", *base(run_dir, omniglot_raw, omniglot_ns_shards), cwd=ROOT, check=False)
        assert busy.returncode == exit_codes.RUN_DIR_BUSY, busy.stderr[-3000:]
        assert f"PID {holder.pid}" in busy.stderr and f"host {socket.gethostname()}" in busy.stderr
        assert "started 20" in busy.stderr and str(run_dir) in busy.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    assert (run_dir / "owner.lock").exists()  # the file stays; the lock went with the process
    again = run_module("launch.train", *base(run_dir, omniglot_raw, omniglot_ns_shards), cwd=ROOT, check=False)
    assert again.returncode == 0, again.stderr[-3000:]


def test_workers_stop_when_their_launcher_dies(tmp_path, omniglot_raw, omniglot_ns_shards):
    """torchrun SIGKILLed mid-run: its worker, re-parented to a subreaper that collects it, exits 7 (LAUNCHER_LOST)
    within a bound, saying so."""
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "-m", "launch.train",
           *base(run_dir, omniglot_raw, omniglot_ns_shards, "trainer.epochs=100", "trainer.log_every=1")]
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "orphan_exit.py"), str(log),
                           str(run_dir / "metrics.jsonl"), str(run_dir / "owner.lock"), "--", *cmd],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:] + log.read_text()[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["worker_exit"] == exit_codes.LAUNCHER_LOST, log.read_text()[-3000:]
    assert result["stopped_after_s"] < 30  # polled every 1 s; 30 s bounds a loaded machine
    assert f"this worker (PID {result['worker_pid']}) stops" in log.read_text()
    print(f"worker stopped {result['stopped_after_s']} s after its launcher was killed")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent's wait is missing


def test_restart_with_another_model_or_data_config_is_refused_naming_the_keys(tmp_path, finished_run,
                                                                            omniglot_raw):
    run_dir = copy_of(finished_run, tmp_path)
    empty = tmp_path / "no_shards"  # the data is never looked at: shards_dir may move, so this is no error
    proc = run_module("launch.train", *base(run_dir, omniglot_raw, empty, "model.hidden_dim=16", "data.set_size=4"),
                      cwd=ROOT, check=False)
    assert proc.returncode == exit_codes.CONFIG_ERROR, proc.stderr[-3000:]
    assert "model.hidden_dim: run has 32, this start 16" in proc.stderr
    assert "data.set_size: run has 5, this start 4" in proc.stderr
    assert not empty.exists() and "data error" not in proc.stderr


# -- 2. checkpoints always resume ------------------------------------------------------------------------------
def test_resume_skips_a_missing_pointer_and_an_unreadable_checkpoint(tmp_path, finished_run, omniglot_raw,
                                                                    omniglot_ns_shards):
    run_dir = copy_of(finished_run, tmp_path)
    ckpt = run_dir / "checkpoints"
    (ckpt / "latest").unlink()
    states = ckpt / "step000000012" / "mp_rank_00_model_states.pt"
    states.write_bytes(b"\0" * states.stat().st_size)  # same size: only loading it finds the damage
    proc = run_module("launch.train", *base(run_dir, omniglot_raw, omniglot_ns_shards, "trainer.keep_checkpoints=1"),
                      cwd=ROOT)
    log = proc.stdout + proc.stderr
    assert f"{ckpt / 'latest'} is missing" in log
    assert f"skipping checkpoint {ckpt / 'step000000012'}: it could not be loaded" in log
    assert f"resumed from {ckpt / 'step000000006'} (epoch 1, step 6)" in log
    assert (ckpt / "latest").read_text() == "step000000012"  # epoch 2 trained again and saved
    assert Checkpointer(ckpt, 1).damage("step000000012") is None


@pytest.mark.parametrize("damage", ["truncated", "zeroed"])
def test_checkpoints_of_which_none_can_resume_are_refused_by_name(tmp_path, finished_run, omniglot_raw,
                                                                  omniglot_ns_shards, damage):
    """Issue 33: a run whose every checkpoint is damaged exits 2 with one line, instead of silently starting over
    (truncated) or exiting 1 with a traceback (zeroed, same size)."""
    run_dir = copy_of(finished_run, tmp_path)
    ckpt = run_dir / "checkpoints"
    for tag in ("step000000006", "step000000012"):
        states = ckpt / tag / "mp_rank_00_model_states.pt"
        size = states.stat().st_size
        states.write_bytes(b"\0" * size if damage == "zeroed" else states.read_bytes()[: size // 2])
    records_before = (run_dir / "metrics.jsonl").read_text()
    proc = run_module("launch.train", *base(run_dir, omniglot_raw, omniglot_ns_shards), cwd=ROOT, check=False)
    assert proc.returncode == exit_codes.CONFIG_ERROR, proc.stderr[-3000:]
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("refused:")]
    assert f"no checkpoint under {ckpt} can be resumed from" in line and "trainer.resume=never" in line
    why = "were written" if damage == "truncated" else "it could not be loaded"
    assert line.count(why) == 2 and "step000000006" in line and "step000000012" in line
    assert "Traceback" not in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == records_before  # nothing trained over the run


def test_checkpoints_of_another_model_are_refused_from_their_metadata(tmp_path, finished_run, omniglot_raw,
                                                                      omniglot_ns_shards):
    """The run's config.yaml is gone (nothing to compare the restart with), its checkpoints hold a 32-wide NS
    and this start builds a 16-wide one: refused from meta.json before any tensor is read (the tensors here are
    zeroed, so reading them would be reported as a load failure instead)."""
    run_dir = copy_of(finished_run, tmp_path)
    (run_dir / "config.yaml").unlink()
    for states in (run_dir / "checkpoints").glob("step*/mp_rank_00_model_states.pt"):
        states.write_bytes(b"\0" * states.stat().st_size)
    proc = run_module("launch.train", *base(run_dir, omniglot_raw, omniglot_ns_shards, "model.hidden_dim=16"),
                      cwd=ROOT, check=False)
    assert proc.returncode == exit_codes.CONFIG_ERROR, proc.stderr[-3000:]
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("refused:")]
    assert line.count("its weights are of another model") == 2 and "could not be loaded" not in line


def make_checkpoint(ckpt: Path, step: int, intact: bool = True) -> str:
    tag = f"step{step:09d}"
    (ckpt / tag).mkdir(parents=True)
    (ckpt / tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    if intact:
        (ckpt / tag / COMPLETE).write_text(json.dumps({"step": step, "files": {"mp_rank_00_model_states.pt": 100}}))
    return tag


def test_stale_or_damaged_pointers_resume_from_the_newest_intact_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoints"
    c = Checkpointer(ckpt, keep=1)
    s6, s12, s18 = make_checkpoint(ckpt, 6), make_checkpoint(ckpt, 12), make_checkpoint(ckpt, 18, intact=False)
    (ckpt / "latest").write_text(s6)  # stale: step12 completed but the pointer did not move
    intact, notes = c.resume_candidates()
    assert intact == [s12, s6]
    assert any("step000000018: incomplete" in n for n in notes)
    assert any(f"names {s6}, but {s12} is the newest intact" in n for n in notes)
    (ckpt / s12 / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)  # truncated
    (ckpt / "latest").write_text(s12)
    intact, notes = c.resume_candidates()
    assert intact == [s6] and any("is 10 bytes, 100 were written" in n for n in notes)
    (ckpt / "latest").write_text("step000000099")
    assert any("does not exist" in n for n in c.resume_candidates()[1])


def test_pruning_never_removes_the_newest_intact_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoints"
    c = Checkpointer(ckpt, keep=1)
    s6, s12 = make_checkpoint(ckpt, 6), make_checkpoint(ckpt, 12)
    s18 = make_checkpoint(ckpt, 18, intact=False)  # e.g. the disk filled while its files were written
    c._prune(keep_tag=s18)
    assert sorted(p.name for p in ckpt.glob("step*")) == [s12, s18]
    fresh = make_checkpoint(ckpt, 3)  # a run started over (trainer.resume=never) below the old steps
    c._prune(keep_tag=fresh)
    assert {s12, fresh} <= {p.name for p in ckpt.glob("step*")}


# -- 3. bounded hangs -------------------------------------------------------------------------------------------
def test_a_stalled_rank_ends_the_job_within_the_collective_timeout(tmp_path, omniglot_raw, omniglot_ns_shards):
    run_dir = tmp_path / "run"
    cmd = [*TORCHRUN, "--nproc_per_node=2", "-m", "launch.train",
           *base(run_dir, omniglot_raw, omniglot_ns_shards, "trainer.epochs=100", "trainer.log_every=1",
                 "trainer.collective_timeout_s=5")]
    job = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    workers = []
    try:
        wait_for(lambda: steps_written(run_dir) >= 2, 300, "training", job)
        workers = [wait_for(lambda: _pid_of_rank(job.pid, r), 10, f"rank {r}") for r in (0, 1)]
        os.kill(workers[1], signal.SIGSTOP)
        t0 = time.monotonic()
        out, _ = job.communicate(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        for pid in [job.pid, *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert job.returncode == exit_codes.COLLECTIVE_FAILED, out[-4000:]
    assert "rank(s) 1 did not answer (stalled or dead); trainer.collective_timeout_s=5" in out
    # 5 s timeout + roll call + torchrun's fixed 30 s grace before it SIGKILLs the stopped rank
    assert elapsed < 60, elapsed


def _pid_of_rank(parent: int, rank: int) -> int | None:
    """The worker of `rank` started by `parent` (torchrun puts each worker in a session of its own)."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and f"RANK={rank}".encode() in (p / "environ").read_bytes().split(b"\0"):
                return int(p.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


# -- 5. strict configs before any work; one table of exit codes under every launcher ------------------------------
@pytest.mark.parametrize("override, needle", [
    ("+trainer.lrr=0.1", "unknown key 'trainer.lrr'"),
    ("trainer.lr=nan", "trainer.lr must be a finite number, got nan"),
    ("model.name=nope", "unknown model 'nope'"),
])
def test_bad_configs_are_refused_before_the_data_is_touched(tmp_path, override, needle):
    raw = tmp_path / "raw"  # empty: touching the data would fail differently (missing raw data)
    proc = run_module("launch.train", *base(tmp_path / "run", raw, tmp_path / "shards", override), cwd=ROOT,
                      check=False)
    assert proc.returncode == exit_codes.CONFIG_ERROR, proc.stderr[-3000:]
    assert needle in proc.stderr and "data error" not in proc.stderr
    assert not (tmp_path / "shards").exists() and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("overrides, needle", [
    (["trainer.lr=inf"], "trainer.lr must be a finite number, got inf"),
    (["trainer.alpha=-inf"], "trainer.alpha must be a finite number"),
    (["model.likelihood=discretized_normal"], "supports only 28x28x1 images with a Bernoulli likelihood"),
    (["model=schavae", "model.likelihood=discretized_mix_logistic"], "does not fit data.binarize='dynamic'"),
    (["+model.width=3"], "unknown key 'model.width'"),
])
def test_config_checks_name_the_key(overrides, needle):
    from hydra import compose, initialize_config_dir

    from launch.app import CONFIG_DIR
    from trainer.config import check_trainable, load_config

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        raw = compose("config", overrides=["experiment=smoke", *overrides])
    with pytest.raises(ValueError, match=None) as err:
        check_trainable(load_config(raw))
    assert needle in str(err.value)


def test_a_config_error_exits_2_under_every_launcher(tmp_path):
    """python -m, launch.torchrun (torchrun alone says 1) and the deepspeed launcher: the same code, and
    launch.torchrun refuses before any worker starts (nothing for --max-restarts to retry)."""
    args = ["-m", "launch.train", "experiment=smoke", f"run_dir={tmp_path / 'run'}", "+trainer.lrr=0.1"]
    deepspeed = Path(sys.executable).with_name("deepspeed")
    launchers = {
        "python": [sys.executable],
        "launch.torchrun": [*TORCHRUN, "--nproc_per_node=2", "--max-restarts=3"],
        "deepspeed": [str(deepspeed), "--num_gpus", "1", "--no_local_rank", "--module"],
    }
    codes = {}
    for name, launcher in launchers.items():
        cmd = launcher + (args[1:] if name == "deepspeed" else args)
        proc = subprocess.run(cmd, cwd=ROOT, env={**env(), "DS_ACCELERATOR": "cpu"}, capture_output=True,
                              text=True, timeout=300)
        codes[name] = proc.returncode
        assert "unknown key 'trainer.lrr'" in proc.stdout + proc.stderr, (name, proc.stderr[-3000:])
    assert codes == dict.fromkeys(launchers, exit_codes.CONFIG_ERROR)


def test_hydra_composition_errors_exit_2():
    proc = run_module("launch.train", "experiment=no_such_preset", cwd=ROOT, check=False)
    assert proc.returncode == exit_codes.CONFIG_ERROR and "no_such_preset" in proc.stderr


def test_most_specific_code_of_a_failed_job():
    assert exit_codes.most_specific([exit_codes.COLLECTIVE_FAILED, exit_codes.DIVERGED]) == exit_codes.DIVERGED
    assert exit_codes.most_specific([exit_codes.COLLECTIVE_FAILED, -signal.SIGKILL]) == exit_codes.COLLECTIVE_FAILED
    assert exit_codes.most_specific([-signal.SIGTERM]) == exit_codes.PREEMPTED
    assert not set(exit_codes.FAIL_FAST) & set(exit_codes.RETRY)


# -- 6. I/O failures ----------------------------------------------------------------------------------------------
def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode == 0


@pytest.mark.parametrize("where", ["run_dir", "checkpoints"])
def test_read_only_storage_exits_4_naming_the_path_before_any_work(tmp_path, omniglot_raw, where):
    """Issue 33: a read-only mount as the run directory (Hydra would fail writing .hydra/ with a traceback) or as
    its checkpoints/ (which reported ENOENT) exits 4 with one line naming the path and EROFS, before the data
    is touched."""
    run_dir = tmp_path / "run"
    target = run_dir if where == "run_dir" else run_dir / "checkpoints"
    if not _tmpfs(target, "1m"):
        pytest.skip("needs root to mount a read-only tmpfs")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
        no_shards = tmp_path / "no_shards"
        proc = run_module("launch.train", *base(run_dir, omniglot_raw, no_shards), cwd=ROOT, check=False)
    finally:
        subprocess.run(["umount", str(target)])
    assert proc.returncode == exit_codes.IO_ERROR, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == [f"I/O error: writing to {target} failed: [Errno EROFS] Read-only file system"], lines
    assert not no_shards.exists()  # nothing prepared, nothing trained


def test_a_full_disk_during_a_checkpoint_names_the_file_and_the_os_error(tmp_path, omniglot_raw, omniglot_ns_shards):
    """A real fault: a 40 MiB tmpfs under checkpoints/ (root) holds one 27 MB smoke checkpoint, not two
    (ENOSPC); without root, RLIMIT_FSIZE below the checkpoint's size (EFBIG, SIGXFSZ ignored)."""
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    mounted = _tmpfs(ckpt, "40m")
    try:
        run_module("launch.train", *base(run_dir, omniglot_raw, omniglot_ns_shards, "trainer.epochs=1"), cwd=ROOT)

        def limit():
            if not mounted:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 20, 20 << 20))

        # what an older release left after a full disk: a torn record at the end of metrics.jsonl
        metrics = run_dir / "metrics.jsonl"
        with metrics.open("a") as f:
            f.write('{"step": 11, "loss": 1089.4538574')
        for attempt in (1, 2):  # as a user would retry
            proc = subprocess.run([sys.executable, "-m", "launch.train",
                                   *base(run_dir, omniglot_raw, omniglot_ns_shards)],
                                  cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300, preexec_fn=limit)
            assert proc.returncode == exit_codes.IO_ERROR, proc.stderr[-3000:]
            reason = "[Errno ENOSPC] No space left on device" if mounted else "[Errno EFBIG] File too large"
            assert (f"writing checkpoint file {ckpt / 'step000000012' / 'mp_rank_00_model_states.pt'} failed: "
                    f"{reason}" in proc.stderr), proc.stderr[-3000:]
            assert ("ended in a torn record" in proc.stdout + proc.stderr) == (attempt == 1), proc.stdout[-3000:]
            assert (ckpt / "latest").read_text() == "step000000006"
            assert Checkpointer(ckpt, 1).resume_candidates()[0] == ["step000000006"]
            assert not (ckpt / "step000000012").exists()  # the partial checkpoint is gone, its space freed
            assert metrics.read_text().endswith("\n")
            steps = read_step_records(metrics)  # every line the run wrote reads back
            assert sorted(steps) == list(range(12)) and all(json.loads(l) for l in metrics.read_text().splitlines())
            # one record per step and per epoch, whatever was retried (epoch 2's row precedes its failed save)
            assert len(metrics.read_text().splitlines()) == 12
            assert [json.loads(l)["epoch"] for l in (run_dir / "epochs.jsonl").read_text().splitlines()] == [1, 2]
    finally:
        if mounted:
            subprocess.run(["umount", str(ckpt)])


def test_a_metrics_write_that_fills_the_disk_leaves_no_torn_record(tmp_path):
    """A real full disk: a 64 KiB tmpfs (root) or RLIMIT_FSIZE in a child; the append that fails part-way is cut
    back to the file's previous size, the next append after space is freed lands whole, the file reads back."""
    from trainer.metrics import append_jsonl, read_jsonl
    from trainer.run.errors import RunIOError

    disk = tmp_path / "disk"
    if not _tmpfs(disk, "64k"):
        pytest.skip("needs root to mount a tmpfs")  # the checkpoint test above covers RLIMIT_FSIZE
    try:
        target = disk / "metrics.jsonl"
        append_jsonl(target, [{"step": i, "loss": 1.0 + i} for i in range(10)])
        before = target.read_bytes()
        filler = disk / "filler"
        with pytest.raises(OSError), filler.open("wb", buffering=0) as f:  # fill the disk, give back 8 KiB
            for _ in range(1 << 10):
                f.write(b"x" * (1 << 10))
        os.truncate(filler, filler.stat().st_size - (8 << 10))
        big = [{"step": 10 + i, "loss": 1089.4538574 + i, "note": "y" * 40} for i in range(200)]  # ~17 KB
        with pytest.raises(RunIOError, match=f"writing metrics to {target} failed: \\[Errno ENOSPC\\]"):
            append_jsonl(target, big)
        assert target.read_bytes() == before  # nothing of the failed append is left
        filler.unlink()
        append_jsonl(target, big)
        assert [r["step"] for r in read_jsonl(target)] == list(range(210))
    finally:
        subprocess.run(["umount", str(disk)])


def test_torn_tails_are_cut_and_skipped_by_readers(tmp_path):
    from trainer.metrics import append_jsonl, read_step_records, repair_jsonl

    target = tmp_path / "metrics.jsonl"
    append_jsonl(target, [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 2.0}])
    whole = target.read_bytes()
    target.write_bytes(whole + b'{"step": 11, "loss": 1089.4538574')
    assert sorted(read_step_records(target)) == [0, 1]  # the reader skips a torn last line
    assert repair_jsonl(target) == len(b'{"step": 11, "loss": 1089.4538574') and target.read_bytes() == whole
    assert repair_jsonl(target) == 0
    target.write_bytes(whole + b"not json\n")
    with pytest.raises(ValueError):  # a complete line that is not JSON was not written by the run: not hidden
        read_step_records(target)


def test_a_failed_metrics_write_names_the_file(tmp_path):
    from trainer.run.errors import RunIOError
    from trainer.metrics import append_jsonl

    target = tmp_path / "metrics.jsonl"
    target.mkdir()  # a directory where the file should be: the open fails with a real OS error
    with pytest.raises(RunIOError, match=f"writing metrics to {target} failed: \\[Errno EISDIR\\] Is a directory"):
        append_jsonl(target, [{"step": 0}])


# -- 8. strict JSON -----------------------------------------------------------------------------------------------
def test_metrics_records_are_strict_json_with_non_finite_flagged():
    from trainer.metrics import strict_record

    line = json.dumps(strict_record({"step": 2, "loss": float("nan"), "vlb": -3.0, "kl_z": float("inf")}),
                      allow_nan=False)
    assert json.loads(line) == {"step": 2, "loss": None, "vlb": -3.0, "kl_z": None, "non_finite": ["loss", "kl_z"]}


def test_evaluation_rows_are_strict_json_listing_what_was_not_finite():
    import numpy as np

    from trainer.metrics import strict_rows

    rows = [{"split": "test", "vlb": float("nan"), "per_layer": [1.0, float("inf")], "n": np.float32(2.0)},
            {"split": "val", "vlb": -90.0}]
    text = json.dumps(strict_rows(rows), allow_nan=False)
    assert json.loads(text) == [{"split": "test", "vlb": None, "per_layer": [1.0, None], "n": 2.0,
                                 "non_finite": ["vlb", "per_layer.1"]}, {"split": "val", "vlb": -90.0}]
