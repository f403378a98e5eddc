"""`python -m launch.prepare data=<dataset> [data.raw_dir=...] [data.shards_dir=...]`: raw files -> shards."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from launch.app import CONFIG_DIR, exit_codes_of, validated
from trainer.run.exits import exit_with


def prepare(raw: DictConfig) -> None:
    from data_pipeline.prepare import prepare as write_shards

    out = write_shards(validated(raw).data, progress=True)
    print(f"shards written to {out}")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(raw: DictConfig) -> None:
    exit_with(lambda: prepare(raw))


if __name__ == "__main__":
    exit_codes_of(main)
