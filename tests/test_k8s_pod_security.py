"""The Restricted Pod Security Standard (Kubernetes' pod-security admission, level `restricted`, which includes
`baseline`) on every pod template the overlays render: training (Indexed Job; the TrainJob's pods: its runtime's
template with the TrainJob's patches; the runtime's template alone), preparation, evaluation, MLflow and
PostgreSQL. The rules are listed below as the standard states them; on top, every container has a read-only root
filesystem whose writable places are volumes: emptyDirs only at /tmp and HOME (project image), the socket
directory and /tmp (PostgreSQL), /dev/shm (training), and the persistent volumes."""
from __future__ import annotations

import re

import pytest

from k8s_support import (OPTION_OVERLAYS, OVERLAYS, dockerfile_instructions, edited_copy, kustomize, one,
                         pod_templates, project_image, render, render_with_options)

BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                         "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                      "secret", "image"}
# Writable emptyDirs each program needs under a read-only root (and why): the project image's TMPDIR and HOME
# (Dockerfile ENV: torchrun's error files, MLflow's temporary artifacts; the torch / Triton / DeepSpeed / matplotlib
# caches under HOME), shared memory for DataLoader workers and NCCL, PostgreSQL's socket/lock directory and temp.
WRITABLE_EMPTYDIRS = {"project": {"/tmp", "/home/app", "/dev/shm"}, "postgres": {"/var/run/postgresql", "/tmp"}}


def _containers(spec):
    return spec.get("initContainers", []) + spec.get("containers", []) + spec.get("ephemeralContainers", [])


def _each_container_or_pod(spec, key_path):
    """The effective value of a securityContext field per container (the container's, else the pod's)."""
    def get(d, path):
        for k in path:
            d = (d or {}).get(k)
        return d
    pod_value = get(spec.get("securityContext"), key_path)
    return {c["name"]: get(c.get("securityContext"), key_path) if get(c.get("securityContext"), key_path) is not None
            else pod_value for c in _containers(spec)}


def _host_namespaces(spec):
    return [f"{k}: true" for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]


def _host_process(spec):
    vals = [spec.get("securityContext", {}).get("windowsOptions", {}).get("hostProcess")]
    vals += [c.get("securityContext", {}).get("windowsOptions", {}).get("hostProcess") for c in _containers(spec)]
    return ["windowsOptions.hostProcess: true"] if any(vals) else []


def _privileged(spec):
    return [f"{c['name']}: privileged" for c in _containers(spec) if c.get("securityContext", {}).get("privileged")]


def _baseline_capabilities(spec):
    return [f"{c['name']}: adds {cap}" for c in _containers(spec)
            for cap in c.get("securityContext", {}).get("capabilities", {}).get("add", [])
            if cap not in BASELINE_CAPABILITIES]


def _host_path(spec):
    return [f"volume {v['name']}: hostPath" for v in spec.get("volumes", []) if "hostPath" in v]


def _host_ports(spec):
    return [f"{c['name']}: hostPort {p['hostPort']}" for c in _containers(spec) for p in c.get("ports", [])
            if p.get("hostPort")]


def _apparmor(spec):
    profiles = [spec.get("securityContext", {}).get("appArmorProfile")]
    profiles += [c.get("securityContext", {}).get("appArmorProfile") for c in _containers(spec)]
    return [f"appArmorProfile {p['type']}" for p in profiles if p and p.get("type") not in ("RuntimeDefault", "Localhost")]


def _selinux(spec):
    out = []
    for opts in [spec.get("securityContext", {}).get("seLinuxOptions")] + [
            c.get("securityContext", {}).get("seLinuxOptions") for c in _containers(spec)]:
        if opts and (opts.get("type") not in (None, "", "container_t", "container_init_t", "container_kvm_t",
                                               "container_engine_t") or opts.get("user") or opts.get("role")):
            out.append(f"seLinuxOptions {opts}")
    return out


