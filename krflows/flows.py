r"""``KRFlow``: the ``N(0, I)`` reference pushed through a learnable monotone triangular map.

The map ``T: z -> x`` is a composition of autoregressive layers, all in one variable
order, followed by a learnable lower-triangular affine stage ``x = m + L y``:

.. math:: T = A_{m,L} \circ T^{(L)} \circ \dots \circ T^{(1)} ,

so ``T`` is lower triangular with a positive diagonal: a Knothe–Rosenblatt-type map.
The affine stage carries the target's location and scale (and is alone the exact KR map
of a Gaussian), which leaves the layers' boxes ``[-B, B]`` in standardized units.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.distributions import ComposeTransform, Independent, Normal, Transform, TransformedDistribution

from krflows._checks import check_family_options, check_hidden, check_int, check_points, renamed_keyword
from krflows.nn import MaskedMLP
from krflows.transforms import _native
from krflows.transforms.autoregressive import AutoregressiveTransform
from krflows.transforms.base import ComposeTriangular, Permutation, TriangularTransform, untracked
from krflows.transforms.interpolate import Interpolated
from krflows.transforms.monotone import FAMILIES, MonotoneFamily

__all__ = ["KRFlow", "LowerAffine"]

# KRFlow._chunk's rule: bytes of the conditioners' parameters per chunk and layer, by direction
# on the CPU and on other devices; the fewest and the most points per chunk
_CHUNK_BYTES = {"cpu": {"push": 12 << 20, "pull": 64 << 20}, "device": {"push": 256 << 20, "pull": 256 << 20}}
_CHUNK_POINTS = {"cpu": (256, 32768), "device": (256, 1 << 20)}


class LowerAffine(nn.Module):
    r"""Learnable ``y -> m + L y`` with ``L`` lower triangular, ``diag(L) = exp(ρ) > 0``.

    Starts at the identity. The log-parametrized diagonal makes scale changes
    multiplicative, so a target a hundred times wider than the reference is reached in a
    few hundred optimizer steps.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(dim))
        self.log_diag = nn.Parameter(torch.zeros(dim))
        self.lower = nn.Parameter(torch.zeros(dim, dim))
        self.register_buffer("strict", torch.tril(torch.ones(dim, dim), -1))

    def tril(self) -> Tensor:
        return self.lower * self.strict + torch.diag(torch.exp(self.log_diag))

    def as_transform(self) -> TriangularTransform:
        """The map ``y -> m + L y``. It reads the parameters at each call and holds no matrix
        itself, so the many transform objects that draws leave behind (one per Pyro trace, e.g.
        4000 under ``Predictive``) share this module instead of each keeping a ``d x d`` ``L``."""
        return _LowerAffineStage(self)

    @torch.no_grad()
    def initialize(self, mean: Tensor, cov: Tensor) -> None:
        """Sets the stage to the exact KR map of ``N(mean, cov)``: ``m = mean``, ``L = chol(cov)``."""
        L = torch.linalg.cholesky(torch.as_tensor(cov).to(self.lower))
        self.log_diag.copy_(torch.log(torch.diagonal(L)))
        self.lower.copy_(L * self.strict)
        self.shift.copy_(torch.as_tensor(mean).to(self.shift))


