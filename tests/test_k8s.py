"""The Kubernetes manifests (k8s/) and the Dockerfile: they render, validate, and run this repository.

What is checked, per area:
- rendering: every kustomization under k8s/ renders with `kubectl kustomize` (failures show its stderr);
- built-in objects: kubernetes-validate 1.37 in strict mode (unknown fields are errors); the walk over the real
  API models (every object, Trainer kinds included) is tests/test_k8s_api.py;
- references: every ConfigMap / Secret key, PVC and volume a pod names exists in the same render;
- entry points: every container that runs launch.train / launch.prepare / launch.evaluate has its Hydra
  overrides extracted (after Kubernetes' $(VAR) expansion from the resolved env) and composed against
  configs/ with Hydra's compose API, then validated by trainer.config.load_config; outputs land on volumes;
- behaviour: the Indexed Job's completions == parallelism == NNODES == torchrun --nnodes, GPUs == nproc,
  rendezvous on pod 0 through the headless Service; scaling by one field propagates (kustomize
  replacements); the TrainJob's PET_* contract with torchrun; the MLflow Service / port / allowed hosts
  match every job's tracking.uri; mlflow server's argv parses with mlflow's own CLI; the evaluation jobs
  load the model name the training registers;
- Dockerfile: what it copies exists and is not ignored, it installs through setup.py, configs/ lands where
  launch/app.py looks for it, it runs as the uid the pods expect.
"""
from __future__ import annotations

import fnmatch
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest

from k8s_api import api_errors
from k8s_support import (CLUSTER_SCOPED, ENTRY_MODULES, K8S, K8S_VERSION, NAMESPACE, OBJECT_STORE_OVERLAYS, OVERLAYS, ROOT,
                         argv, compose, containers, dockerfile_instructions, edited_copy, invocations,
                         invocations_of, kustomize, mount_volume, of_kind, one, pod_specs, project_image, render,
                         resolve_env, torchrun_args, trainjob_pod_spec)

# Which entry points each overlay must run (guards against a discovery that finds nothing).
EXPECTED_MODULES = {
    "base": set(),
    "mlflow": set(),
    "prepare": {"launch.prepare"},
    "train-indexed": {"launch.train"},
    "train-kubeflow": {"launch.train"},
    "evaluate": {"launch.evaluate"},
    "mlflow-s3": set(),
    "prepare-s3": {"launch.prepare"},
    "train-indexed-s3": {"launch.train"},
    "evaluate-s3": {"launch.evaluate"},
    "namespace": set(),
}


# ====================================================================================================
# tests: rendering and schema validation


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomization_renders(overlay):
    objs = render(overlay)
    assert objs, f"k8s/{overlay} rendered nothing"
    for o in objs:
        assert o.get("apiVersion") and o.get("kind") and o.get("metadata", {}).get("name"), o
        if o["kind"] not in CLUSTER_SCOPED:
            assert o["metadata"].get("namespace") == NAMESPACE, f"{o['kind']}/{o['metadata']['name']} not in {NAMESPACE}"


