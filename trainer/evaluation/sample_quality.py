"""eval=sample_quality: does the model draw new members of the concept it was shown? (docs/evaluation.md)

Protocol (after Boutin et al., NeurIPS 2022, "Diversity vs. Recognizability: Human-like generalization in one-shot
generative models"), in the feature space of a prototypical network trained on the training classes only
(trainer/evaluation/feature_model.py):

- an *episode* is one test class k: a seeded draw of S of its images is the given set X_k (what the model is
  conditioned on); its other images are held out. C-1 other test classes (seeded) are the distractors, S real
  images each;
- the C prototypes are the mean features of X_k and of the distractors' S images (grey intensities);
- rows: `real` = N held-out real images of k (the ceiling: this is the feature net's own C-way S-shot accuracy),
  `conditional` / `refined` = N samples conditioned on X_k (binarised as in training; the sampling modes of
  SPEC 3.12), `unconditional` = N samples from the prior (what ignoring X_k scores);
- recognizability = fraction of a row's N images whose nearest prototype is k's (chance: 1/C), mean over
  episodes with its standard error across episodes; diversity = mean pairwise Euclidean feature distance among
  the N images of an episode, mean over episodes; FID = Frechet distance between Gaussians fitted to the features
  of all of a row's images and of the reference (the second half of every episode's held-out images); the real
  row's FID is that of the first half against the second: the floor a perfect sampler reaches.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import torch
from torch import Tensor

from trainer.evaluation.common import EvalError, JobResult
from trainer.evaluation.feature_training import ClassImages
from trainer.evaluation.figures import Figure, grids_figure
from trainer.evaluation.progress import bar

log = logging.getLogger(__name__)

ROWS = ("real", "conditional", "refined", "unconditional")
COLOURS = {"real": "black", "conditional": "tab:blue", "refined": "tab:green", "unconditional": "tab:red"}


# ------------------------------------------------------------------------------------------------ episodes
@dataclass
class Episodes:
    """E episodes: classes (E,), given sets (E, S, C, H, W), held-out images (E, n-S, ...), the C classes of each
    episode's classifier (E, C; column 0 = the episode's own class) and their support images (E, C, S, ...)."""

    classes: np.ndarray
    given: Tensor
    held_out: Tensor
    ways: np.ndarray
    support: Tensor

    def __len__(self) -> int:
        return len(self.classes)


def build_episodes(data: ClassImages, episodes: int, set_size: int, ways: int, seed: int) -> Episodes:
    n_classes, n = data.images.shape[:2]
    if episodes > n_classes:
        raise EvalError(f"eval.episodes={episodes}: the split has {n_classes} classes (one episode per class)")
    if not 2 <= ways <= n_classes:
        raise EvalError(f"eval.ways={ways} must be in 2..{n_classes} (the split's classes)")
    if set_size >= n:
        raise EvalError(f"eval.set_sizes[0]={set_size} leaves no held-out image of classes with {n} images")
    rng = np.random.default_rng([seed, 0x5A4D])
    classes = rng.permutation(n_classes)[:episodes]
    order = np.stack([rng.permutation(n) for _ in classes])
    imgs = data.images[torch.from_numpy(classes)[:, None], torch.from_numpy(order)]
    others = np.stack([rng.choice(np.delete(np.arange(n_classes), k), ways - 1, replace=False) for k in classes])
    way_classes = np.concatenate([classes[:, None], others], axis=1)
    picks = np.stack([[rng.choice(n, set_size, replace=False) for _ in range(ways - 1)] for _ in classes])
    distractors = data.images[torch.from_numpy(others)[..., None], torch.from_numpy(picks)]
    given = imgs[:, :set_size]
    support = torch.cat([given[:, None], distractors], dim=1)
    return Episodes(classes, given, imgs[:, set_size:], way_classes, support)


# ------------------------------------------------------------------------------------------------ metrics
@torch.no_grad()
def features(net, images: Tensor, batch: int = 512) -> Tensor:
    """(..., C, H, W) -> (..., D) float64 embeddings, `batch` images per pass."""
    flat = images.reshape(-1, *images.shape[-3:])
    device = next(net.parameters()).device
    out = torch.cat([net(flat[i:i + batch].to(device).float()).double().cpu() for i in range(0, len(flat), batch)])
    return out.reshape(*images.shape[:-3], -1)


def recognizability(feats: Tensor, protos: Tensor) -> Tensor:
    """Per episode, the fraction of its images (E, N, D) classified as class 0 by nearest prototype (E, C, D)."""
    return (torch.cdist(feats, protos).argmin(-1) == 0).double().mean(-1)


def diversity(feats: Tensor) -> Tensor:
    """Per episode, the mean pairwise Euclidean distance among its N images (E, N, D)."""
    return torch.stack([torch.pdist(f).mean() for f in feats])


def fid(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (M, D) and b (M', D):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)). scipy's sqrtm (Schur method) is the reference
    implementation; the tiny imaginary part it returns for a nearly singular product is rounding and dropped."""
    import warnings

    from scipy import linalg

    a64, b64 = a.double().numpy(), b.double().numpy()
    mu = a64.mean(0) - b64.mean(0)
    sa, sb = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    with warnings.catch_warnings():  # ReLU features have dead dimensions: a singular product is expected
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sa @ sb)
        if not np.isfinite(covmean).all():  # regularise, as the original FID code (TTUR) does
            eps = 1e-6 * np.eye(len(sa))
            covmean = linalg.sqrtm((sa + eps) @ (sb + eps))
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2.0 * np.trace(covmean.real))


