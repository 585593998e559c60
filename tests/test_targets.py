"""Oracles for krflows.targets: quadrature, closed forms and scipy, never the code's own formulas.

Every normalizing constant is checked by integrating ``exp(log_prob - log_z)`` numerically
(on a grid in 1-D/2-D, by nested quadrature over the product structure in higher dimensions);
every exact sampler is checked against the density (Kolmogorov-Smirnov against a quadrature
CDF, binned chi-square against quadrature cell masses, or exact distributional identities).
"""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

import krflows.targets as targets
from krflows.targets import (
    TARGETS,
    Banana,
    Bimodal1D,
    Bimodal2D,
    CallableTarget,
    Funnel,
    GappedMixture1D,
    Gaussian,
    GaussianMixture,
    ManyWell,
    Mixture40,
    Ring,
    Target,
    TwoMoons,
    as_target,
    get_target,
)

F64 = torch.float64
P_MIN = 1e-3  # smallest p-value accepted by the statistical tests (fixed seeds: deterministic)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grid(lo: float, hi: float, h: float) -> tuple[torch.Tensor, float]:
    n = int(round((hi - lo) / h))
    return torch.linspace(lo, hi, n + 1, dtype=F64), (hi - lo) / n


def log_integral_1d(log_f, lo: float, hi: float, h: float) -> float:
    """log of the trapezoid rule of exp(log_f) on [lo, hi] (log_f: (n,) -> (n,))."""
    x, h = grid(lo, hi, h)
    lf = log_f(x)
    ends = torch.zeros_like(lf)
    ends[[0, -1]] = math.log(0.5)
    return float(torch.logsumexp(lf + ends, 0)) + math.log(h)


def log_integral_2d(log_f, box: tuple[float, float, float, float], h: float,
                    chunk: int = 200) -> float:
    """log of the 2-D Riemann sum of exp(log_f) on a box (integrand negligible at the edge)."""
    xs, hx = grid(box[0], box[1], h)
    ys, hy = grid(box[2], box[3], h)
    parts = []
    for i in range(0, len(xs), chunk):
        X, Y = torch.meshgrid(xs[i:i + chunk], ys, indexing="ij")
        parts.append(torch.logsumexp(log_f(torch.stack([X, Y], -1)).flatten(), 0))
    return float(torch.logsumexp(torch.stack(parts), 0)) + math.log(hx * hy)


def grid_cdf(target: Target, lo: float, hi: float, h: float = 1e-3):
    """A 1-D CDF by cumulative trapezoid quadrature, normalized by the grid total."""
    x, _ = grid(lo, hi, h)
    with torch.no_grad():
        f = target.log_prob(x[:, None]).exp()
    c = torch.cat([torch.zeros(1, dtype=F64), torch.cumulative_trapezoid(f, x)])
    c = (c / c[-1]).numpy()
    xn = x.numpy()
    return lambda t: np.interp(t, xn, c)


def chi2_pvalue(observed: np.ndarray, expected: np.ndarray, min_expected: float = 5.0) -> float:
    """Pearson chi-square p-value, lumping cells with small expected counts into one."""
    observed, expected = observed.ravel().astype(float), expected.ravel().astype(float)
    big = expected >= min_expected
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = (((obs - exp) ** 2)[keep] / exp[keep]).sum()
    return float(stats.chi2.sf(stat, keep.sum() - 1))


def ks_pvalue(samples: torch.Tensor, cdf) -> float:
    return float(stats.kstest(samples.double().numpy().ravel(), cdf).pvalue)


