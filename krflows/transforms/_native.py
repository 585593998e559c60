"""The fused spline kernels (forward, its backward, inverse, and the conditioners' soft clamp): on
the CPU ``_spline.c``, built at first use and loaded with :mod:`ctypes`; on CUDA devices the same
kernels in Triton (``_spline_triton.py``, where Triton is installed, as torch's CUDA wheels bring
it, and a test launch on every visible GPU worked: compute capability 7.0 or higher, a C compiler
for Triton's launcher; :func:`gpu_status` says why not).
:func:`kernel` hands out either as ``lib``, which :func:`forward`, :func:`backward`, :func:`clamp`
and :func:`clamp_backward` take. For torch.compile they are also registered as torch custom
operators (:func:`spline_op`, whose backward is :func:`spline_backward_op`).

Plain C without torch's headers compiles in a few seconds, once per machine (a torch C++ extension
takes a minute or more); the library is cached under ``$KRFLOWS_CACHE`` (default
``~/.cache/krflows``), keyed by the source, the compiler and the CPU, and written atomically, so
concurrent processes (DDP, pytest-xdist) share one build. Where no C compiler works (or ``KRFLOWS_NATIVE=0``),
:func:`kernel` returns ``None`` and the spline runs as torch operations: same numbers up to
rounding, only slower on small batches (:func:`status` says which, and why).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections import namedtuple
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("_spline.c")
# no trapping math: lets the compiler evaluate both sides of a select, which the loops need to vectorize;
# fused multiply-adds where the CPU has them (-march=native; _spline.c keeps the knots unfused):
# with the bin's values gathered, forward + backward at 10 x 512 points 273 -> 243 us on 2 threads
# (300 -> 255 us on one), within rounding of the unfused values (tests/test_spline_function.py)
COMMON = ["-fPIC", "-shared", "-std=gnu11", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math"]
# Tried in order. GCC, for this machine's instruction set: -O2 with the full vectorizer cost model
# built in 2.6 s a kernel faster than -O3's (forward + backward at 10 x 4096 points, one thread:
# 2.8 ms against 3.8-4.0 ms, and -O3 took 3.9 s), and AVX-512 beat AVX2 (3.8 vs 5.0 ms at -O3).
# Then any C compiler, portably.
FLAG_SETS = [["-O2", "-fvect-cost-model=dynamic", "-march=native"], ["-O3"]]

#: whether :func:`kernel` may return a fused kernel (``KRFLOWS_NATIVE=0`` turns both off)
enabled = os.environ.get("KRFLOWS_NATIVE", "1") not in ("0", "false", "False", "")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status = "not loaded yet"
_gpu = None  # the module of Triton kernels, once imported
_gpu_status = "not loaded yet"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _machine() -> str:
    """What ``-march=native`` depends on: the CPU's model and instruction-set flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(dict.fromkeys(lines))  # one of each (every core repeats them)
    except OSError:
        return platform.processor()


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    parts = [SOURCE.read_text(), cc, version, repr(FLAG_SETS), repr(COMMON), platform.machine(),
             platform.system(), _machine()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("KRFLOWS_CACHE") or
                 Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "krflows")
    path = cache / f"spline-{key}.so"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            errors = []
            for flags in FLAG_SETS:
                run = subprocess.run([cc, *flags, *COMMON, "-o", tmp, str(SOURCE), "-lm"],
                                     capture_output=True, text=True, timeout=300)
                if run.returncode == 0:
                    break
                errors.append(run.stderr.strip()[-300:])
            else:
                raise RuntimeError(f"{cc} failed: {' | '.join(errors)}")
            os.replace(tmp, path)  # atomic: a concurrent build writes the same bytes
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(path))
    for suffix, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        p, n = ctypes.c_void_p, ctypes.c_long
        # K, B, min width, min slope, softplus offset, affine, threads
        scalars = [ctypes.c_int, real, real, real, real, ctypes.c_int, ctypes.c_int]
        for name in ("forward", "inverse"):  # points, params, bias, clamp, outputs
            fn = getattr(lib, f"kr_spline_{name}_{suffix}")
            fn.argtypes, fn.restype = [p, p, p, real, p, p, n, n, *scalars], ctypes.c_int
        bwd = getattr(lib, f"kr_spline_backward_{suffix}")
        bwd.argtypes, bwd.restype = [p, p, p, real, p, p, p, p, n, n, *scalars], ctypes.c_int
        clamp, clamp_bwd = getattr(lib, f"kr_clamp_{suffix}"), getattr(lib, f"kr_clamp_backward_{suffix}")
        clamp.argtypes, clamp.restype = [p, p, n, real, ctypes.c_int], ctypes.c_int
        clamp_bwd.argtypes, clamp_bwd.restype = [p, p, p, n, real, ctypes.c_int], ctypes.c_int
    lib.kr_set_openmp.argtypes, lib.kr_set_openmp.restype = [ctypes.c_void_p] * 3, None
    _share_threads(lib)
    return lib


