"""The rendered training Job's podFailurePolicy acts on the exit codes the real entry point produces: the
container's own launcher (python -m launch.torchrun ... -m launch.train) is run here with a bad config and with
an injected divergence, and its exit code is matched against the rendered rules as the Job controller does. The
Kubeflow TrainJob's own TrainingRuntime (k8s/train-kubeflow/trainingruntime.yaml) carries the same rules on its
`node` replicated job: they are compared with the Job's and validated as a batch/v1 Job."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import copy

import kubernetes_validate
import pytest

from conftest import ROOT
from k8s_support import K8S_VERSION, NAMESPACE, TRAINJOB_API, invocations_of, one, render, torchrun_args, trainjob_pod_spec
from trainer.run import exit_codes


def job_action(policy: dict, container: str, exit_code: int, conditions: tuple = ()) -> str:
    """The Job controller's verdict for a failed pod: the first matching rule's action, else Count."""
    for rule in policy["rules"]:
        if any(c["type"] in conditions for c in rule.get("onPodConditions", [])):
            return rule["action"]
        codes = rule.get("onExitCodes")
        if codes and codes.get("containerName", container) == container and exit_code != 0:
            inside = exit_code in codes["values"]
            if inside == (codes["operator"] == "In"):
                return rule["action"]
    return "Count"


@pytest.fixture(scope="module")
def training_job():
    (job, spec, c, env, cmd, (launcher, module, overrides)), = list(invocations_of(render("train-indexed")))
    own = list(launcher)
    while own and Path(own[0]).name in ("tini", "--"):  # the image's ENTRYPOINT
        own = own[1:]
    assert own[:3] == ["python", "-m", "launch.torchrun"] and module == "launch.train"
    return job["spec"]["podFailurePolicy"], c["name"], torchrun_args(launcher)


def run_like_the_pod(tr, tmp_path, raw, shards, *overrides: str) -> subprocess.CompletedProcess:
    """The pod's launcher with its restart budget, on this machine (one node, one process)."""
    cmd = [sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc_per_node=1",
           f"--max-restarts={tr.max_restarts}", "-m", "launch.train", "experiment=smoke", f"run_dir={tmp_path / 'run'}",
           f"data.raw_dir={raw}", f"data.shards_dir={shards}", "data.download=false", "tracking.enabled=false",
           *overrides]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)


def test_a_bad_config_fails_the_job_at_once(training_job, tmp_path, omniglot_raw, omniglot_ns_shards):
    policy, container, tr = training_job
    assert tr.max_restarts >= 1  # torchrun would retry a typo; launch.torchrun refuses before any worker
    proc = run_like_the_pod(tr, tmp_path, omniglot_raw, omniglot_ns_shards, "+trainer.lrr=0.1")
    assert proc.returncode == exit_codes.CONFIG_ERROR, proc.stderr[-3000:]
    assert "Starting elastic_operator" not in proc.stderr and "restart" not in proc.stderr.lower()
    assert job_action(policy, container, proc.returncode) == "FailJob"


def test_divergence_fails_the_job_at_once(training_job, tmp_path, omniglot_raw, omniglot_ns_shards):
    policy, container, tr = training_job
    proc = run_like_the_pod(tr, tmp_path, omniglot_raw, omniglot_ns_shards, "trainer.fault_nan_loss_steps=[0,1]", "trainer.max_consecutive_skips=2",
                            "trainer.eval_test=false")
    assert proc.returncode == exit_codes.DIVERGED, proc.stderr[-3000:]
    assert "2 consecutive steps with a non-finite loss" in proc.stderr
    # torchrun restarts the worker (--max-restarts), which stops at once with the recorded code
    assert proc.stderr.count("not retrying (elastic restart") == tr.max_restarts
    assert job_action(policy, container, proc.returncode) == "FailJob"


