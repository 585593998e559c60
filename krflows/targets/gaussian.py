r"""Unimodal targets: a correlated Gaussian, Haario's banana, Neal's funnel."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from krflows.targets.base import LOG_2PI, Target, cholesky_factor

__all__ = ["Gaussian", "Banana", "Funnel"]


class Gaussian(Target):
    r"""A Gaussian :math:`N(m, \Sigma)` in its unnormalized form.

    .. math::
        \log \tilde p(x) = -\tfrac12 (x - m)^\top \Sigma^{-1} (x - m), \qquad
        \log Z = \tfrac d2 \log 2\pi + \tfrac12 \log\det\Sigma .

    Its KR map ``z -> x`` is ``m + L z`` with ``L = scale_tril`` the lower Cholesky factor.

    Arguments:
        mean: the mean ``(d,)`` (default zeros).
        cov: the covariance: ``(d, d)``, a vector ``(d,)`` of variances, or a scalar
            (default identity).
        dim: the dimension when neither ``mean`` nor ``cov`` fixes it (default 2).
        dtype, device: see :class:`Target`.

    Example:
        >>> target = Gaussian(torch.tensor([1.0, 0.0]), torch.tensor([[4.0, 1.0], [1.0, 1.0]]))
        >>> target.log_prob(torch.tensor([3.0, 1.0]))
        tensor(-0.6667)
        >>> round(target.log_z, 6)  # log(2 pi) + 0.5 log 3
        2.387183
    """

    def __init__(
        self,
        mean: Tensor | Sequence[float] | None = None,
        cov: Tensor | Sequence | float | None = None,
        *,
        dim: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        mean_t = None if mean is None else torch.as_tensor(mean, dtype=torch.float64)
        cov_t = None if cov is None else torch.as_tensor(cov, dtype=torch.float64)
        d = _infer_dim(mean_t, cov_t, dim)
        super().__init__(d, dtype=dtype, device=device)
        mean_t = torch.zeros(d, dtype=torch.float64) if mean_t is None else mean_t
        if mean_t.shape != (d,):
            raise ValueError(f"mean must have shape ({d},), got {tuple(mean_t.shape)}")
        cov_t = _full_cov(cov_t, d)
        self.scale_tril = cholesky_factor(cov_t, "cov")
        self.loc = mean_t
        self.log_z = 0.5 * d * LOG_2PI + float(self.scale_tril.diagonal().log().sum())
        self.to()

    @property
    def mean(self) -> Tensor:
        """The mean ``(d,)``."""
        return self.loc

    @property
    def cov(self) -> Tensor:
        """The covariance ``(d, d)``."""
        return self.scale_tril @ self.scale_tril.mT

    @property
    def modes(self) -> Tensor:
        """The single mode ``(1, d)``."""
        return self.loc[None]

    def _log_prob(self, x: Tensor) -> Tensor:
        diff = (x - self.loc).reshape(-1, self.dim).mT
        w = torch.linalg.solve_triangular(self.scale_tril, diff, upper=False)
        return -0.5 * (w**2).sum(0).reshape(x.shape[:-1])

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        return self.loc + self._randn((n, self.dim), generator) @ self.scale_tril.mT


def _infer_dim(mean: Tensor | None, cov: Tensor | None, dim: int | None) -> int:
    if mean is not None:
        return mean.shape[-1] if mean.dim() > 0 else 1
    if cov is not None and cov.dim() > 0:
        return cov.shape[-1]
    return 2 if dim is None else int(dim)


def _full_cov(cov: Tensor | None, d: int) -> Tensor:
    if cov is None:
        return torch.eye(d, dtype=torch.float64)
    if cov.dim() == 0:
        return cov * torch.eye(d, dtype=torch.float64)
    if cov.shape == (d,):
        return torch.diag(cov)
    if cov.shape == (d, d):
        return cov
    raise ValueError(f"cov must have shape ({d}, {d}), ({d},) or (), got {tuple(cov.shape)}")


class Banana(Target):
    r"""Haario's twisted Gaussian ("banana"), optionally padded with standard normal coordinates.

    .. math::
        x_0 \sim N(0, s^2), \quad x_1 \mid x_0 \sim N\big(b (x_0^2 - s^2), 1\big), \quad
        x_{i \ge 2} \sim N(0, 1),

    with the defaults ``b = 0.03``, ``s = 10``. The unnormalized form drops all Gaussian
    constants,

    .. math::
        \log \tilde p(x) = -\frac{x_0^2}{2 s^2} - \tfrac12 \big(x_1 - b (x_0^2 - s^2)\big)^2
        - \tfrac12 \sum_{i \ge 2} x_i^2, \qquad \log Z = \tfrac d2 \log 2\pi + \log s ,

    so :math:`\log Z = \log 2\pi + \log 10 \approx 4.140462` for the default. Moments:
    :math:`\mathrm{Var}\,x_0 = s^2`, :math:`E x_1 = 0`, :math:`\mathrm{Var}\,x_1 = 1 + 2 b^2 s^4`.
    The mode is :math:`(0, -b s^2, 0, \dots)`.

    Arguments:
        dim: the total dimension, at least 2 (default 2).
        curvature: ``b`` (default 0.03).
        scale: ``s``, the standard deviation of ``x_0`` (default 10).
        dtype, device: see :class:`Target`.

    Example:
        >>> target = Banana()
        >>> target.log_prob(torch.tensor([[10.0, 0.0], [0.0, 0.0]]))
        tensor([-0.5000, -4.5000])
        >>> round(target.log_z, 6)
        4.140462
    """

    def __init__(
        self,
        dim: int = 2,
        curvature: float = 0.03,
        scale: float = 10.0,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        if dim < 2:
            raise ValueError(f"dim must be at least 2, got {dim}")
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        super().__init__(dim, dtype=dtype, device=device)
        self.curvature, self.scale = float(curvature), float(scale)
        self.log_z = 0.5 * dim * LOG_2PI + math.log(self.scale)

    @property
    def modes(self) -> Tensor:
        """The single mode ``(1, d)``."""
        m = torch.zeros(1, self.dim, dtype=self.dtype, device=self.device)
        m[0, 1] = -self.curvature * self.scale**2
        return m

    def _log_prob(self, x: Tensor) -> Tensor:
        b, s = self.curvature, self.scale
        x0, x1 = x[..., 0], x[..., 1]
        lp = -0.5 * (x0 / s) ** 2 - 0.5 * (x1 - b * (x0**2 - s**2)) ** 2
        return lp - 0.5 * (x[..., 2:] ** 2).sum(-1)

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        z = self._randn((n, self.dim), generator)
        x0 = self.scale * z[:, 0]
        x1 = self.curvature * (x0**2 - self.scale**2) + z[:, 1]
        return torch.cat([x0[:, None], x1[:, None], z[:, 2:]], dim=-1)


class Funnel(Target):
    r"""Neal's funnel, with the log-scale ``v`` as coordinate 0.

    .. math::
        v \sim N(0, \sigma^2), \qquad x_i \mid v \sim N(0, e^{v}), \quad i = 1, \dots, d - 1,

    with :math:`\sigma = 3`. The unnormalized form keeps the :math:`v`-dependent factor
    :math:`e^{-v/2}` of each conditional and drops the constants,

    .. math::
        \log \tilde p(v, x) = -\frac{v^2}{2\sigma^2} - \frac{d-1}{2} v
        - \tfrac12 e^{-v} \sum_i x_i^2, \qquad \log Z = \tfrac d2 \log 2\pi + \log \sigma .

    Moments: :math:`\mathrm{Var}\,v = \sigma^2`, :math:`\mathrm{Var}\,x_i = E e^v = e^{\sigma^2/2}`.
    ``exp(-v)`` overflows float32 for ``v < -176``; the density is then ``-inf`` or NaN.

    Arguments:
        dim: the total dimension ``d`` (default 10).
        scale: :math:`\sigma` (default 3).
        dtype, device: see :class:`Target`.

    Example:
        >>> target = Funnel(dim=3)
        >>> target.log_prob(torch.tensor([0.0, 1.0, 1.0]))
        tensor(-1.)
        >>> round(target.log_z, 6)  # 1.5 log(2 pi) + log 3
        3.855428
    """

    def __init__(
        self,
        dim: int = 10,
        scale: float = 3.0,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        if dim < 2:
            raise ValueError(f"dim must be at least 2, got {dim}")
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        super().__init__(dim, dtype=dtype, device=device)
        self.scale = float(scale)
        self.log_z = 0.5 * dim * LOG_2PI + math.log(self.scale)

    def _log_prob(self, x: Tensor) -> Tensor:
        v, rest = x[..., 0], x[..., 1:]
        quad = ((rest * torch.exp(-0.5 * v)[..., None]) ** 2).sum(-1)
        return -0.5 * (v / self.scale) ** 2 - 0.5 * (self.dim - 1) * v - 0.5 * quad

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        z = self._randn((n, self.dim), generator)
        v = self.scale * z[:, :1]
        return torch.cat([v, torch.exp(0.5 * v) * z[:, 1:]], dim=-1)
