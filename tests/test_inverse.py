"""The safeguarded root finder, against closed forms."""

import torch

from krflows.inverse import solve_monotone


def cubic(z, p):
    return z**3 + p[..., 0] * z, torch.log(3 * z**2 + p[..., 0])


def test_roots_residuals_and_bracket_edges():
    # 30 = 3**3 + 3 lands exactly on an expanded bracket end; 1e6 needs many expansions
    y = torch.tensor([0.5, 30.0, -1e6, 1e6, 0.0], dtype=torch.float64)
    p = torch.ones(5, 1, dtype=torch.float64)
    z, res = solve_monotone(cubic, y, p, -1.0, 1.0)
    assert torch.allclose(z**3 + z, y, rtol=1e-12, atol=1e-12)
    assert z[1] == 3.0
    assert (res <= 1e-9 * (1 + y.abs())).all()


def test_nearly_flat_function_converges_by_bisection():
    """f = 1e-8 z + tanh(50 z): Newton overshoots on the plateau, the bracket saves it."""
    def f(z, p):
        return 1e-8 * z + torch.tanh(50 * z), torch.log(1e-8 + 50 / torch.cosh(50 * z) ** 2)
    y = torch.tensor([0.999, 0.0, -0.5], dtype=torch.float64)
    z, _ = solve_monotone(f, y, torch.zeros(3, 1, dtype=torch.float64), -1.0, 1.0)
    assert torch.allclose(f(z, None)[0], y, atol=1e-10)


def test_implicit_gradients_match_the_closed_form():
    """z = cbrt-like root of z^3 + a z = y: dz/dy = 1/f', dz/da = -z/f'."""
    y = torch.tensor([2.0, -7.0], dtype=torch.float64, requires_grad=True)
    a = torch.tensor([[1.5], [0.5]], dtype=torch.float64, requires_grad=True)
    z, _ = solve_monotone(cubic, y, a, -1.0, 1.0)
    dy, da = torch.autograd.grad(z.sum(), (y, a))
    df = 3 * z.detach() ** 2 + a.detach()[:, 0]
    assert torch.allclose(dy, 1 / df, atol=1e-12)
    assert torch.allclose(da[:, 0], -z.detach() / df, atol=1e-12)


def test_float32_tolerance():
    y = torch.linspace(-100, 100, 1001)
    z, res = solve_monotone(cubic, y, torch.ones(1001, 1), -1.0, 1.0)
    assert torch.allclose(z**3 + z, y, rtol=1e-5, atol=1e-4)


def test_newton_steps_that_do_not_shrink_the_bracket_bisect():
    """A probe: on an interpolated flow, Newton steps stayed inside the bracket and cycled between
    z = -0.45 and -2.54 for all 100 iterations, so interpolate(0.7).log_prob was off by ~1 nat on
    a band of x with no warning. Oracle: the forward map T_t at the returned z, and quadrature."""
    from krflows import KRFlow

    torch.manual_seed(0)
    flow = KRFlow(1, layers=2, hidden=(16, 16)).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    dist = flow.interpolate(0.7)
    T = dist.transforms[0]
    x = torch.linspace(-0.56, -0.54, 41, dtype=torch.float64)[:, None]
    with torch.no_grad():
        assert float((T(T.inv(x)) - x).abs().max()) < 1e-10
        grid = torch.linspace(-25, 25, 100001, dtype=torch.float64)[:, None]
        assert abs(float(torch.trapezoid(dist.log_prob(grid).exp(), grid[:, 0])) - 1) < 1e-6
