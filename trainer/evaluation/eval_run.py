"""The MLflow run of one evaluation job: opened before the work (so its duration is the job's), with the
evaluated model and dataset as its inputs, and finished with the job's headline metrics, each logged once
(`eval/<job>/<metric>`, linked to the version's logged model), its tables and figures; the version gets its
`eval.<job>.*` tags. A job that fails ends its run FAILED."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional

from trainer.config import EVAL_JOB_KEYS, Config
from trainer.registry.store import run_link, use_store

log = logging.getLogger(__name__)


def _model_id(info: Dict[str, str]) -> str:
    from mlflow import MlflowClient

    from trainer.registry.mlflow_model import version_model_id

    if not (info.get("model_name") and info.get("model_version")):
        return ""
    return version_model_id(MlflowClient().get_model_version(info["model_name"], info["model_version"]))


def _dataset_input(cfg: Config):
    from data_pipeline.locations import dataset_location
    from data_pipeline.shard_source import source_of
    from trainer.registry.mlflow_model import DatasetRecord

    if not source_of(cfg.data).exists():  # a job on MNIST only
        return None
    return DatasetRecord.from_manifest(dataset_location(cfg.data)).to_input(context="evaluation")


def open_run(cfg: Config, info: Dict[str, str]) -> str:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelInput, Param

    use_store(cfg.tracking)  # also for a local package, which open_model resolved without a store
    client = MlflowClient()
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    tags = {**info, "eval_job": cfg.eval.job, "dataset": cfg.data.name}
    training_run = info.get("training_run_id")
    if training_run:
        try:
            if client.get_run(training_run).info.experiment_id == experiment.experiment_id:
                tags["mlflow.parentRunId"] = training_run  # shown nested under the training run
        except Exception:  # the training run was deleted, or lives in a store we cannot read
            pass
    version = info.get("model_version", "")
    run_name = f"eval-{cfg.eval.job}-{info.get('model_name', 'model')}" + (f"-v{version}" if version else "")
    run_id = client.create_run(experiment.experiment_id, run_name=run_name, tags=tags).info.run_id
    every = asdict(cfg.eval)
    params = {f"eval.{k}": (json.dumps(every[k]) if isinstance(every[k], list) else every[k])
              for k in ("job", "seed", *EVAL_JOB_KEYS[cfg.eval.job])}
    params.update({"data.name": cfg.data.name, "model_uri": cfg.model_uri})
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    model_id = _model_id(info)
    dataset = _dataset_input(cfg)
    client.log_inputs(run_id, datasets=[dataset] if dataset else None,
                      models=[LoggedModelInput(model_id)] if model_id else None)
    return run_id


def finish_run(cfg: Config, info: Dict[str, str], run_id: str, metrics: Dict[str, float], out_dir: Path) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from trainer.registry.mlflow_model import record_evaluation

    client = MlflowClient()
    job = cfg.eval.job
    finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    model_id: Optional[str] = _model_id(info) or None
    now = int(time.time() * 1000)
    if finite:
        client.log_batch(run_id, metrics=[Metric(f"eval/{job}/{k}", v, now, 0, model_id=model_id)
                                          for k, v in finite.items()])
    client.log_artifacts(run_id, str(out_dir))
    if info.get("model_name") and info.get("model_version"):
        try:
            record_evaluation(info["model_name"], info["model_version"], job, finite)
        except Exception as exc:  # read-only registry permissions: the eval run itself is what matters
            log.warning("could not tag model version %s/%s: %s", info["model_name"], info["model_version"], exc)
    client.set_terminated(run_id, "FINISHED")
    import mlflow

    link = run_link(mlflow.get_tracking_uri(), client.get_run(run_id).info.experiment_id, run_id)
    log.info("logged eval=%s to MLflow run %s%s", job, run_id, f" ({link})" if link else "")


def fail_run(run_id: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_terminated(run_id, "FAILED")
