"""docs/kubernetes.md and docs/data.md against the code: the commands they show are the ones the manifests run,
the Secret commands create exactly what the pods reference (run with kubectl's client-side dry run), the presets,
evaluation jobs and model aliases they name exist, and the data commands run."""
from __future__ import annotations

import json
import re
import shlex
import subprocess

from conftest import ROOT, run_module
from k8s_support import OVERLAYS, USER_SECRETS, containers, kubectl, render

DOCS = ROOT / "docs"


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)


def commands(text: str) -> list[list[str]]:
    """Each shell command of the doc's code blocks (backslash continuations joined, comments dropped)."""
    out = []
    for block in code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(shlex.split(line))
    return out


def test_documented_job_commands_are_the_manifests():
    manifest_argvs = [c.get("command", []) + c.get("args", []) for o in OVERLAYS for _, _, c in containers(render(o))]
    manifest_argvs += [a[2:] for a in manifest_argvs if a[:2] == ["/usr/bin/tini", "--"]]
    shown = [cmd for cmd in commands((DOCS / "kubernetes.md").read_text())
             if cmd[:2] == ["python", "-m"] and cmd[2].startswith("launch.") or cmd[:1] in (["torchrun"], ["/usr/bin/tini"])]
    assert len(shown) >= 4, shown
    assert any(cmd[:1] == ["/usr/bin/tini"] for cmd in shown)  # the TrainJob's command
    for cmd in shown:
        assert cmd in manifest_argvs, f"docs/kubernetes.md shows a command no manifest runs: {' '.join(cmd)}"


def test_documented_secret_commands_create_what_the_pods_reference():
    refs = set()
    for overlay in OVERLAYS:
        for _, _, c in containers(render(overlay)):
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
            for src in c.get("envFrom", []):  # every key becomes a variable: the ones the S3 SDKs read
                if "secretRef" in src:
                    refs |= {(src["secretRef"]["name"], key) for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    created = set()
    # the documented commands, with a fixed value for each `$(openssl rand ...)` and a client-side dry run
    text = re.sub(r'"\$\(openssl rand [^)]*\)"', "0123abcd", (DOCS / "kubernetes.md").read_text())
    for cmd in commands(text):
        if cmd[:5] == ["kubectl", "-n", "scha-vae", "create", "secret"]:
            proc = subprocess.run([kubectl(), *cmd[1:], "--dry-run=client", "-o", "json"], capture_output=True,
                                  text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
            secret = json.loads(proc.stdout)
            created |= {(secret["metadata"]["name"], key) for key in secret["data"]}
    assert created == refs, f"created but unused: {created - refs}; referenced but not created: {refs - created}"
    assert {name for name, _ in refs} == set(USER_SECRETS)


def test_named_presets_jobs_and_aliases_exist():
    text = "\n".join((DOCS / name).read_text() for name in ("kubernetes.md", "data.md"))
    presets = set(re.findall(r"experiment=([a-z0-9_]+)", text))
    presets |= set(re.findall(r"`((?:omniglot|celeba)_[a-z0-9_]+)`", text))
    presets -= {"omniglot_ns", "omniglot_back_eval"}  # datasets, not presets
    missing = [p for p in sorted(presets) if not (ROOT / "configs" / "experiment" / f"{p}.yaml").is_file()]
    assert presets and not missing, f"docs name presets that configs/experiment lacks: {missing}"
    for job in set(re.findall(r"eval=([a-z_]+)", text)):
        assert (ROOT / "configs" / "eval" / f"{job}.yaml").is_file(), job
    # the aliases a model is loaded by are the ones training sets (trainer/loop.py)
    loop = (ROOT / "trainer" / "loop.py").read_text()
    set_by_training = set(re.findall(r'\(\("(\w+)",\)', loop))
    kube = (DOCS / "kubernetes.md").read_text()
    aliases = set(re.findall(r"models:/\w+@(\w+)", kube)) | set(re.findall(r"alias `(\w+)`", kube))
    assert {"champion", "last"} <= set_by_training, set_by_training
    assert aliases and aliases <= set_by_training, (aliases, set_by_training)


def test_documented_synthetic_celeba_command_makes_a_tree_prepare_accepts(tmp_path):
    from data_pipeline import celeba

    data_md = commands((DOCS / "data.md").read_text())
    (cmd,) = [c for c in data_md if c[:3] == ["python", "-m", "data_pipeline.synthetic"]]
    args = cmd[3:]
    args[0] = str(tmp_path / "fake")
    args[args.index("--identities") + 1], args[args.index("--images") + 1] = "6", "3"  # the command, smaller
    run_module("data_pipeline.synthetic", *args, cwd=tmp_path)
    source, splits = celeba.plan(tmp_path / "fake", 0)
    assert sum(len(ids) for ids in splits.values()) == 6


def test_documented_admin_password_command_reads_the_created_secret():
    """The page's `ADMIN_PASSWORD="$(kubectl ... get secret mlflow-admin -o jsonpath=... | base64 -d)"`, run on the
    Secret its own create command makes (kubectl's client-side dry run stands for the cluster's copy)."""
    text = (DOCS / "kubernetes.md").read_text()
    m = re.search(r'ADMIN_PASSWORD="\$\(kubectl -n scha-vae get secret mlflow-admin (-o jsonpath=\'[^\']+\') \| base64 -d\)"',
                  text)
    assert m, "docs/kubernetes.md does not say how to read the admin password from the Secret"
    create = next(c for c in commands(re.sub(r'"\$\(openssl rand [^)]*\)"', "pw-0123abcd", text))
                  if c[:6] == ["kubectl", "-n", "scha-vae", "create", "secret", "generic"] and c[6] == "mlflow-admin")
    jsonpath = shlex.split(m.group(1))[1]
    proc = subprocess.run([kubectl(), *create[1:], "--dry-run=client", "-o", jsonpath], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    decoded = subprocess.run(["base64", "-d"], input=proc.stdout, capture_output=True, text=True, timeout=30).stdout
    assert decoded == "pw-0123abcd"


def test_docs_state_the_platform_as_the_code_has_it():
    from importlib.metadata import version

    text = (DOCS / "kubernetes.md").read_text()
    trainer = ".".join(version("kubeflow-trainer-api").split(".")[:2])
    assert f"Kubeflow Trainer **v{trainer}**" in text and f"kubeflow-trainer-api=={version('kubeflow-trainer-api')}" in text
    assert f"kubeflow=={version('kubeflow')}" in text
    assert "`PET_MASTER_PORT` (29500)" in text and "29400)" not in text.split("PET_MASTER_PORT")[1][:20]
    # Kueue acts on a TrainJob only with its integration switched on in Kueue's configuration
    assert "integrations.frameworks" in text and "`trainer.kubeflow.org/trainjob`" in text
    assert "pod-security.kubernetes.io/enforce: restricted" in text
