"""AutoKRFlow.median/quantiles (deterministic, exact where the KR map allows) and param-store reloads."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import randomized
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal
from pyro.nn import PyroParam
from pyro.optim import Adam
from scipy import stats
from torch.distributions import constraints

from krflows.pyro import AutoKRFlow


@pytest.fixture(autouse=True)
def _clean():
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


class BelowTwo(dist.TorchDistribution):
    """``2 - Exponential(1)``: support ``less_than(2)``, whose bijection decreases."""

    arg_constraints: dict = {}
    support = constraints.less_than(2.0)

    def __init__(self):
        super().__init__(torch.Size(), torch.Size())

    def sample(self, sample_shape=()):
        return 2.0 - torch.distributions.Exponential(torch.tensor(1.0)).sample(sample_shape)

    def log_prob(self, x):
        return -(2.0 - x)


def model(with_below=True):
    pyro.sample("a", dist.Normal(0.0, 1.0))
    pyro.sample("s", dist.LogNormal(0.0, 1.0))
    pyro.sample("b", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    pyro.sample("c", dist.Uniform(-1.0, 3.0))
    if with_below:
        pyro.sample("d", BelowTwo())


MEAN = torch.tensor([0.3, -0.5, 1.0, 0.0, 0.2, 0.1], dtype=torch.float64)
L = torch.tensor([[0.8, 0, 0, 0, 0, 0], [0.3, 0.5, 0, 0, 0, 0], [-0.2, 0.1, 1.2, 0, 0, 0],
                  [0.4, 0.0, 0.3, 0.6, 0, 0], [0.0, 0.2, -0.1, 0.3, 0.7, 0], [0.1, 0.0, 0.2, 0.0, 0.1, 0.5]],
                 dtype=torch.float64)
LEVELS = [0.05, 0.25, 0.5, 0.9]


def exact_gaussian_guide(dim=6, **kw):
    """An AutoKRFlow whose latent law is exactly N(MEAN, L L^T) (identity layers)."""
    guide = AutoKRFlow(lambda: model(dim == 6), warmup=0, layers=1, hidden=(8,), **kw)
    guide()
    guide.flow.affine.initialize(MEAN[:dim], L[:dim, :dim] @ L[:dim, :dim].T)
    return guide


def closed_form(levels, dim=6):
    """Per-site quantiles of the exact Gaussian pushed through the sites' bijections."""
    sd = (L[:dim, :dim] @ L[:dim, :dim].T).diagonal().sqrt()
    u = torch.as_tensor(stats.norm.ppf(levels))[:, None] * sd + MEAN[:dim]
    flip = torch.as_tensor(stats.norm.ppf([1 - q for q in levels]))[:, None] * sd + MEAN[:dim]
    out = {"a": u[:, 0], "s": u[:, 1].exp(), "b": u[:, 2:4], "c": -1 + 4 * torch.sigmoid(u[:, 4])}
    if dim == 6:
        out["d"] = 2 - flip[:, 5].exp()  # less_than: the map decreases, level 1 - q
    return out, sd


def test_quantiles_of_an_exact_gaussian_are_its_closed_form():
    guide = exact_gaussian_guide()
    got = guide.quantiles(LEVELS)
    exact, sd = closed_form(LEVELS)
    assert set(got) == set(exact)
    torch.testing.assert_close(got["a"], exact["a"], rtol=0, atol=1e-12)  # the leading coordinate: exact
    # the others: quasi-Monte Carlo, within a Monte Carlo standard error of as many draws
    p = torch.tensor(LEVELS)
    density = torch.as_tensor(stats.norm.pdf(stats.norm.ppf(LEVELS)))
    se_u = (p * (1 - p) / guide.quantile_draws).sqrt() / density
    for name, lo, hi in [("s", 1, 2), ("b", 2, 4), ("c", 4, 5), ("d", 5, 6)]:
        # the error in the unconstrained quantile, in standard errors
        unmap = {"s": torch.log, "b": lambda v: v, "c": lambda v: torch.logit((v + 1) / 4),
                 "d": lambda v: torch.log(2 - v)}[name]
        err = (unmap(got[name]) - unmap(exact[name])).reshape(len(LEVELS), -1)
        assert bool((err.abs() < se_u[:, None] * sd[lo:hi]).all()), (name, err)
    assert got["b"].shape == (4, 2) and got["a"].shape == (4,)


