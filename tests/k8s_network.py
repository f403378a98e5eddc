"""A small model of Kubernetes NetworkPolicy (networking.k8s.io/v1), enough to say which connections the rendered
policies allow between the rendered pods and the few things outside them (the cluster DNS, the object store, the
internet): label selectors (matchLabels, matchExpressions In / NotIn / Exists / DoesNotExist), policyTypes (and their
default), ingress `from` / egress `to` peers (podSelector alone = this namespace; namespaceSelector, alone or with a
podSelector; ipBlock with except), ports (number, name resolved on the destination pod, endPort ranges, protocol
defaulting to TCP), and the rule that a connection needs both the source's egress and the destination's ingress to
allow it, each side being open while no policy of its own namespace selects it for that direction.

Only the policies given are known: endpoints outside the modelled namespace accept whatever reaches them."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

NAME_LABEL = "kubernetes.io/metadata.name"  # set on every Namespace by the API server


@dataclass
class Endpoint:
    """A pod (namespace set) or an address outside the cluster (namespace None)."""
    name: str
    ip: str
    namespace: Optional[str] = None
    labels: Dict[str, str] = field(default_factory=dict)
    ports: Dict[str, int] = field(default_factory=dict)  # named container ports

    @property
    def namespace_labels(self) -> Dict[str, str]:
        return {} if self.namespace is None else {NAME_LABEL: self.namespace}


def selects(selector: Optional[dict], labels: Dict[str, str]) -> bool:
    """A LabelSelector on `labels`; the empty selector selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def policy_types(policy: dict) -> List[str]:
    spec = policy["spec"]
    if "policyTypes" in spec:
        return spec["policyTypes"]
    return ["Ingress"] + (["Egress"] if "egress" in spec else [])  # the API server's default


def peer_matches(peer: dict, other: Endpoint, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        ip = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except", []))
    if other.namespace is None:  # an address outside the cluster: only an ipBlock names it
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], other.namespace_labels):
            return False
    elif other.namespace != policy_namespace:
        return False
    return selects(peer.get("podSelector"), other.labels)


def port_matches(ports: Optional[List[dict]], dst: Endpoint, port: int, protocol: str) -> bool:
    if not ports:  # no ports: every port, every protocol
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        want = p.get("port")
        if want is None:
            return True
        if isinstance(want, str):  # a named port: the destination pod's
            want = dst.ports.get(want)
            if want is None:
                continue
            if port == want:
                return True
        elif want <= port <= p.get("endPort", want):
            return True
    return False


def _side_allows(policies: Iterable[dict], subject: Endpoint, other: Endpoint, dst: Endpoint, port: int,
                 protocol: str, direction: str) -> bool:
    """Whether `subject`'s own policies let the connection pass on its side (direction: Ingress or Egress)."""
    if subject.namespace is None:
        return True
    mine = [p for p in policies if p["metadata"]["namespace"] == subject.namespace
            and direction in policy_types(p) and selects(p["spec"]["podSelector"], subject.labels)]
    if not mine:
        return True  # isolated only once a policy selects it for this direction
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for p in mine:
        for rule in p["spec"].get(key, []):
            peers = rule.get(peers_key)
            if (not peers or any(peer_matches(peer, other, p["metadata"]["namespace"]) for peer in peers)) and \
                    port_matches(rule.get("ports"), dst, port, protocol):
                return True
    return False


def allowed(policies: List[dict], src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
    """Whether `src` may open a connection to `dst` on port/protocol."""
    return (_side_allows(policies, src, dst, dst, port, protocol, "Egress")
            and _side_allows(policies, dst, src, dst, port, protocol, "Ingress"))


def flows(policies: List[dict], endpoints: List[Endpoint], probes: List[tuple], namespace: str) -> set:
    """Every (source, destination, protocol, port) of the probes that the policies allow, from a pod, to or from a pod
    of `namespace` (what the policies of that namespace decide)."""
    return {(s.name, d.name, proto, port) for s, d in pairs(endpoints, namespace) for proto, port in probes
            if allowed(policies, s, d, port, proto)}


def pairs(endpoints: List[Endpoint], namespace: str):
    """(source, destination): sources are pods, and one of the two is in `namespace`."""
    return [(s, d) for s in endpoints if s.namespace is not None for d in endpoints
            if d is not s and namespace in (s.namespace, d.namespace)]