# ==================================================================== normalization
NORMALIZATION_2D = {
    "gaussian": (lambda: Gaussian([1.0, -2.0], [[2.0, 0.8], [0.8, 1.0]], dtype=F64),
                 (-9, 11, -10, 6), 0.05),
    "banana": (lambda: Banana(dtype=F64), (-70, 70, -10, 150), 0.2),
    "bimodal2d": (lambda: Bimodal2D(separation=5.0, weights=(0.2, 0.8), dtype=F64),
                  (-10, 10, -7, 7), 0.05),
    "ring": (lambda: Ring(dtype=F64), (-8, 8, -8, 8), 0.1),
    "mixture40": (lambda: Mixture40(dtype=F64), (-50, 50, -50, 50), 0.25),
    "twomoons": (lambda: TwoMoons(dtype=F64), (-4, 4, -4, 4), 0.02),
    "manywell2": (lambda: ManyWell(dim=2, dtype=F64), (-4, 4, -8, 8), 0.02),
    "mixture_fullcov": (lambda: GaussianMixture(
        [[0.0, 0.0], [3.0, 1.0], [-2.0, 4.0]],
        [[[1.0, 0.5], [0.5, 2.0]], [[0.3, -0.2], [-0.2, 0.5]], [[2.0, 0.0], [0.0, 0.1]]],
        weights=[1.0, 2.0, 3.0], dtype=F64), (-10, 10, -10, 12), 0.05),
}


@pytest.mark.parametrize("name", list(NORMALIZATION_2D))
def test_log_z_2d_by_quadrature(name):
    make, box, h = NORMALIZATION_2D[name]
    t = make()
    log_int = log_integral_2d(lambda x: t.log_prob(x) - t.log_z, box, h)
    assert abs(log_int) < 1e-3, f"{name}: log integral of exp(log_prob - log_z) = {log_int}"


def test_funnel_2d_log_z_by_quadrature():
    # change of variables x = e^{v/2} y (Jacobian e^{v/2}): a regular grid resolves the neck
    t = Funnel(dim=2, dtype=F64)

    def log_f(vy):
        v, y = vy[..., 0], vy[..., 1]
        x = torch.stack([v, torch.exp(0.5 * v) * y], -1)
        return t.log_prob(x) + 0.5 * v - t.log_z

    assert abs(log_integral_2d(log_f, (-25, 25, -10, 10), 0.1)) < 1e-3


@pytest.mark.parametrize("make, lo, hi", [
    (lambda: Bimodal1D(dtype=F64), -10.0, 10.0),
    (lambda: Bimodal1D(separation=8.0, weights=(0.1, 0.9), scale=0.3, dtype=F64), -5.0, 5.0),
    (lambda: GaussianMixture([[-1.0], [0.5], [4.0]], scales=[0.5, 1.0, 0.2],
                             weights=[1, 1, 2], dtype=F64), -8.0, 8.0),
])
def test_log_z_1d_by_quadrature(make, lo, hi):
    t = make()
    assert abs(log_integral_1d(lambda x: t.log_prob(x[:, None]) - t.log_z, lo, hi, 1e-3)) < 1e-3


def test_gapped_log_z_and_weights_by_quadrature():
    t = GappedMixture1D(separation=3.0, gap=(-0.5, 1.0), weights=(0.3, 0.7), dtype=F64)
    a, b = t.gap

    def lf(x):
        return t.log_prob(x[:, None]) - t.log_z

    # integrate each side up to the discontinuity, so the trapezoid rule sees smooth pieces
    left = math.exp(log_integral_1d(lf, -12.0, a, 1e-3))
    right = math.exp(log_integral_1d(lf, b, 12.0, 1e-3))
    assert abs(left + right - 1) < 1e-6
    assert abs(left - 0.3) < 1e-6 and abs(right - 0.7) < 1e-6
    torch.testing.assert_close(t.weights, torch.tensor([0.3, 0.7], dtype=F64))
    inside = torch.linspace(a, b, 103, dtype=F64)[1:-1, None]
    assert torch.isneginf(t.log_prob(inside)).all()
    assert torch.isfinite(t.log_prob(torch.tensor([[a], [b], [-5.0], [5.0]], dtype=F64))).all()


def test_gaussian_matches_scipy():
    mean, cov = np.array([1.0, -1.0, 0.5]), np.array([[2.0, 0.3, 0.1], [0.3, 1.0, -0.2],
                                                       [0.1, -0.2, 0.5]])
    t = Gaussian(torch.tensor(mean), torch.tensor(cov), dtype=F64)
    x = torch.randn(50, 3, dtype=F64)
    ref = stats.multivariate_normal(mean, cov).logpdf(x.numpy())
    np.testing.assert_allclose((t.log_prob(x) - t.log_z).numpy(), ref, rtol=1e-10)
    torch.testing.assert_close(t.scale_tril, torch.linalg.cholesky(torch.tensor(cov)))


