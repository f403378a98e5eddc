"""Episodic training of the prototypical network (models/protonet.py) and its few-shot accuracy.

`class_images` reads one split of prepared shards as (names, images): every class's images as grey intensities in
[0, 1] (not binarised: the generative models' samples are Bernoulli means, which estimate exactly these
intensities, so real and generated images are compared in the same space). `train_protonet` draws episodes of
N-way K-shot classification from the TRAINING split only; `fewshot_accuracy` measures C-way K-shot accuracy on
any split (the figures are taken on the test classes, which neither the feature net nor the generative models saw).
All randomness comes from private generators seeded by the config: no global RNG is read.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from data_pipeline.config import DataConfig
from models.protonet import ProtoNet, ProtoNetConfig, episode_loss, logits, prototypes
from trainer.config import TrackingConfig
from trainer.evaluation.progress import bar

log = logging.getLogger(__name__)


@dataclass
class EpisodeConfig:
    """How the feature net is trained (episodes of `ways`-way `shots`-shot, `queries` queries per class) and how
    its accuracy is measured (`eval_episodes` episodes at each of `eval_ways`-way `eval_shots`-shot)."""

    episodes: int = 2000
    ways: int = 20
    shots: int = 5
    queries: int = 5
    lr: float = 1e-3
    lr_halvings: int = 2  # the learning rate halves this many times, evenly spaced over the episodes
    seed: int = 0
    threads: int = 0  # >0: torch.set_num_threads (the job is one process)
    eval_episodes: int = 200
    eval_ways: int = 20
    eval_shots: List[int] = field(default_factory=lambda: [1, 5])
    eval_queries: int = 5

    def __post_init__(self) -> None:
        for key in ("episodes", "ways", "shots", "queries", "eval_episodes", "eval_ways", "eval_queries"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.ways < 2 or self.eval_ways < 2:
            raise ValueError(f"train.ways and train.eval_ways must be >= 2, got {self.ways}, {self.eval_ways}")
        if not self.eval_shots or min(self.eval_shots) < 1:
            raise ValueError(f"train.eval_shots must be a non-empty list of shots >= 1, got {self.eval_shots}")
        if not self.lr > 0 or self.lr_halvings < 0 or self.threads < 0:
            raise ValueError("train.lr must be > 0, train.lr_halvings and train.threads >= 0")


@dataclass
class FeatureRunConfig:
    """`python -m launch.train_features` (configs/train_features.yaml)."""

    name: str = "protonet"  # run directory name and registered model name (unless tracking.model_name)
    run_dir: str = "runs/${name}"
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    net: ProtoNetConfig = field(default_factory=ProtoNetConfig)
    train: EpisodeConfig = field(default_factory=EpisodeConfig)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty string without '/', got {self.name!r}")
        if (self.net.image_channels, self.net.image_size) != (self.data.image_channels, self.data.image_size):
            raise ValueError("net.image_channels / net.image_size must match data.image_channels / data.image_size")


@dataclass
class ClassImages:
    """One split: class names and a (classes, n, C, H, W) float tensor in [0, 1] (the first n images of each class,
    n = the smallest class size; every Omniglot class has 20)."""

    names: List[str]
    images: torch.Tensor

    def __len__(self) -> int:
        return len(self.names)


def class_images(data: DataConfig, split: str) -> ClassImages:
    """Read `split` of the prepared, verified shards in {data.shards_dir}/{data.name} (DataError otherwise)."""
    from data_pipeline.shards import iter_shard, split_classes, verify_shards

    directory = Path(data.shards_dir) / data.name
    manifest = verify_shards(directory, data.name, splits=[split])
    files = list(dict.fromkeys(f for _, _, f in split_classes(manifest, split)))
    records = sorted((r for f in files for r in iter_shard(directory / f)), key=lambda r: r.class_index)
    n = min(len(r.images) for r in records)
    images = torch.from_numpy(np.stack([r.images[:n] for r in records])).float().div_(255.0)
    return ClassImages([r.name for r in records], images)


def _episode(classes: ClassImages, rng: np.random.Generator, ways: int, shots: int, queries: int):
    """(support (ways, shots, ...), query (ways, queries, ...)) of `ways` random classes, distinct images."""
    n = classes.images.shape[1]
    if shots + queries > n:
        raise ValueError(f"{shots} shots + {queries} queries need more than the {n} images per class")
    if ways > len(classes):
        raise ValueError(f"{ways}-way episodes need {ways} classes, the split has {len(classes)}")
    chosen = rng.choice(len(classes), ways, replace=False)
    picks = np.stack([rng.choice(n, shots + queries, replace=False) for _ in chosen])
    x = classes.images[torch.from_numpy(chosen)[:, None], torch.from_numpy(picks)]
    return x[:, :shots], x[:, shots:]


def train_protonet(cfg: ProtoNetConfig, train: EpisodeConfig, classes: ClassImages,
                   device: torch.device) -> Tuple[ProtoNet, Dict[str, float]]:
    """The net after `train.episodes` Adam steps on episodes of `classes` (the training split), and a summary."""
    gen = torch.Generator().manual_seed(train.seed)
    with torch.random.fork_rng(devices=[]):  # the init draws from a private seed, the caller's RNG is untouched
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        net = ProtoNet(cfg).to(device)
    rng = np.random.default_rng([train.seed, 0xFE])
    opt = torch.optim.Adam(net.parameters(), lr=train.lr)
    step = max(1, math.ceil(train.episodes / (train.lr_halvings + 1)))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step, gamma=0.5)
    net.train()
    start = time.monotonic()
    recent: List[Tuple[float, float]] = []
    with bar(train.episodes, f"protonet {train.ways}-way {train.shots}-shot", unit="episode") as progress:
        for episode in range(train.episodes):
            support, query = _episode(classes, rng, train.ways, train.shots, train.queries)
            loss, acc = episode_loss(net, support.to(device), query.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            recent.append((loss.item(), acc.item()))
            recent = recent[-100:]
            progress.update(1)
            if (episode + 1) % 100 == 0 or episode + 1 == train.episodes:
                progress.set_postfix(loss=f"{np.mean([r[0] for r in recent]):.3f}",
                                     acc=f"{np.mean([r[1] for r in recent]):.3f}")
    summary = {"train_loss_last100": float(np.mean([r[0] for r in recent])),
               "train_acc_last100": float(np.mean([r[1] for r in recent])),
               "seconds": time.monotonic() - start}
    return net.eval(), summary


@torch.no_grad()
def fewshot_accuracy(net: ProtoNet, classes: ClassImages, ways: int, shots: int, episodes: int, queries: int,
                     seed: int, device: torch.device, progress: Optional[object] = None) -> Tuple[float, float]:
    """Mean C-way K-shot accuracy over `episodes` episodes of `classes` and its standard error across episodes."""
    net.eval()
    rng = np.random.default_rng([seed, ways, shots, 0xACC])
    accs = []
    for _ in range(episodes):
        support, query = _episode(classes, rng, ways, shots, queries)
        emb_s = net(support.to(device))
        emb_q = net(query.to(device)).flatten(0, 1)
        pred = logits(emb_q, prototypes(emb_s)).argmax(1).cpu()
        accs.append(float((pred == torch.arange(ways).repeat_interleave(queries)).float().mean()))
        if progress is not None:
            progress.update(1)
    a = np.array(accs)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan")


def measure(net: ProtoNet, splits: Dict[str, ClassImages], train: EpisodeConfig,
            device: torch.device) -> Dict[str, float]:
    """{"<split>/<C>way_<K>shot": accuracy, "..._se": its standard error} for every split and eval shot."""
    out: Dict[str, float] = {}
    total = len(splits) * len(train.eval_shots) * train.eval_episodes
    with bar(total, f"protonet accuracy ({train.eval_ways}-way)", unit="episode") as progress:
        for split, classes in splits.items():
            for k in train.eval_shots:
                key = f"{split}/{train.eval_ways}way_{k}shot"
                out[key], out[f"{key}_se"] = fewshot_accuracy(net, classes, train.eval_ways, k, train.eval_episodes,
                                                               train.eval_queries, train.seed + 1, device, progress)
                log.info("protonet %s: %.4f +- %.4f", key, out[key], out[f"{key}_se"])
    return out
