"""`python -m launch.evaluate eval=<job> model_uri=models:/<name>@<alias> [overrides]` (jobs: docs/evaluation.md)."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from launch.app import CONFIG_DIR, exit_codes_of, validated
from trainer.run.exits import exit_with


def evaluate(raw: DictConfig) -> None:
    import json

    from trainer import distributed
    from trainer.evaluation.jobs import run_job
    from trainer.run.errors import ConfigError

    cfg = validated(raw)
    world = distributed.world()
    if world.world_size > 1:
        raise ConfigError(f"jobs run as one process (WORLD_SIZE={world.world_size}); start it without torchrun / "
                          "deepspeed")
    print(json.dumps(run_job(cfg, world.device), indent=2, default=str))


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(raw: DictConfig) -> None:
    exit_with(lambda: evaluate(raw))


if __name__ == "__main__":
    exit_codes_of(main)
