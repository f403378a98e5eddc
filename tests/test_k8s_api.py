"""Every object the overlays render, with their option components switched on too, against the real API
definitions (k8s_api.api_errors: the `kubernetes` client's models for built-in kinds, `kubeflow-trainer-api`
2.3.0 for the Trainer kinds), the check itself on misspelled copies of each overlay, and the Kubeflow conventions:
the runtime parses with the Kubeflow SDK's own runtime parsers, the framework label, the TrainJob's deadline and
the grace period of every training pod."""
from __future__ import annotations

import pytest

from k8s_api import api_errors
from k8s_support import (OPTION_OVERLAYS, OVERLAYS, TRAINJOB_API, edited_copy, invocations_of, kustomize, of_kind,
                         one, pod_templates, project_image, render, render_with_options, torchrun_args)

# One misspelled field per overlay, in a manifest of that overlay (copied; k8s/ itself is not touched).
MISSPELLED = {
    "base": ("base/serviceaccounts.yaml", "scha-vae-prepare\nautomountServiceAccountToken:",
             "scha-vae-prepare\nautomountServiceAccountTokn:", "ServiceAccount/scha-vae-prepare.automountServiceAccountTokn"),
    "namespace": ("namespace/namespace.yaml", "  labels:", "  label:", "Namespace/scha-vae.metadata.label"),
    "mlflow": ("mlflow/mlflow.yaml", "readinessProbe:", "readinesProbe:",
               "Deployment/mlflow.spec.template.spec.containers[0].readinesProbe"),
    "prepare": ("prepare/job.yaml", "ttlSecondsAfterFinished", "ttlSecondAfterFinished",
                "Job/prepare-omniglot-ns.spec.ttlSecondAfterFinished"),
    "train-indexed": ("train-indexed/job.yaml", "completionMode: Indexed", "completionMod: Indexed",
                      "Job/train-omniglot-ns-ns.spec.completionMod"),
    "train-kubeflow": ("train-kubeflow/trainingruntime.yaml", "terminationGracePeriodSeconds: 300",
                       "terminationGracePeriodSecond: 300",
                       "TrainingRuntime/scha-vae-torch.spec.template.spec.replicatedJobs[0].template.spec.template"
                       ".spec.terminationGracePeriodSecond"),
    "evaluate": ("evaluate/elbo.yaml", "ttlSecondsAfterFinished", "ttlSecondAfterFinished",
                 "Job/evaluate-omniglot-ns-ns-elbo.spec.ttlSecondAfterFinished"),
    # the object-store overlays: a typo in what they add (their own patch, the component's, a new object)
    "mlflow-s3": ("mlflow-s3/kustomization.yaml", "value: {type: RollingUpdate,", "value: {typ: RollingUpdate,",
                  "Deployment/mlflow.spec.strategy.typ"),
    "prepare-s3": ("prepare-s3/raw-volume.yaml", "accessModes:", "accessMode:",
                   "PersistentVolumeClaim/scha-vae-raw.spec.accessMode"),
    "train-indexed-s3": ("components/object-store/kustomization.yaml",
                         "- secretRef: {name: object-store}\n  # the data volume",
                         "- secretRf: {name: object-store}\n  # the data volume",
                         "Job/train-omniglot-ns-ns.spec.template.spec.containers[0].envFrom[1].secretRf"),
    "evaluate-s3": ("evaluate/elbo.yaml", "ttlSecondsAfterFinished", "ttlSecondAfterFinished",
                    "Job/evaluate-omniglot-ns-ns-elbo.spec.ttlSecondAfterFinished"),
}


