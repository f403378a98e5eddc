"""Pictures of a training run: every `trainer.sample_every_epochs` epochs a grid of fixed validation sets with
their reconstructions and conditional samples, and at the end a learning curve (train and validation ELBO per
epoch on one chart). Written to `<run_dir>/figures/` and sent to the run's MLflow artifacts.

Drawing a picture changes nothing of the training: the sets are read from the shards directly (no loader state),
the samples are drawn under a forked, fixed-seed RNG, and the model is put back in training mode.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from trainer.evaluation.figures import Figure, grids_figure
from trainer.evaluation.posteriors import has_context

FIXED_SETS = 6
SEED = 0


def fixed_validation_sets(data, sets: int = FIXED_SETS) -> torch.Tensor:
    """The first images of the first `sets` validation classes, (sets, S, C, H, W) in [0, 1], binarised with a
    private seeded generator for dynamically binarised data."""
    from data_pipeline.shard_source import source_of

    source = source_of(data)
    chosen: List[np.ndarray] = []
    for shard in source.verify(data.name, ["val"], check_sha256=False)["splits"]["val"]["shards"]:
        for record in source.records(shard["file"]):
            if len(record.images) >= data.set_size:
                chosen.append(record.images[:data.set_size])
            if len(chosen) == sets:
                break
        if len(chosen) == sets:
            break
    x = torch.from_numpy(np.stack(chosen).astype(np.float32) / 255.0)
    if data.binarize == "dynamic":
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(SEED))
    return x


@torch.no_grad()
def progress_figure(model: torch.nn.Module, x: torch.Tensor, epoch: int, epochs: int) -> Figure:
    """Validation sets | reconstructions | conditional samples (the context of each set, SPEC 3.12)."""
    devices = [x.device] if x.device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(SEED)
            panels: Dict[str, torch.Tensor] = {"validation sets": x, "reconstructions": model.reconstruct(x)}
            if has_context(model):
                panels["conditional samples"] = model.sample_conditional(x, mode="posterior")
    finally:
        model.train(was_training)
    name = getattr(model.cfg, "name", type(model).__name__)
    return grids_figure({k: v.float() for k, v in panels.items()},
                        f"{name} after epoch {epoch}/{epochs}: {x.shape[0]} fixed validation sets")


def learning_curve(run_dir: Path) -> Figure:
    """Train ELBO (mean of the epoch's step records) and validation ELBO per epoch, nats per image."""
    train: Dict[int, List[float]] = defaultdict(list)
    metrics = Path(run_dir) / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(record.get("vlb"), (int, float)) and not record.get("skipped"):
            train[int(record["epoch"]) + 1].append(float(record["vlb"]))  # records carry the epoch in progress
    val: Dict[int, float] = {}
    epochs_file = Path(run_dir) / "epochs.jsonl"
    for line in epochs_file.read_text().splitlines() if epochs_file.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record.get("val/vlb"), (int, float)):
            val[int(record["epoch"])] = float(record["val/vlb"])
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    if train:
        xs = sorted(train)
        ax.plot(xs, [float(np.mean(train[e])) for e in xs], marker="o", label="train ELBO (epoch mean)")
    if val:
        xs = sorted(val)
        ax.plot(xs, [val[e] for e in xs], marker="s", label="validation ELBO")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO (nats per image, higher is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("learning curve")
    fig.tight_layout()
    return fig
