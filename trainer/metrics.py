"""Per-step training metrics kept on the device and flushed every N steps (the loop's only host syncs)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List

import torch

from trainer import distributed

STEP_KEYS = ("loss", "vlb", "logpx", "kl_z", "kl_c", "skipped")


class StepMetrics:
    """Buffers one small device tensor per step; `flush` syncs once and returns one record per step."""

    def __init__(self, jsonl: Path, enabled: bool) -> None:
        self.jsonl = Path(jsonl)
        self.enabled = enabled
        self.rows: List[torch.Tensor] = []
        self.first_step = 0
        self.t0 = time.perf_counter()
        self.images = 0

    def add(self, step: int, values: torch.Tensor, images: int) -> None:
        if not self.rows:
            self.first_step = step
        self.rows.append(values.detach())
        self.images += images

    def flush(self, extra: Dict[str, float]) -> List[Dict[str, float]]:
        if not self.rows:
            return []
        # every rank's micro batch has the same size: the mean over ranks is the global batch's value
        values = distributed.mean_over_ranks(torch.stack(self.rows).float()).cpu().tolist()
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        img_s = self.images * distributed.world_size() / elapsed
        records = [
            {"step": self.first_step + i, **dict(zip(STEP_KEYS, row)), **extra, "img_per_s": img_s}
            for i, row in enumerate(values)
        ]
        self.rows, self.images, self.t0 = [], 0, time.perf_counter()
        if self.enabled:
            with self.jsonl.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        return records


def read_step_records(jsonl: Path) -> Dict[int, Dict[str, float]]:
    """Last record per step (a resumed run rewrites the steps after its checkpoint)."""
    out: Dict[int, Dict[str, float]] = {}
    for line in Path(jsonl).read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r
    return out