def test_mixture_matches_scipy():
    means = np.array([[0.0, 0.0], [3.0, 1.0]])
    covs = np.array([[[1.0, 0.5], [0.5, 2.0]], [[0.3, -0.2], [-0.2, 0.5]]])
    w = np.array([0.25, 0.75])
    t = GaussianMixture(torch.tensor(means), torch.tensor(covs), weights=[1.0, 3.0], dtype=F64)
    x = 2 * torch.randn(100, 2, dtype=F64)
    dens = sum(w[k] * stats.multivariate_normal(means[k], covs[k]).pdf(x.numpy())
               for k in range(2))
    np.testing.assert_allclose((t.log_prob(x) - t.log_z).numpy(), np.log(dens), rtol=1e-10)
    resp = np.stack([w[k] * stats.multivariate_normal(means[k], covs[k]).pdf(x.numpy())
                     for k in range(2)], -1) / dens[:, None]
    np.testing.assert_allclose(t.responsibilities(x).numpy(), resp, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(t.assign(x), torch.as_tensor(resp.argmax(-1)))


def test_manywell_log_z_literature_and_scipy():
    z1, _ = integrate.quad(lambda s: math.exp(-(s**4) + 6 * s**2 + 0.5 * s), -np.inf, np.inf,
                           epsabs=0, epsrel=1e-13)
    ref = 16 * (math.log(z1) + 0.5 * math.log(2 * math.pi))
    t = ManyWell(dim=32)
    assert abs(t.log_z - 164.696) < 1e-3
    assert abs(t.log_z - ref) < 1e-8
    left, _ = integrate.quad(lambda s: math.exp(-(s**4) + 6 * s**2 + 0.5 * s), -np.inf, 0,
                             epsabs=0, epsrel=1e-13)
    assert abs(float(t.well_weights[0]) - left / z1) < 1e-6
    assert abs(ManyWell(dim=6).log_z - 3 * ref / 16) < 1e-8


def test_manywell_is_a_product_of_pairs():
    t32, t2 = ManyWell(dim=32, dtype=F64), ManyWell(dim=2, dtype=F64)
    x = 2 * torch.randn(64, 32, dtype=F64)
    torch.testing.assert_close(t32.log_prob(x), t2.log_prob(x.reshape(64, 16, 2)).sum(-1))
    assert abs(t32.log_z - 16 * t2.log_z) < 1e-9  # and t2.log_z is checked by 2-D quadrature


def test_funnel_10d_log_z_by_nested_quadrature():
    # conditional independence given v (an identity checked on random points), then
    # Z = int dv exp(lp(v, 0)) [int dt exp(lp(v, t e_1) - lp(v, 0))]^(d - 1)
    t = Funnel(dim=10, dtype=F64)
    x = torch.randn(32, 10, dtype=F64)
    zero = x.clone()
    zero[:, 1:] = 0
    singles = zero[:, None, :].repeat(1, 9, 1)
    singles[:, torch.arange(9), torch.arange(1, 10)] = x[:, 1:]
    base = t.log_prob(zero)
    torch.testing.assert_close(t.log_prob(x) - base, (t.log_prob(singles) - base[:, None]).sum(1))

    v, hv = grid(-25.0, 25.0, 0.05)
    y, hy = grid(-12.0, 12.0, 0.05)
    pts = torch.zeros(len(v), len(y), 10, dtype=F64)
    pts[..., 0] = v[:, None]
    pts[..., 1] = torch.exp(0.5 * v)[:, None] * y  # t = e^{v/2} y
    at0 = torch.stack([v, *[torch.zeros_like(v)] * 9], -1)
    inner = torch.logsumexp(t.log_prob(pts) - t.log_prob(at0)[:, None], 1) + math.log(hy) + 0.5 * v
    log_z = float(torch.logsumexp(t.log_prob(at0) + 9 * inner, 0)) + math.log(hv)
    assert abs(log_z - t.log_z) < 1e-3


def test_banana_padded_log_z_by_quadrature():
    t2, t4 = Banana(dtype=F64), Banana(dim=4, dtype=F64)
    x = 5 * torch.randn(64, 4, dtype=F64)
    extra = t4.log_prob(x) - t2.log_prob(x[:, :2])
    x[:, :2] = 5 * torch.randn(64, 2, dtype=F64)  # the padding term must not depend on x0, x1
    torch.testing.assert_close(t4.log_prob(x) - t2.log_prob(x[:, :2]), extra)

    def log_g(x23):
        pts = torch.cat([torch.zeros(*x23.shape[:-1], 2, dtype=F64), x23], -1)
        return t4.log_prob(pts) - t2.log_prob(pts[..., :2])

    assert abs(log_integral_2d(log_g, (-9, 9, -9, 9), 0.05) - (t4.log_z - t2.log_z)) < 1e-3


@pytest.mark.slow
def test_two_moons_log_z_scipy_polar():
    t = TwoMoons(dtype=F64)

    def f(r, a):
        x = torch.tensor([r * math.cos(a), r * math.sin(a)], dtype=F64)
        return r * math.exp(float(t.log_prob(x)))

    z, _ = integrate.dblquad(f, 0, 2 * math.pi, 0, 5, epsabs=1e-10, epsrel=1e-9)
    assert abs(math.log(z) - t.log_z) < 1e-8


# ========================================================================= samplers
def test_banana_sampler_closed_forms():
    t = Banana(dtype=F64)
    x = t.sample((200_000,), generator=gen(1))
    x0, x1 = x[:, 0], x[:, 1]
    n = len(x0)
    assert abs(float(x0.var()) - 100) < 5 * 100 * math.sqrt(2 / n)
    assert abs(float(x1.mean())) < 5 * math.sqrt(19 / n)  # Var x1 = 1 + 2 b^2 s^4 = 19
    assert abs(float(x1.var()) - 19) < 0.6
    # exact characterization: x0 / 10 ~ N(0, 1), residual ~ N(0, 1), independent
    resid = x1 - 0.03 * (x0**2 - 100)
    assert ks_pvalue(x0 / 10, stats.norm.cdf) > P_MIN
    assert ks_pvalue(resid, stats.norm.cdf) > P_MIN
    assert abs(float(torch.corrcoef(torch.stack([resid, x0**2]))[0, 1])) < 5 / math.sqrt(n)


def test_funnel_sampler_closed_forms():
    t = Funnel(dim=10, dtype=F64)
    x = t.sample((100_000,), generator=gen(2))
    v, rest = x[:, 0], x[:, 1:]
    n = len(v)
    assert abs(float(v.mean())) < 5 * 3 / math.sqrt(n)
    assert abs(float(v.var()) - 9) < 5 * 9 * math.sqrt(2 / n)
    y = rest * torch.exp(-0.5 * v)[:, None]  # ~ N(0, 1), independent of v
    assert ks_pvalue(v / 3, stats.norm.cdf) > P_MIN
    assert ks_pvalue(y[:, 0], stats.norm.cdf) > P_MIN
    assert abs(float(torch.corrcoef(torch.stack([y[:, 3] ** 2, v]))[0, 1])) < 5 / math.sqrt(n)
    # Var x_i = E e^v = e^{9/2}: heavy tailed (sd of the estimate about 31 per coordinate)
    assert abs(float((rest**2).mean()) / math.exp(4.5) - 1) < 0.3


def test_gaussian_sampler_covariance():
    cov = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=F64)
    t = Gaussian(torch.tensor([1.0, -2.0]), cov, dtype=F64)
    x = t.sample((100_000,), generator=gen(3))
    torch.testing.assert_close(x.mean(0), t.mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.05, rtol=0)


