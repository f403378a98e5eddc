"""The MLflow store a process talks to: its URI, whether an error is an outage or a refusal, MLflow's own HTTP
retry settings (one set for every caller), and the backoff our own retries follow.

Our callers retry outages themselves (the tracker's sender for as long as a run lasts, registry lookups for
`tracking.outage_timeout_s`), so MLflow's HTTP client must not retry under them: its default of minutes of
retries per call would stall each attempt.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple

from trainer.config import TrackingConfig

# MLflow error codes that a retry cannot fix; anything else from MLflow (its INTERNAL_ERROR wraps connection
# failures, 5xx, timeouts) is an outage
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST",
                    "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED", "FEATURE_DISABLED"}
# one attempt per call, each bounded; no progress bars from a background thread; a user's own settings win
# MLflow's own "View run" links open its UI's GenAI view: ours (run_link) open the training view instead
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
                 "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
BACKOFF_CAP_S = 30.0
# the MLflow UI opens an experiment in the view its kind names (values of the UI's own experiment-kind enum);
# without it, an experiment with logged models is shown as "GenAI" ("Agent versions")
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": "Few-shot generative models (SCHA-VAE and baselines) trained by scha-vae: one run per "
                           "training, its checkpoints as logged models and registry versions, one run per "
                           "evaluation job nested under it.",
}


def bound_http_requests() -> None:
    for key, value in HTTP_SETTINGS.items():
        os.environ.setdefault(key, value)


def mlflow_log_to(path: Path) -> None:
    """MLflow's own log records (its INFO lines, "Validating input example", registry notes) go to `path` instead
    of the training output: a run's console shows our progress, its directory keeps MLflow's side."""
    import logging

    logger = logging.getLogger("mlflow")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False


ENV_URI = "MLFLOW_TRACKING_URI"
LOCAL_DEFAULT = f"the local default: tracking.uri and {ENV_URI} unset"


def store_choice(cfg: TrackingConfig) -> Tuple[str, str]:
    """The store and why, as MLflow users expect: `tracking.uri` given explicitly wins, then MLflow's own
    MLFLOW_TRACKING_URI, then the embedded sqlite store under `tracking.root` (LOCAL_DEFAULT)."""
    if cfg.uri:
        return cfg.uri, "tracking.uri"
    if os.environ.get(ENV_URI):
        return os.environ[ENV_URI], ENV_URI
    return f"sqlite:///{Path(cfg.root).resolve()}/mlflow.db", LOCAL_DEFAULT


def uses_local_default(cfg: TrackingConfig) -> bool:
    return store_choice(cfg)[1] == LOCAL_DEFAULT


def tracking_uri(cfg: TrackingConfig) -> str:
    uri, why = store_choice(cfg)
    if why == LOCAL_DEFAULT:
        Path(cfg.root).resolve().mkdir(parents=True, exist_ok=True)
    return uri


def describe_store(cfg: TrackingConfig) -> str:
    uri, why = store_choice(cfg)
    return f"{uri} ({why})" if why == LOCAL_DEFAULT else f"{uri} (from {why})"


def run_link(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI of a tracking server (empty for a local store, which has no UI of its own).
    MLflow 3's UI shows an experiment holding logged models in its GenAI view whatever the experiment's kind tag
    says; `workflowType=machine_learning` opens the training view (metrics charts, system metrics)."""
    if not uri.startswith(("http://", "https://")):
        return ""
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def point_mlflow_at(uri: str) -> None:
    """`mlflow.set_tracking_uri`, leaving the user's MLFLOW_TRACKING_URI as it was: MLflow exports the URI it is
    given into the environment, and then a later choice in this process (another run directory's local store, a
    serving worker) would read our choice back as the user's."""
    import mlflow

    before = os.environ.get(ENV_URI)
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop(ENV_URI, None)
    else:
        os.environ[ENV_URI] = before


def transient(exc: BaseException) -> bool:
    """True for an outage (worth retrying), False for a refusal or a bug."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return str(exc.error_code) not in PERMANENT_ERRORS
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False  # a local store's file: waiting does not bring it back
    return isinstance(exc, (OSError, TimeoutError)) or type(exc).__module__.startswith(("requests", "urllib3"))


def first_line(exc: BaseException, limit: int = 300) -> str:
    return (str(exc).splitlines() or [""])[0][:limit]


def use_store(cfg: TrackingConfig) -> None:
    """Point MLflow at the configured store (and create the experiment with a local artifact root)."""
    bound_http_requests()
    import mlflow

    point_mlflow_at(tracking_uri(cfg))
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is None:  # a store we were pointed at keeps its own artifact root
        location = (Path(cfg.root).resolve() / "artifacts").as_uri() if uses_local_default(cfg) else None
        mlflow.create_experiment(cfg.experiment, artifact_location=location, tags=EXPERIMENT_TAGS)
    elif "mlflow.experimentKind" not in experiment.tags:  # made by an older release, or by hand
        for key, value in EXPERIMENT_TAGS.items():
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    mlflow.set_experiment(cfg.experiment)


class Backoff:
    """Delays between retries of an outage: `first_s`, doubling, at most BACKOFF_CAP_S; `reset` after a success."""

    def __init__(self, first_s: float) -> None:
        self.first_s = max(first_s, 0.1)
        self.delay = self.first_s

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, BACKOFF_CAP_S)
        return delay

    def peek(self) -> float:
        return self.delay

    def reset(self) -> None:
        self.delay = self.first_s
