r"""Masked autoregressive conditioners (MADE, Germain et al. 2015) in a fixed variable order.

A :class:`MaskedMLP` maps ``z`` of shape ``(*, d)`` to parameters ``(*, d, P)`` such that
the parameters of coordinate ``k`` depend on ``z_1..z_{k-1}`` only (strictly), always in
the identity order: krflows applies a user's variable order once, outside the flow, so
that every layer shares it and the composite stays lower triangular.

Written here rather than taken from nflows' ``MADE``: that one ties every hidden layer
to one width with residual blocks, interleaves the outputs per feature, and has no
zero-initialised output (which krflows uses to start every flow at the identity).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from krflows.transforms import _native

__all__ = ["MaskedLinear", "MaskedMLP", "SoftClamp"]


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask ``(out, in)``.

    When every row of the mask is a prefix (row ``r`` sees inputs ``< p_r``, ``p_r``
    non-decreasing: a MADE mask with sorted degrees), large batches on the CPU (eager and
    compiled) are computed in ``blocks`` row blocks that each read only their inputs' prefix,
    skipping the masked-out upper triangle (about a third of the multiply-adds of an
    autoregressive network). Dense libraries (zuko, nflows) multiply those zeros. Same result.
    """

    #: the dense product's multiply-adds (batch rows x out x in) from which eager CPU code takes the
    #: block products: below, the blocks' three products, concatenation and slice gradients cost
    #: more than the skipped third of the multiply-adds. Measured (forward_t + backward, 2 threads,
    #: blocks / dense): 1.61 at 64 x 64 and 1024 rows, 1.21 at 4096 rows, 1.12 at 128 x 128 and
    #: 1024; 0.98 at 270 x 64 and 4096 (71 M), 0.94 at 256 x 256 and 1024 (67 M), 0.73-0.82 above
    #: 130 M. In a whole eager training step (funnel-10, 4 layers, B = 4096) the output layers'
    #: blocks at 71 M still cost 8% (49.8 against 45.9 ms per step with every product dense), and
    #: with every layer in blocks (the rule before: 1024 rows and up) 16% at B = 1024-4096.
    #: Compiled CPU code takes them by the same rule, as a concatenation that inductor plans away
    #: (the compiled benchmark flow, 2 threads, blocks / dense in one process: sampling 0.89-0.94
    #: of the time at B = 8192 and 16384, training step 0.96 and 0.99); with every layer in blocks
    #: from 1024 rows (the rule before) compiled steps were slower (11.9 against 10.0-10.5 ms at
    #: B = 512, 43.4 against 39.2 ms at 4096). Other devices take the one dense product (unless
    #: :attr:`blocked_anywhere`): on a GPU the products are launch-bound (H100, eager: ~20 µs of
    #: host time per kernel against microseconds of arithmetic at these widths), and the blocks cost
    #: three products, a concatenation and, backward, a zero-filled gradient per sliced input
    #: instead of one product
    block_work = 2 ** 27
    #: the fewest batch rows that take the block products (each layer sets its own from
    #: :attr:`block_work`, never fewer than this)
    block_rows = 1024
    #: block products (from :attr:`block_rows` rows) on every device, not only the CPU: off by
    #: default (launch-bound, above); on for measuring them where a GPU's products are not
    #: launch-bound, compiled at large batches (the benchmark's ``krflows-compile-blocked``)
    blocked_anywhere = False

    def __init__(self, mask: Tensor, bias: bool = True, blocks: int = 3):
        super().__init__(mask.shape[1], mask.shape[0], bias=bias)
        self.register_buffer("mask", mask.to(self.weight.dtype))
        self.blocks = _prefix_blocks(mask, blocks)
        self.block_rows = max(MaskedLinear.block_rows, -(-self.block_work // mask.numel()))

    def _blocked(self, x: Tensor) -> bool:
        """Whether the points ``x`` ``(*, in)`` take the block products: on the CPU (any device
        with :attr:`blocked_anywhere`), batches of :attr:`block_rows` or more."""
        # the batch size last: compiled code must not guard on it where the answer is no anyway
        where = self.blocked_anywhere or not _native.launch_bound(x)
        return bool(self.blocks) and where and x.shape[:-1].numel() >= self.block_rows

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight * self.mask
        if not self._blocked(x):
            return F.linear(x, w, self.bias)
        bias = self.bias if self.bias is not None else w.new_zeros(w.shape[0])
        return torch.cat([F.linear(x[..., :p], w[r0:r1, :p], bias[r0:r1])
                          for r0, r1, p in self.blocks], -1)

    def forward_t(self, x: Tensor, bias: bool = True) -> Tensor:
        """The same map, transposed: ``x (n, in) -> (out, n)``, i.e. ``forward(x).T`` laid out
        contiguously, at the cost of ``forward`` (the product with a transposed operand); without
        the bias with ``bias=False``."""
        w = self.weight * self.mask
        b = self.bias.unsqueeze(-1) if bias and self.bias is not None else None
        if not self._blocked(x):
            return w @ x.T if b is None else torch.addmm(b, w, x.T)
        if torch.compiler.is_compiling():  # the concatenation, which inductor plans away
            return torch.cat([w[r0:r1, :p] @ x[:, :p].T if b is None else
                              torch.addmm(b[r0:r1], w[r0:r1, :p], x[:, :p].T) for r0, r1, p in self.blocks])
        return _BlockedLinearT.apply(x, w, w.new_zeros(w.shape[0], 1) if b is None else b, self.blocks)


class _BlockedLinearT(torch.autograd.Function):
    """:meth:`MaskedLinear.forward_t`'s block products, eager: each block's product is written into
    its rows of one output (no concatenation), and the backward accumulates the input's gradient
    in one buffer (no zero-filled gradient per sliced block). A training step of the benchmark's
    flow (funnel-10, 2 threads, paired rounds in one process) took 0.93 of the time of the
    concatenation at B = 4096, 0.975 at 1024. Compiled code keeps the concatenation, which
    inductor plans away itself."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor, blocks: list[tuple[int, int, int]]) -> Tensor:
        out = x.new_empty(w.shape[0], x.shape[0])
        for r0, r1, p in blocks:
            torch.addmm(bias[r0:r1], w[r0:r1, :p], x[:, :p].T, out=out[r0:r1])
        ctx.save_for_backward(x, w)
        ctx.blocks = blocks
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = x.new_zeros(x.shape)
            for r0, r1, p in ctx.blocks:
                gx[:, :p].addmm_(g[r0:r1].T, w[r0:r1, :p])
        if ctx.needs_input_grad[1]:
            gw = w.new_zeros(w.shape)
            for r0, r1, p in ctx.blocks:
                gw[r0:r1, :p] = g[r0:r1] @ x[:, :p]
        if ctx.needs_input_grad[2]:
            gb = g.sum(1, keepdim=True)
        return gx, gw, gb, None


def _prefix_blocks(mask: Tensor, n: int) -> list[tuple[int, int, int]]:
    """Row blocks ``(r0, r1, p)`` of a prefix-shaped mask (``[]`` if it is not one, if the
    layer is small, or if blocking saves under 15% of the products)."""
    rows, cols = mask.shape
    prefix = (mask != 0).sum(1)
    if not torch.equal(mask != 0, torch.arange(cols) < prefix[:, None]) or \
            bool((prefix[1:] < prefix[:-1]).any()) or n < 2 or rows * cols < 2048:
        return []
    inner = [int(torch.searchsorted(prefix, prefix[-1] * g / n, right=True)) for g in range(1, n)]
    cuts = [0, *inner, rows]
    blocks = [(a, b, int(prefix[b - 1])) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
    cost = sum((b - a) * p for a, b, p in blocks)
    return blocks if cost < 0.85 * rows * cols else []


class SoftClamp(torch.autograd.Function):
    """``y = b tanh(x / b)``, with ``dy/dx = 1 - (y / b)^2`` from the output.

    Written by hand for speed and memory: ``tanh`` is evaluated as ``2 sigmoid(2u) - 1`` (ATen's
    and inductor's CPU tanh cost about twice a sigmoid: 3.8 vs 2.0 ms eager, 2.2 vs 1.0 ms
    compiled, on 4096 x 270 floats, one thread), and the backward needs only ``y``, which
    the spline saves anyway, instead of a second saved tensor of every conditioner output
    (17 MiB per step at B = 4096 for the benchmark's flow: 104 -> 87 MiB saved for backward).
    Eager on the CPU, where the spline's C library is built (:mod:`krflows.transforms._native`),
    each direction is one pass over memory in C instead of four and three torch operations over
    the whole conditioner output (a training step at B = 4096, funnel-10, 2 threads: 0.88-0.93 of
    the time with the torch operations, paired rounds in one process; ~0.98 at B = 512).
    """

    @staticmethod
    def forward(ctx, x: Tensor, bound: float) -> Tensor:
        # in place on one fresh buffer: a new full-size tensor per elementwise step cost more
        # than the arithmetic (forward + backward 0.71 -> 0.26 ms at 270 x 512, 14.3 -> 6.3 ms
        # at 270 x 4096, one thread, loaded machine)
        # C (the CPU spline's library, one pass instead of four) only eagerly; the backward runs in
        # C only after a C forward, so never while torch.compile traces it
        lib = None if torch.compiler.is_compiling() or not x.is_contiguous() else _native.kernel(x)
        if lib is not None:
            y = _native.clamp(lib, x, bound)
        elif torch.compiler.is_compiling():
            # out of place: the compiler fuses the chain anyway, and torch 2.11 (not 2.6, 2.13) traced the
            # in-place chain into a saved y that zeroed every conditioner's gradient (seen with
            # torch 2.11 on CPU and CUDA, tests/test_flows.py's compiled-gradient test)
            y = torch.sigmoid(x * (2 / bound)) * (2 * bound) - bound
        else:
            y = torch.mul(x, 2 / bound).sigmoid_().mul_(2 * bound).sub_(bound)
        ctx.save_for_backward(y)
        ctx.bound, ctx.lib = bound, lib
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        (y,) = ctx.saved_tensors
        if ctx.lib is not None and not torch.is_grad_enabled() and grad.is_contiguous():
            return _native.clamp_backward(ctx.lib, y, grad, ctx.bound), None
        u = torch.mul(y, 1 / ctx.bound)
        u2 = u * u if torch.is_grad_enabled() else u.mul_(u)  # out of place under create_graph
        return torch.addcmul(grad, grad, u2, value=-1), None  # grad (1 - u²)


class MaskedMLP(nn.Module):
    r"""Autoregressive network ``z (*, d) -> params (*, d, P)``; ``params[..., k, :]`` sees ``z_{<k}``.

    Arguments:
        dim: ``d``.
        n_params: ``P``, parameters per coordinate.
        hidden: widths of the hidden layers, e.g. ``(64, 64)``.
        activation: a module class, default :class:`torch.nn.SiLU` (smooth, so the
            flow is smooth in ``z``).
        bound: outputs are soft-clamped to ``(-bound, bound)`` by ``bound * tanh(o / bound)``,
            which bounds every layer's slope and shift: no input or weight can overflow
            a deep flow, and the slope a layer can reach is an explicit capacity limit.
        param_major: the layout of the family that reads the output (its ``param_major``: the
            spline's C kernels read each parameter as a row over the points). Eager code always
            returns that layout; compiled code only with this set and the kernels available
            (otherwise the row-major product, which the compiler's own fused loops prefer).
            The values are the same either way.

    The output layer starts at zero, so the parameters start at zero. :meth:`raw` hands out the
    output before the output layer's bias and the clamp, for a family that applies those itself
    as it reads the output (the spline's kernels: :meth:`krflows.transforms.Spline.forward_raw`).

    Example:
        >>> net = MaskedMLP(3, n_params=2, hidden=(16,))
        >>> net(torch.randn(5, 3)).shape
        torch.Size([5, 3, 2])
    """

    param_major: bool = False  # a class default too: networks pickled before the argument existed

    def __init__(self, dim: int, n_params: int, hidden: Sequence[int] = (64, 64),
                 activation: type[nn.Module] = nn.SiLU, bound: float = 8.0, param_major: bool = False):
        super().__init__()
        self.dim, self.n_params, self.bound, self.param_major = dim, n_params, bound, param_major
        in_deg = torch.arange(1, dim + 1)
        layers: list[nn.Module] = []
        degrees = []
        prev = in_deg
        for width in hidden:
            # hidden degrees cycle through 1..d-1 (a unit of degree m sees z_1..z_m), sorted so
            # that the units coordinate i needs (degree < i) are a prefix: see `coordinate`
            deg = torch.sort(torch.arange(width) % max(dim - 1, 1) + 1).values
            layers += [MaskedLinear((deg[:, None] >= prev[None, :]).float()), activation()]
            degrees.append(deg)
            prev = deg
        out_deg = in_deg.repeat_interleave(n_params)  # coordinate-major: index k * P + p
        self.hidden = nn.Sequential(*layers)
        self.out = MaskedLinear((out_deg[:, None] > prev[None, :]).float())
        # prefix[l][i]: how many units of hidden layer l have degree <= i
        self._prefix = [[int((d <= i).sum()) for i in range(dim)] for d in degrees]
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _clamp(self, out: Tensor) -> Tensor:
        # torch.func cannot see into the Function; under torch.compile the compiler fuses the plain
        # operations anyway, and with dynamic=True dynamo failed to trace the Function in the
        # inverse under autograd (torch 2.13: "lift_tracked_freevar_to_input should not be called on
        # root SubgraphTracer", which sent a compiled flow back to eager at its first log_prob)
        if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
            return self.bound * torch.tanh(out / self.bound)
        return SoftClamp.apply(out, self.bound)

    def forward(self, z: Tensor) -> Tensor:
        # The output is computed transposed, (d * P, n), and returned as a (*, d, P) view of it:
        # every parameter is then a contiguous row over the points, the layout the spline's
        # eager kernel (krflows.transforms.monotone._SplineForward) works in, so that neither
        # its forward nor its backward transposes the full parameter tensor (0.9 ms each way
        # at 4096 x 10 x 27, one thread). Same values as the row-major product. Compiled code
        # keeps the row-major product unless ``param_major`` is set (at construction, for a family
        # that reads that layout: the spline, whose C kernels compiled code calls as custom
        # operators on the CPU): inductor's own fused spline loops run over points, and on
        # parameter-major input they made a compiled step slower (12.3 -> 16.9 ms at B = 512).
        if torch.compiler.is_compiling() and not (self.param_major and _native.available(z)):
            return self._clamp(self.out(self.hidden(z))).unflatten(-1, (self.dim, self.n_params))
        h = self.hidden(z.reshape(-1, self.dim))
        out = self._clamp(self.out.forward_t(h))
        return out.view(self.dim, self.n_params, h.shape[0]).permute(2, 0, 1).reshape(
            *z.shape[:-1], self.dim, self.n_params)

    def raw(self, z: Tensor) -> tuple[Tensor, Tensor | None, float]:
        """``(out, bias, bound)``: the output before the output layer's bias and the soft clamp, as
        the parameter-major ``(*, d, P)`` view :meth:`forward` returns, the bias ``(d, P)`` and the
        bound, so that ``self(z)`` is ``bound * tanh((out + bias) / bound)``. For a family that adds
        and clamps as it reads (:meth:`krflows.transforms.Spline.forward_raw`), which saves the
        clamp's pass over the whole output each way."""
        h = self.hidden(z.reshape(-1, self.dim))
        out = self.out.forward_t(h, bias=False).view(self.dim, self.n_params, h.shape[0])
        bias = None if self.out.bias is None else self.out.bias.view(self.dim, self.n_params)
        return out.permute(2, 0, 1).reshape(*z.shape[:-1], self.dim, self.n_params), bias, self.bound

    def coordinate(self, z_head: Tensor, i: int) -> Tensor:
        r"""The parameters of coordinate ``i`` alone, ``(*, P)``, from ``z_head = z[..., :i]``.

        Equal to ``self(z)[..., i, :]`` for any ``z`` that starts with ``z_head``, at a
        fraction of the cost: only the hidden units of degree ``< i + 1`` (a prefix, since
        degrees are sorted) and the ``P`` output rows of coordinate ``i`` are computed. The
        inverse of an autoregressive layer needs one coordinate per pass, so its ``d``
        passes cost about one full forward pass instead of ``d``.
        """
        P = self.n_params
        rows = slice(i * P, (i + 1) * P)
        if i == 0:  # no input: the bias alone
            return self._clamp(self.out.bias[rows]).expand(*z_head.shape[:-1], P)
        h, n_in = z_head, i
        for layer, act, prefix in zip(self.hidden[::2], self.hidden[1::2], self._prefix, strict=True):
            n = prefix[i]
            h = act(F.linear(h, layer.weight[:n, :n_in] * layer.mask[:n, :n_in], layer.bias[:n]))
            n_in = n
        out = self.out
        return self._clamp(F.linear(h, out.weight[rows, :n_in] * out.mask[rows, :n_in], out.bias[rows]))
