"""What a registered model tells about itself in MLflow (MLflow 3 conventions).

- the logged model: a models-from-code pyfunc (trainer/serving/model_code.py imports the installed package; nothing
  pickled) whose artifacts are the package of trainer/registry/package.py, with a signature (a set of images in,
  samples and per-image ELBO out, generation parameters), an input example, and the checkpoint's step as its
  step, so the epoch metrics of that step (validation / test ELBO) are linked to it;
- the registered model and each version: a description (model, paper name, dataset, parameters, val ELBO,
  checkpoint step) and tags (checkpoint, training run);
- the training run: source and git commit tags, the training data as a dataset input (name, split sizes, shard
  manifest digest, source);
- evaluation jobs: their headline numbers as tags on the version they evaluated, linked to their run, and as
  metrics of the logged model.
"""
from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from data_pipeline.input_spec import InputSpec
from trainer.compat import PyfuncWithoutServingCheck
from trainer.registry.package import ModelCard

ROOT = Path(__file__).resolve().parents[2]
SERVING_CODE = ROOT / "trainer" / "serving" / "model_code.py"
DATA_CONTEXT = "training"
# A version's tags are what the registry page shows: its headline numbers only, at most MAX_VERSION_TAGS; the
# full tables stay on the evaluation runs and, as metrics, on the version's logged model (docs/serving.md).
VERSION_TAGS = ("checkpoint", "dataset")
HEADLINE = ("val/vlb", "test/vlb")
# evaluation job -> the metric (prefix) it puts on the version: the S=5 one where the job measured several
EVAL_HEADLINE = {"elbo": "vlb_S", "marginal": "nll_S", "fewshot": "accuracy_",
                 "sample_quality": "recognizability_conditional"}
MAX_VERSION_TAGS = len(VERSION_TAGS) + len(HEADLINE) + len(EVAL_HEADLINE)
EXAMPLE_PARAMS = {"samples": 8, "mode": "conditional", "iterations": 10, "seed": 0}


# ------------------------------------------------------------------------------------------------ training run
def source_tags(entry_point: str) -> Dict[str, str]:
    """MLflow's source tags for this checkout: entry point and, in a git checkout, commit, branch, dirty flag."""
    tags = {"mlflow.source.name": entry_point, "mlflow.source.type": "LOCAL"}

    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["mlflow.source.git.branch"] = git("rev-parse", "--abbrev-ref", "HEAD") or ""
        remote = git("config", "--get", "remote.origin.url")
        if remote:
            tags["mlflow.source.git.repoURL"] = remote
        tags["git_dirty"] = str(bool(git("status", "--porcelain", "--untracked-files=no")))
    return tags


@dataclass
class DatasetRecord:
    """The prepared shards a run trains on, as an MLflow dataset input."""

    name: str
    digest: str  # sha256 of manifest.json
    source: str  # the shards directory
    profile: Dict[str, Any]  # split sizes, raw sources

    @classmethod
    def from_manifest(cls, directory: "Path | str") -> "DatasetRecord":
        """The dataset at `directory`: a local directory or a bucket URL (data_pipeline/shard_source.py)."""
        import hashlib

        from data_pipeline.locations import is_remote
        from data_pipeline.shard_source import BucketShards, LocalShards

        remote = is_remote(directory)
        raw = (BucketShards(str(directory)) if remote else LocalShards(directory)).manifest_raw()
        manifest = json.loads(raw)
        splits = {split: {"classes": info.get("classes"), "images": info.get("images"),
                          "shards": len(info.get("shards", []))}
                  for split, info in manifest.get("splits", {}).items()}
        profile = {"splits": splits, "image_shape": manifest.get("image_shape"), "record": manifest.get("record"),
                   "manifest_sha256": hashlib.sha256(raw).hexdigest(),
                   "raw_sources": manifest.get("preparation", {}).get("sources", {})}
        return cls(manifest.get("dataset", str(directory).rstrip("/").rsplit("/", 1)[-1]),
                   profile["manifest_sha256"], str(directory) if remote else str(Path(directory).resolve()), profile)

    def to_input(self, context: str = DATA_CONTEXT):
        from mlflow.entities import Dataset, DatasetInput, InputTag

        # MLflow keeps at most 36 characters of a digest; the full sha256 is in the profile
        from data_pipeline.locations import is_remote

        remote = is_remote(self.source)
        dataset = Dataset(name=self.name, digest=self.digest[:32], source_type="s3" if remote else "local",
                          source=json.dumps({"uri": self.source if remote else Path(self.source).as_uri()}),
                          schema=json.dumps({"record": self.profile.get("record")}),
                          profile=json.dumps(self.profile, sort_keys=True))
        return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])


