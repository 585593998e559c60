r"""Entropic optimal transport between sample sets (POT): the plan, its barycentric map and
the debiased Sinkhorn divergence. Costs are squared Euclidean (POT's convention)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

__all__ = ["pot_points", "sinkhorn_plan", "barycentric_map", "sinkhorn_divergence"]


def pot_points(x: Tensor) -> Tensor:
    """Points ``(N, *)`` as POT takes them: detached, flattened to ``(N, D)``, float64 on the CPU."""
    return x.detach().reshape(x.shape[0], -1).to(device="cpu", dtype=torch.float64)


def _weights(w: Tensor | None, n: int, name: str) -> Tensor:
    if w is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    w = torch.as_tensor(w, dtype=torch.float64).detach().cpu()
    if w.shape != (n,) or (w < 0).any() or not torch.isfinite(w).all() or not w.sum() > 0:
        raise ValueError(f"{name} must be nonnegative finite weights of shape ({n},) with a positive sum, "
                         f"got shape {tuple(w.shape)}, sum {float(w.sum()) if w.numel() else 0.0:g}")
    return w / w.sum()



def sinkhorn_plan(x: Tensor, y: Tensor, eps: float, a: Tensor | None = None, b: Tensor | None = None,
                  max_iter: int = 5000, tol: float = 1e-8) -> Tensor:
    r"""The entropic optimal coupling of two sample sets (POT's ``ot.sinkhorn``).

    .. math:: \gamma_\varepsilon = \operatorname*{argmin}_{\gamma \in \Pi(a, b)}
        \sum_{ij} \gamma_{ij} \lVert x_i - y_j \rVert^2 + \varepsilon \sum_{ij} \gamma_{ij}
        (\log \gamma_{ij} - 1),

    :math:`\varepsilon` in the units of the squared distance. As :math:`\varepsilon \to 0` it
    tends to an exact OT plan; as :math:`\varepsilon \to \infty`, to the independent coupling
    :math:`a b^\top`. Plain Sinkhorn where :math:`e^{-C/\varepsilon}` cannot underflow, else (or if
    that did not converge) POT's stabilized log-domain solver with :math:`\varepsilon`-scaling.
    A ``RuntimeWarning`` says when the marginals are still violated by more than ``10 tol``
    (Euclidean norm, as POT measures it).
    ``O(N M)`` memory: subsample to a few thousand points.

    Arguments:
        x: points ``(N, d)``; y: points ``(M, d)``.
        eps: :math:`\varepsilon > 0`.
        a, b: optional weights ``(N,)`` and ``(M,)`` (normalized here; default uniform).
        max_iter, tol: Sinkhorn's iteration cap and its tolerance on the marginals' violation
            (POT's ``numItermax``, ``stopThr``).

    Returns:
        the plan ``(N, M)`` (rows sum to ``a``, columns to ``b``), float64 on ``x``'s device.

    Example:
        >>> P = sinkhorn_plan(torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [1.0]]), eps=1e-2)
        >>> P.round(decimals=3)
        tensor([[0.5000, 0.0000],
                [0.0000, 0.5000]], dtype=torch.float64)
    """
    plan, _, _, _ = _sinkhorn_numpy(x, y, eps, a, b, max_iter, tol, "sinkhorn_plan")
    return torch.from_numpy(plan).to(x.device)



def _check_pair(x: Tensor, y: Tensor, eps: float) -> None:
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)) or x.dim() != 2 or y.dim() != 2 \
            or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be tensors of shapes (N, d) and (M, d), "
                         f"got {tuple(getattr(x, 'shape', ()))} and {tuple(getattr(y, 'shape', ()))}")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError("x and y must hold at least one point each")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")



def _sinkhorn_numpy(x: Tensor, y: Tensor, eps: float, a, b, max_iter: int, tol: float, caller: str
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The plan, cost matrix and normalized weights (numpy, float64) of :func:`sinkhorn_plan`."""
    import ot

    _check_pair(x, y, eps)
    # numpy arrays: POT's numpy backend has far less per-iteration overhead on CPU
    xp, yp = pot_points(x).numpy(), pot_points(y).numpy()
    if not (np.isfinite(xp).all() and np.isfinite(yp).all()):
        raise ValueError("x and y must be finite")
    a, b = _weights(a, xp.shape[0], "a").numpy(), _weights(b, yp.shape[0], "b").numpy()
    cost = ot.dist(xp, yp)
    kw = dict(numItermax=max_iter, stopThr=tol)
    # points of zero weight are left out of the solve and get zero rows / columns: with zeros in
    # both marginals POT's plain Sinkhorn went NaN at its first iteration and the fallback returned
    # an all-zero plan (a probe; the divergence's self-terms always have zeros on both sides)
    ia, ib = a > 0, b > 0
    sub_a, sub_b, sub_cost = a[ia], b[ib], cost[np.ix_(ia, ib)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence is checked below, on the marginals
        sub = None
        if float(sub_cost.max()) / eps < 500:  # the kernel exp(-C / eps) stays far from underflow
            sub = ot.sinkhorn(sub_a, sub_b, sub_cost, eps, **kw)
        if sub is None or not np.isfinite(sub).all() or _violation(sub, sub_a, sub_b) > 10 * tol:
            sub = ot.sinkhorn(sub_a, sub_b, sub_cost, eps, method="sinkhorn_epsilon_scaling", **kw)
    plan = np.zeros_like(cost)
    plan[np.ix_(ia, ib)] = sub
    violation = _violation(plan, a, b)
    if not violation <= 10 * tol:
        warnings.warn(f"{caller}: marginals violated by {violation:.2g} > 10 tol after {max_iter} "
                      f"iterations at eps={eps:g}: raise max_iter or eps", RuntimeWarning, stacklevel=3)
    return plan, cost, a, b



def _entropic_cost(x: Tensor, y: Tensor, eps: float, a, b, max_iter: int, tol: float) -> float:
    r"""``OT_eps`` = :math:`\langle \gamma, C \rangle + \varepsilon\, \mathrm{KL}(\gamma \,\|\, a \otimes b)`
    at the Sinkhorn plan (the primal objective; POT's ``sinkhorn2`` returns the first term only)."""
    plan, cost, a, b = _sinkhorn_numpy(x, y, eps, a, b, max_iter, tol, "sinkhorn_divergence")
    positive = plan > 0  # 0 log 0 = 0
    ratio = plan[positive] / np.outer(a, b)[positive]
    return float((plan * cost).sum() + eps * (plan[positive] * np.log(ratio)).sum())



def sinkhorn_divergence(x: Tensor, y: Tensor, eps: float, a: Tensor | None = None, b: Tensor | None = None,
                        max_iter: int = 5000, tol: float = 1e-8) -> Tensor:
    r"""The debiased Sinkhorn divergence between two weighted sample sets (POT's Sinkhorn).

    .. math:: S_\varepsilon(\mu, \nu) = \mathrm{OT}_\varepsilon(\mu, \nu)
        - \tfrac12 \mathrm{OT}_\varepsilon(\mu, \mu) - \tfrac12 \mathrm{OT}_\varepsilon(\nu, \nu),
        \qquad \mathrm{OT}_\varepsilon(\mu, \nu) = \min_{\gamma \in \Pi(a, b)}
        \langle \gamma, C \rangle + \varepsilon\, \mathrm{KL}(\gamma \,\|\, a \otimes b),

    with the squared Euclidean cost :math:`C_{ij} = \lVert x_i - y_j \rVert^2`: symmetric, in the
    units of :math:`x^2`, :math:`\ge 0` and 0 only for equal measures (Feydy et al. 2019). It
    interpolates between :math:`W_2^2(\mu, \nu)` as :math:`\varepsilon \to 0` and the squared
    distance of the means as :math:`\varepsilon \to \infty` (MMD with kernel
    :math:`-\lVert x - y \rVert^2`), and shifts exactly: :math:`S_\varepsilon(\mu, \mu(\cdot - c))
    = \lVert c \rVert^2`. Each ``OT_eps`` is the primal objective at a plan from
    :func:`sinkhorn_plan` (three solves, same solver, warnings and tolerance); its error is
    of the order of ``tol`` times the cost scale. Unlike ``krflows.diagnostics.sinkhorn_divergence``
    (the plan's transport cost only, clipped at 0) nothing is clipped: a negative value can only
    come from a non-converged solve, and shows it.
    ``O(N M)`` memory: subsample to a few thousand points.

    Arguments:
        x: points ``(N, d)``; y: points ``(M, d)``.
        eps: :math:`\varepsilon > 0`, in the units of the cost (squared distance).
        a, b: optional weights ``(N,)`` and ``(M,)`` (normalized here; default uniform).
        max_iter, tol: as in :func:`sinkhorn_plan`.

    Returns:
        :math:`S_\varepsilon`, a float64 scalar tensor on ``x``'s device (no gradient).

    Example:
        >>> x = torch.tensor([[0.0], [1.0]])
        >>> sinkhorn_divergence(x, x + 2, eps=0.1).round(decimals=6)
        tensor(4., dtype=torch.float64)
    """
    _check_pair(x, y, eps)
    xy = _entropic_cost(x, y, eps, a, b, max_iter, tol)
    xx = _entropic_cost(x, x, eps, a, a, max_iter, tol)
    yy = _entropic_cost(y, y, eps, b, b, max_iter, tol)
    return torch.tensor(xy - 0.5 * (xx + yy), dtype=torch.float64, device=x.device)



def _violation(plan: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float(max(np.linalg.norm(plan.sum(1) - a), np.linalg.norm(plan.sum(0) - b)))



def barycentric_map(x: Tensor, y: Tensor, plan: Tensor | None = None, eps: float | None = None) -> Tensor:
    r"""The barycentric projection ``x -> y`` of a coupling: :math:`\hat T(x_i) = E_\gamma[y \mid x_i]`.

    .. math:: \hat T(x_i) = \frac{\sum_j \gamma_{ij}\, y_j}{\sum_j \gamma_{ij}} .

    For an exact OT plan between samples of absolutely continuous laws it approximates the
    Brenier map; for an entropic plan it is biased towards the mean of ``y`` (the constant
    :math:`E[y]` as :math:`\varepsilon \to \infty`), and where the plan splits a point's mass
    between modes it maps it *between* them: it is not a pushforward of the law of ``x``.

    Arguments:
        x: points ``(N, d)``; y: points ``(M, d)``.
        plan: a coupling ``(N, M)`` (e.g. :func:`sinkhorn_plan`); computed with ``eps`` if None.
        eps: :math:`\varepsilon` of :func:`sinkhorn_plan`, when ``plan`` is None.

    Returns:
        :math:`\hat T(x)`, shape ``(N, d)``, in ``y``'s dtype.

    Example:
        >>> x = torch.tensor([[0.0], [1.0]])
        >>> barycentric_map(x, x + 5, eps=0.1).round(decimals=3)
        tensor([[5.],
                [6.]])
    """
    if plan is None:
        if eps is None:
            raise ValueError("give either a plan (N, M) or eps to compute one")
        plan = sinkhorn_plan(x, y, eps)
    if plan.shape != (x.shape[0], y.shape[0]):
        raise ValueError(f"plan must have shape ({x.shape[0]}, {y.shape[0]}), got {tuple(plan.shape)}")
    plan = plan.to(device=y.device, dtype=torch.float64)
    row = plan.sum(1, keepdim=True)
    if (row <= 0).any():
        raise ValueError("every row of the plan must carry mass")
    return ((plan @ y.to(torch.float64)) / row).to(y.dtype)

