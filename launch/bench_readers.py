"""`python -m launch.bench_readers [data=<dataset>] [data.reader=..] [data.sampling=..] [data.batch_sets=..] ...`

Reader throughput: one JSON line per (reader, sampling) with img/s and sets/s of the training split's batches
(augmentation and binarisation as configured). Without a `data.reader` / `data.sampling` override every reader of
every sampling is measured (global: torch, dali, resident; stream: torch, dali). The shards are prepared first if
needed. `data.limit_batches` sets the batches timed (default 30); the first batch (reading the classes for global
sampling, building pipelines) is reported separately as `first_batch_s`.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace

import hydra
from omegaconf import DictConfig

from launch.app import CONFIG_DIR, exit_codes_of, validated
from trainer.run.exits import exit_with

HELP = """
python -m launch.bench_readers [data=<dataset>] [data.reader=torch|dali|resident] [data.sampling=..] [key=value ...]

Reader throughput: one JSON line per (reader, sampling) with img/s and sets/s of the training split's batches.

Example:
  python -m launch.bench_readers data.batch_sets=16 data.limit_batches=20
Docs: docs/data.md, docs/performance.md.
"""

DEFAULT_BATCHES = 30
COMBINATIONS = (("torch", "global"), ("dali", "global"), ("resident", "global"), ("torch", "stream"), ("dali", "stream"))


def measure(data, split: str = "train") -> dict:
    from data_pipeline.loaders import make_set_loader

    start = time.perf_counter()
    loader = make_set_loader(data, split)
    loader.set_epoch(0)
    it = iter(loader)
    first = next(it)
    first_s = time.perf_counter() - start
    t0, n = time.perf_counter(), 0
    for x in it:
        n += 1
    if first.is_cuda:
        import torch

        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    b, s = first.shape[:2]
    rate = n / dt if n and dt > 0 else float("nan")
    return {
        "reader": data.reader, "sampling": data.sampling, "dataset": data.name, "split": split,
        "device": str(first.device), "batch_shape": list(first.shape), "batches_timed": n,
        "first_batch_s": round(first_s, 3), "img_per_s": round(rate * b * s, 1), "sets_per_s": round(rate * b, 1),
        "num_workers": data.num_workers, "augment": data.augment, "binarize": data.binarize,
    }


def bench_readers(raw: DictConfig) -> None:
    cfg = validated(raw)
    from hydra.core.hydra_config import HydraConfig

    from data_pipeline.prepare import ensure_prepared

    overrides = HydraConfig.get().overrides.task
    fixed_reader = any(o.startswith("data.reader=") for o in overrides)
    fixed_sampling = any(o.startswith("data.sampling=") for o in overrides)
    data = cfg.data if cfg.data.limit_batches else replace(cfg.data, limit_batches=DEFAULT_BATCHES + 1)
    ensure_prepared(data, progress=False)
    for reader, sampling in COMBINATIONS:
        if (fixed_reader and reader != data.reader) or (fixed_sampling and sampling != data.sampling):
            continue
        print(json.dumps(measure(replace(data, reader=reader, sampling=sampling))), flush=True)


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(raw: DictConfig) -> None:
    exit_with(lambda: bench_readers(raw))


if __name__ == "__main__":
    exit_codes_of(main, HELP)
