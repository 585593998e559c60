r"""Displacement interpolation of maps ``z -> x``: :math:`T_t = (1 - t)\,\mathrm{Id} + t\,T`.

Both stay monotone (triangular input stays lower triangular) for every ``t`` in ``[0, 1]``.
They are a W2 geodesic only when ``T`` is a Brenier map, which a KR map is not in general.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.distributions import Transform

from krflows.inverse import solve_monotone
from krflows.transforms.base import TriangularTransform
from krflows.transforms.linear import AffineMatrixTransform, LowerAffineTransform, affine_parts

__all__ = ["Interpolated", "interpolate_affine"]


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
    b, A = affine_parts(T)
    B = (1 - t) * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device) + t * A
    if isinstance(T, LowerAffineTransform):
        return LowerAffineTransform(t * b, B)
    return AffineMatrixTransform(t * b, B)

