"""What every evaluation job shares: fail-fast dataset checks, loaders, and the job result type (the model URI is
checked by trainer/registry/resolve.py).

The checks only look things up (registry entries, manifests, file names); they run before any model or data is
loaded, so a wrong `model_uri` or an unprepared dataset fails in seconds with a message naming what is missing.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence

from trainer.config import Config
from trainer.run.errors import Refused


class EvalError(Refused):
    """An evaluation cannot run: the message names the missing dataset or capability."""

    label = "evaluation error"


@dataclass
class JobResult:
    """What a job hands back to the runner: the main table (one dict per row), extra named tables, figures
    (file name -> matplotlib Figure) and summary metrics (logged as MLflow metrics)."""

    rows: List[Dict[str, Any]]
    tables: Dict[str, Any] = field(default_factory=dict)
    figures: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ datasets
def check_omniglot(cfg: Config) -> None:
    """The configured Omniglot shards must be prepared and verify (evaluation never prepares or downloads)."""
    from data_pipeline.prepare import stale_reason
    from data_pipeline.locations import dataset_location

    reason = stale_reason(cfg.data)
    if reason is not None:
        raise EvalError(
            f"dataset {cfg.data.name} is not prepared in {dataset_location(cfg.data)}: {reason}. Prepare it first: "
            f"python -m launch.prepare data={cfg.data.name} data.raw_dir={cfg.data.raw_dir} "
            f"data.shards_dir={cfg.data.shards_dir}"
        )


def check_mnist(cfg: Config, splits: Sequence[str]) -> None:
    from data_pipeline.errors import DataError
    from data_pipeline.mnist import check_raw

    try:
        check_raw(cfg.eval.mnist_dir, splits)
    except DataError as exc:
        raise EvalError(str(exc)) from exc


# ------------------------------------------------------------------------------------------------ loaders
def batch_sets(cfg: Config) -> int:
    return cfg.eval.batch_sets or cfg.data.batch_sets


def eval_loader(cfg: Config, split: str, set_size: int, sets: Optional[int] = None, max_batches: Optional[int] = None):
    """Omniglot sets of `set_size` from `split`, without augmentation (SPEC 7); `sets` per batch."""
    from data_pipeline.sets import SetLoader

    data = replace(cfg.data, set_size=set_size, set_size_test=set_size, augment=False, augment_val=False,
                   batch_sets=sets or batch_sets(cfg),
                   limit_batches=cfg.eval.max_batches if max_batches is None else max_batches)
    return SetLoader(data, split)


def transfer_loader(cfg: Config, dataset: str, set_size: int, sets: Optional[int] = None,
                    max_batches: Optional[int] = None):
    """Binarised test sets of MNIST / DoubleMNIST / TripleMNIST (data_pipeline.mnist)."""
    from data_pipeline.mnist import TransferSets

    return TransferSets(dataset, cfg.eval.mnist_dir, "test", set_size, sets or batch_sets(cfg),
                        cfg.eval.max_batches if max_batches is None else max_batches, seed=cfg.eval.seed)
