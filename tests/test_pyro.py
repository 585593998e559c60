"""Pyro integration: model potentials, the AutoKRFlow guide, IMH/SIR correction, NeuTra."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.mcmc.util import initialize_model
from pyro.optim import Adam

import krflows
from krflows.pyro import (
    AutoKRFlow,
    importance_resample,
    independence_mh,
    neutra_nuts,
    potential_from_model,
    self_normalized_expectation,
)


@pytest.fixture(autouse=True)
def _clean_param_store():
    torch.set_num_threads(1)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


# ---- models ---------------------------------------------------------------------------------

Y = torch.tensor([[0.8, -0.3], [1.4, 0.1], [0.5, -0.9], [1.1, 0.4], [0.9, -0.2]])
PRIOR_SD = 2.0


def normal_normal(y):
    """``mu ~ N(0, 2^2 I_2)``, ``y_i ~ N(mu, I_2)``: conjugate."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), PRIOR_SD).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y)


def normal_normal_posterior(y):
    precision = 1 / PRIOR_SD**2 + y.shape[0]
    return y.sum(0) / precision, torch.full((2,), 1 / precision)


def constrained(y):
    """Positive, unit-interval and simplex sites, a plate, and a nested plate of data."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    s = pyro.sample("s", dist.HalfCauchy(1.0))
    p = pyro.sample("p", dist.Dirichlet(torch.ones(3)))
    with pyro.plate("groups", y.shape[1]):
        theta = pyro.sample("theta", dist.Beta(2.0, 3.0))
        with pyro.plate("data", y.shape[0], dim=-2):
            pyro.sample("y", dist.Normal(mu + theta + p[..., 0], s), obs=y)


Y_CON = torch.tensor([[0.3, 1.2, -0.4, 0.8], [0.9, 0.1, 0.5, 1.5], [-0.2, 0.7, 0.2, 1.1]])


def discrete(y):
    k = pyro.sample("k", dist.Bernoulli(0.3))
    mu = pyro.sample("mu", dist.Normal(k, 1.0))
    pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


# ---- potential_from_model -------------------------------------------------------------------

def _pyro_log_density(model, args, potential, x):
    """``-potential_fn`` of Pyro's own initialize_model, one point at a time."""
    _, potential_fn, _, _ = initialize_model(model, args)
    out = []
    for row in x:
        params, pos = {}, 0
        for name, shape in potential.unconstrained_shapes.items():
            params[name] = row[pos:pos + shape.numel()].reshape(shape)
            pos += shape.numel()
        out.append(-potential_fn(params))
    return torch.stack(out)


@pytest.mark.parametrize("vectorize", [True, False])
def test_potential_agrees_with_pyro(vectorize):
    potential = potential_from_model(constrained, Y_CON, vectorize=vectorize)
    assert isinstance(potential, krflows.targets.Target)
    assert potential.site_names == ["mu", "s", "p", "theta"]
    assert potential.site_shapes == {"mu": (), "s": (), "p": (3,), "theta": (4,)}
    assert potential.dim == 1 + 1 + 2 + 4
    assert potential.max_plate_nesting == 2
    x = torch.randn(9, potential.dim)
    expected = _pyro_log_density(constrained, (Y_CON,), potential, x)
    torch.testing.assert_close(potential(x), expected, rtol=1e-5, atol=1e-4)
    # any batch shape (*, dim)
    assert potential(x.reshape(3, 3, -1)).shape == (3, 3)


def test_potential_unpack_respects_supports():
    potential = potential_from_model(constrained, Y_CON)
    values = potential.unpack(3 * torch.randn(50, potential.dim))
    assert values["mu"].shape == (50,) and values["theta"].shape == (50, 4)
    assert bool((values["s"] > 0).all())
    assert bool(((values["theta"] > 0) & (values["theta"] < 1)).all())
    torch.testing.assert_close(values["p"].sum(-1), torch.ones(50))
    assert potential.init.shape == (potential.dim,)


def test_potential_is_differentiable():
    potential = potential_from_model(normal_normal, Y)
    x = torch.randn(5, 2, requires_grad=True)
    potential(x).sum().backward()
    assert bool(torch.isfinite(x.grad).all())


