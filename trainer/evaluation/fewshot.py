"""Few-shot classification of MNIST test digits, 10-way k-shot (SPEC 7, classifier_mnist.py), by two rules.

An episode draws one support set X_d of `eval.shots` images per digit d from the MNIST train split; every query
(an MNIST test image x, a one-member set) is classified against the 10 supports:
- KL rule: score(d) = sum_l sum_elements KL(q(c_l | X_d) || q(c_l | x)) over every context layer; predict argmin.
- ELBO-gain rule: score(d) = ELBO(X_d u {x}) - ELBO(X_d) (per-set ELBOs, analytic KLs); predict argmax, i.e. the
  support whose context explains x best.
Queries (all 10,000, or `eval.queries` drawn at random) are split evenly over `eval.episodes` episodes, so the
spread over support draws shows in the per-episode accuracies. Supports and queries are binarised (Bernoulli of
the intensities, seeded) since the models are Bernoulli models of binary images (the reference fed grey images
to its KL classifier). Accuracy comes with a 95 % Wilson score interval over queries and the standard error
across episodes; the confusion matrices have true digits in rows, predictions in columns.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List

import numpy as np
import torch

from data_pipeline.mnist import binarize, load_digits
from trainer.evaluation.common import JobResult, batch_sets
from trainer.evaluation.figures import confusion_figure
from trainer.evaluation.marginal import set_elbo_terms
from trainer.evaluation.posteriors import context_posteriors, pairwise_kl, require_context
from trainer.evaluation.progress import bar

log = logging.getLogger(__name__)

DIGITS = [str(d) for d in range(10)]
RULE_NAMES = {"kl": "KL rule (argmin KL(q(c|X_d) || q(c|x)))", "elbo_gain": "ELBO gain (argmax ELBO(X_d+x) - ELBO(X_d))"}


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple:
    """95 % Wilson score interval of a binomial proportion."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _images(x: np.ndarray, seed: int, device: torch.device) -> torch.Tensor:
    """uint8 (..., 28, 28) -> binarised float (..., 1, 28, 28) on device."""
    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(255.0).unsqueeze(-3)
    return binarize(t, seed).to(device)


