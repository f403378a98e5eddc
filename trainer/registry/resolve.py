"""A model URI to a model package on disk: look it up in the registry (models:/<name>@<alias>, models:/<name>/<n>,
runs:/..., a local directory) without loading anything, riding out a store outage for tracking.outage_timeout_s,
then copy its files. Nothing fetched is run or unpickled here: trainer/registry/package.py reads what arrives.

Used alike by evaluation jobs, `launch.generate` and `launch.export`'s read-back; the failures are ModelNotFound
(exit 9), TrackingUnavailable (exit 8) and RegistryError (a refusal, exit 2).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Dict, Optional, TypeVar

from trainer.config import Config, TrackingConfig
from trainer.registry.store import (Backoff, bound_http_requests, first_line, tracking_uri, transient, use_store,
                                    uses_local_default)
from trainer.run.errors import ModelNotFound, Refused, TrackingUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


class RegistryError(Refused):
    """The store refused a lookup, or what a URI names is not a scha-vae model package."""

    label = "model error"


def with_store(cfg: TrackingConfig, what: str, fn: Callable[[], T]) -> T:
    """fn() retried with backoff while the store is unreachable (an outage, not a refusal), for at most
    tracking.outage_timeout_s; then TrackingUnavailable naming the store and the last error."""
    deadline = time.monotonic() + cfg.outage_timeout_s
    backoff = Backoff(cfg.retry_s)
    warned = False
    while True:
        try:
            return fn()
        except Refused:
            raise
        except Exception as exc:
            first = first_line(exc)
            if not transient(exc):
                raise RegistryError(f"{what}: the MLflow store {tracking_uri(cfg)} refused ({type(exc).__name__}: "
                                    f"{first})") from exc
            if time.monotonic() + backoff.peek() > deadline:
                raise TrackingUnavailable(
                    f"{what}: the MLflow store {tracking_uri(cfg)} stayed unreachable for "
                    f"{cfg.outage_timeout_s:.0f} s (tracking.outage_timeout_s; last error {type(exc).__name__}: "
                    f"{first}); run the job again when it is back") from exc
            if not warned:
                log.warning("MLflow store unreachable (%s); retrying for up to %.0f s", first, cfg.outage_timeout_s)
                warned = True
            time.sleep(backoff.next())


def open_model(cfg: Config) -> Dict[str, str]:
    """Use the store and resolve cfg.model_uri, riding out an outage of up to tracking.outage_timeout_s; a local
    package directory (`launch.export`'s) needs no store."""
    if is_local(cfg.model_uri):
        return resolve_model(cfg.model_uri)
    bound_http_requests()
    check_store(cfg.tracking)

    def resolve() -> Dict[str, str]:
        use_store(cfg.tracking)
        return resolve_model(cfg.model_uri)

    return with_store(cfg.tracking, f"model_uri {cfg.model_uri!r}", resolve)


def is_local(uri: str) -> bool:
    return bool(uri) and (uri.startswith("file://") or not (uri.startswith(("models:/", "runs:/")) or "://" in uri))


def fetch_package(cfg: Config) -> Path:
    """The package directory of cfg.model_uri (after `open_model`), fetched through outages like it."""
    return with_store(cfg.tracking, f"model_uri {cfg.model_uri!r}", lambda: download_package(cfg.model_uri))


def check_store(cfg: TrackingConfig) -> None:
    """The embedded sqlite store must exist already (an evaluation never creates an empty registry)."""
    if not uses_local_default(cfg):
        return
    db = Path(cfg.root).resolve() / "mlflow.db"
    if not db.is_file():
        raise ModelNotFound(
            f"no MLflow store at {db} (tracking.root={cfg.root}): train a model first, or point tracking.root, "
            f"tracking.uri or MLFLOW_TRACKING_URI at the store that holds the registered model"
        )


def _mlflow_error_code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", "") or "")


def resolve_model(uri: str) -> Dict[str, str]:
    """Look the model up without loading it: registry name, version and training run for models:/ URIs.

    Raises ModelNotFound naming the missing registered model, alias or version (listing what does exist), a missing
    run for runs:/ URIs, or a missing local path.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not uri:
        raise ModelNotFound("model_uri is required, e.g. model_uri=models:/demo@champion")
    info = {"model_uri": uri}
    if is_local(uri):  # a package directory: no store is opened (nor created)
        path = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
        if not path.exists():
            raise ModelNotFound(f"model_uri {uri!r}: {path} does not exist")
        return info
    client = MlflowClient()
    where = f"in the MLflow store {mlflow.get_tracking_uri()}"
    if uri.startswith("models:/"):
        ref = uri[len("models:/"):]
        name, at, alias = ref.partition("@")
        version = None
        if not at:
            name, slash, version = ref.rpartition("/")
            if not slash or not name:
                raise RegistryError(f"model_uri {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
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
    return info


def download_package(uri: str, dst: Optional[Path] = None) -> Path:
    """Fetch the model behind `uri` (models:/, runs:/ or a local directory) and return its package directory
    (weights.safetensors + model.json). Only files are copied: nothing in them is run or unpickled here."""
    import tempfile

    import mlflow

    from trainer.registry.package import CARD, find_package

    if is_local(uri):
        root = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    else:
        # an outage propagates (with_store retries it); missing artifacts behind a registry entry are a refusal
        root = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(dst or tempfile.mkdtemp(prefix="model-"))))
    package = find_package(root)
    if package is None:
        pickled = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in (".pth", ".pkl", ".pt"))
        raise RegistryError(f"model_uri {uri!r} is not a scha-vae model package (no {CARD} with safetensors weights"
                        + (f"; it holds pickled files {pickled[:3]}, which are never loaded" if pickled else "")
                        + "): register it again with a current training run or `python -m launch.export`")
    return package
