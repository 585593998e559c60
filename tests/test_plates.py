"""Plated Pyro models: graph-free guide draws, plate detection, the sparse AutoKRFlow."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.predictive import _predictive
from pyro.optim import Adam
from torch.distributions import Transform

from krflows.pyro import AutoKRFlow


@pytest.fixture(autouse=True)
def _clean_param_store():
    torch.set_num_threads(1)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def hierarchical(y, sigma):
    """The non-centred hierarchical normal model (eight schools, ``J`` groups)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("groups", y.shape[-1]):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * eta, sigma), obs=y)


def _data(J, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(J, generator=g) * 2 + 1, 0.5 + torch.rand(J, generator=g)


def _train(model, guide, args, steps, particles=2, lr=1e-2):
    svi = SVI(model, guide, Adam({"lr": lr}), Trace_ELBO(num_particles=particles, vectorize_particles=True))
    return [svi.step(*args) for _ in range(steps)]


def _held_tensor_bytes(obj, seen=None) -> int:
    """Bytes of the non-parameter tensors an object graph of transforms/distributions holds."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (torch.nn.Module, type)):
        return 0  # modules (the guide's parameters) are shared, not per draw
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return 0 if isinstance(obj, torch.nn.Parameter) else obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_held_tensor_bytes(v, seen) for v in obj)
    if isinstance(obj, dict):
        return sum(_held_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (Transform, torch.distributions.Distribution)):
        return sum(_held_tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


@pytest.mark.parametrize("sparse", [False, None])
def test_predictive_draws_hold_no_graph_and_no_square_matrix(sparse):
    """Predictive keeps every guide trace until it returns (4000 draws: 4000 traces). Each
    draw must hold O(d) memory: no autograd graph and no ``d x d`` matrix of the affine stage."""
    y, sigma = _data(150)
    kwargs = {} if sparse is None else {"sparse": sparse}
    guide = AutoKRFlow(hierarchical, layers=1, hidden=(8,), warmup=5, **kwargs)
    _train(hierarchical, guide, (y, sigma), steps=2)
    d = guide.latent_dim
    out = Predictive(hierarchical, guide=guide, num_samples=30)(y, sigma)
    assert out["eta"].shape == (30, 150)
    assert all(v.grad_fn is None and not v.requires_grad for v in out.values())
    traces = _predictive(guide, {}, 30, return_sites=None, model_args=(y, sigma)).trace
    assert len(traces) == 30
    for trace in traces:
        sites = [site for site in trace.nodes.values() if site["type"] == "sample"]
        held = sum(_held_tensor_bytes(site["fn"]) for site in sites)
        assert held < 20 * d * 8, f"a guide trace holds {held} bytes at d = {d}"
        assert all(site["value"].grad_fn is None for site in sites)


# ---- plate detection ------------------------------------------------------------------------

def nested(y):
    """Group latents ``th`` and sub-group latents ``eta`` (inner plate) under a global ``mu``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("g", y.shape[-1], dim=-1):
        th = pyro.sample("th", dist.Normal(mu, 1.0))
        with pyro.plate("k", y.shape[-2], dim=-2):
            eta = pyro.sample("eta", dist.Normal(th, 1.0))
            pyro.sample("y", dist.Normal(eta, 1.0), obs=y)


def coupled(y):
    """A site outside the plate reads every member: the posterior couples all of them."""
    with pyro.plate("p", y.shape[-1]):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(a, 1.0), obs=y)
    pyro.sample("total", dist.Normal(a.sum(-1), 1.0), obs=torch.tensor(0.0))


def crossed(y):
    rows, cols = pyro.plate("rows", y.shape[-2], dim=-2), pyro.plate("cols", y.shape[-1], dim=-1)
    with rows:
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
    with cols:
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with rows, cols:
        pyro.sample("y", dist.Normal(a + b, 1.0), obs=y)