@torch.no_grad()
def classify(model, support: torch.Tensor, queries: torch.Tensor, rules: List[str], batch: int,
             progress=None) -> Dict[str, np.ndarray]:
    """Predicted digit per query for each rule. support (10, k, 1, H, W), queries (Q, 1, H, W); `progress` (a
    tqdm bar) advances by the queries of each batch."""
    model.eval()
    preds: Dict[str, List[np.ndarray]] = {r: [] for r in rules}
    post_s = context_posteriors(model, support) if "kl" in rules else None
    elbo_s = set_elbo_terms(model, support)[:, 0] if "elbo_gain" in rules else None
    ways, shots = support.shape[:2]
    gain_batch = max(1, batch // ways)
    for start in range(0, len(queries), batch):
        xq = queries[start:start + batch]
        if "kl" in rules:
            score = pairwise_kl(post_s, context_posteriors(model, xq.unsqueeze(1)))  # (b, 10)
            preds["kl"].append(score.argmin(1).cpu().numpy())
        if "elbo_gain" in rules:
            for g in range(0, len(xq), gain_batch):
                xg = xq[g:g + gain_batch]
                b = len(xg)
                union = torch.cat([support.unsqueeze(0).expand(b, *support.shape),
                                   xg[:, None, None].expand(b, ways, 1, *xg.shape[1:])], dim=2)
                elbo_u = set_elbo_terms(model, union.reshape(b * ways, shots + 1, *xg.shape[1:]))[:, 0]
                preds["elbo_gain"].append((elbo_u.view(b, ways) - elbo_s).argmax(1).cpu().numpy())
        if progress is not None:
            progress.update(len(xq))
    return {r: np.concatenate(p) for r, p in preds.items()}


def fewshot_job(ctx) -> JobResult:
    cfg, model = ctx.cfg, ctx.model
    e = cfg.eval
    require_context(model, "fewshot")
    train_x, train_y = load_digits(e.mnist_dir, "train")
    test_x, test_y = load_digits(e.mnist_dir, "test")
    rng = np.random.default_rng([e.seed, 0xF5])
    if e.queries and e.queries < len(test_y):
        queries = np.sort(rng.choice(len(test_y), e.queries, replace=False))
    else:
        queries = np.arange(len(test_y))
    episodes = min(e.episodes, len(queries))
    pools = [np.flatnonzero(train_y == d) for d in range(10)]
    short = [d for d in range(10) if len(pools[d]) < e.shots]
    if short:
        raise ValueError(f"eval.shots={e.shots}: MNIST train has fewer images of digits {short}")
    xq_all = _images(test_x[queries], e.seed * 1_000_003 + 17, ctx.device)
    labels = test_y[queries]
    pred = {r: np.full(len(queries), -1) for r in e.rules}
    episode_of = np.empty(len(queries), int)
    episode_acc: Dict[str, List[float]] = {r: [] for r in e.rules}
    per_query = {"kl": "1 one-image context posterior", "elbo_gain": f"10 sets of {e.shots + 1} images"}
    log.info("eval=fewshot: %d MNIST test queries over %d episodes, 10-way %d-shot (10 support sets x %d train "
             "images per episode); per query %s", len(queries), episodes, e.shots, e.shots,
             ", ".join(f"{r}: {per_query[r]}" for r in e.rules))
    progress = bar(len(queries), "fewshot", unit="query")
    for ep in range(episodes):
        pos = np.arange(ep, len(queries), episodes)
        episode_of[pos] = ep
        support_idx = np.stack([rng.choice(pools[d], e.shots, replace=False) for d in range(10)])  # (10, shots)
        support = _images(train_x[support_idx], e.seed * 1_000_003 + 1000 + ep, ctx.device)
        out = classify(model, support, xq_all[pos], e.rules, batch_sets(cfg), progress)
        for r in e.rules:
            pred[r][pos] = out[r]
            episode_acc[r].append(float((out[r] == labels[pos]).mean()))
        log.info("fewshot episode %d/%d: %s", ep + 1, episodes,
                 ", ".join(f"{r} {episode_acc[r][-1]:.3f}" for r in e.rules))
    progress.close()
    rows, tables, matrices, metrics = [], {}, {}, {}
    for r in e.rules:
        correct = int((pred[r] == labels).sum())
        n = len(labels)
        lo, hi = wilson_interval(correct, n)
        accs = np.array(episode_acc[r])
        se = float(accs.std(ddof=1) / math.sqrt(len(accs))) if len(accs) > 1 else float("nan")
        rows.append({"rule": r, "ways": 10, "shots": e.shots, "queries": n, "episodes": episodes,
                     "correct": correct, "accuracy": correct / n, "ci95_low": lo, "ci95_high": hi,
                     "episode_accuracies": [float(a) for a in accs], "episode_se": se})
        m = np.zeros((10, 10), np.int64)
        np.add.at(m, (labels, pred[r]), 1)
        matrices[RULE_NAMES[r]] = m
        tables[f"confusion_{r}"] = {"labels": DIGITS, "rows": "true digit", "columns": "predicted digit",
                                    "matrix": m.tolist()}
        metrics.update({f"accuracy_{r}": correct / n, f"ci95_low_{r}": lo, f"ci95_high_{r}": hi})
        log.info("fewshot %s: accuracy %.4f (95%% CI %.4f-%.4f, %d queries)", r, correct / n, lo, hi, n)
    tables["fewshot_predictions"] = [
        {"query": int(q), "label": int(y), "episode": int(ep), **{f"pred_{r}": int(pred[r][i]) for r in e.rules}}
        for i, (q, y, ep) in enumerate(zip(queries, labels, episode_of))
    ]
    fig = confusion_figure(matrices, DIGITS, f"MNIST 10-way {e.shots}-shot, {len(labels)} test queries, "
                                             f"{episodes} episodes")
    return JobResult(rows, tables=tables, figures={"confusion.png": fig}, metrics=metrics)
