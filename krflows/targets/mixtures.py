r"""Multimodal targets: Gaussian mixtures (bimodal, ring, 40 modes) and a 1-D mixture with a true gap."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from krflows.targets.base import LOG_2PI, ShapeLike, Target, as_shape, cholesky_factor

__all__ = ["GaussianMixture", "Bimodal1D", "Bimodal2D", "Ring", "Mixture40", "GappedMixture1D"]


class GaussianMixture(Target):
    r"""A finite Gaussian mixture :math:`\sum_k w_k N(m_k, \Sigma_k)` with known truths.

    The unnormalized form omits the :math:`(2\pi)^{d/2}` of every component,

    .. math::
        \log \tilde p(x) = \log \sum_k w_k \, |\Sigma_k|^{-1/2}
        \exp\big(-\tfrac12 (x - m_k)^\top \Sigma_k^{-1} (x - m_k)\big), \qquad
        \log Z = \tfrac d2 \log 2\pi .

    ``weights`` are the exact component probabilities; ``assign(x)`` is the component of
    highest responsibility. ``modes`` are the component means, which are the modes of the
    density only up to the overlap of the components. Memory is ``O(n K d)`` per call.

    Arguments:
        means: component means ``(K, d)``.
        covs: covariances ``(K, d, d)`` or one shared ``(d, d)``.
        scales: instead of ``covs``, standard deviations: a scalar, ``(K,)`` (isotropic) or
            ``(K, d)`` (diagonal). Neither given means unit covariances.
        weights: nonnegative component weights ``(K,)``, normalized here (default equal).
        dtype, device: see :class:`Target`.

    Example:
        >>> target = GaussianMixture([[-2.0], [2.0]], scales=0.5, weights=[0.25, 0.75])
        >>> target.weights
        tensor([0.2500, 0.7500])
        >>> target.assign(torch.tensor([[-1.0], [0.5]]))
        tensor([0, 1])
    """

    def __init__(
        self,
        means: Tensor | Sequence,
        covs: Tensor | Sequence | None = None,
        *,
        scales: Tensor | Sequence | float | None = None,
        weights: Tensor | Sequence[float] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        means_t = torch.as_tensor(means, dtype=torch.float64)
        if means_t.dim() != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(means_t.shape)}")
        K, d = means_t.shape
        super().__init__(d, dtype=dtype, device=device)
        self.loc = means_t
        self.scale_tril, self._diag = _mixture_scales(covs, scales, K, d)
        self.weights = _normalized_weights(weights, K)
        self.log_z = 0.5 * d * LOG_2PI
        self.to()

    @property
    def n_components(self) -> int:
        """The number of components ``K``."""
        return self.loc.shape[0]

    @property
    def means(self) -> Tensor:
        """The component means ``(K, d)``."""
        return self.loc

    @property
    def modes(self) -> Tensor:
        """The component means ``(K, d)`` (approximate modes; see the class docstring)."""
        return self.loc

    @property
    def covs(self) -> Tensor:
        """The component covariances ``(K, d, d)``."""
        return self.scale_tril @ self.scale_tril.mT

    def _joint(self, x: Tensor) -> Tensor:
        """``log w_k + log N(x; m_k, S_k) + d/2 log 2 pi`` of shape ``(*, K)``."""
        if self._diag is not None:
            w = (x[..., None, :] - self.loc) / self._diag
            maha = (w**2).sum(-1)
        else:
            flat = x.reshape(-1, self.dim)
            diff = flat.mT[None] - self.loc[:, :, None]
            w = torch.linalg.solve_triangular(self.scale_tril, diff, upper=False)
            maha = (w**2).sum(1).mT.reshape(*x.shape[:-1], -1)
        log_det = self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return self.weights.log() - log_det - 0.5 * maha

    def _log_prob(self, x: Tensor) -> Tensor:
        return torch.logsumexp(self._joint(x), dim=-1)

    def responsibilities(self, x: Tensor) -> Tensor:
        """The posterior component probabilities ``(*, K)`` at ``x`` of shape ``(*, d)``."""
        self._check(x)
        return torch.softmax(self._like(x)._joint(x), dim=-1)

    def assign(self, x: Tensor) -> Tensor:
        """The component of highest responsibility, a LongTensor ``(*,)``."""
        self._check(x)
        return self._like(x)._joint(x).argmax(-1)

    def cdf(self, x: Tensor) -> Tensor:
        """The exact CDF ``(*,)`` of a 1-D mixture at ``x`` of shape ``(*, 1)``."""
        if self.dim != 1:
            raise ValueError(f"cdf needs a 1-D mixture, this one has dim {self.dim}")
        self._check(x)
        t = self._like(x)
        u = (x - t.loc[:, 0]) / t.scale_tril[:, 0, 0]
        return (t.weights * torch.special.ndtr(u)).sum(-1)

    def sample_with_labels(
        self, shape: ShapeLike = (), generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Exact samples ``(*shape, d)`` and their component labels ``(*shape,)``."""
        shape = as_shape(shape)
        n = math.prod(shape)
        with torch.no_grad():
            k = self._categorical(self.weights, n, generator)
            z = self._randn((n, self.dim), generator)
            x = self.loc[k] + (self.scale_tril[k] @ z[:, :, None])[..., 0]
        return x.reshape(*shape, self.dim), k.reshape(shape)

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        return self.sample_with_labels((n,), generator)[0]