def _share_threads(lib: ctypes.CDLL) -> None:
    """Hands the kernel the OpenMP runtime torch runs on (found among the loaded libraries), so
    that it splits large calls over torch's own threads; without one it runs on one thread."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if line.rstrip().endswith((".so", ".so.1", ".so.5"))}
    except OSError:  # not Linux
        return
    torch_dir = os.path.dirname(torch.__file__)
    for path in sorted(paths, key=lambda p: not p.startswith(torch_dir)):  # torch's own first
        if os.path.basename(path).startswith(("libgomp", "libiomp5", "libomp")):
            try:
                omp = ctypes.CDLL(path)  # already loaded: the same instance torch uses
                lib.kr_set_openmp(*(ctypes.cast(getattr(omp, name), ctypes.c_void_p) for name in
                                    ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")))
                return
            except (OSError, AttributeError):
                continue


def _load() -> ctypes.CDLL | None:
    global _lib, _status
    with _lock:
        if _status == "not loaded yet":
            try:
                _lib, _status = _build(), "compiled kernel"
            except Exception as err:  # noqa: BLE001 - any failure means: use the torch operations
                _status = f"torch operations ({type(err).__name__}: {err})"
    return _lib


def status() -> str:
    """Which eager CPU spline runs: ``"compiled kernel"``, or ``"torch operations (why)"``."""
    if not enabled:
        return "torch operations (KRFLOWS_NATIVE=0)"
    _load()
    return _status


def _load_gpu():
    global _gpu, _gpu_status
    with _lock:
        if _gpu_status == "not loaded yet":
            try:
                _gpu, _gpu_status = _checked_triton(), "triton kernels"
            except Exception as err:  # noqa: BLE001 - any failure means: use the torch operations
                _gpu_status = f"torch operations ({type(err).__name__}: {err})"
    return _gpu


def _checked_triton():
    """The Triton kernels' module once it has run on every visible GPU; raises why not: no Triton
    (CPU wheels, macOS), a GPU below compute capability 7.0 (Triton does not compile for it, and
    torch.compile makes the same check), or a failed launch (Triton builds its launcher with the
    host's C compiler at first use). Without this check such a machine would fail in the middle
    of a forward pass where the torch operations work."""
    from krflows.transforms import _spline_triton

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        if major < 7:
            raise RuntimeError(f"cuda:{i} has compute capability {major}.{minor}; Triton needs 7.0 or higher")
        x = torch.full((3,), 2.0, device=f"cuda:{i}")
        got = _spline_triton.clamp(x, 4.0).cpu()  # 4 tanh(1/2): one launch, checked
        if not torch.allclose(got, torch.full((3,), 4 * math.tanh(0.5))):
            raise RuntimeError(f"a test launch on cuda:{i} returned {got.tolist()}")
    return _spline_triton


def gpu_status() -> str:
    """Which spline runs on CUDA devices: ``"triton kernels"``, or ``"torch operations (why)"``."""
    if not enabled:
        return "torch operations (KRFLOWS_NATIVE=0)"
    _load_gpu()
    return _gpu_status


def available(like: Tensor) -> bool:
    """Whether :func:`kernel` applies to tensors like ``like`` and is loaded already; never loads
    it (reads globals: safe to call while torch.compile traces)."""
    if not enabled or like.dtype not in (torch.float32, torch.float64):
        return False
    if like.device.type == "cuda":
        return _gpu_status == "triton kernels"
    return _status == "compiled kernel" and like.device.type == "cpu"


def launch_bound(like: Tensor) -> bool:
    """Whether eager code on ``like``'s device pays more per kernel launch than for the arithmetic
    of the flow's sizes (any device but the CPU: a GPU's launch costs ~20 µs of host time), so that
    fewer, larger operations win there: one dense masked product instead of block products
    (:class:`~krflows.nn.MaskedLinear`), ``cumsum`` instead of running additions (the spline's
    torch operations, where no fused kernel runs)."""
    return like.device.type != "cpu"


def kernel(like: Tensor):
    """The fused kernels that apply to tensors like ``like`` (float32 or float64): the compiled C
    library on the CPU, the Triton module on a CUDA device; ``None`` where neither runs."""
    if not enabled or like.dtype not in (torch.float32, torch.float64):
        return None
    if like.device.type == "cuda":
        return _gpu if _gpu_status == "triton kernels" else _load_gpu()
    if like.device.type != "cpu":
        return None
    return _lib if _status == "compiled kernel" else _load()


def _args(fam) -> tuple:
    cst = math.log(math.expm1(1.0 - fam.min_slope))
    return fam.bins, fam.bound, fam.min_width, fam.min_slope, cst, int(fam.affine), torch.get_num_threads()


def _suffix(t: Tensor) -> str:
    return "f32" if t.dtype == torch.float32 else "f64"


def _check(zt: Tensor, pt: Tensor, bias: Tensor | None, *grads: Tensor | None) -> None:
    if not all(t is None or t.is_contiguous() for t in (zt, pt, *grads)):  # the kernels read raw memory
        raise ValueError("the spline kernel needs contiguous points, parameters and gradients")
    if bias is not None and not (bias.is_contiguous() and bias.shape == pt.shape[:2]):
        raise ValueError(f"the spline kernel needs a contiguous bias of shape {tuple(pt.shape[:2])}, "
                         f"got {tuple(bias.shape)}")


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def forward(lib: ctypes.CDLL, zt: Tensor, pt: Tensor, fam, name: str = "forward", bias: Tensor | None = None,
            clamp: float = 0.0) -> tuple[Tensor, Tensor]:
    """``x`` and ``log dx/dz`` ``(L, R)`` from points ``zt (L, R)`` and parameters ``pt (L, P, R)``
    (both contiguous); with ``name="inverse"``, ``z`` and ``log dx/dz`` from points ``x``.

    With ``bias (L, P)`` and/or ``clamp > 0``, ``pt`` is a conditioner's output before its bias and
    soft clamp, and the parameters are ``clamp tanh((pt + bias) / clamp)`` (``pt + bias`` without
    clamp), :class:`krflows.nn.SoftClamp`'s arithmetic, which the kernel applies as it reads them
    (:meth:`krflows.transforms.Spline.forward_raw`)."""
    _check(zt, pt, bias)
    if not isinstance(lib, ctypes.CDLL):  # the Triton kernels (CUDA)
        return lib.forward(zt, pt, fam, name, bias, clamp)
    L, R = zt.shape
    X, Ld = torch.empty_like(zt), torch.empty_like(zt)
    if getattr(lib, f"kr_spline_{name}_{_suffix(zt)}")(
            zt.data_ptr(), pt.data_ptr(), _ptr(bias), float(clamp), X.data_ptr(), Ld.data_ptr(), L, R,
            *_args(fam)):
        raise MemoryError("krflows' spline kernel could not allocate its work buffer")
    return X, Ld


def backward(lib: ctypes.CDLL, zt: Tensor, pt: Tensor, gX: Tensor | None, gL: Tensor | None, fam,
             bias: Tensor | None = None, clamp: float = 0.0) -> tuple[Tensor, Tensor]:
    """The gradients of ``zt`` ``(L, R)`` and ``pt`` ``(L, P, R)`` from those of ``x`` and ``log dx/dz``
    (``(L, R)`` contiguous, or ``None`` for zero); with ``bias`` and ``clamp`` as for :func:`forward`,
    ``pt``'s is through them (the bias's is then ``pt``'s summed over the points)."""
    _check(zt, pt, bias, gX, gL)
    if not isinstance(lib, ctypes.CDLL):
        return lib.backward(zt, pt, gX, gL, fam, bias, clamp)
    L, R = zt.shape
    gz, gp = torch.empty_like(zt), torch.empty_like(pt)
    if getattr(lib, f"kr_spline_backward_{_suffix(zt)}")(
            zt.data_ptr(), pt.data_ptr(), _ptr(bias), float(clamp), _ptr(gX), _ptr(gL), gz.data_ptr(),
            gp.data_ptr(), L, R, *_args(fam)):
        raise MemoryError("krflows' spline kernel could not allocate its work buffer")
    return gz, gp


