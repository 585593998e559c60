r"""Figures of flow samples against the target (matplotlib, Agg canvas: no display needed).

:func:`plot_samples` returns an RGB image, as TensorBoard (:class:`~krflows.callbacks.SamplePlots`)
and notebooks take it: a histogram over the density in 1-D, a scatter over ``log p`` contours in
2-D, a pair plot of the first coordinates (with the target's exact samples) above.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["plot_samples"]


def plot_samples(x: Tensor, target, pairs: int = 4) -> np.ndarray:
    """An RGB image ``(H, W, 3)`` of flow samples ``x`` ``(n, d)`` against the target.

    ``d = 1``: a histogram over the normalized target density; ``d = 2``: a scatter over
    the contours of ``log p``; ``d > 2``: a pair plot of the first ``pairs`` coordinates
    (the target's exact samples in the upper triangle and on the diagonal when it has a
    sampler). Drawn with matplotlib's Agg canvas (no display needed).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    d = x.shape[-1]
    k = 1 if d <= 2 else min(d, pairs)
    fig = Figure(figsize=(4.5, 4) if k == 1 else (2.2 * k, 2.2 * k), dpi=90)
    canvas = FigureCanvasAgg(fig)
    if d <= 2:
        _density_panel(fig.add_subplot(), x, target)
    else:
        _pair_plot(fig, x, target, k)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _grid_log_prob(target, points: Tensor, like: Tensor) -> np.ndarray:
    with torch.no_grad():
        lp = target(points.to(like)).double().cpu()
    lp = torch.where(torch.isfinite(lp), lp, torch.tensor(math.nan, dtype=lp.dtype))
    return lp.numpy()


def _limits(x: Tensor, target) -> tuple[Tensor, Tensor]:
    lo, hi = torch.quantile(x, 0.005, dim=0), torch.quantile(x, 0.995, dim=0)
    modes = getattr(target, "modes", None)
    if isinstance(modes, Tensor) and modes.shape[-1] == x.shape[-1] and modes.shape[0] <= 64:
        modes = modes.double().cpu()
        lo, hi = torch.minimum(lo, modes.min(0).values), torch.maximum(hi, modes.max(0).values)
    pad = 0.15 * (hi - lo) + 0.5
    return lo - pad, hi + pad


def _density_panel(ax, x: Tensor, target) -> None:
    xs = x.detach().double().cpu()
    lo, hi = _limits(xs, target)
    if xs.shape[-1] == 1:
        grid = torch.linspace(float(lo[0]), float(hi[0]), 400, dtype=torch.float64)
        lp = _grid_log_prob(target, grid[:, None], x)
        p = np.exp(lp - np.nanmax(lp))
        p = p / (np.nansum(p) * float(grid[1] - grid[0]))
        ax.hist(xs[:, 0].numpy(), bins=80, density=True, alpha=0.5, color="C3", label="flow")
        ax.plot(grid.numpy(), p, color="k", lw=1, label="target")
        ax.legend(loc="upper right", fontsize=7)
        ax.set_xlabel("x_0")
        return
    g0 = torch.linspace(float(lo[0]), float(hi[0]), 120, dtype=torch.float64)
    g1 = torch.linspace(float(lo[1]), float(hi[1]), 120, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g0, g1, indexing="xy"), -1)
    lp = _grid_log_prob(target, grid, x)
    lp = lp - np.nanmax(lp)
    ax.contour(g0.numpy(), g1.numpy(), lp, levels=np.linspace(-12.0, 0.0, 13), cmap="viridis",
               linewidths=0.8)
    ax.scatter(xs[:, 0].numpy(), xs[:, 1].numpy(), s=3, alpha=0.35, color="C3", linewidths=0)
    ax.set(xlim=(float(lo[0]), float(hi[0])), ylim=(float(lo[1]), float(hi[1])), xlabel="x_0", ylabel="x_1",
           title="flow samples over log p contours")


def _pair_plot(fig, x: Tensor, target, k: int) -> None:
    xs = x.detach().double().cpu()[:, :k].numpy()
    truth = None
    if getattr(target, "has_sampler", False):
        try:
            truth = target.sample((xs.shape[0],)).double().cpu()[:, :k].numpy()
        except (NotImplementedError, ValueError):
            truth = None
    both = xs if truth is None else np.concatenate([xs, truth])
    lo, hi = np.quantile(both, 0.005, axis=0), np.quantile(both, 0.995, axis=0)
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)  # shared limits per coordinate
    axes = fig.subplots(k, k, squeeze=False)
    for i in range(k):
        for j in range(k):
            ax = axes[i, j]
            if i == j:
                bins = np.linspace(lo[i], hi[i], 50)
                ax.hist(xs[:, i], bins=bins, density=True, alpha=0.5, color="C3")
                if truth is not None:
                    ax.hist(truth[:, i], bins=bins, density=True, histtype="step", color="k")
            elif i > j or truth is not None:
                pts = xs if i > j else truth
                ax.scatter(pts[:, j], pts[:, i], s=1, alpha=0.3, color="C3" if i > j else "k", linewidths=0)
                ax.set_ylim(lo[i], hi[i])
            else:
                ax.axis("off")
            ax.set_xlim(lo[j], hi[j])
            ax.tick_params(labelsize=6)
            if i == k - 1:
                ax.set_xlabel(f"x_{j}", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"x_{i}", fontsize=7)
    fig.suptitle("flow (red, lower) vs target (black, upper)" if truth is not None else "flow samples",
                 fontsize=8)