def _mixture_scales(
    covs: Tensor | Sequence | None, scales: Tensor | Sequence | float | None, K: int, d: int
) -> tuple[Tensor, Tensor | None]:
    """Returns the Cholesky factors ``(K, d, d)`` and, when diagonal, the scales ``(K, d)``."""
    if covs is not None and scales is not None:
        raise ValueError("give covs or scales, not both")
    if covs is not None:
        c = torch.as_tensor(covs, dtype=torch.float64)
        if c.shape == (d, d):
            c = c.expand(K, d, d)
        if c.shape != (K, d, d):
            raise ValueError(f"covs must have shape ({K}, {d}, {d}) or ({d}, {d}), "
                             f"got {tuple(c.shape)}")
        L = cholesky_factor(c, "covs")
        diag = L.diagonal(dim1=-2, dim2=-1)
        is_diag = bool((L == torch.diag_embed(diag)).all())
        return L, (diag.clone() if is_diag else None)
    s = torch.as_tensor(1.0 if scales is None else scales, dtype=torch.float64)
    if s.dim() == 0 or s.shape == (K,):
        s = s.reshape(-1, 1).expand(K, d)
    if s.shape != (K, d):
        raise ValueError(f"scales must be a scalar, ({K},) or ({K}, {d}), got {tuple(s.shape)}")
    if not bool((s > 0).all()):
        raise ValueError("scales must be positive")
    s = s.clone()
    return torch.diag_embed(s), s


