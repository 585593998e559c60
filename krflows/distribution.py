r"""The flow's law as a :class:`torch.distributions.Distribution`: ``flow()``, as in zuko.

``flow()`` (no argument) returns a :class:`FlowDistribution`, the push-forward
:math:`q = T_\# \mathcal N(0, I_d)` of the reference through the flow's map ``T: z -> x``;
``flow(z)`` with a tensor still returns ``T(z)``. The distribution speaks torch's protocol
(``sample``, ``rsample``, ``log_prob``, ``event_shape == (d,)``, ``expand``) and Pyro's
(``pyro.sample("x", flow())``, plates, ``SVI``), and routes every computation to the
module's fast paths, reading its parameters at each call:

* ``rsample`` is :meth:`KRFlow.rsample_and_log_prob <krflows.KRFlow.rsample_and_log_prob>`
  (one pass; the density of the tensor just drawn is kept, as torch's ``cache_size=1``
  transforms keep it, so a Pyro guide never runs the inverse);
* ``log_prob`` is :meth:`KRFlow.log_prob <krflows.KRFlow.log_prob>` (the safeguarded
  inverse). Plain :class:`~torch.distributions.TransformedDistribution` would compute the
  same number by running the inverse and then the forward map again for the log-det.

What does not apply to a flow: ``mean``, ``variance``, ``entropy``, ``cdf`` and ``icdf``
have no closed form (they raise ``NotImplementedError``; use samples, or
:func:`marginal_quantiles` for the coordinates' quantiles), and
:func:`torch.distributions.kl_divergence` between two flows has none either (estimate it
from ``rsample`` and ``log_prob``). :class:`~torch.distributions.MixtureSameFamily` needs its
components as one batched distribution: ``flow().expand((K,))`` is accepted, but its
``K`` components are the same flow; a mixture of *different* flows is
``torch.logsumexp(log_w + torch.stack([f.log_prob(x) for f in flows], -1), -1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pyro.distributions.torch_distribution import TorchDistributionMixin
from torch import Tensor
from torch.distributions import TransformedDistribution, constraints

__all__ = ["FlowDistribution", "quasi_reference", "sample_quantiles", "marginal_quantiles", "check_levels"]


class FlowDistribution(TransformedDistribution, TorchDistributionMixin):
    r"""The law of a :class:`~krflows.KRFlow`, :math:`x = T(z)`, :math:`z \sim \mathcal N(0, I_d)`.

    .. math:: \log q(x) = \log \mathcal N\big(T^{-1}(x); 0, I\big)
              - \sum_k \log \partial_k T_k\big(T^{-1}(x)\big) .

    A :class:`~torch.distributions.TransformedDistribution` of ``flow.base`` by
    ``flow.transform`` (so ``base_dist`` and ``transforms`` are there for code that looks),
    whose ``rsample`` and ``log_prob`` are the flow's own one-pass and inverse paths; also a
    Pyro distribution (``pyro.sample("x", flow())`` works, in plates too). Gradients flow to
    the module's parameters. Build it with ``flow()``; it reads the module's parameters at
    every call, so one built before an optimizer step samples from the updated flow.

    Arguments:
        flow: a :class:`~krflows.KRFlow` with ``d`` coordinates.
        batch_shape: copies of the (same) law, as after :meth:`expand`.
        validate_args: torch's flag (inputs are always checked by the flow itself).

    Example:
        >>> import krflows
        >>> flow = krflows.KRFlow(2, layers=1, hidden=(8,))
        >>> q = flow()
        >>> q.event_shape, q.batch_shape, q.has_rsample
        (torch.Size([2]), torch.Size([]), True)
        >>> x = q.rsample((5,))
        >>> x.shape, q.log_prob(x).shape
        (torch.Size([5, 2]), torch.Size([5]))
        >>> bool(torch.allclose(q.log_prob(x.detach()), flow.log_prob(x.detach()), atol=1e-5))
        True
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, flow, batch_shape: Sequence[int] = torch.Size(), validate_args: bool | None = None):
        self.flow = flow
        base = flow.base.expand(torch.Size(batch_shape))
        super().__init__(base, flow.transform, validate_args=validate_args)
        # the last rsample, its log q, and the versions it holds for (its own, the parameters')
        self._last: tuple[Tensor, Tensor, tuple[int, ...]] | None = None

    def expand(self, batch_shape: Sequence[int], _instance=None) -> FlowDistribution:
        batch_shape = torch.Size(batch_shape)
        try:
            ok = torch.broadcast_shapes(self.batch_shape, batch_shape) == batch_shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"cannot expand batch shape {tuple(self.batch_shape)} to {tuple(batch_shape)}")
        return FlowDistribution(self.flow, batch_shape, validate_args=self._validate_args)

    def rsample_and_log_prob(self, sample_shape: Sequence[int] = torch.Size()) -> tuple[Tensor, Tensor]:
        """Reparametrized ``x`` ``(*sample_shape, *batch_shape, d)`` and ``log q(x)``, in one pass."""
        x, log_q = self.flow.rsample_and_log_prob(torch.Size(sample_shape) + self.batch_shape)
        # kept only with a graph: a density drawn under no_grad must not stand in for one
        # that the caller differentiates later
        self._last = (x, log_q, self._versions(x)) if torch.is_grad_enabled() else None
        return x, log_q

    def _versions(self, x: Tensor) -> tuple[int, ...]:
        """What a cached ``log q(x)`` holds for: ``x`` and the parameters as they were (an
        in-place edit of either, e.g. an optimizer step, bumps a version: a probe read a stale
        density after both)."""
        return (x._version, *(p._version for p in self.flow.parameters()))

    def rsample(self, sample_shape: Sequence[int] = torch.Size()) -> Tensor:
        return self.rsample_and_log_prob(sample_shape)[0]

    def sample(self, sample_shape: Sequence[int] = torch.Size()) -> Tensor:
        return self.flow.sample(torch.Size(sample_shape) + self.batch_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        """``log q(x)`` for ``x`` of shape ``(*, d)``, broadcast against the batch shape."""
        last = self._last
        fresh = last is not None and value is last[0] and last[2] == self._versions(value)
        log_q = last[1] if fresh else self.flow.log_prob(value)
        return log_q.expand(torch.broadcast_shapes(log_q.shape, self.batch_shape))

    def _no_closed_form(self, what: str, how: str = "krflows.summary(flow.sample((10000,))), or "
                        "marginal_quantiles for quantiles"):
        return NotImplementedError(f"a flow's {what} has no closed form: estimate it from samples, "
                                   f"e.g. {how}")

    @property
    def mean(self) -> Tensor:
        raise self._no_closed_form("mean")

    @property
    def variance(self) -> Tensor:
        raise self._no_closed_form("variance")

    def entropy(self) -> Tensor:
        raise self._no_closed_form("entropy", "-flow.log_prob(flow.sample((10000,))).mean()")

    def cdf(self, value: Tensor) -> Tensor:
        raise self._no_closed_form("cdf")

    def icdf(self, value: Tensor) -> Tensor:
        raise self._no_closed_form("icdf")

    def __repr__(self) -> str:
        batch = f", batch_shape={tuple(self.batch_shape)}" if self.batch_shape else ""
        return f"FlowDistribution(dim={self.event_shape[0]}{batch})"


def quasi_reference(n: int, dim: int, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> Tensor:
    r"""``n`` fixed quasi-random reference points ``z = Φ^{-1}(u)``, ``u`` scrambled Sobol, ``(n, dim)``.

    The same ``(n, dim, seed)`` gives the same points on every call. Each coordinate's
    points are stratified (for ``n = 2^m`` one point in each interval ``[k/n, (k+1)/n)``
    of ``u``), so averages and quantiles over them converge faster than over random draws.
    ``u`` is clamped to ``[1e-10, 1 - 1e-10]``: no infinite ``z``.

    Example:
        >>> z = quasi_reference(1024, 2)
        >>> z.shape, bool(torch.equal(z, quasi_reference(1024, 2)))
        (torch.Size([1024, 2]), True)
    """
    u = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed).draw(n, dtype=torch.float64)
    z = torch.special.ndtri(u.clamp(1e-10, 1 - 1e-10))
    return z.to(dtype=dtype, device=device)


def check_levels(q, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Quantile levels as a tensor ``(Q,)``; ``ValueError`` unless all lie strictly in ``(0, 1)``."""
    q = torch.as_tensor(q, dtype=dtype, device=device).reshape(-1)
    if q.numel() == 0 or not bool(((q > 0) & (q < 1)).all()):
        raise ValueError(f"quantile levels must lie strictly between 0 and 1, got {q.tolist()}")
    return q


def sample_quantiles(x: Tensor, q: Tensor) -> Tensor:
    """Quantiles ``(Q, *)`` of samples ``x`` ``(n, *)`` along dim 0, linear interpolation
    (``torch.quantile``'s default, without its size limit)."""
    xs = torch.sort(x, dim=0).values
    pos = q.to(xs.dtype) * (x.shape[0] - 1)
    lo = pos.floor().long().clamp(0, x.shape[0] - 1)
    hi = (lo + 1).clamp(max=x.shape[0] - 1)
    frac = (pos - lo.to(pos.dtype)).reshape(-1, *[1] * (x.dim() - 1))
    return xs[lo] + frac * (xs[hi] - xs[lo])


@torch.no_grad()
def marginal_quantiles(flow, q: Sequence[float] | Tensor, samples: Tensor | None = None,
                       n: int = 2**15, seed: int = 0) -> Tensor:
    r"""The quantiles of every coordinate of the flow's law, ``(Q, d)`` (user order), deterministic.

    * The leading coordinate of the triangular map (user coordinate ``order[0]``, the
      first one without ``order``) is **exact**: ``T_1`` depends on ``z_1`` alone and is
      increasing, so its quantile at level ``q`` is

      .. math:: x_{(q)} = T_1\big(\Phi^{-1}(q)\big) .

    * Every other coordinate is the sample quantile (linear interpolation) of ``samples``,
      by default the flow's image of :func:`quasi_reference` ``(n, d, seed)``: the same
      fixed points on every call, so the answer does not change between calls; its error
      is that of a quasi-Monte Carlo estimate with ``n`` points.

    Arguments:
        flow: a :class:`~krflows.KRFlow`.
        q: levels in ``(0, 1)``, shape ``(Q,)``.
        samples: draws of the flow ``(m, d)`` to use for the other coordinates.
        n, seed: size and seed of the default quasi-random draws.

    Example:
        >>> import krflows
        >>> flow = krflows.KRFlow(2, family="affine", layers=0).double()
        >>> flow.affine.initialize(torch.tensor([1.0, 0.0]), torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
        >>> marginal_quantiles(flow, [0.5, 0.975])[:, 0]  # exact: 1 + 2 * (0, 1.95996)
        tensor([1.0000, 4.9199], dtype=torch.float64)
    """
    q = check_levels(q, flow.dtype, flow.device)
    first = 0 if flow.order is None else int(flow.order[0])
    if samples is None:
        samples = flow(quasi_reference(n, flow.dim, seed, flow.dtype, flow.device))
    out = sample_quantiles(samples, q)
    z = torch.zeros(q.shape[0], flow.dim, dtype=flow.dtype, device=flow.device)
    z[:, 0] = torch.special.ndtri(q)
    out[:, first] = flow(z)[:, first]
    return out
