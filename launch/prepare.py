"""`python -m launch.prepare data=<dataset> [data.raw_dir=...] [data.shards_dir=...]`: raw files -> shards."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from launch.app import CONFIG_DIR, exit_codes_of, validated
from trainer.run.exits import exit_with

HELP = """
python -m launch.prepare data=<dataset> [data.raw_dir=DIR] [data.shards_dir=DIR]

Turns the raw files (Omniglot's zips, MNIST IDX files, CelebA) into class-grouped webdataset shards and a
manifest with every shard's sha256; downloads official files where a URL exists, checked by checksum.
Reruns with the same settings do nothing.

Main options:
  data=<dataset>             omniglot_ns, omniglot_back_eval, celeba, ...
  data.raw_dir=DIR           where the raw files are (default data/raw/omniglot)
  data.shards_dir=DIR        where the shards go (default data/shards; a folder per dataset), or
                             s3://<bucket>/<prefix> (AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)
Example:
  python -m launch.prepare data=omniglot_ns data.raw_dir=../shared/data/omniglot
Docs: docs/data.md.
"""


def prepare(raw: DictConfig) -> None:
    from data_pipeline.prepare import prepare as write_shards

    out = write_shards(validated(raw).data, progress=True)
    print(f"shards written to {out}")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(raw: DictConfig) -> None:
    exit_with(lambda: prepare(raw))


if __name__ == "__main__":
    exit_codes_of(main, HELP)
