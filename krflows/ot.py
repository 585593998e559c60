r"""Optimal-transport toolbox: Gaussian W2, displacement interpolation, entropic plans, Langevin.

* :func:`wasserstein2_gaussian`: the closed-form 2-Wasserstein distance between Gaussians
  (the Bures metric), and :func:`gaussian_ot_map`, the Brenier map attaining it.
* :class:`Interpolated` and :func:`interpolate`: the maps :math:`T_t = (1-t)\,\mathrm{Id} + t\,T`
  (``z -> x``) for a triangular ``T``. They stay lower triangular and monotone. *They are a
  W2 geodesic only when* ``T`` *is the Brenier map*, which a KR map is not (unless the target's
  coordinates are independent); for a KR map :math:`(T_t)_\# \mu_0` is a path of triangular
  pushforwards from the reference to the target, not a geodesic.
  :func:`interpolate_affine` is the affine case, e.g. the exact Gaussian geodesic.
* :func:`sinkhorn_plan` and :func:`barycentric_map`: entropic OT between sample sets (POT),
  and the conditional mean :math:`E_\gamma[y \mid x]` of its plan; :func:`sinkhorn_divergence`,
  the debiased entropic OT cost between sample sets, and :func:`entropic_ot_gaussian`, its
  closed form between Gaussians (the oracle of the tests). (``krflows.diagnostics`` has a
  clipped variant built on the plan's transport cost alone, and ``sliced_w2``.)
* :func:`ula` and :func:`mala`: Langevin samplers, the particle discretization of the
  Wasserstein gradient flow of :math:`\mathrm{KL}(\cdot \,\|\, p)` (a baseline, and the
  dynamics a flow's bias can be corrected with).

Costs are the squared Euclidean :math:`\lVert x - y \rVert^2` throughout (POT's convention;
the background text's :math:`\tfrac12 \lVert x - y \rVert^2` halves every cost and every
:math:`\varepsilon`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.distributions import ComposeTransform, Transform, TransformedDistribution

from krflows.diagnostics import _pot_points
from krflows.inverse import solve_monotone
from krflows.targets import as_target
from krflows.transforms.base import Permutation, TriangularTransform
from krflows.transforms.linear import AffineMatrixTransform, LowerAffineTransform

__all__ = [
    "wasserstein2_gaussian", "gaussian_ot_map", "affine_transport_cost", "Interpolated",
    "interpolate", "interpolate_affine", "sinkhorn_plan", "barycentric_map", "sinkhorn_divergence",
    "entropic_ot_gaussian", "LangevinResult", "ula", "mala",
]


# ---------------------------------------------------------------------------------------------
# Gaussians in closed form


def _gaussian(mean, cov, name: str) -> tuple[Tensor, Tensor]:
    mean, cov = torch.as_tensor(mean), torch.as_tensor(cov)
    dtype = torch.promote_types(mean.dtype, cov.dtype)
    dtype = dtype if dtype.is_floating_point else torch.get_default_dtype()
    mean, cov = mean.to(dtype), cov.to(device=mean.device, dtype=dtype)
    if mean.dim() < 1:
        raise ValueError(f"{name}: the mean must have shape (*, d), got {tuple(mean.shape)}")
    d = mean.shape[-1]
    if cov.dim() < 2 or cov.shape[-2:] != (d, d):
        raise ValueError(f"{name}: the covariance must have shape (*, {d}, {d}), got {tuple(cov.shape)}")
    if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
        raise ValueError(f"{name}: the mean and covariance must be finite")
    scale = cov.abs().amax((-2, -1), keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    tol = 1e3 * torch.finfo(dtype).eps
    if ((cov - cov.mT).abs() / scale).max() > tol:
        raise ValueError(f"{name}: the covariance must be symmetric")
    cov = 0.5 * (cov + cov.mT)
    if (torch.linalg.eigvalsh(cov) / scale[..., 0]).min() < -tol:
        raise ValueError(f"{name}: the covariance must be positive semi-definite")
    return mean, cov


def _sqrtm(S: Tensor) -> Tensor:
    """The symmetric square root of a symmetric PSD matrix (negative rounding clamped to 0)."""
    val, vec = torch.linalg.eigh(S)
    root = (vec * val.clamp_min(0).sqrt().unsqueeze(-2)) @ vec.mT
    return 0.5 * (root + root.mT)


def wasserstein2_gaussian(m1, S1, m2, S2, squared: bool = False) -> Tensor:
    r"""The 2-Wasserstein distance between ``N(m1, S1)`` and ``N(m2, S2)``, in closed form.

    .. math:: W_2^2 = \lVert m_1 - m_2 \rVert^2 + \operatorname{tr} S_1 + \operatorname{tr} S_2
        - 2 \operatorname{tr} \big(S_1^{1/2} S_2 S_1^{1/2}\big)^{1/2}

    (the last three terms are the squared Bures metric). Exact for semi-definite covariances
    too; rounding makes :math:`W_2` itself accurate to about :math:`\sqrt{\text{eps}\,
    \operatorname{tr} S}` when the two laws are close (``W_2^2`` is clipped at 0).

    Arguments:
        m1, m2: means, shape ``(*, d)`` (tensors or array-likes; leading dims broadcast).
        S1, S2: covariances, shape ``(*, d, d)``, symmetric positive semi-definite.
        squared: return :math:`W_2^2` instead of :math:`W_2`.

    Returns:
        :math:`W_2` (or :math:`W_2^2`), shape ``(*)``.

    Example:
        >>> wasserstein2_gaussian([0.0, 0.0], torch.eye(2), [3.0, 4.0], 4 * torch.eye(2))
        tensor(5.1962)
    """
    m1, S1 = _gaussian(m1, S1, "N(m1, S1)")
    m2, S2 = _gaussian(m2, S2, "N(m2, S2)")
    if m1.shape[-1] != m2.shape[-1]:
        raise ValueError(f"the two Gaussians must have one dimension, got {m1.shape[-1]} and {m2.shape[-1]}")
    r1 = _sqrtm(S1)
    cross = _sqrtm(r1 @ S2 @ r1)
    trace = lambda A: torch.diagonal(A, dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    w2 = ((m1 - m2) ** 2).sum(-1) + trace(S1) + trace(S2) - 2 * trace(cross)
    w2 = w2.clamp_min(0)
    return w2 if squared else w2.sqrt()


def gaussian_ot_map(m1, S1, m2, S2) -> AffineMatrixTransform:
    r"""The Brenier (optimal) map ``x -> y`` from ``N(m1, S1)`` to ``N(m2, S2)``, ``S1`` definite.

    .. math:: T(x) = m_2 + A (x - m_1), \qquad
        A = S_1^{-1/2} \big(S_1^{1/2} S_2 S_1^{1/2}\big)^{1/2} S_1^{-1/2},

    symmetric positive semi-definite, with :math:`A S_1 A = S_2`; its transport cost
    :math:`E\lVert x - T(x) \rVert^2` is :math:`W_2^2`. For ``N(0, I)`` it is
    :func:`krflows.exact.gaussian_brenier_map`.

    Arguments:
        m1, m2: means ``(d,)``; S1, S2: covariances ``(d, d)`` (``S1`` positive definite).

    Example:
        >>> T = gaussian_ot_map([0.0], [[4.0]], [1.0], [[9.0]])
        >>> T(torch.tensor([2.0]))
        tensor([4.])
    """
    m1, S1 = _gaussian(m1, S1, "N(m1, S1)")
    m2, S2 = _gaussian(m2, S2, "N(m2, S2)")
    if m1.dim() != 1 or m2.shape != m1.shape:
        raise ValueError(f"means must have one shape (d,), got {tuple(m1.shape)} and {tuple(m2.shape)}")
    val, vec = torch.linalg.eigh(S1)
    if val.min() <= 0:
        raise ValueError("S1 must be positive definite (it has an eigenvalue <= 0)")
    r1 = (vec * val.sqrt()) @ vec.mT
    r1_inv = (vec * val.rsqrt()) @ vec.mT
    A = r1_inv @ _sqrtm(r1 @ S2 @ r1) @ r1_inv
    A = 0.5 * (A + A.mT)
    return AffineMatrixTransform(m2 - m1 @ A.mT, A)


def _affine_parts(T: Transform) -> tuple[Tensor, Tensor]:
    if isinstance(T, LowerAffineTransform):
        return T.shift, T.tril
    if isinstance(T, AffineMatrixTransform):
        return T.shift, T.matrix
    raise ValueError(f"T must be a LowerAffineTransform or AffineMatrixTransform, got {type(T).__name__}")


def affine_transport_cost(T: Transform, mean, cov) -> Tensor:
    r"""The exact cost :math:`E \lVert x - T(x) \rVert^2` of an affine ``T: x -> b + A x``,
    :math:`x \sim N(m, S)`.

    .. math:: E \lVert x - T(x) \rVert^2 = \lVert (I - A) m - b \rVert^2
        + \operatorname{tr}\big((I - A) S (I - A)^\top\big) .

    Equal to :math:`W_2^2(N(m, S), T_\# N(m, S))` exactly when ``T`` is the Brenier map
    (``A`` symmetric PSD); larger for any other map with the same pushforward, e.g. the
    triangular KR map of a correlated Gaussian.

    Arguments:
        T: a :class:`~krflows.transforms.LowerAffineTransform` or
            :class:`~krflows.transforms.AffineMatrixTransform` in ``d`` dimensions.
        mean: ``m``, shape ``(d,)``; cov: ``S``, shape ``(d, d)``.

    Example:
        >>> T = AffineMatrixTransform(torch.tensor([1.0]), torch.tensor([[2.0]]))
        >>> affine_transport_cost(T, [0.0], [[1.0]])  # 1^2 + (1 - 2)^2 * 1
        tensor(2.)
    """
    b, A = _affine_parts(T)
    m, S = _gaussian(mean, cov, "N(mean, cov)")
    m, S = m.to(A), S.to(A)
    if A.shape != S.shape:
        raise ValueError(f"cov must have the map's shape {tuple(A.shape)}, got {tuple(S.shape)}")
    B = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device) - A
    return ((m @ B.mT - b) ** 2).sum() + torch.trace(B @ S @ B.mT)


# ---------------------------------------------------------------------------------------------
# Displacement interpolation


def _check_t(t: float) -> float:
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    return t


class Interpolated(TriangularTransform):
    r"""The interpolated map ``z -> x``, :math:`T_t(z) = (1 - t)\, z + t\, T(z)`, of a triangular ``T``.

    Lower triangular, with a positive diagonal for every ``t`` in ``[0, 1]``:

    .. math:: \log \partial_k T_{t,k} = \log\big((1 - t) + t\, e^{\log \partial_k T_k}\big) .

    For the Brenier map ``T``, :math:`(T_t)_\# \mu` is the W2 (McCann displacement) geodesic;
    for a KR map it is a path of triangular pushforwards, not a geodesic.

    The forward map is one pass of ``T``. The inverse ``x -> z`` solves coordinate by
    coordinate (``d`` sequential passes): pass ``k`` finds ``z_k`` from ``x_k`` and the already
    exact ``z_{<k}`` by bracketed Newton (:func:`krflows.inverse.solve_monotone`, tolerance
    :func:`krflows.inverse.default_tolerance`: ``1e-12 (1 + |z|)`` in float64), each
    iteration evaluating ``T`` once on the points still active. Gradients through the inverse
    are implicit (one differentiable Newton step per pass). At ``t = 1`` the inverse is
    ``T``'s own, at ``t = 0`` both directions are the identity.

    Arguments:
        T: a :class:`~krflows.transforms.TriangularTransform` ``z -> x`` on ``R^d``.
        t: the time, in ``[0, 1]``.
        bracket: the initial bracket of every coordinate's root (widened as needed).

    Example:
        >>> T = LowerAffineTransform(torch.zeros(2), torch.tensor([[3.0, 0.0], [1.0, 1.0]]))
        >>> Tt = Interpolated(T, 0.5)
        >>> x = Tt(torch.ones(2))
        >>> x, Tt.inv(x)
        (tensor([2.0000, 1.5000]), tensor([1., 1.]))
    """

    def __init__(self, T: TriangularTransform, t: float, bracket: tuple[float, float] = (-8.0, 8.0)):
        super().__init__()
        if not isinstance(T, TriangularTransform):
            raise ValueError(f"T must be a TriangularTransform (z -> x), got {type(T).__name__}")
        self.T, self.t, self.bracket = T, _check_t(t), bracket

    def _mix(self, z: Tensor, x: Tensor, log_diag: Tensor) -> tuple[Tensor, Tensor]:
        t = self.t
        log_mix = torch.logaddexp(torch.full_like(log_diag, math.log1p(-t)), log_diag + math.log(t))
        return (1 - t) * z + t * x, log_mix

    def expected_input(self) -> tuple[int | None, Tensor | None]:
        return self.T.expected_input()

    def call_and_log_diag(self, z: Tensor) -> tuple[Tensor, Tensor]:
        if self.t == 0.0:
            return z, torch.zeros_like(z)
        x, log_diag = self.T.call_and_log_diag(z)
        if self.t == 1.0:
            return x, log_diag
        return self._mix(z, x, log_diag)

    def inverse_and_log_diag(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.t == 0.0:
            return x, torch.zeros_like(x)
        if self.t == 1.0:
            return self.T.inverse_and_log_diag(x)
        z = torch.zeros_like(x)
        for k in range(x.shape[-1]):
            z_k, _ = solve_monotone(self._coordinate(k), x[..., k], z, *self.bracket)
            z = torch.cat([z[..., :k], z_k.unsqueeze(-1), z[..., k + 1:]], -1)
        return z, self.call_and_log_diag(z)[1]

    def _coordinate(self, k: int) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``u -> T_{t,k}(z_{<k}, u)`` and its log-derivative, with ``z`` carried as params."""
        def f(u: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
            zk = torch.cat([z[..., :k], u.unsqueeze(-1), z[..., k + 1:]], -1)
            x, log_diag = self.call_and_log_diag(zk)
            return x[..., k], log_diag[..., k]
        return f

    def inverse_residual(self, x: Tensor) -> Tensor:
        """``max_k |T_t(T_t^{-1}(x))_k - x_k|`` per point, shape ``(*)``: the measurable error."""
        with torch.no_grad():
            return (self(self.inv(x)) - x).abs().amax(-1)


def interpolate(flow, t: float) -> TransformedDistribution:
    r"""The law :math:`(T_t)_\# N(0, I)` of the interpolated flow ``z -> x``, ``T_t = (1-t) Id + t T``.

    ``T`` is ``flow.triangular`` (flow order); the flow's variable ``order``, if any, is
    applied after it, as in ``flow.transform``. ``t = 0`` gives the reference (permuted),
    ``t = 1`` the flow's own law. ``log_prob`` inverts :class:`Interpolated` by root finding.

    Arguments:
        flow: a :class:`krflows.KRFlow` (anything with ``triangular``, ``base``, ``order``).
        t: the time, in ``[0, 1]``.

    Returns:
        a :class:`torch.distributions.TransformedDistribution` with ``sample``, ``rsample`` and
        ``log_prob`` (event shape ``(d,)``).
    """
    parts: list[Transform] = [Interpolated(flow.triangular, t)]
    order = getattr(flow, "order", None)
    if order is not None:
        parts.append(Permutation(order))
    transform = parts[0] if len(parts) == 1 else ComposeTransform(parts)
    return TransformedDistribution(flow.base, transform)


def interpolate_affine(T: Transform, t: float) -> Transform:
    r"""The interpolation :math:`z \mapsto (1-t) z + t (b + A z) = t b + ((1-t) I + t A) z` of an affine map.

    Lower triangular input gives a :class:`~krflows.transforms.LowerAffineTransform`,
    otherwise an :class:`~krflows.transforms.AffineMatrixTransform`. From ``N(0, I)``, the
    Brenier map :math:`A = \Sigma^{1/2}` gives the W2 geodesic
    :math:`N(t m, ((1-t) I + t \Sigma^{1/2})^2)`, with
    :math:`W_2(\mu_0, \mu_t) = t\, W_2(\mu_0, \mu_1)`; the KR map :math:`A = L` gives
    :math:`N(t m, B B^\top)`, :math:`B = (1-t) I + t L`, which is not a geodesic.

    Arguments:
        T: a :class:`~krflows.transforms.LowerAffineTransform` or
            :class:`~krflows.transforms.AffineMatrixTransform` ``z -> x``.
        t: the time, in ``[0, 1]``.

    Example:
        >>> T = interpolate_affine(AffineMatrixTransform(torch.ones(1), 3 * torch.eye(1)), 0.5)
        >>> T(torch.ones(1))
        tensor([2.5000])
    """
    t = _check_t(t)
    b, A = _affine_parts(T)
    B = (1 - t) * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device) + t * A
    if isinstance(T, LowerAffineTransform):
        return LowerAffineTransform(t * b, B)
    return AffineMatrixTransform(t * b, B)


