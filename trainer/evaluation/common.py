"""What every evaluation job shares: fail-fast checks (model URI, datasets), loaders, and the job result type.

The checks only look things up (registry entries, manifests, file names); they run before any model or data is
loaded, so a wrong `model_uri` or an unprepared dataset fails in seconds with a message naming what is missing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


from trainer.config import Config, TrackingConfig


class EvalError(Exception):
    """An evaluation cannot run: the message names the missing model, alias, store, dataset or capability."""


class ModelNotFound(EvalError):
    """The model URI names no registered model, alias, version, run or path (exit 9: never worth a retry)."""


class TrackingUnavailable(EvalError):
    """The tracking store stayed unreachable for tracking.outage_timeout_s (exit 8: transient, retry later)."""


def with_store(cfg: TrackingConfig, what: str, fn):
    """fn() retried with backoff while the store is unreachable (an outage, not a refusal), for at most
    tracking.outage_timeout_s; then TrackingUnavailable naming the store and the last error."""
    import logging
    import time

    from trainer.tracking import tracking_uri, transient

    deadline = time.monotonic() + cfg.outage_timeout_s
    delay = max(cfg.retry_s, 0.1)
    warned = False
    while True:
        try:
            return fn()
        except EvalError:
            raise
        except Exception as exc:
            first = (str(exc).splitlines() or [""])[0][:300]
            if not transient(exc):
                raise EvalError(f"{what}: the MLflow store {tracking_uri(cfg)} refused ({type(exc).__name__}: "
                                f"{first})") from exc
            if time.monotonic() + delay > deadline:
                raise TrackingUnavailable(
                    f"{what}: the MLflow store {tracking_uri(cfg)} stayed unreachable for "
                    f"{cfg.outage_timeout_s:.0f} s (tracking.outage_timeout_s; last error {type(exc).__name__}: "
                    f"{first}); run the job again when it is back") from exc
            if not warned:
                logging.getLogger(__name__).warning("MLflow store unreachable (%s); retrying for up to %.0f s",
                                                    first, cfg.outage_timeout_s)
                warned = True
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


@dataclass
class JobResult:
    """What a job hands back to the runner: the main table (one dict per row), extra named tables, figures
    (file name -> matplotlib Figure) and summary metrics (logged as MLflow metrics)."""

    rows: List[Dict[str, Any]]
    tables: Dict[str, Any] = field(default_factory=dict)
    figures: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ model URI
def check_store(cfg: TrackingConfig) -> None:
    """The embedded sqlite store must exist already (an evaluation never creates an empty registry)."""
    if cfg.uri:
        return
    db = Path(cfg.root).resolve() / "mlflow.db"
    if not db.is_file():
        raise ModelNotFound(
            f"no MLflow store at {db} (tracking.root={cfg.root}): train a model first, or point tracking.root "
            f"or tracking.uri at the store that holds the registered model"
        )


def _mlflow_error_code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", "") or "")


def resolve_model(uri: str) -> Dict[str, str]:
    """Look the model up without loading it: registry name, version and training run for models:/ URIs.

    Raises EvalError naming the missing registered model, alias or version (listing what does exist), a missing
    run for runs:/ URIs, or a missing local path.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not uri:
        raise ModelNotFound("model_uri is required, e.g. model_uri=models:/demo@champion")
    info = {"model_uri": uri}
    client = MlflowClient()
    where = f"in the MLflow store {mlflow.get_tracking_uri()}"
    if uri.startswith("models:/"):
        ref = uri[len("models:/"):]
        name, at, alias = ref.partition("@")
        version = None
        if not at:
            name, slash, version = ref.rpartition("/")
            if not slash or not name:
                raise EvalError(f"model_uri {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
        try:
            registered = client.get_registered_model(name)
        except MlflowException as exc:
            if _mlflow_error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise  # an outage is retried by with_store, a refusal reported by it
            names = sorted(m.name for m in client.search_registered_models(max_results=50))
            raise ModelNotFound(
                f"model_uri {uri!r}: no registered model {name!r} {where} "
                f"(registered models: {', '.join(names) or 'none'})"
            ) from exc
        try:
            mv = client.get_model_version_by_alias(name, alias) if at else client.get_model_version(name, version)
        except MlflowException as exc:
            if _mlflow_error_code(exc) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            if at:
                have = ", ".join(sorted(getattr(registered, "aliases", {}) or {})) or "none"
                raise ModelNotFound(f"model_uri {uri!r}: registered model {name!r} has no alias {alias!r} "
                                f"(aliases: {have})") from exc
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
            raise ModelNotFound(f"model_uri {uri!r}: registered model {name!r} has no version {version!r} "
                            f"(versions: {', '.join(map(str, versions)) or 'none'})") from exc
        info.update(model_name=mv.name, model_version=str(mv.version), training_run_id=mv.run_id or "")
        if (mv.tags or {}).get("dataset"):
            info["trained_on"] = mv.tags["dataset"]
    elif uri.startswith("runs:/"):
        run_id = uri[len("runs:/"):].split("/", 1)[0]
        try:
            client.get_run(run_id)
        except MlflowException as exc:
            if _mlflow_error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise ModelNotFound(f"model_uri {uri!r}: no run {run_id!r} {where}") from exc
        info.update(training_run_id=run_id)
    elif "://" not in uri or uri.startswith("file://"):
        path = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
        if not path.exists():
            raise ModelNotFound(f"model_uri {uri!r}: {path} does not exist")
    return info


def download_package(uri: str, dst: Optional[Path] = None) -> Path:
    """Fetch the model behind `uri` (models:/, runs:/ or a local directory) and return its package directory
    (weights.safetensors + model.json). Only files are copied: nothing in them is run or unpickled here."""
    import tempfile

    import mlflow

    from trainer.model_package import CARD, find_package

    if uri.startswith("file://") or not (uri.startswith(("models:/", "runs:/")) or "://" in uri):
        root = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    else:
        # an outage propagates (with_store retries it); missing artifacts behind a registry entry are a refusal
        root = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(dst or tempfile.mkdtemp(prefix="model-"))))
    package = find_package(root)
    if package is None:
        pickled = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in (".pth", ".pkl", ".pt"))
        raise EvalError(f"model_uri {uri!r} is not a scha-vae model package (no {CARD} with safetensors weights"
                        + (f"; it holds pickled files {pickled[:3]}, which are never loaded" if pickled else "")
                        + "): register it again with a current training run or `python -m launch.export`")
    return package


