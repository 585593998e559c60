"""KRFlow as a distribution: normalization, the triangular structure, extreme inputs, bad input."""

import contextlib
import copy
import math
import pickle
import warnings

import pytest
import torch
from conftest import FAMILY_NAMES, make_flow, randomized
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import MultivariateNormal

import krflows


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_log_prob_integrates_to_one_in_1d(family):
    flow = make_flow(family, 1, std=0.3)
    x = torch.linspace(-30, 30, 60001, dtype=torch.float64)[:, None]
    mass = torch.trapezoid(flow.log_prob(x).exp(), x[:, 0])
    assert abs(mass - 1) <= 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_log_prob_integrates_to_one_in_2d(family):
    flow = make_flow(family, 2, std=0.2)
    g = torch.linspace(-14, 14, 701, dtype=torch.float64)
    X = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1)
    with torch.no_grad():
        p = flow.log_prob(X).exp()
    mass = torch.trapezoid(torch.trapezoid(p, g, dim=1), g)
    assert abs(mass - 1) <= 1e-3


def _gaussian_flow(mean, cov):
    flow = krflows.KRFlow(len(mean), family="affine", layers=0).double()
    flow.affine.initialize(mean, cov)
    return flow


def _gaussian():
    mean = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    A = torch.tensor([[2.0, 0, 0, 0], [0.8, 1.0, 0, 0], [-0.5, 0.3, 0.7, 0], [0.2, -0.9, 0.4, 1.5]],
                     dtype=torch.float64)
    return mean, A @ A.T


def test_gaussian_marginals_in_closed_form():
    mean, cov = _gaussian()
    flow = _gaussian_flow(mean, cov)
    x = MultivariateNormal(mean, cov).sample((50,))
    for k in (1, 2, 3, 4):
        ref = MultivariateNormal(mean[:k], cov[:k, :k]).log_prob(x[:, :k])
        assert torch.allclose(flow.marginal_log_prob(x[:, :k]), ref, atol=1e-10)
    assert flow.sample_marginal((7,), 2).shape == (7, 2)


def test_gaussian_conditionals_in_closed_form():
    mean, cov = _gaussian()
    flow = _gaussian_flow(mean, cov)
    k = 2
    x_head = torch.tensor([0.0, -1.0], dtype=torch.float64)
    S11, S12, S22 = cov[:k, :k], cov[:k, k:], cov[k:, k:]
    cond_mean = mean[k:] + S12.T @ torch.linalg.solve(S11, x_head - mean[:k])
    cond_cov = S22 - S12.T @ torch.linalg.solve(S11, S12)
    x = flow.sample_conditional(x_head, (40000,))
    assert torch.equal(x[:, :k], x_head.expand(40000, k))
    assert torch.allclose(x[:, k:].mean(0), cond_mean, atol=0.03)
    assert torch.allclose(torch.cov(x[:, k:].T), cond_cov, atol=0.05)
    y = MultivariateNormal(mean, cov).sample((20,))
    y[:, :k] = x_head
    ref = MultivariateNormal(cond_mean, cond_cov).log_prob(y[:, k:])
    assert torch.allclose(flow.conditional_log_prob(y, k), ref, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["spline", "integrated"])
def test_marginal_of_a_nonlinear_flow_by_quadrature(family):
    """q(x_1) = ∫ q(x_1, x_2) dx_2, computed by quadrature, for a flow that is not Gaussian."""
    flow = make_flow(family, 2, std=0.3)  # 0.4 gives density spikes of width ~1e-4 here
    x1 = torch.tensor([-1.0, 0.3, 1.0], dtype=torch.float64)
    # sinh-spaced nodes: fine near 0 (narrow spikes), reaching |x_2| = 1e4 (heavy tails)
    g = torch.sinh(torch.linspace(-1, 1, 100001, dtype=torch.float64) * math.asinh(1e4))
    with torch.no_grad():
        for a, lm in zip(x1, flow.marginal_log_prob(x1[:, None]), strict=True):
            pts = torch.stack([a.expand_as(g), g], -1)
            ref = torch.log(torch.trapezoid(flow.log_prob(pts).exp(), g))
            assert abs(lm - ref) < 1e-4


