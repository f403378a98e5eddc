"""The NetworkPolicies of k8s/ (k8s/base/networkpolicy.yaml, k8s/components/object-store/networkpolicy.yaml) against
the pods the overlays render, through a small model of NetworkPolicy (tests/k8s_network.py): every pod of the plain
overlays applied together, and of the -s3 overlays, gets exactly the connections it needs and nothing else, probed
on a set of ports against every other pod and a few endpoints outside it (the cluster DNS and another kube-system
pod, the object store, an internet host, a private address, a pod of another namespace that copies the training
pods' labels, an unrelated pod of this namespace, a UI proxy labelled for MLflow). The ports are the pods' own: the
Indexed Job's rendezvous port from its torchrun arguments, the TrainJob's master port (Trainer's torch plugin), the
collective range from the training pods' net.ipv4.ip_local_port_range, the object store's from object-store.env."""
from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest

from k8s_network import Endpoint, allowed, flows, pairs, policy_types, selects
from k8s_support import (K8S, NAMESPACE, WORKLOAD_OVERLAYS, invocations_of, of_kind, one, pod_templates, render,
                         torchrun_args)

PLAIN = ["mlflow", "prepare", "train-indexed", "train-kubeflow", "evaluate"]
S3 = ["mlflow-s3", "prepare-s3", "train-indexed-s3", "evaluate-s3"]
TRAINJOB_MASTER_PORT = 29500  # PET_MASTER_PORT, set by Trainer's torch plugin (tests/test_k8s.py)
# what each rendered pod is (the roles of the expected flows below)
ROLE = {"Job/train-omniglot-ns-ns": "train", "TrainJob/omniglot-ns-ns": "train", "Job/prepare-omniglot-ns": "prepare",
        "Job/evaluate-omniglot-ns-ns-elbo": "evaluate", "Job/evaluate-omniglot-ns-ns-marginal": "evaluate",
        "Deployment/mlflow": "mlflow", "StatefulSet/postgres": "postgres"}


def _store_endpoint() -> Endpoint:
    """The object store as object-store.env's AWS_ENDPOINT_URL names it (a Service <name>.<namespace>.svc here)."""
    env = dict(re.findall(r"(?m)^([A-Z_]+)=(\S+)$", (K8S / "components" / "object-store" / "object-store.env").read_text()))
    url = urlsplit(env["AWS_ENDPOINT_URL"])
    name, namespace, svc = url.hostname.split(".")[:3]
    assert svc == "svc", f"the default store is a Service of this cluster: {url.hostname}"
    return Endpoint("store", "10.244.50.5", namespace, {"app": name}, {"api": url.port})


STORE = _store_endpoint()
OUTSIDE = [
    Endpoint("kube-dns", "10.244.90.10", "kube-system", {"k8s-app": "kube-dns"}),
    Endpoint("kube-system-other", "10.244.90.11", "kube-system", {"k8s-app": "metrics-server"}),
    STORE,
    Endpoint("internet", "140.82.121.4"),  # github.com, where the official Omniglot zips are
    Endpoint("private-host", "10.0.5.5"),  # a database, the API server's address: inside the private ranges
    Endpoint("ui-proxy", "10.244.70.1", NAMESPACE, {"scha-vae.io/mlflow-ui-access": "true"}),
    Endpoint("unrelated", "10.244.70.2", NAMESPACE, {"app": "toolbox"}),
    # another namespace's pod with the training pods' labels: a podSelector alone never names it
    Endpoint("impostor", "10.244.80.1", "other",
             {"app.kubernetes.io/part-of": "scha-vae", "app.kubernetes.io/component": "train"}),
]
PROBES = sorted({("TCP", p) for p in (22, 53, 80, 443, 2379, 5000, 5432, 6443, 8080, 9000, 9001, 10250, 29399, 29400,
                                      29401, 29500, 29501, 32767, 32768, 45000, 60999, 61000, STORE.ports["api"])}
                | {("UDP", p) for p in (53, 5000, 29400, 45000)})


def _deployment(overlays):
    """The objects of the overlays applied together (identical objects once), and their NetworkPolicies."""
    objs, seen = [], {}
    for overlay in overlays:
        for o in render(overlay):
            key = (o["kind"], o["metadata"]["name"])
            if key in seen:
                assert seen[key] == o, f"{key} differs between overlays"
                continue
            seen[key] = o
            objs.append(o)
    return objs, of_kind(objs, "NetworkPolicy")


