"""The OT toolbox: closed-form Gaussian W2, displacement interpolation, entropic plans, Langevin."""

import math

import pytest
import torch
from conftest import make_flow, randomized
from torch.autograd.functional import jacobian

import krflows
from krflows.exact import gaussian_brenier_map, gaussian_kr_map
from krflows.nn import MaskedMLP
from krflows.ot import (
    Interpolated,
    affine_transport_cost,
    barycentric_map,
    entropic_ot_gaussian,
    gaussian_ot_map,
    interpolate,
    interpolate_affine,
    mala,
    sinkhorn_divergence,
    sinkhorn_plan,
    ula,
    wasserstein2_gaussian,
)
from krflows.ot.gaussian import sqrtm_psd
from krflows.transforms import AutoregressiveTransform, LowerAffineTransform
from krflows.transforms.monotone import FAMILIES

F64 = torch.float64
D = 3


def _spd(d, seed, jitter=0.3):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=F64)
    return A @ A.T + jitter * torch.eye(d, dtype=F64), torch.randn(d, generator=g, dtype=F64)


# ---------------------------------------------------------------------------------------------
# Gaussian W2


def test_w2_gaussian_known_values():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    w = wasserstein2_gaussian([1.0], [[4.0]], [-2.0], [[9.0]])
    assert abs(float(w) - math.sqrt(9 + 1)) < 1e-6
    # commuting (diagonal) covariances: sum over coordinates
    w2 = wasserstein2_gaussian(torch.zeros(2, dtype=F64), torch.diag(torch.tensor([1.0, 4.0], dtype=F64)),
                               torch.ones(2, dtype=F64), torch.diag(torch.tensor([9.0, 1.0], dtype=F64)),
                               squared=True)
    assert abs(float(w2) - (2 + 4 + 1)) < 1e-12
    # symmetric, zero on the diagonal, batched
    S1, m1 = _spd(3, 0)
    S2, m2 = _spd(3, 1)
    assert abs(float(wasserstein2_gaussian(m1, S1, m2, S2) - wasserstein2_gaussian(m2, S2, m1, S1))) < 1e-10
    assert float(wasserstein2_gaussian(m1, S1, m1, S1, squared=True)) < 1e-12
    batch = wasserstein2_gaussian(torch.stack([m1, m2]), torch.stack([S1, S2]), m1, S1)
    assert batch.shape == (2,) and float(batch[0]) < 1e-5


def test_w2_gaussian_input_checks():
    S, m = _spd(2, 0)
    with pytest.raises(ValueError, match="shape"):
        wasserstein2_gaussian(m, S, m, torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match="symmetric"):
        wasserstein2_gaussian(m, S + torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=F64), m, S)
    with pytest.raises(ValueError, match="semi-definite"):
        wasserstein2_gaussian(m, -S, m, S)
    with pytest.raises(ValueError, match="dimension"):
        wasserstein2_gaussian(m, S, torch.zeros(3), torch.eye(3))


def test_brenier_map_attains_w2():
    S1, m1 = _spd(D, 2)
    S2, m2 = _spd(D, 3)
    T = gaussian_ot_map(m1, S1, m2, S2)
    A = T.matrix
    assert torch.allclose(A, A.T) and torch.linalg.eigvalsh(A).min() > 0
    assert (A @ S1 @ A - S2).abs().max() < 1e-10  # pushes N(m1, S1) to N(m2, S2)
    w2 = wasserstein2_gaussian(m1, S1, m2, S2, squared=True)
    assert abs(float(affine_transport_cost(T, m1, S1) - w2)) < 1e-10 * float(w2)
    # Monte Carlo: E |x - T(x)|^2 under N(m1, S1)
    x = m1 + torch.randn(100_000, D, dtype=F64) @ torch.linalg.cholesky(S1).T
    c = ((x - T(x)) ** 2).sum(-1)
    assert abs(float(c.mean() - w2)) < 5 * float(c.std()) / math.sqrt(c.numel())
    # from N(0, I) it is krflows.exact.gaussian_brenier_map
    T0 = gaussian_ot_map(torch.zeros(D, dtype=F64), torch.eye(D, dtype=F64), m2, S2)
    assert torch.allclose(T0.matrix, gaussian_brenier_map(m2, S2).matrix, atol=1e-10)


