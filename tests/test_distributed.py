"""Multi-process training on CPU (gloo), the way users launch it: torchrun and the deepspeed launcher at ZeRO 0, 1
and 2 reproduce a single process with the same global batch; checkpoints resume at another world size with the
same losses; a checkpoint exports to a plain fp32 state dict; the multi-node recipes of launch/ run as written
(two "nodes" on localhost); bf16 at ZeRO 2 trains and resumes at another world size; a bad world-size/batch
combination fails before any process-group work."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port, run_module
from trainer.metrics import read_step_records

BIN = Path(sys.executable).parent
STAGES = (0, 1, 2)
STEPS_PER_EPOCH = 3
RTOL = 1e-4  # fp32 loss trajectories: N processes vs one




def train_args(run_dir: Path, raw: Path, shards: Path, epochs: int, *extra: str) -> list[str]:
    """Smoke model, 3 steps per epoch, the same global batch (8 sets) at every world size; fp32 unless `extra`
    says otherwise (world-size invariance to float precision is an fp32 property: bf16 kernels round differently
    for different batch shapes)."""
    if not any(e.startswith("trainer.precision=") for e in extra):
        extra = ("trainer.precision=fp32", *extra)
    return ["experiment=smoke", f"run_dir={run_dir}", f"data.raw_dir={raw}", f"data.shards_dir={shards}",
            "data.download=false", f"data.limit_batches={STEPS_PER_EPOCH}", "trainer.global_batch_sets=8",
            f"trainer.epochs={epochs}", "trainer.keep_checkpoints=3", "tracking.enabled=false", *extra]


def launch(cmd: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd[:6])} ... exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                    f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def torchrun(*args: str, **kw) -> subprocess.CompletedProcess:
    return launch([str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}",
                   "-m", "launch.train", *args], **kw)


def deepspeed(*args: str) -> subprocess.CompletedProcess:
    return launch([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank",
                   "--module", "launch.train", *args])


def losses(run_dir: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in read_step_records(run_dir / "metrics.jsonl").items()}


def assert_same_losses(got: dict[int, float], want: dict[int, float], steps: range) -> None:
    assert sorted(got) == list(steps), sorted(got)
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=RTOL), (step, got[step], want[step])


def resume_from(source: Path, tag: str, run_dir: Path) -> Path:
    """A fresh run directory whose only checkpoint is `tag` of `source` (copied, so sources stay intact)."""
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / tag, run_dir / "checkpoints" / tag)
    (run_dir / "checkpoints" / "latest").write_text(tag)
    return run_dir


@pytest.fixture(scope="module")
def data(omniglot_raw, omniglot_ns_shards):
    return omniglot_raw, omniglot_ns_shards


@pytest.fixture(scope="module")
def single(tmp_path_factory, data) -> Path:
    """One process, ZeRO 0: 3 epochs (9 steps), checkpoints after steps 3, 6 and 9."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    run_module("launch.train", *train_args(run_dir, *data, 3), cwd=ROOT)
    return run_dir


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory, data) -> dict[int, Path]:
    """torchrun --nproc_per_node=2 at ZeRO 0, 1, 2: 2 epochs (6 steps). ZeRO 1 also tracks in MLflow."""
    runs = {}
    for stage in STAGES:
        run_dir = tmp_path_factory.mktemp(f"torchrun{stage}") / "run"
        extra = [f"trainer.zero_stage={stage}"]
        if stage == 1:
            extra += ["tracking.enabled=true", "tracking.register=false", f"tracking.root={run_dir.parent / 'mlruns'}"]
        torchrun(*train_args(run_dir, *data, 2, *extra))
        runs[stage] = run_dir
    return runs