def two_plates(y, z):
    """Two plates; members of ``a`` hold a vector site and a positive site (width 3)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("a", y.shape[-1]):
        th = pyro.sample("th", dist.Normal(mu.unsqueeze(-1) * torch.ones(2), 1.0).to_event(1))
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        pyro.sample("y", dist.Normal(th.sum(-1), s), obs=y)
    with pyro.plate("b", z.shape[-1]):
        e = pyro.sample("e", dist.Normal(mu, 1.0))
        pyro.sample("z", dist.Normal(e, 1.0), obs=z)


def test_detect_plates_hierarchical():
    from krflows.plates import detect_plates

    y, sigma = _data(5)
    s = detect_plates(hierarchical, y, sigma)
    assert s.globals.tolist() == [0, 1] and s.layout == [(5, 1)] and s.refused == {}
    assert s.plates[0].sites == ("eta",) and s.plates[0].index[:, 0].tolist() == [2, 3, 4, 5, 6]
    torch.testing.assert_close(s.plates[0].features, y.double()[:, None])  # the member's observation


def test_detect_plates_nested_folds_into_the_outer_member():
    from krflows.plates import detect_plates

    s = detect_plates(nested, torch.randn(4, 3))
    assert s.layout == [(3, 5)] and s.globals.tolist() == [0]
    # member j: th[j], then eta[:, j] (eta has shape (4, 3): flat 4 + 3 k + j)
    assert s.plates[0].index.tolist() == [[1 + j] + [4 + 3 * k + j for k in range(4)] for j in range(3)]
    assert "nested or crossed" in s.refused["k"]


def test_detect_plates_refuses_coupled_and_picks_one_of_crossed():
    from krflows.plates import detect_plates

    s = detect_plates(coupled, torch.randn(4))
    assert s.plates == () and "'total' lies outside plate 'p'" in s.refused["p"]
    s = detect_plates(crossed, torch.randn(3, 4))
    assert [p.name for p in s.plates] == ["cols"] and s.globals.tolist() == [0, 1, 2]
    assert "crossed" in s.refused["rows"]


@pytest.mark.parametrize("walk", [lambda z: z.cumsum(-1), lambda z: z.flip(-1).cumsum(-1).flip(-1),
                                  lambda z: z + 0.5 * torch.roll(z, 1, -1)])
def test_detect_plates_refuses_members_coupled_inside_the_plate(walk):
    """A probe: a random walk (innovations in a time plate, y_t ~ N(cumsum(z)_t, .)) depends on
    sites of its own plate only, so the dependency graph passed it; the sparse guide's sds were
    0.12-0.27 of the exact ones. Moving one member's latent must leave the others' terms alone."""
    from krflows.plates import detect_plates

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("t", len(y)):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("y", dist.Normal(walk(z), 0.3), obs=y)

    s = detect_plates(model, torch.randn(12))
    assert s.plates == () and "members are coupled inside it" in s.refused["t"], s.refused
    with pytest.warns(UserWarning):
        guide = AutoKRFlow(model)
        guide(torch.randn(12))
    assert type(guide.flow).__name__ == "KRFlow"  # dense: the exact posterior is not plate-sparse


def test_detect_plates_two_plates_multi_site_members():
    from krflows.plates import detect_plates

    s = detect_plates(two_plates, torch.randn(3), torch.randn(2))
    assert s.layout == [(3, 3), (2, 1)]
    assert s.plates[0].index.tolist() == [[1, 2, 7], [3, 4, 8], [5, 6, 9]]
    assert s.order.tolist() == [0, 1, 2, 7, 3, 4, 8, 5, 6, 9, 10, 11]


# ---- the sparse AutoKRFlow ------------------------------------------------------------------

def test_autokrflow_is_sparse_by_default_and_dense_on_request():
    import krflows

    y, sigma = _data(30)
    guide = AutoKRFlow(hierarchical, layers=1, hidden=(8,), warmup=2)
    guide(y, sigma)
    assert isinstance(guide.flow, krflows.SparseKRFlow) and guide.flow.layout.plates == ((30, 1),)
    pyro.clear_param_store()
    dense = AutoKRFlow(hierarchical, layers=1, hidden=(8,), warmup=2, sparse=False)
    dense(y, sigma)
    assert type(dense.flow) is krflows.KRFlow and dense.plate_structure is None


def test_autokrflow_refuses_or_falls_back_when_no_plate_is_valid():
    import krflows

    y = torch.randn(4)
    with pytest.raises(ValueError, match="sparse=True, but no plate"):
        AutoKRFlow(coupled, sparse=True, warmup=0)(y)
    pyro.clear_param_store()
    guide = AutoKRFlow(coupled, warmup=0)
    with pytest.warns(UserWarning, match="using the dense KRFlow"):
        guide(y)
    assert type(guide.flow) is krflows.KRFlow


def test_sparse_guide_transform_in_the_model_order():
    """Pyro's flat latent interleaves the members' sites; the guide's map is triangular after the
    flow's order, its log|det| is the autograd Jacobian's, and it inverts."""
    y, z = torch.randn(3), torch.randn(2)
    guide = AutoKRFlow(two_plates, layers=2, hidden=(8,), warmup=0)
    guide(y, z)
    guide.flow.double()  # float64: the randomized map is too ill-conditioned to invert in float32
    with torch.no_grad():
        for p in guide.flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    order = guide.flow.order
    assert order is not None
    T = guide.get_transform()
    u = torch.randn(guide.latent_dim, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: T(v), u)[order]  # rows in flow order
    assert float(jac.triu(1).abs().max()) == 0.0 and bool((jac.diagonal() > 0).all())
    x = T(u)
    torch.testing.assert_close(T.log_abs_det_jacobian(u, x), jac.diagonal().log().sum(), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(T.inv(x.clone()), u, rtol=1e-8, atol=1e-8)


def test_sparse_guide_two_plates_constrained_sites():
    y, z = torch.randn(3), torch.randn(2)
    guide = AutoKRFlow(two_plates, layers=1, hidden=(8,), warmup=20)
    losses = _train(two_plates, guide, (y, z), steps=10, particles=4)
    assert all(math.isfinite(v) for v in losses)
    draws = Predictive(two_plates, guide=guide, num_samples=50, return_sites=["th", "s", "e"])(y, z)
    assert draws["th"].shape == (50, 3, 2) and draws["e"].shape == (50, 2)
    assert bool((draws["s"] > 0).all())


def conjugate(y):
    """``mu ~ N(0, 2^2)``, ``theta_j ~ N(mu, 1)``, ``y_j ~ N(theta_j, 0.5^2)``: a Gaussian posterior."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("groups", y.shape[-1]):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Normal(theta, 0.5), obs=y)