# ------------------------------------------------------------------------------------------------ the model
def signature(card: ModelCard):
    """A set of S images (S, C, H, W) float32 in [0, 1], prepared as the training data (ink = 1); out: N new
    members and the set's per-image ELBO (nats)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    c, size = card.inputs.channels, card.inputs.size
    images = (-1, c, size, size)
    return ModelSignature(
        # any 4-d shape passes MLflow's own check, whose refusal would start with a dump of the request: the
        # served model checks (C, H, W) itself and answers with the reason (trainer/serving/pyfunc.py)
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1), name="images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), images, name="samples"),
                        TensorSpec(np.dtype(np.float32), (-1,), name="elbo")]),
        params=ParamSchema([ParamSpec("samples", "long", EXAMPLE_PARAMS["samples"]),
                            ParamSpec("mode", "string", EXAMPLE_PARAMS["mode"]),
                            ParamSpec("iterations", "long", EXAMPLE_PARAMS["iterations"]),
                            ParamSpec("seed", "long", EXAMPLE_PARAMS["seed"])]),
    )


def version_description(card: ModelCard) -> str:
    m, ck = card.metrics, card.checkpoint
    lines = [f"{card.paper_name} (model `{card.model.name}`), {card.n_params:,} parameters, trained on "
             f"`{card.inputs.dataset}` ({card.inputs.channels}x{card.inputs.size}x{card.inputs.size}, sets of "
             f"{card.inputs.train_set_size}).",
             f"Checkpoint `{ck.get('tag')}`: step {ck.get('step')}, epoch {ck.get('epoch')}."]
    for split in ("val", "test"):
        v = m.get(f"{split}/vlb")
        if v is not None and math.isfinite(v):
            lines.append(f"{split} ELBO: {v:.3f} nats/image.")
    return "\n".join(lines)


def model_description(card: ModelCard, name: str) -> str:
    return (f"{card.paper_name} (`{card.model.name}`) trained on `{card.inputs.dataset}` by scha-vae: safetensors "
            f"weights and a JSON model card, loaded by the installed package.\n"
            f"Few-shot generation: `python -m launch.generate model_uri=models:/{name}@champion images=<folder>`; "
            f"serving: `python -m launch.serve model_uri=models:/{name}@champion` (checks the version first and bounds "
            f"each request; docs/serving.md).")


def pip_requirements() -> list:
    """Given explicitly: MLflow would otherwise load the model in a subprocess to infer them at every log."""
    from importlib import metadata

    names = ("scha-vae", "torch", "mlflow", "safetensors", "numpy")
    reqs = []
    for n in names:
        try:
            reqs.append(f"{n}=={metadata.version(n)}")
        except metadata.PackageNotFoundError:
            pass
    return reqs


def log_packaged_model(run_id: str, files: Dict[str, Path], card: ModelCard, model_name: str, aliases: tuple,
                       tag: str, input_example: Any) -> str:
    """Log the package as a pyfunc model of `run_id`, register it, describe and alias it; the version number."""
    import mlflow
    from mlflow.models import Model

    client = mlflow.MlflowClient()
    step = int(card.checkpoint.get("step", 0))
    # run_id, not `with mlflow.start_run(run_id)`: ending that context would mark the training run finished
    # (and print its link) at every registration
    info = Model.log(
        run_id=run_id, artifact_path=None, name=f"model-{tag}", flavor=PyfuncWithoutServingCheck,
        python_model=str(SERVING_CODE), artifacts={k: str(v) for k, v in files.items()}, signature=signature(card),
        # the documented request (docs/serving.md): the set under "images", the generation parameters
        input_example=({"images": input_example}, dict(EXAMPLE_PARAMS)),
        pip_requirements=pip_requirements(), step=step,
        tags={"checkpoint": tag, "model": card.model.name, "dataset": card.inputs.dataset},
        validate_serving_input=False, flavor_name="pyfunc.ModelFromCode",
    )
    version = register_version(client, model_name, info.model_id, run_id)
    client.set_logged_model_tags(info.model_id, {"mlflow.note.content": version_description(card)})
    client.update_registered_model(model_name, description=model_description(card, model_name))
    client.update_model_version(model_name, version, description=version_description(card))
    # the training run is the version's own run_id; step and size are in its description and card
    for key, value in zip(VERSION_TAGS, (tag, card.inputs.dataset)):
        client.set_model_version_tag(model_name, version, key, value)
    for key in HEADLINE:
        value = card.metrics.get(key)
        if value is not None and math.isfinite(value):
            client.set_model_version_tag(model_name, version, key, f"{value:.6g}")
    for alias in aliases:
        client.set_registered_model_alias(model_name, alias, version)
    return version


def register_version(client, model_name: str, model_id: str, run_id: str) -> str:
    """A new version of `model_name` from logged model `model_id`, linked both ways as MLflow's own
    `register_model` links them (the version's source `models:/<model_id>`, the logged model's
    `mlflow.modelVersions` tag) but through the client, which prints nothing into the training output."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name)
    except MlflowException as exc:
        if str(exc.error_code) != "RESOURCE_ALREADY_EXISTS":
            raise
    mv = client.create_model_version(model_name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id)
    linked = json.loads(client.get_logged_model(model_id).tags.get("mlflow.modelVersions") or "[]")
    client.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps(
        linked + [{"name": mv.name, "version": mv.version}])})
    return str(mv.version)


