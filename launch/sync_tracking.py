"""`python -m launch.sync_tracking <run_dir> [tracking.uri=...]`: send to MLflow what a run could not.

A run whose tracking server was down past its end leaves `<run_dir>/tracking_fallback.jsonl` (metrics, the
model versions to register with their packages under `<run_dir>/to_register/`, the end of the run), or packages
in `to_register/` that a killed run never wrote into it. The next
training start of the run directory replays it by itself; this command does it for a run that will not start
again. It opens the run as training would (the MLflow run in `mlflow_run.json` when it is in this store, else a
new one), sends every call in order, registers the versions with their aliases and finishes the run.
Exit codes: 0 sent (or nothing to send), 2 bad run directory or override, 8 the store stayed unreachable
(tracking.flush_timeout_s; the calls stay in the fallback file).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

os.environ.setdefault("OMP_NUM_THREADS", "1")


from launch.app import cli

HELP = """
python -m launch.sync_tracking <run_dir> [tracking.uri=...]

Sends to MLflow what a run could not while its server was down (<run_dir>/tracking_fallback.jsonl: metrics,
model versions to register, the end of the run). The next training start of the run does this by itself.

Example:
  python -m launch.sync_tracking runs/demo tracking.uri=http://127.0.0.1:5000
Docs: docs/reliability.md (tracking outages).
"""

def sync(argv: List[str]) -> int:
    from trainer.run import exit_codes
    from trainer.run.errors import ConfigError, TrackingUnavailable

    if not argv or argv[0].startswith("-"):
        raise ConfigError(f"usage: {__doc__.split(chr(10))[0]}")
    run_dir, overrides = Path(argv[0]), argv[1:]

    import logging

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from data_pipeline.locations import dataset_location
    from data_pipeline.shard_source import source_of
    from trainer.config import flat_params, load_config
    from trainer.registry.tracking import FALLBACK, Tracker, orphan_packages

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    try:
        cfg = load_config(OmegaConf.merge(OmegaConf.load(config_file), OmegaConf.from_dotlist(overrides)))
    except (OmegaConfBaseException, ValueError) as exc:  # a foreign config.yaml, a bad override
        raise ConfigError(f"{run_dir}: {exc}") from exc
    pending = [run_dir / FALLBACK, run_dir / "tracking_fallback.replaying.jsonl"]
    if not any(p.is_file() for p in pending) and not orphan_packages(run_dir, []):
        print(f"{run_dir}: nothing to send (no {FALLBACK}, no package waiting in to_register/)")
        return exit_codes.OK
    tracker = Tracker(cfg.tracking, run_dir, enabled=True)
    exists = source_of(cfg.data).exists()
    tracker.start(cfg.name, flat_params(cfg), config_file,
                  dataset_dir=dataset_location(cfg.data) if exists else None, replay_end=True)
    tracker.end(status=None)
    if (run_dir / FALLBACK).is_file():
        raise TrackingUnavailable(f"calls still pending in {run_dir / FALLBACK}")
    print(f"{run_dir}: sent to MLflow run {tracker.run_id}")
    return exit_codes.OK


main = cli(sync, HELP)


if __name__ == "__main__":
    raise SystemExit(main())