@pytest.mark.slow
def test_sparse_guide_recovers_a_gaussian_hierarchical_posterior():
    """Oracle: the exact Gaussian posterior (precision matrix of the joint)."""
    J = 40
    y = 1.0 + torch.randn(J, generator=torch.Generator().manual_seed(3)) * 1.5
    P = torch.zeros(J + 1, J + 1, dtype=torch.float64)
    P[0, 0] = 1 / 4 + J
    P[0, 1:] = P[1:, 0] = -1.0
    P[1:, 1:] = torch.eye(J, dtype=torch.float64) * (1 + 4)
    b = torch.cat([torch.zeros(1, dtype=torch.float64), 4 * y.double()])
    cov = torch.linalg.inv(P)
    mean = cov @ b
    pyro.set_rng_seed(4)
    guide = AutoKRFlow(conjugate, layers=1, hidden=(16,))
    _train(conjugate, guide, (y,), steps=400, particles=4, lr=1e-2)
    with torch.no_grad():
        x = guide.flow.sample((8000,)).double()
    sd = cov.diagonal().sqrt()
    assert float(((x.mean(0) - mean).abs() / sd).max()) < 0.25
    assert float((x.std(0) / sd - 1).abs().median()) < 0.1
    assert float((x.std(0) / sd - 1).abs().max()) < 0.25


# ---- minibatch SVI: latents in a subsampled plate ---------------------------------------------

def sub_hierarchical(y, sigma, batch=None, idx=None):
    """``hierarchical`` with its plate subsampled (``batch`` random members, or the members ``idx``)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("groups", y.shape[-1], subsample_size=batch, subsample=idx) as i:
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * eta, sigma[i]), obs=y[i])


def sub_plates(y, sigma, batch=None, idx=None):
    """The guide's plates follow the model's subsampling at every call (Pyro's ``create_plates``)."""
    return pyro.plate("groups", y.shape[-1], subsample_size=batch, subsample=idx)


def _elbo(model, guide, args, data=None):
    """``log p - log q`` at the guide's draw (conditioned on ``data``), with Pyro's plate scaling."""
    guide_tr = pyro.poutine.trace(pyro.poutine.condition(guide, data=data or {})).get_trace(*args)
    model_tr = pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_tr)).get_trace(*args)
    return float(model_tr.log_prob_sum() - guide_tr.log_prob_sum())