@pytest.mark.parametrize("make, lo, hi", [
    (lambda: Bimodal1D(separation=5.0, weights=(0.3, 0.7), dtype=F64), -10.0, 10.0),
    (lambda: GappedMixture1D(separation=3.0, gap=(-0.5, 1.0), weights=(0.3, 0.7), dtype=F64),
     -10.0, 10.0),
    (lambda: GappedMixture1D(separation=0.0, gap=(-2.0, 2.0), weights=(0.6, 0.4), dtype=F64),
     -10.0, 10.0),
])
def test_1d_sampler_ks_against_quadrature_cdf(make, lo, hi):
    t = make()
    x = t.sample((20_000,), generator=gen(4))
    cdf = grid_cdf(t, lo, hi, 1e-4)
    assert ks_pvalue(x, cdf) > P_MIN
    # the closed-form CDF agrees with quadrature (O(h) error at the jumps of a gapped density)
    pts = torch.linspace(lo + 1, hi - 1, 201, dtype=F64)
    np.testing.assert_allclose(t.cdf(pts[:, None]).numpy(), cdf(pts.numpy()), atol=1e-4)


def test_gapped_sampler_icdf_and_gap():
    t = GappedMixture1D(separation=3.0, gap=(-0.5, 1.0), weights=(0.3, 0.7), dtype=F64)
    a, b = t.gap
    x = t.sample((50_000,), generator=gen(5))
    assert not ((x > a) & (x < b)).any()
    assert abs(float((x[:, 0] <= a).double().mean()) - 0.3) < 5 * math.sqrt(0.21 / 50_000)
    u = torch.linspace(1e-6, 1 - 1e-6, 1001, dtype=F64)
    torch.testing.assert_close(t.cdf(t.icdf(u)), u)
    # the exact KR map icdf(Phi(z)) jumps from a to b at Phi(z) = w_0
    left, right = t.icdf(torch.tensor([0.3 - 1e-12, 0.3 + 1e-12], dtype=F64))[:, 0]
    assert abs(float(left) - a) < 1e-6 and abs(float(right) - b) < 1e-6
    # a gap deep in the tails (truncation masses below float32's range) still samples exactly
    deep = GappedMixture1D(gap=(-20.0, 20.0))
    x = deep.sample((10_000,), generator=gen(14))[:, 0]
    assert x.dtype == torch.float32 and bool(torch.isfinite(deep.log_prob(x[:, None])).all())
    assert bool(((x <= -20) | (x >= 20)).all())
    assert abs(float((x > 0).float().mean()) - 0.5) < 0.03
    tail = (x.abs() - 20).double()  # the excess over the edge is about Exp(rate 18)
    assert abs(float(tail.mean()) * 18 - 1) < 0.05


