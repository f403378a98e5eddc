"""Shared helpers of the Kubernetes tests (tests/test_k8s*.py): rendering with the real `kubectl kustomize`, the pod
templates each object makes (a TrainJob's merged with its TrainingRuntime), the containers' environment and argv
as the kubelet builds them, Hydra composition of their overrides, and copies of k8s/ with edits or the opt-in
components switched on. The checks against the real API definitions live in k8s_api.py, the Pod Security
Standard in k8s_pod_security.py."""
from __future__ import annotations

import base64
import configparser
import copy
import json
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
K8S_VERSION = "1.37.0"  # kubernetes-validate's schema version
NAMESPACE = "scha-vae"
OVERLAYS = ["base", "mlflow", "prepare", "train-indexed", "train-kubeflow", "evaluate"]
# the same with shards and MLflow artifacts in object storage (k8s/components/object-store)
OBJECT_STORE_OVERLAYS = ["mlflow-s3", "prepare-s3", "train-indexed-s3", "evaluate-s3"]
OVERLAYS += OBJECT_STORE_OVERLAYS
# what a namespace user applies (namespaced objects only), and what a cluster admin applies once (the Namespace)
WORKLOAD_OVERLAYS = list(OVERLAYS)
ADMIN_OVERLAYS = ["namespace"]
OVERLAYS += ADMIN_OVERLAYS
# the overlays that list the opt-in components (commented out) in their kustomization.yaml
OPTION_OVERLAYS = ["prepare", "train-indexed", "train-kubeflow", "evaluate"]
ENTRY_MODULES = ("launch.train", "launch.prepare", "launch.evaluate")
TRAINJOB_API = "trainer.kubeflow.org/v1alpha1"
# Secrets the user creates before applying (docs/kubernetes.md, "Secrets"); never rendered, never committed
USER_SECRETS = {
    "mlflow-postgres": {"POSTGRES_PASSWORD": "pg-secret"},
    "mlflow-admin": {"username": "admin", "password": "admin-secret", "flask_secret_key": "flask-secret"},
    "mlflow-client": {"MLFLOW_TRACKING_USERNAME": "scha-vae-jobs", "MLFLOW_TRACKING_PASSWORD": "client-secret"},
    "object-store": {"AWS_ACCESS_KEY_ID": "scha-vae-store", "AWS_SECRET_ACCESS_KEY": "store-secret"},
}
CLUSTER_SCOPED = {"Namespace", "ClusterTrainingRuntime", "ClusterRole", "ClusterRoleBinding",
                  "PersistentVolume", "StorageClass", "CustomResourceDefinition"}


# ----------------------------------------------------------------------------------------------------
# rendering


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is not on PATH: it is needed for `kubectl kustomize` (install kubectl >= 1.27)")
    return path


