r"""Classic energies from the sampling literature: two moons, many-well (double wells)."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from krflows.targets.base import LOG_2PI, Target

__all__ = ["TwoMoons", "ManyWell"]


class TwoMoons(Target):
    r"""The two-moons energy (the form used by the normflows package, Stimper et al. 2023).

    .. math::
        \log \tilde p(x) = -\tfrac12 \Big(\frac{\lVert x \rVert - 2}{0.2}\Big)^2
        + \log\Big(e^{-\frac12 ((x_0 - 2)/0.3)^2} + e^{-\frac12 ((x_0 + 2)/0.3)^2}\Big),

    a ring of radius 2 cut into two arcs around :math:`(\pm 2, 0)`. The density is symmetric
    under :math:`x_0 \mapsto -x_0`, so the two moons have weight 1/2 each; ``assign`` is
    ``x_0 > 0`` and the modes are :math:`(\pm 2, 0)` (up to :math:`10^{-38}`).
    ``log_z`` is *numerical*: :math:`\log Z = 0.80421444863190`, by the trapezoid rule on
    :math:`[-4, 4]^2` (4001² points, converged to 1e-13) and confirmed by
    ``scipy.integrate.dblquad`` in polar coordinates. The sampler is exact: rejection from
    the envelope :math:`h(x_0) k(x_1) \ge \tilde p(x)`, with :math:`h` the second factor above
    and :math:`k(x_1) = \exp(-\tfrac12 ((|x_1| - 2)_+ / 0.2)^2)` (since
    :math:`\lVert x \rVert \ge |x_1|`); the acceptance rate is about 0.33.

    Arguments:
        dtype, device: see :class:`Target`.

    Example:
        >>> target = TwoMoons()
        >>> round(target.log_z, 6), target.weights
        (0.804214, tensor([0.5000, 0.5000]))
        >>> target.assign(torch.tensor([[-2.0, 0.1], [2.0, -0.1]]))
        tensor([0, 1])
    """

    LOG_Z = 0.80421444863190
    _R, _WIDTH, _CENTER, _SPREAD = 2.0, 0.2, 2.0, 0.3

    def __init__(
        self, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ):
        super().__init__(2, dtype=dtype, device=device)
        self.log_z = self.LOG_Z
        self.weights = torch.tensor([0.5, 0.5], dtype=torch.float64)
        self.to()

    @property
    def modes(self) -> Tensor:
        """The mode locations ``(2, 2)``: ``(-2, 0)`` and ``(2, 0)``."""
        return torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=self.dtype, device=self.device)

    def _log_prob(self, x: Tensor) -> Tensor:
        r = torch.linalg.vector_norm(x, dim=-1)
        x0 = x[..., 0]
        left = -0.5 * ((x0 + self._CENTER) / self._SPREAD) ** 2
        right = -0.5 * ((x0 - self._CENTER) / self._SPREAD) ** 2
        return -0.5 * ((r - self._R) / self._WIDTH) ** 2 + torch.logaddexp(left, right)

    def assign(self, x: Tensor) -> Tensor:
        """0 for ``x_0 <= 0`` (left moon), 1 for ``x_0 > 0``: a LongTensor ``(*,)``."""
        self._check(x)
        return (x[..., 0] > 0).long()

    def _propose(self, m: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        R, w = self._R, self._WIDTH
        u = self._rand((m, 4), generator)
        z = self._randn((m, 2), generator)
        sign0 = torch.where(u[:, 0] < 0.5, -1.0, 1.0)
        x0 = sign0 * self._CENTER + self._SPREAD * z[:, 0]
        p_flat = 2 * R / (2 * R + w * math.sqrt(2 * math.pi))
        sign1 = torch.where(u[:, 2] < 0.5, -1.0, 1.0)
        x1 = torch.where(u[:, 1] < p_flat, 2 * R * u[:, 3] - R, sign1 * (R + w * z[:, 1].abs()))
        r = torch.hypot(x0, x1)
        log_k = -0.5 * ((x1.abs() - R).clamp(min=0) / w) ** 2
        log_a = -0.5 * ((r - R) / w) ** 2 - log_k
        return torch.stack([x0, x1], dim=-1), log_a

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        return self._rejection(n, self._propose, 0.3, generator)


class _DoubleWell(NamedTuple):
    log_z: float  # log of the integral of exp(-x^4 + 6 x^2 + 0.5 x)
    left: float  # mass of x < 0
    minima: tuple[float, float]  # the two local maxima of the density
    log_m: float  # rejection bound: log sup p~/q
    acceptance: float


_DW_SPREAD, _DW_BROAD_WEIGHT, _DW_BROAD_SCALE = 0.25, 0.02, 1.5


def _dw_energy(x: Tensor) -> Tensor:
    return x**4 - 6.0 * x**2 - 0.5 * x


def _dw_log_proposal(x: Tensor, left: float, minima: tuple[float, float]) -> Tensor:
    """Log-density of the rejection proposal: two narrow Gaussians on the wells, one broad."""
    eps, s, sb = _DW_BROAD_WEIGHT, _DW_SPREAD, _DW_BROAD_SCALE
    parts = [
        math.log((1 - eps) * left) - 0.5 * ((x - minima[0]) / s) ** 2 - math.log(s),
        math.log((1 - eps) * (1 - left)) - 0.5 * ((x - minima[1]) / s) ** 2 - math.log(s),
        math.log(eps) - 0.5 * (x / sb) ** 2 - math.log(sb),
    ]
    return torch.logsumexp(torch.stack(parts), 0) - 0.5 * LOG_2PI


@functools.lru_cache(maxsize=1)
def _double_well() -> _DoubleWell:
    """Quadrature constants of the 1-D double well, trapezoid rule in float64 on [-6, 6]."""
    x = torch.linspace(-6.0, 6.0, 48_001, dtype=torch.float64)
    h = 12.0 / 48_000
    log_f = -_dw_energy(x)
    log_z = float(torch.logsumexp(log_f, 0)) + math.log(h)
    half = torch.where(x == 0, 0.5, 1.0) * (x <= 0)
    left = float(torch.exp(torch.logsumexp(log_f + half.log(), 0) + math.log(h) - log_z))
    minima = tuple(_newton_dw(x0) for x0 in (-math.sqrt(3.0), math.sqrt(3.0)))
    log_m = float((log_f - _dw_log_proposal(x, left, minima)).max()) + 1e-6
    return _DoubleWell(log_z, left, minima, log_m, math.exp(log_z - log_m))


def _newton_dw(x: float) -> float:
    for _ in range(50):
        x -= (4 * x**3 - 12 * x - 0.5) / (12 * x**2 - 12)
    return x


class ManyWell(Target):
    r"""The many-well energy of FAB (Midgley et al., 2023): ``d/2`` independent double wells.

    Coordinates are interleaved pairs :math:`(x_{2i}, x_{2i+1})`, :math:`i = 0..d/2-1`, as in
    FAB's ``ManyWellEnergy(dim=32, a=-0.5, b=-6, c=1)``:

    .. math::
        \log \tilde p(x) = -\sum_i \Big(x_{2i}^4 - 6 x_{2i}^2 - \tfrac12 x_{2i}
        + \tfrac12 x_{2i+1}^2\Big), \qquad
        \log Z = \tfrac d2 \Big(\log \int e^{-t^4 + 6 t^2 + t/2} dt + \tfrac12 \log 2\pi\Big).

    The 1-D integral is computed once by the trapezoid rule (float64, 48001 points on
    ``[-6, 6]``; the integrand is below :math:`e^{-1000}` outside):
    :math:`\int = 11784.509265`, so :math:`\log Z = 164.695675` for ``d = 32``
    (literature: 164.696). Each double-well coordinate has two wells, at
    :math:`t \approx -1.7108` (mass ``well_weights[0] ≈ 0.15569``) and :math:`t \approx 1.7525`
    (mass ≈ 0.84431), so there are :math:`2^{d/2}` modes. ``assign`` returns
    :math:`\sum_i [x_{2i} > 0]\, 2^i`; ``weights[k]`` is the product of the pairs' well masses
    for the sign pattern ``k``; ``modes[k]`` puts each double-well coordinate at its well and
    the Gaussian ones at 0. The sampler is exact: rejection in 1-D from a three-component
    Gaussian mixture (acceptance ≈ 0.80) for :math:`x_{2i}`, and :math:`x_{2i+1} \sim N(0, 1)`.

    Arguments:
        dim: the even total dimension ``d`` (default 32).
        dtype, device: see :class:`Target`.

    Example:
        >>> target = ManyWell(dim=4)
        >>> round(target.log_z, 4), target.well_weights
        (20.587, tensor([0.1557, 0.8443]))
        >>> target.assign(torch.tensor([1.0, 0.0, -1.0, 0.0]))
        tensor(1)
    """

    _MAX_LISTED_PAIRS = 20

    def __init__(
        self,
        dim: int = 32,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be a positive even integer, got {dim}")
        super().__init__(dim, dtype=dtype, device=device)
        dw = _double_well()
        self.n_pairs = dim // 2
        self.log_z = self.n_pairs * (dw.log_z + 0.5 * LOG_2PI)
        self.well_weights = torch.tensor([dw.left, 1.0 - dw.left], dtype=torch.float64)
        self.well_locations = torch.tensor(dw.minima, dtype=torch.float64)
        self.to()

    def _log_prob(self, x: Tensor) -> Tensor:
        return -(_dw_energy(x[..., 0::2]) + 0.5 * x[..., 1::2] ** 2).sum(-1)

    def _bits(self) -> Tensor:
        k = torch.arange(2**self.n_pairs, device=self.device)
        return (k[:, None] >> torch.arange(self.n_pairs, device=self.device)) & 1

    def _check_listable(self) -> None:
        if self.n_pairs > self._MAX_LISTED_PAIRS:
            raise ValueError(
                f"ManyWell(dim={self.dim}) has 2^{self.n_pairs} modes, too many to list; "
                f"use well_weights and assign instead"
            )

    @property
    def weights(self) -> Tensor:
        """The mode weights ``(2^(d/2),)``, indexed like :meth:`assign`."""
        self._check_listable()
        return self.well_weights[self._bits()].prod(-1)

    @property
    def modes(self) -> Tensor:
        """The mode locations ``(2^(d/2), d)``, indexed like :meth:`assign`."""
        self._check_listable()
        m = torch.zeros(2**self.n_pairs, self.dim, dtype=self.dtype, device=self.device)
        m[:, 0::2] = self.well_locations[self._bits()]
        return m

    def assign(self, x: Tensor) -> Tensor:
        """The sign pattern of the double-well coordinates as an index, a LongTensor ``(*,)``."""
        self._check(x)
        if self.n_pairs > 62:
            raise ValueError(f"assign supports at most 62 pairs, this target has {self.n_pairs}")
        bits = (x[..., 0::2] > 0).long()
        return (bits << torch.arange(self.n_pairs, device=x.device)).sum(-1)

    def _propose_well(self, m: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        dw = _double_well()
        u = self._rand((m,), generator)
        z = self._randn((m,), generator)
        eps = _DW_BROAD_WEIGHT
        left = u < (1 - eps) * dw.left
        narrow = u < 1 - eps
        centre = dw.minima[1] + (dw.minima[0] - dw.minima[1]) * left.to(z.dtype)
        y = torch.where(narrow, centre + _DW_SPREAD * z, _DW_BROAD_SCALE * z)
        log_a = -_dw_energy(y) - _dw_log_proposal(y, dw.left, dw.minima) - dw.log_m
        return y, log_a

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        wells = self._rejection(n * self.n_pairs, self._propose_well, 0.75, generator)
        x = torch.empty(n, self.dim, dtype=self.dtype, device=self.device)
        x[:, 0::2] = wells.reshape(n, self.n_pairs)
        x[:, 1::2] = self._randn((n, self.n_pairs), generator)
        return x