def test_every_kustomization_dir_is_tested():
    dirs = {str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml")}
    overlays = {d for d in dirs if not d.startswith("components/")}  # components are tested with the overlays
    assert overlays == set(OVERLAYS), "add new overlays to OVERLAYS (and EXPECTED_MODULES)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_validate_strict(overlay):
    objs = render(overlay)
    builtin = [o for o in objs if not o["apiVersion"].startswith("trainer.kubeflow.org/")]
    assert builtin
    for o in builtin:
        try:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{o['kind']}/{o['metadata']['name']} in k8s/{overlay}: {exc}")


def test_strict_validation_rejects_unknown_fields():
    job = one(render("prepare"), "Job")
    job["spec"]["template"]["spec"]["containers"][0]["commandd"] = ["x"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_trainjob_pod_level_validates_as_pod_template():
    objs = render("train-kubeflow")
    tj = one(objs, "TrainJob")
    template = {"apiVersion": "v1", "kind": "PodTemplate",
                "metadata": {"name": f"{tj['metadata']['name']}-node", "namespace": NAMESPACE},
                "template": {"spec": trainjob_pod_spec(tj, objs)}}
    kubernetes_validate.validate(template, K8S_VERSION, strict=True)


# ====================================================================================================
# tests: references, images


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(overlay):
    objs = render(overlay)
    pvcs = {o["metadata"]["name"] for o in of_kind(objs, "PersistentVolumeClaim")}
    for obj in objs:
        claim_templates = {t["metadata"]["name"] for t in obj.get("spec", {}).get("volumeClaimTemplates", [])}
        for spec in pod_specs(obj):
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for v in volumes.values():
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in pvcs, f"{obj['metadata']['name']}: {v}"
            for c in spec.get("initContainers", []) + spec.get("containers", []):
                resolve_env(c, objs)  # asserts every ConfigMap / Secret (key) exists
                for m in c.get("volumeMounts", []):
                    assert m["name"] in volumes or m["name"] in claim_templates, f"{c['name']}: no volume {m['name']}"
    for cm_user in of_kind(objs, "ConfigMap"):
        assert re.search(r"-[a-z0-9]{10}$", cm_user["metadata"]["name"]), "generated ConfigMaps keep their hash"


def test_shared_volumes_are_read_write_many():
    objs = render("prepare")
    for name in ("scha-vae-data", "scha-vae-runs"):
        assert one(objs, "PersistentVolumeClaim", name)["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned_and_project_image_is_single(overlay):
    objs = render(overlay)
    for obj, _, c in containers(objs):
        image, where = c["image"], f"{obj['metadata']['name']}/{c['name']}"
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: unpinned {image}"
        runs_ours = c.get("command", c.get("args", []))[:1] in (["mlflow"], ["python"], ["torchrun"]) or any(
            m in a for a in c.get("command", []) + c.get("args", []) for m in ENTRY_MODULES)
        if runs_ours or "scha-vae" in image:
            assert image == project_image(), f"{where}: {image} (expected the project image)"


def test_project_image_can_be_retagged_in_one_place(tmp_path):
    """Editing k8s/components/image alone retags every container of every overlay (the TrainJob included)."""
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    comp = tree / "components" / "image" / "kustomization.yaml"
    text = comp.read_text().replace("newName: scha-vae", "newName: registry.example.com/ml/scha-vae")
    comp.write_text(text.replace("newTag: 0.1.0", "newTag: 0.1.1"))
    retagged = "registry.example.com/ml/scha-vae:0.1.1"
    for overlay in OVERLAYS:
        before = [c["image"] for _, _, c in containers(render(overlay))]
        after = [c["image"] for _, _, c in containers(kustomize(tree / overlay))]
        assert after == [retagged if b == project_image() else b for b in before], overlay


# ====================================================================================================
# tests: entry points compose against configs/


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_entry_point_overrides_compose_and_validate(overlay):
    seen = set()
    for obj, spec, c, env, cmd, (launcher, module, overrides) in invocations(overlay):
        where = f"k8s/{overlay} {obj['kind']}/{obj['metadata']['name']}/{c['name']}"
        seen.add(module)
        leftover = [a for a in cmd if "$(" in a]
        assert not leftover, f"{where}: unresolved $(VAR) in {leftover}"
        assert overrides and all("=" in o and not o.startswith("-") for o in overrides), f"{where}: {overrides}"
        # Config-group choices must exist: `optional experiment` in config.yaml would silently skip a
        # misspelled preset and train the defaults.
        for o in overrides:
            key, _, value = o.partition("=")
            group = ROOT / "configs" / key.lstrip("+~")
            if "." not in key and group.is_dir():
                assert (group / f"{value}.yaml").is_file(), f"{where}: no configs/{key}/{value}.yaml"
        try:
            cfg = compose(overrides)
        except Exception as exc:  # a renamed key or a bad value fails here, naming it
            pytest.fail(f"{where}: overrides {overrides} do not compose against configs/: {exc}")
        # Everything the job writes or reads lands on a persistent volume mounted in the container, or in a
        # bucket whose credentials the container has (training and evaluation read no raw files).
        paths = {"run_dir": cfg.run_dir}
        if module == "launch.prepare" or any(o.startswith("data.raw_dir=") for o in overrides):
            paths["data.raw_dir"] = cfg.data.raw_dir
        if cfg.data.shards_dir.startswith("s3://"):
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(env), where
            assert overlay in OBJECT_STORE_OVERLAYS, f"{where}: reads a bucket outside the object-store overlays"
        else:
            paths["data.shards_dir"] = cfg.data.shards_dir
        for key, path in paths.items():
            assert path.startswith("/"), f"{where}: {key}={path} is relative to the image's WORKDIR"
            vol = mount_volume(spec, c, path)
            assert vol is not None and "persistentVolumeClaim" in vol, f"{where}: {key}={path} is not on a PVC"
        if module in ("launch.train", "launch.evaluate"):
            assert cfg.tracking.uri.startswith("http://"), f"{where}: tracking.uri={cfg.tracking.uri!r}"
        if module == "launch.train":
            assert cfg.trainer.resume == "auto", f"{where}: restarts must resume"
        if module == "launch.evaluate":
            assert cfg.model_uri.startswith("models:/"), cfg.model_uri
            assert any(o == f"eval={cfg.eval.job}" for o in overrides)
    assert seen == EXPECTED_MODULES[overlay]


def test_evaluation_loads_the_model_training_registers():
    (*_, (_, _, train_overrides)), = invocations("train-indexed")
    train_cfg = compose(train_overrides)
    registered = train_cfg.tracking.model_name or train_cfg.name
    jobs = set()
    for *_, (_, _, overrides) in invocations("evaluate"):
        cfg = compose(overrides)
        jobs.add(cfg.eval.job)
        name, _, alias = cfg.model_uri[len("models:/"):].partition("@")
        assert name == registered and alias == "champion", cfg.model_uri
        assert cfg.data.name == train_cfg.data.name and cfg.data.image_size == train_cfg.data.image_size
    assert jobs == {"elbo", "marginal"}


def test_both_training_overlays_run_the_same_training():
    (*_, (_, _, indexed)), = invocations("train-indexed")
    (*_, (_, _, trainjob)), = invocations("train-kubeflow")
    assert sorted(indexed) == sorted(trainjob)


# ====================================================================================================
# tests: multi-node topology


def _indexed_job(objs):
    job = one(objs, "Job")
    (obj, spec, c, env, cmd, (launcher, module, _)), = list(invocations_of(objs))
    assert module == "launch.train" and obj is job
    return job, spec, c, env, launcher


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check_indexed_job(objs):
    job, spec, c, env, launcher = _indexed_job(objs)
    name = job["metadata"]["name"]
    js = job["spec"]
    nnodes = int(env["NNODES"])
    assert js["completionMode"] == "Indexed"
    assert js["completions"] == js["parallelism"] == nnodes
    tr = torchrun_args(launcher)
    gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
    assert int(tr.nnodes) == nnodes and int(tr.nproc_per_node) == gpus == int(env["GPUS_PER_NODE"])
    assert tr.module and tr.rdzv_backend == "c10d" and tr.rdzv_id == name
    # Rendezvous on pod 0 of this Job, through its headless Service (pod DNS = <job>-<index>.<subdomain>).
    svc = one(objs, "Service", spec["subdomain"])
    assert svc["spec"].get("clusterIP") == "None" and svc["spec"].get("publishNotReadyAddresses") is True
    pod_labels = {**job["spec"]["template"]["metadata"].get("labels", {}),
                  "batch.kubernetes.io/job-name": name, "job-name": name}  # added by the Job controller
    assert _selects(svc["spec"]["selector"], pod_labels)
    host, port = tr.rdzv_endpoint.rsplit(":", 1)
    sub = spec["subdomain"]
    assert host in {f"{name}-0.{sub}", f"{name}-0.{sub}.{NAMESPACE}.svc",
                    f"{name}-0.{sub}.{NAMESPACE}.svc.cluster.local"}, host
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
    assert int(port) in [p["containerPort"] for p in c.get("ports", [])]
    return job, spec, c, tr


def test_indexed_job_topology_and_failure_handling():
    job, spec, c, tr = check_indexed_job(render("train-indexed"))
    js = job["spec"]
    assert spec["restartPolicy"] == "Never" and js["backoffLimit"] >= 1
    rules = js["podFailurePolicy"]["rules"]
    assert any(r["action"] == "Ignore" and {"type": "DisruptionTarget", "status": "True"} in r.get("onPodConditions", [])
               for r in rules), "preemption / drain must not use up backoffLimit"
    for r in rules:
        if "onExitCodes" in r:
            assert r["onExitCodes"]["containerName"] == c["name"]
    # SIGTERM: torchrun gives workers --shutdown-timeout seconds; the pod must outlive that.
    assert tr.shutdown_timeout is not None
    assert spec["terminationGracePeriodSeconds"] >= tr.shutdown_timeout + 30
    # /dev/shm as memory-backed emptyDir, GPU nodes.
    shm = mount_volume(spec, c, "/dev/shm")
    assert shm is not None and shm["emptyDir"]["medium"] == "Memory"
    assert spec.get("nodeSelector")
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))


def test_indexed_job_scales_from_one_place(tmp_path):
    """Editing spec.parallelism and the GPU limit alone re-wires completions, NNODES and GPUS_PER_NODE."""
    tree = edited_copy(tmp_path, "train-indexed/job.yaml", [
        ("  parallelism: 2 ", "  parallelism: 4 "), ("      nvidia.com/gpu: 8 ", "      nvidia.com/gpu: 2 ")])
    job, _, _, tr = check_indexed_job(kustomize(tree / "train-indexed"))
    assert job["spec"]["completions"] == 4 and tr.nnodes == "4" and tr.nproc_per_node == "2"


def _trainjob_torchrun(tj, launcher, monkeypatch):
    """torchrun as the (torch-distributed-shaped) runtime starts it: PET_* env injected by Trainer's torch plugin."""
    name, trainer = tj["metadata"]["name"], tj["spec"]["trainer"]
    pet = {"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
           "PET_NODE_RANK": "0", "PET_MASTER_ADDR": f"{name}-node-0-0.{name}", "PET_MASTER_PORT": "29500"}  # Trainer's torch plugin: port 29500
    for k, v in pet.items():
        monkeypatch.setenv(k, v)
    tr = torchrun_args(launcher)
    return tr, pet


def test_trainjob_uses_the_runtime_contract(monkeypatch):
    objs = render("train-kubeflow")
    tj = one(objs, "TrainJob")
    s = tj["spec"]
    # the overlay's own TrainingRuntime, shaped like torch-distributed (tests/test_k8s_failure_policy.py)
    assert s["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime", "name": "scha-vae-torch"}
    assert one(objs, "TrainingRuntime", "scha-vae-torch")
    (obj, _, c, env, cmd, (launcher, module, _)), = list(invocations_of(objs))
    assert obj is tj and module == "launch.train"
    tr, pet = _trainjob_torchrun(tj, launcher, monkeypatch)
    gpus = int(s["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"])
    # The command leaves node count, procs, rank and master to the runtime's PET_* variables.
    assert tr.nnodes == pet["PET_NNODES"] and tr.nproc_per_node == pet["PET_NPROC_PER_NODE"]
    assert tr.master_addr == pet["PET_MASTER_ADDR"] and str(tr.master_port) == pet["PET_MASTER_PORT"]
    assert s["trainer"]["numProcPerNode"] == gpus
    # Patches target the runtime's replicated job and container, both named `node`; env of `node` only
    # through spec.trainer.env (the API rejects it in a container patch).
    for patch in s["runtimePatches"]:
        for rj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            assert rj["name"] == "node"
            for cp in rj["template"]["spec"]["template"]["spec"].get("containers", []):
                assert cp["name"] == "node" and "env" not in cp
    pod = trainjob_pod_spec(tj, objs)
    node = next(c for c in pod["containers"] if c["name"] == "node")
    assert mount_volume(pod, node, "/dev/shm")["emptyDir"]["medium"] == "Memory"


def test_trainjob_num_proc_follows_gpus(tmp_path):
    tree = edited_copy(tmp_path, "train-kubeflow/trainjob.yaml", [("nvidia.com/gpu: 8", "nvidia.com/gpu: 4")])
    tj = one(kustomize(tree / "train-kubeflow"), "TrainJob")
    assert tj["spec"]["trainer"]["numProcPerNode"] == 4 and api_errors(tj) == []


# ====================================================================================================
# tests: MLflow


def _mlflow_server(objs):
    dep = one(objs, "Deployment", "mlflow")
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    env = resolve_env(c, objs)
    cmd = argv(c, env)
    i = cmd.index("mlflow")
    assert cmd[i + 1] == "server", cmd
    from mlflow.cli import server

    ctx = server.make_context("server", cmd[i + 2:])
    return dep, spec, c, env, ctx.params


def _port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def test_mlflow_server_args_parse_and_match_postgres():
    objs = render("mlflow")
    _, spec, c, env, params = _mlflow_server(objs)
    assert params["host"] == "0.0.0.0" and params["serve_artifacts"] and str(params["workers"]) == "2"
    # Artifacts on the PVC.
    vol = mount_volume(spec, c, params["artifacts_destination"])
    assert vol is not None and "persistentVolumeClaim" in vol
    # Backend store: the PostgreSQL StatefulSet, reached through its headless Service, same credentials.
    uri = urlsplit(params["backend_store_uri"] or env["MLFLOW_BACKEND_STORE_URI"])
    assert uri.scheme == "postgresql"
    svc_name, _, ns = uri.hostname.partition(".")
    assert ns in ("", NAMESPACE, f"{NAMESPACE}.svc", f"{NAMESPACE}.svc.cluster.local")
    svc = one(objs, "Service", svc_name)
    sts = one(objs, "StatefulSet")
    assert sts["spec"]["serviceName"] == svc_name and svc["spec"]["clusterIP"] == "None"
    assert _selects(svc["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"])
    assert uri.port in [p["port"] for p in svc["spec"]["ports"]]
    (pg,) = sts["spec"]["template"]["spec"]["containers"]
    pg_env = resolve_env(pg, objs)
    assert (uri.username, uri.path.lstrip("/")) == (pg_env["POSTGRES_USER"], pg_env["POSTGRES_DB"])
    assert env["PGPASSWORD"] == pg_env["POSTGRES_PASSWORD"]  # the password: libpq's environment, not the URI
    # Health probes on the server's port.
    for probe in ("readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and _port(c, get["port"]) == params["port"]
    # The image carries a PostgreSQL driver for this URI.
    assert any("psycopg" in rest for word, rest in dockerfile_instructions() if word == "RUN")


@pytest.mark.parametrize("overlay", ["train-indexed", "train-kubeflow", "evaluate"])
def test_jobs_reach_the_mlflow_service(overlay):
    from mlflow.server.security_utils import is_allowed_host_header

    mlflow_objs = render("mlflow")
    _, _, server_c, _, params = _mlflow_server(mlflow_objs)
    allowed = [h.strip() for h in params["allowed_hosts"].split(",")]
    found = 0
    for *_, (_, _, overrides) in invocations(overlay):
        uri = urlsplit(compose(overrides).tracking.uri)
        svc_name, _, ns = uri.hostname.partition(".")
        assert ns in (NAMESPACE, f"{NAMESPACE}.svc", f"{NAMESPACE}.svc.cluster.local"), uri.hostname
        svc = one(mlflow_objs, "Service", svc_name)
        svc_ports = [p for p in svc["spec"]["ports"] if p["port"] == (uri.port or 80)]
        assert svc_ports, f"tracking.uri {uri.geturl()}: Service {svc_name} has no port {uri.port or 80}"
        svc_port = svc_ports[0]
        assert _port(server_c, svc_port["targetPort"]) == params["port"]
        dep = one(mlflow_objs, "Deployment", "mlflow")
        assert _selects(svc["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
        # MLflow's DNS-rebinding guard must accept the Host header the client sends.
        assert is_allowed_host_header(allowed, uri.netloc), f"{uri.netloc} not in --allowed-hosts"
        found += 1
    assert found


# ====================================================================================================
# tests: Dockerfile, docs


def _dockerignored(path: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.strip().startswith("#")]
    ignored = False
    parts = Path(path.rstrip("/")).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatch(p, pat) for p in prefixes):
            ignored = not neg
    return ignored


def test_dockerfile_builds_from_this_repository():
    ins = dockerfile_instructions()
    words = [w for w, _ in ins]
    base = next(rest for w, rest in ins if w == "FROM").split()[0]
    repo, _, tag = base.rpartition(":")
    assert repo and tag and tag != "latest", f"unpinned base image {base}"
    setup_py = (ROOT / "setup.py").read_text()
    py = re.search(r'python_requires="[^"]*?(\d+\.\d+)', setup_py).group(1)
    assert tag.startswith(py), f"base image {base} is not Python {py} (setup.py python_requires)"
    # COPY sources exist and the build context (.dockerignore) keeps them.
    copies = {}
    for w, rest in ins:
        if w == "COPY":
            *srcs, dest = [a for a in rest.split() if not a.startswith("--")]
            for src in srcs:
                assert (ROOT / src).exists(), f"COPY source {src} does not exist"
                assert not _dockerignored(src), f"COPY source {src} is excluded by .dockerignore"
                copies[src.rstrip("/")] = dest.rstrip("/")
    packages = re.search(r"include=\[([^\]]*)\]", setup_py).group(1)
    for pkg in re.findall(r'"(\w+)\*?"', packages):
        assert pkg in copies, f"package {pkg} of setup.py is not copied into the image"
    # configs/ lands where launch/app.py looks: CONFIG_DIR = <parent of launch/>/configs.
    workdir = [rest for w, rest in ins if w == "WORKDIR"][-1]
    dest = lambda d: str(Path(workdir) / d) if not d.startswith("/") else d  # noqa: E731
    assert Path(dest(copies["configs"])) == Path(dest(copies["launch"])).parent / "configs"
    runs = " && ".join(rest for w, rest in ins if w == "RUN")
    assert re.search(r"pip install (\S+ )*(-e )?\.( |$)", runs), "the project is installed from setup.py"
    assert "requirements" not in runs, "dependencies come from setup.py's pins only"
    envs = " ".join(rest for w, rest in ins if w == "ENV")
    assert "OMP_NUM_THREADS=" in envs
    user = [rest for w, rest in ins if w == "USER"][-1].split(":")[0]
    assert user not in ("0", "root") and words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")
    # The pods run as the image's uid.
    for overlay in OVERLAYS:
        for obj in render(overlay):
            for spec in pod_specs(obj):
                if any(c.get("image") == project_image() for c in spec["containers"]):
                    assert str(spec.get("securityContext", {}).get("runAsUser")) == user, obj["metadata"]["name"]


def test_docs_cover_every_overlay():
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    for overlay in OVERLAYS:
        assert f"k8s/{overlay}" in doc, f"docs/kubernetes.md does not describe k8s/{overlay}"
    assert "kubectl apply -k" in doc