def clamp(lib: ctypes.CDLL, x: Tensor, bound: float) -> Tensor:
    """``bound * tanh(x / bound)`` of a contiguous tensor, in one pass (:class:`krflows.nn.SoftClamp`)."""
    if not isinstance(lib, ctypes.CDLL):
        return lib.clamp(x, bound)
    y = torch.empty_like(x)
    fn = getattr(lib, f"kr_clamp_{_suffix(x)}")
    fn(x.data_ptr(), y.data_ptr(), x.numel(), bound, torch.get_num_threads())
    return y


def clamp_backward(lib: ctypes.CDLL, y: Tensor, grad: Tensor, bound: float) -> Tensor:
    """The gradient of :func:`clamp`'s input, ``grad * (1 - (y / bound)^2)``, from its output ``y``."""
    if not isinstance(lib, ctypes.CDLL):
        return lib.clamp_backward(y, grad, bound)
    out = torch.empty_like(y)
    getattr(lib, f"kr_clamp_backward_{_suffix(y)}")(y.data_ptr(), grad.data_ptr(), out.data_ptr(), y.numel(),
                                                     bound, torch.get_num_threads())
    return out


# ---------------------------------------------------------------- for torch.compile
# The kernels as torch custom operators: opaque to the compiler, which fuses the conditioner's
# operations around them instead of tracing the spline's ~90 operations each way (a compiled
# training step at B = 4096, funnel-10, 2 threads: see benchmarks/RESULTS.md). Arguments are the
# spline's hyper-parameters as scalars (an operator cannot take the family object).