class _LowerAffineStage(TriangularTransform):
    """``y -> m + L y`` with ``m, L`` read from a :class:`LowerAffine` at each call (see its
    :meth:`~LowerAffine.as_transform`). Forward: ``m + exp(ρ) * y + y @ (lower * strict)^T``, whose
    one ``d x d`` operand is freed after the call unless autograd needs it; inverse: one
    triangular solve."""

    def __init__(self, stage: LowerAffine):
        super().__init__()
        self.stage = stage

    def call_and_log_diag(self, z: Tensor) -> tuple[Tensor, Tensor]:
        s = self.stage
        x = s.shift + torch.exp(s.log_diag) * z + z @ (s.lower * s.strict).mT
        return x, s.log_diag.expand(z.shape)

    def expected_input(self) -> tuple[int | None, Tensor | None]:
        return self.stage.shift.shape[-1], self.stage.shift

    def inverse_and_log_diag(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = self.stage
        # One solve with the points as right-hand-side columns (L Z^T = R^T): a batch of
        # (d, 1) systems would broadcast L to (n, d, d) (100 GB at n = 1024, d = 5000).
        r = (x - s.shift).reshape(-1, x.shape[-1])
        z = torch.linalg.solve_triangular(s.tril(), r.mT, upper=False).mT.reshape(x.shape)
        return z, s.log_diag.expand(x.shape)


class _Reference(Independent):
    """``Independent(Normal, 1)`` whose ``log_prob`` also takes an empty batch ``(0, d)``: torch's
    reshapes ``(0, d)`` to ``(0, -1)``, which it refuses (a probe: ``flow.sample((0,))``,
    ``log_prob`` and ``push`` of no points raised that). The same sum otherwise."""

    def log_prob(self, value: Tensor) -> Tensor:
        return self.base_dist.log_prob(value).sum(-1)


class KRFlow(nn.Module):
    r"""A monotone triangular normalizing flow: ``x = T(z)``, ``z ~ N(0, I_d)``.

    Arguments:
        dim: the dimension ``d``.
        family: the monotone 1-D family, ``"spline"`` (rational-quadratic, analytic
            inverse), ``"affine"``, ``"bernstein"`` or ``"integrated"`` (root-finding
            inverse), or a :class:`~krflows.transforms.monotone.MonotoneFamily`. (Formerly
            ``transform=``, still accepted with a ``DeprecationWarning``: :attr:`transform`
            is the map.)
        layers: number of autoregressive layers (all in the same variable order).
        hidden: hidden widths of each layer's masked conditioner.
        order: optional permutation of ``range(d)``: the triangular map's coordinate ``i``
            is the user's coordinate ``order[i]``. Applied once, outside the map.
        affine_stage: whether to end with the learnable lower-triangular affine stage
            :attr:`affine` (formerly ``affine=``, still accepted with a ``DeprecationWarning``;
            ``affine`` alone is ambiguous with the spline family's own option and the
            ``"affine"`` family).
        compile: compile the hot paths with :func:`torch.compile` (see :meth:`compile`).
        family_options: passed to the family, e.g. ``bins=8, bound=5.0``.

    Example:
        >>> flow = KRFlow(3, family="spline", layers=2, hidden=(16,))
        >>> x, log_q = flow.rsample_and_log_prob((5,))
        >>> x.shape, log_q.shape
        (torch.Size([5, 3]), torch.Size([5]))
        >>> bool(torch.allclose(flow.log_prob(x), log_q, atol=1e-4))
        True
    """

    def __init__(self, dim: int, family: str | MonotoneFamily = "spline", layers: int = 4,
                 hidden: Sequence[int] = (64, 64), order: Sequence[int] | None = None,
                 affine_stage: bool = True, compile: bool = False, **family_options):
        super().__init__()
        family = renamed_keyword(family_options, "transform", "family", family, "spline")
        affine_stage = renamed_keyword(family_options, "affine", "affine_stage", affine_stage, True)
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if isinstance(family, str):
            if family not in FAMILIES:
                raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
            check_family_options(family, FAMILIES[family], family_options)
            family = FAMILIES[family](**family_options)
        elif not isinstance(family, MonotoneFamily):
            raise ValueError(f"family must be a family name or a MonotoneFamily, got {family!r}")
        layers, hidden = check_int("layers", layers, 0), check_hidden(hidden)
        self.dim, self.family = dim, family
        self.conditioners = nn.ModuleList(
            MaskedMLP(dim, family.n_params, hidden, param_major=family.param_major) for _ in range(layers))
        self.affine = LowerAffine(dim) if affine_stage else None
        if order is not None:
            order = torch.as_tensor(order, dtype=torch.long)
            if sorted(order.tolist()) != list(range(dim)):
                raise ValueError(f"order must be a permutation of range({dim}), got {order.tolist()}")
        self.register_buffer("order", order)
        self.register_buffer("_ref", torch.zeros(dim))  # follows .to(device, dtype)
        self._compiled: dict[str, Callable] = {}  # hot path name -> compiled function
        self._compile_options: dict | None = None
        if compile:
            self.compile()

    # ---- the maps -------------------------------------------------------------------------

    @property
    def triangular(self) -> TriangularTransform:
        """The lower-triangular monotone map ``z -> y`` in the flow's variable order."""
        parts: list[TriangularTransform] = [
            AutoregressiveTransform(net, self.family, self.dim) for net in self.conditioners]
        if self.affine is not None:
            parts.append(self.affine.as_transform())
        return ComposeTriangular(parts)

    @property
    def transform(self) -> Transform:
        """The map ``z -> x`` as a :class:`torch.distributions.Transform` (lower triangular
        in the variable order ``order``)."""
        return self._in_user_order(self.triangular)

    @property
    def base(self) -> Independent:
        """The reference ``N(0, I_d)`` on the flow's device and dtype.

        Built without argument validation: its parameters are valid by construction, and
        validating them checks tensors on the host (a GPU synchronization in every sampling
        call, and a graph break in compiled code)."""
        ref = self._ref
        return _Reference(Normal(ref, torch.ones_like(ref), validate_args=False), 1, validate_args=False)

    @property
    def device(self) -> torch.device:
        """Where the flow's parameters (and its reference) live."""
        return self._ref.device

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the flow's parameters, samples and densities."""
        return self._ref.dtype

    def _in_user_order(self, triangular: Transform) -> Transform:
        """A map ``z -> y`` in the flow's variable order, followed by the user's ``order``."""
        return triangular if self.order is None else ComposeTransform([triangular, Permutation(self.order)])

    def _to_flow_order(self, x: Tensor) -> Tensor:
        return x if self.order is None else Permutation(self.order).inv(x)

    def _to_user_order(self, y: Tensor) -> Tensor:
        return y if self.order is None else Permutation(self.order)(y)

    @torch.no_grad()
    def initialize_gaussian(self, mean: Tensor, cov: Tensor) -> None:
        r"""Sets the affine stage to the KR map of ``N(mean, cov)`` given in the **user's**
        coordinates (the stage itself acts in the flow's order: ``mean[order]``,
        ``cov[order][:, order]``). With identity layers (a fresh flow) the flow is then
        exactly ``N(mean, cov)``.

        Arguments:
            mean: ``(d,)``.
            cov: ``(d, d)``, or the variances ``(d,)`` (a diagonal covariance).

        Example:
            >>> flow = KRFlow(2, order=[1, 0])
            >>> cov = torch.tensor([[4.0, 1.0], [1.0, 1.0]])
            >>> flow.initialize_gaussian(torch.tensor([1.0, -1.0]), cov)
            >>> x = torch.tensor([[0.5, 0.2]])
            >>> mvn = torch.distributions.MultivariateNormal(torch.tensor([1.0, -1.0]), cov)
            >>> bool(torch.allclose(flow.log_prob(x), mvn.log_prob(x), atol=1e-5))
            True
        """
        if self.affine is None:
            raise ValueError("the flow has no affine stage (affine_stage=False): nothing to initialize")
        mean, cov = torch.as_tensor(mean).to(self._ref), torch.as_tensor(cov).to(self._ref)
        if mean.shape != (self.dim,) or cov.shape not in ((self.dim,), (self.dim, self.dim)):
            raise ValueError(f"mean must have shape ({self.dim},) and cov ({self.dim},) or "
                             f"({self.dim}, {self.dim}), got {tuple(mean.shape)} and {tuple(cov.shape)}")
        if self.order is not None:
            mean = mean[self.order]
            cov = cov[self.order] if cov.dim() == 1 else cov[self.order][:, self.order]
        if cov.dim() == 1 and isinstance(self.affine, LowerAffine):
            cov = torch.diag(cov)
        self.affine.initialize(mean, cov)

    def forward(self, z: Tensor | None = None) -> Tensor | torch.distributions.Distribution:
        """``x = T(z)``; without ``z``, the flow's law as a torch and Pyro distribution
        (:class:`~krflows.distribution.FlowDistribution`, zuko's ``flow()``)."""
        if z is None:
            from krflows.distribution import FlowDistribution

            return FlowDistribution(self)
        z = check_points(z, self.dim, self._ref, "z")
        return self._to_user_order(self._chunked(self.triangular, z, "push"))

    def inverse(self, x: Tensor) -> Tensor:
        """``z = T^{-1}(x)`` (``d`` sequential passes per layer)."""
        x = check_points(x, self.dim, self._ref, "x")
        return self._chunked(lambda y: self.triangular.inverse_and_log_diag(y)[0], self._to_flow_order(x),
                             "pull")

    # ---- compiled hot paths ---------------------------------------------------------------

    def compile(self, **options) -> KRFlow:
        r"""Runs the hot paths through :func:`torch.compile` from now on (returns ``self``).

        Compiled: sampling with ``log q`` (:meth:`rsample_and_log_prob`, :meth:`sample`, the training
        step) and, for families with an analytic inverse, :meth:`log_prob`. The compiler fuses the
        conditioners' operations (bias, activation, clamp); the spline itself stays the fused kernels
        of eager code (C on the CPU, Triton on CUDA devices), called as custom operators; where
        neither runs, the compiler fuses the spline's operations too. On the CPU it pays for large
        batches (benchmarks/RESULTS.md, 2 threads, funnel-10: a training step 38-51 ms compiled vs
        50-58 ms eager at B = 4096, about even at B = 512) and for sampling and :meth:`log_prob`
        throughput. On a GPU, ``mode="reduce-overhead"`` (CUDA graphs) would remove the launch
        overhead that bounds small batches, but with torch 2.11 on an H100 it crashed the process (a
        segfault, which no fallback catches) in the compiled backward, and zuko's compiled backward
        in the same way (benchmarks/RESULTS_gpu.md: torch's defect, not the flow's): keep the
        default mode there for training. Sampling under CUDA graphs ran (1.43x compiled zuko's
        samples/s at B = 65536, both with CUDA graphs). Compilation is paid on first use and once more at
        the second batch shape (a dynamic-shape graph, which then serves every shape; ``dynamic=True``
        compiles that one directly): ``d = 10``, 4 layers, cold, 2-core CPU: 28 s for sampling with
        its backward and 38 s for :meth:`log_prob` (the inverse's ``d`` passes per layer, unrolled);
        where the spline is traced (no C compiler, other devices) 43 s and 126 s; inductor's on-disk
        cache makes later processes much faster. Same numerics as eager up to float rounding.
        Graceful: if compilation or a compiled call fails where the eager code succeeds (no C++
        compiler, an unsupported op), krflows warns once and stays eager. ``options`` go to
        :func:`torch.compile` (e.g. ``dynamic=True``, ``mode=...``). This overrides
        :meth:`torch.nn.Module.compile`, which would compile only :meth:`forward`.
        """
        if options.get("mode") in ("reduce-overhead", "max-autotune"):  # modes with CUDA graphs
            warnings.warn(f"KRFlow.compile(mode={options['mode']!r}) runs CUDA graphs on CUDA devices: with "
                          "torch 2.11 on an H100 a training step's compiled backward segfaulted under them "
                          "(zuko's too; benchmarks/RESULTS_gpu.md), while sampling ran. Train with the "
                          "default mode unless your torch is known to work.", stacklevel=2)
        self._compile_options = dict(options)
        _native.status()  # builds or loads the spline's C kernels now: traced code only reads that they exist
        if torch.cuda.is_available():
            _native.gpu_status()  # and imports the Triton ones
        self._compiled = {"push": torch.compile(self._push, **options)}
        if self.family.inverse_method == "analytic":
            self._compiled["pull"] = torch.compile(self._pull, **options)
        return self

    @contextlib.contextmanager
    def eager(self) -> Iterator[KRFlow]:
        """Inside the block, every call runs eagerly; the compiled functions are kept for after it.

        For one-off evaluations of a compiled flow at new batch shapes (the bias report, plots,
        summaries): each new shape would trigger a compilation that costs far more than the
        eager call (at ``d = 10``, :meth:`log_prob` compiles for minutes and runs 20 000 points
        in ~0.5 s eagerly). :func:`krflows.diagnose` uses it. A no-op for a flow that is not
        compiled.

        Example:
            >>> flow = KRFlow(2, layers=1, hidden=(8,))
            >>> with flow.eager():
            ...     x = flow.sample((3,))
        """
        compiled, self._compiled = self._compiled, {}
        try:
            yield self
        finally:
            if not self._compiled:  # unless the block compiled the flow anew
                self._compiled = compiled

    def _push(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``y = T(z)`` (flow order), ``log q(y)`` and ``log dT_k/dz_k``: the sampling hot path."""
        y, log_diag = self.triangular.call_and_log_diag(z)
        return y, self.base.log_prob(z) - log_diag.sum(-1), log_diag

    def _affine_push(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`_push` when every layer is the identity (:meth:`_layers_are_identity`): the
        affine stage alone, the same map without the layers' passes (the warm-up's path)."""
        y, log_diag = self.affine.as_transform().call_and_log_diag(z)
        return y, self.base.log_prob(z) - log_diag.sum(-1), log_diag

    def _conditioner_nets(self) -> list[nn.Module]:
        """The networks whose zero output layer (``out``) makes each layer the identity."""
        return list(self.conditioners)

    @torch.no_grad()
    def _layers_are_identity(self) -> bool:
        """Whether every layer is exactly the identity map, as at initialisation: each
        conditioner's output layer is zero, so its parameters are zero, and every family maps
        zero parameters to the identity."""
        return all(not net.out.weight.any() and (net.out.bias is None or not net.out.bias.any())
                   for net in self._conditioner_nets())

    def _pull(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``z = T^{-1}(y)`` (flow order) and ``log q(y)``: the density hot path."""
        z, log_diag = self.triangular.inverse_and_log_diag(y)
        return z, self.base.log_prob(z) - log_diag.sum(-1)

    def _chunk(self, x: Tensor, direction: str) -> int | None:
        """How many points one call of the hot paths takes at a time for points ``x`` ``(*, d)``
        in ``direction`` (``"push"``, ``z -> x``, or ``"pull"``, the inverse), or ``None`` for all
        of them at once: where autograd records (a graph over chunks keeps every chunk's saved
        tensors anyway; training batches are small), under torch.compile or torch.func
        transforms, and for batches within one chunk (:meth:`_chunked`).

        The size keeps the parameters the conditioners produce for a chunk and layer
        (``d * family.n_params`` floats per point for points of width ``d``, the largest tensor a
        pass writes and reads)
        within a budget: on the CPU a cache's, 12 MiB for the push and 64 MiB for the pull (its
        ``d`` passes per layer each pay a fixed cost that larger chunks spread), 256 to 32768
        points; on other devices 256 MiB (their memory, not their caches: a GPU is fastest at
        the largest batch), up to 2^20 points. One call over all points writes each layer's
        parameters (0.4 GB at d = 10 and 400 000 points) to memory and reads them back; in chunks
        they stay in the cache, and the peak memory is a chunk's. At 12 MiB the output layers of
        hidden width 64 take their block products (:class:`~krflows.nn.MaskedLinear`, from 8 MiB
        of output), which 8 MiB chunks just missed.

        Measured on the 2-core CPU (``KRFlow(d)``, float32, 2 threads, interleaved in one process;
        samples/s of sampling with ``log q``, then of ``log_prob``), whole batch -> this rule:
        d = 2, 400 000 points: 4.8e5 -> 1.3e6 and 3.9e5 -> 9.8e5; d = 10, 200 000: 2.3e5 -> 5.3e5
        and 1.1e5 -> 2.0e5; d = 50, 65 536: 7.2e4 -> 1.4e5 and 3.1e4 -> 3.5e4; d = 100, 32 768:
        3.7e4 -> 6.3e4 and 1.24e4 -> 1.27e4 (both with the inverse's buffer: see
        :meth:`~krflows.transforms.AutoregressiveTransform.inverse_and_log_diag`). The push budget
        is the best of 4, 8, 10, 12 and 16 MiB (five interleaved repetitions; d = 10: 5.9, 5.7, 6.1,
        6.2, 5.7e5; d = 50: 1.44, 1.46, 1.62, 1.61, 1.50e5; d = 100: 6.7, 7.2, 7.3, 7.8, 7.1e4), the
        pull's of 8-128 MiB (d = 50: 1.9, 2.4, 3.0, 3.1, 3.1e4 at 8, 16, 32, 64, 128; d = 100: 0.80,
        1.0, 1.2, 1.48, 1.47e4); the machine's noise is ~10%. ``benchmarks/bench_training.py``'s
        ``krflows-whole`` is the flow without chunks. :class:`~krflows.sparse.SparseKRFlow` gains
        more (its per-member parameters fill the cache first): globals 3 + 500 members x 2
        (d = 1003), 20 000 points, 325 -> 1610 samples/s and 184 -> 654 for ``log_prob``; 2 + 50 x 1,
        100 000 points, 5.5e3 -> 2.3e4 and 5.5e3 -> 1.1e4 (chunks of 64-512 points within 7% of each
        other there)."""
        where = "cpu" if x.device.type == "cpu" else "device"
        least, most = _CHUNK_POINTS[where]
        per_point = x.shape[-1] * self.family.n_params * x.element_size()  # a plate minibatch's own width
        size = min(max(_CHUNK_BYTES[where][direction] // per_point, least), most)
        return size if x.shape[:-1].numel() > size and untracked(x, self) else None

    def _chunked(self, fn: Callable, x: Tensor, direction: str):
        """``fn(x)`` for points ``x`` ``(*, d)``, in chunks of :meth:`_chunk` points where it says:
        the same values (each point's arithmetic is its own), with a tensor or a tuple of
        tensors ``(*, ...)`` returned as ``fn`` returns it."""
        size = self._chunk(x, direction)
        if size is None:
            return fn(x)
        parts = []
        for part in x.reshape(-1, x.shape[-1]).split(size):  # a loop, not a comprehension: the
            parts.append(fn(part))  # same frames either way for _run_one's warning
        batch = x.shape[:-1]

        def cat(pieces):
            out = torch.cat(pieces)
            return out.reshape(*batch, *out.shape[1:])

        return cat(parts) if isinstance(parts[0], Tensor) else tuple(map(cat, zip(*parts, strict=True)))

    def _run(self, name: str, eager: Callable, arg: Tensor) -> tuple[Tensor, ...]:
        return self._chunked(lambda x: self._run_one(name, eager, x), arg, name)

    def _run_one(self, name: str, eager: Callable, arg: Tensor) -> tuple[Tensor, ...]:
        fn = self._compiled.get(name)
        if fn is None:
            return eager(arg)
        try:
            return fn(arg)
        except Exception as err:  # noqa: BLE001 - re-raised below unless eager succeeds
            out = eager(arg)  # raises itself when the input, not the compiler, is at fault
            warnings.warn(f"torch.compile failed on KRFlow.{eager.__name__} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); running eagerly from now on",
                          RuntimeWarning, stacklevel=6)  # the caller of push, log_prob, ...
            self._compiled.clear()
            self._compile_options = None
            return out

    def __getstate__(self):  # compiled functions neither pickle nor deep-copy: rebuilt on load
        state = super().__getstate__()
        state["_compiled"] = {}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if self._compile_options is not None:
            self.compile(**self._compile_options)

    # ---- distribution interface -----------------------------------------------------------

    def push(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r"""Pushes reference points ``z -> x = T(z)`` in one pass, with the density and slopes.

        .. math:: \log q(x) = \log \mathcal N(z; 0, I) - \sum_k \log \partial T_k / \partial z_k .

        Arguments:
            z: reference points, shape ``(*, d)``.

        Returns:
            ``x`` ``(*, d)`` (user order), ``log q(x)`` ``(*)`` (the reference's log density
            included) and the log-slopes :math:`\log \partial T_k / \partial z_k` ``(*, d)``
            (flow order). Differentiable (reparametrized).

        Example:
            >>> flow = KRFlow(2, layers=1, hidden=(8,))
            >>> x, log_q, log_diag = flow.push(torch.zeros(4, 2))
            >>> bool(torch.allclose(log_q, flow.log_prob(x), atol=1e-4)), log_diag.shape
            (True, torch.Size([4, 2]))
        """
        z = check_points(z, self.dim, self._ref, "z")
        y, log_q, log_diag = self._run("push", self._push, z)
        return self._to_user_order(y), log_q, log_diag

    def rsample_and_log_prob(self, shape: Sequence[int] | int = ()) -> tuple[Tensor, Tensor]:
        """Reparametrized samples ``x`` of shape ``(*shape, d)`` and ``log q(x)``, in one pass."""
        z = self.base.rsample(_size(shape))
        y, log_q, _ = self._run("push", self._push, z)
        return self._to_user_order(y), log_q

    def rsample(self, shape: Sequence[int] | int = ()) -> Tensor:
        return self.rsample_and_log_prob(shape)[0]

    @torch.no_grad()
    def sample(self, shape: Sequence[int] | int = ()) -> Tensor:
        """Samples ``x`` of shape ``(*shape, d)`` (no gradient).

        Without autograd (here, under ``torch.no_grad()``, or with the flow's parameters frozen),
        every method runs a large batch in chunks: on the CPU of a cache's size (d = 10: 11650
        points pushed, 32768 pulled by :meth:`log_prob`), about twice the samples/s of one call at
        10^5-10^6 points and a chunk's memory; elsewhere of 256 MiB of parameters per layer
        (``KRFlow._chunk``). Same values, same random numbers."""
        return self.rsample_and_log_prob(shape)[0]

    def log_prob(self, x: Tensor) -> Tensor:
        """``log q(x)`` at any ``x`` of shape ``(*, d)``, through the inverse map."""
        x = check_points(x, self.dim, self._ref, "x")
        return self._run("pull", self._pull, self._to_flow_order(x))[1]

    def inverse_residual(self, x: Tensor) -> Tensor:
        """The achieved inverse accuracy ``max_k |T(T^{-1}(x))_k - x_k|`` per point, shape ``(*)``."""
        with torch.no_grad():
            return (self.forward(self.inverse(x)) - x).abs().amax(-1)

    # ---- the triangular structure ---------------------------------------------------------

    def _head_terms(self, x_head: Tensor) -> tuple[Tensor, Tensor]:
        """``z_{1:k}`` and the per-coordinate log-density terms of the first ``k`` coordinates."""
        k = x_head.shape[-1]
        if not 1 <= k <= self.dim:
            raise ValueError(f"x_head must have 1..{self.dim} trailing coordinates, got {k}")
        # Coordinates after k do not influence the first k (triangularity): pad with zeros.
        pad = x_head.new_zeros(*x_head.shape[:-1], self.dim - k)
        z, log_diag = self.triangular.inverse_and_log_diag(torch.cat([x_head, pad], -1))
        terms = Normal(0.0, 1.0).log_prob(z) - log_diag
        return z[..., :k], terms[..., :k]

    def marginal_log_prob(self, x_head: Tensor) -> Tensor:
        r"""``log q(x_1..x_k)``, the exact marginal density of the first ``k`` coordinates.

        Coordinates are in the flow's variable order (``x[..., order[:k]]`` if ``order``
        is set). Triangularity makes the marginal a ``k``-dimensional flow:
        :math:`q(x_{1:k}) = \mathcal{N}(z_{1:k}) / \prod_{j \le k} \partial T_j/\partial z_j`.
        """
        x_head = _check_head(x_head, self.dim, self._ref)
        return self._head_terms(x_head)[1].sum(-1)

    @torch.no_grad()
    def sample_marginal(self, shape: Sequence[int] | int, k: int) -> Tensor:
        """Samples of the first ``k`` coordinates (flow order), shape ``(*shape, k)``."""
        check_int("k", k, 1, self.dim)
        z = self.base.sample(_size(shape))
        return self.triangular(z)[..., :k]

    def sample_conditional(self, x_head: Tensor, shape: Sequence[int] | int = ()) -> Tensor:
        r"""Samples the remaining coordinates given the first ``k`` (flow order).

        ``z_{1:k} = S_{1:k}(x_{1:k})``, fresh ``z_{k+1:d} ~ N(0, I)``, ``x = T(z)``: an exact
        draw from the flow's conditional :math:`q(x_{k+1:d} \mid x_{1:k})`.

        Arguments:
            x_head: observed values, shape ``(*batch, k)``.
            shape: sample shape.

        Returns:
            ``x`` of shape ``(*shape, *batch, d)`` (flow order) whose first ``k``
            coordinates are ``x_head``.
        """
        x_head = _check_head(x_head, self.dim, self._ref)
        k = x_head.shape[-1]
        with torch.no_grad():
            z_head, _ = self._head_terms(x_head)
            size = _size(shape) + x_head.shape[:-1]
            z_tail = self.base.sample(size)[..., k:]
            y = self.triangular(torch.cat([z_head.expand(*size, k), z_tail], -1))
        return torch.cat([x_head.expand(*size, k), y[..., k:]], -1)

    def conditional_log_prob(self, y: Tensor, k: int) -> Tensor:
        r"""``log q(y_{k+1:d} | y_{1:k})`` for full points ``y`` (flow order), shape ``(*)``;
        ``0 <= k < d`` (``k = 0``: :meth:`log_prob` in flow order)."""
        check_int("k", k, 0, self.dim - 1)
        y = check_points(y, self.dim, self._ref, "y")
        z, log_diag = self.triangular.inverse_and_log_diag(y)
        terms = Normal(0.0, 1.0).log_prob(z) - log_diag
        return terms[..., k:].sum(-1)

    def interpolate(self, t: float) -> TransformedDistribution:
        r"""The law :math:`(T_t)_\# N(0, I)` of the interpolated map ``z -> x``, ``T_t = (1-t) Id + t T``.

        ``T`` is :attr:`triangular` (flow order); the variable ``order``, if any, is applied
        after it, as in :attr:`transform`. Monotone triangular for every ``t`` in ``[0, 1]``
        (:class:`~krflows.transforms.Interpolated`), so it has an exact density and inverse
        (by root finding): intermediate distributions for annealing, SMC and plots. ``t = 0``
        gives the reference (permuted), ``t = 1`` the flow's own law. The W2 geodesic only
        when ``T`` is a Brenier map, which a KR map is not in general.

        Returns:
            a :class:`torch.distributions.TransformedDistribution` (event shape ``(d,)``).
        """
        return TransformedDistribution(self.base, self._in_user_order(Interpolated(self.triangular, t)))

    def extra_repr(self) -> str:
        order = "identity" if self.order is None else self.order.tolist()
        return (f"dim={self.dim}, family={self.family!r}, "
                f"inverse={self.family.inverse_method!r}, order={order}"
                + (", compiled" if self._compiled else ""))


def eagerly(flow) -> contextlib.AbstractContextManager:
    """``flow.eager()`` (:meth:`KRFlow.eager`) for a flow that has it, else a context that does nothing."""
    eager = getattr(flow, "eager", None)
    return eager() if eager is not None else contextlib.nullcontext()


def _size(shape: Sequence[int] | int) -> torch.Size:
    return torch.Size([shape]) if isinstance(shape, int) else torch.Size(shape)


def _check_head(x_head: Tensor, dim: int, ref: Tensor) -> Tensor:
    k = x_head.shape[-1] if isinstance(x_head, Tensor) and x_head.dim() >= 1 else 0
    if not 1 <= k <= dim:
        shape = tuple(x_head.shape) if isinstance(x_head, Tensor) else type(x_head).__name__
        raise ValueError(f"x_head must have shape (*, k) with 1 <= k <= {dim}, got {shape}")
    return check_points(x_head, k, ref, "x_head")
