"""The battery: every triangular map and its inverse, checked the same way in float64.

A new family or layer joins by being added to ``CASES``.
"""

import math

import pytest
import torch
from conftest import FAMILY_NAMES, make_flow, randomized
from torch.autograd.functional import jacobian

import krflows
from krflows.nn import MaskedLinear, MaskedMLP
from krflows.sparse import SparseKRFlow
from krflows.transforms import AutoregressiveTransform, LowerAffineTransform
from krflows.transforms.monotone import FAMILIES

D = 3


def _layer(name):
    def build():
        fam = FAMILIES[name]()
        net = randomized(MaskedMLP(D, fam.n_params, (16,)).double(), std=0.4, seed=1)
        return AutoregressiveTransform(net, fam, D)
    return build


def _lower_affine():
    g = torch.Generator().manual_seed(2)
    L = torch.tril(torch.randn(D, D, generator=g, dtype=torch.float64))
    L.diagonal().copy_(L.diagonal().abs() + 0.5)
    return LowerAffineTransform(torch.randn(D, generator=g, dtype=torch.float64), L)


def _layer_full_passes(name):
    """The same layer behind a plain callable: the inverse falls back to ``d`` full passes."""
    def build():
        layer = _layer(name)()
        net = layer.conditioner
        return AutoregressiveTransform(lambda z: net(z), layer.family, D)
    return build


def _blocked_flow(name):
    """A flow wide enough for block products, forced to use them at every batch size."""
    def build():
        flow = make_flow(name, D, hidden=(64, 64), std=0.1)  # 0.3 at fan-in 64: ill-conditioned
        layers = [m for m in flow.modules() if isinstance(m, MaskedLinear)]
        assert any(m.blocks for m in layers), "no layer of this flow uses block products"
        for m in layers:
            m.block_rows = 1
        return flow.triangular
    return build


def _sparse_flow(name, globals_, plates, **kw):
    """A randomized plate-sparse flow (globals, then plate members) of dimension ``D``."""
    def build():
        torch.manual_seed(0)
        flow = SparseKRFlow(globals_, plates, family=name, layers=2, hidden=(16,), embedding=3, **kw)
        return randomized(flow.double(), std=0.3, seed=4).triangular
    return build


CASES = {f"layer-{n}": _layer(n) for n in FAMILY_NAMES}
CASES.update({f"sparse-{n}-g1-J2": _sparse_flow(n, 1, [(2, 1)]) for n in FAMILY_NAMES})
CASES["sparse-spline-g0-J1m3"] = _sparse_flow("spline", 0, [(1, 3)])
CASES["sparse-spline-g1-J1m2"] = _sparse_flow("spline", 1, [(1, 2)])
CASES["sparse-affine-g2-J1"] = _sparse_flow("affine", 2, [(1, 1)])
_FEATURES = torch.randn(2, 2, generator=torch.Generator().manual_seed(5))
CASES["sparse-spline-two-plates-features"] = _sparse_flow("spline", 0, [(2, 1), (1, 1)],
                                                          features=[_FEATURES, None])
CASES.update({f"flow-{n}-blocked": _blocked_flow(n) for n in ("spline", "integrated")})
CASES.update({f"layer-{n}-full-passes": _layer_full_passes(n) for n in ("spline", "bernstein")})
CASES["lower-affine"] = _lower_affine
CASES.update({f"flow-{n}": (lambda n=n: make_flow(n, D).triangular) for n in FAMILY_NAMES})


@pytest.fixture(params=sorted(CASES))
def transform(request):
    return CASES[request.param]()


def _points(n=64, scale=8.0):
    z = torch.randn(n, D, dtype=torch.float64) * 3
    return z.clamp(-scale, scale)


def test_round_trip(transform):
    z = _points()
    z = torch.cat([z, torch.full((1, D), 8.0, dtype=torch.float64),
                   torch.full((1, D), -8.0, dtype=torch.float64)])
    x = transform(z)
    assert (transform.inv(x) - z).abs().max() <= 1e-6


@pytest.mark.parametrize("i", range(4))
def test_jacobian_lower_triangular_with_positive_diagonal(transform, i):
    z = _points(4)[i]
    J = jacobian(lambda v: transform(v), z)
    assert torch.all(torch.triu(J, 1) == 0), f"strict upper triangle not zero:\n{J}"
    assert torch.all(torch.diagonal(J) > 0)
    _, log_diag = transform.call_and_log_diag(z)
    assert torch.allclose(log_diag, torch.log(torch.diagonal(J)), atol=1e-6, rtol=0)
    ladj = transform.log_abs_det_jacobian(z, transform(z))
    assert abs(ladj - torch.log(torch.diagonal(J)).sum()) <= 1e-6


