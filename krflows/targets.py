r"""Unnormalized posteriors with known truths: exact samplers, normalizing constants, modes.

A :class:`Target` is a density :math:`\tilde p(x) = \exp(\text{log\_prob}(x))` on
:math:`\mathbb{R}^d`, known up to the constant :math:`Z = \int \tilde p(x)\,dx`. Where the
truth is known a target also exposes

* ``log_z``, the float :math:`\log Z` (exact, or by quadrature where the docstring says so),
* ``sample(shape, generator=None)``, an exact sampler returning ``(*shape, d)``,
* for multimodal targets ``weights`` (the probability of each mode or component),
  ``modes`` (their locations) and ``assign(x)``, which maps points to mode indices.

Conventions. ``log_prob`` takes ``(*, d)`` and returns ``(*,)``; it is vectorised and
differentiable in ``x``. Unnormalized means *constants dropped*: every ``log_z`` below is
nonzero on purpose, so code that estimates :math:`\log Z` is tested against a nontrivial value.
Mixtures drop the :math:`(2\pi)^{d/2}` of their Gaussian components, so for them
:math:`\log Z = \tfrac d2 \log 2\pi`. Parameters live in ``target.dtype`` (default
:func:`torch.get_default_dtype`, i.e. float32) on ``target.device``; ``target.to(device, dtype)``
moves them. ``log_prob`` accepts any floating ``x``: if its dtype or device differ from the
target's, a converted copy of the target's constants is used (cached), and the result has the
dtype of ``x``. Build a target with ``dtype=torch.float64`` when its constants must be exact in
double precision.

``fit`` and ``diagnose`` accept plain callables ``log_prob(x) -> (n,)`` through
:func:`as_target`. The command line looks targets up by name through :func:`get_target`.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Target",
    "CallableTarget",
    "DistributionTarget",
    "Gaussian",
    "Banana",
    "Funnel",
    "GaussianMixture",
    "Bimodal1D",
    "Bimodal2D",
    "Ring",
    "Mixture40",
    "GappedMixture1D",
    "TwoMoons",
    "ManyWell",
    "TARGETS",
    "as_target",
    "get_target",
]

_LOG_2PI = math.log(2.0 * math.pi)
_ShapeLike = int | Sequence[int] | torch.Size


def _as_shape(shape: _ShapeLike) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


def _canonical_device(device: torch.device | str | None) -> torch.device:
    return torch.empty(0, device=device).device


class Target:
    r"""An unnormalized density :math:`\tilde p(x) = \exp(\text{log\_prob}(x))` on ``R^dim``.

    Subclasses implement ``_log_prob(x)`` (``x`` already validated, on the target's dtype and
    device) and, where an exact sampler exists, ``_sample(n, generator) -> (n, dim)``. The
    base class validates inputs, reshapes samples, and moves constants between dtypes and
    devices. ``log_z`` is ``None`` where :math:`\log Z` is unknown.

    Arguments:
        dim: The dimension ``d`` of the points.
        dtype: The floating dtype of the target's constants and samples
            (default :func:`torch.get_default_dtype`).
        device: Where the constants live and samples are returned (default CPU).

    Example:
        >>> target = Target.from_callable(lambda x: -0.5 * (x**2).sum(-1), dim=2)
        >>> target(torch.ones(3, 2))
        tensor([-1., -1., -1.])
    """

    log_z: float | None = None
    _castable: bool = True

    def __init__(
        self,
        dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        if int(dim) < 1:
            raise ValueError(f"dim must be a positive integer, got {dim}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        self.dim = int(dim)
        self.dtype = dtype
        self.device = _canonical_device(device)
        self._casts: dict[tuple[torch.dtype, torch.device], Target] = {}

    # ----------------------------------------------------------------- evaluation
    def log_prob(self, x: Tensor) -> Tensor:
        """Returns the unnormalized log-density ``(*,)`` at ``x`` of shape ``(*, dim)``."""
        self._check(x)
        return self._like(x)._log_prob(x)

    def __call__(self, x: Tensor) -> Tensor:
        return self.log_prob(x)

    def _log_prob(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _check(self, x: Tensor, name: str = "x") -> None:
        if not isinstance(x, Tensor):
            raise ValueError(
                f"{name} must be a torch.Tensor of shape (*, {self.dim}), got {type(x).__name__}"
            )
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{name} must have shape (*, {self.dim}), got {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            raise ValueError(
                f"{name} must have a floating dtype (float32 or float64), got {x.dtype}"
            )

    def _like(self, x: Tensor) -> Target:
        """This target, or a cached copy whose constants have the dtype and device of ``x``."""
        if not self._castable or (x.dtype == self.dtype and x.device == self.device):
            return self
        key = (x.dtype, x.device)
        if key not in self._casts:
            twin = copy.copy(self)
            twin._casts = {}
            self._casts[key] = twin.to(device=x.device, dtype=x.dtype)
        return self._casts[key]

    # ------------------------------------------------------------------- sampling
    @property
    def has_sampler(self) -> bool:
        """Whether :meth:`sample` is an exact sampler of this target."""
        return type(self)._sample is not Target._sample

    def sample(self, shape: _ShapeLike = (), generator: torch.Generator | None = None) -> Tensor:
        """Draws exact, independent samples of shape ``(*shape, dim)`` (no gradient).

        Arguments:
            shape: The batch shape, an int or a tuple.
            generator: An optional :class:`torch.Generator`; the noise is drawn on its device.
        """
        shape = _as_shape(shape)
        with torch.no_grad():
            x = self._sample(math.prod(shape), generator)
        return x.to(device=self.device, dtype=self.dtype).reshape(*shape, self.dim)

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no exact sampler")

    def _randn(self, shape: _ShapeLike, generator: torch.Generator | None) -> Tensor:
        device = generator.device if generator is not None else self.device
        z = torch.randn(_as_shape(shape), generator=generator, device=device, dtype=self.dtype)
        return z.to(self.device)

    def _rand(self, shape: _ShapeLike, generator: torch.Generator | None) -> Tensor:
        device = generator.device if generator is not None else self.device
        u = torch.rand(_as_shape(shape), generator=generator, device=device, dtype=self.dtype)
        return u.to(self.device)

    def _categorical(self, weights: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
        """Draws ``n`` indices with probabilities ``weights`` by inverting the CDF."""
        cdf = torch.cumsum(weights, 0)
        k = torch.searchsorted(cdf, self._rand((n,), generator), right=True)
        return k.clamp(max=weights.numel() - 1)

    def _rejection(
        self,
        n: int,
        propose: Callable[[int, torch.Generator | None], tuple[Tensor, Tensor]],
        acceptance: float,
        generator: torch.Generator | None,
    ) -> Tensor:
        """Exact rejection sampling: ``propose(m, g)`` returns points and log acceptance <= 0."""
        accepted, have = [], 0
        while not accepted or have < n:
            m = int(1.2 * (n - have) / acceptance) + 16
            y, log_a = propose(m, generator)
            assert bool((log_a <= 1e-5).all()), "rejection envelope violated"
            keep = self._rand((m,), generator).log() < log_a
            accepted.append(y[keep])
            have += int(keep.sum())
        return torch.cat(accepted)[:n]

    # ----------------------------------------------------------------- conversion
    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Target:
        """Moves the target's tensors to ``device`` and floating ones to ``dtype``; returns self.

        Arguments:
            device: The new device (default: unchanged).
            dtype: The new floating dtype (default: unchanged).
        """
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        device = self.device if device is None else _canonical_device(device)
        dtype = self.dtype if dtype is None else dtype
        for name, value in list(vars(self).items()):
            if isinstance(value, Tensor):
                new_dtype = dtype if value.is_floating_point() else None
                setattr(self, name, value.to(device=device, dtype=new_dtype))
        self.device, self.dtype = device, dtype
        self._casts = {}
        return self

    def double(self) -> Target:
        """Shorthand for ``self.to(dtype=torch.float64)``."""
        return self.to(dtype=torch.float64)

    # ------------------------------------------------------------------- wrapping
    @classmethod
    def from_callable(
        cls, fn: Callable[[Tensor], Tensor], dim: int, *, log_z: float | None = None
    ) -> CallableTarget:
        """Wraps ``fn(x: (n, dim)) -> (n,)`` into a :class:`Target` (see :func:`as_target`)."""
        return CallableTarget(fn, dim, log_z=log_z)

    def __repr__(self) -> str:
        log_z = "None" if self.log_z is None else f"{self.log_z:.6g}"
        return f"{type(self).__name__}(dim={self.dim}, log_z={log_z})"


# ====================================================================== wrappers
class CallableTarget(Target):
    r"""A :class:`Target` around a plain callable ``fn(x) -> log p~(x)``.

    ``fn`` is called on a flattened batch ``(n, dim)`` and must return ``(n,)``; the result
    is reshaped to the batch shape of the input. Its constants are the callable's business:
    inputs are passed through without any dtype or device conversion.

    Arguments:
        fn: The unnormalized log-density, ``(n, dim) -> (n,)``.
        dim: The dimension ``d``.
        log_z: :math:`\log Z` if the caller knows it.

    Example:
        >>> target = CallableTarget(lambda x: -x.abs().sum(-1), dim=3, log_z=3 * math.log(2))
        >>> target(torch.ones(4, 5, 3)).shape
        torch.Size([4, 5])
    """

    _castable = False

    def __init__(self, fn: Callable[[Tensor], Tensor], dim: int, *, log_z: float | None = None):
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {type(fn).__name__}")
        super().__init__(dim)
        self.fn = fn
        self.log_z = None if log_z is None else float(log_z)

    def _log_prob(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.dim)
        out = self.fn(flat)
        if not isinstance(out, Tensor) or out.shape != flat.shape[:1]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"the log-density callable must map (n, {self.dim}) to (n,), "
                f"got {got} for n = {flat.shape[0]}"
            )
        return out.reshape(x.shape[:-1])


class DistributionTarget(Target):
    r"""A :class:`Target` around a normalized :class:`torch.distributions.Distribution`.

    ``log_z = 0``; :meth:`sample` uses the distribution's own sampler, which does not accept
    a generator.

    Arguments:
        distribution: A distribution with ``event_shape == (dim,)``.

    Example:
        >>> d = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
        >>> DistributionTarget(d).log_z
        0.0
    """

    _castable = False

    def __init__(self, distribution: torch.distributions.Distribution):
        event = tuple(distribution.event_shape)
        if len(event) != 1:
            raise ValueError(f"the distribution must have event_shape (dim,), got {event}")
        super().__init__(event[0])
        self.distribution = distribution
        self.log_z = 0.0

    def _log_prob(self, x: Tensor) -> Tensor:
        return self.distribution.log_prob(x)

    def sample(self, shape: _ShapeLike = (), generator: torch.Generator | None = None) -> Tensor:
        if generator is not None:
            raise ValueError("DistributionTarget.sample does not accept a generator")
        return self.distribution.sample(_as_shape(shape))

    @property
    def has_sampler(self) -> bool:
        return True


def as_target(obj: object, dim: int | None = None) -> Target:
    r"""Turns a target, a distribution, or a callable ``log_prob(x) -> (n,)`` into a Target.

    * a :class:`Target` is returned as is;
    * a :class:`torch.distributions.Distribution` becomes a :class:`DistributionTarget`;
    * an object with a ``log_prob`` method and a ``dim`` attribute, or any callable,
      becomes a :class:`CallableTarget`. ``dim`` is taken from ``obj.dim`` when present and
      is required otherwise.

    Arguments:
        obj: What the user passed as a target.
        dim: The dimension; checked against the object's own when both are known.

    Example:
        >>> target = as_target(lambda x: -(x**2).sum(-1), dim=2)
        >>> target.dim, target(torch.ones(2))
        (2, tensor(-2.))
    """
    if isinstance(obj, torch.distributions.Distribution):
        target: Target = DistributionTarget(obj)
    elif isinstance(obj, Target):
        target = obj
    else:
        fn = getattr(obj, "log_prob", obj)
        if not callable(fn):
            raise ValueError(
                f"a target must be a Target, a Distribution or a callable log_prob(x) -> (n,), "
                f"got {type(obj).__name__}"
            )
        own = getattr(obj, "dim", None)
        own = own if isinstance(own, int) and not isinstance(own, bool) else None
        if own is None and dim is None:
            raise ValueError(
                "dim is required to wrap a callable log-density: as_target(fn, dim=...)"
            )
        target = CallableTarget(fn, own if own is not None else dim)
        target.log_z = _float_or_none(getattr(obj, "log_z", None))
    if dim is not None and target.dim != dim:
        raise ValueError(f"the target has dim {target.dim}, but dim={dim} was requested")
    return target


def _float_or_none(value: object) -> float | None:
    try:
        return None if value is None else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


# ===================================================================== unimodal
class Gaussian(Target):
    r"""A Gaussian :math:`N(m, \Sigma)` in its unnormalized form.

    .. math::
        \log \tilde p(x) = -\tfrac12 (x - m)^\top \Sigma^{-1} (x - m), \qquad
        \log Z = \tfrac d2 \log 2\pi + \tfrac12 \log\det\Sigma .

    Its KR map ``z -> x`` is ``m + L z`` with ``L = scale_tril`` the lower Cholesky factor.

    Arguments:
        mean: The mean ``(d,)`` (default zeros).
        cov: The covariance: ``(d, d)``, a vector ``(d,)`` of variances, or a scalar
            (default identity).
        dim: The dimension when neither ``mean`` nor ``cov`` fixes it (default 2).
        dtype, device: See :class:`Target`.

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
        self.scale_tril = _cholesky(cov_t, "cov")
        self.loc = mean_t
        self.log_z = 0.5 * d * _LOG_2PI + float(self.scale_tril.diagonal().log().sum())
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


