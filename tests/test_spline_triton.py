"""The spline's Triton kernels (``krflows/transforms/_spline_triton.py``: the CUDA path), run on the
CPU under Triton's interpreter: against the C kernels (an independent implementation of the same
arithmetic), against autograd through the plain torch operations, and as the kernels behind a
whole flow's training pass and ``log_prob``. Skipped where Triton is not installed (CPU wheels of
torch do not bring it; CI installs it); tests/test_cuda.py runs them compiled on a GPU."""

import importlib.util
import math
import os

import pytest
import torch

pytest.importorskip("triton")

from krflows.transforms import _native  # noqa: E402
from krflows.transforms.monotone import Spline  # noqa: E402

PATH = os.path.join(os.path.dirname(_native.__file__), "_spline_triton.py")


@pytest.fixture(scope="module")
def tri():
    """A copy of the module whose kernels Triton interprets: ``TRITON_INTERPRET`` is read when
    ``triton.jit`` runs and again at each call, so it stays set while this file's tests run."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("krflows_spline_triton_interpreted", PATH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


@pytest.fixture(scope="module")
def clib():
    lib = _native.kernel(torch.zeros(1))
    if lib is None:
        pytest.skip(f"no C kernel to compare with: {_native.status()}")
    return lib


def _case(fam: Spline, dtype, L=3, R=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    pt = torch.randn(L, fam.n_params, R, generator=g, dtype=torch.float64) * 2
    zt = torch.randn(L, R, generator=g, dtype=torch.float64) * 4
    # the tails, both end knots exactly, a NaN, and points far outside
    zt[0, :6] = torch.tensor([7.0, -9.0, fam.bound, -fam.bound, math.nan, 1e4])
    return zt.to(dtype), pt.to(dtype)


def _close(a, b, tol):
    assert torch.equal(a.isnan(), b.isnan())
    a, b = a.nan_to_num(), b.nan_to_num()
    assert torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max().item()


FAMILIES = [Spline(bins=8, bound=5.0), Spline(bins=8, bound=5.0, affine=False),
            Spline(bins=3, bound=2.0, min_width=0.05, min_slope=0.1), Spline(bins=1, bound=3.0)]


@pytest.mark.parametrize("fam", FAMILIES, ids=["K8", "K8-no-affine", "K3-floors", "K1"])
def test_triton_kernels_match_the_c_kernels_in_float64(tri, clib, fam):
    """Also with a conditioner's bias and soft clamp folded in (``Spline.forward_raw``), each alone
    and both, on parameters far beyond the clamp's bound."""
    zt, pt = _case(fam, torch.float64)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(pt.shape[:2], generator=g, dtype=torch.float64)
    for fold in ((), (None, 0.0), (bias, 3.0), (None, 3.0), (bias, 0.0)):
        p = pt * 4 if fold else pt
        for name in ("forward", "inverse"):
            ref = _native.forward(clib, zt, p, fam, name, *fold)
            for got, want in zip(tri.forward(zt, p, fam, name, *fold), ref, strict=True):
                _close(got, want, 1e-10)
        gX, gL = (torch.randn(zt.shape, generator=g, dtype=torch.float64) for _ in range(2))
        for grads in ((gX, gL), (None, gL), (gX, None)):
            for got, want in zip(tri.backward(zt, p, *grads, fam, *fold),
                                 _native.backward(clib, zt, p, *grads, fam, *fold), strict=True):
                _close(got, want, 1e-10)


def test_triton_float32_is_float64_to_float32_rounding(tri, clib):
    fam = Spline(bins=8, bound=5.0)
    zt, pt = _case(fam, torch.float64, R=200, seed=3)
    g = torch.Generator().manual_seed(2)
    gX, gL = (torch.randn(zt.shape, generator=g, dtype=torch.float64) for _ in range(2))
    f32 = [t.float() for t in (zt, pt, gX, gL)]
    pairs = [(tri.forward(*f32[:2], fam), _native.forward(clib, zt, pt, fam)),
             (tri.forward(*f32[:2], fam, "inverse"), _native.forward(clib, zt, pt, fam, "inverse")),
             (tri.backward(*f32, fam), _native.backward(clib, zt, pt, gX, gL, fam))]
    for got, want in pairs:
        for a, b in zip(got, want, strict=True):
            assert a.dtype == torch.float32
            scale = b.nan_to_num().abs().amax().clamp_min(1)
            assert ((a.double() - b).nan_to_num().abs() / scale).max() < 1e-4