def test_kr_map_costs_more_than_brenier_for_a_correlated_target():
    m, S = torch.tensor([1.0, -1.0], dtype=F64), torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=F64)
    I, zero = torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64)
    w2 = float(wasserstein2_gaussian(zero, I, m, S, squared=True))
    kr, brenier = gaussian_kr_map(m, S), gaussian_brenier_map(m, S)
    assert torch.allclose(kr.tril @ kr.tril.T, S) and torch.allclose(brenier.matrix @ brenier.matrix.T, S)
    assert abs(float(affine_transport_cost(brenier, zero, I)) - w2) < 1e-12
    assert float(affine_transport_cost(kr, zero, I)) > w2 + 0.1
    # independent coordinates: the two maps coincide and both are optimal
    D2 = torch.diag(torch.tensor([4.0, 0.25], dtype=F64))
    w2d = float(wasserstein2_gaussian(zero, I, m, D2, squared=True))
    assert abs(float(affine_transport_cost(gaussian_kr_map(m, D2), zero, I)) - w2d) < 1e-12


# ---------------------------------------------------------------------------------------------
# Displacement interpolation: the transform battery on Interpolated


def _layer(name):
    fam = FAMILIES[name]()
    net = randomized(MaskedMLP(D, fam.n_params, (16,)).double(), std=0.4, seed=1)
    return AutoregressiveTransform(net, fam, D)


def _lower_affine():
    S, m = _spd(D, 4)
    return gaussian_kr_map(m, S)


BASES = {"lower-affine": _lower_affine, "layer-bernstein": lambda: _layer("bernstein"),
         "flow-spline": lambda: make_flow("spline", D).triangular}


CASES = [("lower-affine", t) for t in (0.0, 0.3, 0.8, 1.0)] + [
    ("layer-bernstein", 0.5), ("flow-spline", 0.6), ("flow-spline", 1.0)]


@pytest.fixture(params=CASES,
                ids=lambda p: f"{p[0]}-t{p[1]}")
def interpolated(request):
    name, t = request.param
    return Interpolated(BASES[name](), t)


def _points(n):
    return (torch.randn(n, D, dtype=F64) * 3).clamp(-8, 8)


def test_interpolated_round_trip(interpolated):
    z = _points(32)
    x = interpolated(z)
    # (at t = 1 the inverse is the flow's own, as accurate as the transform battery asks)
    tol = 1e-6 if interpolated.t == 1.0 else 1e-9
    assert (interpolated.inv(x) - z).abs().max() <= tol
    assert interpolated.inverse_residual(x).max() <= tol


def test_interpolated_jacobian_triangular_and_log_diag(interpolated):
    for z in _points(3):
        J = jacobian(lambda v: interpolated(v), z)
        assert torch.all(torch.triu(J, 1) == 0), f"strict upper triangle not zero:\n{J}"
        assert torch.all(torch.diagonal(J) > 0)
        _, log_diag = interpolated.call_and_log_diag(z)
        assert torch.allclose(log_diag, torch.log(torch.diagonal(J)), atol=1e-8, rtol=0)
        _, log_diag_inv = interpolated.inverse_and_log_diag(interpolated(z))
        assert torch.allclose(log_diag_inv, log_diag, atol=1e-8, rtol=0)


def test_interpolated_inverse_jacobian_is_implicit(interpolated):
    z = _points(1)[0]
    x = interpolated(z)
    J = jacobian(lambda v: interpolated(v), z)
    Jinv = jacobian(lambda v: interpolated.inv(v), x)
    assert torch.allclose(Jinv @ J, torch.eye(D, dtype=F64), atol=1e-8)


def test_interpolated_is_the_mixture_of_identity_and_map():
    T = _layer("integrated")
    z = _points(16)
    assert torch.allclose(Interpolated(T, 0.25)(z), 0.75 * z + 0.25 * T(z))
    with pytest.raises(ValueError, match="t must be in"):
        Interpolated(T, 1.5)
    with pytest.raises(ValueError, match="TriangularTransform"):
        Interpolated(gaussian_brenier_map(torch.zeros(2), torch.eye(2)), 0.5)


