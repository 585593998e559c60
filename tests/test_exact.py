"""Exact reference maps against independent oracles (closed forms, scipy), in float64."""

import doctest
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.autograd.functional import jacobian

import krflows.exact
from krflows.exact import KR1D, KR2D, gaussian_brenier_map, gaussian_kr_map

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bisect_quantile(cdf, q: np.ndarray, lo: float = -20.0, hi: float = 20.0) -> np.ndarray:
    """Quantiles of a scalar CDF by plain bisection (an oracle independent of krflows)."""
    lo, hi = np.full_like(q, lo), np.full_like(q, hi)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        below = cdf(mid) < q
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return 0.5 * (lo + hi)


def _check_sample_moments(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor):
    # n = 200000 (or 20000 in 2-D): these tolerances are > 5 standard errors.
    tol = 6 * math.sqrt(2 / x.shape[0]) * cov.diagonal().max()
    assert torch.allclose(x.mean(0), mean, atol=tol)
    assert torch.allclose(torch.cov(x.T), cov, atol=2 * tol)


# ---------------------------------------------------------------------------------------------
# Gaussian maps

MEAN = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
COV = torch.tensor([[2.0, 0.8, -0.5], [0.8, 1.0, 0.3], [-0.5, 0.3, 1.5]], dtype=F64)


def test_gaussian_kr_map_jacobian_is_the_cholesky_factor():
    T = gaussian_kr_map(MEAN, COV)
    L = torch.linalg.cholesky(COV)
    for z in torch.randn(5, 3, dtype=F64, generator=_gen(0)):
        J = jacobian(T, z)
        assert torch.equal(torch.triu(J, 1), torch.zeros_like(J))
        torch.testing.assert_close(J, L, rtol=0, atol=1e-12)
    assert T.shift.dtype == F64 and T.tril.dtype == F64


def test_gaussian_brenier_map_jacobian_is_the_symmetric_root():
    T = gaussian_brenier_map(MEAN, COV)
    J = jacobian(T, torch.zeros(3, dtype=F64))
    torch.testing.assert_close(J, J.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(J @ J, COV, rtol=0, atol=1e-12)
    assert torch.linalg.eigvalsh(J).min() > 0


@pytest.mark.parametrize("make", [gaussian_kr_map, gaussian_brenier_map])
def test_gaussian_maps_push_forward_and_invert(make):
    T = make(MEAN, COV)
    z = torch.randn(200_000, 3, dtype=F64, generator=_gen(1))
    x = T(z)
    _check_sample_moments(x, MEAN, COV)
    torch.testing.assert_close(T.inv(x), z, rtol=0, atol=1e-10)


def test_kr_and_brenier_maps_differ_for_a_correlated_cov():
    z = torch.randn(100, 3, dtype=F64, generator=_gen(2))
    gap = (gaussian_kr_map(MEAN, COV)(z) - gaussian_brenier_map(MEAN, COV)(z)).abs().max()
    assert gap > 0.1
    # ...and coincide for a diagonal one.
    diag = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=F64))
    torch.testing.assert_close(gaussian_kr_map(MEAN, diag)(z), gaussian_brenier_map(MEAN, diag)(z))


def test_gaussian_maps_accept_array_likes_and_keep_dtype():
    T = gaussian_kr_map([0.0, 1.0], [[4.0, 2.0], [2.0, 2.0]])
    assert T.tril.dtype == torch.get_default_dtype()
    torch.testing.assert_close(T.tril, torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
    T = gaussian_brenier_map(np.zeros(2), np.eye(2) * 4.0)
    assert T.matrix.dtype == F64
    torch.testing.assert_close(T.matrix, 2 * torch.eye(2, dtype=F64))


@pytest.mark.parametrize("make", [gaussian_kr_map, gaussian_brenier_map])
@pytest.mark.parametrize("mean, cov, match", [
    (torch.zeros(2, 2), torch.eye(2), r"mean must have shape \(d,\)"),
    (torch.zeros(2), torch.eye(3), r"cov must have shape \(2, 2\)"),
    (torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]), "symmetric"),
    (torch.zeros(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]), "positive definite"),
    (torch.tensor([0.0, math.nan]), torch.eye(2), "finite"),
])
def test_gaussian_maps_reject_bad_input(make, mean, cov, match):
    with pytest.raises(ValueError, match=match):
        make(mean, cov)