def test_minibatch_guide_is_an_unbiased_estimate_of_the_full_elbo():
    """At fixed parameters and fixed reference draws z: the subsampled ELBO estimator averaged
    over the 4 blocks of a partition of the members equals the full-data ELBO exactly, and over
    random minibatches within its standard error. Oracle: the full-data model's guide (the
    AutoContinuous path: one joint latent, log q by the flow's inverse) with the same flow."""
    J, b = 40, 10
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        y, sigma = _data(J)
        y, sigma = y.double(), sigma.double()
        guide = AutoKRFlow(sub_hierarchical, layers=2, hidden=(8,), member_features=False,
                           create_plates=sub_plates)
        guide(y, sigma, b)
        assert guide.latent_dim == J + 2 and guide.flow.layout.plates == ((J, 1),)
        state = {k: v + 0.2 * torch.randn_like(v) for k, v in guide.flow.named_parameters()}
        pyro.clear_param_store()
        full = AutoKRFlow(hierarchical, layers=2, hidden=(8,), member_features=False, warmup=0)
        full(y, sigma)
        assert full.flow.order is None and guide.flow.order is None
        full.flow.load_state_dict(state, strict=False)  # the store holds these: guide reads them too
        z = torch.randn(J + 2, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            x = full.flow(z)
            oracle = _elbo(hierarchical, full, (y, sigma), {"_AutoKRFlow_latent": x})

            def estimate(idx):
                data = {"_AutoKRFlow_z_globals": z[:2], "_AutoKRFlow_z_groups": z[2:][idx].unsqueeze(-1)}
                return _elbo(sub_hierarchical, guide, (y, sigma, None, idx), data)

            blocks = torch.randperm(J, generator=torch.Generator().manual_seed(2)).reshape(J // b, b)
            assert abs(sum(estimate(idx) for idx in blocks) / len(blocks) - oracle) < 1e-8 * abs(oracle)
            g = torch.Generator().manual_seed(3)
            draws = torch.tensor([estimate(torch.randperm(J, generator=g)[:b]) for _ in range(100)])
            se = float(draws.std()) / 100**0.5
            assert se > 0.1 and abs(float(draws.mean()) - oracle) < 4 * se, (float(draws.mean()), oracle, se)
            # the full-data call of the minibatch guide (every member, scale 1) is the oracle itself
            assert abs(estimate(torch.arange(J)) - oracle) < 1e-8 * abs(oracle)
    finally:
        torch.set_default_dtype(default)


def test_minibatch_guide_draws_the_batch_members_and_summarizes_all():
    J, b = 30, 6
    y, sigma = _data(J)
    guide = AutoKRFlow(sub_hierarchical, layers=1, hidden=(8,), create_plates=sub_plates)
    guide.quantile_draws = 2**10
    losses = _train(sub_hierarchical, guide, (y, sigma, b), steps=3, particles=3)
    assert all(math.isfinite(v) for v in losses)
    trace = pyro.poutine.trace(guide).get_trace(y, sigma, b)
    assert trace.nodes["eta"]["value"].shape == (b,) and trace.nodes["eta"]["scale"] == J / b
    assert trace.nodes["mu"]["scale"] == 1.0 and trace.nodes["_AutoKRFlow_x_groups"]["scale"] == J / b
    assert guide.median()["eta"].shape == (J,) and guide.quantiles([0.1, 0.9])["eta"].shape == (2, J)
    draws = Predictive(sub_hierarchical, guide=guide, num_samples=5)(y, sigma)  # batch=None: every member
    assert draws["eta"].shape == (5, J) and draws["mu"].shape == (5, 1)
    with pytest.raises(ValueError, match="potential_from_model"):
        guide.potential  # noqa: B018
    with pytest.raises(ValueError, match="full-data model"):
        from krflows.pyro import neutra_nuts

        neutra_nuts(sub_hierarchical, guide, 2, 2, y, sigma)


def sub_coupled(y, batch=None):
    with pyro.plate("p", y.shape[-1], subsample_size=batch):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
    pyro.sample("total", dist.Normal(a.sum(-1), 1.0), obs=torch.tensor(0.0))


def test_minibatch_guide_refuses_what_it_cannot_subsample():
    y, sigma = _data(20)
    with pytest.raises(ValueError, match=r"subsampled plate: only the sparse flow"):
        AutoKRFlow(sub_hierarchical, sparse=False)(y, sigma, 5)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=r"'a' lies in subsampled plate 'p', which cannot be a member plate"):
        AutoKRFlow(sub_coupled)(torch.randn(8), 4)


def test_a_minibatch_guide_has_one_flow_whatever_its_first_call(tmp_path):
    """A probe: the flow's architecture followed the first call, so a guide restored from a
    minibatch-trained param store and first called on the full data (Predictive) refused the
    stored weights, and one first called on the full data could not train on minibatches."""
    y, sigma = _data(20)
    guide = AutoKRFlow(sub_hierarchical, layers=1, hidden=(8,), create_plates=sub_plates)
    _train(sub_hierarchical, guide, (y, sigma, 5), 3)
    median = guide.median(y, sigma)
    pyro.get_param_store().save(tmp_path / "store.pt")
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "store.pt")
    restored = AutoKRFlow(sub_hierarchical, layers=1, hidden=(8,), create_plates=sub_plates)
    draws = Predictive(sub_hierarchical, guide=restored, num_samples=7, parallel=True)(y, sigma)
    assert draws["eta"].shape[-1] == 20
    torch.testing.assert_close(restored.median(y, sigma)["eta"], median["eta"])
    pyro.clear_param_store()
    full_first = AutoKRFlow(sub_hierarchical, layers=1, hidden=(8,), create_plates=sub_plates)
    full_first(y, sigma)
    assert all(math.isfinite(loss) for loss in _train(sub_hierarchical, full_first, (y, sigma, 5), 2))


