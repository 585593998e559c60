"""krflows.correct: mode search and the defensive mixture correction, against oracles built
elsewhere (the targets' exact means, weights, log Z and analytic modes; finite differences)."""


import math

import pytest
import torch

import krflows
from krflows import KRFlow, targets
from krflows.correct import DebiasResult, ModeSet, debias, find_modes
from krflows.correct.mixture import student_t_log_prob
from krflows.correct.modes import _hessian


def gaussian_flow(mean, cov, dtype=torch.float32) -> KRFlow:
    """A flow that is exactly N(mean, cov)."""
    flow = KRFlow(len(mean), family="affine", layers=0).to(dtype)
    flow.affine.initialize(torch.as_tensor(mean, dtype=dtype), torch.as_tensor(cov, dtype=dtype))
    return flow


def two_modes() -> targets.GaussianMixture:
    """The issue's case: a 0.3/0.7 two-mode 2-D mixture, modes 8 sd apart, log Z = log 2 pi."""
    return targets.Bimodal2D(separation=8.0, weights=[0.3, 0.7])


# =============================================================================================
# find_modes


def test_mixture_modes_weights_and_log_z_exact():
    target = two_modes()
    modes = find_modes(target, box=(-10.0, 10.0), n_starts=64, seed=0)
    assert isinstance(modes, ModeSet) and len(modes) == 2
    # sorted by mass: the 0.7 mode first; components overlap by e^-32, far below the tolerance
    means = target.means.double()[[1, 0]]
    torch.testing.assert_close(modes.locations, means, atol=1e-6, rtol=0)
    torch.testing.assert_close(modes.weights, torch.tensor([0.7, 0.3], dtype=torch.float64), atol=1e-6,
                               rtol=0)
    assert abs(float(torch.logsumexp(modes.log_mass, 0)) - target.log_z) < 1e-6
    torch.testing.assert_close(modes.covariances, torch.eye(2, dtype=torch.float64).expand(2, 2, 2),
                               atol=1e-6, rtol=0)
    assert modes.negative_definite.all()
    assert modes.stats["converged"] == 64 and sum(modes.stats["starts"].values()) == 64


def test_gaussian_laplace_is_exact():
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    a = torch.tensor([[2.0, 0.0, 0.0], [0.6, 1.0, 0.0], [-0.3, 0.4, 0.5]], dtype=torch.float64)
    cov = a @ a.T
    target = targets.Gaussian(mean, cov, dtype=torch.float64)
    modes = find_modes(target, box=(-10.0, 10.0), n_starts=32, seed=1)
    assert len(modes) == 1
    torch.testing.assert_close(modes.locations[0], mean, atol=1e-8, rtol=0)
    torch.testing.assert_close(modes.covariances[0], cov, atol=1e-8, rtol=1e-8)
    assert abs(float(modes.log_mass[0]) - target.log_z) < 1e-8
    assert float(modes.log_density[0]) == pytest.approx(float(target.log_prob(mean)), abs=1e-10)


def test_banana_mode_analytic():
    target = targets.Banana()  # mode (0, -b s^2); Laplace exact (Gaussian in x_0, then x_1 | x_0)
    modes = find_modes(target, box=(-20.0, 20.0), n_starts=32, seed=0)
    assert len(modes) == 1
    torch.testing.assert_close(modes.locations[0], torch.tensor([0.0, -3.0], dtype=torch.float64),
                               atol=1e-5, rtol=0)
    assert float(modes.log_mass[0]) == pytest.approx(target.log_z, abs=1e-6)


def test_double_well_callable_four_modes():
    # log p = -sum (x_i^2 - 1)^2: maxima at (+-1, +-1), Hessian -8 I there, a saddle at each
    # (0, +-1) and (+-1, 0) and a minimum at 0
    modes = find_modes(lambda x: -((x**2 - 1) ** 2).sum(-1), box=(torch.full((2,), -2.0), 2.0),
                       n_starts=64, seed=0)
    assert len(modes) == 4
    found = sorted(map(tuple, modes.locations.round(decimals=6).tolist()))
    assert found == [(-1.0, -1.0), (-1.0, 1.0), (1.0, -1.0), (1.0, 1.0)]
    torch.testing.assert_close(modes.covariances, torch.eye(2, dtype=torch.float64).expand(4, 2, 2) / 8,
                               atol=1e-8, rtol=0)
    torch.testing.assert_close(modes.weights, torch.full((4,), 0.25, dtype=torch.float64))