def test_quantiles_and_median_are_deterministic():
    guide = exact_gaussian_guide()
    randomized(guide.flow.conditioners, std=0.3)
    first, again = guide.quantiles(LEVELS), guide.quantiles(LEVELS)
    assert all(torch.equal(first[k], again[k]) for k in first)
    median = guide.median()
    assert all(torch.equal(median[k], guide.quantiles([0.5])[k][0]) for k in median)
    exact, _ = closed_form([0.5])
    pyro.clear_param_store()  # (a second guide of the same name would take the first one's flow)
    torch.testing.assert_close(exact_gaussian_guide().median()["a"], exact["a"][0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        guide.quantiles([0.0, 0.5])


def test_agrees_with_pyros_multivariate_normal_guide_on_the_same_gaussian():
    ours = exact_gaussian_guide(dim=5)
    peer = AutoMultivariateNormal(lambda: model(False))
    peer()
    chol = L[:5, :5]
    peer.loc = torch.nn.Parameter(MEAN[:5].clone())
    peer.scale = PyroParam(chol.diagonal().clone(), dist.constraints.softplus_positive)
    peer.scale_tril = PyroParam(chol / chol.diagonal()[:, None], dist.constraints.unit_lower_cholesky)
    for a, b in [(ours.quantiles(LEVELS), peer.quantiles(LEVELS)), (ours.median(), peer.median())]:
        assert set(a) == set(b)
        for name in a:
            assert a[name].shape == b[name].shape, name
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0.01)
    torch.testing.assert_close(ours.quantiles(LEVELS)["a"], peer.quantiles(LEVELS)["a"], rtol=0, atol=1e-12)


def simplex_model():
    pyro.sample("m", dist.Normal(0.0, 1.0))
    pyro.sample("p", dist.Dirichlet(torch.ones(3)))
    with pyro.plate("g", 2):
        pyro.sample("t", dist.Beta(2.0, 3.0))


def test_nonlinear_flow_and_a_simplex_site_match_many_of_its_own_draws():
    guide = AutoKRFlow(simplex_model, warmup=0, layers=2, hidden=(8,))
    guide()
    randomized(guide.flow, std=0.3)
    got = guide.quantiles(LEVELS)
    torch.manual_seed(3)
    draws = guide.potential.unpack(guide.flow.sample((100_000,)))
    for name, value in draws.items():
        mc = torch.quantile(value, torch.tensor(LEVELS), dim=0)
        scale = value.std(0)
        assert got[name].shape == mc.shape == (4, *guide.potential.site_shapes[name])
        assert bool(((got[name] - mc).abs() < 0.04 * scale).all()), (name, got[name], mc)


# ---- a saved param store restores the flow, or fails loudly ---------------------------------

Y = torch.tensor([0.8, 1.4, 0.5, 1.1])


def normal_model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, s), obs=y)


def trained_guide(**kw):
    torch.manual_seed(0)
    guide = AutoKRFlow(normal_model, layers=1, hidden=(8,), warmup=10, **kw)
    svi = SVI(normal_model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(10):
        svi.step(Y)
    return guide, svi


def state(guide):
    return {k: v.detach().clone() for k, v in guide.flow.state_dict().items()}


def test_a_loaded_param_store_restores_the_flow_of_a_fresh_guide(tmp_path):
    guide, _ = trained_guide()
    saved, quantiles = state(guide), guide.quantiles(LEVELS)
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "params.pt")
    fresh = AutoKRFlow(normal_model, layers=1, hidden=(8,), warmup=10)
    fresh(Y)
    assert all(torch.equal(saved[k], v) for k, v in state(fresh).items())
    assert all(torch.equal(quantiles[k], v) for k, v in fresh.quantiles(LEVELS).items())
    # training goes on from there: the store holds the flow's own parameters
    svi = SVI(normal_model, fresh, Adam({"lr": 0.01}), Trace_ELBO())
    svi.step(Y)
    assert not all(torch.equal(saved[k], v) for k, v in state(fresh).items())
    store = pyro.get_param_store()
    for name, p in fresh.flow.named_parameters():
        assert store[f"AutoKRFlow.flow$$${name}"] is p


def test_a_param_store_loaded_after_the_first_call_is_taken_in(tmp_path):
    guide, _ = trained_guide()
    saved = state(guide)
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.clear_param_store()
    fresh = AutoKRFlow(normal_model, layers=1, hidden=(8,), warmup=3)
    fresh(Y)  # a new flow, registered in the (cleared) store
    assert not all(torch.equal(saved[k], v) for k, v in state(fresh).items())
    pyro.get_param_store().load(tmp_path / "params.pt")
    fresh.median()
    assert all(torch.equal(saved[k], v) for k, v in state(fresh).items())


def test_a_param_store_of_another_flow_fails_loudly(tmp_path):
    trained_guide()
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "params.pt")
    other = AutoKRFlow(normal_model, layers=1, hidden=(16,), warmup=3)
    with pytest.raises(ValueError, match="param store holds a flow under 'AutoKRFlow.flow' that does not "
                                         "fit this guide's flow .*shapes.*pyro.clear_param_store"):
        other(Y)


def test_frozen_parameters_are_not_taken_for_a_foreign_store():
    guide = AutoKRFlow(normal_model, layers=1, hidden=(8,), warmup=3)
    guide(Y)
    pyro.clear_param_store()
    guide.flow.affine.requires_grad_(False)  # pyro.module registers only the trainable ones
    with pytest.warns(UserWarning, match="requires_grad=False"):
        guide(Y)
    before = state(guide)
    guide(Y)
    assert all(torch.equal(before[k], v) for k, v in state(guide).items())