@pytest.mark.slow
def test_minibatch_svi_recovers_the_hierarchical_posterior():
    """J = 40 groups, minibatches of 10; oracle: the exact posterior by quadrature (bench_plates)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_plates", Path(__file__).parent.parent / "benchmarks" / "bench_plates.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    J, b, steps = 40, 10, 1000
    y, sigma = bench.make_data(J)
    truth = bench.oracle(y, sigma)
    pyro.set_rng_seed(0)
    guide = AutoKRFlow(sub_hierarchical, create_plates=sub_plates)
    optim = pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.1 ** (1 / steps)})
    svi = SVI(sub_hierarchical, guide, optim, Trace_ELBO(num_particles=4, vectorize_particles=True))
    for _ in range(steps):
        svi.step(y, sigma, b)
    with torch.no_grad():
        draws = Predictive(sub_hierarchical, guide=guide, num_samples=4000, parallel=True,
                           return_sites=["mu", "tau", "eta"])(y, sigma)
    err = bench.errors(draws, truth)
    assert abs(err["mu_mean_err_sd"]) < 0.6 and abs(err["tau_mean_err_sd"]) < 0.6, err
    assert abs(err["mu_sd_ratio"] - 1) < 0.3 and abs(err["tau_sd_ratio"] - 1) < 0.3, err
    assert err["theta_med_abs_mean_err_sd"] < 0.15 and err["theta_med_abs_sd_ratio_m1"] < 0.1, err


def sub_nested(y, batch=None, idx=None):
    """A subsampled member plate with a vector site, a positive site and a nested plate."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("g", y.shape[-1], dim=-1, subsample_size=batch, subsample=idx) as i:
        th = pyro.sample("th", dist.Normal(mu, 1.0))
        pyro.sample("v", dist.LogNormal(0.0, 1.0).expand([3]).to_event(1))
        with pyro.plate("k", y.shape[-2], dim=-2):
            eta = pyro.sample("eta", dist.Normal(th, s[..., :1]))
            pyro.sample("y", dist.Normal(eta, 1.0), obs=y[:, i])


def test_minibatch_guide_places_the_batch_members_where_the_full_flow_has_them():
    """Oracle: the full flow's draw at the same reference point, unpacked into the full sites
    (the flow's order gathers each member's th, v and its column of eta into one block)."""
    y = torch.randn(4, 12)
    guide = AutoKRFlow(sub_nested, layers=1, hidden=(8,),
                       create_plates=lambda y, batch=None, idx=None: pyro.plate(
                           "g", y.shape[-1], dim=-1, subsample_size=batch, subsample=idx))
    guide(y, 5)
    assert guide.flow.layout.globals == 3 and guide.flow.layout.plates == ((12, 1 + 3 + 4),)
    randomize = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in guide.flow.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=randomize))
        z = torch.randn(guide.flow.dim, generator=torch.Generator().manual_seed(1))
        full = guide._unpack(guide.flow(z))
        idx = torch.tensor([7, 2, 11, 0, 5])
        data = {"_AutoKRFlow_z_globals": z[:3], "_AutoKRFlow_z_g": z[3:].reshape(12, 8)[idx]}
        trace = pyro.poutine.trace(pyro.poutine.condition(guide, data=data)).get_trace(y, None, idx)
    for name, axis in (("mu", None), ("s", None), ("th", 0), ("v", 0), ("eta", 1)):
        want = full[name] if axis is None else full[name].index_select(axis, idx)
        torch.testing.assert_close(trace.nodes[name]["value"], want, atol=1e-6, rtol=1e-6)
    guide.quantile_draws = 2**10
    median = guide.median()
    assert median["eta"].shape == (4, 12) and median["v"].shape == (12, 3) and median["mu"].shape == ()