_Spec = namedtuple("_Spec", "bins bound min_width min_slope affine")


@torch.library.custom_op("krflows::spline", mutates_args=())
def spline_op(vt: Tensor, pt: Tensor, bias: Tensor | None, clamp: float, bins: int, bound: float,
              min_width: float, min_slope: float, affine: bool, inverse: bool) -> tuple[Tensor, Tensor]:
    """:func:`forward` (or the inverse) of points ``vt (L, R)`` and parameters ``pt (L, P, R)``
    (with ``bias (L, P)`` or ``None`` and ``clamp``: :func:`forward`'s conditioner output)."""
    spec = _Spec(bins, bound, min_width, min_slope, affine)
    vt, pt, bias = (None if t is None else t.contiguous() for t in (vt, pt, bias))
    return forward(kernel(vt), vt, pt, spec, "inverse" if inverse else "forward", bias, clamp)


@spline_op.register_fake
def _(vt, pt, bias, clamp, bins, bound, min_width, min_slope, affine, inverse):
    return vt.new_empty(vt.shape), vt.new_empty(vt.shape)


@torch.library.custom_op("krflows::spline_backward", mutates_args=())
def spline_backward_op(zt: Tensor, pt: Tensor, bias: Tensor | None, clamp: float, gX: Tensor | None,
                       gL: Tensor | None, bins: int, bound: float, min_width: float, min_slope: float,
                       affine: bool) -> tuple[Tensor, Tensor]:
    """:func:`backward`: the gradients of ``zt`` and ``pt`` from those of ``x`` and ``log dx/dz``."""
    spec = _Spec(bins, bound, min_width, min_slope, affine)
    zt, pt, bias, gX, gL = (None if t is None else t.contiguous() for t in (zt, pt, bias, gX, gL))
    return backward(kernel(zt), zt, pt, gX, gL, spec, bias, clamp)


@spline_backward_op.register_fake
def _(zt, pt, bias, clamp, gX, gL, bins, bound, min_width, min_slope, affine):
    return zt.new_empty(zt.shape), pt.new_empty(pt.shape)


def _setup(ctx, inputs, output):
    vt, pt, bias, clamp, *spec, inverse = inputs
    ctx.clamp, ctx.spec, ctx.inverse = clamp, spec, inverse
    # forward: the backward recomputes from the inputs; inverse: it needs the solution z and log z'
    ctx.save_for_backward(*((output[0], output[1], pt, bias) if inverse else (vt, pt, bias)))


def _backward(ctx, gX: Tensor | None, gL: Tensor | None):
    *points, pt, bias = ctx.saved_tensors

    def vjp(zt, gX, gL):
        return spline_backward_op(zt, pt, bias, ctx.clamp, gX, gL, *ctx.spec)

    if not ctx.inverse:
        gz, gp = vjp(points[0], gX, gL)
    else:  # inverse function theorem, as krflows.transforms.monotone._SplineInverse
        zt, lt = points
        gz_l, gp = vjp(zt, None, gL) if gL is not None else (None, None)
        gz = (gX if gz_l is None else gz_l if gX is None else gz_l + gX) / lt.exp()
        gp_x = vjp(zt, -gz, None)[1]
        gp = gp_x if gp is None else gp + gp_x
    # the bias's gradient: the parameters' summed over the points (as addmm's backward sums it)
    return gz, gp, None if bias is None else gp.sum(-1), None, *(None,) * len(ctx.spec), None


spline_op.register_autograd(_backward, setup_context=_setup)
