"""The spline's eager autograd Function (hand-written backward) against the plain tensor operations.

Oracles: ``torch.autograd.gradcheck`` (finite differences) in float64, and autograd through
:meth:`Spline._forward_ops`, the plain path that torch.compile traces. Points are placed in
the tails, exactly on knots and in bins squeezed to the minimal width; parameters arrive both
row-major (any conditioner) and parameter-major (what :class:`~krflows.nn.MaskedMLP` returns).
"""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import krflows
from krflows.nn import MaskedMLP
from krflows.transforms.monotone import Spline


def _case(bins=8, affine=True, n=40, d=3, dtype=torch.float64, seed=0, major="row"):
    """``(family, z, params)``: ``z (n, d)`` with points in the tails, on interior knots and in
    narrow bins; ``params (n, d, P)`` row-major or as a parameter-major view."""
    fam = Spline(bins=bins, bound=3.0, affine=affine)
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(n, d, fam.n_params, generator=g, dtype=torch.float64) * 1.5
    off = 2 if affine else 0
    params[: n // 4, :, off] = -30.0  # first width at the floor: a bin of width 2 B m
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * 3
    z[n // 4: n // 4 + 3] = torch.tensor([-7.0, 3.5, 40.0], dtype=torch.float64)[:, None]  # tails
    with torch.no_grad():  # exactly on knot 2 of every point's z row, and inside the narrow bins
        knots = fam._table(params[..., off:])[..., 0, :]
        z[-4:] = knots[-4:, :, min(2, bins)]
        z[:3] = knots[:3, :, 0] + 1e-4
    if major == "param":
        params = params.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        assert not params.is_contiguous()
    return fam, z.to(dtype).requires_grad_(), params.to(dtype).requires_grad_()


CASES = [dict(bins=8), dict(bins=8, affine=False), dict(bins=1), dict(bins=2), dict(bins=8, major="param"),
         dict(bins=3, affine=False, major="param")]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_is_the_plain_path(case):
    """The same operations: equal up to the last bits (ATen's vectorized and scalar loops round
    transcendental functions differently, and which elements take which depends on the layout)."""
    for dtype in (torch.float32, torch.float64):
        fam, z, params = _case(dtype=dtype, **case)
        x, log_d = fam.forward(z, params)
        x_ref, log_d_ref = fam._forward_ops(z, params)
        eps = torch.finfo(dtype).eps
        assert torch.allclose(x, x_ref, rtol=8 * eps, atol=8 * eps)
        assert torch.allclose(log_d, log_d_ref, rtol=8 * eps, atol=8 * eps)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradcheck_float64(case):
    # not the points on knots: log f' has a kink there (the map is C^1, not C^2)
    fam, z, params = _case(n=12, **case)
    z, params = z[:-4].detach().requires_grad_(), params[:-4].detach().requires_grad_()
    assert gradcheck(fam.forward, (z, params))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_equal_autograd_of_the_plain_path(case):
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        fam, z, params = _case(dtype=dtype, **case)
        g = torch.Generator().manual_seed(5)
        gx, gl = (torch.randn(z.shape, generator=g).to(dtype) for _ in range(2))
        got = torch.autograd.grad(fam.forward(z, params), (z, params), (gx, gl))
        ref = torch.autograd.grad(fam._forward_ops(z, params), (z, params), (gx, gl))
        for a, b in zip(got, ref, strict=True):
            assert torch.all(torch.isfinite(a))
            scale = b.abs().max()
            assert (a - b).abs().max() <= rtol * scale, (dtype, (a - b).abs().max() / scale)


def test_one_output_and_one_input():
    """Gradients of x alone, of log f' alone, and with respect to params alone."""
    fam, z, params = _case()
    for k in (0, 1):
        got = torch.autograd.grad(fam.forward(z, params)[k].sum(), (z, params))
        ref = torch.autograd.grad(fam._forward_ops(z, params)[k].sum(), (z, params))
        assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(got, ref, strict=True))
    z0 = z.detach()
    (got,) = torch.autograd.grad(fam.forward(z0, params)[0].sum(), params)
    (ref,) = torch.autograd.grad(fam._forward_ops(z0, params)[0].sum(), params)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("major", ["row", "param"])
def test_double_backward_is_exact(major):
    """create_graph=True differentiates the plain operations: second derivatives are exact."""
    fam, z, params = _case(n=12, d=2, major=major)
    z, params = z[:-4].detach().requires_grad_(), params[:-4].detach().requires_grad_()
    assert gradgradcheck(fam.forward, (z, params), fast_mode=True)


def test_broadcast_parameters():
    """One parameter vector for many points (as ``MaskedMLP.coordinate`` gives coordinate 0)."""
    fam, z, params = _case(n=10, d=1)
    p1 = params[:1, 0].detach().requires_grad_()
    got = torch.autograd.grad(fam.forward(z[:, 0], p1)[0].sum(), p1)[0]
    ref = torch.autograd.grad(fam._forward_ops(z[:, 0], p1.expand(10, -1))[0].sum(), p1)[0]
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_masked_mlp_returns_the_row_major_values_parameter_major():
    net = MaskedMLP(4, 5, (64, 64)).double()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    for n, block_rows in ((7, 1024), (2048, 1024), (7, 1)):  # dense and block products
        for m in (net.hidden[0], net.hidden[2], net.out):
            m.block_rows = block_rows
        z = torch.randn(n, 4, dtype=torch.float64)
        out = net(z)
        ref = net._clamp(torch.nn.functional.linear(net.hidden(z), net.out.weight * net.out.mask,
                                                    net.out.bias)).unflatten(-1, (4, 5))
        assert out.shape == (n, 4, 5) and torch.allclose(out, ref, atol=1e-13)
        assert out.permute(1, 2, 0).is_contiguous()  # every parameter a contiguous row
    assert net(torch.randn(2, 3, 4, dtype=torch.float64)).shape == (2, 3, 4, 5)
    assert net(torch.randn(4, dtype=torch.float64)).shape == (4, 5)


def test_flow_training_gradient_matches_the_plain_path(monkeypatch):
    """A whole reverse-KL step: every parameter's gradient as with plain autograd."""
    torch.manual_seed(0)
    flow = krflows.KRFlow(4, layers=2, hidden=(16,)).double()
    for p in flow.parameters():
        torch.nn.init.normal_(p, std=0.3)
    target = krflows.targets.Funnel(4)
    z = torch.randn(64, 4, dtype=torch.float64) * 2

    def grads():
        flow.zero_grad()
        x, log_q, _ = flow.push(z)
        (log_q - target.log_prob(x)).mean().backward()
        return [p.grad.clone() for p in flow.parameters()]

    got = grads()
    monkeypatch.setattr(Spline, "forward", Spline._forward_ops)
    ref = grads()
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