@pytest.mark.parametrize("order", [None, [2, 0, 1]])
def test_interpolate_flow_law(order):
    flow = make_flow("spline", D, order=order)
    x = interpolate(flow, 0.5).sample((5,))
    assert x.shape == (5, D)
    # t = 1 is the flow itself, t = 0 the reference
    x = flow.sample((32,)).detach()
    assert torch.allclose(interpolate(flow, 1.0).log_prob(x), flow.log_prob(x), atol=1e-8)
    assert torch.allclose(interpolate(flow, 0.0).log_prob(x), flow.base.log_prob(x), atol=1e-12)
    # change of variables at t = 0.4, in the user's variable order
    law, Tt = interpolate(flow, 0.4), Interpolated(flow.triangular, 0.4)
    z = torch.randn(32, D, dtype=F64)
    y, log_diag = Tt.call_and_log_diag(z)
    x = y if order is None else y[..., torch.argsort(torch.tensor(order))]
    assert torch.allclose(law.log_prob(x), flow.base.log_prob(z) - log_diag.sum(-1), atol=1e-8)


def test_brenier_interpolation_is_a_w2_geodesic_and_kr_is_not():
    S, m = _spd(D, 5, jitter=0.5)
    zero, I = torch.zeros(D, dtype=F64), torch.eye(D, dtype=F64)

    def law(T, t):
        Tt = interpolate_affine(T, t)
        B = Tt.tril if isinstance(Tt, LowerAffineTransform) else Tt.matrix
        return Tt.shift, B @ B.T

    brenier, kr = gaussian_brenier_map(m, S), gaussian_kr_map(m, S)
    w_full = wasserstein2_gaussian(zero, I, m, S)
    for t in (0.2, 0.5, 0.9):
        mt, St = law(brenier, t)
        assert abs(float(wasserstein2_gaussian(zero, I, mt, St) - t * w_full)) < 1e-9
        assert abs(float(wasserstein2_gaussian(mt, St, m, S) - (1 - t) * w_full)) < 1e-9
        mt, St = law(kr, t)
        detour = wasserstein2_gaussian(zero, I, mt, St) + wasserstein2_gaussian(mt, St, m, S)
        assert float(detour - w_full) > 1e-4  # strict triangle inequality (>= 1.7e-3 here): no geodesic


def test_kr_interpolation_pushforward_moments():
    S, m = _spd(D, 6)
    T = gaussian_kr_map(m, S)
    t = 0.6
    Tt = Interpolated(T, t)
    B = (1 - t) * torch.eye(D, dtype=F64) + t * T.tril
    z = torch.randn(8, D, dtype=F64)
    assert torch.allclose(Tt(z), interpolate_affine(T, t)(z), atol=1e-12)
    x = Tt(torch.randn(200_000, D, dtype=F64))
    cov = B @ B.T
    se = (torch.diagonal(cov) / x.shape[0]).sqrt()
    assert ((x.mean(0) - t * m).abs() < 5 * se).all()
    assert (torch.cov(x.T) - cov).abs().max() < 0.03 * cov.abs().max()


# ---------------------------------------------------------------------------------------------
# Entropic OT between sample sets


def test_sinkhorn_plan_marginals_and_large_eps_gives_the_mean():
    x, y = torch.randn(60, 2, dtype=F64), torch.randn(80, 2, dtype=F64) * 2 + 3
    P = sinkhorn_plan(x, y, eps=1.0)
    assert P.shape == (60, 80)
    assert (P.sum(1) - 1 / 60).abs().max() < 1e-6 and (P.sum(0) - 1 / 80).abs().max() < 1e-6
    T = barycentric_map(x, y, sinkhorn_plan(x, y, eps=1e5))
    assert (T - y.mean(0)).abs().max() < 1e-2