def _cholesky(cov: Tensor, name: str) -> Tensor:
    if not torch.allclose(cov, cov.mT, rtol=1e-8, atol=1e-12):
        raise ValueError(f"{name} must be symmetric")
    L, info = torch.linalg.cholesky_ex(cov)
    if bool((info != 0).any()):
        raise ValueError(f"{name} must be positive definite")
    return L


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
        dim: The total dimension, at least 2 (default 2).
        curvature: ``b`` (default 0.03).
        scale: ``s``, the standard deviation of ``x_0`` (default 10).
        dtype, device: See :class:`Target`.

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
        self.log_z = 0.5 * dim * _LOG_2PI + math.log(self.scale)

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
        dim: The total dimension ``d`` (default 10).
        scale: :math:`\sigma` (default 3).
        dtype, device: See :class:`Target`.

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
        self.log_z = 0.5 * dim * _LOG_2PI + math.log(self.scale)

    def _log_prob(self, x: Tensor) -> Tensor:
        v, rest = x[..., 0], x[..., 1:]
        quad = ((rest * torch.exp(-0.5 * v)[..., None]) ** 2).sum(-1)
        return -0.5 * (v / self.scale) ** 2 - 0.5 * (self.dim - 1) * v - 0.5 * quad

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        z = self._randn((n, self.dim), generator)
        v = self.scale * z[:, :1]
        return torch.cat([v, torch.exp(0.5 * v) * z[:, 1:]], dim=-1)