@pytest.mark.parametrize("stage", STAGES)
def test_torchrun_matches_one_process(stage, torchrun_runs, single):
    run_dir = torchrun_runs[stage]
    assert_same_losses(losses(run_dir), losses(single), range(6))
    # every rank writes its own checkpoint shard (at ZeRO >= 1 its optimizer partition) and random state
    for tag in ("step000000003", "step000000006"):
        ckpt = run_dir / "checkpoints" / tag
        assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank0.pt", "rank1.pt"]
        shards = sorted(p.name for p in ckpt.glob("*zero_pp_rank_*"))
        assert shards == ([] if stage == 0 else [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)])
        assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 2
    # rank 0 alone writes the summaries: one record per step, one config, epochs once; rank 1 its own log
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 6
    assert len((run_dir / "epochs.jsonl").read_text().splitlines()) == 2
    assert (run_dir / "config.yaml").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "train.rank1.log").is_file()


def test_only_rank_zero_talks_to_mlflow(torchrun_runs):
    import mlflow
    from mlflow import MlflowClient

    run_dir = torchrun_runs[1]
    mlflow.set_tracking_uri(f"sqlite:///{run_dir.parent / 'mlruns' / 'mlflow.db'}")
    client = MlflowClient()
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1  # not one per rank
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(6))
    by_step = {m.step: m.value for m in history}
    assert_same_losses(by_step, losses(run_dir), range(6))  # the global batch's loss, not rank 0's half


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_launcher_matches_one_process(stage, tmp_path, data, single):
    run_dir = tmp_path / "run"
    deepspeed(*train_args(run_dir, *data, 2, f"trainer.zero_stage={stage}"))
    assert_same_losses(losses(run_dir), losses(single), range(6))


@pytest.fixture(scope="module")
def resumed_at_1(tmp_path_factory, torchrun_runs, data) -> dict[int, Path]:
    """Each world-size-2 run resumed from its step-3 checkpoint by one process, run to step 9."""
    runs = {}
    for stage in STAGES:
        run_dir = resume_from(torchrun_runs[stage], "step000000003", tmp_path_factory.mktemp(f"resumed{stage}") / "run")
        run_module("launch.train", *train_args(run_dir, *data, 3, f"trainer.zero_stage={stage}"), cwd=ROOT)
        runs[stage] = run_dir
    return runs


@pytest.mark.parametrize("stage", STAGES)
def test_world_size_2_checkpoint_resumes_at_world_size_1(stage, resumed_at_1, torchrun_runs, single):
    run_dir = resumed_at_1[stage]
    got = losses(run_dir)
    assert_same_losses({s: got[s] for s in range(3, 6)}, losses(torchrun_runs[stage]), range(3, 6))
    assert_same_losses(got, losses(single), range(3, 9))  # and on, past where the 2-process run stopped
    converted = run_dir / "checkpoints" / "universal" / "step000000003"
    assert converted.is_dir() == (stage > 0)  # re-partitioned optimizer state (ZeRO >= 1)


def test_world_size_1_checkpoint_resumes_at_world_size_2(tmp_path, resumed_at_1, data, single):
    """ZeRO 2 written by one process (step 6), continued by two."""
    run_dir = resume_from(resumed_at_1[2], "step000000006", tmp_path / "run")
    torchrun(*train_args(run_dir, *data, 3, "trainer.zero_stage=2"))
    assert_same_losses(losses(run_dir), losses(single), range(6, 9))