def _all_errors(objs):
    return [e for o in objs for e in api_errors(o)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_matches_the_real_api(overlay):
    objs = render(overlay) + (render_with_options(overlay) if overlay.removesuffix("-s3") in OPTION_OVERLAYS else [])
    assert objs
    assert _all_errors(objs) == []
    kinds = {o["kind"] for o in objs}
    if overlay == "train-kubeflow":
        assert {"TrainJob", "TrainingRuntime"} <= kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_misspelled_field_in_a_copy_of_each_overlay_is_caught(tmp_path, overlay):
    rel, old, new, where = MISSPELLED[overlay]
    tree = edited_copy(tmp_path, rel, [(old, new)])
    errors = _all_errors(kustomize(tree / overlay))
    assert len(errors) == 1 and errors[0].startswith(f"{where}: unknown field"), errors


def test_a_misspelled_trainjob_field_is_caught(tmp_path):
    tree = edited_copy(tmp_path, "train-kubeflow/trainjob.yaml", [("numNodes: 2", "numNode: 2")])
    errors = _all_errors(kustomize(tree / "train-kubeflow"))
    assert len(errors) == 1 and errors[0].startswith("TrainJob/omniglot-ns-ns.spec.trainer.numNode: unknown field")


def test_the_walk_refuses_wrong_types_and_removed_fields():
    objs = render("train-kubeflow")
    tj, rt = one(objs, "TrainJob"), one(objs, "TrainingRuntime")
    tj["spec"]["trainer"]["numNodes"] = "2"
    tj["spec"]["trainer"]["resourcesPerNode"]["limits"]["memory"] = ["256Gi"]
    tj["spec"]["runtimeRef"].pop("name")
    errors = api_errors(tj)
    assert any(e.startswith("TrainJob/omniglot-ns-ns.spec.trainer.numNodes: '2' is not") for e in errors), errors
    assert any(".resourcesPerNode.limits.memory: IoK8sApimachineryPkgApiResourceQuantity refuses" in e for e in errors)
    assert any(e.endswith("spec.runtimeRef.name: required field missing (TrainerV1alpha1RuntimeRef)") for e in errors)
    # the runtime as it was before Trainer v2.2 dropped the torch policy's numProcPerNode
    rt["spec"]["mlPolicy"]["torch"] = {"numProcPerNode": "auto"}
    assert api_errors(rt) == ["TrainingRuntime/scha-vae-torch.spec.mlPolicy.torch.numProcPerNode: unknown field "
                              "(TrainerV1alpha1TorchMLPolicySource has ['envInjection'])"]
    job = one(render("train-indexed"), "Job")
    job["spec"]["parallelism"] = "2"
    job["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = True
    job["apiVersion"] = "apps/v1"  # apps/v1 serves no Job
    assert api_errors(job) == ["Job/train-omniglot-ns-ns: apps/v1 Job is not a kind of the kubernetes client"]
    job["apiVersion"] = "batch/v1"
    assert api_errors(job) == [
        "Job/train-omniglot-ns-ns.spec.parallelism: expected an integer, got str '2'",
        "Job/train-omniglot-ns-ns.spec.template.spec.containers[0].ports[0].containerPort: expected an integer, "
        "got bool True"]


# ----------------------------------------------------------------------------------------------------
# Kubeflow conventions


def test_the_runtime_parses_with_the_kubeflow_sdk():
    """Both of the SDK's parsers: the Kubernetes backend's (get_runtime / list_runtimes) on the API model, and the
    local backends' runtime loader on the YAML document."""
    from kubeflow.trainer.backends.container.runtime_loader import _parse_runtime_yaml
    from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend
    from kubeflow.trainer.constants import constants
    from kubeflow.trainer.types import types
    from kubeflow_trainer_api import models

    objs = render("train-kubeflow")
    rt, tj = one(objs, "TrainingRuntime"), one(objs, "TrainJob")
    parse = KubernetesBackend._KubernetesBackend__get_runtime_from_cr  # what get_runtime returns for a runtime CR
    runtime = parse(None, models.TrainerV1alpha1TrainingRuntime.from_dict(rt))
    assert runtime.name == tj["spec"]["runtimeRef"]["name"] == "scha-vae-torch"
    assert runtime.kind == types.RuntimeKind.TRAINING_RUNTIME
    assert runtime.trainer.framework == "torch" and runtime.trainer.trainer_type == types.TrainerType.CUSTOM_TRAINER
    assert runtime.trainer.image == project_image() and runtime.trainer.num_nodes == 1
    assert runtime.trainer.command == constants.TORCH_COMMAND  # the torch ML policy was recognised
    local = _parse_runtime_yaml(rt, "k8s/train-kubeflow")
    assert (local.name, local.trainer.framework, local.trainer.image) == ("scha-vae-torch", "torch", project_image())
    # without the framework label the SDK refuses the runtime (list_runtimes skips it)
    del rt["metadata"]["labels"]["trainer.kubeflow.org/framework"]
    with pytest.raises(Exception, match="must have trainer.kubeflow.org/framework label"):
        parse(None, models.TrainerV1alpha1TrainingRuntime.from_dict(rt))
    with pytest.raises(ValueError, match="framework"):
        _parse_runtime_yaml(rt, "k8s/train-kubeflow")


def test_every_training_pod_has_the_grace_period_of_its_sigterm_checkpoint():
    """On SIGTERM launch.torchrun waits --shutdown-timeout seconds for the workers' checkpoint before SIGKILL: the
    pod's terminationGracePeriodSeconds must cover it (plus 30 s of teardown), on the Indexed Job and on every pod
    of the TrainJob (its runtime's template with the TrainJob's patches)."""
    seen = {}
    for overlay in ("train-indexed", "train-kubeflow"):
        objs = render(overlay)
        for obj, spec, c, env, cmd, (launcher, module, _) in invocations_of(objs):
            tr = torchrun_args(launcher)
            assert tr.shutdown_timeout is not None and tr.shutdown_timeout >= 120, (overlay, launcher)
            assert spec["terminationGracePeriodSeconds"] >= tr.shutdown_timeout + 30, overlay
            seen[obj["kind"]] = spec["terminationGracePeriodSeconds"]
        for rt in of_kind(objs, "TrainingRuntime"):
            (template,) = pod_templates(rt)
            assert template["spec"]["terminationGracePeriodSeconds"] == seen.get("Job", 300)
    assert seen == {"Job": 300, "TrainJob": 300}


def test_the_trainjob_is_the_v1alpha1_api_of_trainer_2_3():
    from importlib.metadata import version

    assert version("kubeflow-trainer-api") == "2.3.0" and version("kubeflow").startswith("0.5.")
    for obj in render("train-kubeflow"):
        if obj["kind"] in ("TrainJob", "TrainingRuntime"):
            assert obj["apiVersion"] == TRAINJOB_API