def test_the_rules_retry_preemption_and_disruption_and_count_the_rest(training_job):
    policy, container, _ = training_job
    assert job_action(policy, container, 137, conditions=("DisruptionTarget",)) == "Ignore"  # drained node
    assert job_action(policy, container, exit_codes.PREEMPTED) == "Ignore"
    for code in exit_codes.FAIL_FAST:
        if code != exit_codes.MODEL_NOT_FOUND:  # evaluation jobs only
            assert job_action(policy, container, code) == "FailJob", code
    for code in (exit_codes.UNEXPECTED, exit_codes.RUN_DIR_BUSY, exit_codes.COLLECTIVE_FAILED,
                 exit_codes.LAUNCHER_LOST, exit_codes.KILLED):
        assert job_action(policy, container, code) == "Count", code  # retried within backoffLimit


# ------------------------------------------------------------------------------------------------ Kubeflow TrainJob
@pytest.fixture(scope="module")
def kubeflow_runtime():
    """The rendered TrainJob, the TrainingRuntime its runtimeRef names, and that runtime's `node` replicated job."""
    objs = render("train-kubeflow")
    tj = one(objs, "TrainJob")
    rt = one(objs, "TrainingRuntime", tj["spec"]["runtimeRef"]["name"])
    (node,) = [rj for rj in rt["spec"]["template"]["spec"]["replicatedJobs"] if rj["name"] == "node"]
    return tj, rt, node, objs


def _without_container(policy: dict) -> list:
    rules = copy.deepcopy(policy["rules"])
    for rule in rules:
        rule.get("onExitCodes", {}).pop("containerName", None)
    return rules


def test_the_trainjob_runs_the_overlays_own_runtime(kubeflow_runtime):
    tj, rt, node, objs = kubeflow_runtime
    assert tj["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                        "name": rt["metadata"]["name"]}
    assert rt["apiVersion"] == TRAINJOB_API and rt["metadata"]["namespace"] == tj["metadata"]["namespace"] == NAMESPACE
    # torch-distributed's shape: the torch ML policy (PET_* for torchrun), `node` marked as the trainer step,
    # its container `node`, which the TrainJob's trainer fields and runtimePatches target
    assert rt["spec"]["mlPolicy"]["torch"] == {}  # Trainer v2.3's torch policy: no numProcPerNode (the TrainJob's)
    assert rt["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    pod = node["template"]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == [c["name"] for c in trainjob_pod_spec(tj, objs)["containers"]] == ["node"]
    assert pod["containers"][0]["image"] == tj["spec"]["trainer"]["image"]  # `images:` reached both


def test_the_runtime_carries_the_jobs_failure_policy(training_job, kubeflow_runtime):
    job_policy, job_container, _ = training_job
    _, _, node, _ = kubeflow_runtime
    spec = node["template"]["spec"]
    policy, container = spec["podFailurePolicy"], spec["template"]["spec"]["containers"][0]["name"]
    assert _without_container(policy) == _without_container(job_policy)
    assert {r["onExitCodes"]["containerName"] for r in policy["rules"] if "onExitCodes" in r} == {container}
    job = one(render("train-indexed"), "Job")
    assert spec["backoffLimit"] == job["spec"]["backoffLimit"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert job_action(policy, container, exit_codes.CONFIG_ERROR) == "FailJob"
    assert job_action(policy, container, exit_codes.DIVERGED) == "FailJob"
    assert job_action(policy, container, exit_codes.PREEMPTED) == "Ignore"
    assert job_action(policy, container, exit_codes.KILLED, conditions=("DisruptionTarget",)) == "Ignore"
    for code in sorted(set(exit_codes.MEANING) - {exit_codes.OK}) + [126, 127]:
        assert job_action(policy, container, code) == job_action(job_policy, job_container, code), code


def _as_job(node: dict) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "scha-vae-torch-node", "namespace": NAMESPACE},
            "spec": copy.deepcopy(node["template"]["spec"])}


def test_the_runtimes_job_spec_validates_as_a_job(kubeflow_runtime):
    _, _, node, _ = kubeflow_runtime
    kubernetes_validate.validate(_as_job(node), K8S_VERSION, strict=True)
    bad = _as_job(node)
    bad["spec"]["podFailurePolicy"]["rules"][1]["onExitCode"] = bad["spec"]["podFailurePolicy"]["rules"][1].pop("onExitCodes")
    with pytest.raises(kubernetes_validate.ValidationError):  # negative control: strict catches a misspelt field
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