# ===================================================================== mixtures
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
        means: Component means ``(K, d)``.
        covs: Covariances ``(K, d, d)`` or one shared ``(d, d)``.
        scales: Instead of ``covs``, standard deviations: a scalar, ``(K,)`` (isotropic) or
            ``(K, d)`` (diagonal). Neither given means unit covariances.
        weights: Nonnegative component weights ``(K,)``, normalized here (default equal).
        dtype, device: See :class:`Target`.

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
        self.log_z = 0.5 * d * _LOG_2PI
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
        self, shape: _ShapeLike = (), generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Exact samples ``(*shape, d)`` and their component labels ``(*shape,)``."""
        shape = _as_shape(shape)
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
        L = _cholesky(c, "covs")
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
        separation: Distance between the means in units of ``scale`` (default 4).
        weights: The two mode weights (default equal).
        scale: The component standard deviation (default 1).
        dtype, device: See :class:`Target`.

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
        separation: Distance between the means in units of ``scale`` (default 4).
        weights: The two mode weights (default equal).
        scale: The component standard deviation (default 1).
        dtype, device: See :class:`Target`.

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
        n: The number of components (default 8).
        radius: The circle radius ``r`` (default 4).
        scale: The component standard deviation :math:`\sigma` (default 0.5).
        dtype, device: See :class:`Target`.

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
        scale: The component standard deviation (default ``MIXTURE40_SCALE``).
        seed: The seed of the generator that draws the means (default 0).
        n: The number of components (default 40).
        loc_scaling: Half-width of the box of the means (default 40).
        dtype, device: See :class:`Target`.

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
        separation: Distance between :math:`\mu_0` and :math:`\mu_1` in units of ``scale``
            (default 4).
        gap: The interval ``(a, b)`` of zero density, ``a < b`` (default ``(-1, 1)``).
        weights: The masses of the left and right parts (default equal).
        scale: The standard deviation :math:`\sigma` before truncation (default 1).
        dtype, device: See :class:`Target`.

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
        self.log_z = 0.5 * _LOG_2PI
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


# ========================================================== classic energies
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
        dtype, device: See :class:`Target`.

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
    return torch.logsumexp(torch.stack(parts), 0) - 0.5 * _LOG_2PI


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
        dim: The even total dimension ``d`` (default 32).
        dtype, device: See :class:`Target`.

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
        self.log_z = self.n_pairs * (dw.log_z + 0.5 * _LOG_2PI)
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


# ===================================================================== registry
TARGETS: dict[str, type[Target]] = {
    "gaussian": Gaussian,
    "banana": Banana,
    "funnel": Funnel,
    "mixture": GaussianMixture,
    "bimodal1d": Bimodal1D,
    "bimodal2d": Bimodal2D,
    "ring": Ring,
    "mixture40": Mixture40,
    "gapped1d": GappedMixture1D,
    "twomoons": TwoMoons,
    "manywell": ManyWell,
}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def get_target(name: str, **kwargs) -> Target:
    """Builds the target registered under ``name`` with keyword arguments ``kwargs``.

    Names are matched ignoring case, ``-`` and ``_``; class names work too
    (``"two-moons"``, ``"TwoMoons"``, ``"gappedmixture1d"``).

    Arguments:
        name: A key of :data:`TARGETS` or a target class name.
        kwargs: Passed to the constructor.

    Example:
        >>> get_target("many_well", dim=8).dim
        8
    """
    lookup = {_key(k): cls for k, cls in TARGETS.items()}
    lookup.update({_key(cls.__name__): cls for cls in TARGETS.values()})
    cls = lookup.get(_key(name))
    if cls is None:
        raise ValueError(f"unknown target {name!r}; choose one of {sorted(TARGETS)}")
    return cls(**kwargs)