def _proc_mount(spec):
    return [f"{c['name']}: procMount {c['securityContext']['procMount']}" for c in _containers(spec)
            if c.get("securityContext", {}).get("procMount", "Default") != "Default"]


def _sysctls(spec):
    return [f"sysctl {s['name']}" for s in spec.get("securityContext", {}).get("sysctls", [])
            if s["name"] not in SAFE_SYSCTLS]


def _volume_types(spec):
    return [f"volume {v['name']}: {t}" for v in spec.get("volumes", []) for t in v if t != "name"
            and t not in RESTRICTED_VOLUMES]


def _privilege_escalation(spec):
    return [f"{c['name']}: allowPrivilegeEscalation is not false" for c in _containers(spec)
            if c.get("securityContext", {}).get("allowPrivilegeEscalation") is not False]


def _run_as_non_root(spec):
    return [f"{name}: runAsNonRoot is not true" for name, v in _each_container_or_pod(spec, ["runAsNonRoot"]).items()
            if v is not True]


def _run_as_user(spec):
    return [f"{name}: runAsUser 0" for name, v in _each_container_or_pod(spec, ["runAsUser"]).items() if v == 0]


def _seccomp(spec):
    return [f"{name}: seccompProfile {v}" for name, v in _each_container_or_pod(spec, ["seccompProfile", "type"]).items()
            if v not in ("RuntimeDefault", "Localhost")]


def _capabilities(spec):
    out = []
    for c in _containers(spec):
        caps = c.get("securityContext", {}).get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            out.append(f"{c['name']}: capabilities.drop lacks ALL")
        out += [f"{c['name']}: adds {cap}" for cap in caps.get("add", []) if cap != "NET_BIND_SERVICE"]
    return out


RULES = [  # (level, control, check): the Pod Security Standards' controls
    ("baseline", "HostProcess", _host_process),
    ("baseline", "Host Namespaces", _host_namespaces),
    ("baseline", "Privileged Containers", _privileged),
    ("baseline", "Capabilities", _baseline_capabilities),
    ("baseline", "HostPath Volumes", _host_path),
    ("baseline", "Host Ports", _host_ports),
    ("baseline", "AppArmor", _apparmor),
    ("baseline", "SELinux", _selinux),
    ("baseline", "/proc Mount Type", _proc_mount),
    ("baseline", "Sysctls", _sysctls),
    ("restricted", "Volume Types", _volume_types),
    ("restricted", "Privilege Escalation", _privilege_escalation),
    ("restricted", "Running as Non-root", _run_as_non_root),
    ("restricted", "Running as Non-root user", _run_as_user),
    ("restricted", "Seccomp", _seccomp),
    ("restricted", "Capabilities", _capabilities),
]


def violations(spec: dict) -> list:
    return [f"{level}/{control}: {v}" for level, control, check in RULES for v in check(spec)]


def read_only_root_problems(spec: dict) -> list:
    """Containers without a read-only root, and emptyDirs mounted where no program of that image must write."""
    out = []
    empty = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
    for c in _containers(spec):
        if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
            out.append(f"{c['name']}: readOnlyRootFilesystem is not true")
        allowed = WRITABLE_EMPTYDIRS["project" if c.get("image") == project_image() else "postgres"]
        out += [f"{c['name']}: emptyDir at {m['mountPath']}" for m in c.get("volumeMounts", [])
                if m["name"] in empty and m["mountPath"] not in allowed]
    return out


