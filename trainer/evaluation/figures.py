"""Figures for the evaluation jobs: matplotlib `Figure` objects on the Agg canvas (no pyplot, no display,
no global figure registry), written as PNG by the job runner."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure


def image_grid(images: torch.Tensor, pad: int = 2) -> np.ndarray:
    """(rows, cols, C, H, W) images in [0, 1] -> one (rows*(H+pad)+pad, cols*(W+pad)+pad[, C]) array;
    padding is drawn mid-grey so that black and white images both stand out."""
    x = images.detach().float().cpu().clamp(0, 1)
    rows, cols, c, h, w = x.shape
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 0.5, np.float32)
    for i in range(rows):
        for j in range(cols):
            y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
            out[y0:y0 + h, x0:x0 + w] = x[i, j].permute(1, 2, 0).numpy()
    return out[..., 0] if c == 1 else out


def show(ax, grid: np.ndarray, title: str = "") -> None:
    if grid.ndim == 2:
        ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def grids_figure(panels: Dict[str, torch.Tensor], title: str) -> Figure:
    """One panel per named (rows, cols, C, H, W) tensor, side by side."""
    n = len(panels)
    fig = Figure(figsize=(3.2 * n, 3.6))
    for k, (name, images) in enumerate(panels.items()):
        show(fig.add_subplot(1, n, k + 1), image_grid(images), name)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def lines_figure(x_label: str, y_label: str, series: Dict[str, tuple], title: str, log_x: bool = False,
                 dashed: Optional[Dict[str, tuple]] = None, dashed_suffix: str = "",
                 ticks_at_points: bool = True) -> Figure:
    """series: label -> (xs, ys[, errs]); dashed: label of a series -> (xs, ys), drawn dashed in that series'
    colour and labelled `label + dashed_suffix`. ticks_at_points: a tick at every x of the data (set sizes, K);
    off for a continuous axis such as wall clock, whose points would crowd their labels together."""
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for label, values in series.items():
        xs, ys = values[0], values[1]
        errs = values[2] if len(values) > 2 else None
        if errs is not None and np.all(np.isfinite(errs)):
            line = ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)[0]
        else:
            (line,) = ax.plot(xs, ys, marker="o", label=label)
        if dashed and label in dashed:
            dxs, dys = dashed[label]
            ax.plot(dxs, dys, linestyle="--", marker="x", color=line.get_color(), label=f"{label}{dashed_suffix}")
    if log_x:
        ax.set_xscale("log")
    if ticks_at_points:
        ax.set_xticks(sorted({float(v) for values in series.values() for v in values[0]}))
        ax.xaxis.set_major_formatter("{x:g}")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def bars_figure(groups: Dict[str, Dict[str, Sequence[float]]], x_label: str, y_label: str, title: str) -> Figure:
    """One subplot per group (e.g. "KL_z", "KL_c"); inside, bars per index, one colour per series."""
    fig = Figure(figsize=(5 * len(groups), 4))
    for k, (group, series) in enumerate(groups.items()):
        ax = fig.add_subplot(1, len(groups), k + 1)
        n_series = max(len(series), 1)
        width = 0.8 / n_series
        for j, (label, values) in enumerate(series.items()):
            xs = np.arange(len(values)) + (j - (n_series - 1) / 2) * width
            ax.bar(xs, values, width=width, label=label)
        longest = max((len(v) for v in series.values()), default=0)
        ax.set_xticks(np.arange(longest))
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(group, fontsize=10)
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def confusion_figure(matrices: Dict[str, np.ndarray], labels: List[str], title: str) -> Figure:
    """Row-normalised confusion matrices (true class rows, predicted columns) with the counts written in."""
    fig = Figure(figsize=(5.2 * len(matrices), 4.8))
    for k, (name, m) in enumerate(matrices.items()):
        ax = fig.add_subplot(1, len(matrices), k + 1)
        rows = m.sum(axis=1, keepdims=True)
        frac = np.divide(m, rows, out=np.zeros_like(m, dtype=float), where=rows > 0)
        im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if m[i, j]:
                    ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=6,
                            color="white" if frac[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