def test_inverse_log_diag_and_jacobian(transform):
    """The inverse's Jacobian (through implicit gradients) is the inverse of the forward one."""
    z = _points(2)[0]
    x = transform(z)
    J = jacobian(lambda v: transform(v), z)
    Jinv = jacobian(lambda v: transform.inv(v), x)
    assert torch.allclose(Jinv @ J, torch.eye(D, dtype=torch.float64), atol=1e-6)
    _, log_diag = transform.inverse_and_log_diag(x)
    assert torch.allclose(log_diag, torch.log(torch.diagonal(J)), atol=1e-6)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_log_prob_is_change_of_variables(family):
    flow = make_flow(family, D, order=[2, 0, 1])
    x = flow.sample((5,))
    for xi, lp in zip(x, flow.log_prob(x), strict=True):
        Js = jacobian(flow.inverse, xi)
        z = flow.inverse(xi)
        ref = -0.5 * (z @ z) - 0.5 * D * math.log(2 * math.pi) + torch.linalg.slogdet(Js)[1]
        assert abs(lp - ref) <= 1e-6


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_order_is_applied_once_outside(family):
    order = [2, 0, 1]
    flow = make_flow(family, D, order=order)
    z = torch.randn(D, dtype=torch.float64)
    J = jacobian(flow, z)[order]  # rows in flow order
    assert torch.all(torch.triu(J, 1) == 0)
    assert (flow.transform.inv(flow.transform(z)) - z).abs().max() < 1e-8
    assert "order=[2, 0, 1]" in repr(flow)


@pytest.mark.parametrize("family", ["bernstein", "integrated"])
def test_implicit_gradient_matches_finite_differences(family):
    """Gradients of log q(x) w.r.t. parameters flow through the root finder correctly."""
    flow = make_flow(family, 2)
    x = torch.tensor([[0.3, -1.2], [2.0, 0.7]], dtype=torch.float64)
    p = flow.conditioners[0].out.bias
    flow.log_prob(x).sum().backward()
    grad = p.grad.clone()
    eps = 1e-6
    for j in range(p.numel()):
        with torch.no_grad():
            p.view(-1)[j] += eps
            up = flow.log_prob(x).sum()
            p.view(-1)[j] -= 2 * eps
            down = flow.log_prob(x).sum()
            p.view(-1)[j] += eps
        assert abs((up - down) / (2 * eps) - grad.view(-1)[j]) < 1e-5


def test_spline_matches_nflows_kernel_inside_the_box():
    """Oracle: nflows' rational-quadratic kernel (boundary slopes are learned in both)."""
    splines = pytest.importorskip("nflows.transforms.splines.rational_quadratic")
    fam = FAMILIES["spline"](bins=8, bound=5.0, affine=False)
    g = torch.Generator().manual_seed(3)
    params = torch.randn(200, fam.n_params, generator=g, dtype=torch.float64)
    z = (torch.rand(200, generator=g, dtype=torch.float64) * 2 - 1) * 4.99
    x, log_d = fam.forward(z, params)
    K = fam.bins
    c = math.log(math.expm1(1 - fam.min_slope))
    ref, ref_ld = splines.rational_quadratic_spline(
        z, params[:, :K], params[:, K:2 * K], params[:, 2 * K:] + c, inverse=False,
        left=-5.0, right=5.0, bottom=-5.0, top=5.0, min_bin_width=fam.min_width,
        min_bin_height=fam.min_width, min_derivative=fam.min_slope)
    assert torch.allclose(x, ref, atol=1e-10)
    assert torch.allclose(log_d, ref_ld, atol=1e-8)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_zero_parameters_give_the_identity(family):
    flow = krflows.KRFlow(D, family=family, layers=2, hidden=(8,)).double()
    z = torch.randn(10, D, dtype=torch.float64) * 4
    assert torch.allclose(flow(z), z, atol=1e-12)


@pytest.mark.parametrize("dim, hidden", [(1, (8,)), (2, ()), (3, (16,)), (10, (64, 64)), (5, (7, 9, 11))])
def test_masked_mlp_coordinate_equals_the_full_pass(dim, hidden):
    """Oracle: the full network. ``coordinate(z[:, :i], i)`` is row ``i`` of ``net(z)``, values
    and parameter gradients, and does not read ``z[:, i:]``."""
    net = randomized(MaskedMLP(dim, 4, hidden).double(), std=0.5, seed=dim)
    z = torch.randn(6, dim, dtype=torch.float64)
    full = net(z)
    for i in range(dim):
        part = net.coordinate(z[:, :i], i)
        assert part.shape == (6, 4)
        assert torch.allclose(part, full[:, i], atol=1e-12)
        g_part = torch.autograd.grad(part.square().sum(), list(net.parameters()), allow_unused=True)
        g_full = torch.autograd.grad(net(z)[:, i].square().sum(), list(net.parameters()))
        for a, b in zip(g_part, g_full, strict=True):
            assert torch.allclose(torch.zeros_like(b) if a is None else a, b, atol=1e-12)