# ------------------------------------------------------------------------------------------------ evaluation
def version_model_id(mv) -> str:
    """The logged model behind a registry version (its source is `models:/<model_id>` in MLflow 3)."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    source = mv.source or ""
    return source[len("models:/"):] if source.startswith("models:/m-") else ""


def eval_headline(job: str, metrics: Dict[str, float]) -> Optional[Tuple[str, float]]:
    """The one number of `job` that goes on a version (EVAL_HEADLINE), or None for a job without one."""
    prefix = EVAL_HEADLINE.get(job)
    if prefix is None:
        return None
    keys = [k for k in metrics if k.startswith(prefix) and math.isfinite(metrics[k])]
    if not keys:
        return None
    key = f"{prefix}5" if f"{prefix}5" in keys else keys[0]
    return key, float(metrics[key])


def record_evaluation(model_name: str, version: str, job: str, metrics: Dict[str, float]) -> None:
    """Put an evaluation's headline number on the model version it evaluated: tag `eval.<job>.<metric>`. Its run
    holds every number, as metrics linked to the version's logged model (the logged-model page lists them)."""
    import mlflow

    headline = eval_headline(job, metrics)
    if headline is not None:
        mlflow.MlflowClient().set_model_version_tag(model_name, version, f"eval.{job}.{headline[0]}",
                                                    f"{headline[1]:.6g}")


# ------------------------------------------------------------------------------------------------ from a run
def checkpoint_card(cfg, n_params: int, tag: str, step: int, epoch: int, metrics: Dict[str, float],
                    run_id: str = "") -> ModelCard:
    """The card of checkpoint `tag` of a run with config `cfg` (trainer.config.Config)."""
    from models.registry import ZOO

    return ModelCard(model=cfg.model, inputs=InputSpec.of(cfg.model, cfg.data), paper_name=ZOO[cfg.model.name].paper_name,
                     n_params=n_params, checkpoint={"tag": tag, "step": step, "epoch": epoch},
                     metrics={k: float(v) for k, v in metrics.items()}, training_run_id=run_id)


def example_set(data, card: ModelCard, members: int = 5):
    """The input example: the first validation class's first images, prepared as the model sees them (a private
    seeded generator binarises them: no draw from the training RNG)."""
    import numpy as np
    import torch

    from data_pipeline.shard_source import source_of

    source = source_of(data)
    first = source.verify(data.name, ["val"], check_sha256=False)["splits"]["val"]["shards"][0]["file"]
    record = next(source.records(first))
    x = torch.from_numpy(record.images[:min(members, data.set_size)].astype(np.float32) / 255.0)
    if card.inputs.binarize:
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(0))
    return x.numpy()
