"""`python -m launch.train_features`: train the sample-quality feature net on the training classes, measure it on
real validation and test images, write its package into {run_dir}/feature_model/ and register it in MLflow."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict

import torch

from trainer.evaluation.feature_model import FeatureCard, register_feature_package, write_feature_package
from trainer.evaluation.feature_training import FeatureRunConfig, class_images, measure, train_protonet
from trainer.registry.store import describe_store, use_store
from trainer.registry import system_metrics

log = logging.getLogger(__name__)


def run(cfg: FeatureRunConfig, device: torch.device) -> Dict[str, float]:
    from data_pipeline.prepare import ensure_prepared

    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    ensure_prepared(cfg.data)  # like launch.train: prepares the shards when missing, reuses them otherwise
    train = class_images(cfg.data, "train")  # the only split it learns from
    log.info("protonet: %d training classes x %d images; %d episodes of %d-way %d-shot (%d queries per class), "
             "%d channels x %d blocks", len(train), train.images.shape[1], t.episodes, t.ways, t.shots, t.queries,
             cfg.net.channels, cfg.net.blocks)
    run_id = _open(cfg) if cfg.tracking.enabled else ""  # before the work: the run's duration is the training's
    try:
        with system_metrics.sampled(cfg.tracking, run_id):
            net, summary = train_protonet(cfg.net, t, train, device)
            log.info("protonet trained in %.0f s (last 100 episodes: loss %.3f, accuracy %.3f)", summary["seconds"],
                     summary["train_loss_last100"], summary["train_acc_last100"])
            accuracy = measure(net, {"val": class_images(cfg.data, "val"), "test": class_images(cfg.data, "test")},
                               t, device)
    except BaseException:
        if run_id:
            _fail(run_id)
        raise
    card = FeatureCard(net=cfg.net, dataset=cfg.data.name, split="train", train_classes=train.names,
                       training={**asdict(t), **summary}, accuracy=accuracy, run_id=run_id)
    run_dir = Path(cfg.run_dir)
    package = write_feature_package(run_dir / "feature_model", net, card)
    result = {"package": str(package), **accuracy}
    if run_id:
        result.update(_finish(cfg, card, package, run_id))
    (run_dir / "feature_model.json").write_text(json.dumps(result, indent=2))
    return result


def _open(cfg: FeatureRunConfig) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Param

    use_store(cfg.tracking)
    name = cfg.tracking.model_name or cfg.name
    client = MlflowClient()
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    run_id = client.create_run(experiment.experiment_id, run_name=f"features-{name}",
                               tags={"kind": "feature_model", "dataset": cfg.data.name}).info.run_id
    params = {f"net.{k}": v for k, v in asdict(cfg.net).items()}
    params.update({f"train.{k}": json.dumps(v) if isinstance(v, list) else v for k, v in asdict(cfg.train).items()})
    params["data.name"] = cfg.data.name
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    log.info("MLflow store %s, run %s", describe_store(cfg.tracking), run_id)
    return run_id


def _fail(run_id: str) -> None:
    from mlflow import MlflowClient

    try:
        MlflowClient().set_terminated(run_id, "FAILED")
    except Exception as exc:  # the training's own failure is what the user must see
        log.warning("could not mark MLflow run %s failed: %s", run_id, exc)


def _finish(cfg: FeatureRunConfig, card: FeatureCard, package: Path, run_id: str) -> Dict[str, str]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient()
    now = int(time.time() * 1000)
    metrics = {k.replace("/", "_"): v for k, v in card.accuracy.items()}
    metrics["train_seconds"] = card.training["seconds"]
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     params=[Param("train_classes", str(len(card.train_classes)))])
    name = cfg.tracking.model_name or cfg.name
    version = register_feature_package(package, run_id, name)
    client.set_terminated(run_id, "FINISHED")
    log.info("registered feature model %s version %s (models:/%s@champion)", name, version, name)
    return {"run_id": run_id, "model_name": name, "model_version": version, "model_uri": f"models:/{name}@champion"}