def test_small_eps_in_1d_approaches_the_monotone_rearrangement():
    g = torch.Generator().manual_seed(0)
    n = 50
    x = torch.randn(n, 1, generator=g, dtype=F64).sort(0).values
    y = torch.distributions.Gamma(2.0, 1.0).sample((n, 1)).to(F64).sort(0).values
    # the monotone rearrangement sends the i-th smallest x to the i-th smallest y
    errors = {}
    for eps in (1.0, 0.1, 0.01):
        T = barycentric_map(x, y, sinkhorn_plan(x, y, eps, tol=1e-6))
        assert (T.diff(dim=0) >= -1e-9).all()  # monotone at every eps
        errors[eps] = float((T - y).abs().mean())
    assert errors[0.01] < 0.6 * errors[0.1] < 0.6 * errors[1.0], errors
    assert errors[0.01] < 0.05 * float(y.std()), errors


def test_plan_splits_a_middle_point_between_two_modes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(101, 1, generator=g, dtype=F64).sort(0).values
    x[50] = 0.0  # the median point
    sign = torch.where(torch.arange(100) < 50, -1.0, 1.0).to(F64).unsqueeze(-1)
    y = 3 * sign + 0.3 * torch.randn(100, 1, generator=g, dtype=F64)
    P = sinkhorn_plan(x, y, eps=1.0)
    row = P[50] / P[50].sum()
    left, right = float(row[y[:, 0] < 0].sum()), float(row[y[:, 0] > 0].sum())
    assert left > 0.25 and right > 0.25, (left, right)
    # and the barycentric map sends it into the valley, where the target has no mass
    assert abs(float(barycentric_map(x, y, P)[50])) < 1.5


def test_sinkhorn_input_checks():
    with pytest.raises(ValueError, match="shapes"):
        sinkhorn_plan(torch.zeros(3, 2), torch.zeros(3, 1), 1.0)
    with pytest.raises(ValueError, match="eps"):
        sinkhorn_plan(torch.zeros(3, 1), torch.zeros(3, 1), 0.0)
    with pytest.raises(ValueError, match="plan"):
        barycentric_map(torch.zeros(3, 1), torch.zeros(4, 1))


# ---------------------------------------------------------------------------------------------
# Sinkhorn divergence and the entropic OT cost of Gaussians

M1, S1 = torch.zeros(2, dtype=F64), torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=F64)
M2, S2 = torch.tensor([1.0, -0.5], dtype=F64), torch.tensor([[1.0, 1.2], [1.2, 2.25]], dtype=F64)


def _grid_gaussian(m, S, n, width=6.0):
    """A tensor grid of N(m, S) (the image of a square grid under m + L u) and its weights."""
    u = torch.linspace(-width, width, n, dtype=F64)
    U = torch.cartesian_prod(u, u)
    return m + U @ torch.linalg.cholesky(S).T, torch.exp(-0.5 * (U**2).sum(1))


def _moment_matched(n, m, S, g):
    """``n`` draws of N(m, S) whose sample mean and (biased) covariance are exactly m and S."""
    u = torch.randn(n, 2, generator=g, dtype=F64)
    u = u - u.mean(0)
    u = u @ torch.linalg.inv(sqrtm_psd(u.T @ u / n))
    return m + u @ torch.linalg.cholesky(S).T


def test_entropic_ot_gaussian_matches_sinkhorn_on_a_quadrature_grid():
    # oracle: Sinkhorn between two weighted grids discretizing the Gaussians (no sampling error)
    X1, w1 = _grid_gaussian(M1, S1, 20)
    X2, w2 = _grid_gaussian(M2, S2, 20)
    for eps in (1.0, 3.0):
        numeric = sinkhorn_divergence(X1, X2, eps, w1, w2, tol=1e-10)
        closed = entropic_ot_gaussian(M1, S1, M2, S2, eps, debiased=True)
        assert abs(float(numeric - closed)) < 1e-6, (eps, float(numeric), float(closed))


def test_entropic_ot_gaussian_limits():
    w2sq = wasserstein2_gaussian(M1, S1, M2, S2, squared=True)
    assert abs(float(entropic_ot_gaussian(M1, S1, M2, S2, 1e-6) - w2sq)) < 1e-4
    assert abs(float(entropic_ot_gaussian(M1, S1, M2, S2, 1e-6, debiased=True) - w2sq)) < 1e-4
    independent = ((M1 - M2) ** 2).sum() + torch.trace(S1) + torch.trace(S2)
    assert abs(float(entropic_ot_gaussian(M1, S1, M2, S2, 1e6) - independent)) < 1e-4
    # debiased, eps -> inf: the squared distance of the means
    assert abs(float(entropic_ot_gaussian(M1, S1, M2, S2, 1e6, debiased=True)) - 1.25) < 1e-4
    with pytest.raises(ValueError, match="eps"):
        entropic_ot_gaussian(M1, S1, M2, S2, 0.0)


