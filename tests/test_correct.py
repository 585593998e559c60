"""krflows.correct: mode search and the defensive mixture correction, against oracles built
elsewhere (the targets' exact means, weights, log Z and analytic modes; finite differences)."""


import pytest
import torch

import krflows
from krflows import KRFlow, targets
from krflows.correct import ModeSet, find_modes
from krflows.correct.modes import _hessian


def gaussian_flow(mean, cov, dtype=torch.float32) -> KRFlow:
    """A flow that is exactly N(mean, cov)."""
    flow = KRFlow(len(mean), transform="affine", layers=0).to(dtype)
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
    assert krflows.find_modes is find_modes