# ---------------------------------------------------------------------------------------------
# KR1D

M, S = 0.7, 1.3
W, MU, SD = np.array([0.3, 0.7]), np.array([-2.0, 2.5]), np.array([0.5, 0.8])


def mixture_log_prob(x: torch.Tensor) -> torch.Tensor:
    comp = torch.distributions.Normal(torch.tensor(MU), torch.tensor(SD))
    return torch.logsumexp(torch.tensor(W).log() + comp.log_prob(x), -1)


def mixture_pdf(x):
    return (W * stats.norm.pdf((np.asarray(x)[..., None] - MU) / SD) / SD).sum(-1)


def mixture_cdf(x):
    return (W * stats.norm.cdf((np.asarray(x)[..., None] - MU) / SD)).sum(-1)


def gap_log_prob(x: torch.Tensor) -> torch.Tensor:
    """p(x) ∝ c (|x| - 1)_+ φ(x), c = 1 for x < 0 and 2 for x > 0: zero on [-1, 1]."""
    x = x.squeeze(-1)
    return (torch.where(x > 0, 2.0, 1.0) * (x.abs() - 1).clamp_min(0)).log() - 0.5 * x**2


# ∫_a^∞ (t - 1) φ(t) dt = φ(a) - Φ(-a); the gap density has mass 1/3 left of the gap.
_A = stats.norm.pdf(1) - stats.norm.cdf(-1)


def gap_cdf(x):
    left = (stats.norm.pdf(x) - stats.norm.cdf(x)) / (3 * _A)
    right = (3 * _A - 2 * (stats.norm.pdf(x) - stats.norm.cdf(-x))) / (3 * _A)
    return np.where(x <= -1, left, np.where(x < 1, 1 / 3, right))


@pytest.fixture(scope="module")
def gauss1d():
    return KR1D.from_log_prob(lambda x: -0.5 * ((x - M) / S) ** 2, M - 12 * S, M + 12 * S)


@pytest.fixture(scope="module")
def mixture():
    return KR1D.from_log_prob(mixture_log_prob, -8.0, 10.0)


@pytest.fixture(scope="module")
def gap():
    return KR1D.from_log_prob(gap_log_prob, -9.0, 9.0, n=3601)


def test_kr1d_of_a_gaussian_is_affine(gauss1d):
    z = torch.linspace(-8, 8, 1601, dtype=F64).unsqueeze(-1)
    x, log_diag = gauss1d.call_and_log_diag(z)
    err = (x - (M + S * z)).abs()
    assert err[z.abs() <= 4].max() < 1e-4
    assert err.max() < 1e-3  # the tails keep their precision out to |z| = 8
    assert (log_diag - math.log(S)).abs()[z.abs() <= 4].max() < 1e-3
    assert abs(gauss1d.log_z.item() - math.log(S * math.sqrt(2 * math.pi))) < 1e-8


def test_kr1d_float32_matches_float64(gauss1d):
    z = torch.linspace(-8, 8, 101, dtype=F64).unsqueeze(-1)
    x32, ld32 = gauss1d.call_and_log_diag(z.float())
    assert x32.dtype == ld32.dtype == torch.float32
    x64, ld64 = gauss1d.call_and_log_diag(z)
    torch.testing.assert_close(x32.double(), x64, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ld32.double(), ld64, rtol=1e-6, atol=1e-5)


