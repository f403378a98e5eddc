"""How the overlays install and keep running, on their `kubectl kustomize` renders (the order `kubectl apply -k`
applies them in):

- one apply: each overlay's objects come after what they need, the TrainingRuntime before the TrainJob that names
  it (Trainer's validating webhook refuses a TrainJob whose runtime does not exist yet);
- namespaced install: no workload overlay renders a Namespace or any other cluster-scoped object; k8s/namespace, the
  one admin step, renders the Namespace with the Restricted Pod Security labels;
- least privilege: every pod runs as a ServiceAccount of its own kind, rendered beside it, and no pod mounts an API
  token; nothing grants the accounts any right (the network half is tests/test_k8s_network_policy.py);
- availability and hygiene: a PodDisruptionBudget for MLflow, two MLflow replicas in k8s/mlflow-s3 with nothing
  tying them to one node, no claim that nothing mounts, every emptyDir bounded, onPodConditions with their status,
  the TrainJob's pods with the Indexed Job's PriorityClass;
- docs/kubernetes.md says what the objects do on these points.

Every overlay is checked as shipped and (where it offers them) with its option components switched on."""
from __future__ import annotations

import re

import pytest

from k8s_support import (ADMIN_OVERLAYS, CLUSTER_SCOPED, K8S, NAMESPACE, OPTION_OVERLAYS, ROOT, WORKLOAD_OVERLAYS,
                         edited_copy, find, kustomize, of_kind, one, pod_templates, render, render_with_options,
                         trainjob_pod)

DOCS = ROOT / "docs" / "kubernetes.md"
POD_KINDS = ("Deployment", "StatefulSet", "Job", "TrainJob")


def _variants(overlay):
    """(label, objects): the overlay as shipped, and with its option components switched on where it has some."""
    out = [(overlay, render(overlay))]
    if overlay.removesuffix("-s3") in OPTION_OVERLAYS:
        out.append((f"{overlay} (options on)", render_with_options(overlay)))
    return out


def _templates(objs):
    """(object name, pod template) of every pod-making object (a TrainJob's: its runtime's template with its patches;
    the runtime's template alone as well)."""
    return [(f"{o['kind']}/{o['metadata']['name']}", t) for o in objs for t in pod_templates(o, objs)]


# ------------------------------------------------------------------------------------------------ 1. one apply
def runtime_order_problems(objs) -> list:
    """What Trainer's webhook would refuse when the objects are applied in this order: a TrainJob whose runtime is
    not rendered, or rendered after it (a ClusterTrainingRuntime is the admin's, outside the overlay)."""
    out = []
    for i, tj in enumerate(objs):
        if tj["kind"] != "TrainJob":
            continue
        ref = tj["spec"]["runtimeRef"]
        if ref.get("kind", "ClusterTrainingRuntime") == "ClusterTrainingRuntime":
            continue
        at = [j for j, o in enumerate(objs) if o["kind"] == ref["kind"] and o["metadata"]["name"] == ref["name"]]
        if not at:
            out.append(f"TrainJob/{tj['metadata']['name']}: its {ref['kind']} {ref['name']} is not rendered")
        elif at[0] > i:
            out.append(f"TrainJob/{tj['metadata']['name']} is applied before its {ref['kind']} {ref['name']}")
    return out


@pytest.mark.parametrize("overlay", WORKLOAD_OVERLAYS)
def test_the_runtime_precedes_the_trainjob_that_names_it(overlay):
    for label, objs in _variants(overlay):
        assert runtime_order_problems(objs) == [], label
    if overlay == "train-kubeflow":
        kinds = [o["kind"] for o in render(overlay)]
        assert kinds[-1] == "TrainJob" and kinds.index("TrainingRuntime") < kinds.index("TrainJob")


def test_without_its_sort_options_the_trainjob_would_come_first(tmp_path):
    """The negative control: kustomize's default order puts TrainJob before TrainingRuntime (alphabetical among the
    kinds it does not know), which is why k8s/train-kubeflow sets sortOptions."""
    text = (K8S / "train-kubeflow" / "kustomization.yaml").read_text()
    block = re.search(r"(?m)^sortOptions:\n(?:  .*\n)+", text).group(0)
    tree = edited_copy(tmp_path, "train-kubeflow/kustomization.yaml", [(block, "")])
    problems = runtime_order_problems(kustomize(tree / "train-kubeflow"))
    assert problems == ["TrainJob/omniglot-ns-ns is applied before its TrainingRuntime scha-vae-torch"]


