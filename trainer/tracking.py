"""Rank-0 MLflow tracking: one run per run directory (resumed runs continue it), models in the registry."""
from __future__ import annotations

import json
import logging
from pathlib import Path
import time
from typing import Dict, List, Optional

from torch import nn

from models.registry import build_model
from trainer.config import TrackingConfig
from trainer.metrics import STEP_KEYS

log = logging.getLogger(__name__)


def tracking_uri(cfg: TrackingConfig) -> str:
    if cfg.uri:
        return cfg.uri
    root = Path(cfg.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root}/mlflow.db"


def use_store(cfg: TrackingConfig) -> None:
    """Point MLflow at the configured store (and create the experiment with a local artifact root)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    if mlflow.get_experiment_by_name(cfg.experiment) is None:
        location = None if cfg.uri else (Path(cfg.root).resolve() / "artifacts").as_uri()
        mlflow.create_experiment(cfg.experiment, artifact_location=location)
    mlflow.set_experiment(cfg.experiment)


def clean_copy(model: nn.Module) -> nn.Module:
    """A fresh fp32 CPU instance with the same weights: no DeepSpeed hooks or process groups inside,
    so it pickles and loads back anywhere as the original class."""
    fresh = build_model(model.cfg)
    fresh.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    return fresh.eval()


class Tracker:
    """No-op unless enabled (rank 0 with tracking on). The MLflow run id is kept in the run directory."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, enabled: bool) -> None:
        self.cfg = cfg
        self.enabled = enabled and cfg.enabled
        self.id_file = Path(run_dir) / "mlflow_run.json"
        self.run_id: Optional[str] = None

    def start(self, run_name: str, params: Dict[str, object], config_file: Path) -> None:
        if not self.enabled:
            return
        import mlflow

        use_store(self.cfg)
        previous = json.loads(self.id_file.read_text())["run_id"] if self.id_file.exists() else None
        run = mlflow.start_run(run_id=previous, run_name=None if previous else run_name)
        self.run_id = run.info.run_id
        self.id_file.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": mlflow.get_tracking_uri()}))
        if previous is None:
            mlflow.log_params(params)
        mlflow.log_artifact(str(config_file))

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_metrics(metrics, step=step)

    def log_steps(self, records: List[Dict[str, float]]) -> None:
        """One batched request for a whole flush of per-step records."""
        if not self.enabled:
            return
        import mlflow
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(f"train/{k}", float(r[k]), now, int(r["step"]))
            for r in records for k in STEP_KEYS + ("lr", "img_per_s")
        ]
        client = mlflow.MlflowClient()
        for i in range(0, len(metrics), 1000):  # the server's per-request limit
            client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def register_model(self, model: nn.Module, model_name: str, aliases: tuple, tag: str) -> Optional[str]:
        """Log the model (original class, pickled) and register it; returns the registry version."""
        if not (self.enabled and self.cfg.register):
            return None
        import mlflow
        from mlflow import MlflowClient

        info = mlflow.pytorch.log_model(
            clean_copy(model), name=f"model-{tag}", serialization_format="pickle",
            registered_model_name=model_name,
        )
        version = str(info.registered_model_version)
        client = MlflowClient()
        client.set_model_version_tag(model_name, version, "checkpoint", tag)
        client.set_model_version_tag(model_name, version, "training_run_id", self.run_id)
        for alias in aliases:
            client.set_registered_model_alias(model_name, alias, version)
        return version

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled:
            import mlflow

            mlflow.end_run(status=status)
