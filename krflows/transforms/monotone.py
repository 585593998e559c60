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

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from krflows._checks import check_int, check_real, check_slope_floor
from krflows.inverse import solve_monotone
from krflows.transforms import _native

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
    #: whether compiled code should hand this family its parameters parameter-major (contiguous
    #: rows over the points, :class:`~krflows.nn.MaskedMLP`'s ``param_major``): the spline's C
    #: kernels read that layout; traced families run faster on the row-major product
    param_major: bool = False

    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``x = f(z)`` and ``log f'(z)``; ``z`` is ``(*)``, ``params`` ``(*, P)``."""
        raise NotImplementedError

    def inverse(self, x: Tensor, params: Tensor, guess: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """Returns ``z = f^{-1}(x)`` and ``log f'(z)``; ``guess`` may warm-start a root finder."""
        z, _ = solve_monotone(self.forward, x, params, -self.bound, self.bound, guess=guess)
        return z, self.forward(z, params)[1]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
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

    Eager calls of :meth:`forward` (``z -> x``, the sampling and training direction) run one
    autograd Function with a hand-written backward (``_SplineForward``: the plain operations
    cost ~80 small kernels each way, see its docstring and benchmarks/README.md); on the CPU
    (float32, float64) its forward and backward are each one fused C kernel, compiled at first
    use where a C compiler exists (:func:`krflows.transforms._native.status` says whether it
    runs), and so is :meth:`inverse` (``_SplineInverse``); on CUDA devices the same three kernels
    run in Triton (``krflows/transforms/_spline_triton.py``, where Triton is installed, as it is
    with torch's CUDA wheels). Under torch.compile the same kernels run as torch custom operators
    (:func:`krflows.transforms._native.spline_op`: the compiler fuses only the code around them).
    :meth:`forward_raw` has the kernels apply a conditioner's output bias and soft clamp as well.
    On other devices, under torch.func transforms and for double backward the plain operations
    (:meth:`_forward_ops`, :meth:`_inverse_ops`) run.
    """

    param_major = True  # the C kernels' layout

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
        r"""Knot table ``(*, 3, K+1)``: rows ``z_k``, ``x_k`` and the *raw* slope parameters
        (made positive only for the two knots of the bin a point falls in).

        Knot ``j`` is :math:`-B + 2B\,(c\,C_j/S + m j)` with :math:`e = \exp(u - \max u)`,
        :math:`C_j = \sum_{i<j} e_i`, :math:`S = C_K`, ``c = 1 - K m`` (softmaxed widths with a
        floor ``m``). :class:`_SplineForward` computes the same numbers with the same operations
        in a parameter-major layout, so eager forward, inverse and this table agree to the last
        bits (ATen's vectorized and scalar loops may round ``exp`` differently).
        """
        K, B = self.bins, self.bound
        u, slopes = params.split([2 * K, K + 1], -1)
        u = u.unflatten(-1, (2, K))
        # softmax by hand: ATen's CPU softmax over a last dimension of 8 is about 4x slower
        # (measured 12.9 vs 3.8 ms at 4096 x 10 x 2 x 8, one thread). The shift is detached:
        # softmax does not depend on it, so its gradient is exactly zero anyway.
        e = torch.exp(u - u.amax(-1, keepdim=True).detach())
        span = 2 * B * (1 - K * self.min_width)  # what the softmaxed widths share beyond their floors
        if K > 1 and _native.launch_bound(e) and not torch.compiler.is_compiling():
            # eager off the CPU (the inverse's d passes per layer): one scan and three elementwise
            # kernels instead of ~2K (_running_sums says why the CPU does not)
            cs = e.cumsum(-1)
            interior = cs[..., :-1] * (span / cs[..., -1:]) + _constants(self, e)[0].squeeze(-1)
            return self._knots_and_slopes(interior, slopes)
        # Running sum by K - 1 additions in the working precision (ATen's cumsum accumulates
        # floats in double, which would round differently from _SplineForward); the compiler
        # fuses the additions with the softmax into one loop.
        partial = [e[..., 0]]
        for k in range(1, K):
            partial.append(partial[-1] + e[..., k])
        scale = span / partial[-1].unsqueeze(-1)
        if K == 1:
            interior = e[..., :0]
        elif torch.compiler.is_compiling():
            # scaled before the running sum: the product (running sums) * scale would save the
            # K - 1 running sums for backward (+7.5 MiB at B = 4096 for the benchmark's flow)
            en = e[..., :-1] * scale
            partial = [en[..., 0]]
            for k in range(1, K - 1):
                partial.append(partial[-1] + en[..., k])
            interior = torch.stack(partial, -1) + _constants(self, e)[0].squeeze(-1)
        else:
            interior = torch.stack(partial[:-1], -1) * scale + _constants(self, e)[0].squeeze(-1)
        return self._knots_and_slopes(interior, slopes)

    def _knots_and_slopes(self, interior: Tensor, slopes: Tensor) -> Tensor:
        """The table from the interior knots ``(*, 2, K-1)`` and the raw slopes ``(*, K+1)``.
        The end knots are pinned to -B and B exactly (the formula gives them only up to
        rounding, and an end knot at B + 2e-15 made forward and inverse evaluate the tail
        slope at two different ξ slightly below 1, which in a steep bin compounded into
        nats of log-density error)."""
        B = self.bound
        edges = torch.zeros(self.bins + 1, dtype=interior.dtype, device=interior.device)
        edges[0], edges[-1] = -B, B
        knots = F.pad(interior, (1, 1)) + edges
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
        if _eager_functions():  # eager: one autograd Function with a hand-written backward
            return self._apply(_SplineForward, z, params)
        if _compiled_kernel(z):
            return self._operator(z, params, inverse=False)
        return self._forward_ops(z, params)

    def folds(self, z: Tensor) -> bool:
        """Whether :meth:`forward_raw` folds a conditioner's output bias and soft clamp into the
        spline's kernels for points like ``z`` ``(*, d)`` (float32 or float64): eager wherever the
        kernels run (C on the CPU, Triton on CUDA devices), compiled on CUDA devices.
        :class:`~krflows.transforms.AutoregressiveTransform` asks before it takes
        :meth:`~krflows.nn.MaskedMLP.raw` instead of the conditioner's output.

        Compiled CPU code does not fold: inductor fuses the bias and clamp into one loop itself, and
        the fold's recomputed clamp in the backward cost as much as that loop saved (training step,
        benchmark's flow, 2 threads, both in one process: +1.5% at B = 512, +1% at 4096). On CUDA
        devices the conditioner's output is tens of MiB per layer at large batches (70 MiB at
        B = 65536 for the benchmark's flow), so a pass of it is memory traffic the fold saves, at the
        price of arithmetic the GPU has to spare; not yet measured on a GPU (the benchmark's
        ``krflows-compile-unfolded`` is the same flow without it)."""
        if z.dim() < 2:
            return False
        if _eager_functions():
            return _native.kernel(z) is not None
        return z.device.type == "cuda" and _compiled_kernel(z)

    def forward_raw(self, z: Tensor, raw: Tensor, bias: Tensor | None, bound: float) -> tuple[Tensor, Tensor]:
        r"""``forward(z, bound * tanh((raw + bias) / bound))`` (``raw + bias`` for ``bound = 0``): the
        parameters are a conditioner's output ``raw`` ``(*, d, P)`` before its bias ``(d, P)`` and soft
        clamp (:meth:`krflows.nn.MaskedMLP.raw`). Where :meth:`folds`, the kernels add the bias and
        clamp the parameters as they read them, and their backward recomputes that and multiplies
        the parameters' gradient by the clamp's derivative as it writes it: no pass of the
        conditioner's output of its own and no call of the clamp each way, the same values (up to
        rounding: the bias is added after the product instead of in it) and the same memory saved
        for backward (the output before the clamp instead of after it).

        What it is for is the GPU, where a pass over the output is memory traffic (:meth:`folds`).
        On the CPU it is within the machine's noise: the benchmark's flow (funnel-10, 4 layers,
        2 threads, eager), folded against not, in one process: training step 0.96-1.00 of the time at
        B = 512, 0.95-1.02 at 4096 (five pairs each); sampling at 4096 0.91-1.02x the samples/s (four). The
        CPU takes it anyway, so that its tests cover the code CUDA devices run."""
        if self.folds(z) and raw.shape[:-1] == z.shape:
            if _eager_functions() and _SplineForward.param_major(raw):
                return _SplineForward.apply(z, raw, self, bias, bound)
            if not _eager_functions():
                return self._operator(z, raw, False, bias, bound)
        return self.forward(z, _folded(raw, bias, bound))

    def _broadcast(self, v: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``v (*)`` and ``params (*, P)`` broadcast to one shape (what the kernels need)."""
        if v.shape != params.shape[:-1]:
            shape = torch.broadcast_shapes(v.shape, params.shape[:-1])
            v, params = v.expand(shape), params.expand(*shape, self.n_params)
        return v, params

    def _apply(self, function: type[torch.autograd.Function], v: Tensor, params: Tensor):
        """``function.apply(v, params, self)`` with ``v`` and ``params`` broadcast to one shape."""
        return function.apply(*self._broadcast(v, params), self)

    def _forward_ops(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """The forward map as plain tensor operations: what torch.compile traces where the C
        kernels do not run, and the reference (and double-backward path) of :class:`_SplineForward`."""
        shift, scale, params = self._split(params)
        x, log_d = self._spline(z, params)
        return shift + scale * x, log_d + torch.log(scale)

    def inverse(self, x, params, guess=None):
        if _eager_functions() and _native.kernel(x) is not None:
            # eager CPU: the C kernel, with the backward of the inverse function theorem
            return self._apply(_SplineInverse, x, params)
        if _compiled_kernel(x):
            return self._operator(x, params, inverse=True)
        return self._inverse_ops(x, params)

    def _operator(self, v: Tensor, params: Tensor, inverse: bool, bias: Tensor | None = None,
                  clamp: float = 0.0) -> tuple[Tensor, Tensor]:
        """The C kernels as torch custom operators (:func:`krflows.transforms._native.spline_op`):
        the path under torch.compile on the CPU, which then fuses only the code around them
        (``bias (d, P)`` and ``clamp``: :meth:`forward_raw`'s, for parameters ``(*, d, P)``)."""
        v, params = self._broadcast(v, params)
        P = params.shape[-1]
        if params.dim() >= 3:  # (*, d, P): coordinates d, points the rest, as _SplineForward._layout
            d = params.shape[-2]
            pt, vt = params.reshape(-1, d, P).permute(1, 2, 0), v.reshape(-1, d).T
        else:  # one coordinate of n points
            pt, vt = params.reshape(-1, P).T.unsqueeze(0), v.reshape(1, -1)
        out, log_d = _native.spline_op(vt, pt, bias, clamp, self.bins, self.bound, self.min_width,
                                       self.min_slope, self.affine, inverse)
        if params.dim() >= 3:
            return out.T.reshape(v.shape), log_d.T.reshape(v.shape)
        return out.reshape(v.shape), log_d.reshape(v.shape)

    def _inverse_ops(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """The inverse as plain tensor operations (other devices, torch.compile where the kernels do
        not run, double backward)."""
        shift, scale, params = self._split(params)
        z, log_d = self._spline_inverse((x - shift) / scale, params)
        return z, log_d + torch.log(scale)

    @staticmethod
    def _slope(xi, s, d0, d1):
        """``dx/dz`` inside the bin, and the pieces the value (and the derivative) need."""
        t = xi * (1 - xi)
        den = s + (d1 + d0 - 2 * s) * t
        num = d1 * xi * xi + 2 * s * t + d0 * (1 - xi) * (1 - xi)
        return s * s * num / (den * den), t, den, num

    def _spline(self, z, params):
        B = self.bound
        zc = z.clamp(-B, B)  # the inside formula only ever sees in-box values: no NaN
        z0, w, x0, h, d0, d1 = self._bin_ends(self._table(params), 0, zc)
        s = h / w
        xi = ((zc - z0) / w).clamp(0, 1)
        slope, t, den, _ = self._slope(xi, s, d0, d1)
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


def _eager_functions() -> bool:
    """Whether the spline's autograd Functions may run: not under torch.compile (which calls the
    kernels as custom operators or traces the plain operations) nor under torch.func transforms
    (``jacrev``, ``vmap``, ...), which cannot see into a hand-written backward or a C kernel."""
    return not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


def _compiled_kernel(like: Tensor) -> bool:
    """Whether torch.compile is tracing a spline call the C kernels can serve (CPU, float32 or
    float64, kernel built): it then calls them as custom operators instead of tracing the plain
    operations. Not under torch.func transforms (the operators have no vmap rule)."""
    return torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active() and \
        _native.available(like)


@functools.lru_cache(maxsize=32)
def _constants_cached(bins: int, bound: float, min_width: float, dtype: torch.dtype, device: torch.device
                      ) -> tuple[Tensor, Tensor]:
    j = torch.arange(1, bins, dtype=dtype, device=device)
    return (j * (2 * bound * min_width) - bound).unsqueeze(-1), \
        torch.arange(bins + 1, device=device).unsqueeze(-1)


def _running_sums(e: Tensor) -> Tensor:
    """``C_j = sum_{i<j} e_i`` for ``j = 0..K`` along dimension 2 of ``e`` ``(L, 2, K, R)``. On the
    CPU by ``K - 1`` additions in the working precision, as the C kernel and the plain path
    (:meth:`Spline._table`) do, so that the three agree to the last bits (ATen's CPU cumsum
    accumulates floats in double); elsewhere by ``cumsum``: two kernels instead of ``4 K``, where
    eager code is launch-bound (a GPU's scan rounds in its own order anyway)."""
    if _native.launch_bound(e):
        return F.pad(e.cumsum(2), (0, 0, 1, 0))
    L, _, K, R = e.shape
    cs = e.new_empty(L, 2, K + 1, R)
    cs[:, :, 0] = 0
    cs[:, :, 1] = e[:, :, 0]
    for k in range(1, K):
        torch.add(cs[:, :, k], e[:, :, k], out=cs[:, :, k + 1])
    return cs


def _constants(fam: Spline, like: Tensor) -> tuple[Tensor, Tensor]:
    """The interior knots' offsets ``2 B m j - B`` ``(K-1, 1)`` and the bin numbers ``(K+1, 1)``
    (made once per dtype and device: two fewer kernels per call)."""
    make = _constants_cached.__wrapped__ if torch.compiler.is_compiling() else _constants_cached
    return make(fam.bins, fam.bound, fam.min_width, like.dtype, like.device)


class _SplineForward(torch.autograd.Function):
    r"""``Spline.forward`` (``z -> x`` and ``log dx/dz``) as one autograd Function: the eager path.

    Written by hand because eager PyTorch runs the spline as ~80 small kernels forward and as
    many backward, most of them over the full parameter tensor ``(*, d, 3K+3)`` with a last
    dimension of ``K = 8``, where ATen's kernels are slow (one thread, 4096 x 10 points:
    ``amax`` 1.3 ms, ``sum`` 1.0 ms, compare-and-count 1.2 ms over the last dimension, against
    0.04-0.2 ms over a leading one). Here every parameter is a contiguous row over the
    points (a parameter-major ``(L, P, R)`` view: :class:`~krflows.nn.MaskedMLP` returns that
    layout, any other conditioner's output is transposed once), the knots come from ``K - 1``
    vector additions, one ``gather`` picks each point's bin, and the backward writes the
    parameter gradient in closed form: for the softmaxed knots
    :math:`z_j = -B + 2B(c\, C_j/S + m j)`, :math:`C_j = \sum_{i<j} e_i`, :math:`S = C_K`,
    ``c = 1 - K m``,

    .. math:: \frac{\partial L}{\partial u_i} = \frac{2Bc}{S} e_i
              \Big([i<k]\,\bar z_k + [i \le k]\,\bar z_{k+1}
              - \bar z_k \frac{C_k}{S} - \bar z_{k+1} \frac{C_{k+1}}{S}\Big)

    (the same for the ``x`` knots), the two knot slopes through softplus' derivative, the
    in-bin rational function and the tails by the chain rule. Forward values are those of the
    plain path up to the last bits (same operations); gradients agree to rounding
    (tests/test_spline_function.py, float64 ``gradcheck``). Saved for backward: the softmax
    numerators ``e`` and per-point values, no copy of the parameters.

    On the CPU in float32 and float64 the same arithmetic runs as one fused C kernel each way
    (``krflows/transforms/_spline.c``, loaded by :mod:`krflows.transforms._native`: a loop over
    chunks of 64 points that the C compiler vectorizes, on torch's own OpenMP threads; its
    backward recomputes the forward instead of saving it, so only the inputs are kept). The
    torch operations below are the fallback where no C compiler works (``KRFLOWS_NATIVE=0``
    forces them) and the path on other devices; CUDA devices run the same kernels in Triton
    (``_spline_triton.py``), the torch operations only where Triton is missing. At the benchmark's
    shapes (funnel-10, 4 layers, 2 threads, 2-core CPU, both paths interleaved in one process) a
    training step took 8.2 ms at B = 512 with the kernel and 13.2 ms with the torch operations
    (52 vs 68 ms at B = 4096).

    Double backward (``create_graph=True``) recomputes the plain operations
    (:meth:`Spline._forward_ops`) from the saved inputs and differentiates them with autograd,
    so higher derivatives are exact too, only not fast. torch.compile does not run this Function:
    it calls the kernels as custom operators (CPU, CUDA with Triton) or traces the plain operations.
    """

    @staticmethod
    def param_major(params: Tensor) -> bool:
        """Whether ``params (*, d, P)`` is a view of a contiguous ``(d, P, points)`` tensor (what
        :class:`~krflows.nn.MaskedMLP` returns): the kernels' layout, taken without a copy."""
        if params.dim() < 3:  # (n, P): rows are points, not coordinates
            return False
        q = params.reshape(-1, *params.shape[-2:])
        return q.data_ptr() == params.data_ptr() and q.permute(1, 2, 0).is_contiguous()

    @staticmethod
    def _layout(z: Tensor, params: Tensor) -> tuple[Tensor, Tensor, bool]:
        """``(pt, zt, native)``: parameters ``(L, P, R)`` and points ``(L, R)`` in the same order,
        both contiguous (the C kernels read raw memory; ``z`` may be a strided column);
        ``native`` when ``pt`` is a view of ``params`` (:meth:`param_major`)."""
        P = params.shape[-1]
        if _SplineForward.param_major(params):
            d = params.shape[-2]
            return params.reshape(-1, d, P).permute(1, 2, 0), z.reshape(-1, d).T.contiguous(), True
        return params.reshape(-1, P).T.contiguous().unsqueeze(0), z.reshape(1, -1).contiguous(), False

    @staticmethod
    def _points_in(ctx, g: Tensor | None) -> Tensor | None:
        """An output gradient in the ``(L, R)`` layout (``None`` stays ``None``: zero)."""
        if g is None:
            return None
        L, R = ctx.points
        return g.reshape(R, L).T.contiguous() if ctx.native else g.reshape(L, R).contiguous()

    @staticmethod
    def _points_out(ctx, t: Tensor, shape: torch.Size) -> Tensor:
        """``(L, R)`` values back in the points' own shape."""
        return t.T.contiguous().view(shape) if ctx.native else t.view(shape)

    @staticmethod
    def _params_out(ctx, gt: Tensor, shape: torch.Size) -> Tensor:
        """An ``(L, P, R)`` parameter gradient back in the layout the parameters came in."""
        return gt.permute(2, 0, 1).reshape(shape) if ctx.native else gt[0].T.contiguous().view(shape)

    @staticmethod
    def forward(ctx, z: Tensor, params: Tensor, fam: Spline, bias: Tensor | None = None, clamp: float = 0.0
                ) -> tuple[Tensor, Tensor]:
        # with bias or clamp (Spline.forward_raw): params are the conditioner's raw output, param-major,
        # and the kernels fold them in
        pt, zt, native = _SplineForward._layout(z, params)
        ctx.fam, ctx.native, ctx.points, ctx.clamp = fam, native, tuple(zt.shape), clamp
        lib = _native.kernel(zt)
        ctx.kernel = lib is not None
        if lib is not None:  # the fused kernel: it recomputes what the backward needs
            X, Ld = _native.forward(lib, zt, pt, fam, "forward", bias, clamp)
            ctx.save_for_backward(z, params, zt, pt, bias)
        elif bias is not None or clamp > 0:
            raise ValueError("a spline call with bias or clamp needs the fused kernels (Spline.folds)")
        else:
            X, Ld = _SplineForward._forward_ops(ctx, z, params, pt, zt, fam)
        return _SplineForward._points_out(ctx, X, z.shape), _SplineForward._points_out(ctx, Ld, z.shape)

    @staticmethod
    def _forward_ops(ctx, z: Tensor, params: Tensor, pt: Tensor, zt: Tensor, fam: Spline
                     ) -> tuple[Tensor, Tensor]:
        """The forward as torch operations in the ``(L, P, R)`` layout (any device), saving
        what :meth:`_backward_ops` needs."""
        K, B, aff = fam.bins, fam.bound, fam.affine
        L, R = zt.shape
        off = 2 if aff else 0
        u = pt[:, off:off + 2 * K].view(L, 2, K, R)  # widths, heights
        e = torch.sub(u, u.amax(2, keepdim=True)).exp_()
        cs = _running_sums(e)
        S = cs[:, :, K]
        knots = e.new_empty(L, 2, K + 1, R)
        knots[:, :, 0], knots[:, :, K] = -B, B
        r = (2 * B * (1 - K * fam.min_width)) / S  # dz_j / dC_j
        if K > 1:
            torch.mul(cs[:, :, 1:K], r.unsqueeze(2), out=knots[:, :, 1:K])
            knots[:, :, 1:K] += _constants(fam, e)[0]
        zc = zt.clamp(-B, B)
        if K > 1:
            idx = (zc.unsqueeze(1) >= knots[:, 0, 1:K]).sum(1)
        else:
            idx = torch.zeros(L, R, dtype=torch.long, device=z.device)
        ends = torch.stack([idx, idx + 1], 1)  # (L, 2, R)
        ends4 = ends.unsqueeze(1).expand(L, 2, 2, R)
        ends_zx = knots.gather(2, ends4)  # (L, row, end, R)
        wh = ends_zx[:, :, 1] - ends_zx[:, :, 0]
        z0, x0, w, h = ends_zx[:, 0, 0], ends_zx[:, 1, 0], wh[:, 0], wh[:, 1]
        r01 = pt[:, off + 2 * K:].gather(1, ends)  # the bin's two raw knot slopes
        d01 = _positive(r01, fam.min_slope)
        d0, d1 = d01[:, 0], d01[:, 1]
        s = h / w
        xi_raw = (zc - z0) / w
        xi = xi_raw.clamp(0, 1)
        slope, t, den, num = Spline._slope(xi, s, d0, d1)
        n1 = s * xi * xi + d0 * t
        x = x0 + h * n1 / den
        # Spline._tails, inline to keep its masks
        above, below = zt > zc, zt < zc
        out = above | below
        d_out = torch.where(above, d1, d0)
        slope = torch.where(out, d_out, slope)
        tail = zt - zc
        x = torch.where(out, zc + tail * slope, x)
        log_d = torch.log(slope)
        if aff:
            a, v = pt[:, 0], pt[:, 1]
            sc = _positive(v, fam.min_slope)
            X, Ld = a + sc * x, log_d + torch.log(sc)
            v = v.clone()  # not a view: saving it would keep all of pt alive
        else:
            v = sc = None
            X, Ld = x, log_d
        ctx.save_for_backward(z, params, e, cs.gather(2, ends4) / S.unsqueeze(2), r, idx, r01, d01,
                              s, xi, (xi_raw >= 0) & (xi_raw <= 1), t, den, num, n1, w, h,
                              above, below, tail, d_out, x, v, sc)
        return X, Ld

    @staticmethod
    def backward(ctx, gX: Tensor | None, gL: Tensor | None):
        fam = ctx.fam
        z, params = ctx.saved_tensors[:2]
        bias = ctx.saved_tensors[4] if ctx.kernel else None
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain operations
            if bias is None and not ctx.clamp > 0:
                return *_plain_grads(ctx, fam._forward_ops, (z, params), gX, gL), None, None, None
            gz, gp, gb = _plain_grads(ctx, functools.partial(_folded_ops, fam, ctx.clamp), (z, params, bias),
                                      gX, gL, needs=(0, 1, 3))
            return gz, gp, None, gb, None
        gX, gL = _SplineForward._points_in(ctx, gX), _SplineForward._points_in(ctx, gL)
        if ctx.kernel:
            zt, pt = ctx.saved_tensors[2:4]
            gz, gt = _native.backward(_native.kernel(zt), zt, pt, gX, gL, fam, bias, ctx.clamp)
        else:
            gz, gt = _SplineForward._backward_ops(ctx, gX, gL)
        layout = _SplineForward
        gb = gt.sum(-1).view(bias.shape) if bias is not None and ctx.needs_input_grad[3] else None
        return layout._points_out(ctx, gz, z.shape), layout._params_out(ctx, gt, params.shape), None, gb, None

    @staticmethod
    def _backward_ops(ctx, gX: Tensor | None, gL: Tensor | None) -> tuple[Tensor, Tensor]:
        """The backward as torch operations: the gradients ``(L, R)`` of the points and
        ``(L, P, R)`` of the parameters."""
        fam = ctx.fam
        (z, params, e, csn, r, idx, r01, d01, s, xi, xm, t, den, num, n1, w, h,
         above, below, tail, d_out, x, v, sc) = ctx.saved_tensors
        K, aff = fam.bins, fam.affine
        L, R = xi.shape
        P = params.shape[-1]
        gX = xi.new_zeros(L, R) if gX is None else gX
        gL = xi.new_zeros(L, R) if gL is None else gL
        off = 2 if aff else 0
        gt = params.new_empty(L, P, R)  # the parameter gradient, parameter-major
        cst = math.log(math.expm1(1.0 - fam.min_slope))  # _positive's offset
        if aff:
            gt[:, 0] = gX
            gt[:, 1] = torch.ops.aten.softplus_backward(gX * x + gL / sc, v + cst, 1.0, 20.0)
            gx = gX * sc
        else:
            gx = gX
        # --- the bin's rational function x = x_0 + h n1 / den, log slope = log(s² num / den²)
        out = above | below
        inside = ~out
        g_in, gl_in = gx * inside, gL * inside  # d/dx and d/d log slope of the in-bin formula
        d0, d1 = d01[:, 0], d01[:, 1]
        g_n1 = g_in * h / den
        G = (g_n1 * n1 + 2 * gl_in) / den  # minus d/d den
        g_num = gl_in / num
        xi2, omx, u12 = xi * xi, 1 - xi, 1 - 2 * xi
        g_s = g_n1 * xi2 - G * (1 - 2 * t) + 2 * (g_num * t + gl_in / s)
        g_xi = (g_n1 * (2 * s * xi + d0 * u12) - G * (d1 + d0 - 2 * s) * u12
                + 2 * g_num * (d1 * xi + s * u12 - d0 * omx)) * xm  # xm: ξ not clamped
        # --- the tails: x = ±B + (z ∓ B) δ, log slope = log δ
        g_out = (gx * tail + gL / d_out) * out
        g_d01 = torch.stack([(g_n1 - G) * t + g_num * omx * omx + g_out * below,
                             g_num * xi2 - G * t + g_out * above], 1)
        gxw = g_xi / w
        gz = torch.where(out, gx * d_out, gxw)
        # --- knots: s = h / w, ξ = (z - z_0) / w, z_1 = z_0 + w, x_1 = x_0 + h
        g_h = g_in * n1 / den + g_s / w
        gw_neg = (g_s * s + g_xi * xi) / w  # minus d/dw
        # per row (z knots, x knots): gradient on knot k (a) and knot k + 1 (b), then through
        # the running sum and the softmax (formula in the class docstring). Masks are 0/1
        # floats and the products addcmul: torch.where over (2, K, n) costs ~20 times a
        # multiplication there (6.3 vs 0.09 ms at n = 40960, one thread).
        g_lo = torch.stack([-gxw, g_in], 1)  # a + b
        gb = torch.stack([-gw_neg, g_h], 1)
        gamma = (g_lo - gb) * csn[:, :, 0] + gb * csn[:, :, 1]
        j = _constants(fam, gt)[1]
        at_k = (j == idx.unsqueeze(1)).to(gt.dtype)  # (L, K+1, R)
        below_k = (j[:K] < idx.unsqueeze(1)).to(gt.dtype)
        coef = torch.addcmul((-gamma * r).unsqueeze(2), below_k.unsqueeze(1), (g_lo * r).unsqueeze(2))
        coef.addcmul_(at_k[:, :K].unsqueeze(1), (gb * r).unsqueeze(2))
        torch.mul(coef, e, out=gt[:, off:off + 2 * K].view(L, 2, K, R))
        # the two knot slopes of the bin, through softplus
        gr01 = torch.ops.aten.softplus_backward(g_d01, r01 + cst, 1.0, 20.0)
        g_raw = torch.mul(at_k, gr01[:, :1], out=gt[:, off + 2 * K:])
        g_raw[:, 1:].addcmul_(at_k[:, :K], gr01[:, 1:])  # knot k + 1
        return gz, gt


class _SplineInverse(torch.autograd.Function):
    r"""``Spline.inverse`` (``x -> z`` and ``log dx/dz`` at ``z``) by the C kernel: the eager CPU path.

    The backward needs no code of its own: with ``F`` the forward map (``x = F(z; θ)``,
    ``ℓ = log F'(z; θ)``) and incoming gradients :math:`\bar z, \bar\ell`, the inverse function
    theorem gives

    .. math:: a = \frac{\bar z + \bar\ell\, \partial_z \ell}{F'(z)}, \qquad
              \bar x = a, \qquad \bar\theta = \bar\ell\, \partial_\theta \ell - a\, \partial_\theta F,

    two vector-Jacobian products of the forward kernel at the solution ``z`` (its backward with
    output gradients ``(0, \bar\ell)``, then ``(-a, 0)``). Double backward differentiates the
    plain operations (:meth:`Spline._inverse_ops`), as :class:`_SplineForward` does.
    """

    @staticmethod
    def forward(ctx, x: Tensor, params: Tensor, fam: Spline) -> tuple[Tensor, Tensor]:
        pt, xt, native = _SplineForward._layout(x, params)
        Z, Ld = _native.forward(_native.kernel(xt), xt, pt, fam, "inverse")
        ctx.fam, ctx.native, ctx.points = fam, native, tuple(xt.shape)
        ctx.save_for_backward(x, params, Z, Ld, pt)
        return _SplineForward._points_out(ctx, Z, x.shape), _SplineForward._points_out(ctx, Ld, x.shape)

    @staticmethod
    def backward(ctx, gZ: Tensor | None, gL: Tensor | None):
        fam = ctx.fam
        x, params, zt, lt, pt = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain operations
            return *_plain_grads(ctx, fam._inverse_ops, (x, params), gZ, gL), None
        gZ, gL = _SplineForward._points_in(ctx, gZ), _SplineForward._points_in(ctx, gL)
        lib = _native.kernel(zt)
        if gL is not None:
            gz_l, gt = _native.backward(lib, zt, pt, None, gL, fam)  # ℓ̄ ∂ℓ/∂z, ℓ̄ ∂ℓ/∂θ
            a = gz_l if gZ is None else gz_l + gZ
        else:
            a, gt = gZ, None
        a = a / lt.exp()
        gt_x = _native.backward(lib, zt, pt, torch.neg(a), None, fam)[1]
        gt = gt_x if gt is None else gt + gt_x
        layout = _SplineForward
        return layout._points_out(ctx, a, x.shape), layout._params_out(ctx, gt, params.shape), None


def _folded(raw: Tensor, bias: Tensor | None, clamp: float) -> Tensor:
    """The parameters :meth:`Spline.forward_raw` folds, as torch operations."""
    params = raw if bias is None else raw + bias
    return clamp * torch.tanh(params / clamp) if clamp > 0 else params


def _folded_ops(fam: Spline, clamp: float, z: Tensor, raw: Tensor, bias: Tensor | None):
    """:meth:`Spline.forward_raw` as plain operations (its double-backward path)."""
    return fam._forward_ops(z, _folded(raw, bias, clamp))


def _plain_grads(ctx, plain, inputs: tuple[Tensor | None, ...], *grads: Tensor | None,
                 needs: tuple[int, ...] = (0, 1)) -> tuple[Tensor | None, ...]:
    """The gradients of a Function's tensor ``inputs`` (its arguments ``needs``) by autograd through
    ``plain(*inputs)`` with ``create_graph=True``: the double-backward path of the spline's Functions."""
    with torch.enable_grad():
        outs = plain(*inputs)
    pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None]
    need = [t is not None and ctx.needs_input_grad[i] for t, i in zip(inputs, needs, strict=True)]
    wrt = [t for t, n in zip(inputs, need, strict=True) if n]
    got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                   create_graph=True, allow_unused=True))
    return tuple(next(got) if n else None for n in need)


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
