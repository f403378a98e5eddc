"""The Indexed Job's multi-node training across hosts with their own addresses, on this machine: two network
namespaces joined by a veth pair stand for the two pods. Each "pod" gets what Kubernetes gives it: its hostname
(<job>-<index>, a UTS namespace), an /etc/hosts with its own line as the kubelet writes it and the headless Service
name of pod 0 (the cluster DNS record torchrun's --rdzv-endpoint names; `ip netns exec` mounts
/etc/netns/<ns>/hosts over /etc/hosts), the two volumes at /data and /runs (bind mounts in its own mount
namespace), and the container's environment as the Job builds it (its env with the ConfigMap / Secret references
resolved, JOB_COMPLETION_INDEX, HOSTNAME, the image's ENV). It then runs exactly the container's argv (the image's
ENTRYPOINT, tini, is not installed here: it only forwards signals), scaled to 2 nodes x 2 processes by the Job's
one-place fields, on gloo. The only additions are Hydra overrides appended to select the tiny `smoke` training
(tests/test_distributed.py's settings) and disable MLflow.

The fault: node 1's pod is SIGKILLed (its launcher and workers, as the kubelet or a lost node does) after the
epoch-1 checkpoint. Node 0's workers end with exit code 6 (COLLECTIVE_FAILED, trainer/run/exit_codes.py) within
trainer.collective_timeout_s + 60 s and its launcher reports that code. The test then acts as the Job controller
does: every pod that fails is recreated with the same index, hostname and command while the failures stay within
backoffLimit, until both pods succeed; the run resumes from its checkpoint and ends with the losses of an
uninterrupted (one-process) run. (With torch 2.14, node 0's launch.torchrun does not get its replacement peer
through a re-rendezvous round: its role-info exchange times out after 60 s and pod 0 fails too, so the job
resumes on a fresh pair of pods. Whether one or both pods are recreated, the result asserted is the same.)
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT
from k8s_support import dockerfile_instructions, edited_copy, invocations_of, kustomize
from trainer.run import exit_codes
from trainer.metrics import read_step_records

STEPS_PER_EPOCH, EPOCHS = 3, 3
COLLECTIVE_TIMEOUT_S = 120  # also bounds the process-group start: 6 processes import torch on 2 cores
RTOL = 1e-4  # fp32 loss trajectories: N processes vs one (tests/test_distributed.py)
TINY = ["experiment=smoke", f"data.limit_batches={STEPS_PER_EPOCH}", f"trainer.epochs={EPOCHS}",
        "trainer.global_batch_sets=8", "trainer.precision=fp32", "trainer.checkpoint_every_epochs=1",
        "trainer.keep_checkpoints=5", f"trainer.collective_timeout_s={COLLECTIVE_TIMEOUT_S}", "data.download=false",
        "tracking.enabled=false"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts():
    """Network namespaces <tag>0 / <tag>1 with 10.<a>.<b>.1 / .2 on a veth pair; removed afterwards."""
    tag = f"k8s{os.getpid() % 100000}"
    names = [f"{tag}n0", f"{tag}n1"]
    net = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    try:
        _ip("netns", "add", names[0])
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"network namespaces cannot be created here: {getattr(exc, 'stderr', exc)}".strip())
    try:
        _ip("netns", "add", names[1])
        _ip("link", "add", f"{tag}v0", "netns", names[0], "type", "veth", "peer", "name", f"{tag}v1", "netns", names[1])
        for i, ns in enumerate(names):
            _ip("-n", ns, "addr", "add", f"{net}.{i + 1}/24", "dev", f"{tag}v{i}")
            _ip("-n", ns, "link", "set", f"{tag}v{i}", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield names, [f"{net}.1", f"{net}.2"]
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


def _image_env() -> dict:
    env = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env


class Node:
    """One pod of the Indexed Job: its process, and its output lines with the time each arrived."""

    def __init__(self, index: int, ns: str, argv: list, env: dict, volumes: dict, log: Path):
        script = ("hostname \"$POD_HOSTNAME\" && " + " && ".join(
            f"mkdir -p {dst} && mount --bind {src} {dst}" for dst, src in volumes.items()) + ' && exec "$@"')
        self.lines: list = []
        self.log = log.open("w")
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "unshare", "--uts", "--mount", "--propagation",
                                      "private", "sh", "-c", script, "sh", *argv],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))
            self.log.write(line)
            self.log.flush()

    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def first(self, pattern: str):
        return next(((t, line) for t, line in self.lines if re.search(pattern, line)), None)

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.reader.join(30)


def _wait(cond, timeout: float, what: str, nodes):
    deadline = time.monotonic() + timeout
    while not cond():
        for n in nodes:
            assert n.proc.poll() is None, f"{what}: a node exited {n.proc.returncode}:\n{n.output()[-5000:]}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s\n" + "\n".join(
            n.output()[-3000:] for n in nodes)
        time.sleep(0.2)


def test_two_nodes_across_network_namespaces_train_survive_a_killed_pod_and_resume_exactly(
        two_hosts, tmp_path, omniglot_raw, omniglot_ns_shards):
    names, addrs = two_hosts
    # the Job as a user scales it: 2 nodes (spec.parallelism) x 2 processes (the nvidia.com/gpu limit)
    tree = edited_copy(tmp_path, "train-indexed/job.yaml", [("      nvidia.com/gpu: 8 ", "      nvidia.com/gpu: 2 ")])
    objs = kustomize(tree / "train-indexed")
    (job, spec, c, env, cmd, (launcher, module, overrides)), = list(invocations_of(objs))
    jname, sub = job["metadata"]["name"], spec["subdomain"]
    assert env["NNODES"] == "2" and env["GPUS_PER_NODE"] == "2" and job["spec"]["completions"] == 2
    assert cmd[:2] == ["/usr/bin/tini", "--"]  # the image's ENTRYPOINT, then the container's args
    argv = cmd[2:] + TINY
    rdzv = next(a for a in argv if a.startswith("--rdzv-endpoint="))
    assert rdzv == f"--rdzv-endpoint={jname}-0.{sub}:29400"

    # the volumes: /data with the raw zips and the prepared shards, /runs empty
    data, runs = tmp_path / "data", tmp_path / "runs"
    (data / "raw").mkdir(parents=True)
    (data / "raw" / "omniglot").symlink_to(omniglot_raw)
    (data / "shards").symlink_to(omniglot_ns_shards)
    runs.mkdir()
    volumes = {"/data": str(data), "/runs": str(runs)}
    fqdn = f"{{host}}.{sub}.scha-vae.svc.cluster.local"
    for i, ns in enumerate(names):
        host = f"{jname}-{i}"
        lines = ["127.0.0.1 localhost", f"{addrs[i]} {fqdn.format(host=host)} {host}"]  # the kubelet's
        # the headless Service's DNS record of pod 0 (the FQDN; the short name through the pod's search path):
        # torchrun names the FQDN of the rank-0 node to the workers as MASTER_ADDR
        lines.append(f"{addrs[0]} {fqdn.format(host=f'{jname}-0')} {jname}-0.{sub}")
        Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)
        Path(f"/etc/netns/{ns}/hosts").write_text("\n".join(lines) + "\n")

    image_env = _image_env()
    bin_dir = str(Path(sys.executable).parent)

    def pod_env(i: int, attempt: int) -> dict:
        home, tmp = tmp_path / f"home{i}-{attempt}", tmp_path / f"tmp{i}-{attempt}"  # the pod's emptyDirs
        home.mkdir()
        tmp.mkdir()
        return {**image_env, **env, "JOB_COMPLETION_INDEX": str(i), "HOSTNAME": f"{jname}-{i}",
                "POD_HOSTNAME": f"{jname}-{i}", "HOME": str(home), "TMPDIR": str(tmp),
                "XDG_CACHE_HOME": str(home / ".cache"), "MPLCONFIGDIR": str(home / ".cache" / "matplotlib"),
                "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
                "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}

    run_dir = runs / "omniglot_ns_ns"
    nodes = [Node(i, ns, argv, pod_env(i, 0), volumes, tmp_path / f"node{i}.log") for i, ns in enumerate(names)]
    try:
        # trains and checkpoints: wait for the epoch-1 checkpoint, then kill pod 1
        latest = run_dir / "checkpoints" / "latest"
        _wait(lambda: latest.is_file() and latest.read_text().strip() == "step000000003", 300,
              "the epoch-1 checkpoint", nodes)
        t_kill = time.monotonic()
        nodes[1].kill()
        done_at_kill = max(read_step_records(run_dir / "metrics.jsonl"))
        assert done_at_kill < STEPS_PER_EPOCH * EPOCHS - 1, "the run ended before the fault: nothing was tested"
        # node 0's workers stop with the documented code instead of hanging in a collective
        bound = COLLECTIVE_TIMEOUT_S + 60
        _wait(lambda: nodes[0].first(r"collective failed: on rank") is not None, bound, "node 0's workers", [nodes[0]])
        t_failed, line = nodes[0].first(r"collective failed: on rank")
        assert t_failed - t_kill < bound, line
        _wait(lambda: nodes[0].first(rf"failed \(exitcode: {exit_codes.COLLECTIVE_FAILED}\)") is not None, 60,
              "node 0's launcher reporting its workers' exit code", [nodes[0]])
        # The Job controller: a pod that fails is recreated with the same index, hostname and command, as long as
        # the failures stay within backoffLimit (every code here counts: 137, 6, 1; podFailurePolicy).
        failures, backoff = 1, job["spec"]["backoffLimit"]
        pods = {0: nodes[0], 1: Node(1, names[1], argv, pod_env(1, 1), volumes, tmp_path / "node1-1.log")}
        nodes.append(pods[1])
        deadline = time.monotonic() + 900
        while any(n.proc.poll() != 0 for n in pods.values()):
            assert time.monotonic() < deadline, "the job did not complete in 900 s"
            for i, n in list(pods.items()):
                if n.proc.poll() not in (None, 0):
                    n.reader.join(30)
                    failures += 1
                    assert failures <= backoff, f"backoffLimit {backoff} used up:\n{n.output()[-6000:]}"
                    pods[i] = Node(i, names[i], argv, pod_env(i, failures), volumes, tmp_path / f"node{i}-{failures}.log")
                    nodes.append(pods[i])
            time.sleep(0.5)
        for n in pods.values():
            n.reader.join(30)
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                os.killpg(n.proc.pid, signal.SIGKILL)
    out = "".join(n.output() for n in nodes)
    assert re.search(r"resumed from \S*/runs/omniglot_ns_ns/checkpoints/step0000000(0[3-9]|1\d)", out), out[-4000:]
    # 4 ranks, both nodes: the rendezvous ran across the two addresses
    assert "4 process(es)" in out
    got = {s: r["loss"] for s, r in read_step_records(run_dir / "metrics.jsonl").items()}

    # the uninterrupted run: one process, the same training
    ref = tmp_path / "reference"
    ref_args = [o for o in overrides if not o.startswith(("run_dir=", "data.raw_dir=", "data.shards_dir="))]
    proc = subprocess.run([sys.executable, "-m", "launch.train", *ref_args, *TINY, f"run_dir={ref}",
                           f"data.raw_dir={omniglot_raw}", f"data.shards_dir={omniglot_ns_shards}"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu",
                                         "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    want = {s: r["loss"] for s, r in read_step_records(ref / "metrics.jsonl").items()}
    assert sorted(got) == sorted(want) == list(range(STEPS_PER_EPOCH * EPOCHS))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=RTOL), (step, got[step], want[step])