def test_many_well_modes_match_the_targets_newton_roots():
    target = targets.ManyWell(dim=2)  # wells at the roots of 4t^3 - 12t - 1/2 (targets.py)
    modes = find_modes(target, box=(-3.0, 3.0), n_starts=32, seed=0)
    assert len(modes) == 2
    expected = target.modes.double()[[1, 0]]  # the right well is heavier
    torch.testing.assert_close(modes.locations, expected, atol=1e-6, rtol=0)
    # Laplace weights of a quartic well: close to, not equal to, the exact well masses
    torch.testing.assert_close(modes.weights, target.well_weights.flip(0).double(), atol=0.02, rtol=0)


def test_hessian_matches_finite_differences():
    target = targets.Banana(dim=3, dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64) * 3
    _, g, H = _hessian(target, x)
    h = 1e-5
    fd = torch.stack([(_hessian(target, x + h * e)[1] - _hessian(target, x - h * e)[1]) / (2 * h)
                      for e in torch.eye(3, dtype=torch.float64)], 1)
    torch.testing.assert_close(H, fd, atol=1e-6, rtol=1e-6)
    lp_plus = target.log_prob(x + h * torch.eye(3, dtype=torch.float64)[0])
    lp_minus = target.log_prob(x - h * torch.eye(3, dtype=torch.float64)[0])
    torch.testing.assert_close(g[:, 0], (lp_plus - lp_minus) / (2 * h), atol=1e-6, rtol=1e-6)


