r"""Exact reference maps ``z -> x``, used as ground truth (test oracles, experiments).

* Gaussian targets, in closed form: the KR map ``z -> m + L z`` (``L`` the lower Cholesky
  factor of ``Σ``) and the Brenier map ``z -> m + Σ^{1/2} z``.
* Any 1-D or 2-D density, numerically (:class:`KR1D`, :class:`KR2D`). The target is replaced
  by its piecewise-linear (1-D) or bilinear (2-D) interpolant on a grid. The CDFs of that
  interpolant are piecewise quadratic; they are integrated and inverted *exactly*, so the map,
  its log-derivative and the log-density agree with each other to rounding, and the only
  error against the true target is the interpolation error, :math:`O(h^2)` in the grid step.

The grid density is the target *truncated to the grid*: the maps send ``R^d`` onto the grid
box. Both ends of every CDF are kept (masses summed from the left and from the right);
``z <= 0`` is mapped through the left one with ``Φ(z)`` and ``z > 0`` through the right one
with ``Φ(-z)``, so both tails keep their relative precision (no ``1 - 1e-17`` rounding to 1).
Tables are float64; float32 queries are computed in float64 and cast back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from krflows._checks import check_gaussian, check_points
from krflows.transforms.base import TriangularTransform
from krflows.transforms.linear import AffineMatrixTransform, LowerAffineTransform

__all__ = ["gaussian_kr_map", "gaussian_brenier_map", "KR1D", "KR2D"]

_TINY = torch.finfo(torch.float64).tiny
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------
# Gaussian targets


def gaussian_kr_map(mean, cov) -> LowerAffineTransform:
    r"""The exact KR map ``z -> x = m + L z`` from ``N(0, I)`` to ``N(m, Σ)``.

    .. math:: T(z) = m + L z, \qquad L L^\top = Σ, \ L \text{ lower triangular}, \ L_{kk} > 0,

    the unique lower-triangular monotone map pushing ``N(0, I_d)`` forward to ``N(m, Σ)``.

    Arguments:
        mean: ``m``, shape ``(d,)``; a tensor or array-like (its dtype is kept).
        cov: ``Σ``, shape ``(d, d)``, symmetric positive definite.

    Example:
        >>> T = gaussian_kr_map(torch.zeros(2), torch.tensor([[4.0, 2.0], [2.0, 2.0]]))
        >>> T.tril
        tensor([[2., 0.],
                [1., 1.]])
    """
    mean, cov = check_gaussian(mean, cov, batched=False, psd=False)
    tril, info = torch.linalg.cholesky_ex(cov)
    if info != 0:
        raise ValueError("cov must be positive definite (its Cholesky factorization failed)")
    return LowerAffineTransform(mean, tril)


def gaussian_brenier_map(mean, cov) -> AffineMatrixTransform:
    r"""The Brenier (optimal transport) map ``z -> x = m + Σ^{1/2} z`` to ``N(m, Σ)``.

    .. math:: T(z) = m + Σ^{1/2} z, \qquad Σ^{1/2} = V \operatorname{diag}(\sqrt{λ}) V^\top,

    with ``Σ = V diag(λ) V^T``: the gradient of a convex function, with a symmetric
    positive-definite Jacobian. Not triangular unless ``Σ`` is diagonal.

    Arguments:
        mean: ``m``, shape ``(d,)``; a tensor or array-like (its dtype is kept).
        cov: ``Σ``, shape ``(d, d)``, symmetric positive definite.

    Example:
        >>> T = gaussian_brenier_map([0.0, 0.0], [[2.0, 0.0], [0.0, 9.0]])
        >>> T(torch.ones(2))
        tensor([1.4142, 3.0000])
    """
    mean, cov = check_gaussian(mean, cov, batched=False, psd=False)
    eigval, eigvec = torch.linalg.eigh(cov)
    if eigval.min() <= 0:
        raise ValueError("cov must be positive definite (it has an eigenvalue <= 0)")
    root = (eigvec * eigval.sqrt()) @ eigvec.mT
    return AffineMatrixTransform(mean, 0.5 * (root + root.mT))


# ---------------------------------------------------------------------------------------------
# Piecewise-linear densities: exact CDFs and their inverses


def _std_normal_log_pdf(z: Tensor) -> Tensor:
    return -0.5 * z * z - _LOG_SQRT_2PI


def _lower_tail(z: Tensor) -> Tensor:
    """``Φ(z)`` for ``z <= 0`` to full relative precision (``torch.special.ndtr`` is only
    accurate to about 2% at ``z = -8``: it subtracts from 1)."""
    return 0.5 * torch.special.erfc(-z / math.sqrt(2))


def _cumulative(nodes: Tensor, dens: Tensor) -> tuple[Tensor, Tensor]:
    """Exact masses left and right of every node of a piecewise-linear density, ``(..., n)``."""
    cell = 0.5 * nodes.diff() * (dens[..., 1:] + dens[..., :-1])  # trapezoid: exact for linear
    zero = cell.new_zeros((*cell.shape[:-1], 1))
    left = torch.cat([zero, cell.cumsum(-1)], -1)
    # Summed from the right rather than taken as total - left: the upper tail keeps its
    # relative precision.
    right = torch.cat([cell.flip(-1).cumsum(-1).flip(-1), zero], -1)
    return left, right


Lookup = Callable[[Tensor], Tensor]  # node index -> table value, for each query


def _bisect(pred: Callable[[Tensor], Tensor], like: Tensor, n: int) -> Tensor:
    """Largest ``i`` in ``[0, n - 2]`` with ``pred(i)``, by vectorized bisection (per query).

    ``pred(i)`` is a boolean tensor shaped like ``like``, true for ``i = 0`` and monotone:
    true up to some index, false after it.
    """
    lo = torch.zeros(like.shape, dtype=torch.long, device=like.device)
    hi = torch.full_like(lo, n - 1)
    for _ in range(math.ceil(math.log2(n - 1))):
        mid = (lo + hi) // 2
        ok = pred(mid)
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return lo


def _solve_cell(a: Tensor, s: Tensor, m: Tensor) -> Tensor:
    r"""Distance ``t >= 0`` from a cell edge at which the density ``a + s t`` has mass ``m``.

    The root of :math:`s t^2 / 2 + a t = m`, written as :math:`2m / (a + \sqrt{a^2 + 2 s m})`:
    no cancellation, and valid for either sign of ``s`` and for ``s = 0``.
    """
    # The discriminant is >= 0 up to rounding; the floor also keeps sqrt's gradient finite at
    # a zero-density edge (a = m = 0), where the result is then 0.
    return 2 * m / (a + (a * a + 2 * s * m).clamp_min(_TINY).sqrt())


def _quantile(nodes: Tensor, dens: Lookup, left: Lookup, right: Lookup, z: Tensor):
    r"""``x = F^{-1}(Φ(z))`` and the normalized density ``p(x)`` of a piecewise-linear density.

    ``dens``, ``left``, ``right`` look up the density and the masses left and right of the
    nodes (not necessarily normalized), per query: one shared table (:class:`KR1D`) or one
    interpolated row per query (:class:`KR2D`), without building the rows.
    """
    n = nodes.shape[0]
    lower = z <= 0
    tail = _lower_tail(torch.where(lower, z, -z))  # the smaller tail mass
    tot_l, tot_r = left(n - 1).clamp_min(_TINY), right(0).clamp_min(_TINY)
    ml, mr = tail * tot_l, tail * tot_r
    # Cell holding the quantile: left[i] <= ml < left[i+1], or right[i] > mr >= right[i+1].
    # Zero-mass cells (a gap, or zero density at the grid ends) have equal masses at both
    # ends and are never selected.
    i = _bisect(lambda j: torch.where(lower, left(j) <= ml, right(j) > mr), z, n)
    a, b, x0, x1 = dens(i), dens(i + 1), nodes[i], nodes[i + 1]
    s = (b - a) / (x1 - x0)
    # Solve from the edge nearer the tail, with the mass still to cover inside the cell.
    m = torch.where(lower, ml - left(i), mr - right(i + 1)).clamp_min(0)
    t = torch.minimum(_solve_cell(torch.where(lower, a, b), torch.where(lower, s, -s), m), x1 - x0)
    x = torch.where(lower, x0 + t, x1 - t)
    p = torch.where(lower, a + s * t, b - s * t) / torch.where(lower, tot_l, tot_r)
    return x, p


def _locate(nodes: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cell ``i`` with ``nodes[i] <= x < nodes[i+1]``, the offset ``t`` and width ``h``.

    ``x`` outside the grid is clamped to its ends.
    """
    i = (torch.searchsorted(nodes, x.detach().contiguous(), right=True) - 1)
    i = i.clamp(0, nodes.shape[0] - 2)
    h = nodes[i + 1] - nodes[i]
    return i, torch.minimum((x - nodes[i]).clamp_min(0), h), h