def test_conditional_samples_of_a_nonlinear_flow():
    """Conditional draws agree with the conditional density by quadrature (mean and variance)."""
    flow = make_flow("spline", 2, std=0.4)
    x_head = torch.tensor([0.5], dtype=torch.float64)
    g = torch.linspace(-25, 25, 20001, dtype=torch.float64)
    with torch.no_grad():
        p = flow.log_prob(torch.stack([x_head.expand_as(g), g], -1)).exp()
    p = p / torch.trapezoid(p, g)
    m = torch.trapezoid(g * p, g)
    v = torch.trapezoid((g - m) ** 2 * p, g)
    s = flow.sample_conditional(x_head, (40000,))[:, 1]
    assert abs(s.mean() - m) < 4 * math.sqrt(v / 40000) + 1e-3
    assert abs(s.var() / v - 1) < 0.05


@settings(max_examples=25, deadline=None)
@given(family=st.sampled_from(FAMILY_NAMES), dtype=st.sampled_from([torch.float32, torch.float64]),
       std=st.sampled_from([0.1, 1.0, 5.0]), seed=st.integers(0, 1000),
       zval=st.floats(-50, 50))
def test_extreme_inputs_give_finite_outputs(family, dtype, std, seed, zval):
    flow = randomized(krflows.KRFlow(3, family=family, layers=2, hidden=(16,)),
                      std=std, seed=seed).to(dtype)
    z = torch.tensor([[zval, -zval, 50.0], [-50.0, zval, 0.0]], dtype=dtype)
    with torch.no_grad():
        x, log_diag = flow.triangular.call_and_log_diag(z)
        assert torch.isfinite(x).all() and torch.isfinite(log_diag).all()
        assert torch.isfinite(flow.log_prob(x)).all()


def test_float32_round_trip_and_log_prob():
    flow = randomized(krflows.KRFlow(4, family="spline", layers=3, hidden=(16,)), std=0.3)
    x, log_q = flow.rsample_and_log_prob((256,))
    assert x.dtype == torch.float32
    assert torch.allclose(flow.log_prob(x), log_q, atol=1e-3)
    assert flow.inverse_residual(x).max() < 1e-4


def test_batch_shapes():
    flow = make_flow("spline", 3)
    x = flow.sample((2, 5))
    assert x.shape == (2, 5, 3)
    assert flow.log_prob(x).shape == (2, 5)
    assert flow.sample(4).shape == (4, 3)
    assert flow.log_prob(x[0, 0]).shape == ()


@pytest.mark.parametrize("family", ["spline", "affine", "bernstein", "integrated"])
def test_empty_batches_give_empty_results(family):
    """A probe: log_prob, sample, push and the distribution's log_prob of no points raised
    torch's "cannot reshape tensor of 0 elements" (the reference's Independent.log_prob)."""
    flow = make_flow(family, 3)
    none = torch.zeros(0, 3, dtype=torch.float64)
    assert flow.log_prob(none).shape == (0,) and flow().log_prob(none).shape == (0,)
    assert flow.sample((0,)).shape == (0, 3) and flow.sample((2, 0)).shape == (2, 0, 3)
    x, log_q, log_diag = flow.push(none)
    assert x.shape == (0, 3) and log_q.shape == (0,) and log_diag.shape == (0, 3)
    assert flow.rsample_and_log_prob((0,))[1].shape == (0,)


def test_coordinate_counts_are_checked():
    flow = make_flow("spline", 3)
    for bad in (4, -1, 0, 1.0):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\]"):
            flow.sample_marginal((5,), bad)
    for bad in (3, -1):
        with pytest.raises(ValueError, match=r"k must be an int in \[0, 2\]"):
            flow.conditional_log_prob(flow.sample((2,)), bad)
    y = flow.sample((4,))
    torch.testing.assert_close(flow.conditional_log_prob(y, 0), flow.log_prob(y))


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(5, 2, dtype=torch.float64), r"shape \(\*, 3\), got \(5, 2\)"),
    (torch.zeros(5, 3, dtype=torch.int64), "floating dtype"),
    (torch.tensor([[0.0, float("nan"), 1.0]], dtype=torch.float64), "finite"),
    (torch.tensor([[0.0, float("inf"), 1.0]], dtype=torch.float64), "finite"),
    (torch.zeros(5, 3, dtype=torch.float32), "dtype torch.float32 but the flow is torch.float64"),
    (torch.zeros(3, 1, dtype=torch.float64), r"shape \(\*, 3\), got \(3, 1\)"),
    ([[0.0, 0.0, 0.0]], "torch.Tensor"),
])
def test_bad_input_is_rejected(bad, match):
    flow = make_flow("spline", 3)
    with pytest.raises(ValueError, match=match):
        flow.log_prob(bad)