def test_discrete_site_is_named():
    with pytest.raises(ValueError, match=r"discrete latent site\(s\) \['k'\]"):
        potential_from_model(discrete, torch.tensor(0.5))
    guide = AutoKRFlow(discrete)
    with pytest.raises(ValueError, match="'k'"):
        guide(torch.tensor(0.5))


def test_non_broadcasting_model_error_is_clear():
    def bad(y):
        p = pyro.sample("p", dist.Dirichlet(torch.ones(3)))
        pyro.sample("y", dist.Normal(p[0], 1.0), obs=y)  # p[0] indexes the batch, not the event

    potential = potential_from_model(bad, torch.tensor(0.1))
    with pytest.raises((ValueError, RuntimeError)):
        potential(torch.zeros(4, 2))
    loop = potential_from_model(bad, torch.tensor(0.1), vectorize=False)
    assert loop(torch.zeros(4, 2)).shape == (4,)


# ---- AutoKRFlow -----------------------------------------------------------------------------

def _train(model, guide, args, steps, lr=1e-2, particles=8):
    svi = SVI(model, guide, Adam({"lr": lr}),
              Trace_ELBO(num_particles=particles, vectorize_particles=True))
    return [svi.step(*args) for _ in range(steps)]


@pytest.mark.slow
def test_autokrflow_matches_conjugate_posterior():
    torch.manual_seed(0)
    guide = AutoKRFlow(normal_normal, layers=1, hidden=(16,), warmup=100)
    losses = _train(normal_normal, guide, (Y,), steps=200)
    assert math.isfinite(losses[-1])
    mean, var = normal_normal_posterior(Y)
    with torch.no_grad():
        x = guide.get_posterior().sample((4000,))
    se_mean = (var / 4000).sqrt()
    assert bool(((x.mean(0) - mean).abs() < 5 * se_mean + 0.02).all()), (x.mean(0), mean)
    assert bool(((x.var(0) / var - 1).abs() < 0.15).all()), (x.var(0), var)
    # Predictive draws through the guide (it keeps a singleton plate dim, as for AutoDiagonalNormal)
    samples = Predictive(normal_normal, guide=guide, num_samples=200, return_sites=["mu"])(Y)
    assert samples["mu"].shape == (200, 1, 2)


def test_autokrflow_flow_is_strictly_triangular():
    guide = AutoKRFlow(constrained, layers=2, hidden=(16,), warmup=5)
    guide(Y_CON)
    with torch.no_grad():  # random parameters: no structure by accident
        for p in guide.flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    transform = guide.get_transform()  # built after the change: it captures the parameters
    z = torch.randn(guide.latent_dim)
    jac = torch.autograd.functional.jacobian(lambda v: guide.get_transform()(v), z)
    assert jac.shape == (8, 8)
    assert float(jac.triu(1).abs().max()) == 0.0
    assert bool((jac.diagonal() > 0).all())
    # the one-pass transform's log|det| equals the autograd Jacobian's
    x = transform(z)
    torch.testing.assert_close(transform.log_abs_det_jacobian(z, x),
                               jac.diagonal().log().sum(), rtol=1e-4, atol=1e-4)


def test_autokrflow_constrained_sites_train_and_respect_supports():
    torch.manual_seed(1)
    guide = AutoKRFlow(constrained, layers=1, hidden=(16,), warmup=50)
    losses = _train(constrained, guide, (Y_CON,), steps=30, particles=4)
    assert all(math.isfinite(v) for v in losses)
    samples = Predictive(constrained, guide=guide, num_samples=100,
                         return_sites=["mu", "s", "p", "theta"])(Y_CON)
    samples = {k: v.reshape(100, -1).squeeze(-1) for k, v in samples.items()}
    assert samples["theta"].shape == (100, 4)
    assert bool((samples["s"] > 0).all())
    assert bool(((samples["theta"] > 0) & (samples["theta"] < 1)).all())
    torch.testing.assert_close(samples["p"].sum(-1), torch.ones(100))
    draw = guide(Y_CON)
    assert set(draw) == {"mu", "s", "p", "theta"}
    # the guide keeps the potential of its first call (for IMH / importance resampling)
    assert guide.potential is not None and guide.potential.dim == guide.latent_dim