def _count(obj) -> int:
    """How many pods the object runs at once (two of a multi-node run are enough: pod 0 and another)."""
    spec = obj["spec"]
    n = {"Job": spec.get("parallelism", 1), "TrainJob": spec.get("trainer", {}).get("numNodes", 1),
         "Deployment": spec.get("replicas", 1), "StatefulSet": spec.get("replicas", 1)}[obj["kind"]]
    return min(n, 2)


def _role(name: str):
    return ROLE.get(name.split("#")[0])


def _pods(objs):
    """An endpoint per pod (<kind>/<name>#<i> where the object runs several), with its labels and named ports."""
    pods = []
    for obj in objs:
        if obj["kind"] in ("TrainingRuntime", "ClusterTrainingRuntime"):
            continue
        for template in pod_templates(obj, objs):
            name, count = f"{obj['kind']}/{obj['metadata']['name']}", _count(obj)
            ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])
                     if "name" in p}
            for i in range(count):
                pods.append(Endpoint(name if count == 1 else f"{name}#{i}", f"10.244.1.{len(pods) + 1}", NAMESPACE,
                                     template["metadata"].get("labels", {}), ports))
    assert {p.name.split("#")[0] for p in pods} <= set(ROLE), "a new pod: give it a role and its flows here"
    return pods


def _training_ports(objs):
    """The ports training pods listen on: rendezvous (their own commands') and the collective range (their sysctl)."""
    ports = {TRAINJOB_MASTER_PORT}
    for obj, *_, (launcher, module, _) in invocations_of(objs):
        if obj["kind"] == "Job" and module == "launch.train":
            ports.add(int(torchrun_args(launcher).rdzv_endpoint.rsplit(":", 1)[1]))
    ranges = set()
    for obj in objs:
        if obj["kind"] in ("Job", "TrainJob") and ROLE.get(f"{obj['kind']}/{obj['metadata']['name']}") == "train":
            (template,) = pod_templates(obj, objs)
            sysctls = {s["name"]: s["value"] for s in template["spec"]["securityContext"].get("sysctls", [])}
            low, high = map(int, sysctls["net.ipv4.ip_local_port_range"].split())
            ranges.add((low, high))
    (collective,) = ranges  # every training pod pins the same range
    return ports, collective


def _expected(pods, objs, with_store: bool):
    """The connections each kind of pod needs, as (source role, destination role) -> [(protocol, low, high)]."""
    rdzv, (low, high) = _training_ports(objs)
    training = [("TCP", p, p) for p in sorted(rdzv)] + [("TCP", low, high)]
    need = {("train", "train"): training,
            ("train", "mlflow"): [("TCP", 5000, 5000)], ("evaluate", "mlflow"): [("TCP", 5000, 5000)],
            ("ui", "mlflow"): [("TCP", 5000, 5000)],
            ("mlflow", "postgres"): [("TCP", 5432, 5432)],
            ("prepare", "internet"): [("TCP", 443, 443)]}
    for role in ("prepare", "train", "evaluate", "mlflow", "ui"):
        need[(role, "dns")] = [("UDP", 53, 53), ("TCP", 53, 53)]
    if with_store:
        for role in ("prepare", "train", "evaluate", "mlflow"):
            need[(role, "store")] = [("TCP", STORE.ports["api"], STORE.ports["api"])]
    roles = {"kube-dns": "dns", "store": "store", "internet": "internet", "ui-proxy": "ui"}
    role = lambda e: roles.get(e.name) or _role(e.name)  # noqa: E731
    return {(s.name, d.name, proto, port) for s, d in pairs(pods + OUTSIDE, NAMESPACE) for proto, port in PROBES
            for (p, lo, hi) in need.get((role(s), role(d)), []) if p == proto and lo <= port <= hi}


@pytest.mark.parametrize("overlays", [PLAIN, S3], ids=["plain", "s3"])
def test_every_pod_has_exactly_the_connections_it_needs(overlays):
    objs, policies = _deployment(overlays)
    pods = _pods(objs)
    assert {_role(p.name) for p in pods} == {"train", "prepare", "evaluate", "mlflow", "postgres"}
    assert sum(_role(p.name) == "train" for p in pods) >= 2  # pods of one run talk to each other
    got = flows(policies, pods + OUTSIDE, PROBES, NAMESPACE)
    want = _expected(pods, objs, with_store=overlays is S3)
    assert not got - want, f"allowed but not needed: {sorted(got - want)[:20]}"
    assert not want - got, f"needed but refused: {sorted(want - got)[:20]}"


