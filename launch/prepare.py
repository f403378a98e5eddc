"""`python -m launch.prepare data=<dataset> [data.raw_dir=...] [data.shards_dir=...]`: raw files -> shards."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from launch.app import CONFIG_DIR, validated


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(raw: DictConfig) -> None:
    cfg = validated(raw)
    from data_pipeline.prepare import prepare

    out = prepare(cfg.data, progress=True)
    print(f"shards written to {out}")


if __name__ == "__main__":
    main()
