"""Checkpoints behind a small interface: save everything needed to resume exactly, find the latest, load it.

DeepSpeed writes the engine state (module, optimizer, every rank's shard) under `<dir>/<tag>/` and moves the
`latest` pointer only after the write completes; our client state rides along in the same call.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from trainer import distributed


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, directory: Path, keep: int) -> None:
        self.dir = Path(directory)
        self.keep = keep

    def latest_tag(self) -> Optional[str]:
        pointer = self.dir / "latest"
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        return tag if (self.dir / tag).is_dir() else None

    def save(self, engine, step: int, client_state: Dict[str, Any]) -> str:
        tag = f"step{step:09d}"
        engine.save_checkpoint(str(self.dir), tag=tag, client_state={**client_state, "rng": rng_state()})
        distributed.barrier()
        if distributed.is_main():
            self._prune(keep_tag=tag)
        return tag

    def load(self, engine, tag: str) -> Dict[str, Any]:
        _, client_state = engine.load_checkpoint(str(self.dir), tag=tag, load_module_strict=True)
        if client_state is None:
            raise RuntimeError(f"checkpoint {self.dir / tag} could not be loaded")
        set_rng_state(client_state.pop("rng"))
        return client_state

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.name for p in self.dir.glob("step*") if p.is_dir())
        for old in tags[: max(0, len(tags) - self.keep)]:
            if old != keep_tag:
                shutil.rmtree(self.dir / old, ignore_errors=True)
