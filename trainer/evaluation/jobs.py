"""Evaluation jobs on a registered model: check, load it from MLflow, compute, log tables and figures back.

`run_job(cfg, device)`:
1. preflight (no model or data loaded yet): the MLflow store answers, `model_uri` resolves to a registered model
   version (or run / path), and the datasets the job reads are there (Omniglot shards prepared and verified,
   MNIST IDX files present). Anything missing raises EvalError naming it.
2. fetch the model package (safetensors weights + JSON card, trainer/registry/package.py; nothing unpickled), refuse
   a dataset whose split scheme differs from the one the model was trained on (unless eval.allow_other_dataset),
   build the model from the installed package and run the job with torch seeded by eval.seed;
3. write `{run_dir}/eval_{job}/` (`{job}.json` and `.csv`, extra tables, PNG figures) and the summary
   `{run_dir}/eval_{job}.json`, and log all of it to one MLflow run in `tracking.experiment`, tagged with the model
   URI, registry name and version and the training run id (and nested under the training run when both live in
   the same experiment); the model version gets the job's headline number as a tag
   (`eval.{job}.<metric>`, trainer/registry/mlflow_model.py EVAL_HEADLINE); every number is logged as a metric
   linked to the version's logged model.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import torch

from trainer.config import Config
from trainer.metrics import jsonable, strict_rows
from trainer.evaluation import eval_run
from trainer.evaluation.common import EvalError, JobResult, check_mnist, check_omniglot
from trainer.evaluation.fewshot import fewshot_job
from trainer.evaluation.feature_model import load_feature_model
from trainer.evaluation.generative import cardinality_job, elbo_job, kl_layer_job, marginal_job, transfer_job
from trainer.evaluation.sample_quality import sample_quality_job
from trainer.evaluation.visual import attention_job, samples_job
from trainer.registry.package import PackageError, read_card, read_package
from trainer.registry.resolve import fetch_package, open_model, with_store
from trainer.registry.store import describe_store
from trainer.registry import system_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    run: Callable[["Context"], JobResult]
    omniglot: Callable[[Config], bool]  # reads the configured Omniglot shards
    mnist_splits: Callable[[Config], Sequence[str]]  # MNIST splits it reads from eval.mnist_dir


def _always(cfg: Config) -> bool:
    return True


def _never(cfg: Config) -> Sequence[str]:
    return ()


JOBS: Dict[str, Job] = {
    "elbo": Job(elbo_job, _always, _never),
    "marginal": Job(marginal_job, _always, _never),
    "cardinality": Job(cardinality_job, _always, _never),
    "kl_layer": Job(kl_layer_job, _always, _never),
    "transfer": Job(transfer_job, lambda cfg: False, lambda cfg: ("test",)),
    "fewshot": Job(fewshot_job, lambda cfg: False, lambda cfg: ("train", "test")),
    "samples": Job(samples_job, lambda cfg: "omniglot" in cfg.eval.sources,
                   lambda cfg: ("test",) if "mnist" in cfg.eval.sources else ()),
    "attention": Job(attention_job, _always, _never),
    "sample_quality": Job(sample_quality_job, _always, _never),
}


@dataclass
class Context:
    cfg: Config
    model: torch.nn.Module
    device: torch.device
    info: Dict[str, str]
    card: Any = None  # trainer.registry.package.ModelCard


def preflight(cfg: Config) -> Dict[str, str]:
    """Every check that needs no model and no data: raises EvalError naming what is missing."""
    job = JOBS[cfg.eval.job]
    if not cfg.model_uri:
        raise EvalError("model_uri is required, e.g. model_uri=models:/demo@champion")
    info = open_model(cfg)
    log.info("MLflow store %s", describe_store(cfg.tracking))
    if info.get("trained_on"):  # from the version's tag: before any data is checked (the card confirms it)
        check_dataset(cfg, info["trained_on"])
    if job.omniglot(cfg):
        check_omniglot(cfg)
    splits = job.mnist_splits(cfg)
    if splits:
        check_mnist(cfg, splits)
    if cfg.eval.job == "sample_quality":  # its feature net, before the generative model is fetched
        load_feature_model(cfg)
    return info


def check_dataset(cfg: Config, trained_on: str) -> None:
    """Omniglot jobs must read the dataset the model was trained on: omniglot_ns and omniglot_back_eval split
    the characters differently, so the other one's test split holds characters the model trained on."""
    job = JOBS[cfg.eval.job]
    if job.omniglot(cfg) and cfg.data.name != trained_on and not cfg.eval.allow_other_dataset:
        raise EvalError(f"the model was trained on {trained_on!r} but data={cfg.data.name}: the two split the "
                        f"classes differently, so its test split may hold training classes. Pass data={trained_on}, "
                        f"or eval.allow_other_dataset=true to evaluate on {cfg.data.name} anyway")


def run_job(cfg: Config, device: torch.device) -> List[Dict[str, Any]]:
    name = cfg.eval.job
    info = preflight(cfg)
    package = fetch_package(cfg)
    try:
        card = read_card(package)
        check_dataset(cfg, card.inputs.dataset)
        model, card = read_package(package, device)
    except PackageError as exc:
        raise PackageError(f"model_uri {cfg.model_uri!r}: {exc}") from exc
    torch.manual_seed(cfg.eval.seed)
    log.info("eval=%s on %s (%s, %s parameters, trained on %s)", name, cfg.model_uri, card.paper_name,
             f"{card.n_params:,}", card.inputs.dataset)
    run_id = with_store(cfg.tracking, f"opening the MLflow run of eval={name}", lambda: eval_run.open_run(cfg, info))
    try:
        with system_metrics.sampled(cfg.tracking, run_id):
            result = JOBS[name].run(Context(cfg, model, device, info, card))
    except BaseException:
        try:
            eval_run.fail_run(run_id)
        except Exception as exc:  # the job's own failure is what the user must see
            log.warning("could not mark MLflow run %s failed: %s", run_id, exc)
        raise
    out_dir = Path(cfg.run_dir) / f"eval_{name}"
    files = write_outputs(out_dir, name, result)
    with_store(cfg.tracking, f"logging eval={name} (results are in {out_dir})",
               lambda: eval_run.finish_run(cfg, info, run_id, result.metrics, out_dir))
    summary = {**info, "eval_run_id": run_id, "job": name, "rows": strict_rows(result.rows),
               "artifacts": [str(f) for f in files]}
    (Path(cfg.run_dir) / f"eval_{name}.json").write_text(json.dumps(jsonable(summary), indent=2))
    return result.rows


# ------------------------------------------------------------------------------------------------ outputs
def to_csv(rows: List[Dict[str, Any]]) -> str:
    keys: List[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in jsonable(row).items()})
    return buf.getvalue()


def write_outputs(out_dir: Path, name: str, result: JobResult) -> List[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    tables = {name: result.rows, **result.tables}
    for table, content in tables.items():
        path = out_dir / f"{table}.json"
        path.write_text(json.dumps(jsonable(content), indent=2, allow_nan=False))
        files.append(path)
        if isinstance(content, list) and content and all(isinstance(r, dict) for r in content):
            path = out_dir / f"{table}.csv"
            path.write_text(to_csv(content))
            files.append(path)
    for fname, fig in result.figures.items():
        path = out_dir / fname
        fig.savefig(path, dpi=100)
        files.append(path)
    return files