def test_the_pods_that_need_no_one_are_reached_by_no_one():
    """The examples the issue names, spelled out: a training pod is not reachable from an unrelated pod (or from a
    pod of another namespace wearing its labels), MLflow cannot reach arbitrary pods, PostgreSQL opens nothing."""
    objs, policies = _deployment(PLAIN)
    pods = {p.name: p for p in _pods(objs)}
    by_name = {e.name: e for e in OUTSIDE}
    train, mlflow, pg = pods["Job/train-omniglot-ns-ns#1"], pods["Deployment/mlflow"], pods["StatefulSet/postgres"]
    for src in (by_name["unrelated"], by_name["impostor"], by_name["ui-proxy"], mlflow, pods["Job/prepare-omniglot-ns"]):
        assert not any(allowed(policies, src, train, port, proto) for proto, port in PROBES), src.name
    for dst in [*pods.values(), by_name["unrelated"], by_name["internet"], by_name["store"]]:
        if dst is not pg and dst is not mlflow:
            assert not any(allowed(policies, mlflow, dst, port, proto) for proto, port in PROBES), dst.name
    for dst in [*pods.values(), *OUTSIDE]:
        if dst is not pg:
            assert not any(allowed(policies, pg, dst, port, proto) for proto, port in PROBES), dst.name
    assert allowed(policies, mlflow, pg, 5432) and not allowed(policies, train, pg, 5432)


@pytest.mark.parametrize("overlay", [o for o in WORKLOAD_OVERLAYS])
def test_every_overlay_brings_the_default_deny_with_it(overlay):
    """Applied alone, an overlay's pods are still under default-deny in both directions (and under the same policies
    as every other overlay's: one set, k8s/base/networkpolicy.yaml)."""
    objs = render(overlay)
    policies = {p["metadata"]["name"]: p for p in of_kind(objs, "NetworkPolicy")}
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and sorted(deny["policyTypes"]) == ["Egress", "Ingress"]
    assert "ingress" not in deny and "egress" not in deny
    base = {p["metadata"]["name"]: p for p in of_kind(render("base"), "NetworkPolicy")}
    assert {k: v for k, v in policies.items() if k != "object-store"} == base
    assert ("object-store" in policies) == overlay.endswith("-s3")
    for p in policies.values():
        assert p["metadata"]["namespace"] == NAMESPACE and policy_types(p) == p["spec"]["policyTypes"]


def test_the_object_store_egress_is_one_rule_naming_the_configured_endpoint():
    """k8s/components/object-store/networkpolicy.yaml holds the one egress rule to the store: its peer and port are
    those of AWS_ENDPOINT_URL (object-store.env), and nothing else is open through it."""
    pol = one(render("mlflow-s3"), "NetworkPolicy", "object-store")
    (rule,) = pol["spec"]["egress"]
    (peer,) = rule["to"]
    assert peer == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": STORE.namespace}}}
    assert rule["ports"] == [{"port": STORE.ports["api"], "protocol": "TCP"}]
    users = [o for o in render("prepare-s3") + render("mlflow-s3") if o["kind"] in ("Job", "Deployment")]
    for o in users:
        assert selects(pol["spec"]["podSelector"], o["spec"]["template"]["metadata"]["labels"]), o["metadata"]["name"]


def test_the_model_is_not_vacuous():
    """Negative controls: without default-deny an unrelated pod reaches a training pod; a named port resolves on the
    destination only; an ipBlock's except list holds; a policy without policyTypes isolates ingress only."""
    objs, policies = _deployment(PLAIN)
    pods = {p.name: p for p in _pods(objs)}
    train, mlflow = pods["Job/train-omniglot-ns-ns#0"], pods["Deployment/mlflow"]
    unrelated = next(e for e in OUTSIDE if e.name == "unrelated")
    others = [p for p in policies if p["metadata"]["name"] not in ("default-deny", "training")]
    assert allowed(others, unrelated, train, 29400)  # nothing selects the training pod any more
    assert not allowed(policies, unrelated, train, 29400)
    assert allowed(policies, train, mlflow, 5000) and not allowed(policies, train, mlflow, 5001)
    named = dict(mlflow.ports)
    mlflow.ports = {}
    assert not allowed(policies, train, mlflow, 5000)  # `port: http` names nothing on a pod without that port
    mlflow.ports = named
    prepare = pods["Job/prepare-omniglot-ns"]
    assert allowed(policies, prepare, Endpoint("x", "93.184.216.34"), 443)
    assert not allowed(policies, prepare, Endpoint("x", "192.168.3.4"), 443)
    ingress_only = {"metadata": {"name": "x", "namespace": NAMESPACE}, "spec": {"podSelector": {}, "ingress": []}}
    assert policy_types(ingress_only) == ["Ingress"]
    assert allowed([ingress_only], train, Endpoint("x", "93.184.216.34"), 443)
    assert not allowed([ingress_only], unrelated, train, 29400)