def test_old_keywords_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="family="):
        flow = krflows.KRFlow(2, transform="affine", layers=1, hidden=(4,))
    assert type(flow.family).__name__ == "Affine"
    with pytest.warns(DeprecationWarning, match="affine_stage="):
        assert krflows.KRFlow(2, affine=False, layers=1, hidden=(4,)).affine is None
    with pytest.raises(ValueError, match="not both"):
        krflows.KRFlow(2, family="bernstein", transform="affine")


def test_push_device_dtype_and_interpolate():
    flow = make_flow("spline", 3, order=[2, 0, 1])
    assert flow.dtype == torch.float64 and flow.device == torch.device("cpu")
    z = flow.base.sample((50,))
    x, log_q, log_diag = flow.push(z)
    torch.testing.assert_close(x, flow(z))
    torch.testing.assert_close(log_q, flow.log_prob(x), atol=1e-8, rtol=0)
    torch.testing.assert_close(log_diag, flow.triangular.call_and_log_diag(z)[1])
    torch.testing.assert_close(flow.interpolate(1.0).log_prob(x), log_q, atol=1e-8, rtol=0)


def test_bad_construction_is_rejected():
    with pytest.raises(ValueError, match="family must be one of"):
        krflows.KRFlow(2, family="nope")
    with pytest.raises(ValueError, match="permutation"):
        krflows.KRFlow(3, order=[0, 0, 1])
    with pytest.raises(ValueError, match="positive int"):
        krflows.KRFlow(0)


@pytest.mark.parametrize("kwargs, match", [
    ({"bound": -5.0}, r"bound must be a finite number > 0, got -5.0"),
    ({"bound": 0}, r"bound must be a finite number > 0, got 0"),
    ({"bound": float("nan")}, r"bound must be a finite number > 0"),
    ({"family": "bernstein", "bound": float("inf")}, r"bound must be a finite number > 0"),
    ({"layers": -1}, r"layers must be an int >= 0, got -1"),
    ({"layers": 2.0}, r"layers must be an int >= 0, got 2.0"),
    ({"bins": 0}, r"bins must be an int >= 1, got 0"),
    ({"hidden": (16, 0)}, r"hidden must be a sequence of positive ints .* got \[16, 0\]"),
    ({"hidden": 16}, r"hidden must be a sequence of positive ints"),
    ({"family": "bernstein", "degree": 0}, r"degree must be an int >= 1, got 0"),
    ({"family": "integrated", "degree": -2}, r"degree must be an int >= 1, got -2"),
    ({"min_slope": 1.5}, r"min_slope must be a finite number in \[0, 1\), got 1.5"),
    ({"bins": 4, "min_width": 0.25}, r"min_width \(with bins=4\) must be a finite number in \[0, 0.25\)"),
    ({"family": "affine", "bins": 8},
     r"unknown option\(s\) 'bins' of the 'affine' family; it takes min_slope"),
    ({"family": krflows.transforms.Spline}, r"family must be a family name or a MonotoneFamily"),
])
def test_bad_options_are_refused_with_the_valid_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        krflows.KRFlow(2, **kwargs)


def test_edge_options_are_accepted():
    flow = krflows.KRFlow(2, family="spline", bins=1, bound=0.5, layers=0, hidden=())
    assert len(flow.conditioners) == 0 and flow.family.bins == 1
    flow = krflows.KRFlow(2, family="integrated", degree=1, layers=1, hidden=[4])
    assert torch.isfinite(flow.log_prob(flow.sample((3,)))).all()


def _draw(flow, seed, n=64):
    torch.manual_seed(seed)
    x, log_q = flow.rsample_and_log_prob((n,))
    grads = torch.autograd.grad(log_q.mean() + x.square().mean(), list(flow.parameters()))
    return x.detach(), log_q.detach(), grads