def kustomize(path: Path) -> List[dict]:
    proc = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.fail(f"`kubectl kustomize {path}` failed (exit {proc.returncode}):\n{proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@lru_cache(maxsize=None)
def _render_cached(overlay: str) -> Tuple[str, ...]:
    return tuple(json.dumps(o) for o in kustomize(K8S / overlay))


def render(overlay: str) -> List[dict]:
    """The overlay's objects (fresh copies: tests may mutate them)."""
    return [json.loads(s) for s in _render_cached(overlay)]


def of_kind(objs: List[dict], kind: str) -> List[dict]:
    return [o for o in objs if o.get("kind") == kind]


def one(objs: List[dict], kind: str, name: Optional[str] = None) -> dict:
    found = [o for o in of_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def find(objs: List[dict], kind: str, name: str) -> Optional[dict]:
    for o in of_kind(objs, kind):
        if o["metadata"]["name"] == name:
            return o
    return None


# ----------------------------------------------------------------------------------------------------
# pods, containers, env


def merge(base, patch):
    """A patch over a base object as Trainer applies runtimePatches and kustomize strategic merges do: maps merge
    key by key, lists of named items (containers, volumes, env) merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i for i in base + patch)):
        out = [copy.deepcopy(i) for i in base]
        for item in patch:
            at = next((n for n, b in enumerate(out) if b["name"] == item["name"]), None)
            if at is None:
                out.append(copy.deepcopy(item))
            else:
                out[at] = merge(out[at], item)
        return out
    return copy.deepcopy(patch)


def runtime_node_pod(rt: dict) -> dict:
    """The pod template (metadata + spec) of a TrainingRuntime's replicated job `node`."""
    (node,) = [rj for rj in rt["spec"]["template"]["spec"]["replicatedJobs"] if rj["name"] == "node"]
    return node["template"]["spec"]["template"]


def trainjob_pod(tj: dict, objs: Optional[List[dict]] = None) -> dict:
    """The pod template a TrainJob's `node` pods get: its runtime's `node` template (when `objs` holds the
    runtime), then the runtimePatches of that replicated job, then spec.trainer's fields on the container `node`
    (image, command, args, resources replace; env merges by name, as Trainer documents)."""
    pod: dict = {"metadata": {}, "spec": {"containers": [{"name": "node"}]}}
    ref = tj["spec"]["runtimeRef"]
    rt = None if objs is None else find(objs, ref.get("kind", "ClusterTrainingRuntime"), ref["name"])
    if rt is not None:
        pod = copy.deepcopy(runtime_node_pod(rt))
    for p in tj["spec"].get("runtimePatches", []):
        for rj in p.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", []):
            if rj["name"] == "node":
                pod = merge(pod, rj.get("template", {}).get("spec", {}).get("template", {}))
    trainer = tj["spec"].get("trainer", {})
    node = next(c for c in pod["spec"]["containers"] if c["name"] == "node")
    for key, field in (("image", "image"), ("command", "command"), ("args", "args"), ("resourcesPerNode", "resources")):
        if key in trainer:
            node[field] = copy.deepcopy(trainer[key])
    if "env" in trainer:
        node["env"] = merge(node.get("env", []), trainer["env"])
    return pod


def trainjob_pod_spec(tj: dict, objs: Optional[List[dict]] = None) -> dict:
    return trainjob_pod(tj, objs)["spec"]


def pod_templates(obj: dict, objs: Optional[List[dict]] = None) -> Iterator[dict]:
    """Every pod template (metadata + spec) an object makes pods from."""
    kind = obj.get("kind")
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        yield obj["spec"]["template"]
    elif kind == "CronJob":
        yield obj["spec"]["jobTemplate"]["spec"]["template"]
    elif kind == "Pod":
        yield {"metadata": obj.get("metadata", {}), "spec": obj["spec"]}
    elif kind == "TrainJob":
        yield trainjob_pod(obj, objs)
    elif kind in ("TrainingRuntime", "ClusterTrainingRuntime"):
        yield runtime_node_pod(obj)


def pod_specs(obj: dict, objs: Optional[List[dict]] = None) -> Iterator[dict]:
    for template in pod_templates(obj, objs):
        yield template["spec"]


def containers(objs: List[dict]) -> Iterator[Tuple[dict, dict, dict]]:
    for obj in objs:
        for spec in pod_specs(obj, objs):
            for c in spec.get("initContainers", []) + spec.get("containers", []):
                yield obj, spec, c


def _secret_data(secret: dict) -> Dict[str, str]:
    out = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    out.update(secret.get("stringData", {}))
    return out


def expand(text: str, env: Dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command/args/env: $$ escapes, unknown references stay as they are."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def resolve_env(container: dict, objs: List[dict]) -> Dict[str, str]:
    """The container's environment as the kubelet builds it; every reference must resolve in `objs`."""
    env: Dict[str, str] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            cm = find(objs, "ConfigMap", src["configMapRef"]["name"])
            assert cm is not None, f"envFrom ConfigMap {src['configMapRef']['name']} is not rendered"
            env.update(cm.get("data", {}))
        if "secretRef" in src:
            name = src["secretRef"]["name"]
            sec = find(objs, "Secret", name)
            assert sec is not None or name in USER_SECRETS, f"envFrom Secret {name} is not rendered"
            env.update(_secret_data(sec) if sec is not None else USER_SECRETS[name])
    for var in container.get("env", []):
        name = var["name"]
        if "value" in var:
            env[name] = expand(var["value"], env)
            continue
        ref = var.get("valueFrom", {})
        if "configMapKeyRef" in ref:
            r = ref["configMapKeyRef"]
            cm = find(objs, "ConfigMap", r["name"])
            assert cm is not None, f"{name}: ConfigMap {r['name']} is not rendered"
            assert r["key"] in cm.get("data", {}), f"{name}: key {r['key']} missing from ConfigMap {r['name']}"
            env[name] = cm["data"][r["key"]]
        elif "secretKeyRef" in ref:
            r = ref["secretKeyRef"]
            sec = find(objs, "Secret", r["name"])
            assert sec is not None or r["name"] in USER_SECRETS, f"{name}: Secret {r['name']} is not rendered"
            data = _secret_data(sec) if sec is not None else USER_SECRETS[r["name"]]
            assert r["key"] in data, f"{name}: key {r['key']} missing from Secret {r['name']}"
            env[name] = data[r["key"]]
        elif "fieldRef" in ref:
            env[name] = {"metadata.name": "pod-0", "metadata.namespace": NAMESPACE}.get(
                ref["fieldRef"]["fieldPath"], "0")
        else:
            env[name] = "1"
    return env


# ----------------------------------------------------------------------------------------------------
# servers


def http_status(url: str, user: str | None = None, password: str | None = None, json_body: dict | None = None) -> int:
    """The HTTP status of a GET (a POST with `json_body`), basic-auth when `user` is given; 0 while nothing listens."""
    data = None if json_body is None else json.dumps(json_body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    if user is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):  # not listening yet
        return 0


def start_rendered_mlflow_server(overlay: str, root: Path, env: Optional[dict] = None,
                                 artifacts: Optional[str] = None) -> Tuple[subprocess.Popen, str, Path]:
    """The MLflow server of `overlay`'s Deployment as its container starts it (its argv and environment, the Secrets'
    stand-ins, the shipped basic_auth.ini), on 127.0.0.1 with sqlite for PostgreSQL and one worker, healthy.
    `env` is added to the container's; `artifacts` replaces --artifacts-destination. Returns (process, URL, log)."""
    from conftest import free_port, start_process, stop_process, wait_http

    objs = render(overlay)
    (c,) = one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    cmd = argv(c, resolve_env(c, objs))
    args = cmd[cmd.index("mlflow"):]
    port = free_port()
    for flag, value in (("--port", str(port)), ("--host", "127.0.0.1"), ("--workers", "1"),
                        ("--artifacts-destination", artifacts)):
        if value is not None:
            args[args.index(flag) + 1] = value
    ini = configparser.ConfigParser()
    ini.read_string((K8S / "mlflow" / "basic_auth.ini").read_text())
    ini["mlflow"]["database_uri"] = f"sqlite:///{root / 'auth.db'}"
    with open(root / "basic_auth.ini", "w") as f:
        ini.write(f)
    server_env = {**resolve_env(c, objs), **(env or {}), "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
                  "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{root / 'mlflow.db'}", "no_proxy": "127.0.0.1,localhost"}
    log_path = root / "mlflow-server.log"
    proc = start_process([str(Path(sys.executable).with_name("mlflow")), *args[1:]], root, log_path, env=server_env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, log_path, timeout=120)
    except BaseException:
        stop_process(proc)
        raise
    return proc, url, log_path


# ----------------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> List[Tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    logical, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continued RUN
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        logical.append(buf)
        buf = ""
    out = []
    for line in logical:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def image_entrypoint() -> List[str]:
    entry = [rest for word, rest in dockerfile_instructions() if word == "ENTRYPOINT"]
    assert entry, "Dockerfile has no ENTRYPOINT"
    return json.loads(entry[-1])


@lru_cache(maxsize=None)
def project_image() -> str:
    comp = yaml.safe_load((K8S / "components" / "image" / "kustomization.yaml").read_text())
    (img,) = [i for i in comp["images"] if i["name"] == "scha-vae"]
    return f"{img.get('newName', img['name'])}:{img['newTag']}"


def argv(container: dict, env: Dict[str, str]) -> List[str]:
    """What the container executes: command (or the project image's ENTRYPOINT) + args, $(VAR)-expanded."""
    if "command" in container:
        head = list(container["command"])
    elif container.get("image") == project_image():
        head = image_entrypoint()
    else:
        head = []
    return [expand(a, env) for a in head + list(container.get("args", []))]


# ----------------------------------------------------------------------------------------------------
# entry points and Hydra


def entry_invocation(args: List[str]) -> Optional[Tuple[List[str], str, List[str]]]:
    """(launcher argv before `-m`, module, Hydra overrides) when argv runs one of our entry points."""
    for i, tok in enumerate(args):
        if tok in ENTRY_MODULES and i > 0 and args[i - 1] in ("-m", "--module"):
            return args[: i - 1], tok, args[i + 1:]
    assert not any(m in a for a in args for m in ENTRY_MODULES), f"entry point run in an unrecognised way: {args}"
    return None


def invocations_of(objs: List[dict]):
    """(object, pod spec, container, env, argv, (launcher, module, overrides)) of each entry-point container."""
    for obj, spec, c in containers(objs):
        env = resolve_env(c, objs)
        cmd = argv(c, env)
        inv = entry_invocation(cmd)
        if inv is not None:
            yield obj, spec, c, env, cmd, inv


def invocations(overlay: str):
    return list(invocations_of(render(overlay)))


def compose(overrides: List[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from launch.app import CONFIG_DIR  # registers the typed schema as base_config
    from trainer.config import load_config

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        raw = hydra_compose(config_name="config", overrides=overrides)
    return load_config(raw)


def torchrun_args(launcher: List[str]):
    """torchrun's own parser on the launcher part of argv (after an optional tini)."""
    from torch.distributed.run import get_args_parser

    args = list(launcher)
    while args and Path(args[0]).name in ("tini", "--"):
        args = args[1:]
    if args[:3] == ["python", "-m", "launch.torchrun"]:  # torchrun with the project's exit codes, same options
        args = ["torchrun", *args[3:]]
    assert args and Path(args[0]).name == "torchrun", f"not a torchrun launch: {launcher}"
    return get_args_parser().parse_args(args[1:] + ["-m", "launch.train"])


def mount_volume(spec: dict, container: dict, path: str) -> Optional[dict]:
    """The volume backing `path` in the container (longest mountPath prefix), or None."""
    best = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best["mountPath"].rstrip("/")):
                best = m
    if best is None:
        return None
    return next(v for v in spec.get("volumes", []) if v["name"] == best["name"])




# ----------------------------------------------------------------------------------------------------
# edited copies of k8s/


def edited_copy(tmp_path: Path, rel: str, edits: List[Tuple[str, str]], tree: Optional[Path] = None) -> Path:
    """A copy of k8s/ (or of `tree`) with text replacements made in one manifest (what a user edits)."""
    if tree is None:
        tree = tmp_path / "k8s"
        shutil.copytree(K8S, tree)
    path = tree / rel
    text = path.read_text()
    for old, new in edits:
        assert text.count(old) == 1, f"{old!r} not found exactly once in {rel}"
        text = text.replace(old, new)
    path.write_text(text)
    return tree


def options_enabled_tree(tmp_path: Path) -> Path:
    """A copy of k8s/ whose overlays have their documented, commented-out option components uncommented."""
    tree = tmp_path / "k8s-options"
    if not tree.exists():
        shutil.copytree(K8S, tree)
        for overlay in OPTION_OVERLAYS:
            kfile = tree / overlay / "kustomization.yaml"
            text, n = re.subn(r"(?m)^  # (- \.\./components/(?:cluster-conventions|nccl-network))", r"  \1",
                              kfile.read_text())
            assert n, f"k8s/{overlay}/kustomization.yaml offers no option components"
            kfile.write_text(text)
    return tree


@lru_cache(maxsize=None)
def _options_cached(overlay: str) -> Tuple[str, ...]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return tuple(json.dumps(o) for o in kustomize(options_enabled_tree(Path(tmp)) / overlay))


def render_with_options(overlay: str) -> List[dict]:
    """The overlay with its option components switched on (fresh copies)."""
    return [json.loads(s) for s in _options_cached(overlay)]