def test_export_writes_a_safetensors_package(tmp_path, torchrun_runs):
    """ZeRO 2 at world size 2 (fp32 master weights split over two files) -> one package: safetensors weights
    equal to the checkpoint's, and a card naming the run's model, the checkpoint and its val ELBO."""
    import json

    import torch
    from safetensors.torch import load_file

    from trainer.checkpoint import load_state_file
    from trainer.registry.package import read_package

    run_dir, out = torchrun_runs[2], tmp_path / "package"
    run_module("launch.export", str(run_dir), "--tag", "step000000006", "--out", str(out), cwd=ROOT)
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "weights.safetensors"]
    state = load_file(str(out / "weights.safetensors"))
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    saved = load_state_file(run_dir / "checkpoints" / "step000000006" / "mp_rank_00_model_states.pt")["module"]
    assert saved.keys() == state.keys()
    for k, v in saved.items():
        assert torch.equal(state[k], v.float() if v.is_floating_point() else v), k
    model, card = read_package(out)
    assert card.model.name == "ns" and card.checkpoint == {"tag": "step000000006", "step": 6, "epoch": 2}
    last_epoch = json.loads((run_dir / "epochs.jsonl").read_text().splitlines()[-1])
    assert last_epoch["step"] == 6 and card.metrics["val/vlb"] == last_epoch["val/vlb"]
    assert card.n_params == sum(p.numel() for p in model.parameters())


def test_bad_world_size_fails_before_process_group_work(tmp_path, data):
    """World size 3 with a global batch of 8: refused from the environment alone. (Had it reached the
    rendezvous, rank 0 would wait for ranks 1 and 2 that never come, and the timeout would fail the test.)"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "3",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "launch.train", *train_args(tmp_path / "run", *data, 1)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "trainer.global_batch_sets=8 is not divisible by world size 3 x trainer.grad_accum=1 (= 3)" in proc.stderr
    assert "rendezvous" not in proc.stderr.lower() and not (tmp_path / "run" / "checkpoints").exists()
    assert time.perf_counter() - t0 < 100


def _two_nodes(cmds: list[list[str]], env: dict) -> None:
    """Start the per-node commands together (as on two machines) and wait for both."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **env}
    procs = [subprocess.Popen(c, cwd=ROOT, env={**full_env, "NODE": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i, c in enumerate(cmds)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-6000:]


def test_multinode_recipe_torchrun_c10d(tmp_path, data, single):
    """launch/multinode.sh: the same command on every node, rendezvous at MASTER_ADDR (no ssh, no node rank)."""
    run_dir = tmp_path / "run"
    cmd = ["bash", str(ROOT / "launch" / "multinode.sh"), *train_args(run_dir, *data, 2, "trainer.zero_stage=1")]
    _two_nodes([cmd, cmd], {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": str(free_port()), "RUN_ID": tmp_path.name})
    assert_same_losses(losses(run_dir), losses(single), range(6))


def test_multinode_recipe_deepspeed_hostfile(tmp_path, data, single):
    """launch/multinode.md's hostfile recipe without ssh: each node runs the launcher with its --node_rank."""
    run_dir, hostfile = tmp_path / "run", tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    cmds = [[str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", f"--node_rank={n}",
             "--master_addr=127.0.0.1", f"--master_port={port}", "--no_local_rank", "--module", "launch.train",
             *train_args(run_dir, *data, 2, "trainer.zero_stage=2")] for n in (0, 1)]
    _two_nodes(cmds, {})
    assert_same_losses(losses(run_dir), losses(single), range(6))


def test_bf16_zero2_trains_and_resumes_at_another_world_size(tmp_path, data):
    """bf16 (BatchNorm in fp32 with fp32 running statistics; CPU kernels reject the mixed dtypes otherwise):
    two processes at ZeRO 2, then one process from their checkpoint."""
    import math

    two = tmp_path / "two" / "run"
    torchrun(*train_args(two, *data, 1, "trainer.zero_stage=2", "trainer.precision=bf16"))
    ckpt = two / "checkpoints" / "step000000003"
    assert sorted(p.name for p in ckpt.glob("*zero_pp_rank_*")) == [
        f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    one = resume_from(two, "step000000003", tmp_path / "one" / "run")
    run_module("launch.train", *train_args(one, *data, 2, "trainer.zero_stage=2", "trainer.precision=bf16"), cwd=ROOT)
    got = losses(one)
    assert sorted(got) == [3, 4, 5] and all(math.isfinite(v) for v in got.values())
    assert got[5] < losses(two)[0]  # still training