def test_logaddexp_mixture_with_a_narrow_component_has_laplace_masses_at_both_modes():
    """torch's logaddexp has a NaN double backward where its arguments differ by ~1800 (a
    component of sd 0.1, 6 away): the broad mode's Hessian was NaN, read as zero, so the mode
    was no strict maximum, its Laplace mass wrong (7.6 instead of log 0.5), and fit's mixture
    start left it out. Oracle: each Gaussian component's Laplace mass is exact, log 0.5."""
    d = 2
    u = torch.ones(d, dtype=torch.float64) / math.sqrt(d)

    def log_p(x):
        a = -0.5 * ((x + 3 * u) / 0.1).square().sum(-1) - d * math.log(0.1)
        b = -0.5 * (x - 3 * u).square().sum(-1)
        return torch.logaddexp(a, b) + math.log(0.5) - 0.5 * d * math.log(2 * math.pi)

    x0 = (3 * u)[None].clone()
    _, _, H = _hessian(targets.as_target(log_p, dim=d), x0)
    torch.testing.assert_close(H[0], -torch.eye(d, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.manual_seed(0)
    starts = torch.cat([-3 * u + 0.05 * torch.randn(8, d, dtype=torch.float64),
                        3 * u + torch.randn(8, d, dtype=torch.float64)])
    modes = find_modes(log_p, starts=starts)
    assert modes.locations.shape[0] == 2 and bool(modes.negative_definite.all())
    torch.testing.assert_close(modes.log_mass, torch.full((2,), math.log(0.5), dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_flow_starts_find_the_mode_the_flow_misses():
    target = two_modes()
    flow = gaussian_flow([4.0, 0.0], torch.eye(2))  # sits on the 0.7 mode only
    modes = find_modes(target, flow, n_starts=64, seed=0)
    assert len(modes) == 2 and set(modes.stats["starts"]) == {"flow", "box"}
    torch.testing.assert_close(modes.weights, torch.tensor([0.7, 0.3], dtype=torch.float64), atol=1e-6,
                               rtol=0)
    torch.manual_seed(0)
    near = modes.flow_mass(flow, n=4000, radius=3.0)
    assert float(near[0]) > 0.95 and float(near[1]) == 0.0
    assert modes.mass(modes.locations).tolist() == [0.5, 0.5]


def test_saddle_start_is_dropped_and_flat_ridge_flagged():
    target = targets.Bimodal2D(separation=8.0)  # equal weights: the origin is a saddle
    with pytest.warns(RuntimeWarning, match="no start converged"):
        modes = find_modes(target, starts=torch.zeros(1, 2), seed=0)
    assert len(modes) == 0 and modes.stats["saddles"] == 1
    # log p = -(x0 - x1)^2: flat along x0 = x1; -H has eigenvalues 0 and 4
    ridge = find_modes(lambda x: -((x[:, 0] - x[:, 1]) ** 2), box=(torch.full((2,), -3.0), 3.0),
                       n_starts=32, eigenvalue_floor=1e-4, seed=0)
    assert len(ridge) == 1 and not bool(ridge.negative_definite[0])
    eig = torch.linalg.eigvalsh(ridge.covariances[0])
    torch.testing.assert_close(eig, torch.tensor([0.25, 1e4], dtype=torch.float64), rtol=1e-6, atol=0)


def test_pyro_prior_starts_and_exact_weights():
    pyro = pytest.importorskip("pyro")
    dist = pytest.importorskip("pyro.distributions")
    from krflows.pyro import potential_from_model

    potential = potential_from_model(_two_mode_model(pyro, dist))
    modes = find_modes(potential, n_starts=64, seed=0)
    assert "prior" in modes.stats["starts"] and len(modes) == 2
    # mu's posterior is sum_k w_k N(m_k; 0, 101 I) N(mu; ...): Gaussian pieces, equal |m_k|
    torch.testing.assert_close(modes.weights, torch.tensor([0.7, 0.3], dtype=torch.float64), atol=1e-6,
                               rtol=0)
    assert modes.locations[0, 0] > 3.5 and modes.locations[1, 0] < -3.5


def _two_mode_model(pyro, dist):
    """mu ~ N(0, 10^2 I), a factor 0.3 N(mu; (-4, 0), I) + 0.7 N(mu; (4, 0), I); s ~ HalfNormal(2)
    with three observations."""
    means = torch.tensor([[-4.0, 0.0], [4.0, 0.0]])
    log_w = torch.tensor([0.3, 0.7]).log()
    y = torch.tensor([0.5, -1.0, 2.0])

    def model():
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 10.0).to_event(1))
        s = pyro.sample("s", dist.HalfNormal(2.0))
        comps = dist.Normal(means, 1.0).to_event(1).log_prob(mu[..., None, :]) + log_w
        pyro.factor("mix", torch.logsumexp(comps, -1))
        with pyro.plate("data", 3):
            pyro.sample("y", dist.Normal(0.0, s), obs=y)

    return model


def test_find_modes_seeded_and_errors():
    target = two_modes()
    a = find_modes(target, n_starts=16, seed=3)
    b = find_modes(target, n_starts=16, seed=3)
    assert torch.equal(a.locations, b.locations)
    with pytest.raises(ValueError, match="dimension is unknown"):
        find_modes(lambda x: -(x**2).sum(-1))
    with pytest.raises(ValueError, match="box must be"):
        find_modes(target, box=(1.0, -1.0))
    with pytest.raises(ValueError, match="Pyro potential"):
        find_modes(target, prior=True)


def test_exported():
    assert krflows.find_modes is find_modes and krflows.debias is debias


# =============================================================================================
# debias


def weighted_mode_weights(target, res: DebiasResult) -> torch.Tensor:
    """The target's own mode assignment, weighted by the result's self-normalized weights."""
    w = torch.softmax(res.log_weights, 0)
    return torch.zeros(target.n_components, dtype=torch.float64).index_add_(0, target.assign(res.samples), w)


def test_debias_recovers_the_mode_the_flow_never_samples():
    target = two_modes()
    flow = gaussian_flow([4.0, 0.0], torch.eye(2))  # all mass on the 0.7 mode
    plain = debias(flow, target, n=20000, modes=None, seed=0)
    assert weighted_mode_weights(target, plain)[0] < 0.01  # reweighting cannot create a mode
    assert plain.log_z - target.log_z == pytest.approx(math.log(0.7), abs=0.01)
    res = debias(flow, target, n=20000, seed=0)
    torch.testing.assert_close(weighted_mode_weights(target, res), target.weights.double(), atol=0.01,
                               rtol=0)
    assert abs(res.log_z - target.log_z) < 4 * res.log_z_se and res.log_z_se < 0.01
    assert res.ess > 0.5 and res.pareto_k < 0.5
    assert res.proposal_weights.tolist() == [0.5, 0.35, 0.15] and res.components.bincount().tolist() == \
        [10000, 7000, 3000]
    torch.testing.assert_close(res.mode_weights, torch.tensor([0.7, 0.3], dtype=torch.float64), atol=0.01,
                               rtol=0)
    g = torch.Generator().manual_seed(0)
    for method, tol in (("multinomial", 0.02), ("systematic", 0.005)):
        draws = res.resample(10000, method=method, generator=g)
        assert draws.shape == (10000, 2)
        assert float((target.assign(draws) == 0).double().mean()) == pytest.approx(0.3, abs=tol)


@pytest.mark.slow
def test_debias_after_fit():
    target = two_modes()
    torch.manual_seed(0)
    flow = KRFlow(2)
    krflows.fit(flow, target, steps=200, batch_size=256)
    res = debias(flow, target, n=20000, seed=0)
    torch.testing.assert_close(weighted_mode_weights(target, res), target.weights.double(), atol=0.015,
                               rtol=0)
    assert abs(res.log_z - target.log_z) < 4 * res.log_z_se


def test_debias_does_no_harm_on_a_gaussian():
    mean = torch.tensor([1.0, -2.0])
    cov = torch.tensor([[2.0, 0.6], [0.6, 1.0]])
    target = targets.Gaussian(mean, cov)  # log Z exact
    for flow in (gaussian_flow(mean, cov), gaussian_flow(mean + 0.5, 2.25 * cov)):
        res = debias(flow, target, n=10000, seed=1)
        assert len(res.modes) == 1
        assert abs(res.log_z - target.log_z) < 4 * res.log_z_se and res.log_z_se < 0.01
        assert res.ess > 0.7 and res.pareto_k < 0.5
        est, se = res.expectation(lambda x: x)
        assert ((est - mean.double()).abs() < 4 * se + 1e-3).all()


def test_student_t_density_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    loc = torch.tensor([[1.0, -1.0], [0.0, 2.0]], dtype=torch.float64)
    tril = torch.tensor([[[1.0, 0.0], [0.5, 2.0]], [[0.3, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    x = torch.randn(7, 2, dtype=torch.float64) * 2
    ours = student_t_log_prob(x, loc, tril, 4.0)
    for k in range(2):
        ref = stats.multivariate_t(loc[k].numpy(), (tril[k] @ tril[k].T).numpy(), df=4.0).logpdf(x.numpy())
        torch.testing.assert_close(ours[:, k], torch.as_tensor(ref), atol=1e-10, rtol=1e-10)


def test_debias_pyro_potential_and_guide():
    pyro = pytest.importorskip("pyro")
    dist = pytest.importorskip("pyro.distributions")
    integrate, stats = pytest.importorskip("scipy.integrate"), pytest.importorskip("scipy.stats")
    from krflows.pyro import AutoKRFlow, potential_from_model

    model = _two_mode_model(pyro, dist)
    potential = potential_from_model(model)
    modes = find_modes(potential, n_starts=64, seed=0)
    flow = gaussian_flow(modes.locations[0], modes.covariances[0])  # the 0.7 mode only
    res = debias(flow, potential, n=8000, modes=modes, seed=0)
    # log Z = log sum_k w_k N(m_k; 0, 101 I) + log int HalfNormal(s; 2) prod_i N(y_i; 0, s) ds
    y = [0.5, -1.0, 2.0]
    z_s = integrate.quad(lambda s: stats.halfnorm(scale=2).pdf(s) * stats.norm(0, s).pdf(y).prod(), 0,
                         math.inf)[0]
    normal = stats.multivariate_normal([0.0, 0.0], 101.0)
    log_z = math.log(z_s * (0.3 * normal.pdf([-4.0, 0.0]) + 0.7 * normal.pdf([4.0, 0.0])))
    assert abs(res.log_z - log_z) < 4 * res.log_z_se
    torch.testing.assert_close(res.mode_weights, torch.tensor([0.7, 0.3], dtype=torch.float64), atol=0.02,
                               rtol=0)
    sites = res.unpack()
    assert sites["mu"].shape == (8000, 2) and sites["s"].shape == (8000,) and bool((sites["s"] > 0).all())
    assert res.unpack(res.resample(5))["mu"].shape == (5, 2)

    pyro.clear_param_store()
    guide = AutoKRFlow(model, warmup=0)
    guide()
    guide.flow.affine.initialize(modes.locations[0].float(), modes.covariances[0].float())
    res = guide.debias(n=4000, modes=modes, seed=0)
    assert abs(res.log_z - log_z) < 4 * res.log_z_se
    assert float(res.mode_weights[1]) == pytest.approx(0.3, abs=0.03)


def test_debias_leaves_out_modes_too_light_to_draw():
    target = two_modes()
    flow = gaussian_flow([4.0, 0.0], torch.eye(2))
    modes = find_modes(target, box=(-10.0, 10.0), n_starts=32, seed=0)
    light = modes[[0, 1]]
    light.log_mass = light.log_mass + torch.tensor([0.0, -40.0], dtype=torch.float64)  # ~e^-40 weight
    assert len(modes[0]) == 1 and len(light) == 2
    res = debias(flow, target, n=1000, modes=light, seed=0)
    assert res.components.bincount(minlength=3).tolist() == [500, 500, 0]
    assert math.isfinite(res.log_z)  # the flow and mode 0 only: mode 1 is missed again
    assert res.log_z - target.log_z == pytest.approx(math.log(0.7), abs=0.05)


def test_debias_errors():
    target = two_modes()
    flow = gaussian_flow([4.0, 0.0], torch.eye(2))
    with pytest.raises(ValueError, match="alpha"):
        debias(flow, target, n=100, alpha=0.0)
    with pytest.raises(ValueError, match="modes must be"):
        debias(flow, target, n=100, modes="nearest")
    res = debias(flow, target, n=200, modes=None, seed=0)
    assert res.modes is None and res.proposal_weights.tolist() == [1.0]
    with pytest.raises(ValueError, match="no unpack"):
        res.unpack()
    with pytest.raises(ValueError, match="method"):
        res.resample(3, method="stratified")


def test_corrections_on_a_box_target_count_zero_weights_and_start_inside():
    """Probes: SIR's ESS left out the zero weights (0.9995 for a flow with 93% of its proposals
    outside the box; oracle: the ESS of all m weights), IMH started (and stayed) at points of zero
    density, a flat log p (no graph) crashed the mode search, and generator= drove only the
    resampling, not the flow's draws."""
    from krflows.correct import importance_resample
    from krflows.diagnostics.weights import ess
    from krflows.pyro import independence_mh

    flow = KRFlow(2, family="affine", layers=0).double()
    eye = torch.eye(2, dtype=torch.float64)
    flow.affine.initialize(torch.full((2,), 0.1, dtype=torch.float64), 0.09 * eye)

    def box(x, hi=0.2):
        return torch.where(((x >= 0) & (x <= hi)).all(-1), torch.zeros((), dtype=x.dtype), -math.inf)

    torch.manual_seed(0)
    r = importance_resample(flow, box, n=2000)
    assert r.ess == pytest.approx(float(ess(r.log_w)), rel=1e-9) and r.ess < 0.1
    chain = independence_mh(flow, box, n_steps=500, generator=torch.Generator().manual_seed(1))
    assert bool(torch.isfinite(box(chain.samples)).all())
    again = independence_mh(flow, box, n_steps=500, generator=torch.Generator().manual_seed(1))
    assert torch.equal(chain.samples, again.samples)
    a, b = (importance_resample(flow, box, 50, generator=torch.Generator().manual_seed(2)) for _ in range(2))
    assert torch.equal(a.samples, b.samples)
    # uniform on [0, 1]^2: log Z = 0; the flat target's mode search no longer crashes
    res = debias(flow, lambda x: box(x, 1.0), n=4000, seed=0)
    assert abs(res.log_z) < 4 * res.log_z_se + 0.02
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        importance_resample(flow, box, 0)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        debias(flow, box, n=0)
    with pytest.raises(ValueError, match="n must be an int >= 2"):
        krflows.diagnose(flow, box, n=1)
