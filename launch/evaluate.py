"""`python -m launch.evaluate eval=<job> model_uri=models:/<name>@<alias> [overrides]` (jobs: docs/evaluation.md)."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from launch.app import CONFIG_DIR, validated


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(raw: DictConfig) -> None:
    cfg = validated(raw)
    import json

    from data_pipeline.errors import DataError
    from trainer import distributed, exit_codes
    from trainer.evaluation.common import EvalError, ModelNotFound, TrackingUnavailable
    from trainer.evaluation.jobs import run_job

    world = distributed.world()
    if world.world_size > 1:
        print(f"evaluation error: jobs run as one process (WORLD_SIZE={world.world_size}); start it without "
              "torchrun / deepspeed", file=sys.stderr)
        raise SystemExit(exit_codes.CONFIG_ERROR)
    try:
        rows = run_job(cfg, world.device)
    except (EvalError, DataError) as exc:
        print(f"evaluation error: {exc}", file=sys.stderr)
        code = (exit_codes.MODEL_NOT_FOUND if isinstance(exc, ModelNotFound) else
                exit_codes.TRACKING_UNAVAILABLE if isinstance(exc, TrackingUnavailable) else exit_codes.CONFIG_ERROR)
        raise SystemExit(code) from exc
    print(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