def test_gapped_gradient_is_zero_in_gap_and_finite_elsewhere():
    t = GappedMixture1D(dtype=F64)
    x = torch.tensor([[-3.0], [-0.2], [0.0], [0.7], [3.0]], dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(t.log_prob(x).clamp(min=-1e30).sum(), x)
    assert torch.isfinite(g).all()
    assert (g[1:4] == 0).all()
    (g,) = torch.autograd.grad(t.log_prob(x[[0, 4]]).sum(), x)
    torch.testing.assert_close(g[[0, 4], 0], torch.tensor([1.0, -1.0], dtype=F64))  # -(x - m)


def test_two_moons_sampler_binned_chi_square():
    t = TwoMoons(dtype=F64)
    n = 40_000
    x = t.sample((n,), generator=gen(6)).numpy()
    bins, sub = 16, 20  # 16 x 16 cells on [-4, 4]^2, each integrated by 20 x 20 midpoints
    h = 8 / (bins * sub)
    mid = torch.arange(bins * sub, dtype=F64) * h - 4 + h / 2
    X, Y = torch.meshgrid(mid, mid, indexing="ij")
    mass = (t.log_prob(torch.stack([X, Y], -1)) - t.log_z).exp() * h * h
    cells = mass.reshape(bins, sub, bins, sub).sum((1, 3)).numpy()
    assert abs(cells.sum() - 1) < 1e-4
    edges = np.linspace(-4, 4, bins + 1)
    observed, _, _ = np.histogram2d(x[:, 0], x[:, 1], bins=[edges, edges])
    assert observed.sum() > n - 5  # essentially no mass outside the box
    assert chi2_pvalue(observed, n * cells) > P_MIN


@pytest.mark.parametrize("make", [
    lambda: Mixture40(dtype=F64),
    lambda: Ring(dtype=F64),
    lambda: Bimodal2D(separation=3.0, weights=(0.2, 0.8), dtype=F64),
    lambda: GaussianMixture([[0.0, 0.0], [3.0, 1.0]],
                            [[[1.0, 0.5], [0.5, 2.0]], [[0.3, -0.2], [-0.2, 0.5]]],
                            weights=[1.0, 3.0], dtype=F64),
])
def test_mixture_sampler_labels_and_residuals(make):
    t = make()
    n = 40_000
    x, k = t.sample_with_labels((n,), generator=gen(7))
    counts = torch.bincount(k, minlength=t.n_components).numpy()
    assert chi2_pvalue(counts, n * t.weights.numpy()) > P_MIN
    # given its label, a sample whitened by its component is N(0, I)
    diff = (x - t.means[k])[..., None]
    w = torch.linalg.solve_triangular(t.scale_tril[k], diff, upper=False)[..., 0]
    for j in range(t.dim):
        assert ks_pvalue(w[:, j], stats.norm.cdf) > P_MIN
    assert abs(float(torch.corrcoef(w.T)[0, 1])) < 5 / math.sqrt(n)


def test_manywell_sampler():
    t = ManyWell(dim=8, dtype=F64)
    n = 20_000
    x = t.sample((n,), generator=gen(8))
    # double-well coordinates: pooled over the 4 independent pairs, KS against quadrature
    well = as_target(lambda s: -(s[:, 0] ** 4 - 6 * s[:, 0] ** 2 - 0.5 * s[:, 0]), dim=1)
    cdf = grid_cdf(well, -4.0, 4.0, 1e-4)
    assert ks_pvalue(x[:, 0::2], cdf) > P_MIN
    assert ks_pvalue(x[:, 1::2], stats.norm.cdf) > P_MIN
    c = torch.corrcoef(x.T)
    off = c - torch.diag(torch.diag(c))
    assert off.abs().max() < 5 / math.sqrt(n)
    # modes: 2^4 sign patterns with the product weights
    counts = torch.bincount(t.assign(x), minlength=16).numpy()
    assert chi2_pvalue(counts, n * t.weights.numpy()) > P_MIN
    right = float((x[:, 0::2] > 0).double().mean())
    assert abs(right - float(t.well_weights[1])) < 5 * math.sqrt(0.13 / (4 * n))


# ========================================================================= modes
def test_mixture40_construction():
    a, b = Mixture40(), Mixture40()
    assert a.means.shape == (40, 2)
    assert bool((a.means.abs() <= 40).all())
    torch.testing.assert_close(a.means, b.means, rtol=0, atol=0)
    with torch.random.fork_rng():  # FAB: torch.manual_seed(0); (torch.rand((40, 2)) - .5) * 80
        torch.manual_seed(0)
        fab = (torch.rand((40, 2)) - 0.5) * 2 * 40
    torch.testing.assert_close(a.means, fab, rtol=0, atol=0)
    torch.testing.assert_close(a.weights, torch.full((40,), 1 / 40))
    std = math.log1p(math.e)  # softplus(1), FAB's log_var_scaling = 1
    torch.testing.assert_close(a.covs, std**2 * torch.eye(2).expand(40, 2, 2))
    assert not torch.equal(Mixture40(seed=1).means, a.means)


@pytest.mark.parametrize("make", [
    lambda: Bimodal1D(separation=8.0, weights=(0.3, 0.7)),
    lambda: Ring(),
    lambda: Mixture40(),  # some components overlap: about 10% of points look like a neighbour's
])
def test_assign_of_samples_matches_weights(make):
    t = make()
    n = 20_000
    x, k = t.sample_with_labels((n,), generator=gen(9))
    a = t.assign(x)
    assert a.dtype == torch.long and a.shape == (n,)
    # P(assign == label) = E[max_k responsibility_k(x)], the Bayes rate: an exact identity
    agree = float((a == k).double().mean())
    bayes = float(t.responsibilities(x).max(-1).values.double().mean())
    assert abs(agree - bayes) < 5 * math.sqrt(bayes * (1 - bayes) / n) + 1e-4
    freq = torch.bincount(a, minlength=t.n_components).double() / n
    w = t.weights.double()
    assert ((freq - w).abs() < 5 * torch.sqrt(w * (1 - w) / n) + (1 - bayes)).all()


def test_two_moons_and_gapped_assign_frequencies():
    tm = TwoMoons()
    a = tm.assign(tm.sample((20_000,), generator=gen(10)))
    assert abs(float(a.float().mean()) - 0.5) < 5 * math.sqrt(0.25 / 20_000)
    torch.testing.assert_close(tm.assign(tm.modes), torch.tensor([0, 1]))
    g = GappedMixture1D(weights=(0.2, 0.8))
    a = g.assign(g.sample((20_000,), generator=gen(11)))
    assert abs(float(a.float().mean()) - 0.8) < 5 * math.sqrt(0.16 / 20_000)
    torch.testing.assert_close(g.assign(g.modes), torch.tensor([0, 1]))


def test_manywell_modes_weights_assign_consistent():
    t = ManyWell(dim=6)
    assert t.modes.shape == (8, 6) and t.weights.shape == (8,)
    torch.testing.assert_close(t.assign(t.modes), torch.arange(8))
    torch.testing.assert_close(t.weights.sum(), torch.tensor(1.0))
    # the modes are local maxima: zero gradient, density drops in every direction
    m = t.modes.double().requires_grad_(True)
    (g,) = torch.autograd.grad(ManyWell(dim=6, dtype=F64).log_prob(m).sum(), m)
    assert g.abs().max() < 1e-5
    with pytest.raises(ValueError, match="too many"):
        _ = ManyWell(dim=64).weights


def test_mixture_modes_are_local_maxima():
    for t in (Ring(dtype=F64), Bimodal2D(separation=8.0, dtype=F64)):
        m = t.modes.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(t.log_prob(m).sum(), m)
        assert g.abs().max() < 1e-6


# ========================================================== gradients, inputs, dtypes
@pytest.mark.parametrize("make", [
    lambda: Gaussian([1.0, 0.0, -1.0], [[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.7]],
                     dtype=F64),
    lambda: Banana(dim=3, dtype=F64),
    lambda: Funnel(dim=4, dtype=F64),
    lambda: GaussianMixture([[0.0, 0.0], [1.0, 2.0]], [[[1.0, 0.5], [0.5, 2.0]]] * 2,
                            dtype=F64),
    lambda: Ring(dtype=F64),
    lambda: TwoMoons(dtype=F64),
    lambda: ManyWell(dim=4, dtype=F64),
])
def test_gradient_matches_finite_differences(make):
    t = make()
    x = torch.randn(5, t.dim, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(t.log_prob, (x,))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_bad_inputs_raise(name):
    t = get_target(name, **({"means": [[0.0, 1.0, 2.0]]} if name == "mixture" else {}))
    d = t.dim
    bad = torch.zeros(10, d + 1)
    with pytest.raises(ValueError, match=rf"x must have shape \(\*, {d}\), got \(10, {d + 1}\)"):
        t.log_prob(bad)
    with pytest.raises(ValueError, match="floating"):
        t.log_prob(torch.zeros(10, d, dtype=torch.long))
    with pytest.raises(ValueError, match="torch.Tensor"):
        t.log_prob([[0.0] * d])
    with pytest.raises(ValueError, match="shape"):
        t.log_prob(torch.tensor(0.0))


def test_error_message_exact():
    with pytest.raises(ValueError) as info:
        Funnel(dim=3).log_prob(torch.zeros(10, 2))
    assert str(info.value) == "x must have shape (*, 3), got (10, 2)"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_shapes_dtypes_and_samplers(name):
    kwargs = {"means": [[0.0, 1.0], [2.0, 0.0]]} if name == "mixture" else {}
    t = get_target(name, **kwargs)
    d = t.dim
    assert t.dtype == torch.float32
    out = t.log_prob(torch.randn(4, 3, d))
    assert out.shape == (4, 3) and out.dtype == torch.float32
    assert t(torch.randn(d)).shape == ()
    assert t.has_sampler and isinstance(t.log_z, float)
    assert t.sample().shape == (d,) and t.sample((0,)).shape == (0, d)
    s = t.sample((2, 5), generator=gen(12))
    assert s.shape == (2, 5, d) and s.dtype == torch.float32
    torch.testing.assert_close(s, t.sample((2, 5), generator=gen(12)))
    # float64: via the constructor, via .to, and a float64 input to a float32 target
    t64 = get_target(name, dtype=F64, **kwargs)
    x = t64.sample((7,), generator=gen(13))
    assert x.dtype == F64 and t64.log_prob(x).dtype == F64
    assert t.log_prob(x).dtype == F64
    torch.testing.assert_close(t.log_prob(x), t64.log_prob(x), rtol=1e-5, atol=1e-4)
    assert t.dtype == torch.float32  # the float64 copy did not change the target
    t.to(dtype=F64)
    assert t.dtype == F64 and t.sample((3,)).dtype == F64
    torch.testing.assert_close(t.log_prob(x), t64.log_prob(x), rtol=1e-5, atol=1e-4)


# ========================================================== wrapping and registry
def test_as_target_wraps_lambda():
    t = as_target(lambda x: -0.5 * (x**2).sum(-1), dim=3)
    assert isinstance(t, CallableTarget) and t.dim == 3 and t.log_z is None
    assert not t.has_sampler
    x = torch.randn(4, 5, 3)
    torch.testing.assert_close(t(x), -0.5 * (x**2).sum(-1))
    with pytest.raises(ValueError, match=r"\(\*, 3\)"):
        t(torch.randn(4, 2))
    with pytest.raises(ValueError, match="dim is required"):
        as_target(lambda x: x.sum(-1))
    with pytest.raises(ValueError, match=r"\(n,\)"):
        as_target(lambda x: x, dim=2)(torch.randn(5, 2))
    with pytest.raises(NotImplementedError):
        t.sample((2,))
    t2 = Target.from_callable(lambda x: -x.abs().sum(-1), dim=2, log_z=2 * math.log(2))
    assert t2.log_z == pytest.approx(2 * math.log(2))


def test_as_target_passthrough_and_duck_types():
    b = Banana()
    assert as_target(b) is b and as_target(b, dim=2) is b
    with pytest.raises(ValueError, match="dim"):
        as_target(b, dim=3)

    class Duck:
        dim = 2
        log_z = 1.5

        def log_prob(self, x):
            return -(x**2).sum(-1)

    t = as_target(Duck())
    assert t.dim == 2 and t.log_z == 1.5
    mvn = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    t = as_target(mvn)
    assert t.dim == 2 and t.log_z == 0.0 and t.sample((3,)).shape == (3, 2)
    with pytest.raises(ValueError, match="callable"):
        as_target(42, dim=2)


def test_registry():
    assert all(k == k.lower() for k in TARGETS)
    assert isinstance(get_target("banana"), Banana)
    assert isinstance(get_target("Two-Moons"), TwoMoons)
    assert isinstance(get_target("many_well", dim=4), ManyWell)
    assert isinstance(get_target("GappedMixture1D"), GappedMixture1D)
    assert get_target("funnel", dim=5).dim == 5
    with pytest.raises(ValueError, match="unknown target"):
        get_target("nope")


def test_doctests():
    from krflows.targets import base, energies, gaussian, mixtures

    results = [doctest.testmod(m, optionflags=doctest.NORMALIZE_WHITESPACE)
               for m in (targets, base, gaussian, mixtures, energies)]
    assert sum(r.failed for r in results) == 0 and sum(r.attempted for r in results) > 10
