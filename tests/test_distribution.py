"""flow() as a torch/Pyro distribution; deterministic marginal quantiles of a flow."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import FAMILY_NAMES, make_flow
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from scipy import stats
from torch.distributions import (
    Categorical,
    Distribution,
    MixtureSameFamily,
    MultivariateNormal,
    TransformedDistribution,
    constraints,
    kl_divergence,
)

import krflows
from krflows.distribution import FlowDistribution, marginal_quantiles, quasi_reference


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


MEAN = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
CHOL = torch.tensor([[2.0, 0, 0], [0.8, 1.0, 0], [-0.5, 0.3, 0.7]], dtype=torch.float64)
COV = CHOL @ CHOL.T


def gaussian_flow(order=None, family="affine", layers=0):
    """A flow whose law is exactly N(MEAN, COV): identity layers, affine stage = Cholesky."""
    flow = krflows.KRFlow(3, family=family, layers=layers, hidden=(8,), order=order).double()
    perm = list(range(3)) if order is None else list(order)
    # the affine stage acts in flow order: coordinate i of the map is user coordinate order[i]
    flow.affine.initialize(MEAN[perm], COV[perm][:, perm])
    return flow


def test_flow_call_returns_a_distribution_and_flow_of_z_is_still_the_map():
    flow = make_flow("spline", 3)
    q = flow()
    assert isinstance(q, Distribution) and isinstance(q, FlowDistribution)
    assert q.event_shape == (3,) and q.batch_shape == () and q.has_rsample
    assert q.support is constraints.real_vector
    z = torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(flow(z), flow.transform(z))
    assert q.sample((2, 5)).shape == (2, 5, 3) and q.rsample().shape == (3,)
    assert "FlowDistribution(dim=3)" == repr(q)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("order", [None, [2, 0, 1]])
def test_log_prob_is_the_flows_and_transformed_distributions(family, order):
    flow = make_flow(family, 3, order=order)
    q = flow()
    x = q.sample((50,))
    assert torch.equal(q.log_prob(x), flow.log_prob(x))
    # what a plain TransformedDistribution computes (inverse, then the forward log-det again)
    plain = TransformedDistribution(flow.base, flow.transform).log_prob(x)
    torch.testing.assert_close(q.log_prob(x), plain, rtol=0, atol=1e-9)


def test_exact_gaussian_density():
    flow = gaussian_flow(order=[1, 2, 0])
    x = MultivariateNormal(MEAN, COV).sample((20,))
    torch.testing.assert_close(flow().log_prob(x), MultivariateNormal(MEAN, COV).log_prob(x))


def test_gradients_reach_the_parameters_through_rsample_and_log_prob():
    flow = make_flow("spline", 3)
    q = flow()
    x, log_q = q.rsample_and_log_prob((64,))
    assert torch.equal(q.log_prob(x), log_q)  # the one-pass density, no inverse
    torch.testing.assert_close(log_q, flow.log_prob(x.detach()), rtol=0, atol=1e-9)
    (x.sum() + log_q.sum()).backward()
    grads = [p.grad for p in flow.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    flow.zero_grad()
    (-q.log_prob(q.sample((64,))).mean()).backward()  # maximum likelihood on fixed points
    assert sum(float(p.grad.abs().sum()) for p in flow.parameters()) > 0


def test_density_drawn_without_grad_is_not_reused_with_grad():
    flow = make_flow("affine", 2)
    q = flow()
    with torch.no_grad():
        x = q.rsample((8,))
    assert q.log_prob(x).requires_grad  # recomputed, with a graph


def test_reads_the_current_parameters():
    flow = gaussian_flow()
    q = flow()
    with torch.no_grad():
        flow.affine.shift.add_(10.0)
    x = q.sample((4,))
    torch.testing.assert_close(q.log_prob(x), flow.log_prob(x))
    assert float(x[:, 0].mean()) > 5


def test_expand_plates_and_mixture_same_family():
    flow = make_flow("spline", 3)
    q = flow().expand((4,))
    assert q.batch_shape == (4,) and q.sample((2,)).shape == (2, 4, 3)
    x = flow.sample((5,))
    assert q.log_prob(x[:, None]).shape == (5, 4)
    mix = MixtureSameFamily(Categorical(torch.ones(4, dtype=torch.float64)), q)
    torch.testing.assert_close(mix.log_prob(x), flow.log_prob(x))
    assert mix.sample((6,)).shape == (6, 3)
    with pytest.raises(ValueError, match="cannot expand"):
        q.expand((3,))


def test_no_closed_forms():
    a, b = make_flow("affine", 2)(), make_flow("affine", 2, seed=1)()
    with pytest.raises(NotImplementedError):
        kl_divergence(a, b)
    with pytest.raises(NotImplementedError, match="mean has no closed form: estimate it from samples"):
        a.mean  # noqa: B018
    for name in ("variance", "stddev"):
        with pytest.raises(NotImplementedError, match="variance has no closed form"):
            getattr(a, name)
    with pytest.raises(NotImplementedError, match="entropy has no closed form.*log_prob"):
        a.entropy()
    with pytest.raises(NotImplementedError, match="cdf has no closed form"):
        a.cdf(torch.zeros(2, dtype=torch.float64))
    x = a.rsample((4000,))  # the Monte Carlo estimate the module docstring points to
    assert float((a.log_prob(x) - b.log_prob(x)).mean().detach()) > 0


def test_pyro_sample_in_model_plate_and_as_svi_guide():
    flow = make_flow("spline", 2, std=0.1).float()

    def prior_model():
        with pyro.plate("p", 4):
            x = pyro.sample("x", flow())
            pyro.sample("y", dist.Normal(x.sum(-1), 1.0), obs=torch.zeros(4))

    trace = pyro.poutine.trace(prior_model).get_trace()
    trace.compute_log_prob()
    assert trace.nodes["x"]["value"].shape == (4, 2) and trace.nodes["x"]["log_prob"].shape == (4,)

    target = dist.MultivariateNormal(torch.tensor([1.0, -1.0]), torch.tensor([[1.0, 0.5], [0.5, 2.0]]))

    def model():
        pyro.sample("x", target)

    def guide():
        pyro.sample("x", pyro.module("flow", flow)())

    before = [p.detach().clone() for p in flow.parameters()]
    svi = SVI(model, guide, Adam({"lr": 0.02}), Trace_ELBO(num_particles=16, vectorize_particles=True))
    losses = [svi.step() for _ in range(60)]
    assert not all(torch.equal(a, b) for a, b in zip(before, flow.parameters(), strict=True))
    assert sum(losses[-10:]) < sum(losses[:10])


# ---- deterministic marginal quantiles ------------------------------------------------------

LEVELS = [0.025, 0.25, 0.5, 0.9, 0.99]


def test_quasi_reference_is_fixed_and_stratified():
    z = quasi_reference(2**12, 3, seed=5, dtype=torch.float64)
    assert torch.equal(z, quasi_reference(2**12, 3, seed=5, dtype=torch.float64))
    assert not torch.equal(z, quasi_reference(2**12, 3, seed=6, dtype=torch.float64))
    u = torch.special.ndtr(z)
    counts = torch.stack([torch.bincount((u[:, k] * 2**12).long(), minlength=2**12) for k in range(3)])
    assert bool((counts == 1).all())  # one point per cell in each coordinate


@pytest.mark.parametrize("order", [None, [2, 0, 1]])
def test_marginal_quantiles_of_an_exact_gaussian(order):
    flow = gaussian_flow(order)
    got = marginal_quantiles(flow, LEVELS)
    sd, u = COV.diagonal().sqrt(), stats.norm.ppf(LEVELS)[:, None]
    exact = torch.as_tensor(u * sd.numpy() + MEAN.numpy())
    first = 0 if order is None else order[0]
    torch.testing.assert_close(got[:, first], exact[:, first], rtol=0, atol=1e-12)  # exact coordinate
    # the others: within one standard error of a plain Monte Carlo quantile from as many draws
    p = torch.tensor(LEVELS, dtype=torch.float64)[:, None]
    se = (p * (1 - p) / 2**15).sqrt() * sd / torch.as_tensor(stats.norm.pdf(u))
    assert bool(((got - exact).abs() < se).all()), (got - exact) / se
    assert torch.equal(got, marginal_quantiles(flow, LEVELS))  # deterministic


def test_marginal_quantiles_of_a_nonlinear_flow_match_many_draws():
    flow = make_flow("spline", 3, std=0.4)
    got = marginal_quantiles(flow, LEVELS)
    torch.manual_seed(0)
    draws = flow.sample((100_000,))
    mc = torch.stack([draws[:, k].quantile(torch.tensor(LEVELS, dtype=draws.dtype)) for k in range(3)], -1)
    scale = draws.std(0)
    assert bool(((got - mc).abs() < 0.04 * scale).all()), (got - mc) / scale  # MC error ~0.015 sd


def test_marginal_quantile_levels_are_checked():
    flow = make_flow("affine", 2)
    for bad in ([0.0, 0.5], [1.0], []):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            marginal_quantiles(flow, bad)


def test_a_cached_log_prob_is_not_served_after_an_in_place_change():
    """A probe: log_prob of the distribution's own last rsample returned the cached log q after
    an optimizer-like step on the parameters, and after an in-place edit of the sample."""
    flow = krflows.KRFlow(2, layers=2, hidden=(16, 16))
    q = flow()
    x, log_q = q.rsample_and_log_prob((3,))
    assert q.log_prob(x) is log_q or torch.equal(q.log_prob(x), log_q)  # the cache serves
    with torch.no_grad():
        flow.affine.log_diag.add_(1.0)
    torch.testing.assert_close(q.log_prob(x), flow.log_prob(x.detach()))
    x = q.rsample((3,))
    with torch.no_grad():
        x.add_(100.0)
    torch.testing.assert_close(q.log_prob(x), flow.log_prob(x.detach()))
