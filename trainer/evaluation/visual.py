"""Figure jobs: samples (SPEC 3.12 sampling modes on Omniglot test sets and MNIST sets) and attention (LAG).

samples: per source, one figure with the input sets, stochastic reconstructions, conditional samples (context
from the posterior: `sample_conditional(x, mode="posterior")`, which for single-context models equals the
top-context mode), refined samples (`sample_refined`, v1, `eval.refine_iterations` iterations) and unconditional
samples, each a grid of sets (rows) x members (columns), Bernoulli means; plus one figure per source with every
refinement iterate (columns) of the first member of each set (rows). The VAE has no context, so its conditional
and refined panels are skipped (noted in the table).
attention: one batch of test sets; the attention weights of every attentive aggregation (per head, over the
members), bar charts next to each set and a conditional sample of it, plus a layers x members heat map
(mean over heads) for models with several attentive layers.
"""
from __future__ import annotations

import logging
from typing import Dict, List

import numpy as np
import torch

from data_pipeline.mnist import binarize, load_digits
from trainer.evaluation.common import JobResult, eval_loader
from trainer.evaluation.figures import Figure, grids_figure, image_grid, show
from trainer.evaluation.posteriors import attention_weights, has_context

log = logging.getLogger(__name__)


def omniglot_sets(cfg, set_size: int) -> torch.Tensor:
    loader = eval_loader(cfg, cfg.eval.split, set_size, sets=cfg.eval.num_sets, max_batches=1)
    return next(iter(loader))


def mnist_sets(cfg, set_size: int) -> torch.Tensor:
    """One binarised set per digit (the first `num_sets` digits) from MNIST test images, seeded choice."""
    images, labels = load_digits(cfg.eval.mnist_dir, "test")
    rng = np.random.default_rng([cfg.eval.seed, 0x5A])
    digits = range(min(cfg.eval.num_sets, 10))
    idx = np.stack([rng.choice(np.flatnonzero(labels == d), set_size, replace=False) for d in digits])
    x = torch.from_numpy(images[idx]).to(torch.float32).div_(255.0).unsqueeze(2)
    return binarize(x, cfg.eval.seed * 7919 + set_size)


@torch.no_grad()
def samples_job(ctx) -> JobResult:
    cfg, model = ctx.cfg, ctx.model
    e = cfg.eval
    s = e.set_sizes[0]
    rows: List[Dict] = []
    figures = {}
    sources = {"omniglot": lambda: omniglot_sets(cfg, s), "mnist": lambda: mnist_sets(cfg, s)}
    log.info("eval=samples: one batch of up to %d sets x %d images from each of %s; reconstructions, "
             "conditional and refined (%d iterations) samples, unconditional samples", e.num_sets, s,
             ", ".join(e.sources), e.refine_iterations)
    for source in e.sources:
        x = sources[source]().to(ctx.device)
        b = x.shape[0]
        panels = {"input sets": x, "reconstructions": model.reconstruct(x)}
        skipped = []
        if has_context(model):
            panels["conditional"] = model.sample_conditional(x, mode="posterior")
            iterates = model.sample_refined(x, iterations=e.refine_iterations, variant="v1", return_all=True)
            panels[f"refined ({e.refine_iterations} it.)"] = iterates[-1]
            refine = iterates[:, :, 0].transpose(0, 1)  # (B, iterations + 1, C, H, W): member 0 of every set
            fig = Figure(figsize=(max(6.0, 0.6 * (e.refine_iterations + 2)), max(3.0, 0.6 * b + 1.2)))
            ax = fig.add_subplot(1, 1, 1)
            show(ax, image_grid(torch.cat([x[:, :1], refine], dim=1)),
                 f"{source}: input | conditional sample | refinement iterations 1-{e.refine_iterations}")
            fig.tight_layout()
            figures[f"refine_{source}.png"] = fig
        else:
            skipped = ["conditional", "refined"]
        panels["unconditional"] = model.sample_unconditional(b, s)
        figures[f"samples_{source}.png"] = grids_figure(
            panels, f"{getattr(model.cfg, 'name', type(model).__name__)} on {source} sets ({b} sets x {s})")
        for kind, images in panels.items():
            rows.append({"source": source, "kind": kind, "sets": b, "set_size": s, "status": "ok",
                         "mean_intensity": float(images.float().mean())})
        for kind in skipped:
            rows.append({"source": source, "kind": kind, "sets": b, "set_size": s,
                         "status": "not defined for a model without context", "mean_intensity": float("nan")})
    return JobResult(rows, figures=figures)


@torch.no_grad()
def attention_job(ctx) -> JobResult:
    cfg, model = ctx.cfg, ctx.model
    s = cfg.eval.set_sizes[0]
    x = omniglot_sets(cfg, s).to(ctx.device)
    log.info("eval=attention: %d %s sets x %d images = %d images, one forward pass", x.shape[0], cfg.eval.split, s,
             x.shape[0] * s)
    layers = attention_weights(model, x)
    samples = model.sample_conditional(x, mode="posterior")
    rows = []
    for label, w in layers:
        b, heads, members = w.shape
        for i in range(b):
            for h in range(heads):
                for m in range(members):
                    rows.append({"set": i, "layer": label, "head": h, "member": m, "weight": float(w[i, h, m])})
    top_label, top = layers[0]
    shown = min(x.shape[0], 5)
    heads = top.shape[1]
    extra = 1 if len(layers) > 1 else 0
    fig = Figure(figsize=(3.0 + 0.9 * s + 3.5 * (1 + extra), 1.9 * shown))
    grid = fig.add_gridspec(shown, 3 + extra, width_ratios=[1, s, 3.5] + [3.5] * extra)
    for i in range(shown):
        show(fig.add_subplot(grid[i, 0]), image_grid(samples[i:i + 1, :1]), "sample" if i == 0 else "")
        show(fig.add_subplot(grid[i, 1]), image_grid(x[i:i + 1]), f"set {i}")
        ax = fig.add_subplot(grid[i, 2])
        width = 0.8 / heads
        for h in range(heads):
            ax.bar(np.arange(s) + (h - (heads - 1) / 2) * width, top[i, h].numpy(), width=width, label=f"head {h}")
        ax.axhline(1.0 / s, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xticks(range(s))
        ax.set_ylim(0, 1)
        ax.set_title(f"attention of {top_label} (top) per member" if i == 0 else "", fontsize=9)
        if i == 0:
            ax.legend(fontsize=6, ncol=2)
        if extra:
            ax2 = fig.add_subplot(grid[i, 3])
            heat = torch.stack([w[i].mean(0) for _, w in layers]).numpy()  # (layers, members)
            ax2.imshow(heat, aspect="auto", cmap="viridis", vmin=0, vmax=1)
            ax2.set_yticks(range(len(layers)), [lab for lab, _ in layers], fontsize=6)
            ax2.set_xticks(range(s))
            ax2.set_title("mean over heads, every layer" if i == 0 else "", fontsize=9)
    fig.suptitle(f"{getattr(model.cfg, 'name', type(model).__name__)}: attention over set members "
                 f"(dotted: uniform 1/S)", fontsize=10)
    fig.tight_layout()
    summary = {f"max_weight_{label}": float(w.max()) for label, w in layers}
    return JobResult(rows, figures={"attention.png": fig}, metrics=summary)