# ---------------------------------------------------------------------------------------------
# Entropic OT between sample sets (POT)


def _weights(w: Tensor | None, n: int, name: str) -> Tensor:
    if w is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    w = torch.as_tensor(w, dtype=torch.float64).detach().cpu()
    if w.shape != (n,) or (w < 0).any() or not torch.isfinite(w).all():
        raise ValueError(f"{name} must be nonnegative finite weights of shape ({n},), got {tuple(w.shape)}")
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
    xp, yp = _pot_points(x).numpy(), _pot_points(y).numpy()
    if not (np.isfinite(xp).all() and np.isfinite(yp).all()):
        raise ValueError("x and y must be finite")
    a, b = _weights(a, xp.shape[0], "a").numpy(), _weights(b, yp.shape[0], "b").numpy()
    cost = ot.dist(xp, yp)
    kw = dict(numItermax=max_iter, stopThr=tol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence is checked below, on the marginals
        plan = None
        if float(cost.max()) / eps < 500:  # the kernel exp(-C / eps) stays far from underflow
            plan = ot.sinkhorn(a, b, cost, eps, **kw)
        if plan is None or not np.isfinite(plan).all() or _violation(plan, a, b) > 10 * tol:
            plan = ot.sinkhorn(a, b, cost, eps, method="sinkhorn_epsilon_scaling", **kw)
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


def entropic_ot_gaussian(m1, S1, m2, S2, eps: float, debiased: bool = False) -> Tensor:
    r"""The entropic OT cost between ``N(m1, S1)`` and ``N(m2, S2)`` in closed form (Janati et al. 2020).

    With :math:`\sigma^2 = \varepsilon / 2` and the cost and regularization of
    :func:`sinkhorn_divergence`,

    .. math:: \mathrm{OT}_\varepsilon = \lVert m_1 - m_2 \rVert^2 + \operatorname{tr} S_1
        + \operatorname{tr} S_2 - \operatorname{tr} D + d \sigma^2 (1 - \log 2\sigma^2)
        + \sigma^2 \log\det(D + \sigma^2 I), \qquad
        D = \big(4 S_1^{1/2} S_2 S_1^{1/2} + \sigma^4 I\big)^{1/2} .

    It tends to :math:`W_2^2` as :math:`\varepsilon \to 0` and to
    :math:`\lVert m_1 - m_2 \rVert^2 + \operatorname{tr} S_1 + \operatorname{tr} S_2` (the
    independent coupling) as :math:`\varepsilon \to \infty`. ``debiased=True`` returns the
    Sinkhorn divergence :math:`S_\varepsilon` of the two Gaussians, the limit of
    :func:`sinkhorn_divergence` between large samples.

    Arguments:
        m1, m2: means ``(*, d)``; S1, S2: covariances ``(*, d, d)`` (symmetric PSD).
        eps: :math:`\varepsilon > 0`.
        debiased: subtract the two self-terms.

    Example:
        >>> z = torch.zeros(1)
        >>> entropic_ot_gaussian(z, torch.eye(1), z + 3, torch.eye(1), eps=0.5, debiased=True)
        tensor(9.)
    """
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    m1, S1 = _gaussian(m1, S1, "N(m1, S1)")
    m2, S2 = _gaussian(m2, S2, "N(m2, S2)")
    if m1.shape[-1] != m2.shape[-1]:
        raise ValueError(f"the two Gaussians must have one dimension, got {m1.shape[-1]} and {m2.shape[-1]}")

    def cost(ma: Tensor, Sa: Tensor, mb: Tensor, Sb: Tensor) -> Tensor:
        d, s2 = Sa.shape[-1], 0.5 * eps
        eye = torch.eye(d, dtype=Sa.dtype, device=Sa.device)
        ra = _sqrtm(Sa)
        D = _sqrtm(4 * ra @ Sb @ ra + s2**2 * eye)
        trace = lambda A: torch.diagonal(A, dim1=-2, dim2=-1).sum(-1)  # noqa: E731
        return (((ma - mb) ** 2).sum(-1) + trace(Sa) + trace(Sb) - trace(D)
                + d * s2 * (1 - math.log(2 * s2)) + s2 * torch.logdet(D + s2 * eye))

    value = cost(m1, S1, m2, S2)
    if debiased:
        value = value - 0.5 * (cost(m1, S1, m1, S1) + cost(m2, S2, m2, S2))
    return value


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


# ---------------------------------------------------------------------------------------------
# Langevin dynamics


class LangevinResult(NamedTuple):
    """Final particles ``(*, d)``, the trace ``(n_steps, *, d)`` (or None), the acceptance rate."""

    x: Tensor
    trace: Tensor | None
    acceptance: float


def _log_prob_and_grad(log_prob: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        lp = log_prob(x)
        (grad,) = torch.autograd.grad(lp.sum(), x)
    return lp.detach(), grad


def _setup(target, x0: Tensor, step: float, n_steps: int):
    if not isinstance(x0, Tensor) or x0.dim() < 1 or not x0.is_floating_point():
        raise ValueError(f"x0 must be a floating tensor of shape (*, d), got {type(x0).__name__}")
    if not step > 0:
        raise ValueError(f"step must be positive, got {step}")
    if int(n_steps) < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps}")
    return as_target(target, x0.shape[-1]).log_prob


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def ula(target, x0: Tensor, step: float, n_steps: int, trace: bool = False,
        generator: torch.Generator | None = None) -> LangevinResult:
    r"""The unadjusted Langevin algorithm, run on a batch of independent particles.

    .. math:: x_{n+1} = x_n + h \nabla \log p(x_n) + \sqrt{2h}\, \xi_n, \qquad \xi_n \sim N(0, I),

    the Euler–Maruyama discretization of the Langevin diffusion, whose law follows the
    Wasserstein gradient flow of :math:`\mathrm{KL}(\cdot \,\|\, p)`. Biased by :math:`O(h)`:
    for :math:`p = N(m, \Sigma)` its stationary law is
    :math:`N(m, \Sigma (I - \tfrac h2 \Sigma^{-1})^{-1})` (stable for :math:`h < 2 \lambda_{\min}(\Sigma)`).

    Arguments:
        target: a krflows target, a distribution, or a callable ``log_prob(x) -> (*,)``
            (unnormalized; differentiable).
        x0: the initial particles ``(*, d)``.
        step: :math:`h > 0`.
        n_steps: the number of steps.
        trace: also return every step's particles ``(n_steps, *, d)``.
        generator: an optional :class:`torch.Generator` for the noise.

    Returns:
        :class:`LangevinResult` ``(x, trace, acceptance=1.0)``.

    Example:
        >>> out = ula(lambda x: -0.5 * (x**2).sum(-1), torch.zeros(1000, 2), 0.1, 100)
        >>> out.x.shape
        torch.Size([1000, 2])
    """
    log_prob = _setup(target, x0, step, n_steps)
    x, states = x0.detach(), []
    for _ in range(int(n_steps)):
        _, grad = _log_prob_and_grad(log_prob, x)
        x = x + step * grad + math.sqrt(2 * step) * _noise(x, generator)
        if trace:
            states.append(x)
    return LangevinResult(x, torch.stack(states) if trace else None, 1.0)


def mala(target, x0: Tensor, step: float, n_steps: int, trace: bool = False,
         generator: torch.Generator | None = None) -> LangevinResult:
    r"""The Metropolis-adjusted Langevin algorithm, run on a batch of independent chains.

    An ULA proposal :math:`y = x + h \nabla \log p(x) + \sqrt{2h}\, \xi` is accepted with
    probability

    .. math:: \alpha = \min\Big(1, \frac{p(y)\, q(x \mid y)}{p(x)\, q(y \mid x)}\Big), \qquad
        \log q(y \mid x) = -\frac{\lVert y - x - h \nabla \log p(x) \rVert^2}{4h} + \text{const},

    which makes ``p`` exactly invariant (no :math:`O(h)` bias). A proposal with a non-finite
    log-density is rejected.

    Arguments:
        target: a krflows target, a distribution, or a callable ``log_prob(x) -> (*,)``.
        x0: the initial particles ``(*, d)``; they should have finite log-density.
        step: :math:`h > 0`.
        n_steps: the number of steps.
        trace: also return every step's particles ``(n_steps, *, d)``.
        generator: an optional :class:`torch.Generator` for the noise and the coins.

    Returns:
        :class:`LangevinResult` ``(x, trace, acceptance)``, ``acceptance`` the fraction of
        accepted proposals over all chains and steps.

    Example:
        >>> out = mala(lambda x: -0.5 * (x**2).sum(-1), torch.zeros(1000, 2), 0.5, 50)
        >>> 0 < out.acceptance < 1
        True
    """
    log_prob = _setup(target, x0, step, n_steps)
    x, states, accepted = x0.detach(), [], 0.0
    lp, grad = _log_prob_and_grad(log_prob, x)

    def log_q(to: Tensor, start: Tensor, grad_start: Tensor) -> Tensor:
        return -((to - start - step * grad_start) ** 2).sum(-1) / (4 * step)

    for _ in range(int(n_steps)):
        y = x + step * grad + math.sqrt(2 * step) * _noise(x, generator)
        lp_y, grad_y = _log_prob_and_grad(log_prob, y)
        log_alpha = lp_y - lp + log_q(x, y, grad_y) - log_q(y, x, grad)
        u = torch.rand(lp.shape, generator=generator, dtype=x.dtype, device=x.device)
        accept = (u.log() < log_alpha) & torch.isfinite(lp_y)  # NaN compares False: rejected
        x = torch.where(accept.unsqueeze(-1), y, x)
        lp, grad = torch.where(accept, lp_y, lp), torch.where(accept.unsqueeze(-1), grad_y, grad)
        accepted += float(accept.double().mean())
        if trace:
            states.append(x)
    rate = accepted / n_steps if n_steps else float("nan")
    return LangevinResult(x, torch.stack(states) if trace else None, rate)