@pytest.mark.slow
def test_neutra_nuts_runs_on_trained_guide():
    torch.manual_seed(2)
    guide = AutoKRFlow(normal_normal, layers=1, hidden=(8,), warmup=100)
    _train(normal_normal, guide, (Y,), steps=50)
    samples = neutra_nuts(normal_normal, guide, 30, 30, Y)
    assert samples["mu"].shape == (30, 2)
    assert bool(torch.isfinite(samples["mu"]).all())
    mean, var = normal_normal_posterior(Y)
    assert bool(((samples["mu"].mean(0) - mean).abs() < 6 * (var / 30).sqrt() + 0.05).all())
    assert all(p.requires_grad for p in guide.flow.parameters())


# ---- importance resampling and independence MH ----------------------------------------------

def _wrong_flow(dim=2):
    """A Gaussian flow slightly off the N(m, C) target below: shifted and 20% too wide."""
    flow = krflows.KRFlow(dim, family="affine", layers=0).double()
    flow.affine.initialize(torch.tensor([0.9, -0.4]), torch.tensor([[1.2**2, 0.3], [0.3, 0.7]]))
    return flow


TARGET = krflows.targets.Gaussian(torch.tensor([1.0, -0.5]), torch.tensor([[1.0, 0.3], [0.3, 0.5]]),
                                  dtype=torch.float64)


def test_independence_mh_corrects_a_wrong_flow():
    torch.manual_seed(3)
    result = independence_mh(_wrong_flow(), TARGET, n_steps=6000, batch_size=2000)
    assert 0.0 < result.acceptance_rate <= 1.0
    assert result.samples.shape == (6000, 2) and result.log_w.shape == (6000,)
    x = result.samples[500:]
    # IMH autocorrelation at ~0.7 acceptance: allow ~3x the iid standard error
    torch.testing.assert_close(x.mean(0), TARGET.mean, atol=0.08, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), TARGET.cov, atol=0.1, rtol=0)


def test_independence_mh_with_exact_flow_accepts_everything():
    flow = krflows.KRFlow(2, family="affine", layers=0).double()
    flow.affine.initialize(TARGET.mean, TARGET.cov)
    result = independence_mh(flow, TARGET, n_steps=200, x0=TARGET.mean)
    assert result.acceptance_rate > 0.99


def test_importance_resample_and_self_normalized():
    torch.manual_seed(4)
    res = importance_resample(_wrong_flow(), TARGET, n=4000, m=40000)
    assert res.samples.shape == (4000, 2) and 0 < res.ess <= 1
    torch.testing.assert_close(res.samples.mean(0), TARGET.mean, atol=0.06, rtol=0)
    est, se = self_normalized_expectation(_wrong_flow(), TARGET, lambda x: x, n=20000)
    assert bool(((est - TARGET.mean.double()).abs() < 5 * se + 1e-3).all()), (est, se)


def test_corrections_live_in_correct_and_follow_the_nan_policy():
    from krflows import correct
    from krflows.objectives import NonFiniteTargetError

    assert krflows.pyro.importance_resample is correct.importance_resample
    assert krflows.pyro.independence_mh is correct.independence_mh

    def half_nan(x):
        lp = TARGET.log_prob(x)
        return torch.where(x[..., 0] > float(TARGET.mean[0]), lp, torch.full_like(lp, math.nan))

    with pytest.raises(NonFiniteTargetError, match="nan='zero'"):
        correct.importance_resample(_wrong_flow(), half_nan, n=100)
    res = correct.importance_resample(_wrong_flow(), half_nan, n=1000, nan="zero")
    assert bool((res.samples[:, 0] > TARGET.mean[0]).all())  # NaN read as zero density: never drawn
    assert correct.independence_mh(_wrong_flow(), half_nan, 50, nan="zero").samples.shape == (50, 2)


def test_imh_on_model_potential():
    torch.manual_seed(5)
    potential = potential_from_model(normal_normal, Y)
    mean, var = normal_normal_posterior(Y)
    flow = krflows.KRFlow(2, family="affine", layers=0)
    flow.affine.initialize(mean + 0.05, torch.diag(var * 1.3))
    result = independence_mh(flow, potential, n_steps=3000)
    assert result.acceptance_rate > 0.5
    torch.testing.assert_close(result.samples.mean(0), mean, atol=0.05, rtol=0)


# ---- scale: eight schools -------------------------------------------------------------------

