"""`python -m launch.train_features`: train the sample-quality feature net on the training classes, measure it on
real validation and test images, write its package into {run_dir}/feature_model/ and register it in MLflow."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Dict

import torch

from trainer.evaluation.feature_model import FeatureCard, register_feature_package, write_feature_package
from trainer.evaluation.feature_training import FeatureRunConfig, class_images, measure, train_protonet

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
    net, summary = train_protonet(cfg.net, t, train, device)
    log.info("protonet trained in %.0f s (last 100 episodes: loss %.3f, accuracy %.3f)", summary["seconds"],
             summary["train_loss_last100"], summary["train_acc_last100"])
    accuracy = measure(net, {"val": class_images(cfg.data, "val"), "test": class_images(cfg.data, "test")}, t, device)
    card = FeatureCard(net=cfg.net, dataset=cfg.data.name, split="train", train_classes=train.names,
                       training={**asdict(t), **summary}, accuracy=accuracy)
    run_dir = Path(cfg.run_dir)
    package = write_feature_package(run_dir / "feature_model", net, card)
    result = {"package": str(package), **accuracy}
    if cfg.tracking.enabled:
        result.update(_track(cfg, card, package))
    (run_dir / "feature_model.json").write_text(json.dumps(result, indent=2))
    return result


def _track(cfg: FeatureRunConfig, card: FeatureCard, package: Path) -> Dict[str, str]:
    import mlflow

    from trainer.registry.store import use_store

    use_store(cfg.tracking)
    name = cfg.tracking.model_name or cfg.name
    params = {f"net.{k}": v for k, v in asdict(cfg.net).items()}
    params.update({f"train.{k}": json.dumps(v) if isinstance(v, list) else v for k, v in asdict(cfg.train).items()})
    params.update({"data.name": cfg.data.name, "train_classes": len(card.train_classes)})
    with mlflow.start_run(run_name=f"features-{name}", tags={"kind": "feature_model", "dataset": cfg.data.name}) as r:
        mlflow.log_params(params)
        mlflow.log_metrics({k.replace("/", "_"): v for k, v in card.accuracy.items()})
        mlflow.log_metric("train_seconds", card.training["seconds"])
        run_id = r.info.run_id
    card.run_id = run_id
    (package / "feature_model.json").write_text(card.to_json())
    version = register_feature_package(package, run_id, name)
    log.info("registered feature model %s version %s (models:/%s@champion)", name, version, name)
    return {"run_id": run_id, "model_name": name, "model_version": version, "model_uri": f"models:/{name}@champion"}
