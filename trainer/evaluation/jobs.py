"""Evaluation jobs on a registered model: load it from MLflow, compute, log a table back to MLflow."""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Dict, List

import torch

from data_pipeline.prepare import ensure_prepared
from data_pipeline.sets import SetLoader
from trainer.config import Config
from trainer.evaluation.elbo import evaluate_elbo
from trainer.evaluation.marginal import marginal_nll
from trainer.tracking import use_store

log = logging.getLogger(__name__)


def resolve_model(uri: str) -> Dict[str, str]:
    """For models:/name@alias or models:/name/version: the registry name, version and training run."""
    from mlflow import MlflowClient

    info = {"model_uri": uri}
    if uri.startswith("models:/"):
        ref = uri[len("models:/"):]
        client = MlflowClient()
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = ref.split("/", 1)
            mv = client.get_model_version(name, version)
        info.update(model_name=mv.name, model_version=str(mv.version), training_run_id=mv.run_id or "")
    return info


def eval_loader(cfg: Config, split: str, set_size: int, device: torch.device):
    """Sets of `set_size` from `split`, without augmentation (SPEC 7)."""
    data = replace(cfg.data, set_size=set_size, set_size_test=set_size, augment=False, augment_val=False,
                   limit_batches=cfg.eval.max_batches)
    return SetLoader(data, split)


def run_job(cfg: Config, device: torch.device) -> List[Dict[str, float]]:
    import mlflow

    if not cfg.model_uri:
        raise ValueError("model_uri is required, e.g. model_uri=models:/demo@champion")
    use_store(cfg.tracking)
    info = resolve_model(cfg.model_uri)
    model = mlflow.pytorch.load_model(cfg.model_uri, map_location=device).to(device).eval()
    ensure_prepared(cfg.data, progress=True)
    rows = []
    for s in cfg.eval.set_sizes:
        batches = eval_loader(cfg, cfg.eval.split, s, device)
        if cfg.eval.job == "elbo":
            result = evaluate_elbo(model, batches, device)
        else:
            result = marginal_nll(model, batches, device, cfg.eval.importance_samples, cfg.eval.chunk)
        rows.append({"set_size": s, "split": cfg.eval.split, **result})
        log.info("%s S=%d: %s", cfg.eval.job, s, result)
    tags = {k: v for k, v in info.items()}
    with mlflow.start_run(run_name=f"eval-{cfg.eval.job}-{info.get('model_name', 'model')}", tags=tags):
        mlflow.log_params({"job": cfg.eval.job, "split": cfg.eval.split, "dataset": cfg.data.name,
                           "importance_samples": cfg.eval.importance_samples})
        for row in rows:
            mlflow.log_metrics({f"{k}_S{row['set_size']}": v for k, v in row.items()
                                if isinstance(v, float)})
        mlflow.log_dict(rows, f"{cfg.eval.job}.json")
    out = Path(cfg.run_dir) / f"eval_{cfg.eval.job}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "rows": rows}, indent=2))
    return rows