@pytest.mark.parametrize("overlay", WORKLOAD_OVERLAYS)
def test_pods_come_after_their_service_account_claims_and_config(overlay):
    """What a pod-making object's pods use (ServiceAccount, PersistentVolumeClaims, ConfigMaps) is applied before it,
    so its first pods are not refused or left pending for a missing object."""
    for label, objs in _variants(overlay):
        pos = {(o["kind"], o["metadata"]["name"]): i for i, o in enumerate(objs)}
        for i, obj in enumerate(objs):
            if obj["kind"] not in POD_KINDS:
                continue
            for t in pod_templates(obj, objs):
                spec = t["spec"]
                needs = [("ServiceAccount", spec["serviceAccountName"])]
                needs += [("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
                          for v in spec.get("volumes", []) if "persistentVolumeClaim" in v]
                needs += [("ConfigMap", v["configMap"]["name"]) for v in spec.get("volumes", []) if "configMap" in v]
                for kind, name in needs:
                    assert pos[(kind, name)] < i, f"{label}: {obj['kind']}/{obj['metadata']['name']} before {kind} {name}"


# ------------------------------------------------------------------------------------------------ 2. namespaced install
@pytest.mark.parametrize("overlay", WORKLOAD_OVERLAYS)
def test_no_workload_overlay_renders_a_namespace_or_anything_cluster_scoped(overlay):
    """A user with rights in the namespace alone can apply every workload overlay: all it renders is namespaced."""
    for label, objs in _variants(overlay):
        for o in objs:
            where = f"{label}: {o['kind']}/{o['metadata']['name']}"
            assert o["kind"] not in CLUSTER_SCOPED | {"Namespace", "PriorityClass", "ValidatingWebhookConfiguration",
                                                      "MutatingWebhookConfiguration", "ClusterTrainingRuntime"}, where
            assert o["metadata"].get("namespace") == NAMESPACE, where


def test_the_admin_overlay_creates_the_namespace_with_the_restricted_standard():
    objs = render("namespace")
    assert [o["kind"] for o in objs] == ["Namespace"]
    (ns,) = objs
    assert ns["metadata"]["name"] == NAMESPACE
    labels = ns["metadata"]["labels"]
    for mode in ("enforce", "warn", "audit"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted", mode


# ------------------------------------------------------------------------------------------------ 3. identities
# the ServiceAccount of each kind of pod
ACCOUNTS = {"Job/prepare-omniglot-ns": "scha-vae-prepare", "Job/train-omniglot-ns-ns": "scha-vae-train",
            "TrainJob/omniglot-ns-ns": "scha-vae-train", "TrainingRuntime/scha-vae-torch": "scha-vae-train",
            "Job/evaluate-omniglot-ns-ns-elbo": "scha-vae-evaluate",
            "Job/evaluate-omniglot-ns-ns-marginal": "scha-vae-evaluate",
            "Deployment/mlflow": "scha-vae-mlflow", "StatefulSet/postgres": "scha-vae-postgres"}


@pytest.mark.parametrize("overlay", WORKLOAD_OVERLAYS)
def test_every_pod_runs_as_its_own_kind_of_account_without_an_api_token(overlay):
    for label, objs in _variants(overlay):
        for name, t in _templates(objs):
            spec = t["spec"]
            account = spec.get("serviceAccountName")
            assert account == ACCOUNTS[name], f"{label}: {name} runs as {account!r}"
            assert spec.get("automountServiceAccountToken") is False, f"{label}: {name} mounts an API token"
            sa = find(objs, "ServiceAccount", account)
            assert sa is not None, f"{label}: {name}'s ServiceAccount {account} is not rendered"
            assert sa.get("automountServiceAccountToken") is False, account
            for v in spec.get("volumes", []):  # nor a token by hand
                sources = v.get("projected", {}).get("sources", [])
                assert not any("serviceAccountToken" in s for s in sources), f"{label}: {name} volume {v['name']}"
        for kind in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"):
            assert not of_kind(objs, kind), f"{label}: the accounts need no API rights"


def test_each_kind_of_workload_has_an_account_of_its_own():
    kinds = {"train": {"Job/train-omniglot-ns-ns", "TrainJob/omniglot-ns-ns"}, "prepare": {"Job/prepare-omniglot-ns"},
             "evaluate": {"Job/evaluate-omniglot-ns-ns-elbo", "Job/evaluate-omniglot-ns-ns-marginal"},
             "mlflow": {"Deployment/mlflow"}, "postgres": {"StatefulSet/postgres"}}
    accounts = {kind: {ACCOUNTS[n] for n in names} for kind, names in kinds.items()}
    assert all(len(a) == 1 for a in accounts.values())
    assert len(set.union(*accounts.values())) == len(kinds)  # none shared between kinds
    assert {o["metadata"]["name"] for o in of_kind(render("base"), "ServiceAccount")} == set(ACCOUNTS.values())


# ------------------------------------------------------------------------------------------------ 4. availability
def _mlflow_pdb(objs):
    dep = one(objs, "Deployment", "mlflow")
    (pdb,) = of_kind(objs, "PodDisruptionBudget")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())
    assert not pdb["spec"]["selector"].get("matchExpressions")
    return dep, pdb


def test_mlflow_has_a_disruption_budget():
    dep, pdb = _mlflow_pdb(render("mlflow"))
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"  # a broken server never holds a drain up
    # one server on a ReadWriteOnce volume: never two at once
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"


def test_mlflow_s3_keeps_tracking_up_through_a_drain_and_a_rollout():
    objs = render("mlflow-s3")
    dep, pdb = _mlflow_pdb(objs)
    replicas = dep["spec"]["replicas"]
    assert replicas >= 2 and pdb["spec"]["minAvailable"] < replicas  # a drain may evict one at a time
    strategy = dep["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0
    spec = dep["spec"]["template"]["spec"]
    for v in spec.get("volumes", []):  # nothing that ties the pods to one node
        if "persistentVolumeClaim" in v:
            claim = one(objs, "PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
            assert "ReadWriteOnce" not in claim["spec"]["accessModes"], v
    (spread,) = spec["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["maxSkew"] == 1
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in spread["labelSelector"]["matchLabels"].items())


@pytest.mark.parametrize("overlay", WORKLOAD_OVERLAYS)
def test_no_claim_is_rendered_that_nothing_mounts(overlay):
    for label, objs in _variants(overlay):
        mounted = {v["persistentVolumeClaim"]["claimName"] for _, t in _templates(objs)
                   for v in t["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
        claims = {o["metadata"]["name"] for o in of_kind(objs, "PersistentVolumeClaim")}
        assert claims <= mounted, f"{label}: {sorted(claims - mounted)} rendered but mounted by no pod"


@pytest.mark.parametrize("overlay", WORKLOAD_OVERLAYS)
def test_every_emptydir_is_bounded(overlay):
    for label, objs in _variants(overlay):
        for name, t in _templates(objs):
            for v in t["spec"].get("volumes", []):
                if "emptyDir" in v:
                    assert (v["emptyDir"] or {}).get("sizeLimit"), f"{label}: {name} emptyDir {v['name']} unbounded"


def _failure_policies(objs):
    for o in objs:
        if o["kind"] == "Job" and "podFailurePolicy" in o["spec"]:
            yield f"Job/{o['metadata']['name']}", o["spec"]["podFailurePolicy"]
        if o["kind"] in ("TrainingRuntime", "ClusterTrainingRuntime"):
            for rj in o["spec"]["template"]["spec"]["replicatedJobs"]:
                if "podFailurePolicy" in rj["template"]["spec"]:
                    yield f"{o['kind']}/{o['metadata']['name']}/{rj['name']}", rj["template"]["spec"]["podFailurePolicy"]


@pytest.mark.parametrize("overlay", WORKLOAD_OVERLAYS)
def test_pod_condition_rules_carry_their_status(overlay):
    """Kubernetes <= 1.34's schema (and Trainer 2.1's) require onPodConditions[].status."""
    for label, objs in _variants(overlay):
        for name, policy in _failure_policies(objs):
            for rule in policy["rules"]:
                for cond in rule.get("onPodConditions", []):
                    assert cond.get("status") == "True", f"{label}: {name} {cond}"


def test_the_trainjob_pods_get_the_indexed_jobs_priority_class():
    tj_objs, job_objs = render_with_options("train-kubeflow"), render_with_options("train-indexed")
    job = one(job_objs, "Job", "train-omniglot-ns-ns")
    priority = job["spec"]["template"]["spec"]["priorityClassName"]
    assert priority and trainjob_pod(one(tj_objs, "TrainJob"), tj_objs)["spec"].get("priorityClassName") == priority
    plain = render("train-kubeflow")  # opt-in, as for the Job
    assert "priorityClassName" not in trainjob_pod(one(plain, "TrainJob"), plain)["spec"]
    assert "priorityClassName" not in one(render("train-indexed"), "Job")["spec"]["template"]["spec"]


# ------------------------------------------------------------------------------------------------ the docs
def test_the_docs_say_who_applies_what_in_which_order():
    text = DOCS.read_text()
    steps = re.findall(r"(?m)^kubectl apply -k (k8s/[\w-]+)", text)
    assert steps and steps[0] == "k8s/namespace", "the admin step comes first in the quick start"
    section = text.split("## Who applies what", 1)[1].split("\n## ", 1)[0]
    assert "kubectl apply -k k8s/namespace" in section and "cluster" in section
    for word in ("ServiceAccount", "NetworkPolicy", "PodDisruptionBudget", "TrainingRuntime"):
        assert word in section, word
    assert "kubectl create namespace" not in text  # the Namespace comes with its labels, from k8s/namespace


def test_the_docs_state_what_the_objects_do():
    text = DOCS.read_text()
    job = one(render("train-indexed"), "Job")
    (fail,) = [r for r in job["spec"]["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    codes = fail["onExitCodes"]["values"]
    indexed = text.split("## `k8s/train-indexed`", 1)[1].split("\n## ", 1)[0]
    assert f"exit codes {', '.join(map(str, codes))}" in " ".join(indexed.split()), codes
    (pg,) = one(render("mlflow"), "StatefulSet", "postgres")["spec"]["template"]["spec"]["containers"]
    assert f"(`{pg['image']}`)" in text
    # Trainer v2.2's ContainerPatch has securityContext (kubeflow-trainer-api 2.2.0); its pod patch lacks
    # terminationGracePeriodSeconds, which this overlay sets in the runtime
    assert "no `securityContext` in a container patch" not in text
    replicas = one(render("mlflow-s3"), "Deployment", "mlflow")["spec"]["replicas"]
    assert f"{replicas} replicas" in text and "PodDisruptionBudget" in text
    policy = (K8S / "components" / "object-store" / "networkpolicy.yaml").relative_to(ROOT)
    assert str(policy) in text  # where the object-store egress is set


def test_the_documented_loader_pod_is_admitted_by_the_namespace():
    """The helper pod the docs show for filling the raw folder meets the Restricted standard the namespace enforces,
    mounts no API token, and mounts the claim the preparation Job reads."""
    import json
    import shlex

    from test_k8s_pod_security import violations

    (line,) = [m for m in re.findall(r"`(kubectl -n scha-vae run loader [^`]+)`", DOCS.read_text())]
    (overrides,) = [a.split("=", 1)[1] for a in shlex.split(line) if a.startswith("--overrides=")]
    spec = json.loads(overrides)["spec"]
    assert violations(spec) == [] and spec["automountServiceAccountToken"] is False
    (vol,) = spec["volumes"]
    (prepare,) = pod_templates(one(render("prepare"), "Job"))
    assert vol["persistentVolumeClaim"]["claimName"] in {
        v["persistentVolumeClaim"]["claimName"] for v in prepare["spec"]["volumes"] if "persistentVolumeClaim" in v}