def _normal_score(nodes: Tensor, dens: Lookup, left: Lookup, right: Lookup, x: Tensor):
    r"""``z = Φ^{-1}(F(x))`` and the normalized density ``p(x)``, lookups as in ``_quantile``."""
    n = nodes.shape[0]
    i, t, h = _locate(nodes, x)
    a, b = dens(i), dens(i + 1)
    p = torch.lerp(a, b, t / h)
    tot_l, tot_r = left(n - 1).clamp_min(_TINY), right(0).clamp_min(_TINY)
    fl = (left(i) + 0.5 * t * (a + p)) / tot_l  # exact masses left and right of x
    fr = (right(i + 1) + 0.5 * (h - t) * (p + b)) / tot_r
    lower = fl <= fr
    # Φ^{-1} of the smaller tail only (Φ^{-1}(1 - 1e-17) would be inf); clamped so that x at
    # or beyond the grid ends gets a finite z, ±37.5.
    zq = torch.special.ndtri(torch.where(lower, fl, fr).clamp(_TINY, 0.5))
    return torch.where(lower, zq, -zq), p / torch.where(lower, tot_l, tot_r)


def _density_at(nodes: Tensor, dens: Lookup, x: Tensor) -> Tensor:
    """Log of the piecewise-linear density at ``x``; -inf off the grid."""
    i, t, h = _locate(nodes, x)
    p = torch.lerp(dens(i), dens(i + 1), t / h)
    return torch.where((x >= nodes[0]) & (x <= nodes[-1]), p.log(), -math.inf)