def test_kr1d_of_a_mixture_gives_its_quantiles(mixture):
    z = torch.linspace(-5, 5, 401, dtype=F64).unsqueeze(-1)
    exact = _bisect_quantile(mixture_cdf, stats.norm.cdf(z.numpy()))
    assert np.abs(mixture(z).numpy() - exact).max() < 1e-4
    # In distribution: KS statistic of exact samples (5% critical value ~ 0.0096).
    x = mixture.sample((20_000,), generator=_gen(3)).squeeze(-1).numpy()
    assert stats.kstest(x, mixture_cdf).statistic < 0.02
    assert abs(mixture.log_z.item()) < 1e-8  # the input was normalized


def test_kr1d_slope_is_steep_across_the_valley(mixture):
    xs = np.linspace(MU[0], MU[1], 20001)
    valley = xs[mixture_pdf(xs).argmin()]
    z = mixture.inv(torch.tensor([[valley]], dtype=F64))
    expected = stats.norm.pdf(z.item()) / mixture_pdf(valley)
    assert abs(mixture.slope(z).item() / expected - 1) < 1e-3
    at_modes = mixture.slope(mixture.inv(torch.tensor(MU).unsqueeze(-1)))
    assert mixture.slope(z).item() > 50 * at_modes.max().item()


def test_kr1d_round_trip_and_log_diag(mixture):
    z = torch.linspace(-8, 8, 1001, dtype=F64).unsqueeze(-1).requires_grad_()
    x, log_diag = mixture.call_and_log_diag(z)
    (dx,) = torch.autograd.grad(x.sum(), z)  # d = 1: the sum's gradient is the derivative
    torch.testing.assert_close(dx.log(), log_diag, rtol=0, atol=1e-8)
    z0, log_diag0 = mixture.inverse_and_log_diag(x.detach())
    torch.testing.assert_close(z0, z.detach(), rtol=0, atol=1e-9)
    torch.testing.assert_close(log_diag0, log_diag.detach(), rtol=0, atol=1e-8)
    # Central differences, in the bulk.
    zc, eps = torch.linspace(-3, 3, 61, dtype=F64).unsqueeze(-1), 1e-6
    fd = (mixture(zc + eps) - mixture(zc - eps)) / (2 * eps)
    torch.testing.assert_close(fd, mixture.slope(zc), rtol=1e-5, atol=0)


def test_kr1d_gap_density(gap):
    z = torch.linspace(-6, 6, 20_001, dtype=F64).unsqueeze(-1)
    x, log_diag = gap.call_and_log_diag(z)
    assert torch.isfinite(x).all() and torch.isfinite(log_diag).all()
    assert not (x.abs() < 1).any()  # no mass in the gap
    exact = _bisect_quantile(gap_cdf, stats.norm.cdf(z.numpy()))
    assert np.abs(x.numpy() - exact).max() < 1e-4
    # The map jumps across the gap at z = Φ^{-1}(1/3); the inverse sends the gap there.
    z_jump = stats.norm.ppf(1 / 3)
    x_jump = gap(torch.tensor([[z_jump - 1e-7], [z_jump + 1e-7]], dtype=F64))
    assert x_jump[0] < -1 + 1e-3 and x_jump[1] > 1 - 1e-3
    z_gap, ld_gap = gap.inverse_and_log_diag(torch.tensor([[-0.9], [0.0], [0.5]], dtype=F64))
    torch.testing.assert_close(z_gap, torch.full_like(z_gap, z_jump), rtol=0, atol=1e-4)
    assert torch.isfinite(ld_gap).all()
    assert torch.isneginf(gap.log_prob(torch.tensor([[-0.9], [0.0], [0.5]], dtype=F64))).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_kr1d_tails_beyond_the_grid_are_finite(dtype):
    kr = KR1D.from_log_prob(lambda x: -0.5 * x**2, -5.0, 5.0, n=1001)
    z = torch.tensor([[-40.0], [-8.0], [-6.0], [6.0], [8.0], [40.0]], dtype=dtype)
    x, log_diag = kr.call_and_log_diag(z)
    assert torch.isfinite(x).all() and torch.isfinite(log_diag).all()
    assert ((x >= -5) & (x <= 5)).all()
    assert (x.diff(dim=0) >= 0).all()
    z_out, ld_out = kr.inverse_and_log_diag(torch.tensor([[-7.0], [7.0]], dtype=dtype))
    assert torch.isfinite(z_out).all() and torch.isfinite(ld_out).all()
    assert torch.isneginf(kr.log_prob(torch.tensor([[-7.0], [7.0]], dtype=dtype))).all()