def _se(values: Tensor) -> float:
    return float(values.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def score(net, ep: Episodes, samples: Dict[str, Tensor]) -> tuple:
    """Rows of the table and per-episode values, for `samples` = {row: (E, N, C, H, W) images}; the real row is
    added from the held-out images (first N of each episode; its FID: first half of the held-out images against
    the second half, which is every row's FID reference)."""
    protos = features(net, ep.support).mean(2)  # (E, C, D)
    held = features(net, ep.held_out)
    half = held.shape[1] // 2
    reference = held[:, half:].flatten(0, 1)
    n = next(iter(samples.values())).shape[1] if samples else held.shape[1]
    feats = {"real": held[:, :min(n, held.shape[1])]}
    feats.update({k: features(net, v) for k, v in samples.items()})
    rows, per_set = [], []
    chance = 1.0 / protos.shape[1]
    for kind in [r for r in ROWS if r in feats]:
        f = feats[kind]
        rec, div = recognizability(f, protos), diversity(f)
        distance = fid(held[:, :half].flatten(0, 1) if kind == "real" else f.flatten(0, 1), reference)
        rows.append({"row": kind, "episodes": len(ep), "images_per_set": f.shape[1], "ways": protos.shape[1],
                     "chance": chance, "recognizability": float(rec.mean()), "recognizability_se": _se(rec),
                     "diversity": float(div.mean()), "diversity_se": _se(div), "fid": distance,
                     "fid_images": (half if kind == "real" else f.shape[1]) * len(ep),
                     "fid_reference_images": len(reference)})
        per_set += [{"row": kind, "episode": i, "class": int(ep.classes[i]), "recognizability": float(rec[i]),
                     "diversity": float(div[i])} for i in range(len(ep))]
    return rows, per_set


# ------------------------------------------------------------------------------------------------ sampling
@torch.no_grad()
def draw(model, given: Tensor, kind: str, n: int, iterations: int) -> Tensor:
    """(b, n, C, H, W) Bernoulli means: `n` new members of each given set (b, S, ...), ceil(n / S) copies of the
    set per sampling pass (every copy its own context sample), or `n` unconditional images per set."""
    b, s = given.shape[:2]
    copies = math.ceil(n / s)
    if kind == "unconditional":
        y = model.sample_unconditional(b * copies, s)
    else:
        xs = given.repeat_interleave(copies, dim=0)
        y = (model.sample_conditional(xs, mode="posterior") if kind == "conditional"
             else model.sample_refined(xs, iterations=iterations, variant="v1"))
    return y.float().reshape(b, copies * s, *y.shape[2:])[:, :n].clamp_(0.0, 1.0).cpu()


def model_inputs(given: Tensor, binarize: bool, seed: int) -> Tensor:
    """The given sets as the model saw its training data: Bernoulli-binarised (seeded) for a Bernoulli model."""
    if not binarize:
        return given
    u = torch.rand(given.shape, generator=torch.Generator().manual_seed(seed))
    return (u < given).float()


# ------------------------------------------------------------------------------------------------ the job
def scatter_figure(per_set: List[Dict], rows: List[Dict], title: str) -> Figure:
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    jitter = np.random.default_rng(0)
    for row in rows:
        pts = [p for p in per_set if p["row"] == row["row"]]
        ys = np.array([p["recognizability"] for p in pts]) + jitter.uniform(-0.01, 0.01, len(pts))
        ax.scatter([p["diversity"] for p in pts], ys, s=10, alpha=0.35, color=COLOURS[row["row"]])
        ax.errorbar(row["diversity"], row["recognizability"], xerr=row["diversity_se"],
                    yerr=row["recognizability_se"], color=COLOURS[row["row"]], marker="o", markersize=8,
                    markeredgecolor="white", capsize=3, label=f"{row['row']} (FID {row['fid']:.1f})")
    ax.axhline(rows[0]["chance"], color="grey", linestyle=":", linewidth=1, label=f"chance 1/{rows[0]['ways']}")
    ax.set_xlabel("diversity (mean pairwise feature distance in a set)")
    ax.set_ylabel(f"recognizability ({rows[0]['ways']}-way prototype accuracy)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def sample_quality_job(ctx) -> JobResult:
    from trainer.evaluation.feature_training import class_images
    from trainer.evaluation.posteriors import has_context
    from trainer.evaluation.feature_model import load_feature_model

    cfg, model = ctx.cfg, ctx.model
    e = cfg.eval
    s, n = e.set_sizes[0], e.samples_per_set
    net, card, uri = load_feature_model(cfg, ctx.device)
    data = class_images(cfg.data, e.split)
    seen = sorted(set(data.names) & set(card.train_classes))
    if seen:
        raise EvalError(f"eval.feature_model {uri!r} was trained on {len(seen)} of the {e.split} classes "
                        f"(e.g. {seen[0]!r}): its feature space would favour them; train it on this split scheme")
    ep = build_episodes(data, e.episodes, s, e.ways, e.seed)
    kinds = ["conditional", "refined", "unconditional"] if has_context(model) else ["unconditional"]
    acc_key = f"test/{e.ways}way_{s}shot"
    log.info("eval=sample_quality: %d %s classes (one episode each) x %d given images; %d samples per set for %s "
             "(refined: %d iterations) = %d generated images; %d-way prototypes from %d real images per class; "
             "feature net %s (%d training classes; its %s accuracy %s)", len(ep), e.split, s, n, ", ".join(kinds),
             e.refine_iterations, len(ep) * n * len(kinds), e.ways, s, uri, len(card.train_classes), acc_key,
             f"{card.accuracy[acc_key]:.4f}" if acc_key in card.accuracy else "not measured")
    inputs = model_inputs(ep.given, ctx.card.inputs.binarize, e.seed * 7919 + s)
    step = e.batch_sets or cfg.data.batch_sets
    samples: Dict[str, List[Tensor]] = {k: [] for k in kinds}
    with bar(len(ep) * len(kinds), "sample_quality") as progress:
        for start in range(0, len(ep), step):
            x = inputs[start:start + step].to(ctx.device)
            for kind in kinds:
                samples[kind].append(draw(model, x, kind, n, e.refine_iterations))
                progress.update(x.shape[0])
    stacked = {k: torch.cat(v) for k, v in samples.items()}
    rows, per_set = score(net, ep, stacked)
    if not has_context(model):
        rows += [{"row": k, "status": "not defined for a model without context"} for k in ("conditional", "refined")]
    for r in rows:
        r["feature_model"] = uri
        r[f"feature_net_{e.ways}way_{s}shot"] = card.accuracy.get(acc_key, float("nan"))
        if "recognizability" in r:
            log.info("sample_quality %-13s recognizability %.3f +- %.3f  diversity %.3f  FID %.2f", r["row"],
                     r["recognizability"], r["recognizability_se"], r["diversity"], r["fid"])
    scored = [r for r in rows if "recognizability" in r]
    name = getattr(model.cfg, "name", type(model).__name__)
    figures = {"recognizability_vs_diversity.png": scatter_figure(
        per_set, scored, f"{name}: {e.ways}-way recognizability vs diversity, {len(ep)} {e.split} sets of {s}")}
    shown = min(len(ep), 6)
    panels = {"given set": ep.given[:shown], "real (held out)": ep.held_out[:shown, :n]}
    panels.update({k: v[:shown, :n] for k, v in stacked.items()})
    figures["sample_quality_sets.png"] = grids_figure(panels, f"{name}: given sets and {n} images per row kind")
    metrics = {}
    for r in scored:
        for key in ("recognizability", "recognizability_se", "diversity", "fid"):
            metrics[f"{key}_{r['row']}"] = r[key]
    if acc_key in card.accuracy:
        metrics[f"feature_accuracy_{e.ways}way_{s}shot"] = card.accuracy[acc_key]
    return JobResult(rows, tables={"sample_quality_sets": per_set}, figures=figures, metrics=metrics)
