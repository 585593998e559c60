r"""The :class:`Target` base class (validation, dtype/device casts, sampling helpers), the wrappers
of callables and distributions, :func:`as_target`, and helpers shared by the catalogue."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from krflows._checks import check_points

__all__ = ["Target", "CallableTarget", "DistributionTarget", "as_target", "LOG_2PI", "ShapeLike", "as_shape",
           "cholesky_factor"]

LOG_2PI = math.log(2.0 * math.pi)
ShapeLike = int | Sequence[int] | torch.Size


def as_shape(shape: ShapeLike) -> tuple[int, ...]:
    """A batch shape as a tuple of ints: ``3 -> (3,)``, ``[2, 3] -> (2, 3)``.

    Example:
        >>> as_shape(3), as_shape(torch.Size([2, 3]))
        ((3,), (2, 3))
    """
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
        dim: the dimension ``d`` of the points.
        dtype: the floating dtype of the target's constants and samples
            (default :func:`torch.get_default_dtype`).
        device: where the constants live and samples are returned (default CPU).

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
        check_points(x, self.dim, name=name, finite=False)  # a target may be evaluated anywhere

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

    def sample(self, shape: ShapeLike = (), generator: torch.Generator | None = None) -> Tensor:
        """Draws exact, independent samples of shape ``(*shape, dim)`` (no gradient).

        Arguments:
            shape: The batch shape, an int or a tuple.
            generator: An optional :class:`torch.Generator`; the noise is drawn on its device.
        """
        shape = as_shape(shape)
        with torch.no_grad():
            x = self._sample(math.prod(shape), generator)
        return x.to(device=self.device, dtype=self.dtype).reshape(*shape, self.dim)

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no exact sampler")

    def _randn(self, shape: ShapeLike, generator: torch.Generator | None) -> Tensor:
        device = generator.device if generator is not None else self.device
        z = torch.randn(as_shape(shape), generator=generator, device=device, dtype=self.dtype)
        return z.to(self.device)

    def _rand(self, shape: ShapeLike, generator: torch.Generator | None) -> Tensor:
        device = generator.device if generator is not None else self.device
        u = torch.rand(as_shape(shape), generator=generator, device=device, dtype=self.dtype)
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


class CallableTarget(Target):
    r"""A :class:`Target` around a plain callable ``fn(x) -> log p~(x)``.

    ``fn`` is called on a flattened batch ``(n, dim)`` and must return ``(n,)``; the result
    is reshaped to the batch shape of the input. Its constants are the callable's business:
    inputs are passed through without any dtype or device conversion.

    Arguments:
        fn: the unnormalized log-density, ``(n, dim) -> (n,)``.
        dim: the dimension ``d``.
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

    def sample(self, shape: ShapeLike = (), generator: torch.Generator | None = None) -> Tensor:
        if generator is not None:
            raise ValueError("DistributionTarget.sample does not accept a generator")
        return self.distribution.sample(as_shape(shape))

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
        obj: what the user passed as a target.
        dim: the dimension; checked against the object's own when both are known.

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


def cholesky_factor(cov: Tensor, name: str) -> Tensor:
    """The lower Cholesky factor ``L`` of a covariance ``(*, d, d)``, ``cov = L L^T``.

    Raises:
        ValueError: ``"<name> must be symmetric"`` or ``"<name> must be positive definite"``.

    Example:
        >>> cholesky_factor(torch.tensor([[4.0, 2.0], [2.0, 2.0]]), "cov")
        tensor([[2., 0.],
                [1., 1.]])
    """
    if not torch.allclose(cov, cov.mT, rtol=1e-8, atol=1e-12):
        raise ValueError(f"{name} must be symmetric")
    L, info = torch.linalg.cholesky_ex(cov)
    if bool((info != 0).any()):
        raise ValueError(f"{name} must be positive definite")
    return L