def _lookups(*tables: Tensor) -> tuple[Lookup, ...]:
    return tuple(table.__getitem__ for table in tables)


def _log_diag(z: Tensor, p: Tensor) -> Tensor:
    """``log dT/dz = log φ(z) - log p(x)``; ``p`` is floored so that a gap gives a finite value."""
    return _std_normal_log_pdf(z) - p.clamp_min(_TINY).log()


def _grid(grid, name: str) -> Tensor:
    grid = torch.as_tensor(grid).detach().to(torch.float64)
    if grid.dim() != 1 or grid.shape[0] < 2:
        raise ValueError(f"{name} must have shape (n,) with n >= 2, got {tuple(grid.shape)}")
    if not (torch.isfinite(grid).all() and (grid.diff() > 0).all()):
        raise ValueError(f"{name} must be finite and strictly increasing")
    return grid


def _density(log_density, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Density values scaled so that their maximum is 1, and the log of that scale."""
    lv = torch.as_tensor(log_density).detach().to(torch.float64)
    if lv.shape != shape:
        raise ValueError(f"log_density must have shape {shape}, got {tuple(lv.shape)}")
    if torch.isnan(lv).any() or (lv == math.inf).any():
        raise ValueError("log_density must not contain NaN or +inf")
    peak = lv.max()
    if not torch.isfinite(peak):
        raise ValueError("log_density is -inf everywhere: the density has no mass on the grid")
    return (lv - peak).exp(), peak


def _as64(v: Tensor, dim: int, table: Tensor, name: str) -> Tensor:
    return check_points(v, dim, name=name).to(device=table.device, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Numerical KR maps


class KR1D(TriangularTransform):
    r"""The exact KR map ``z -> x = F^{-1}(Φ(z))`` of a 1-D density given on a grid.

    ``p`` is the piecewise-linear interpolant of the (unnormalized) density values, normalized;
    ``F`` its CDF (piecewise quadratic, exact). Then

    .. math:: T(z) = F^{-1}(Φ(z)), \qquad \log T'(z) = \log φ(z) - \log p(T(z)),

    and ``S(x) = Φ^{-1}(F(x))``. Across a low-density valley the slope ``φ(z) / p(x)``
    is large; across a gap (zero density on an interval) ``T`` jumps, while ``S`` maps the
    whole gap to one ``z`` (where ``log_diag`` is floored to about +708 instead of +inf).

    Outside the grid the density is zero: ``T`` maps ``R`` into ``[grid[0], grid[-1]]``
    (quantiles finer than the grid resolve inside the end cells, finite for every ``z``), and
    ``S`` clamps ``x`` to the grid ends, whose ``z`` is about ±37.5.

    Arguments:
        grid: nodes ``x_0 < ... < x_{n-1}``, shape ``(n,)``.
        log_density: ``log p`` at the nodes up to a constant, shape ``(n,)``; ``-inf`` allowed.

    Attributes:
        log_z: ``log ∫ p`` of the unnormalized input over the grid (a 0-dim float64 tensor).

    Example:
        >>> kr = KR1D.from_log_prob(lambda x: -0.5 * (x - 1.0) ** 2, -9.0, 11.0)
        >>> kr(torch.tensor([[-0.5], [2.0]])).round(decimals=4)  # z -> 1 + z
        tensor([[0.5000],
                [3.0000]])
    """

    def __init__(self, grid: Tensor, log_density: Tensor):
        super().__init__()
        self.grid = _grid(grid, "grid")
        dens, peak = _density(log_density, tuple(self.grid.shape))
        left, right = _cumulative(self.grid, dens)
        total = left[-1]
        self.log_z = peak + total.log()
        self.dens, self.left, self.right = dens / total, left / total, right / total

    @classmethod
    def from_log_prob(cls, log_prob: Callable[[Tensor], Tensor], low: float, high: float,
                      n: int = 4001) -> KR1D:
        r"""Tabulates ``log_prob`` on ``n`` equispaced nodes of ``[low, high]``.

        Arguments:
            log_prob: unnormalized log-density; receives ``x`` of shape ``(n, 1)`` (float64)
                and returns ``n`` values, shape ``(n,)`` or ``(n, 1)``.
            low, high: the grid ends; the target is truncated to ``[low, high]``.
            n: number of nodes.
        """
        if not (low < high and n >= 2):
            raise ValueError(f"need low < high and n >= 2, got low={low}, high={high}, n={n}")
        grid = torch.linspace(low, high, n, dtype=torch.float64)
        with torch.no_grad():
            values = torch.as_tensor(log_prob(grid.unsqueeze(-1)))
        if values.numel() != n:
            raise ValueError(f"log_prob must return {n} values for x of shape ({n}, 1), "
                             f"got shape {tuple(values.shape)}")
        return cls(grid, values.reshape(n))

    def call_and_log_diag(self, z: Tensor) -> tuple[Tensor, Tensor]:
        z64 = _as64(z, 1, self.grid, "z")
        x, p = _quantile(self.grid, *_lookups(self.dens, self.left, self.right), z64)
        return x.to(z), _log_diag(z64, p).to(z)

    def inverse_and_log_diag(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x64 = _as64(x, 1, self.grid, "x")
        z, p = _normal_score(self.grid, *_lookups(self.dens, self.left, self.right), x64)
        return z.to(x), _log_diag(z, p).to(x)

    def slope(self, z: Tensor) -> Tensor:
        """``dT/dz = φ(z) / p(T(z))`` at ``z``, shape ``(*, 1)`` -> ``(*, 1)``."""
        return self.call_and_log_diag(z)[1].exp()

    def log_prob(self, x: Tensor) -> Tensor:
        """Normalized log-density of the grid density, ``(*, 1)`` -> ``(*,)``; -inf off the grid."""
        x64 = _as64(x, 1, self.grid, "x").squeeze(-1)
        return _density_at(self.grid, self.dens.__getitem__, x64).to(x)

    def sample(self, sample_shape: Sequence[int] = (),
               generator: torch.Generator | None = None) -> Tensor:
        """Exact samples of the grid density, shape ``(*sample_shape, 1)``, float64."""
        return self(torch.randn(*sample_shape, 1, dtype=torch.float64, generator=generator))


class KR2D(TriangularTransform):
    r"""The exact KR map ``z -> x`` of a 2-D density given on a rectangular grid.

    ``p`` is the bilinear interpolant of the density values, normalized. Its marginal ``p_1``
    is piecewise linear in ``x_1`` and, at any ``x_1``, ``p(x_1, ·)`` is piecewise linear
    in ``x_2`` (the linear interpolation of the two neighbouring grid rows), so

    .. math::
        x_1 = F_1^{-1}(Φ(z_1)), \qquad x_2 = F_{2|1}^{-1}(Φ(z_2) \mid x_1),

        \log \partial x_k / \partial z_k = \log φ(z_k) - \log p(x_k \mid x_{<k})

    are exact for that interpolant. The conditional rows are never built: cells are found by
    a vectorized bisection that reads the two grid rows (cost ``O(log n_2)`` per query).
    Outside the grid box: as :class:`KR1D`, per coordinate.

    Arguments:
        grid1: nodes in ``x_1``, shape ``(n_1,)``.
        grid2: nodes in ``x_2``, shape ``(n_2,)``.
        log_density: ``log p(x_1[i], x_2[j])`` up to a constant, shape ``(n_1, n_2)``.

    Attributes:
        log_z: ``log ∫ p`` of the unnormalized input over the grid (a 0-dim float64 tensor).

    Example:
        >>> kr = KR2D.from_log_prob(lambda x: -0.5 * (x**2).sum(-1), (-8, -8), (8, 8))
        >>> kr(torch.tensor([[0.5, -1.0]])).round(decimals=3)  # standard normal: identity
        tensor([[ 0.5000, -1.0000]])
    """

    def __init__(self, grid1: Tensor, grid2: Tensor, log_density: Tensor):
        super().__init__()
        self.grid1, self.grid2 = _grid(grid1, "grid1"), _grid(grid2, "grid2")
        dens, peak = _density(log_density, (self.grid1.shape[0], self.grid2.shape[0]))
        left, right = _cumulative(self.grid2, dens)  # along x2, one row per x1 node
        marginal = left[:, -1]  # exact ∫ p(x1_i, x2) dx2; p_1 is linear between the nodes
        m_left, m_right = _cumulative(self.grid1, marginal)
        total = m_left[-1]
        self.log_z = peak + total.log()
        self.dens, self.left, self.right = dens / total, left / total, right / total
        self.marginal, self.m_left, self.m_right = (marginal / total, m_left / total,
                                                    m_right / total)

    @classmethod
    def from_log_prob(cls, log_prob: Callable[[Tensor], Tensor], low: Sequence[float],
                      high: Sequence[float], n: Sequence[int] = (801, 801)) -> KR2D:
        r"""Tabulates ``log_prob`` on an equispaced ``n[0] × n[1]`` grid of the box ``[low, high]``.

        Arguments:
            log_prob: unnormalized log-density; receives ``x`` of shape ``(n[0] n[1], 2)``
                (float64) and returns one value per row.
            low, high: the box corners ``(x1, x2)``; the target is truncated to the box.
            n: nodes per coordinate.
        """
        g1, g2 = (torch.linspace(lo, hi, k, dtype=torch.float64)
                  for lo, hi, k in zip(low, high, n, strict=True))
        with torch.no_grad():
            values = torch.as_tensor(log_prob(torch.cartesian_prod(g1, g2)))
        if values.numel() != g1.numel() * g2.numel():
            raise ValueError(f"log_prob must return one value per row of x, shape "
                             f"({g1.numel() * g2.numel()},), got {tuple(values.shape)}")
        return cls(g1, g2, values.reshape(g1.numel(), g2.numel()))

    def _rows_at(self, x1: Tensor) -> tuple[Lookup, Lookup, Lookup]:
        """Lookups into the unnormalized conditional ``p(x1, ·)``: density, masses left, right."""
        i, t, h = _locate(self.grid1, x1)
        w = t / h

        def row(table: Tensor) -> Lookup:  # grid rows i and i + 1 mixed linearly, read at j
            return lambda j: torch.lerp(table[i, j], table[i + 1, j], w)

        return row(self.dens), row(self.left), row(self.right)

    def call_and_log_diag(self, z: Tensor) -> tuple[Tensor, Tensor]:
        z64 = _as64(z, 2, self.grid1, "z")
        z1, z2 = z64.unbind(-1)
        x1, p1 = _quantile(self.grid1, *_lookups(self.marginal, self.m_left, self.m_right), z1)
        x2, p2 = _quantile(self.grid2, *self._rows_at(x1), z2)
        log_diag = _log_diag(z64, torch.stack([p1, p2], -1))
        return torch.stack([x1, x2], -1).to(z), log_diag.to(z)

    def inverse_and_log_diag(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x64 = _as64(x, 2, self.grid1, "x")
        x1, x2 = x64.unbind(-1)
        z1, p1 = _normal_score(self.grid1, *_lookups(self.marginal, self.m_left, self.m_right), x1)
        z2, p2 = _normal_score(self.grid2, *self._rows_at(x1), x2)
        z = torch.stack([z1, z2], -1)
        return z.to(x), _log_diag(z, torch.stack([p1, p2], -1)).to(x)

    def log_prob(self, x: Tensor) -> Tensor:
        """Normalized log-density of the grid density, ``(*, 2)`` -> ``(*,)``; -inf off the grid."""
        x1, x2 = _as64(x, 2, self.grid1, "x").unbind(-1)
        log_p = _density_at(self.grid2, self._rows_at(x1)[0], x2)
        return torch.where((x1 >= self.grid1[0]) & (x1 <= self.grid1[-1]), log_p, -math.inf).to(x)

    def sample(self, sample_shape: Sequence[int] = (),
               generator: torch.Generator | None = None) -> Tensor:
        """Exact samples of the grid density, shape ``(*sample_shape, 2)``, float64."""
        return self(torch.randn(*sample_shape, 2, dtype=torch.float64, generator=generator))
