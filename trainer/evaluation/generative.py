"""Likelihood jobs: elbo, marginal, cardinality, kl_layer and transfer (SPEC 7). All values are nats per image.

elbo: analytic ELBO terms per image at each set size. marginal: the K-sample IWAE NLL (K = 1000 by default)
with its standard error, the bound at smaller K on the same draws, and the NELBO of the same sets.
cardinality: the ELBO terms at set sizes 1/2/5/10/20 on the train and test splits (models are trained at one S
and evaluated at others). kl_layer: KL_z and KL_c per layer (top layer = index 0). transfer: NLL and NELBO on
binarised MNIST / DoubleMNIST / TripleMNIST test sets.
"""
from __future__ import annotations

import logging
from typing import Dict, List

from trainer.evaluation.common import JobResult, eval_loader, transfer_loader
from trainer.evaluation.elbo import evaluate_elbo
from trainer.evaluation.figures import bars_figure, lines_figure
from trainer.evaluation.marginal import chunk_for, marginal_nll
from trainer.evaluation.progress import announce, loader_work, tracked

log = logging.getLogger(__name__)


def _announce_importance(cfg, job: str, work, batch_sets: int) -> None:
    e = cfg.eval
    chunk = chunk_for(e.chunk, e.importance_samples, min(batch_sets, work.sets) * work.set_size,
                      e.max_images_per_pass)
    announce(job, work, e.importance_samples, chunk)


def _omniglot_passes(cfg, job: str, splits, importance: bool = False) -> Dict:
    """{(split, set size): (loader, its Work)} for every pass of the job, each announced before the first runs."""
    passes = {}
    for split in splits:
        for s in cfg.eval.set_sizes:
            loader = eval_loader(cfg, split, s)
            work = loader_work(loader, f"{split} classes")
            if importance:
                _announce_importance(cfg, job, work, loader.batch_sets)
            else:
                announce(job, work)
            passes[split, s] = loader, work
    return passes


def _drain(passes: Dict):
    """The passes in order, each dropped once run: a loader keeps its split's images once it has read them."""
    while passes:
        key = next(iter(passes))
        yield key, passes.pop(key)


def elbo_job(ctx) -> JobResult:
    cfg = ctx.cfg
    rows = []
    passes = _omniglot_passes(cfg, "elbo", [cfg.eval.split])
    for (_, s), (loader, work) in _drain(passes):
        result = evaluate_elbo(ctx.model, tracked(loader, work, f"elbo S={s}"), ctx.device)
        rows.append({"set_size": s, "split": cfg.eval.split, **result})
        log.info("elbo S=%d: %s", s, result)
    metrics = {f"vlb_S{r['set_size']}": r["vlb"] for r in rows}
    return JobResult(rows, metrics=metrics)


def marginal_job(ctx) -> JobResult:
    cfg = ctx.cfg
    e = cfg.eval
    rows: List[Dict] = []
    by_k: List[Dict] = []
    passes = _omniglot_passes(cfg, "marginal", [e.split], importance=True)
    for (_, s), (loader, work) in _drain(passes):
        result = marginal_nll(ctx.model, tracked(loader, work, f"marginal S={s} K={e.importance_samples}"),
                              ctx.device, e.importance_samples, e.chunk, ks=e.k_values, with_elbo=True,
                              max_images=e.max_images_per_pass)
        for row in result.pop("by_k"):
            by_k.append({"set_size": s, **row})
        rows.append({"set_size": s, "split": e.split, **result})
        log.info("marginal S=%d: NLL %.3f +- %.3f (K=%d), NELBO %.3f", s, result["nll"], result["nll_se"],
                 e.importance_samples, result["nelbo"])
    series = {f"S={s}": ([r["k"] for r in by_k if r["set_size"] == s], [r["nll"] for r in by_k if r["set_size"] == s],
                         [r["nll_se"] for r in by_k if r["set_size"] == s]) for s in e.set_sizes}
    k_all = sorted({k for k in e.k_values if k < e.importance_samples} | {e.importance_samples})
    dashed = {f"S={r['set_size']}": ([k_all[0], k_all[-1]], [r["nelbo"]] * 2) for r in rows}
    fig = lines_figure("importance samples K", "nats per image", series,
                       f"IWAE NLL vs K ({cfg.data.name} {e.split}); dashed: NELBO", log_x=True, dashed=dashed,
                       dashed_suffix=" NELBO")
    metrics = {}
    for r in rows:
        metrics.update({f"nll_S{r['set_size']}": r["nll"], f"nll_se_S{r['set_size']}": r["nll_se"],
                        f"nelbo_S{r['set_size']}": r["nelbo"]})
    return JobResult(rows, tables={"marginal_by_k": by_k}, figures={"nll_vs_k.png": fig}, metrics=metrics)