def test_incremental_inverse_matches_the_full_pass_inverse():
    """The one-coordinate-per-pass inverse and the generic ``d``-full-passes inverse agree."""
    layer = _layer("spline")()
    generic = _layer_full_passes("spline")()
    x = _points(200)
    z1, ld1 = layer.inverse_and_log_diag(x)
    z2, ld2 = generic.inverse_and_log_diag(x)
    assert torch.allclose(z1, z2, atol=1e-12) and torch.allclose(ld1, ld2, atol=1e-12)


@pytest.mark.parametrize("shape", [(64, 8), (270, 64), (64, 64)])
def test_block_products_equal_the_dense_masked_product(shape):
    """Oracle: the dense masked product. Block products skip only masked-out weights."""
    rows, cols = shape
    g = torch.Generator().manual_seed(rows)
    prefix = torch.sort(torch.randint(0, cols + 1, (rows,), generator=g)).values
    layer = MaskedLinear((torch.arange(cols) < prefix[:, None]).double()).double()
    randomized(layer, std=0.5, seed=cols)
    x = torch.randn(2000, cols, dtype=torch.float64, generator=g)
    dense = torch.nn.functional.linear(x, layer.weight * layer.mask, layer.bias)
    out = layer(x)
    assert bool(layer.blocks) == (rows * cols >= 2048)
    assert torch.allclose(out, dense, atol=1e-12)
    g1 = torch.autograd.grad(out.square().sum(), [layer.weight, layer.bias])
    g2 = torch.autograd.grad(dense.square().sum(), [layer.weight, layer.bias])
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(g1, g2, strict=True))


def test_transposed_block_products_and_their_gradients_equal_the_dense_masked_product():
    """``forward_t`` (eager: one autograd Function writing each block into its rows) against the
    dense masked product: values, the gradients of input, weight and bias, and second order."""
    g = torch.Generator().manual_seed(3)
    prefix = torch.sort(torch.randint(0, 65, (270,), generator=g)).values
    layer = MaskedLinear((torch.arange(64) < prefix[:, None]).double()).double()
    randomized(layer, std=0.5, seed=1)
    assert layer.blocks
    x = torch.randn(2000, 64, dtype=torch.float64, generator=g, requires_grad=True)
    out = layer.forward_t(x)
    dense = torch.nn.functional.linear(x, layer.weight * layer.mask, layer.bias).T
    assert out.is_contiguous() and torch.allclose(out, dense, atol=1e-12)
    seed = torch.randn(out.shape, dtype=torch.float64, generator=g)
    wrt = [x, layer.weight, layer.bias]
    for a, b in zip(torch.autograd.grad(out, wrt, seed), torch.autograd.grad(dense, wrt, seed), strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    small = MaskedLinear((torch.arange(64) < prefix[::4, None]).double()).double()
    small.block_rows = 1
    assert small.blocks
    randomized(small, std=0.5, seed=2)
    xs = torch.randn(5, 64, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(small.forward_t, (xs,))
    assert torch.autograd.gradgradcheck(small.forward_t, (xs,))


def test_non_prefix_masks_use_the_dense_product():
    mask = torch.ones(64, 64)
    mask[3, 0] = 0  # row 3 is no longer a prefix
    assert MaskedLinear(mask).blocks == []


def test_soft_clamp_is_b_tanh_with_exact_derivatives():
    """Oracle: ``b * tanh(x / b)`` and its autograd derivatives (first and second order)."""
    from krflows.nn import SoftClamp

    x = torch.linspace(-40, 40, 201, dtype=torch.float64, requires_grad=True)
    y = SoftClamp.apply(x, 8.0)
    ref = 8.0 * torch.tanh(x / 8.0)
    assert torch.allclose(y, ref, atol=1e-13)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (g_ref,) = torch.autograd.grad(ref.sum(), x, create_graph=True)
    assert torch.allclose(g, g_ref, atol=1e-13)
    assert torch.allclose(torch.autograd.grad(g.sum(), x)[0], torch.autograd.grad(g_ref.sum(), x)[0],
                          atol=1e-12)
    assert bool((y.abs() < 8.0).all())
