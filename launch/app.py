"""Shared plumbing of the Hydra entry points: schema registration, logging, validated config."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from omegaconf import DictConfig

from trainer.config import Config, load_config, register_schema

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")

os.environ.setdefault("OMP_NUM_THREADS", "1")
register_schema()


def validated(cfg: DictConfig) -> Config:
    """Turn the composed config into the typed one; a bad value exits with the message naming its key."""
    logging.getLogger().setLevel(logging.INFO)
    try:
        return load_config(cfg)
    except Exception as exc:  # OmegaConf validation errors and our __post_init__ ValueErrors
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