def test_sinkhorn_divergence_is_zero_on_equal_sets_and_nonnegative():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 2, generator=g, dtype=F64)
    assert float(sinkhorn_divergence(x, x, 0.3)) == 0.0
    for k in range(5):
        y = torch.randn(60, 2, generator=g, dtype=F64) * (0.5 + 0.3 * k)
        for eps in (0.2, 1.0, 30.0):
            assert float(sinkhorn_divergence(x, y, eps, tol=1e-6)) >= -1e-7  # measured min 0.012


def test_sinkhorn_divergence_of_a_shift_is_the_squared_shift():
    # |x_i - x_j - c|^2 = |x_i - x_j|^2 + |c|^2 + (a function of i) + (a function of j): the
    # separable terms only move the potentials, so S_eps(x, x + c) = |c|^2 exactly, at every eps
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, 2, generator=g, dtype=F64)
    c = torch.tensor([1.0, -2.0], dtype=F64)
    for eps in (0.3, 1.0, 100.0):
        assert abs(float(sinkhorn_divergence(x, x + c, eps)) - 5.0) < 1e-5


def test_sinkhorn_divergence_weights_equal_duplicated_points():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(30, 2, generator=g, dtype=F64), torch.randn(20, 2, generator=g, dtype=F64) + 1
    w = torch.arange(1, 21, dtype=F64)
    repeated = y.repeat_interleave(w.long(), dim=0)
    assert abs(float(sinkhorn_divergence(x, y, 0.5, b=w) - sinkhorn_divergence(x, repeated, 0.5))) < 1e-6


def test_sinkhorn_divergence_of_gaussian_samples_approaches_w2():
    # moment-matched samples (exact sample mean and covariance) remove the O(n^-1/2) sampling error
    # of the means and covariances, which would otherwise dominate (about ±0.2 at n = 300); what is
    # left is the discreteness of n = 400 points, measured at +0.03..+0.05 (2%) over 4 seeds
    g = torch.Generator().manual_seed(0)
    x, y = _moment_matched(400, M1, torch.eye(2, dtype=F64), g), _moment_matched(400, M2, S2, g)
    w2sq = float(wasserstein2_gaussian(M1, torch.eye(2, dtype=F64), M2, S2, squared=True))
    closed = float(entropic_ot_gaussian(M1, torch.eye(2, dtype=F64), M2, S2, 0.2, debiased=True))
    assert abs(closed - w2sq) < 2e-3  # at eps = 0.2 the Gaussians' S_eps is already W2^2 to 0.1%
    s = float(sinkhorn_divergence(x, y, 0.2, tol=1e-6))
    assert abs(s - closed) < 0.04 * w2sq, (s, closed, w2sq)


def test_sinkhorn_divergence_input_checks():
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="shapes"):
        sinkhorn_divergence(x, torch.zeros(3, 1), 1.0)
    with pytest.raises(ValueError, match="shapes"):
        sinkhorn_divergence(x[0], x, 1.0)
    with pytest.raises(ValueError, match="eps"):
        sinkhorn_divergence(x, x, -1.0)
    with pytest.raises(ValueError, match="at least one"):
        sinkhorn_divergence(x[:0], x, 1.0)
    with pytest.raises(ValueError, match="finite"):
        sinkhorn_divergence(x, torch.full((3, 2), math.nan), 1.0)
    with pytest.raises(ValueError, match="weights"):
        sinkhorn_divergence(x, x, 1.0, a=torch.ones(4))


# ---------------------------------------------------------------------------------------------
# Langevin


M = torch.tensor([1.0, -1.0], dtype=F64)
COV = torch.tensor([[1.0, 0.5], [0.5, 2.0]], dtype=F64)


def _gaussian_target():
    return krflows.targets.Gaussian(M, COV).double()