def test_triton_backward_is_autograd_of_the_plain_operations(tri):
    """The oracle here is autograd through ``Spline._forward_ops`` (torch operations, not ours)."""
    fam = Spline(bins=6, bound=4.0)
    zt, pt = _case(fam, torch.float64, L=1, R=120, seed=5)
    zt[0, 4] = 0.5  # no NaN: autograd's gradients would all be NaN
    z, params = zt[0].clone().requires_grad_(), pt[0].T.clone().requires_grad_()  # (R,), (R, P)
    x, ld = fam._forward_ops(z, params)
    g = torch.Generator().manual_seed(4)
    gX, gL = (torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(2))
    want_z, want_p = torch.autograd.grad((x * gX + ld * gL).sum(), (z, params))
    X, Ld = tri.forward(zt, pt, fam)
    _close(X[0], x.detach(), 1e-12)
    _close(Ld[0], ld.detach(), 1e-12)
    gz, gp = tri.backward(zt, pt, gX[None], gL[None], fam)
    _close(gz[0], want_z, 1e-10)
    _close(gp[0].T, want_p, 1e-10)
    # a conditioner's raw output with its bias and soft clamp folded in (Spline.forward_raw)
    raw = (params.detach() * 4).requires_grad_()
    bias = torch.linspace(-2, 2, fam.n_params, dtype=torch.float64).requires_grad_()
    x, ld = fam._forward_ops(z, 3.0 * torch.tanh((raw + bias) / 3.0))
    want = torch.autograd.grad((x * gX + ld * gL).sum(), (z, raw, bias))
    ot, b = raw.detach().T[None].contiguous(), bias.detach()[None]
    for got, ref in zip(tri.forward(zt, ot, fam, "forward", b, 3.0), (x, ld), strict=True):
        _close(got[0], ref.detach(), 1e-12)
    gz, gp = tri.backward(zt, ot, gX[None], gL[None], fam, b, 3.0)
    for got, ref in zip((gz[0], gp[0].T, gp[0].sum(-1)), want, strict=True):
        _close(got, ref, 1e-10)


def test_triton_clamp_and_empty_inputs(tri, clib):
    x = torch.randn(1000, dtype=torch.float64) * 10
    y = tri.clamp(x, 3.0)
    _close(y, 3.0 * torch.tanh(x / 3.0), 1e-13)
    g = torch.randn(1000, dtype=torch.float64)
    _close(tri.clamp_backward(y, g, 3.0), g * (1 - torch.tanh(x / 3.0) ** 2), 1e-12)
    fam = Spline()
    X, Ld = tri.forward(torch.zeros(2, 0), torch.zeros(2, fam.n_params, 0), fam)
    assert X.shape == Ld.shape == (2, 0)
    gz, gp = tri.backward(torch.zeros(2, 0), torch.zeros(2, fam.n_params, 0), None, None, fam)
    assert gz.shape == (2, 0) and gp.shape == (2, fam.n_params, 0)


def test_a_flow_on_the_triton_kernels_matches_the_c_kernels(tri, clib, monkeypatch):
    """The glue: a KRFlow whose spline and soft clamp run the (interpreted) Triton kernels, as on a
    GPU, against the same flow on the C kernels: sampling with log q and its gradients, and
    log_prob (the inverse, whose backward uses the inverse function theorem) with its gradients."""
    import krflows

    torch.manual_seed(0)
    flow = krflows.KRFlow(3, "spline", layers=2, hidden=(16,)).double()
    with torch.no_grad():  # away from the identity initialisation
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    z = torch.randn(64, 3, dtype=torch.float64) * 2
    x_at = torch.randn(64, 3, dtype=torch.float64) * 3

    def run():
        flow.zero_grad()
        x, logq, _ = flow.push(z)
        (x.sum() + logq.sum()).backward()
        g1 = [p.grad.clone() for p in flow.parameters()]
        flow.zero_grad()
        lp = flow.log_prob(x_at)
        lp.sum().backward()
        return x.detach(), logq.detach(), g1, lp.detach(), [p.grad.clone() for p in flow.parameters()]

    want = run()
    calls = []

    def triton_kernel(like):
        calls.append(like.shape)
        return tri if like.dtype in (torch.float32, torch.float64) else None

    monkeypatch.setattr(_native, "kernel", triton_kernel)
    got = run()
    assert calls, "the flow never asked for a kernel"
    for a, b in zip(got, want, strict=True):
        for u, v in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b], strict=True):
            _close(u, v, 1e-9)


def test_triton_kernels_refuse_strided_input_as_the_c_ones_do(tri):
    """Both kernels read raw memory: a strided view would be read as if it were contiguous."""
    fam = Spline()
    zt, pt = _case(fam, torch.float64, R=20)
    with pytest.raises(ValueError, match="contiguous"):
        _native.forward(tri, zt, pt.transpose(0, 2).contiguous().transpose(0, 2), fam)
    with pytest.raises(ValueError, match="contiguous"):
        _native.backward(tri, zt.T.contiguous().T, pt, None, None, fam)


@pytest.mark.parametrize("capability, fails, why", [
    ((6, 0), False, "compute capability 6.0"), ((9, 0), True, "launch failed"), ((9, 0), False, None)])
def test_the_gpu_kernels_are_checked_before_use(tri, monkeypatch, capability, fails, why):
    """A GPU Triton cannot serve (a P100, a machine without the C compiler Triton's launcher
    needs) gets the torch operations and a status saying why, instead of failing mid-forward."""
    import sys

    import krflows.transforms

    def clamp(x, bound):
        if fails:
            raise RuntimeError("launch failed")
        return tri.clamp(x.cpu(), bound)

    monkeypatch.setattr(_native, "_gpu_status", "not loaded yet")
    monkeypatch.setattr(_native, "_gpu", None)
    monkeypatch.setattr(_native, "enabled", True)
    fake = type(sys)("fake_spline_triton")
    fake.clamp = clamp
    monkeypatch.setattr(krflows.transforms, "_spline_triton", fake, raising=False)
    monkeypatch.setitem(sys.modules, "krflows.transforms._spline_triton", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capability)
    monkeypatch.setattr(torch, "full", lambda size, value, device=None: torch.ones(size).mul_(value))
    status = _native.gpu_status()
    if why is None:
        assert status == "triton kernels" and _native._gpu is fake
    else:
        assert status.startswith("torch operations") and why in status and _native._gpu is None
