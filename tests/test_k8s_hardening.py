"""A hardened MLflow deployment and the platform options of the overlays, checked on real `kubectl kustomize`
renders: MLflow asks for a password (its basic-auth app, also started for real here), NetworkPolicies admit only
the project's pods, no credential is committed or on a command line, PostgreSQL runs non-root without
capabilities, and the opt-in components add activeDeadlineSeconds, a PriorityClass, the Kueue queue label and
the NCCL network settings."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import stop_process

from k8s_support import (K8S, NAMESPACE, OVERLAYS, USER_SECRETS, argv, containers, http_status, kustomize, of_kind, one,
                         pod_specs, pod_templates, render, resolve_env, start_rendered_mlflow_server)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "kubernetes.md"
PROJECT_PODS = ("train-indexed", "train-kubeflow", "evaluate")


def _mlflow(objs):
    dep = one(objs, "Deployment", "mlflow")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return dep, c, resolve_env(c, objs)


def _endpoint(template: dict, ip: str) -> "Endpoint":
    """A pod of this namespace made from `template`, as tests/k8s_network.py models it."""
    from k8s_network import Endpoint

    ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])
             if "name" in p}
    return Endpoint(ip, ip, NAMESPACE, template["metadata"].get("labels", {}), ports)


# ------------------------------------------------------------------------------------------------ credentials
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_credentials_committed_or_on_a_command_line(overlay):
    objs = render(overlay)
    assert not of_kind(objs, "Secret"), "Secrets are created on the cluster (docs/kubernetes.md), never rendered"
    secret_values = {v for keys in USER_SECRETS.values() for v in keys.values() if "secret" in v}
    for obj, _, c in containers(objs):
        env = resolve_env(c, objs)  # secretKeyRefs resolve to USER_SECRETS' stand-in values
        cmd = " ".join(argv(c, env))
        assert not any(v in cmd for v in secret_values), f"{obj['metadata']['name']}/{c['name']}: secret in argv"
        assert not re.search(r"[a-z]+://[^/\s:@]+:[^/\s@]+@", cmd), f"{c['name']}: credentials in a URI: {cmd}"
        for var in c.get("env", []):
            assert "value" not in var or not any(v in var["value"] for v in secret_values), var
    for path in K8S.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"(?im)^\s*kind:\s*Secret\s*$|secretGenerator", text), path
            assert not re.search(r"(?i)password\s*[=:]\s*[\w.~-]{6,}", text.replace("POSTGRES_PASSWORD", "")), path


def test_docs_say_how_to_create_every_secret():
    docs = DOCS.read_text()
    for name, keys in USER_SECRETS.items():
        cmd = re.search(rf"kubectl -n {NAMESPACE} create secret generic {name}((?: \\\n\s+)?[^\n]*)+?\n(?!\s)", docs)
        assert cmd, f"docs/kubernetes.md: no `kubectl -n {NAMESPACE} create secret generic {name}`"
        for key in keys:
            assert f"--from-literal={key}=" in cmd.group(0), (name, key)


def test_jobs_that_track_get_mlflow_client_credentials():
    for overlay in PROJECT_PODS:
        objs = render(overlay)
        jobs = [o for o in objs if o["kind"] in ("Job", "TrainJob")]
        assert jobs
        for obj in jobs:
            for spec in pod_specs(obj):
                env = {v["name"]: v for v in spec["containers"][0].get("env", [])}
                for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                    assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-client", "key": key}, obj


# ------------------------------------------------------------------------------------------------ MLflow server
def test_mlflow_server_runs_basic_auth_with_its_config_mounted(tmp_path, monkeypatch):
    from mlflow.cli import server
    from mlflow.server.auth.config import read_auth_config

    objs = render("mlflow")
    dep, c, env = _mlflow(objs)
    cmd = argv(c, env)
    params = server.make_context("server", cmd[cmd.index("server") + 1:]).params
    assert params["app_name"] == "basic-auth"
    # the ini reaches the server at MLFLOW_AUTH_CONFIG_PATH and parses as MLflow parses it
    cfg_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(cfg_path.parent)]
    vol = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    cm = one(objs, "ConfigMap", vol["configMap"]["name"])
    (tmp_path / cfg_path.name).write_text(cm["data"][cfg_path.name])
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(tmp_path / cfg_path.name))
    for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.setenv(var, env[var])
    auth = read_auth_config()
    assert (auth.admin_username, auth.admin_password) == ("admin", "admin-secret")  # from Secret mlflow-admin
    assert auth.default_permission == "READ"
    # users persist in the PostgreSQL of the overlay, with the password from libpq's environment
    db = urlsplit(auth.database_uri)
    assert db.scheme == "postgresql" and db.password is None and db.hostname.split(".")[0] == "postgres"
    assert urlsplit(env["MLFLOW_BACKEND_STORE_URI"]).netloc == db.netloc and env["PGPASSWORD"] == "pg-secret"


def test_basic_auth_server_refuses_requests_without_the_password(tmp_path):
    """The server as the manifest starts it (its args and the shipped basic_auth.ini; sqlite for the database)."""
    proc, base, _ = start_rendered_mlflow_server("mlflow", tmp_path, artifacts=str(tmp_path / "artifacts"))
    try:
        api = base + "/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_status(api) == 401
        assert http_status(api, "admin", "wrong") == 401
        assert http_status(api, "admin", "admin-secret") == 200
        # the jobs' user, created as docs/kubernetes.md says, then logged in with the Secret mlflow-client's values
        client = USER_SECRETS["mlflow-client"]
        user, password = client["MLFLOW_TRACKING_USERNAME"], client["MLFLOW_TRACKING_PASSWORD"]
        assert http_status(api, user, password) == 401
        assert http_status(base + "/api/2.0/mlflow/users/create", "admin", "admin-secret",
                           {"username": user, "password": password}) == 200
        assert http_status(api, user, password) == 200
    finally:
        stop_process(proc)


# ------------------------------------------------------------------------------------------------ network, pods
def test_network_policies_admit_only_the_project_pods():
    """MLflow is reached by the training and evaluation pods and the labelled UI pods only, PostgreSQL by MLflow
    only, on their named ports (the whole matrix of flows: tests/test_k8s_network_policy.py)."""
    from k8s_network import allowed

    mlflow_objs = render("mlflow")
    policies = of_kind(mlflow_objs, "NetworkPolicy")
    dep, sts = one(mlflow_objs, "Deployment", "mlflow"), one(mlflow_objs, "StatefulSet", "postgres")
    mlflow, pg = _endpoint(dep["spec"]["template"], "10.244.0.2"), _endpoint(sts["spec"]["template"], "10.244.0.3")
    assert (mlflow.ports["http"], pg.ports["postgres"]) == (5000, 5432)
    for overlay in PROJECT_PODS:
        objs = render(overlay)
        for obj in objs:
            if obj["kind"] in ("Job", "TrainJob"):
                (template,) = pod_templates(obj, objs)
                job = _endpoint(template, "10.244.0.9")
                assert allowed(policies, job, mlflow, 5000), f"{overlay}: {obj['metadata']['name']} cannot reach MLflow"
                assert not allowed(policies, job, pg, 5432), f"{overlay}: {obj['metadata']['name']} reaches Postgres"
    (prepare,) = pod_templates(one(render("prepare"), "Job"))
    assert not allowed(policies, _endpoint(prepare, "10.244.0.8"), mlflow, 5000), "preparation does not talk to MLflow"
    ui = _endpoint({"metadata": {"labels": {"scha-vae.io/mlflow-ui-access": "true"}}, "spec": {"containers": []}},
                   "10.244.0.7")
    other = _endpoint({"metadata": {"labels": {"app": "something-else"}}, "spec": {"containers": []}}, "10.244.0.6")
    assert allowed(policies, ui, mlflow, 5000) and not allowed(policies, other, mlflow, 5000)
    assert allowed(policies, mlflow, pg, 5432) and not allowed(policies, ui, pg, 5432)
    assert not allowed(policies, mlflow, pg, 5433) and not allowed(policies, pg, mlflow, 5000)


def test_postgres_runs_non_root_without_capabilities():
    sts = one(render("mlflow"), "StatefulSet", "postgres")
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"] and not c.get("envFrom")
    if sc.get("readOnlyRootFilesystem"):  # then every path postgres writes is a volume
        mounted = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/var/lib/postgresql/data", "/var/run/postgresql", "/tmp"} <= mounted


# ------------------------------------------------------------------------------------------------ platform options
def _with_options_enabled(tmp_path: Path, overlay: str) -> list:
    """The overlay with its documented, commented-out option components uncommented (as docs/kubernetes.md says)."""
    tree = tmp_path / "k8s"
    if not tree.exists():
        shutil.copytree(K8S, tree)
    kfile = tree / overlay / "kustomization.yaml"
    text, n = re.subn(r"(?m)^  # (- \.\./components/(?:cluster-conventions|nccl-network))", r"  \1", kfile.read_text())
    assert n, f"k8s/{overlay}/kustomization.yaml offers no option components"
    kfile.write_text(text)
    return kustomize(tree / overlay)


@pytest.mark.parametrize("overlay", ["prepare", "train-indexed", "evaluate"])
def test_cluster_conventions_on_jobs(tmp_path, overlay):
    import kubernetes_validate

    from k8s_api import api_errors

    jobs = of_kind(_with_options_enabled(tmp_path, overlay), "Job")
    assert jobs and not any("activeDeadlineSeconds" in j["spec"] for j in of_kind(render(overlay), "Job"))
    for job in jobs:
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "scha-vae"
        assert job["spec"]["activeDeadlineSeconds"] >= (7 * 86400 if overlay.startswith("train") else 3600)
        assert job["spec"]["template"]["spec"]["priorityClassName"].startswith("scha-vae-")
        kubernetes_validate.validate(job, "1.37.0", strict=True)
        assert api_errors(job) == []
        env = {v["name"]: v.get("value") for v in job["spec"]["template"]["spec"]["containers"][0].get("env", [])}
        if overlay == "train-indexed":
            assert env["NCCL_SOCKET_IFNAME"] and env["NCCL_IB_HCA"] and env["NCCL_IB_DISABLE"] == "0"
        else:
            assert "NCCL_SOCKET_IFNAME" not in env


def test_cluster_conventions_on_the_trainjob(tmp_path):
    from k8s_api import api_errors

    (tj,) = of_kind(_with_options_enabled(tmp_path, "train-kubeflow"), "TrainJob")
    labels = tj["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "scha-vae" and labels["kueue.x-k8s.io/priority-class"]
    env = {v["name"]: v.get("value") for v in tj["spec"]["trainer"]["env"]}
    assert env["NCCL_SOCKET_IFNAME"] and env["NCCL_IB_HCA"]
    # Trainer v2.3's TrainJob has activeDeadlineSeconds: the same deadline as the Indexed Job
    (job,) = of_kind(_with_options_enabled(tmp_path, "train-indexed"), "Job")
    assert tj["spec"]["activeDeadlineSeconds"] == job["spec"]["activeDeadlineSeconds"] >= 7 * 86400
    assert "activeDeadlineSeconds" not in one(render("train-kubeflow"), "TrainJob")["spec"]  # opt-in only
    assert api_errors(tj) == []


def test_every_option_the_docs_name_exists_and_changes_the_render(tmp_path):
    """What docs/kubernetes.md says the option components do is what enabling them (uncommenting them, as the docs
    say) does to the rendered manifests."""
    docs = DOCS.read_text()
    named = set(re.findall(r"components/([a-z][a-z-]+)", docs))
    assert {"cluster-conventions", "nccl-network"} <= named
    for component in named:
        assert (K8S / "components" / component / "kustomization.yaml").is_file(), component
    enabled = json.dumps(_with_options_enabled(tmp_path, "train-indexed"))
    plain = json.dumps(render("train-indexed"))
    for field in ("activeDeadlineSeconds", "priorityClassName", "kueue.x-k8s.io/queue-name", "NCCL_SOCKET_IFNAME",
                  "NCCL_IB_HCA"):
        assert field in docs and field in enabled and field not in plain, field
