r"""Figures of posterior draws against the target (matplotlib, Agg canvas: no display needed).

:func:`corner` is the one figure of draws over the target: a histogram over the density in
1-D, a scatter over the contours of the target's 2-D log density in 2-D, and above that a
pair plot of the first coordinates (2-D histograms of the draws below the diagonal, the
target's exact samples above it where it has a sampler). Importance-weighted draws (a
:class:`~krflows.correct.DebiasResult` or ``(samples, log_weights)``) are resampled with
Pareto-smoothed weights first. :func:`plot_samples` renders it to an RGB array, which is what
TensorBoard (:class:`~krflows.callbacks.SamplePlots`) takes; notebooks show the figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["corner", "plot_samples"]


def corner(x, target=None, *, log_weights: Tensor | None = None, names: Sequence[str] | None = None,
           pairs: int = 4, fig=None, limits: tuple | None = None):
    """A corner (pair) plot of draws ``x`` ``(n, d)`` over the target, as a matplotlib ``Figure``.

    ``d = 1``: a histogram over the normalized target density; ``d = 2``: a scatter over the
    contours of the target's log density (``log p~ - max``, levels -12..0); ``d > 2``: the
    first ``pairs`` coordinates, 1-D histograms on the diagonal, 2-D histograms of the draws
    below it and the target's exact samples above it when it has a sampler (black). Without a
    target, the panels show the draws alone.

    Arguments:
        x: draws ``(n, d)``, or ``(samples, log_weights)``, or a result with ``.samples`` and
            ``.log_weights`` (:class:`~krflows.correct.DebiasResult`): weighted draws are
            resampled (``n`` draws, Pareto-smoothed weights) before plotting.
        target: a target (or callable ``log_prob``) whose density the panels show, or ``None``.
        log_weights: log importance weights of ``x`` ``(n,)``.
        names: axis labels, one per coordinate (default ``x_0``, ``x_1``, ...).
        pairs: how many coordinates the pair plot shows (``d > 2``).
        fig: a matplotlib ``Figure`` to draw into (default: a new one, not registered with pyplot),
            or a ``SubFigure`` (``Figure.subfigures``: several corner plots side by side).
        limits: ``(lo, hi)``, scalars or one per coordinate: the axes' range for ``d <= 2``
            (default: the draws' 0.5-99.5 % range, padded and widened to the target's known
            ``modes``; pass it to show the same window for several sets of draws, e.g. a
            flow that misses a mode next to one that does not).

    Example:
        >>> from krflows.targets import Banana
        >>> fig = corner(Banana().sample((500,)), Banana())
        >>> len(fig.axes)
        1
    """
    from matplotlib.figure import Figure

    from krflows.diagnostics.summaries import weighted_draws
    from krflows.diagnostics.weights import psis_smooth

    x, log_weights, _ = weighted_draws(x, log_weights)
    x = x.detach()
    if log_weights is not None:
        lw, _ = psis_smooth(log_weights)
        idx = torch.multinomial(torch.softmax(lw.nan_to_num(nan=-math.inf), 0), x.shape[0], replacement=True)
        x = x[idx.to(x.device)]
    d = x.shape[-1]
    names = list(names) if names is not None else [f"x_{i}" for i in range(d)]
    if len(names) != d:
        raise ValueError(f"names must have {d} entries, got {len(names)}")
    k = 1 if d <= 2 else min(d, pairs)
    if fig is None:
        fig = Figure(figsize=(4.5, 4) if k == 1 else (2.2 * k, 2.2 * k), dpi=90)
    if d <= 2:
        _density_panel(fig.add_subplot(), x, target, names, limits)
    else:
        _pair_plot(fig, x, target, k, names)
    if hasattr(fig, "tight_layout"):  # a SubFigure has none: its parent lays it out
        fig.tight_layout()
    return fig


def plot_samples(x: Tensor, target, pairs: int = 4, *, log_weights: Tensor | None = None) -> np.ndarray:
    """:func:`corner` of flow samples ``x`` ``(n, d)`` over ``target``, as an RGB image
    ``(H, W, 3)`` uint8 (what TensorBoard's ``add_image(..., dataformats="HWC")`` takes).

    Example:
        >>> from krflows.targets import Banana
        >>> plot_samples(torch.randn(200, 2), Banana()).shape[-1]
        3
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = corner(x, target, log_weights=log_weights, pairs=pairs)
    canvas = FigureCanvasAgg(fig)
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


def _density_panel(ax, x: Tensor, target, names: list[str], limits: tuple | None = None) -> None:
    xs = x.detach().double().cpu()
    if limits is None:
        lo, hi = _limits(xs, target)
    else:
        lo, hi = (torch.as_tensor(v, dtype=torch.float64).expand(xs.shape[-1]) for v in limits)
    if target is None:
        if xs.shape[-1] == 1:
            ax.hist(xs[:, 0].numpy(), bins=80, density=True, alpha=0.5, color="C3")
        else:
            ax.scatter(xs[:, 0].numpy(), xs[:, 1].numpy(), s=3, alpha=0.35, color="C3", linewidths=0)
            ax.set_ylabel(names[1])
        ax.set_xlabel(names[0])
        return
    if xs.shape[-1] == 1:
        grid = torch.linspace(float(lo[0]), float(hi[0]), 400, dtype=torch.float64)
        lp = _grid_log_prob(target, grid[:, None], x)
        p = np.exp(lp - np.nanmax(lp))
        p = p / (np.nansum(p) * float(grid[1] - grid[0]))
        ax.hist(xs[:, 0].numpy(), bins=80, density=True, alpha=0.5, color="C3", label="flow")
        ax.plot(grid.numpy(), p, color="k", lw=1, label="target")
        ax.legend(loc="upper right", fontsize=7)
        ax.set_xlabel(names[0])
        return
    g0 = torch.linspace(float(lo[0]), float(hi[0]), 120, dtype=torch.float64)
    g1 = torch.linspace(float(lo[1]), float(hi[1]), 120, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g0, g1, indexing="xy"), -1)
    lp = _grid_log_prob(target, grid, x)
    lp = lp - np.nanmax(lp)
    ax.contour(g0.numpy(), g1.numpy(), lp, levels=np.linspace(-12.0, 0.0, 13), cmap="viridis",
               linewidths=0.8)
    ax.scatter(xs[:, 0].numpy(), xs[:, 1].numpy(), s=3, alpha=0.35, color="C3", linewidths=0)
    ax.set(xlim=(float(lo[0]), float(hi[0])), ylim=(float(lo[1]), float(hi[1])), xlabel=names[0],
           ylabel=names[1], title="draws over log p contours")


def _pair_plot(fig, x: Tensor, target, k: int, names: list[str]) -> None:
    xs = x.detach().double().cpu()[:, :k].numpy()
    truth = None
    if target is not None and getattr(target, "has_sampler", False):
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
            elif i > j:
                ax.hist2d(xs[:, j], xs[:, i], bins=40, range=[[lo[j], hi[j]], [lo[i], hi[i]]], cmap="Reds",
                          cmin=1)
                ax.set_ylim(lo[i], hi[i])
            elif truth is not None:
                ax.scatter(truth[:, j], truth[:, i], s=1, alpha=0.3, color="k", linewidths=0)
                ax.set_ylim(lo[i], hi[i])
            else:
                ax.axis("off")
            ax.set_xlim(lo[j], hi[j])
            ax.tick_params(labelsize=6)
            if i == k - 1:
                ax.set_xlabel(names[j], fontsize=7)
            if j == 0:
                ax.set_ylabel(names[i], fontsize=7)
    fig.suptitle("draws (red, lower) vs target (black, upper)" if truth is not None else "draws", fontsize=8)