# ------------------------------------------------------------------------------------------------ datasets
def check_omniglot(cfg: Config) -> None:
    """The configured Omniglot shards must be prepared and verify (evaluation never prepares or downloads)."""
    from data_pipeline.prepare import dataset_dir, stale_reason

    reason = stale_reason(cfg.data)
    if reason is not None:
        raise EvalError(
            f"dataset {cfg.data.name} is not prepared in {dataset_dir(cfg.data)}: {reason}. Prepare it first: "
            f"python -m launch.prepare data={cfg.data.name} data.raw_dir={cfg.data.raw_dir} "
            f"data.shards_dir={cfg.data.shards_dir}"
        )


def check_mnist(cfg: Config, splits: Sequence[str]) -> None:
    from data_pipeline.errors import DataError
    from data_pipeline.mnist import check_raw

    try:
        check_raw(cfg.eval.mnist_dir, splits)
    except DataError as exc:
        raise EvalError(str(exc)) from exc


# ------------------------------------------------------------------------------------------------ loaders
def batch_sets(cfg: Config) -> int:
    return cfg.eval.batch_sets or cfg.data.batch_sets


def eval_loader(cfg: Config, split: str, set_size: int, sets: Optional[int] = None, max_batches: Optional[int] = None):
    """Omniglot sets of `set_size` from `split`, without augmentation (SPEC 7); `sets` per batch."""
    from data_pipeline.sets import SetLoader

    data = replace(cfg.data, set_size=set_size, set_size_test=set_size, augment=False, augment_val=False,
                   batch_sets=sets or batch_sets(cfg),
                   limit_batches=cfg.eval.max_batches if max_batches is None else max_batches)
    return SetLoader(data, split)


def transfer_loader(cfg: Config, dataset: str, set_size: int, sets: Optional[int] = None,
                    max_batches: Optional[int] = None):
    """Binarised test sets of MNIST / DoubleMNIST / TripleMNIST (data_pipeline.mnist)."""
    from data_pipeline.mnist import TransferSets

    return TransferSets(dataset, cfg.eval.mnist_dir, "test", set_size, sets or batch_sets(cfg),
                        cfg.eval.max_batches if max_batches is None else max_batches, seed=cfg.eval.seed)


def quiet_mlflow_retries() -> None:
    """A job against an unreachable server should fail in seconds, not after MLflow's minutes of retries."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