def test_kr1d_log_prob_is_normalized(mixture):
    x = torch.linspace(-8, 10, 7919, dtype=F64).unsqueeze(-1)  # not the construction grid
    p = mixture.log_prob(x).exp()
    assert abs(torch.trapezoid(p, x.squeeze(-1)).item() - 1) < 1e-5
    torch.testing.assert_close(p, torch.tensor(mixture_pdf(x.squeeze(-1).numpy())),
                               rtol=1e-3, atol=1e-6)


def test_kr1d_batch_shapes_and_bad_input(mixture):
    z = torch.randn(3, 4, 1, dtype=F64, generator=_gen(4))
    x, log_diag = mixture.call_and_log_diag(z)
    assert x.shape == log_diag.shape == (3, 4, 1)
    assert mixture.log_prob(x).shape == (3, 4)
    with pytest.raises(ValueError, match=r"shape \(\*, 1\)"):
        mixture(torch.zeros(5, 2, dtype=F64))
    with pytest.raises(ValueError, match="strictly increasing"):
        KR1D(torch.tensor([0.0, 2.0, 1.0]), torch.zeros(3))
    with pytest.raises(ValueError, match="no mass"):
        KR1D(torch.linspace(0, 1, 5), torch.full((5,), -math.inf))
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        KR1D(torch.linspace(0, 1, 5), torch.zeros(4))


# ---------------------------------------------------------------------------------------------
# KR2D

M2 = torch.tensor([0.5, -1.0], dtype=F64)
C2 = torch.tensor([[1.5, 0.9], [0.9, 1.2]], dtype=F64)
SIGMA_BANANA = 0.5


@pytest.fixture(scope="module")
def gauss2d():
    mvn = torch.distributions.MultivariateNormal(M2, C2)
    half = 9 * C2.diagonal().sqrt()
    return KR2D.from_log_prob(mvn.log_prob, M2 - half, M2 + half, n=(801, 801))


def test_kr2d_of_a_gaussian_is_the_cholesky_map(gauss2d):
    ref = gaussian_kr_map(M2, C2)
    z = torch.rand(4000, 2, dtype=F64, generator=_gen(5)) * 5 - 2.5  # the bulk, |z_k| <= 2.5
    x, log_diag = gauss2d.call_and_log_diag(z)
    assert (x - ref(z)).abs().max() < 1e-3
    assert (log_diag - ref.log_diag).abs().max() < 1e-3


def test_kr2d_pushforward_moments(gauss2d):
    x = gauss2d.sample((20_000,), generator=_gen(6))
    _check_sample_moments(x, M2, C2)


def test_kr2d_round_trip(gauss2d):
    z = torch.cat([torch.randn(500, 2, dtype=F64, generator=_gen(7)) * 2,
                   torch.tensor([[-8.0, 8.0], [8.0, -8.0], [0.0, 8.0]], dtype=F64)])
    x, log_diag = gauss2d.call_and_log_diag(z)
    assert torch.isfinite(x).all() and torch.isfinite(log_diag).all()
    z0, log_diag0 = gauss2d.inverse_and_log_diag(x)
    torch.testing.assert_close(z0, z, rtol=0, atol=1e-9)
    torch.testing.assert_close(log_diag0, log_diag, rtol=0, atol=1e-8)