def all_pod_templates(overlay: str, objs=None):
    objs = render(overlay) if objs is None else objs
    return [(f"{o['kind']}/{o['metadata']['name']}", t) for o in objs for t in pod_templates(o, objs)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_the_restricted_standard(overlay):
    templates = all_pod_templates(overlay)
    if overlay.removesuffix("-s3") in OPTION_OVERLAYS:
        templates += all_pod_templates(overlay, render_with_options(overlay))
    expected = {"base": set(), "mlflow": {"Deployment/mlflow", "StatefulSet/postgres"},
                "prepare": {"Job/prepare-omniglot-ns"}, "train-indexed": {"Job/train-omniglot-ns-ns"},
                "train-kubeflow": {"TrainJob/omniglot-ns-ns", "TrainingRuntime/scha-vae-torch"},
                "evaluate": {"Job/evaluate-omniglot-ns-ns-elbo", "Job/evaluate-omniglot-ns-ns-marginal"}}
    expected.update({f"{o}-s3": expected[o] for o in ("mlflow", "prepare", "train-indexed", "evaluate")})
    expected["namespace"] = set()
    names = {name for name, _ in templates}
    assert names == expected[overlay]
    for name, template in templates:
        assert violations(template["spec"]) == [], name
        assert read_only_root_problems(template["spec"]) == [], name


def test_the_namespace_enforces_the_restricted_standard():
    ns = one(render("namespace"), "Namespace", "scha-vae")  # the admin overlay (docs/kubernetes.md, "Who applies what")
    for mode in ("enforce", "warn", "audit"):
        assert ns["metadata"]["labels"][f"pod-security.kubernetes.io/{mode}"] == "restricted", mode


def test_the_checks_catch_each_kind_of_violation(tmp_path):
    """A copy of the training Job with its seccomp profile, non-root flag and dropped capabilities removed, a
    writable root and a hostPath volume: each is reported (the checks are not vacuous)."""
    tree = edited_copy(tmp_path, "train-indexed/job.yaml", [
        ("        seccompProfile:\n          type: RuntimeDefault\n", ""),
        ("        runAsNonRoot: true\n", ""),
        ('              drop: ["ALL"]', '              add: ["SYS_ADMIN"]'),
        ("            readOnlyRootFilesystem: true", "            readOnlyRootFilesystem: false"),
        ("        - name: tmp\n          emptyDir:\n            sizeLimit: 8Gi\n",
         "        - name: tmp\n          hostPath:\n            path: /tmp\n")])
    (job,) = [o for o in kustomize(tree / "train-indexed") if o["kind"] == "Job"]
    spec = job["spec"]["template"]["spec"]
    found = violations(spec)
    assert found == ["baseline/Capabilities: trainer: adds SYS_ADMIN", "baseline/HostPath Volumes: volume tmp: hostPath",
                     "restricted/Volume Types: volume tmp: hostPath", "restricted/Running as Non-root: trainer: "
                     "runAsNonRoot is not true", "restricted/Seccomp: trainer: seccompProfile None",
                     "restricted/Capabilities: trainer: capabilities.drop lacks ALL",
                     "restricted/Capabilities: trainer: adds SYS_ADMIN"], found
    assert read_only_root_problems(spec) == ["trainer: readOnlyRootFilesystem is not true"]
    spec["containers"][0]["volumeMounts"].append({"name": "dshm", "mountPath": "/app/outputs"})
    assert read_only_root_problems(spec)[-1] == "trainer: emptyDir at /app/outputs"


def test_the_image_runs_non_root_with_its_writable_paths_on_the_pods_emptydirs():
    ins = dockerfile_instructions()
    user = [rest for w, rest in ins if w == "USER"][-1]
    assert user == "1000:1000"
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(rest for w, rest in ins if w == "ENV")))
    writable = {env["HOME"], env["TMPDIR"]}
    assert writable == {"/home/app", "/tmp"}
    for var in ("XDG_CACHE_HOME", "TORCH_HOME", "TRITON_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "MPLCONFIGDIR"):
        assert env[var].startswith(env["HOME"] + "/"), var  # every cache lives under HOME
    for overlay in ("mlflow", "prepare", "train-indexed", "train-kubeflow", "evaluate"):
        for name, template in all_pod_templates(overlay):
            spec = template["spec"]
            empty = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
            for c in spec["containers"]:
                if c.get("image") == project_image():
                    mounted = {m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in empty}
                    assert writable <= mounted, (name, c["name"], mounted)
                    assert str(spec["securityContext"]["runAsUser"]) == user.split(":")[0], name