Y8 = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
S8 = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
SCHOOLS_MU, SCHOOLS_MU_SD = 4.4, 3.3  # the posterior of mu (long NUTS runs; literature)


def schools_noncentred(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", y.shape[-1]):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * theta_tilde, sigma), obs=y)


@pytest.mark.slow
def test_autokrflow_eight_schools_gets_the_scale():
    """Pyro's AutoNormalizingFlow misses E[mu] by about one posterior sd on this model; the
    flow's affine stage, initialised by Gaussian VI on the potential, starts at the right
    location and scale, and a short SVI run ends within half an sd."""
    pyro.set_rng_seed(0)
    guide = AutoKRFlow(schools_noncentred, layers=2, hidden=(32, 32), warmup=200)
    losses = _train(schools_noncentred, guide, (Y8, S8), steps=120, particles=8)
    assert all(math.isfinite(v) for v in losses)
    with torch.no_grad():
        values = guide.potential.unpack(guide.flow.sample((20000,)))
    mu, tau = values["mu"], values["tau"]
    assert abs(float(mu.mean()) - SCHOOLS_MU) < 0.5 * SCHOOLS_MU_SD, float(mu.mean())
    assert 0.7 * SCHOOLS_MU_SD < float(mu.std()) < 1.3 * SCHOOLS_MU_SD, float(mu.std())
    assert 2.0 < float(tau.mean()) < 5.5, float(tau.mean())  # reference 3.6 ± 3.2: heavy tail
    # the mode search on the potential finds one maximum, covered: no false alarm
    report = krflows.diagnose(guide.flow, guide.potential, n=4000, seed=0, n_sub=200)
    assert report["n_modes_found"] >= 1 and report["n_missed_modes"] == 0, report["missed_modes"]


# ---- more constraints: an ordered vector; NeuTra on plated sites ----------------------------

def ordered(y):
    """Cut points with an ordered-vector support, and a plate of observations."""
    base = dist.Normal(torch.zeros(3), 2.0).to_event(1)
    c = pyro.sample("c", dist.TransformedDistribution(base, [dist.transforms.OrderedTransform()]))
    s = pyro.sample("s", dist.LogNormal(0.0, 0.5))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(c[..., 0] + c[..., 2] - c[..., 1], s), obs=y)


Y_ORD = torch.tensor([0.4, 1.1, -0.3, 0.8, 0.2])


def test_ordered_site_potential_and_guide():
    potential = potential_from_model(ordered, Y_ORD)
    assert potential.site_shapes == {"c": (3,), "s": ()}
    x = torch.randn(6, potential.dim)
    expected = _pyro_log_density(ordered, (Y_ORD,), potential, x)
    torch.testing.assert_close(potential(x), expected, rtol=1e-5, atol=1e-4)
    torch.manual_seed(6)
    guide = AutoKRFlow(ordered, layers=1, hidden=(8,), warmup=20)
    losses = _train(ordered, guide, (Y_ORD,), steps=10, particles=4)
    assert all(math.isfinite(v) for v in losses)
    samples = Predictive(ordered, guide=guide, num_samples=200, return_sites=["c"])(Y_ORD)["c"]
    c = samples.reshape(200, 3)
    assert bool((c[:, 1:] > c[:, :-1]).all()), "the ordered site must stay increasing"


@pytest.mark.slow
def test_neutra_nuts_on_plated_and_constrained_sites():
    """``neutra_nuts`` maps a batch of reference draws to sites with plate dims and supports."""
    torch.manual_seed(7)
    guide = AutoKRFlow(constrained, layers=1, hidden=(8,), warmup=50)
    _train(constrained, guide, (Y_CON,), steps=20, particles=4)
    samples = neutra_nuts(constrained, guide, 15, 15, Y_CON, max_tree_depth=4)
    assert samples["theta"].shape == (15, 4) and samples["p"].shape == (15, 3)
    assert bool((samples["s"] > 0).all())
    assert bool(((samples["theta"] > 0) & (samples["theta"] < 1)).all())
    torch.testing.assert_close(samples["p"].sum(-1), torch.ones(15))


# ---- minibatch SVI (subsampled plates) ------------------------------------------------------

Y_BIG = 1.0 + torch.randn(200, generator=torch.Generator().manual_seed(8))


def minibatch(y, subsample_size=None):
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    with pyro.plate("data", y.shape[0], subsample_size=subsample_size) as idx:
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])


