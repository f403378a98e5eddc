"""`python -m launch.train_features [data=<dataset>] [net.*=..] [train.*=..]`: the feature network of
eval=sample_quality (a prototypical network trained on the training classes only; docs/evaluation.md)."""
from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from launch.app import CONFIG_DIR, exit_codes_of
from trainer.evaluation.feature_training import FeatureRunConfig
from trainer.run.exits import exit_with

ConfigStore.instance().store(name="features_schema", node=FeatureRunConfig)

HELP = """
python -m launch.train_features [key=value ...]

Trains the feature network of eval=sample_quality: a prototypical network, episodes of N-way K-shot
classification on the TRAINING classes only (~9 min on 2 CPU cores at the defaults). Writes its package
(weights.safetensors + feature_model.json) to {run_dir}/feature_model/ and registers it in MLflow.

Main options:
  data=<dataset>             omniglot_ns (default) or omniglot_back_eval; data.raw_dir=..., data.shards_dir=...
  name=protonet              run directory runs/<name> and registered model name (tracking.model_name overrides)
  net.channels=32            train.episodes=3000   train.ways=20   train.shots=5   train.seed=0
  tracking.root=mlruns       or tracking.uri=http://host:port
Example:
  python -m launch.train_features data.raw_dir=../shared/data/omniglot
Docs: docs/evaluation.md (sample_quality: the feature network, its measured accuracy).
"""


def train_features(raw: DictConfig) -> None:
    import json
    import logging

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    import launch.app
    from trainer import distributed
    from trainer.evaluation.feature_run import run
    from trainer.run.errors import ConfigError

    launch.app._composed = True  # Hydra composed the config: exit codes are ours from here on
    logging.getLogger().setLevel(logging.INFO)
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(FeatureRunConfig), raw))
    except (OmegaConfBaseException, ValueError) as exc:  # a value of the wrong type, our __post_init__ checks
        raise ConfigError(str(exc)) from exc
    print(json.dumps(run(cfg, distributed.world().device), indent=2))


@hydra.main(config_path=CONFIG_DIR, config_name="train_features", version_base="1.3")
def main(raw: DictConfig) -> None:
    exit_with(lambda: train_features(raw))


if __name__ == "__main__":
    exit_codes_of(main, HELP, FeatureRunConfig)