@pytest.mark.slow
@pytest.mark.parametrize("native", [True, False], ids=["kernels", "traced"])
def test_compiled_flow_matches_eager(monkeypatch, native, family="spline"):
    """``KRFlow.compile()``: same samples, densities and gradients as eager, up to rounding
    (oracle: the eager flow with the same weights and the same random numbers). float64, so
    that the comparison is not blurred by float32 inverses at ill-conditioned points. Both
    compiled paths: the spline's C kernels as custom operators (the CPU's) and the traced
    torch operations (other devices, or no C compiler)."""
    monkeypatch.setattr(krflows.transforms._native, "enabled", native)
    eager = randomized(krflows.KRFlow(3, family=family, layers=2, hidden=(16,)), std=0.3).double()
    compiled = randomized(krflows.KRFlow(3, family=family, layers=2, hidden=(16,)), std=0.3).double()
    compiled.compile()
    assert "compiled" in repr(compiled)
    for seed in (0, 1):
        # the second call runs what the first compiled: no recompilation (a module attribute set
        # inside the compiled code once made every flow compile twice)
        with warnings.catch_warnings(), \
                torch.compiler.set_stance("fail_on_recompile") if seed else contextlib.nullcontext():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager fails here
            (x1, lq1, g1), (x2, lq2, g2) = _draw(eager, seed), _draw(compiled, seed)
        assert torch.allclose(x1, x2, atol=1e-10) and torch.allclose(lq1, lq2, atol=1e-10)
        for a, b in zip(g1, g2, strict=True):
            assert torch.allclose(a, b, atol=1e-10, rtol=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback happened
        assert torch.allclose(compiled.log_prob(x1), eager.log_prob(x1), atol=1e-8)
    assert compiled._compiled, "the compiled path fell back to eager"


@pytest.mark.slow
def test_compile_dynamic_keeps_log_prob_under_autograd_compiled():
    """A probe: with compile(dynamic=True) the first log_prob under autograd failed to trace
    (dynamo and the soft clamp's autograd Function, torch 2.13) and sent the whole flow back to
    eager, its compile options dropped (so krflows.save recorded none)."""
    flow = randomized(krflows.KRFlow(2, layers=1, hidden=(8,)), std=0.3).compile(dynamic=True)
    x, log_q = flow.rsample_and_log_prob((5,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        log_p = flow.log_prob(x.detach())
    assert set(flow._compiled) == {"push", "pull"} and flow._compile_options == {"dynamic": True}
    torch.testing.assert_close(log_p, log_q.detach(), atol=1e-4, rtol=0)
    log_p.sum().backward()
    assert all(p.grad is not None for p in flow.conditioners.parameters())


def test_compile_falls_back_to_eager_with_a_warning(monkeypatch):
    """A compiler that fails (missing, unsupported op) costs a warning, not the run."""
    def broken_compile(fn, **options):
        def call(*args):
            raise RuntimeError("simulated: no C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    flow = randomized(krflows.KRFlow(3, layers=1, hidden=(8,), compile=True), std=0.3)
    reference = randomized(krflows.KRFlow(3, layers=1, hidden=(8,)), std=0.3)
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found.*eagerly") as record:
        x, log_q = flow.rsample_and_log_prob((16,))
    assert record[0].filename == __file__  # the warning names the caller's line
    torch.manual_seed(0)
    x_ref, log_q_ref = reference.rsample_and_log_prob((16,))
    assert torch.equal(x, x_ref) and torch.equal(log_q, log_q_ref)
    assert flow._compiled == {} and "compiled" not in repr(flow)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later calls are silently eager
        flow.log_prob(x)


def _chunks_of(monkeypatch, size: int) -> None:
    """Makes KRFlow._chunk's rule give ``size`` points per chunk on the CPU in both directions."""
    monkeypatch.setattr(krflows.flows, "_CHUNK_POINTS", {"cpu": (size, size), "device": (size, size)})


@pytest.mark.parametrize("family", ["spline", "bernstein"])
def test_large_batches_run_in_chunks_with_the_same_values(monkeypatch, family):
    """Without autograd, a batch larger than KRFlow._chunk's size runs in chunks (on the CPU so
    that each layer's parameters stay in the cache): the same samples, densities, maps and
    inverses as calls of a few points each, which no rule chunks (oracle: those calls), in the
    batch's own shape, and one pass per chunk."""
    flow = make_flow(family, dim=3)
    _chunks_of(monkeypatch, 300)
    z = torch.randn(7, 150, 3, dtype=torch.float64)  # 1050 points: chunks of 300, 300, 300, 150
    calls = []
    push = flow._push
    flow._push = lambda v: calls.append(v.shape) or push(v)
    with torch.no_grad():
        x, log_q, log_diag = flow.push(z)
        assert calls == [(300, 3)] * 3 + [(150, 3)]
        rows = [flow.push(z[i]) for i in range(7)]  # 150 points each: one call
        for whole, parts in zip((x, log_q, log_diag), zip(*rows, strict=True), strict=True):
            assert whole.shape == torch.stack(parts).shape
            assert torch.allclose(whole, torch.stack(parts), rtol=1e-12, atol=1e-12)
        lp = flow.log_prob(x)
        rows = torch.stack([flow.log_prob(x[i]) for i in range(7)])
        assert torch.allclose(lp, rows, rtol=1e-12, atol=1e-12)
        assert torch.allclose(lp, log_q, atol=1e-8)  # the inverse direction, another oracle
        assert torch.allclose(flow.forward(z), x, rtol=1e-12, atol=1e-12)
        assert torch.allclose(flow.inverse(x), z, atol=1e-8)
        torch.manual_seed(3)
        xs, lqs = flow.rsample_and_log_prob((1050,))
        torch.manual_seed(3)
        zs = flow.base.rsample((1050,))
        assert torch.allclose(xs, flow.forward(zs), rtol=1e-12, atol=1e-12)
        assert torch.allclose(lqs, flow.log_prob(xs), atol=1e-8)
        assert flow.sample((2, 700)).shape == (2, 700, 3)


def test_batches_are_whole_where_autograd_records(monkeypatch):
    """With gradients recorded, one call over the batch (chunks would keep every chunk's saved
    tensors anyway) and the gradient is the batch's; frozen parameters and plain points: chunks."""
    flow = make_flow("spline", dim=3)
    _chunks_of(monkeypatch, 300)
    z = torch.randn(1050, 3, dtype=torch.float64)
    calls = []
    push = flow._push
    flow._push = lambda v: calls.append(v.shape[0]) or push(v)
    flow.push(z)[1].sum().backward()
    assert calls == [1050] and all(net.out.weight.grad is not None for net in flow.conditioners)
    flow.requires_grad_(False)
    calls.clear()
    flow.push(z)
    assert calls == [300, 300, 300, 150]
    calls.clear()
    flow.push(z.requires_grad_())
    assert calls == [1050]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_inverse_without_a_graph_writes_one_buffer_with_the_same_values(family):
    """Without autograd, each inverse pass reads the columns so far of one buffer instead of
    stacking them anew: the same ``z`` and ``log q`` as with autograd on (the stacking path), to
    rounding, and both invert the forward map (oracle)."""
    flow = make_flow(family, dim=4)
    z = torch.randn(2, 50, 4, dtype=torch.float64)
    x = flow.forward(z).detach()
    with torch.no_grad():
        z_buffer, lq_buffer = flow.inverse(x), flow.log_prob(x)
    z_graph, lq_graph = flow.inverse(x), flow.log_prob(x)
    assert z_graph.requires_grad and lq_graph.requires_grad  # the other path ran
    torch.testing.assert_close(z_buffer, z_graph.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(lq_buffer, lq_graph.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(z_buffer, z, rtol=0, atol=1e-8)


def test_chunk_sizes_follow_the_documented_rule():
    """KRFlow._chunk: a cache's budget of parameters per layer on the CPU (12 MiB pushing, 64 MiB
    pulling), 256 MiB elsewhere (the meta device stands for a GPU here); whole batches up to a
    chunk, under no autograd only."""
    flow = krflows.KRFlow(10)  # 27 parameters per coordinate: 1080 bytes per point in float32
    big = torch.empty(10**6, 10)
    with torch.no_grad():
        assert flow._chunk(big, "push") == (12 << 20) // 1080 == 11650
        assert flow._chunk(big, "pull") == 32768  # 62 137 by the budget, at most 32768
        assert flow._chunk(big.double(), "push") == (12 << 20) // 2160
        assert flow._chunk(torch.empty(10**7, 10, device="meta"), "push") == (256 << 20) // 1080
        assert flow._chunk(torch.empty(11650, 10), "push") is None
        assert flow._chunk(torch.empty(11651, 10), "push") == 11650
        assert krflows.KRFlow(1000, layers=1)._chunk(torch.empty(10**5, 1000), "push") == 256  # the fewest
    assert flow._chunk(big, "push") is None  # autograd on: whole


def test_compiled_flow_survives_deepcopy_and_pickle(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: calls.append(options) or fn)
    flow = krflows.KRFlow(2, layers=1, hidden=(4,)).compile(dynamic=False)
    for copy_ in (copy.deepcopy(flow), pickle.loads(pickle.dumps(flow))):
        assert set(copy_._compiled) == {"push", "pull"}
        assert torch.equal(copy_.state_dict()["conditioners.0.out.weight"],
                           flow.state_dict()["conditioners.0.out.weight"])
    assert all(c == {"dynamic": False} for c in calls)
    # root-finding inverses (data-dependent loops) stay eager: only sampling is compiled
    root_finding = krflows.KRFlow(2, family="bernstein", layers=1, hidden=(4,)).compile()
    assert set(root_finding._compiled) == {"push"}


def test_eager_block_and_the_report_bypass_the_compiled_functions(monkeypatch):
    """``flow.eager()`` (and so ``diagnose``, which would otherwise compile at every new batch
    shape: minutes for log_prob at d = 10) calls no compiled function; after the block, the flow
    is compiled again."""
    calls = []

    def counting_compile(fn, **options):
        def compiled(*args):
            calls.append(fn.__name__)
            return fn(*args)
        return compiled

    monkeypatch.setattr(torch, "compile", counting_compile)
    flow = randomized(krflows.KRFlow(2, layers=1, hidden=(8,)), std=0.3).compile()
    with flow.eager():
        x = flow.sample((5,))
        flow.log_prob(x)
        assert "compiled" not in repr(flow)
    assert calls == []
    report = krflows.diagnose(flow, krflows.targets.Gaussian(dim=2), n=500, seed=0)
    assert calls == [] and report["ess"] > 0
    flow.sample((5,))
    flow.log_prob(x)
    assert calls == ["_push", "_pull"] and "compiled" in repr(flow)


@pytest.mark.parametrize("order", [None, [1, 0]])
def test_transform_checks_its_input_like_log_prob(order):
    """Wrong width, dtype or a non-tensor at flow.transform / .inv: a ValueError naming what was expected."""
    flow = krflows.KRFlow(2, layers=1, hidden=(8,), order=order)  # float32
    T = flow.transform
    cases = [(T, torch.randn(4, 3), r"z must have shape \(\*, 2\), got \(4, 3\)"),
             (T.inv, torch.randn(4, 3), r"x must have shape \(\*, 2\), got \(4, 3\)"),
             (T, torch.randn(4, 2, dtype=torch.float64), "z has dtype torch.float64 but the transform is "
                                                          "torch.float32"),
             (T.inv, torch.randn(4, 2, dtype=torch.float64), "x has dtype torch.float64 but the transform"),
             (T, torch.ones(4, 2, dtype=torch.long), "z must have a floating dtype"),
             (T.inv, [[0.0, 1.0]], "x must be a torch.Tensor")]
    for fn, arg, match in cases:
        with pytest.raises(ValueError, match=match):
            fn(arg)
    with pytest.raises(ValueError, match=r"z must have shape \(\*, 2\), got \(3,\)"):
        flow.triangular.log_abs_det_jacobian(torch.randn(3), torch.randn(3))
    z = torch.randn(5, 2)
    torch.testing.assert_close(T.inv(T(z)), z, atol=1e-4, rtol=1e-4)  # good input still passes


@pytest.mark.parametrize("build, match", [
    (lambda: krflows.transforms.Spline(bins=0), r"bins must be an int >= 1, got 0"),
    (lambda: krflows.transforms.Spline(bound=-5.0), r"bound must be a finite number > 0, got -5.0"),
    (lambda: krflows.transforms.Spline(bins=4, min_width=0.25), r"min_width \(with bins=4\)"),
    (lambda: krflows.transforms.Spline(affine="yes"), r"affine must be True or False"),
    (lambda: krflows.transforms.Bernstein(degree=0), r"degree must be an int >= 1, got 0"),
    (lambda: krflows.transforms.Integrated(bound=float("inf")), r"bound must be a finite number > 0"),
    (lambda: krflows.transforms.Affine(min_slope=-0.1), r"min_slope must be a finite number in \[0, 1\)"),
])
def test_families_built_directly_check_their_options(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_compile_with_cuda_graphs_warns_about_training(monkeypatch, mode):
    """The CUDA-graph modes segfaulted in a compiled backward with torch 2.11 (krflows' and zuko's,
    benchmarks/RESULTS_gpu.md): compile() says so when asked for them; the default mode is silent."""
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    with pytest.warns(UserWarning, match="CUDA graphs.*segfaulted.*default mode"):
        krflows.KRFlow(2, layers=1, hidden=(8,)).compile(mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        krflows.KRFlow(2, layers=1, hidden=(8,)).compile(mode="max-autotune-no-cudagraphs")
        krflows.KRFlow(2, layers=1, hidden=(8,)).compile()