def _normalized_weights(weights: Tensor | Sequence[float] | None, K: int) -> Tensor:
    if weights is None:
        return torch.full((K,), 1.0 / K, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (K,):
        raise ValueError(f"weights must have shape ({K},), got {tuple(w.shape)}")
    if not bool((w > 0).all()):
        raise ValueError("weights must be positive")
    return w / w.sum()


class Bimodal1D(GaussianMixture):
    r"""Two 1-D Gaussians of standard deviation ``scale``, ``separation`` standard deviations apart.

    .. math::
        p(x) = w_0 N\big(x; -\tfrac{\delta}{2}\sigma, \sigma^2\big)
        + w_1 N\big(x; \tfrac{\delta}{2}\sigma, \sigma^2\big), \qquad \log Z = \tfrac12 \log 2\pi,

    with :math:`\delta` = ``separation`` and :math:`\sigma` = ``scale`` (mixture convention of
    :class:`GaussianMixture`). The valley at the midpoint has density
    :math:`\propto e^{-\delta^2/8}`.

    Arguments:
        separation: distance between the means in units of ``scale`` (default 4).
        weights: the two mode weights (default equal).
        scale: the component standard deviation (default 1).
        dtype, device: see :class:`Target`.

    Example:
        >>> Bimodal1D(separation=6.0, scale=0.5).means
        tensor([[-1.5000],
                [ 1.5000]])
    """

    def __init__(
        self,
        separation: float = 4.0,
        weights: Sequence[float] = (0.5, 0.5),
        scale: float = 1.0,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        half = 0.5 * float(separation) * float(scale)
        super().__init__([[-half], [half]], scales=scale, weights=weights, dtype=dtype,
                         device=device)
        self.separation, self.scale = float(separation), float(scale)


class Bimodal2D(GaussianMixture):
    r"""Two isotropic 2-D Gaussians, ``separation`` standard deviations apart along ``x_0``.

    Means :math:`(\mp \tfrac{\delta}{2}\sigma, 0)`, covariance :math:`\sigma^2 I`;
    :math:`\log Z = \log 2\pi` (mixture convention of :class:`GaussianMixture`). With the
    variable order ``(x_0, x_1)`` the KR map must split the modes in its first coordinate.

    Arguments:
        separation: distance between the means in units of ``scale`` (default 4).
        weights: the two mode weights (default equal).
        scale: the component standard deviation (default 1).
        dtype, device: see :class:`Target`.

    Example:
        >>> Bimodal2D(separation=4.0).means
        tensor([[-2.,  0.],
                [ 2.,  0.]])
    """

    def __init__(
        self,
        separation: float = 4.0,
        weights: Sequence[float] = (0.5, 0.5),
        scale: float = 1.0,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        half = 0.5 * float(separation) * float(scale)
        super().__init__([[-half, 0.0], [half, 0.0]], scales=scale, weights=weights,
                         dtype=dtype, device=device)
        self.separation, self.scale = float(separation), float(scale)


class Ring(GaussianMixture):
    r"""``n`` equally weighted isotropic 2-D Gaussians evenly spaced on a circle.

    Means :math:`r(\cos(2\pi k/n), \sin(2\pi k/n))`, :math:`k = 0..n-1`, covariance
    :math:`\sigma^2 I`, :math:`\log Z = \log 2\pi`. With the defaults (``n = 8``, ``r = 4``,
    :math:`\sigma = 0.5`) neighbouring means are :math:`2 r \sin(\pi/n) / \sigma \approx 6.1`
    standard deviations apart.

    Arguments:
        n: the number of components (default 8).
        radius: the circle radius ``r`` (default 4).
        scale: the component standard deviation :math:`\sigma` (default 0.5).
        dtype, device: see :class:`Target`.

    Example:
        >>> target = Ring(n=4, radius=3.0)
        >>> target.means.norm(dim=-1), target.weights
        (tensor([3., 3., 3., 3.]), tensor([0.2500, 0.2500, 0.2500, 0.2500]))
    """

    def __init__(
        self,
        n: int = 8,
        radius: float = 4.0,
        scale: float = 0.5,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        angle = 2.0 * math.pi * torch.arange(n, dtype=torch.float64) / n
        means = float(radius) * torch.stack([angle.cos(), angle.sin()], dim=-1)
        super().__init__(means, scales=scale, dtype=dtype, device=device)
        self.radius, self.scale = float(radius), float(scale)


#: Standard deviation of the Mixture40 components: softplus(1) = log(1 + e), as in FAB.
MIXTURE40_SCALE = math.log1p(math.e)


class Mixture40(GaussianMixture):
    r"""The 40-component 2-D Gaussian mixture of FAB (Midgley et al., 2023).

    Construction, reproducing FAB's ``GMM(dim=2, n_mixes=40, loc_scaling=40,
    log_var_scaling=1.0, seed=0)``::

        g = torch.Generator().manual_seed(seed)              # seed = 0
        means = (torch.rand((40, 2), generator=g) - 0.5) * 2 * 40   # float32, in [-40, 40]^2

    (identical to FAB's ``torch.manual_seed(0); torch.rand((40, 2))`` on CPU). Every
    component is isotropic with standard deviation ``softplus(1) = log(1 + e) ≈ 1.31326``:
    FAB's ``log_var_scaling = 1`` enters as ``scale_tril = diag(softplus(1))``, so the
    variance is about 1.7247, not 1. Pass ``scale=1.0`` for unit covariances. Weights are
    equal; :math:`\log Z = \log 2\pi` (mixture convention of :class:`GaussianMixture`).

    Arguments:
        scale: the component standard deviation (default ``MIXTURE40_SCALE``).
        seed: the seed of the generator that draws the means (default 0).
        n: the number of components (default 40).
        loc_scaling: half-width of the box of the means (default 40).
        dtype, device: see :class:`Target`.

    Example:
        >>> target = Mixture40()
        >>> target.means.shape, bool(target.means.abs().max() <= 40)
        (torch.Size([40, 2]), True)
    """

    def __init__(
        self,
        scale: float = MIXTURE40_SCALE,
        seed: int = 0,
        n: int = 40,
        loc_scaling: float = 40.0,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        g = torch.Generator().manual_seed(seed)
        means = (torch.rand((n, 2), generator=g) - 0.5) * 2 * loc_scaling
        super().__init__(means, scales=scale, dtype=dtype, device=device)
        self.scale, self.seed = float(scale), int(seed)


class GappedMixture1D(Target):
    r"""Two truncated 1-D Gaussians whose density is exactly zero on the gap ``(a, b)``.

    The left component is :math:`N(\mu_0, \sigma^2)` truncated to :math:`(-\infty, a]`, the
    right one :math:`N(\mu_1, \sigma^2)` truncated to :math:`[b, \infty)`, with
    :math:`\mu_{0,1} = \mp \tfrac{\delta}{2}\sigma`. In the mixture convention of
    :class:`GaussianMixture` (no :math:`\sqrt{2\pi}`),

    .. math::
        \log \tilde p(x) = \log w_k - \tfrac12 \Big(\frac{x - \mu_k}{\sigma}\Big)^2
        - \log \sigma - \log c_k, \qquad
        c_0 = \Phi\Big(\frac{a - \mu_0}{\sigma}\Big), \;
        c_1 = \Phi\Big(\frac{\mu_1 - b}{\sigma}\Big),

    with :math:`k = 0` for :math:`x \le a`, :math:`k = 1` for :math:`x \ge b`, and
    ``log_prob = -inf`` on the open gap (its gradient there is 0);
    :math:`\log Z = \tfrac12 \log 2\pi`. ``weights`` are the exact masses of the two sides.
    The CDF is flat at level :math:`w_0` across the gap, so the exact KR map
    ``z -> x = icdf(Phi(z))`` jumps from ``a`` to ``b`` at :math:`z = \Phi^{-1}(w_0)`; the
    sampler is that map applied to Gaussian noise (in the form ``icdf(U)``).

    Arguments:
        separation: distance between :math:`\mu_0` and :math:`\mu_1` in units of ``scale``
            (default 4).
        gap: the interval ``(a, b)`` of zero density, ``a < b`` (default ``(-1, 1)``).
        weights: the masses of the left and right parts (default equal).
        scale: the standard deviation :math:`\sigma` before truncation (default 1).
        dtype, device: see :class:`Target`.

    Example:
        >>> target = GappedMixture1D()
        >>> target.log_prob(torch.tensor([[-2.0], [0.0], [2.0]]))
        tensor([-0.5204,    -inf, -0.5204])
        >>> target.gap
        (-1.0, 1.0)
    """

    def __init__(
        self,
        separation: float = 4.0,
        gap: tuple[float, float] = (-1.0, 1.0),
        weights: Sequence[float] = (0.5, 0.5),
        scale: float = 1.0,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        a, b = float(gap[0]), float(gap[1])
        if not a < b:
            raise ValueError(f"gap must be an interval (a, b) with a < b, got {gap}")
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        super().__init__(1, dtype=dtype, device=device)
        self.gap = (a, b)
        self.separation, self.scale = float(separation), float(scale)
        half = 0.5 * self.separation * self.scale
        self.locs = (-half, half)
        self.weights = _normalized_weights(weights, 2)
        w0 = float(self.weights[0])
        self._w = (w0, 1.0 - w0)
        self._c = (_ndtr((a + half) / self.scale), _ndtr((half - b) / self.scale))
        self.log_z = 0.5 * LOG_2PI
        self.to()

    @property
    def means(self) -> Tensor:
        r"""The untruncated component locations :math:`(\mu_0, \mu_1)` as ``(2, 1)``."""
        return torch.tensor(self.locs, dtype=self.dtype, device=self.device)[:, None]

    @property
    def modes(self) -> Tensor:
        """The modes of the two truncated components ``(2, 1)``."""
        a, b = self.gap
        m = (min(self.locs[0], a), max(self.locs[1], b))
        return torch.tensor(m, dtype=self.dtype, device=self.device)[:, None]

    def _side(self, x: Tensor, k: int) -> Tensor:
        u = (x - self.locs[k]) / self.scale
        return math.log(self._w[k] / (self.scale * self._c[k])) - 0.5 * u**2

    def _log_prob(self, x: Tensor) -> Tensor:
        a, b = self.gap
        x = x[..., 0]
        out = torch.where(x >= b, self._side(x, 1), torch.full_like(x, -math.inf))
        return torch.where(x <= a, self._side(x, 0), out)

    def assign(self, x: Tensor) -> Tensor:
        """0 left of the gap's midpoint, 1 right of it: a LongTensor ``(*,)``."""
        self._check(x)
        return (x[..., 0] > 0.5 * (self.gap[0] + self.gap[1])).long()

    def cdf(self, x: Tensor) -> Tensor:
        """The exact CDF ``(*,)`` at ``x`` of shape ``(*, 1)``."""
        self._check(x)
        (a, b), (m0, m1), s = self.gap, self.locs, self.scale
        x = x[..., 0]
        left = self._w[0] * torch.special.ndtr((x.clamp(max=a) - m0) / s) / self._c[0]
        right = self._w[1] * torch.special.ndtr((m1 - x.clamp(min=b)) / s) / self._c[1]
        return torch.where(x >= b, 1.0 - right, left)

    def icdf(self, u: Tensor) -> Tensor:
        """The exact quantile function: ``u`` of shape ``(*,)`` in ``(0, 1)`` to ``(*, 1)``."""
        (m0, m1), s, (w0, w1), (c0, c1) = self.locs, self.scale, self._w, self._c
        tiny = torch.finfo(u.dtype).tiny
        left = m0 + s * torch.special.ndtri((u / w0 * c0).clamp(min=tiny, max=c0))
        right = m1 - s * torch.special.ndtri(((1.0 - u) / w1 * c1).clamp(min=tiny, max=c1))
        return torch.where(u <= w0, left, right)[..., None]

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        # float64 inside, so that gaps deep in the tails (c_k < 1e-38) stay exact
        return self.icdf(self._rand((n,), generator).double())


def _ndtr(t: float) -> float:
    return 0.5 * math.erfc(-t / math.sqrt(2.0))
