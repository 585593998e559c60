"""The spline's fused kernels for CUDA devices, in Triton: forward (``z -> x``, ``log dx/dz``), its
backward and the inverse, each one pass over the points, plus the conditioners' soft clamp: the
GPU's counterpart of ``_spline.c`` (same layout, same arithmetic, same argument conventions), which
:mod:`krflows.transforms._native` hands out for CUDA tensors.

Written by hand because neither torch nor zuko nor nflows has a fused spline kernel: eager torch
runs the spline as ~90 small kernels each way, so that a GPU training step was bound by ~20 µs of
host time per launch (benchmarks/RESULTS_gpu.md: ~1000 launches per step), and under torch.compile
inductor split each layer's spline into six kernels that each read the full parameter tensor again
(twice the GEMMs' time at B = 65536 on an H100). Triton ships with torch's CUDA wheels; where it is
missing the plain torch operations run, as before.

Layout (as ``_spline.c``): points ``(L, R)``, parameters ``(L, P, R)`` contiguous, ``P = [a, v,]
widths (K), heights (K), raw knot slopes (K + 1)``. One program handles ``BLOCK`` points of one row;
the loops over the ``K`` bins are unrolled. Scalars travel in a small tensor of the points' dtype
(a float argument would be rounded to float32 by Triton), so float64 runs in float64 throughout.
tests/test_spline_triton.py runs these kernels under Triton's interpreter against the C kernels and
autograd on the CPU; tests/test_cuda.py compiles them on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 128  # points per program


@triton.jit
def _softplus(y):
    # torch's threshold 20; log(1 + e) by Goldberg's trick (accurate for small e, as the C kernel)
    e = tl.exp(tl.where(y > 20.0, 20.0, y))  # where, not minimum: NaN stays NaN
    u = 1.0 + e
    d = u - 1.0
    lp = tl.where(d == 0.0, e, tl.log(u) * (e / tl.where(d == 0.0, 1.0, d)))
    return tl.where(y > 20.0, y, lp)


@triton.jit
def _dsoftplus(y):
    e = tl.exp(tl.where(y > 20.0, 20.0, y))
    return tl.where(y > 20.0, 1.0, e / (e + 1.0))


@triton.jit
def _clip(v, lo, hi):
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))  # NaN stays NaN


@triton.jit
def _sqrt(x):
    # correctly rounded in both precisions (tl.sqrt is approximate in float32, sqrt_rn float32 only)
    if x.dtype == tl.float64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def _ld(pp, j, R, offs, mask, bp, b, HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr):
    """Parameter row ``j`` at ``pp``; a conditioner's output folded (``_native.forward``'s ``bias``
    and ``clamp``): plus the row's bias ``bp[j]``, soft-clamped to ``b`` by the clamp kernel's
    arithmetic. The kernels read each parameter two to four times and fold it at every read:
    arithmetic is cheap here, another pass over the conditioner's output is not."""
    u = tl.load(pp + j * R + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        u = u + tl.load(bp + j)
    if CLAMP:
        u = (2.0 * b) / (1.0 + tl.exp((-2.0 / b) * u)) - b
    return u


@triton.jit
def _dclamp(g, y, b, CLAMP: tl.constexpr):
    """A folded parameter's gradient ``g`` through the soft clamp, from its value ``y`` (as the C kernel)."""
    if CLAMP:
        u = y * (1.0 / b)
        g = g - g * (u * u)
    return g


@triton.jit
def _bin(v, pp, R, offs, mask, B, minw, bp, b, HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr, K: tl.constexpr,
         ROW: tl.constexpr, OFF: tl.constexpr, BLOCK: tl.constexpr):
    """The bin of points ``v`` along knot row ``ROW`` (0: z, 1: x) of the parameters at ``pp``:
    the clamped point, the bin number, its knots and running sums, and what the backward needs."""
    mz = _ld(pp, OFF, R, offs, mask, bp, b, HAS_BIAS, CLAMP)
    mh = _ld(pp, OFF + K, R, offs, mask, bp, b, HAS_BIAS, CLAMP)
    for k in tl.static_range(1, K):
        uz = _ld(pp, OFF + k, R, offs, mask, bp, b, HAS_BIAS, CLAMP)
        uh = _ld(pp, OFF + K + k, R, offs, mask, bp, b, HAS_BIAS, CLAMP)
        mz = tl.where(uz > mz, uz, mz)
        mh = tl.where(uh > mh, uh, mh)
    # tl.full, not tl.zeros(_like): those are jit functions of Triton's own, which its interpreter
    # (the CPU tests) cannot call unless it was on when Triton was imported
    zero = tl.full([BLOCK], 0.0, v.dtype)
    Sz = zero
    Sh = zero
    for k in tl.static_range(K):  # the running sums' last values, in the order used below
        Sz = Sz + tl.exp(_ld(pp, OFF + k, R, offs, mask, bp, b, HAS_BIAS, CLAMP) - mz)
        Sh = Sh + tl.exp(_ld(pp, OFF + K + k, R, offs, mask, bp, b, HAS_BIAS, CLAMP) - mh)
    span = 2.0 * B * (1.0 - K * minw)
    rz = span / Sz
    rx = span / Sh
    vc = _clip(v, -B, B)
    Cz = zero
    Cx = zero
    kz = zero - B
    kx = zero - B
    z0 = zero
    w = zero
    x0 = zero
    h = zero
    cz0 = zero
    cz1 = zero
    cx0 = zero
    cx1 = zero
    raw0 = zero
    raw1 = zero
    idx = tl.full([BLOCK], 0, tl.int32)
    for j in tl.static_range(K):
        Cz_n = Cz + tl.exp(_ld(pp, OFF + j, R, offs, mask, bp, b, HAS_BIAS, CLAMP) - mz)
        Cx_n = Cx + tl.exp(_ld(pp, OFF + K + j, R, offs, mask, bp, b, HAS_BIAS, CLAMP) - mh)
        if j + 1 < K:
            off_j = (j + 1) * (2.0 * B * minw) - B
            kz_n = Cz_n * rz + off_j
            kx_n = Cx_n * rx + off_j
        else:  # the end knot, exactly
            kz_n = zero + B
            kx_n = zero + B
        if j == 0:
            sel = offs >= 0
        else:  # knots increase, so the last bin whose lower knot is at or below the point wins
            if ROW == 0:
                sel = vc >= kz
            else:
                sel = vc >= kx
        z0 = tl.where(sel, kz, z0)
        w = tl.where(sel, kz_n - kz, w)
        x0 = tl.where(sel, kx, x0)
        h = tl.where(sel, kx_n - kx, h)
        cz0 = tl.where(sel, Cz, cz0)
        cz1 = tl.where(sel, Cz_n, cz1)
        cx0 = tl.where(sel, Cx, cx0)
        cx1 = tl.where(sel, Cx_n, cx1)
        raw0 = tl.where(sel, _ld(pp, OFF + 2 * K + j, R, offs, mask, bp, b, HAS_BIAS, CLAMP), raw0)
        raw1 = tl.where(sel, _ld(pp, OFF + 2 * K + j + 1, R, offs, mask, bp, b, HAS_BIAS, CLAMP), raw1)
        idx = tl.where(sel, j, idx)
        Cz = Cz_n
        Cx = Cx_n
        kz = kz_n
        kx = kx_n
    return vc, idx, z0, w, x0, h, cz0 / Sz, cz1 / Sz, cx0 / Sh, cx1 / Sh, rz, rx, raw0, raw1, mz, mh


@triton.jit
def _start(c_ptr, nrb, R, K: tl.constexpr, AFF: tl.constexpr, BLOCK: tl.constexpr):
    """This program's points (offsets in the row, mask), the offsets of its row of points, of
    parameters and of the row's bias, ``R`` as int64 (``P R`` may pass 2^31) and the scalars of
    :func:`_spec` (the clamp's bound last)."""
    P: tl.constexpr = 3 * K + 1 + 2 * AFF
    row = (tl.program_id(0) // nrb).to(tl.int64)
    offs = (tl.program_id(0) % nrb) * BLOCK + tl.arange(0, BLOCK)
    return (offs, offs < R, row * R, row * P * R, row * P, row * 0 + R,
            tl.load(c_ptr), tl.load(c_ptr + 1), tl.load(c_ptr + 2), tl.load(c_ptr + 3), tl.load(c_ptr + 4))


@triton.jit
def _slope(xi, s, d0, d1):
    """``dx/dz`` inside the bin and the pieces of the value (``Spline._slope``)."""
    t = xi * (1.0 - xi)
    den = s + (d1 + d0 - 2.0 * s) * t
    num = d1 * xi * xi + 2.0 * s * t + d0 * (1.0 - xi) * (1.0 - xi)
    return s * s * num / (den * den), t, den, num


@triton.jit
def _forward_kernel(z_ptr, p_ptr, b_ptr, x_ptr, ld_ptr, c_ptr, R, nrb, K: tl.constexpr, AFF: tl.constexpr,
                    HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask, pbase, qbase, bbase, R, B, minw, floor_, cst, b = _start(c_ptr, nrb, R, K, AFF, BLOCK)
    pp = p_ptr + qbase
    bp = b_ptr + bbase
    z = tl.load(z_ptr + pbase + offs, mask=mask, other=0.0)
    zc, idx, z0, w, x0, h, cz0, cz1, cx0, cx1, rz, rx, raw0, raw1, mz, mh = _bin(
        z, pp, R, offs, mask, B, minw, bp, b, HAS_BIAS, CLAMP, K, 0, 2 * AFF, BLOCK)
    d0 = floor_ + _softplus(raw0 + cst)
    d1 = floor_ + _softplus(raw1 + cst)
    s = h / w
    xi = _clip((zc - z0) / w, 0.0, 1.0)
    slope, t, den, num = _slope(xi, s, d0, d1)
    n1 = s * xi * xi + d0 * t
    x = x0 + h * n1 / den
    above = z > zc
    out = above | (z < zc)
    dout = tl.where(above, d1, d0)
    slope = tl.where(out, dout, slope)
    x = tl.where(out, zc + (z - zc) * dout, x)
    ld = tl.log(slope)
    if AFF:
        sc = floor_ + _softplus(_ld(pp, 1, R, offs, mask, bp, b, HAS_BIAS, CLAMP) + cst)
        x = _ld(pp, 0, R, offs, mask, bp, b, HAS_BIAS, CLAMP) + sc * x
        ld = ld + tl.log(sc)
    tl.store(x_ptr + pbase + offs, x, mask=mask)
    tl.store(ld_ptr + pbase + offs, ld, mask=mask)


@triton.jit
def _inverse_kernel(x_ptr, p_ptr, b_ptr, z_ptr, ld_ptr, c_ptr, R, nrb, K: tl.constexpr, AFF: tl.constexpr,
                    HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask, pbase, qbase, bbase, R, B, minw, floor_, cst, b = _start(c_ptr, nrb, R, K, AFF, BLOCK)
    pp = p_ptr + qbase
    bp = b_ptr + bbase
    v = tl.load(x_ptr + pbase + offs, mask=mask, other=0.0)
    if AFF:  # undo the affine part first: x' = (x - a) / s
        sc = floor_ + _softplus(_ld(pp, 1, R, offs, mask, bp, b, HAS_BIAS, CLAMP) + cst)
        v = (v - _ld(pp, 0, R, offs, mask, bp, b, HAS_BIAS, CLAMP)) / sc
    xc, idx, z0, w, x0, h, cz0, cz1, cx0, cx1, rz, rx, raw0, raw1, mz, mh = _bin(
        v, pp, R, offs, mask, B, minw, bp, b, HAS_BIAS, CLAMP, K, 1, 2 * AFF, BLOCK)
    d0 = floor_ + _softplus(raw0 + cst)
    d1 = floor_ + _softplus(raw1 + cst)
    s = h / w
    r = xc - x0
    c1 = d1 + d0 - 2.0 * s
    qa = h * (s - d0) + r * c1
    qb = h * d0 - r * c1
    disc = qb * qb + 4.0 * qa * s * r
    disc = tl.where(disc < 0.0, 0.0, disc)
    xi = _clip((-2.0 * s * r) / (-qb - _sqrt(disc)), 0.0, 1.0)
    slope = _slope(xi, s, d0, d1)[0]
    above = v > xc
    out = above | (v < xc)
    slope = tl.where(out, tl.where(above, d1, d0), slope)
    z = tl.where(out, xc + (v - xc) / slope, z0 + xi * w)
    ld = tl.log(slope)
    if AFF:
        ld = ld + tl.log(sc)
    tl.store(z_ptr + pbase + offs, z, mask=mask)
    tl.store(ld_ptr + pbase + offs, ld, mask=mask)


@triton.jit
def _backward_kernel(z_ptr, p_ptr, b_ptr, gx_ptr, gl_ptr, gz_ptr, gp_ptr, c_ptr, R, nrb, K: tl.constexpr,
                     AFF: tl.constexpr, HAS_GX: tl.constexpr, HAS_GL: tl.constexpr, HAS_BIAS: tl.constexpr,
                     CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    # with CLAMP, every stored parameter gradient goes through the clamp (_dclamp, from the row's value)
    offs, mask, pbase, qbase, bbase, R, B, minw, floor_, cst, b = _start(c_ptr, nrb, R, K, AFF, BLOCK)
    pp = p_ptr + qbase
    bp = b_ptr + bbase
    OFF: tl.constexpr = 2 * AFF
    gq = gp_ptr + qbase
    z = tl.load(z_ptr + pbase + offs, mask=mask, other=0.0)
    zc, idx, z0, w, x0, h, cz0, cz1, cx0, cx1, rz, rx, raw0, raw1, mz, mh = _bin(
        z, pp, R, offs, mask, B, minw, bp, b, HAS_BIAS, CLAMP, K, 0, OFF, BLOCK)
    # the forward's values (as _forward_kernel)
    d0 = floor_ + _softplus(raw0 + cst)
    d1 = floor_ + _softplus(raw1 + cst)
    s = h / w
    xi_raw = (zc - z0) / w
    xi = _clip(xi_raw, 0.0, 1.0)
    xm = tl.where((xi_raw >= 0.0) & (xi_raw <= 1.0), 1.0, 0.0)
    _, t, den, num = _slope(xi, s, d0, d1)
    n1 = s * xi * xi + d0 * t
    above = z > zc
    below = z < zc
    out = above | below
    dout = tl.where(above, d1, d0)
    tail = z - zc
    x = tl.where(out, zc + tail * dout, x0 + h * n1 / den)
    zero = tl.full([BLOCK], 0.0, z.dtype)
    if HAS_GX:
        gx = tl.load(gx_ptr + pbase + offs, mask=mask, other=0.0)
    else:
        gx = zero
    if HAS_GL:
        gl = tl.load(gl_ptr + pbase + offs, mask=mask, other=0.0)
    else:
        gl = zero
    if AFF:
        yv = _ld(pp, 1, R, offs, mask, bp, b, HAS_BIAS, CLAMP)
        vv = yv + cst
        sc = floor_ + _softplus(vv)
        ya = _ld(pp, 0, R, offs, mask, bp, b, HAS_BIAS, CLAMP)
        tl.store(gq + offs, _dclamp(gx, ya, b, CLAMP), mask=mask)
        tl.store(gq + R + offs, _dclamp(_dsoftplus(vv) * (gx * x + gl / sc), yv, b, CLAMP), mask=mask)
        gx = gx * sc
    # the bin's rational function, the tails (_SplineForward._backward_ops, point by point)
    inside = tl.where(out, 0.0, 1.0)
    g_in = gx * inside
    gl_in = gl * inside
    g_n1 = g_in * h / den
    G = (g_n1 * n1 + 2.0 * gl_in) / den
    g_num = gl_in / num
    xi2 = xi * xi
    omx = 1.0 - xi
    u12 = 1.0 - 2.0 * xi
    g_s = g_n1 * xi2 - G * (1.0 - 2.0 * t) + 2.0 * (g_num * t + gl_in / s)
    g_xi = (g_n1 * (2.0 * s * xi + d0 * u12) - G * (d1 + d0 - 2.0 * s) * u12
            + 2.0 * g_num * (d1 * xi + s * u12 - d0 * omx)) * xm
    g_out = tl.where(out, gx * tail + gl / dout, 0.0)
    g_d0 = (g_n1 - G) * t + g_num * omx * omx + tl.where(below, g_out, 0.0)
    g_d1 = g_num * xi2 - G * t + tl.where(above, g_out, 0.0)
    gxw = g_xi / w
    tl.store(gz_ptr + pbase + offs, tl.where(out, gx * dout, gxw), mask=mask)
    g_h = g_in * n1 / den + g_s / w
    gw_neg = (g_s * s + g_xi * xi) / w
    # through the knots, the running sums and the softmax (formula: _SplineForward's docstring)
    gam_z = (-gxw + gw_neg) * cz0 - gw_neg * cz1
    gam_x = (g_in - g_h) * cx0 + g_h * cx1
    for k in tl.static_range(K):
        yz = _ld(pp, OFF + k, R, offs, mask, bp, b, HAS_BIAS, CLAMP)
        yx = _ld(pp, OFF + K + k, R, offs, mask, bp, b, HAS_BIAS, CLAMP)
        cfz = -gam_z + tl.where(k < idx, -gxw, 0.0) + tl.where(k == idx, -gw_neg, 0.0)
        cfx = -gam_x + tl.where(k < idx, g_in, 0.0) + tl.where(k == idx, g_h, 0.0)
        tl.store(gq + (OFF + k) * R + offs, _dclamp(cfz * rz * tl.exp(yz - mz), yz, b, CLAMP), mask=mask)
        tl.store(gq + (OFF + K + k) * R + offs, _dclamp(cfx * rx * tl.exp(yx - mh), yx, b, CLAMP), mask=mask)
    gr0 = _dsoftplus(raw0 + cst) * g_d0
    gr1 = _dsoftplus(raw1 + cst) * g_d1
    for j in tl.static_range(K + 1):  # the two raw knot slopes of the bin
        g = tl.where(j == idx, gr0, 0.0) + tl.where(j == idx + 1, gr1, 0.0)
        if CLAMP:
            g = _dclamp(g, _ld(pp, OFF + 2 * K + j, R, offs, mask, bp, b, HAS_BIAS, CLAMP), b, CLAMP)
        tl.store(gq + (OFF + 2 * K + j) * R + offs, g, mask=mask)


@triton.jit
def _clamp_kernel(x_ptr, g_ptr, y_ptr, n, c_ptr, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = tl.load(c_ptr)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)  # forward: x; backward: the output y
    if BACKWARD:  # g (1 - (y / b)^2), as the C kernel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        u = x * (1.0 / b)
        tl.store(y_ptr + offs, g - g * (u * u), mask=mask)
    else:  # 2b sigmoid(2x / b) - b
        tl.store(y_ptr + offs, (2.0 * b) / (1.0 + tl.exp((-2.0 / b) * x)) - b, mask=mask)


@functools.lru_cache(maxsize=64)
def _scalars(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _spec(fam, like: Tensor, clamp: float = 0.0) -> Tensor:
    cst = math.log(math.expm1(1.0 - fam.min_slope))  # _positive's offset, as _native._args
    values = (float(fam.bound), float(fam.min_width), float(fam.min_slope), cst, float(clamp))
    return _scalars(values, like.dtype, like.device)


def _device(t: Tensor):
    """Launch on ``t``'s GPU: Triton launches on the current device, which need not be the
    tensors' (a flow on ``cuda:1`` without ``torch.cuda.set_device``). CPU tensors (the
    interpreter, in the tests): no device to set."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _grid(L: int, R: int) -> tuple[tuple[int], int]:
    nrb = triton.cdiv(R, BLOCK)
    return (L * nrb,), nrb


def forward(zt: Tensor, pt: Tensor, fam, name: str = "forward", bias: Tensor | None = None, clamp: float = 0.0
            ) -> tuple[Tensor, Tensor]:
    """As :func:`krflows.transforms._native.forward`, on a CUDA device."""
    L, R = zt.shape
    X, Ld = torch.empty_like(zt), torch.empty_like(zt)
    if L * R:
        grid, nrb = _grid(L, R)
        kernel = _inverse_kernel if name == "inverse" else _forward_kernel
        with _device(zt):
            kernel[grid](zt, pt, pt if bias is None else bias, X, Ld, _spec(fam, zt, clamp), R, nrb,
                         K=fam.bins, AFF=int(fam.affine), HAS_BIAS=bias is not None, CLAMP=clamp > 0,
                         BLOCK=BLOCK)
    return X, Ld


def backward(zt: Tensor, pt: Tensor, gX: Tensor | None, gL: Tensor | None, fam, bias: Tensor | None = None,
             clamp: float = 0.0) -> tuple[Tensor, Tensor]:
    """As :func:`krflows.transforms._native.backward`, on a CUDA device."""
    L, R = zt.shape
    gz, gp = torch.empty_like(zt), torch.empty_like(pt)
    if L * R:
        grid, nrb = _grid(L, R)
        with _device(zt):
            _backward_kernel[grid](zt, pt, pt if bias is None else bias, zt if gX is None else gX,
                                   zt if gL is None else gL, gz, gp, _spec(fam, zt, clamp), R, nrb,
                                   K=fam.bins, AFF=int(fam.affine), HAS_GX=gX is not None,
                                   HAS_GL=gL is not None, HAS_BIAS=bias is not None, CLAMP=clamp > 0,
                                   BLOCK=BLOCK)
    return gz, gp


def _clamp(x: Tensor, g: Tensor, bound: float, backward: bool) -> Tensor:
    y = torch.empty_like(x)
    if x.numel():
        b, grid = _scalars((float(bound),), x.dtype, x.device), (triton.cdiv(x.numel(), 1024),)
        with _device(x):
            _clamp_kernel[grid](x, g, y, x.numel(), b, BACKWARD=backward, BLOCK=1024)
    return y


def clamp(x: Tensor, bound: float) -> Tensor:
    """``bound * tanh(x / bound)`` of a contiguous tensor, in one pass."""
    return _clamp(x, x, bound, False)


def clamp_backward(y: Tensor, grad: Tensor, bound: float) -> Tensor:
    """The gradient of :func:`clamp`'s input from its output ``y`` and the output's gradient."""
    return _clamp(y, grad, bound, True)
