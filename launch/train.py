"""`python -m launch.train experiment=<preset> [overrides]` (also under torchrun / deepspeed --no_local_rank)."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from launch.app import CONFIG_DIR, validated


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(raw: DictConfig) -> None:
    cfg = validated(raw)
    from data_pipeline.errors import DataError
    from trainer import distributed
    from trainer.loop import Trainer

    world = distributed.init()
    try:
        Trainer(cfg, world).fit()
    except DataError as exc:
        print(f"data error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