def test_ula_converges_to_its_biased_stationary_law():
    h, n = 0.3, 10_000
    out = ula(_gaussian_target(), torch.randn(n, 2, dtype=F64), h, 100,
              generator=torch.Generator().manual_seed(0))
    # the exact stationary covariance of ULA on N(m, S): S (I - h/2 S^{-1})^{-1}
    biased = COV @ torch.linalg.inv(torch.eye(2, dtype=F64) - 0.5 * h * torch.linalg.inv(COV))
    cov = torch.cov(out.x.T)
    se = (2 / n) ** 0.5 * torch.diagonal(biased).max()
    assert (out.x.mean(0) - M).abs().max() < 5 * (2.5 / n) ** 0.5
    assert (cov - biased).abs().max() < 5 * se
    assert (cov - COV).abs().max() > 3 * se  # the O(h) bias is visible
    assert out.acceptance == 1.0 and out.trace is None


def test_mala_is_unbiased_and_reports_acceptance():
    n = 5_000
    target = lambda x: -0.5 * ((x - M) @ torch.linalg.inv(COV) * (x - M)).sum(-1)  # noqa: E731
    out = mala(target, torch.randn(n, 2, dtype=F64), 0.5, 150, trace=True,
               generator=torch.Generator().manual_seed(1))
    assert 0.3 < out.acceptance < 1
    assert out.trace.shape == (150, n, 2) and torch.equal(out.trace[-1], out.x)
    se = (2 / n) ** 0.5 * 2.0
    assert (out.x.mean(0) - M).abs().max() < 5 * (2.5 / n) ** 0.5
    assert (torch.cov(out.x.T) - COV).abs().max() < 5 * se


def test_mala_rejects_moves_out_of_the_support():
    target = lambda x: torch.where(x[..., 0] > 0, -0.5 * (x**2).sum(-1), -math.inf)  # noqa: E731
    x0 = torch.ones(500, 1, dtype=F64)
    out = mala(target, x0, 0.5, 50)
    assert (out.x > 0).all() and torch.isfinite(out.x).all()
    with pytest.raises(ValueError, match="step"):
        ula(target, x0, 0.0, 10)


def test_flow_interpolate_method_matches_the_function():
    import krflows
    from krflows.ot import interpolate

    torch.manual_seed(0)
    flow = krflows.KRFlow(2, layers=1, hidden=(8,)).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    assert torch.allclose(flow.interpolate(0.4).log_prob(x), interpolate(flow, 0.4).log_prob(x))


def test_points_of_zero_weight_are_left_out_of_the_solve():
    """A probe: zeros in both marginals sent POT's plain Sinkhorn to NaN and the fallback to an
    all-zero plan, so the divergence of any weighted set with a zero was wrong (its self-terms
    have zeros on both sides). Oracle: POT's log-domain Sinkhorn on the points of positive weight."""
    import ot

    from krflows.ot import sinkhorn_divergence, sinkhorn_plan

    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, generator=g, dtype=torch.float64)
    y = torch.randn(5, 1, generator=g, dtype=torch.float64)
    a = torch.tensor([0, 1, 1, 1, 1, 1.0], dtype=torch.float64)
    b = torch.tensor([1, 1, 1, 1, 0.0], dtype=torch.float64)
    plan = sinkhorn_plan(x, y, 0.5, a, b)
    assert float(plan[0].abs().sum()) == 0.0 and float(plan[:, 4].abs().sum()) == 0.0
    want = ot.sinkhorn((a[1:] / 5).numpy(), (b[:4] / 4).numpy(), ot.dist(x[1:].numpy(), y[:4].numpy()), 0.5,
                       method="sinkhorn_log", stopThr=1e-12, numItermax=10000)
    torch.testing.assert_close(plan[1:, :4], torch.from_numpy(want), atol=1e-8, rtol=0)
    subset = float(sinkhorn_divergence(x[1:], y, 0.5))
    assert float(sinkhorn_divergence(x, y, 0.5, a=a)) == pytest.approx(subset, abs=1e-8)
    with pytest.raises(ValueError, match="positive sum"):
        sinkhorn_plan(x, y, 0.5, torch.zeros(6, dtype=torch.float64))
