"""`python -m launch.train_features [data=<dataset>] [net.*=..] [train.*=..]`: the feature network of
eval=sample_quality (a prototypical network trained on the training classes only; docs/evaluation.md)."""
from __future__ import annotations

import json
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from launch.app import CONFIG_DIR, exit_codes_of
from trainer.evaluation.feature_training import FeatureRunConfig

ConfigStore.instance().store(name="features_schema", node=FeatureRunConfig)


@hydra.main(config_path=CONFIG_DIR, config_name="train_features", version_base="1.3")
def main(raw: DictConfig) -> None:
    import launch.app
    from data_pipeline.errors import DataError
    from trainer import distributed, exit_codes
    from trainer.evaluation.feature_run import run

    launch.app._composed = True
    import logging

    logging.getLogger().setLevel(logging.INFO)
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(FeatureRunConfig), raw))
    except Exception as exc:  # OmegaConf validation errors and our __post_init__ ValueErrors
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(exit_codes.CONFIG_ERROR) from exc
    try:
        result = run(cfg, distributed.world().device)
    except (DataError, ValueError) as exc:
        print(f"train_features error: {exc}", file=sys.stderr)
        raise SystemExit(exit_codes.CONFIG_ERROR) from exc
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    exit_codes_of(main)
