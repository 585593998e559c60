r"""Distances between sample sets (POT): a sharp Sinkhorn divergence, sliced W2, and both with
their noise floor (:func:`sample_distances`, the stage of :func:`~krflows.diagnose`)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from krflows.ot.sinkhorn import pot_points

__all__ = ["sharp_sinkhorn_divergence", "sinkhorn_divergence", "sliced_w2", "sample_distances", "Distances",
           "distances"]


def _sinkhorn_cost(x: Tensor, y: Tensor, reg: float) -> float:
    """Entropic OT cost with squared Euclidean ground cost, uniform weights (``ot.sinkhorn2``)."""
    import ot

    a = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=torch.float64)
    b = torch.full((y.shape[0],), 1.0 / y.shape[0], dtype=torch.float64)
    cost = ot.dist(x, y)  # squared Euclidean
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(ot.sinkhorn2(a, b, cost, reg, numItermax=2000, stopThr=1e-5))
        if not math.isfinite(value) or any("numerical errors" in str(w.message) for w in caught):
            # exp(-C / reg) underflowed: redo in the log domain (slower)
            value = float(ot.sinkhorn2(a, b, cost, reg, method="sinkhorn_log", numItermax=1000,
                                       stopThr=1e-5))
    return value


def _nearest_cost(a: Tensor, b: Tensor) -> float:
    """The largest squared distance from a point of one set to its nearest point in the other."""
    cost = torch.cdist(a, b).square()
    return float(torch.maximum(cost.min(1).values.max(), cost.min(0).values.max()))


def sharp_sinkhorn_divergence(x: Tensor, y: Tensor, reg: float) -> float:
    r"""A debiased *sharp* Sinkhorn divergence between two empirical measures (POT's ``sinkhorn2``).

    .. math:: S_\varepsilon(\mu, \nu) = W_\varepsilon(\mu, \nu)
        - \tfrac12 W_\varepsilon(\mu, \mu) - \tfrac12 W_\varepsilon(\nu, \nu),

    where :math:`W_\varepsilon = \langle \gamma_\varepsilon, C\rangle` is the transport cost of the
    entropic plan *without* its entropy term (what ``ot.sinkhorn2`` returns), squared Euclidean
    cost (units of :math:`x^2`), :math:`\varepsilon` = ``reg``, uniform weights. Without the entropy
    term nonnegativity is not guaranteed, so the value is clipped at 0. It is what
    :func:`diagnose` reports (with a noise floor from a second exact sample); the regularized
    divergence of Feydy et al. (2019), nonnegative by construction and with weights, is
    :func:`krflows.ot.sinkhorn_divergence`. Both tend to :math:`W_2^2` as ``reg -> 0``.
    Cost ``O(N M)`` memory and time per iteration: use subsamples of a few thousand points.

    Arguments:
        x: points ``(N, d)``; y: points ``(M, d)``.
        reg: :math:`\varepsilon`, in the units of the cost.

    Example:
        >>> x = torch.tensor([[0.0], [1.0]])
        >>> sharp_sinkhorn_divergence(x, x, reg=0.1)
        0.0
    """
    x, y = pot_points(x), pot_points(y)
    value = _sinkhorn_cost(x, y, reg) - 0.5 * (_sinkhorn_cost(x, x, reg) + _sinkhorn_cost(y, y, reg))
    return max(0.0, value)


def sinkhorn_divergence(x: Tensor, y: Tensor, reg: float) -> float:
    """Deprecated name of :func:`sharp_sinkhorn_divergence` (``krflows.ot.sinkhorn_divergence``
    is the regularized divergence, argument ``eps``)."""
    warnings.warn("krflows.diagnostics.sinkhorn_divergence is renamed sharp_sinkhorn_divergence "
                  "(krflows.ot.sinkhorn_divergence is the regularized one)", DeprecationWarning, stacklevel=2)
    return sharp_sinkhorn_divergence(x, y, reg)


def sliced_w2(x: Tensor, y: Tensor, n_projections: int = 100, seed: int = 0) -> float:
    r"""The sliced 2-Wasserstein distance (POT's ``sliced_wasserstein_distance``).

    .. math:: \mathrm{SW}_2(\mu, \nu) = \Big(E_{\theta \sim U(S^{d-1})}
        W_2^2(\theta_\# \mu, \theta_\# \nu)\Big)^{1/2},

    in the units of ``x``, estimated with ``n_projections`` random directions drawn from
    ``seed`` (so two calls with one seed use the same directions). ``O(N log N)`` per direction.

    Example:
        >>> sliced_w2(torch.tensor([[0.0], [1.0]]), torch.tensor([[1.0], [2.0]]))
        1.0
    """
    import ot

    return float(ot.sliced_wasserstein_distance(pot_points(x), pot_points(y),
                                                n_projections=n_projections, seed=seed))


def sample_distances(x: Tensor, y: Tensor, y2: Tensor | None = None, *, blur: float = 0.05,
                     n_projections: int = 100, seed: int = 0) -> dict[str, float]:
    r"""Sinkhorn divergence and sliced W2 between ``x`` and ``y``, with their noise floor.

    The Sinkhorn regularization is relative to the spread of ``y``:
    :math:`\varepsilon = \text{blur} \cdot \tfrac12 \operatorname{median}_{i \ne j}
    \lVert y_i - y_j \rVert^2` (about :math:`\text{blur} \cdot \operatorname{tr}\mathrm{Cov}(y)`
    for a Gaussian, and robust to heavy tails), raised where needed to a hundredth of the largest
    squared distance from a point to the other set, so that no row of the kernel
    :math:`e^{-C/\varepsilon}` underflows (plain Sinkhorn stays finite and fast; far outliers,
    as in heavy-tailed targets, thus blur the divergence: ``sinkhorn_reg`` is returned). With a second,
    independent sample ``y2`` of the same law as ``y`` (and of the size of ``x``), the same
    distances between ``y`` and ``y2`` are the *noise floor*: what a perfect ``x`` would score.

    Arguments:
        x: points ``(N, d)`` (the flow's); y: points ``(M, d)`` (the target's).
        y2: optional second target sample ``(N, d)``.
        blur: relative Sinkhorn regularization.
        n_projections, seed: of :func:`sliced_w2`.

    Returns:
        ``{"sinkhorn", "sliced_w2", "sinkhorn_reg"}`` and, with ``y2``,
        ``{"sinkhorn_floor", "sliced_w2_floor"}``.
    """
    x, y = pot_points(x), pot_points(y)
    y2 = None if y2 is None else pot_points(y2)
    pairs = torch.cdist(y, y).square()
    off = pairs[~torch.eye(y.shape[0], dtype=torch.bool)]
    reg = blur * 0.5 * float(off.median()) if off.numel() else blur
    reg = reg if reg > 0 else blur
    reach = max([_nearest_cost(x, y)] + ([] if y2 is None else [_nearest_cost(y2, y)]))
    reg = max(reg, reach / 100)
    self_y = _sinkhorn_cost(y, y, reg)

    def divergence(a: Tensor, self_a: float) -> float:
        return max(0.0, _sinkhorn_cost(a, y, reg) - 0.5 * (self_a + self_y))

    out = {"sinkhorn": divergence(x, _sinkhorn_cost(x, x, reg)),
           "sliced_w2": sliced_w2(x, y, n_projections, seed), "sinkhorn_reg": reg}
    if y2 is not None:
        out["sinkhorn_floor"] = divergence(y2, _sinkhorn_cost(y2, y2, reg))
        out["sliced_w2_floor"] = sliced_w2(y2, y, n_projections, seed)
    return out


@dataclass
class Distances:
    """Sample distances between flow and target subsamples, with their floor (the report's keys)."""

    sinkhorn: float
    sliced_w2: float
    sinkhorn_reg: float
    sinkhorn_floor: float
    sliced_w2_floor: float
    distance_n: int


def distances(x: Tensor, y: Tensor, n_sub: int, seed: int | None) -> Distances | None:
    """:func:`sample_distances` on ``m = min(n_sub, N, M // 2)`` points of each set, the floor
    from two disjoint target subsamples; ``None`` when ``m < 10``."""
    m = min(n_sub, x.shape[0], y.shape[0] // 2)
    if m < 10:
        return None
    return Distances(**sample_distances(x[:m], y[:m], y[m:2 * m], seed=0 if seed is None else seed),
                     distance_n=m)
