r"""Monotone 1-D families ``x = f(z; θ)``, strictly increasing in ``z`` by construction.

Each family is pure math: ``forward(z, params)`` and ``inverse(x, params)`` act
elementwise on ``z`` of shape ``(*)`` with parameters ``(*, P)`` and return the value
together with ``log f'`` (always the derivative of the forward map ``z -> x``).

All families are defined on the whole real line: a box ``[-B, B]`` carries the flexible
part and outside it the map continues linearly, so no input gives NaN (nflows' splines
are undefined outside their box with ``tails=None``, nflows#87). Every family maps all
zero parameters to the identity, so a conditioner whose last layer starts at zero makes
the flow start at the identity. Slopes are bounded below by ``min_slope``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from krflows._checks import check_int, check_real, check_slope_floor
from krflows.inverse import solve_monotone

__all__ = ["MonotoneFamily", "Affine", "Spline", "Bernstein", "Integrated", "FAMILIES"]


def _positive(u: Tensor, floor: float) -> Tensor:
    """``floor + softplus(u + c)`` with ``c`` chosen so that ``u = 0`` gives exactly 1."""
    c = math.log(math.expm1(1.0 - floor))
    return floor + F.softplus(u + c)


class MonotoneFamily:
    """Base class: a family of strictly increasing maps ``R -> R``, ``z -> x``."""

    #: number of parameters per coordinate
    n_params: int
    #: "analytic" or "root finding (bracketed Newton)"
    inverse_method: str = "analytic"

    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``x = f(z)`` and ``log f'(z)``; ``z`` is ``(*)``, ``params`` ``(*, P)``."""
        raise NotImplementedError

    def inverse(self, x: Tensor, params: Tensor, guess: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """Returns ``z = f^{-1}(x)`` and ``log f'(z)``; ``guess`` may warm-start a root finder."""
        z, _ = solve_monotone(self.forward, x, params, -self.bound, self.bound, guess=guess)
        return z, self.forward(z, params)[1]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Affine(MonotoneFamily):
    r"""``x = a + s z`` with ``s = floor + softplus(u + c) > 0``: the Gaussian-exact family.

    Parameters per coordinate: ``(a, u)``.
    """

    n_params = 2

    def __init__(self, min_slope: float = 1e-3):
        self.min_slope = check_slope_floor(min_slope)

    def _unpack(self, params: Tensor) -> tuple[Tensor, Tensor]:
        return params[..., 0], _positive(params[..., 1], self.min_slope)

    def forward(self, z, params):
        a, s = self._unpack(params)
        return a + s * z, torch.log(s)

    def inverse(self, x, params, guess=None):
        a, s = self._unpack(params)
        return (x - a) / s, torch.log(s)


class Spline(MonotoneFamily):
    r"""Monotone rational-quadratic spline on ``[-B, B]`` with linear tails (Durkan et al., 2019).

    ``bins`` bins with widths ``w_k``, heights ``h_k`` and knot slopes ``δ_0..δ_K``. In bin
    ``k`` with :math:`\xi = (z - z_k)/w_k` and :math:`s_k = h_k/w_k`,

    .. math:: x = x_k + h_k \frac{s_k \xi^2 + \delta_k \xi(1-\xi)}
                                   {s_k + (\delta_{k+1} + \delta_k - 2 s_k)\xi(1-\xi)} .

    Outside the box the map is linear with the boundary slopes ``δ_0``, ``δ_K`` (learned),
    so it is defined and invertible on all of ``R``. With ``affine=True`` (default) the
    spline is followed by a conditional affine map ``x -> a + s x`` (``s > 0``): a spline
    alone maps its box onto a box of the same size, and conditional scales (a funnel's
    ``e^{v/2}``) need more than that. Inverse: the closed-form root of the bin's quadratic.
    Parameters per coordinate: ``3 * bins + 1`` (``+ 2`` with ``affine``), laid out as
    ``[a, u, widths, heights, slopes]``.

    Written here instead of calling nflows' kernel: nflows scatters inside/outside
    points through boolean masks (several copies and small kernels per call) and pins the
    boundary slopes to 1; this version evaluates every point with the same branch-free
    arithmetic. tests/test_transforms.py checks it against nflows' kernel inside the box.
    """

    def __init__(self, bins: int = 8, bound: float = 5.0, affine: bool = True,
                 min_width: float = 1e-3, min_slope: float = 1e-3):
        bins, bound = check_int("bins", bins, 1), check_real("bound", bound, 0.0)
        min_width = check_real(f"min_width (with bins={bins})", min_width, 0.0, 1.0 / bins, closed_low=True)
        min_slope = check_slope_floor(min_slope)
        if not isinstance(affine, bool | np.bool_):
            raise ValueError(f"affine must be True or False, got {affine!r}")
        self.bins, self.bound, self.affine = bins, bound, bool(affine)
        self.min_width, self.min_slope = min_width, min_slope
        self.n_params = 3 * bins + 1 + 2 * affine

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(shift, scale, spline params)``; identity affine part when ``affine=False``."""
        if not self.affine:
            return params.new_zeros(()), params.new_ones(()), params
        # split, not slicing: the backward of a split is one concatenation, while every slice
        # would zero-fill a full-size gradient buffer
        a, u, rest = params.split([1, 1, params.shape[-1] - 2], -1)
        return a.squeeze(-1), _positive(u.squeeze(-1), self.min_slope), rest

    def _table(self, params: Tensor) -> Tensor:
        """Knot table ``(*, 3, K+1)``: rows ``z_k``, ``x_k`` and the *raw* slope parameters
        (made positive only for the two knots of the bin a point falls in)."""
        K, B, m = self.bins, self.bound, self.min_width
        u, slopes = params.split([2 * K, K + 1], -1)
        u = u.unflatten(-1, (2, K))
        # softmax by hand: ATen's CPU softmax over a last dimension of 8 is about 4x slower
        # (measured 12.9 vs 3.8 ms at 4096 x 10 x 2 x 8, one thread). The shift is detached:
        # softmax does not depend on it, so its gradient is exactly zero anyway.
        e = torch.exp(u - u.amax(-1, keepdim=True).detach())
        wh = e * ((1 - K * m) / e.sum(-1, keepdim=True)) + m
        # Interior knots from the running sum of the first K-1 widths; the end knots are
        # pinned to -B and B exactly (the full sum is 1 only up to rounding, and an end knot
        # at B + 2e-15 made forward and inverse evaluate the tail slope at two different ξ
        # slightly below 1, which in a steep bin compounded into nats of log-density error).
        if torch.compiler.is_compiling():
            # Unrolled running sum: the compiler fuses it with the softmax into one loop,
            # while cumsum would be a separate library call (and its backward another one).
            partial = [wh[..., 0]]
            for k in range(1, K - 1):
                partial.append(partial[-1] + wh[..., k])
            cum = torch.stack(partial, -1) if K > 1 else wh[..., :0]
        else:  # eager: one cumsum kernel beats K small additions
            cum = torch.cumsum(wh[..., :-1], -1)
        edges = torch.zeros(K + 1, dtype=wh.dtype, device=wh.device)
        edges[0], edges[-1] = -B, B
        knots = F.pad(cum * (2 * B) - B, (1, 1)) + edges
        return torch.cat([knots, slopes.unsqueeze(-2)], -2)

    def _bin_ends(self, table: Tensor, row: int, v: Tensor) -> list[Tensor]:
        """``z_k, w_k, x_k, h_k, δ_k, δ_{k+1}`` of the bin of ``v`` along knot row ``row``."""
        # Counting interior knots below v beats searchsorted for a handful of bins.
        idx = (v.unsqueeze(-1) >= table[..., row, 1:-1]).sum(-1, keepdim=True)
        idx = torch.cat([idx, idx + 1], -1).unsqueeze(-2).expand(*idx.shape[:-1], 3, 2)
        ends = table.gather(-1, idx)  # one gather for all six: (*, 3, 2)
        (z0, z1), (x0, x1), (d0, d1) = (pair.unbind(-1) for pair in ends.unbind(-2))
        # Only two of the K+1 slopes are needed per point: make just those positive.
        return [z0, z1 - z0, x0, x1 - x0, _positive(d0, self.min_slope), _positive(d1, self.min_slope)]

    def forward(self, z, params):
        shift, scale, params = self._split(params)
        x, log_d = self._spline(z, params)
        return shift + scale * x, log_d + torch.log(scale)

    def inverse(self, x, params, guess=None):
        shift, scale, params = self._split(params)
        z, log_d = self._spline_inverse((x - shift) / scale, params)
        return z, log_d + torch.log(scale)

    @staticmethod
    def _slope(xi, s, d0, d1):
        """``dx/dz`` inside the bin, and the pieces the value needs."""
        t = xi * (1 - xi)
        den = s + (d1 + d0 - 2 * s) * t
        num = d1 * xi * xi + 2 * s * t + d0 * (1 - xi) * (1 - xi)
        return s * s * num / (den * den), t, den

    def _spline(self, z, params):
        B = self.bound
        zc = z.clamp(-B, B)  # the inside formula only ever sees in-box values: no NaN
        z0, w, x0, h, d0, d1 = self._bin_ends(self._table(params), 0, zc)
        s = h / w
        xi = ((zc - z0) / w).clamp(0, 1)
        slope, t, den = self._slope(xi, s, d0, d1)
        x = x0 + h * (s * xi * xi + d0 * t) / den
        # Outside the box: the line through the end knot (±B, ±B) with the tail's own slope
        # δ_0 or δ_K, taken directly (not the inside formula at ξ ≈ 0 or 1), so that forward
        # and inverse use the very same numbers and agree to rounding at any distance.
        return self._tails(z, zc, x, slope, d0, d1)

    def _spline_inverse(self, x, params):
        B = self.bound
        xc = x.clamp(-B, B)
        z0, w, x0, h, d0, d1 = self._bin_ends(self._table(params), 1, xc)
        s = h / w
        r = xc - x0
        c1 = d1 + d0 - 2 * s
        a = h * (s - d0) + r * c1
        b = h * d0 - r * c1
        disc = (b * b + 4 * a * s * r).clamp_min(0)
        xi = ((-2 * s * r) / (-b - torch.sqrt(disc))).clamp(0, 1)
        slope = self._slope(xi, s, d0, d1)[0]
        return self._tails(x, xc, z0 + xi * w, slope, d0, d1, inverse=True)

    @staticmethod
    def _tails(v, vc, inside, slope, d0, d1, inverse=False):
        """Linear continuation outside the box; returns the value and ``log dx/dz``.

        ``v`` is the input (``z`` forward, ``x`` with ``inverse``), ``vc`` it clamped to the box
        (the end knot, ±B in both coordinates, when outside), ``inside`` the in-box formula's
        value at ``vc`` and ``slope`` its ``dx/dz`` there.
        """
        above, below = v > vc, v < vc
        out = above | below
        slope = torch.where(out, torch.where(above, d1, d0), slope)
        step = (v - vc) / slope if inverse else (v - vc) * slope
        return torch.where(out, vc + step, inside), torch.log(slope)


class Bernstein(MonotoneFamily):
    r"""Monotone Bernstein polynomial on ``[-B, B]`` with linear tails.

    With :math:`u = (z + B) / 2B` and increasing coefficients :math:`\theta_0 < \dots < \theta_M`,

    .. math:: x = \sum_{k=0}^M \theta_k \binom{M}{k} u^k (1-u)^{M-k}, \qquad
              \frac{dx}{dz} = \frac{M}{2B} \sum_{k=0}^{M-1} (\theta_{k+1} - \theta_k)
              \binom{M-1}{k} u^k (1-u)^{M-1-k} > 0 .

    ``θ_0 = -B + a`` and increments ``θ_{k+1} - θ_k = (2B/M)·(floor + softplus(·))``; outside
    the box the map continues linearly with the boundary slope. Inverse: bracketed Newton
    root finding (:func:`krflows.inverse.solve_monotone`). Parameters: ``degree + 1``.
    """

    inverse_method = "root finding (bracketed Newton)"

    def __init__(self, degree: int = 10, bound: float = 5.0, min_slope: float = 1e-3):
        # degree 0 would divide the slope by M = 0
        self.degree, self.bound = check_int("degree", degree, 1), check_real("bound", bound, 0.0)
        self.min_slope = check_slope_floor(min_slope)
        self.n_params = degree + 1

    def _basis(self, u: Tensor, n: int) -> Tensor:
        k = torch.arange(n + 1, dtype=u.dtype, device=u.device)
        binom = torch.exp(torch.lgamma(k.new_tensor(n + 1.0)) - torch.lgamma(k + 1)
                          - torch.lgamma(n - k + 1))
        u = u.unsqueeze(-1)
        return binom * u**k * (1 - u) ** (n - k)

    def forward(self, z, params):
        M, B = self.degree, self.bound
        inc = (2 * B / M) * _positive(params[..., 1:], self.min_slope)
        theta = torch.cat([params[..., :1] - B, params[..., :1] - B + torch.cumsum(inc, -1)], -1)
        zc = z.clamp(-B, B)
        u = (zc + B) / (2 * B)
        x_in = (theta * self._basis(u, M)).sum(-1)
        slope = (M / (2 * B)) * (inc * self._basis(u, M - 1)).sum(-1)
        x = x_in + slope * (z - zc)  # linear continuation outside the box
        return x, torch.log(slope)


class Integrated(MonotoneFamily):
    r"""``x = c + ∫_0^z g(t) dt`` with a positive integrand, evaluated by Gauss–Legendre quadrature.

    The integrand is a rectified (squared) Legendre expansion with a floor, as in
    sum-of-squares polynomial flows and MParT's integrated maps:

    .. math:: g(t) = \text{floor} + \Big(\sum_{j=0}^{K} a_j P_j(t / B)\Big)^2 ,

    a polynomial of degree ``2K``, so Gauss–Legendre with ``K + 1`` nodes integrates it
    exactly and ``log dx/dz = log g(z)`` is the exact log-derivative of the computed map.
    Outside ``[-B, B]`` the integrand is held at its boundary value (linear tails).
    Inverse: bracketed Newton root finding. Parameters: ``c, a_0..a_K`` (``K + 2``).
    """

    inverse_method = "root finding (bracketed Newton)"

    def __init__(self, degree: int = 6, bound: float = 5.0, min_slope: float = 1e-3):
        # the expansion needs a_0 and a_1: degree >= 1
        self.degree, self.bound = check_int("degree", degree, 1), check_real("bound", bound, 0.0)
        self.min_slope = check_slope_floor(min_slope)
        self.n_params = degree + 2
        nodes, weights = np.polynomial.legendre.leggauss(degree + 1)
        self._nodes, self._weights = torch.from_numpy(nodes), torch.from_numpy(weights)

    def _integrand(self, t: Tensor, a: Tensor) -> Tensor:
        # t: (*, n) points, a: (*, K+1) coefficients -> g(t): (*, n)
        s = t / self.bound
        p_prev, p = torch.ones_like(s), s
        acc = a[..., :1] * p_prev + a[..., 1:2] * p
        for j in range(1, self.degree):
            p_prev, p = p, ((2 * j + 1) * s * p - j * p_prev) / (j + 1)
            acc = acc + a[..., j + 1:j + 2] * p
        return self.min_slope + acc * acc

    def forward(self, z, params):
        B = self.bound
        # a_0 is offset so that zero parameters give g = 1, the identity map.
        a = torch.cat([params[..., 1:2] + math.sqrt(1 - self.min_slope), params[..., 2:]], -1)
        zc = z.clamp(-B, B)
        nodes = self._nodes.to(z)
        weights = self._weights.to(z)
        t = zc.unsqueeze(-1) * (1 + nodes) / 2
        integral = zc / 2 * (self._integrand(t, a) * weights).sum(-1)
        g_end = self._integrand(zc.unsqueeze(-1), a).squeeze(-1)
        x = params[..., 0] + integral + (z - zc) * g_end
        return x, torch.log(g_end)


#: name -> family class, for ``KRFlow(family=NAME)``
FAMILIES: dict[str, type[MonotoneFamily]] = {
    "affine": Affine,
    "spline": Spline,
    "bernstein": Bernstein,
    "integrated": Integrated,
}