def local_latents(y, subsample_size=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", y.shape[0], subsample_size=subsample_size) as idx:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Normal(z, 1.0), obs=y[idx])


def test_subsampled_potential_warns_and_is_an_unbiased_noisy_estimate():
    full = potential_from_model(minibatch, Y_BIG)
    assert full.subsampled_plates == {}
    with pytest.warns(krflows.pyro.SubsampledPotentialWarning, match="noisy minibatch estimate"):
        mini = potential_from_model(minibatch, Y_BIG, 20)
    assert mini.subsampled_plates == {"data": (20, 200)}
    x = torch.tensor([[0.9], [1.1]])
    torch.manual_seed(9)
    draws = torch.stack([mini(x) for _ in range(400)])  # a fresh minibatch per evaluation
    assert float(draws.std(0).min()) > 1.0, "each evaluation should see a different minibatch"
    se = draws.std(0) / 20
    assert bool(((draws.mean(0) - full(x)).abs() < 5 * se).all()), (draws.mean(0), full(x), se)


@pytest.mark.slow
def test_autokrflow_minibatch_svi():
    """SVI with a subsampled plate trains the guide; its minibatch potential is refused, and the
    full-data potential serves for importance resampling."""
    pyro.set_rng_seed(10)
    guide = AutoKRFlow(minibatch, layers=1, hidden=(8,), warmup=100)
    losses = _train(minibatch, guide, (Y_BIG, 20), steps=150, particles=4)
    assert all(math.isfinite(v) for v in losses)
    with pytest.raises(ValueError, match="subsamples plate"):
        guide.potential  # noqa: B018
    precision = 1 / PRIOR_SD**2 + Y_BIG.shape[0]
    mean, sd = float(Y_BIG.sum()) / precision, precision**-0.5
    with torch.no_grad():
        x = guide.flow.sample((4000,))
    assert abs(float(x.mean()) - mean) < 3 * sd, (float(x.mean()), mean, sd)
    full = potential_from_model(minibatch, Y_BIG)
    res = importance_resample(guide.flow, full, n=2000, m=8000)
    assert abs(float(res.samples.mean()) - mean) < 0.5 * sd, (float(res.samples.mean()), mean)
    assert 0.4 * sd < float(res.samples.std()) < 1.6 * sd


def test_local_latents_in_subsampled_plate_need_the_sparse_guide():
    with pytest.raises(ValueError, match=r"\['z'\] lie in a subsampled plate"):
        potential_from_model(local_latents, Y_BIG, 20)
    with pytest.raises(ValueError, match="only the sparse flow"):
        AutoKRFlow(local_latents, sparse=False)(Y_BIG, 20)
    pyro.clear_param_store()
    guide = AutoKRFlow(local_latents, layers=1, hidden=(8,))  # sparse: pushes the 20 members of a batch
    assert guide(Y_BIG, 20)["z"].shape == (20,) and guide.latent_dim == 1 + 200
    assert potential_from_model(local_latents, Y_BIG).dim == 1 + 200  # in full: fine


@pytest.mark.parametrize("nesting", [1, 2, None])
def test_guide_warm_up_inside_vectorized_particles_with_exact_max_plate_nesting(nesting):
    # The guide's first call (its warm-up evaluates the model's potential) happens inside SVI's
    # particle plate at dim -(nesting + 1); with the exact nesting that used to collide with the
    # potential's own points plate. The step must run and the loss be finite.
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("g", y.shape[-1]):
            eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(mu + eta, 1.0), obs=y)

    pyro.clear_param_store()
    torch.manual_seed(0)
    y = torch.randn(5)
    kwargs = {} if nesting is None else {"max_plate_nesting": nesting}
    for sparse in (True, False):
        pyro.clear_param_store()
        svi = pyro.infer.SVI(model, krflows.pyro.AutoKRFlow(model, warmup=5, sparse=sparse),
                             pyro.optim.Adam({"lr": 1e-3}),
                             pyro.infer.Trace_ELBO(num_particles=4, vectorize_particles=True, **kwargs))
        assert math.isfinite(svi.step(y))
    from pyro.poutine import runtime
    assert runtime._PYRO_STACK == [] and all(d is None for d in runtime._DIM_ALLOCATOR._stack)
