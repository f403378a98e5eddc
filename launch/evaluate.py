"""`python -m launch.evaluate eval=<job> model_uri=models:/<name>@<alias> [overrides]`."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from launch.app import CONFIG_DIR, validated


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(raw: DictConfig) -> None:
    cfg = validated(raw)
    import json

    from trainer import distributed
    from trainer.evaluation.jobs import run_job

    rows = run_job(cfg, distributed.world().device)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