def test_kr2d_jacobian_is_lower_triangular(gauss2d):
    L = torch.linalg.cholesky(C2)
    for z in torch.randn(4, 2, dtype=F64, generator=_gen(8)):
        J = jacobian(gauss2d, z)
        assert J[0, 1] == 0
        torch.testing.assert_close(J.diagonal().log(), gauss2d.call_and_log_diag(z)[1],
                                   rtol=0, atol=1e-8)
        # ∂x2/∂x1 is piecewise (rows are interpolated linearly in x1): O(h) accurate only.
        torch.testing.assert_close(J, L, rtol=0, atol=0.05)


def test_kr2d_log_prob(gauss2d):
    mvn = torch.distributions.MultivariateNormal(M2, C2)
    g1 = torch.linspace(gauss2d.grid1[0], gauss2d.grid1[-1], 307, dtype=F64)  # off the grid
    g2 = torch.linspace(gauss2d.grid2[0], gauss2d.grid2[-1], 293, dtype=F64)
    p = gauss2d.log_prob(torch.cartesian_prod(g1, g2)).exp().reshape(307, 293)
    assert abs(torch.trapezoid(torch.trapezoid(p, g2), g1).item() - 1) < 1e-3
    x = mvn.sample((2000,))
    torch.testing.assert_close(gauss2d.log_prob(x), mvn.log_prob(x), rtol=0, atol=1e-2)
    assert abs(gauss2d.log_z.item()) < 1e-6  # the input was normalized
    # Change of variables: log N(z) - sum(log_diag) is the log-density at x = T(z).
    z = torch.randn(500, 2, dtype=F64, generator=_gen(9))
    x, log_diag = gauss2d.call_and_log_diag(z)
    log_ref = -0.5 * (z**2).sum(-1) - math.log(2 * math.pi)
    torch.testing.assert_close(log_ref - log_diag.sum(-1), gauss2d.log_prob(x), rtol=0, atol=1e-8)
    off = torch.tensor([[20.0, 0.0], [0.0, -20.0]], dtype=F64)
    assert torch.isneginf(gauss2d.log_prob(off)).all()


def test_kr2d_of_a_banana_is_its_exact_map():
    # x1 ~ N(0, 1), x2 | x1 ~ N(x1², σ²): the KR map is z -> (z1, z1² + σ z2).
    def log_prob(x):
        return -0.5 * x[:, 0] ** 2 - 0.5 * ((x[:, 1] - x[:, 0] ** 2) / SIGMA_BANANA) ** 2

    kr = KR2D.from_log_prob(log_prob, (-6.0, -4.0), (6.0, 40.0), n=(801, 801))
    z = torch.rand(2000, 2, dtype=F64, generator=_gen(10)) * 5 - 2.5
    exact = torch.stack([z[:, 0], z[:, 0] ** 2 + SIGMA_BANANA * z[:, 1]], -1)
    assert (kr(z) - exact).abs().max() < 1e-2
    assert abs(kr.log_z.item() - math.log(2 * math.pi * SIGMA_BANANA)) < 1e-6


def test_kr2d_dtypes_and_batch_shapes(gauss2d):
    z = torch.randn(2, 3, 2, dtype=F64, generator=_gen(11))
    x, log_diag = gauss2d.call_and_log_diag(z)
    assert x.shape == log_diag.shape == (2, 3, 2)
    assert gauss2d.log_prob(x).shape == (2, 3)
    assert gauss2d.inv(x).shape == (2, 3, 2)
    x32 = gauss2d(z.float())
    assert x32.dtype == torch.float32
    torch.testing.assert_close(x32.double(), x, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match=r"shape \(\*, 2\)"):
        gauss2d(torch.zeros(4, 3, dtype=F64))


def test_docstring_examples_run():
    result = doctest.testmod(krflows.exact, extraglobs={"torch": torch})
    assert result.failed == 0