def cardinality_job(ctx) -> JobResult:
    cfg = ctx.cfg
    rows = []
    for (split, s), (loader, work) in _drain(_omniglot_passes(cfg, "cardinality", cfg.eval.splits)):
        result = evaluate_elbo(ctx.model, tracked(loader, work, f"cardinality {split} S={s}"), ctx.device)
        rows.append({"split": split, "set_size": s, **{k: result[k] for k in ("vlb", "logpx", "kl_z", "kl_c")}})
        log.info("cardinality %s S=%d: vlb %.3f", split, s, result["vlb"])
    fig = lines_figure(
        "set size S", "ELBO (nats per image)",
        {split: ([r["set_size"] for r in rows if r["split"] == split], [r["vlb"] for r in rows if r["split"] == split])
         for split in cfg.eval.splits},
        f"ELBO vs set cardinality ({cfg.data.name})", log_x=True,
    )
    metrics = {f"vlb_{r['split']}_S{r['set_size']}": r["vlb"] for r in rows}
    return JobResult(rows, figures={"elbo_vs_set_size.png": fig}, metrics=metrics)


def kl_layer_job(ctx) -> JobResult:
    cfg = ctx.cfg
    rows = []
    per_size = {}
    for (_, s), (loader, work) in _drain(_omniglot_passes(cfg, "kl_layer", [cfg.eval.split])):
        result = evaluate_elbo(ctx.model, tracked(loader, work, f"kl_layer S={s}"), ctx.device)
        layers = {"KL_z": [], "KL_c": []}
        for kind, prefix in (("z", "kl_z_layer"), ("c", "kl_c_layer")):
            i = 0
            while f"{prefix}{i}" in result:
                rows.append({"set_size": s, "latent": kind, "layer": i, "kl": result[f"{prefix}{i}"]})
                layers[f"KL_{kind}"].append(result[f"{prefix}{i}"])
                i += 1
        per_size[s] = layers
    groups = {kind: {f"S={s}": per_size[s][kind] for s in cfg.eval.set_sizes} for kind in ("KL_z", "KL_c")}
    fig = bars_figure(groups, "layer (0 = top)", "KL (nats per image)",
                      f"KL per layer ({cfg.data.name} {cfg.eval.split})")
    metrics = {f"kl_{r['latent']}_layer{r['layer']}_S{r['set_size']}": r["kl"] for r in rows}
    return JobResult(rows, figures={"kl_per_layer.png": fig}, metrics=metrics)


def transfer_job(ctx) -> JobResult:
    cfg = ctx.cfg
    e = cfg.eval
    rows = []
    passes = {}
    for dataset in e.transfer_datasets:  # every pass counted and announced before the first one runs
        for s in e.set_sizes:
            loader = transfer_loader(cfg, dataset, s)
            passes[dataset, s] = loader, loader_work(loader, f"{dataset} test classes")
            _announce_importance(cfg, "transfer", passes[dataset, s][1], loader.batch_sets)
    for (dataset, s), (loader, work) in _drain(passes):
        result = marginal_nll(ctx.model, tracked(loader, work, f"transfer {dataset} S={s}"), ctx.device,
                              e.importance_samples, e.chunk, with_elbo=True, max_images=e.max_images_per_pass)
        result.pop("by_k")
        rows.append({"dataset": dataset, "set_size": s, **result})
        log.info("transfer %s S=%d: NLL %.3f NELBO %.3f", dataset, s, result["nll"], result["nelbo"])
    series = {d: ([r["set_size"] for r in rows if r["dataset"] == d], [r["nll"] for r in rows if r["dataset"] == d],
                  [r["nll_se"] for r in rows if r["dataset"] == d]) for d in e.transfer_datasets}
    dashed = {d: ([r["set_size"] for r in rows if r["dataset"] == d],
                  [r["nelbo"] for r in rows if r["dataset"] == d]) for d in e.transfer_datasets}
    fig = lines_figure("set size S", "nats per image", series,
                       f"Transfer from {cfg.data.name}: NLL (K={e.importance_samples}, solid) and NELBO (dashed)",
                       log_x=True, dashed=dashed, dashed_suffix=" NELBO")
    metrics = {}
    for r in rows:
        metrics.update({f"nll_{r['dataset']}_S{r['set_size']}": r["nll"],
                        f"nelbo_{r['dataset']}_S{r['set_size']}": r["nelbo"]})
    return JobResult(rows, figures={"transfer.png": fig}, metrics=metrics)
