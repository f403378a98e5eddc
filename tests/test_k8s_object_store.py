"""The object-store overlays (k8s/mlflow-s3, prepare-s3, train-indexed-s3, evaluate-s3; docs/kubernetes.md, "Data
and artifacts in object storage"): what they render, and their containers' own commands run against a real S3
server and a real MLflow server.

The end-to-end test runs, in order, the rendered argv of the MLflow server (k8s/mlflow-s3: basic-auth, artifacts
at $(MLFLOW_ARTIFACTS_URL)), of the preparation Job, of the training Job and of the elbo evaluation Job, each with
the environment its container gets (the ConfigMaps and the user's Secrets resolved). What stands in for the
cluster, and nothing else, is replaced: the cluster's DNS names by 127.0.0.1 (the S3 endpoint of object-store.env,
the tracking URI of cluster.env, torchrun's rendezvous endpoint), the volumes' mount paths /data and /runs by
directories here, the Secret object-store's values by the test server's keys, PostgreSQL by sqlite, NNODES and
GPUS_PER_NODE by 1, and the image's ENTRYPOINT (tini, not installed here) is left out; tiny Hydra overrides are
appended to training and evaluation. The buckets are the ConfigMap's own (s3://scha-vae/...)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, free_port, stop_process
from k8s_support import (OBJECT_STORE_OVERLAYS, USER_SECRETS, argv, containers, http_status, invocations_of, of_kind,
                         one, render, resolve_env, start_rendered_mlflow_server)
from s3_support import ACCESS_KEY, SECRET_KEY

S3_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def _uses_bucket(c: dict, env: dict) -> bool:
    cmd = argv(c, env)
    return any(a.startswith("data.shards_dir=s3://") for a in cmd) or (
        "--artifacts-destination" in cmd and cmd[cmd.index("--artifacts-destination") + 1].startswith("s3://"))


# ------------------------------------------------------------------------------------------------ renders
@pytest.mark.parametrize("overlay", OBJECT_STORE_OVERLAYS)
def test_no_claim_for_data_or_artifacts_and_only_the_run_directory_is_read_write_many(overlay):
    objs = render(overlay)
    claims = {o["metadata"]["name"]: o for o in of_kind(objs, "PersistentVolumeClaim")}
    assert "scha-vae-data" not in claims and "mlflow-artifacts" not in claims
    shared = {n for n, o in claims.items() if "ReadWriteMany" in o["spec"]["accessModes"]}
    assert shared == (set() if overlay == "mlflow-s3" else {"scha-vae-runs"})  # the server mounts no job volume
    mounted = {v["persistentVolumeClaim"]["claimName"] for _, spec, _ in containers(objs)
               for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}
    want = {"mlflow-s3": set(), "prepare-s3": {"scha-vae-raw", "scha-vae-runs"}}.get(overlay, {"scha-vae-runs"})
    assert mounted == want
    if overlay == "prepare-s3":
        assert claims["scha-vae-raw"]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_the_bucket_settings_and_secret_reach_exactly_the_containers_that_use_the_bucket():
    from mlflow.cli import server

    seen = set()
    for overlay in OBJECT_STORE_OVERLAYS + [o.removesuffix("-s3") for o in OBJECT_STORE_OVERLAYS]:
        objs = render(overlay)
        for obj, _, c in containers(objs):
            env = resolve_env(c, objs)
            where = f"k8s/{overlay} {obj['metadata']['name']}/{c['name']}"
            if _uses_bucket(c, env):
                seen.add(overlay)
                assert set(S3_ENV) <= set(env), where
                assert env["AWS_SECRET_ACCESS_KEY"] == USER_SECRETS["object-store"]["AWS_SECRET_ACCESS_KEY"]
                assert {"configMapRef", "secretRef"} == {k for src in c["envFrom"] for k in src}, where
                assert not any(env["AWS_SECRET_ACCESS_KEY"] in a for a in argv(c, env)), where
            else:  # PostgreSQL, and everything of the plain overlays
                assert not set(S3_ENV) & set(env) and "envFrom" not in c, where
    assert seen == set(OBJECT_STORE_OVERLAYS)
    objs = render("mlflow-s3")
    (c,) = one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    cmd = argv(c, resolve_env(c, objs))
    params = server.make_context("server", cmd[cmd.index("server") + 1:]).params
    assert params["artifacts_destination"] == "s3://scha-vae/mlflow-artifacts" and params["serve_artifacts"]


# ------------------------------------------------------------------------------------------------ end to end
def _entry(overlay: str, job: str):
    objs = render(overlay)
    ((_, _, c, env, _, _),) = [i for i in invocations_of(objs) if i[0]["metadata"]["name"] == job]
    return c, env


def _local(cmd: list, mounts: dict) -> list:
    """The argv with the volumes' mount paths replaced by the directories that stand in for them."""
    out = []
    for a in cmd:
        for mount, local in mounts.items():
            a = re.sub(rf"(^|=){re.escape(mount)}(?=/|$)", rf"\g<1>{local}", a)
        out.append(a)
    return out


def _run(cmd: list, env: dict, cwd: Path, what: str, timeout: int = 600) -> subprocess.CompletedProcess:
    if cmd[:2] == ["/usr/bin/tini", "--"]:  # the image's ENTRYPOINT: forwards signals, reaps zombies
        cmd = cmd[2:]
    assert cmd[:2] == ["python", "-m"], cmd
    proc = subprocess.run([sys.executable, *cmd[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_the_overlays_commands_prepare_train_register_and_evaluate_with_data_and_artifacts_in_the_bucket(
        tmp_path, s3_server, omniglot_raw):
    from mlflow import MlflowClient

    fs = s3_server.filesystem()
    if not fs.exists("scha-vae"):
        fs.mkdir("scha-vae")
    data, runs = tmp_path / "data", tmp_path / "runs"
    (data / "raw").mkdir(parents=True)
    (data / "raw" / "omniglot").symlink_to(omniglot_raw)
    runs.mkdir()
    mounts = {"/data": str(data), "/runs": str(runs)}
    store = {"AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
             "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_EC2_METADATA_DISABLED": "true"}
    base_env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
    base_env.update({"PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                     "no_proxy": "127.0.0.1,localhost", "TMPDIR": str(tmp_path),
                     "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})

    def pod_env(env: dict) -> dict:  # `tracking` is the server's URL, known once it is started below
        return {**base_env, **env, **store, "MLFLOW_TRACKING_URI": tracking}

    # the MLflow server of k8s/mlflow-s3 (basic-auth; sqlite for PostgreSQL), its artifacts in the ConfigMap's bucket
    objs = render("mlflow-s3")
    (c,) = one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    args = argv(c, resolve_env(c, objs))
    assert args[args.index("--artifacts-destination") + 1] == "s3://scha-vae/mlflow-artifacts"
    server_proc, tracking, log_path = start_rendered_mlflow_server("mlflow-s3", tmp_path, env=store)
    outputs = []
    try:
        client_user = USER_SECRETS["mlflow-client"]
        admin = USER_SECRETS["mlflow-admin"]
        assert http_status(f"{tracking}/api/2.0/mlflow/users/create", admin["username"], admin["password"],
                           {"username": client_user["MLFLOW_TRACKING_USERNAME"],
                            "password": client_user["MLFLOW_TRACKING_PASSWORD"]}) == 200

        c, env = _entry("prepare-s3", "prepare-omniglot-ns")
        cmd = _local(argv(c, env), mounts)
        assert "data.shards_dir=s3://scha-vae/shards" in cmd
        outputs.append(_run(cmd, pod_env(env), tmp_path, "preparation"))
        manifest = json.loads(fs.cat_file("scha-vae/shards/omniglot_ns/manifest.json"))
        assert manifest["dataset"] == "omniglot_ns" and set(manifest["splits"]) == {"train", "val", "test"}

        c, env = _entry("train-indexed-s3", "train-omniglot-ns-ns")
        env = {**env, "NNODES": "1", "GPUS_PER_NODE": "1"}
        cmd = [re.sub(r"^--rdzv-endpoint=.*", f"--rdzv-endpoint=127.0.0.1:{free_port()}", a)
               for a in _local(argv(c, pod_env(env)), mounts)]
        assert not any(a.startswith("data.raw_dir=") for a in cmd)  # training reads the bucket only
        cmd += ["experiment=smoke", "data.limit_batches=2", "trainer.epochs=1", "trainer.precision=fp32"]
        outputs.append(_run(cmd, pod_env(env), tmp_path, "training"))

        c, env = _entry("evaluate-s3", "evaluate-omniglot-ns-ns-elbo")
        cmd = _local(argv(c, pod_env(env)), mounts) + [
            "experiment=smoke", "eval.batch_sets=4", "eval.max_batches=1", "eval.set_sizes=[5]"]
        outputs.append(_run(cmd, pod_env(env), tmp_path, "evaluation"))

        client = MlflowClient(tracking_uri=tracking)
        os.environ.update({k: v for k, v in client_user.items()})
        try:
            champion = client.get_model_version_by_alias("omniglot_ns_ns", "champion")
            (data_input,) = client.get_run(champion.run_id).inputs.dataset_inputs
        finally:
            for k in client_user:
                os.environ.pop(k, None)
    finally:
        stop_process(server_proc)
    assert json.loads(data_input.dataset.source)["uri"] == "s3://scha-vae/shards/omniglot_ns"
    summary = json.loads((runs / "eval" / "omniglot_ns_ns-elbo" / "eval_elbo.json").read_text())
    assert summary["model_version"] == str(champion.version) and math.isfinite(summary["rows"][0]["vlb"])
    # the model's files are in the artifact bucket, the checkpoints on the run volume, no shard on a volume
    stored = fs.find("scha-vae/mlflow-artifacts")
    assert any(o.endswith("weights.safetensors") for o in stored) and any(o.endswith("MLmodel") for o in stored)
    assert (runs / "omniglot_ns_ns" / "checkpoints" / "latest").is_file()
    assert not list(data.rglob("*.tar")) and not list(runs.rglob("*.tar"))
    for text in [p.stdout + p.stderr for p in outputs] + [log_path.read_text(errors="replace")]:
        assert SECRET_KEY not in text
