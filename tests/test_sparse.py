"""SparseKRFlow: plate sparsity of the map, exact Gaussian KR maps, cost, and the KRFlow API."""

import contextlib
import math

import pytest
import torch
from conftest import randomized
from torch.autograd.functional import jacobian

import krflows
from krflows.exact import gaussian_kr_map
from krflows.sparse import PlateConditioner, SparseKRFlow
from krflows.transforms.sparse import PlateLayout

GLOBALS, PLATES = 2, [(3, 2), (2, 1)]  # d = 2 + 6 + 2 = 10


def _flow(family="spline", order=None, **kw):
    torch.manual_seed(0)
    flow = SparseKRFlow(GLOBALS, PLATES, family=family, layers=2, hidden=(16, 16), embedding=3,
                        order=order, **kw)
    return randomized(flow.double(), std=0.3, seed=1)


def _allowed(layout: PlateLayout) -> torch.Tensor:
    """``allowed[i, k]``: may coordinate ``i`` of a plate-sparse map depend on ``z_k``?"""
    owner = [-1] * layout.globals  # -1: a global coordinate
    for p, (J, m) in enumerate(layout.plates):
        owner += [p * 10_000 + j for j in range(J) for _ in range(m)]
    owner = torch.tensor(owner)
    i, k = torch.meshgrid(torch.arange(layout.dim), torch.arange(layout.dim), indexing="ij")
    return (k <= i) & ((owner[k] == -1) | (owner[k] == owner[i]))


@pytest.mark.parametrize("family", ["spline", "affine", "integrated"])
def test_jacobian_is_plate_sparse_lower_triangular(family):
    flow = _flow(family)
    allowed = _allowed(flow.layout)
    for seed in range(3):
        z = torch.randn(flow.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2
        J = jacobian(flow.triangular, z)
        assert torch.all(J[~allowed] == 0), f"dependence outside the declared sparsity:\n{J}"
        assert torch.all(torch.diagonal(J) > 0)
        assert bool((J[allowed & ~torch.eye(flow.dim, dtype=torch.bool)] != 0).any())
        _, log_diag = flow.triangular.call_and_log_diag(z)
        torch.testing.assert_close(log_diag, torch.diagonal(J).log(), atol=1e-8, rtol=0)


def test_log_prob_is_change_of_variables_with_an_order():
    order = torch.randperm(10, generator=torch.Generator().manual_seed(2)).tolist()
    flow = _flow(order=order)
    x = flow.sample((4,))
    for xi, lp in zip(x, flow.log_prob(x), strict=True):
        z = flow.inverse(xi)
        ref = -0.5 * (z @ z) - 0.5 * flow.dim * math.log(2 * math.pi) + \
            torch.linalg.slogdet(jacobian(flow.inverse, xi))[1]
        assert abs(lp - ref) <= 1e-6
    x2, log_q = flow.rsample_and_log_prob((6,))
    torch.testing.assert_close(flow.log_prob(x2), log_q, atol=1e-8, rtol=0)
    assert float(flow.inverse_residual(x2).max()) < 1e-8
    assert isinstance(flow, krflows.KRFlow) and "plates=[(3, 2), (2, 1)]" in repr(flow)


def test_affine_stage_initializes_to_the_exact_kr_map_of_a_sparse_gaussian():
    """Oracle: the Cholesky KR map of a Gaussian whose members are independent given the globals."""
    g = torch.Generator().manual_seed(3)
    layout = PlateLayout(GLOBALS, tuple(PLATES))
    # x_G ~ N(0, A A^T); x_j = B_j x_G + noise_j (member blocks independent given x_G)
    d = layout.dim
    M = torch.zeros(d, d, dtype=torch.float64)
    M[:2, :2] = torch.tril(torch.randn(2, 2, generator=g, dtype=torch.float64)) + 2 * torch.eye(2)
    start = 2
    for J, m in PLATES:
        for _ in range(J):
            M[start:start + m, :2] = torch.randn(m, 2, generator=g, dtype=torch.float64)
            M[start:start + m, start:start + m] = torch.tril(
                torch.randn(m, m, generator=g, dtype=torch.float64)) * 0.3 + torch.eye(m)
            start += m
    cov = M @ M.T
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    flow = SparseKRFlow(GLOBALS, PLATES, layers=1, hidden=(8,)).double()
    flow.affine.initialize(mean, cov)
    z = torch.randn(50, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(flow(z), gaussian_kr_map(mean, cov)(z), atol=1e-10, rtol=0)
    x = flow.sample((20000,))
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.2, rtol=0.1)
    flow.affine.initialize(mean, cov.diagonal())  # variances alone: a diagonal Gaussian
    torch.testing.assert_close(flow(z), mean + z * cov.diagonal().sqrt(), atol=1e-10, rtol=0)


def test_log_prob_takes_m_batched_passes_per_plate_and_g_for_the_globals():
    flow = SparseKRFlow(3, [(500, 2)], layers=2, hidden=(16,))
    calls = {"plate": 0, "global": 0}
    for layer in flow.conditioners:
        layer.plates[0].register_forward_hook(lambda *_: calls.__setitem__("plate", calls["plate"] + 1))
        coordinate = layer.glob.coordinate

        def counted(*a, _c=coordinate):
            calls["global"] += 1
            return _c(*a)

        layer.glob.coordinate = counted
    flow.log_prob(torch.randn(7, flow.dim))
    assert calls == {"plate": 2 * 2, "global": 2 * 3}, calls


def test_large_batches_run_in_chunks_with_the_same_values(monkeypatch):
    """SparseKRFlow inherits KRFlow's chunks without autograd (about 4x the samples/s of one call
    at 10^4-10^5 points: its per-member parameters fill the cache first): the same samples and
    densities as calls of a few points each, which no rule chunks (oracle), in the batch's shape."""
    monkeypatch.setattr(krflows.flows, "_CHUNK_POINTS", {"cpu": (300, 300), "device": (300, 300)})
    flow = _flow()
    z = torch.randn(7, 150, flow.dim, dtype=torch.float64)
    with torch.no_grad():
        x, log_q, _ = flow.push(z)
        rows = [flow.push(z[i]) for i in range(7)]
        torch.testing.assert_close(x, torch.stack([r[0] for r in rows]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(log_q, torch.stack([r[1] for r in rows]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(flow.log_prob(x), log_q, rtol=0, atol=1e-8)
        torch.testing.assert_close(flow.inverse(x), z, rtol=0, atol=1e-8)
        assert flow._chunk(z, "push") == 300 and flow._chunk(z[0], "push") is None
        # the factors of a minibatch of members (the plated Pyro guide's path), both directions
        members = [torch.tensor([0, 2]), torch.tensor([1])]
        zm = torch.randn(7, 150, 2 + 2 * 2 + 1 * 1, dtype=torch.float64)
        whole = flow.push_factors(zm, members)
        rows = [flow.push_factors(zm[i], members) for i in range(7)]
        torch.testing.assert_close(whole[0], torch.stack([r[0] for r in rows]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(whole[1], torch.stack([r[1] for r in rows]), rtol=1e-12, atol=1e-12)
        for p, member_terms in enumerate(whole[2]):
            parts = torch.stack([r[2][p] for r in rows])
            torch.testing.assert_close(member_terms, parts, rtol=1e-12, atol=1e-12)
        log_g, log_members = flow.log_prob_factors(whole[0], members)
        torch.testing.assert_close(log_g, whole[1], rtol=0, atol=1e-8)
        for a, b in zip(log_members, whole[2], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-8)


def test_parameters_grow_linearly_in_the_plate_size():
    n = [sum(p.numel() for p in SparseKRFlow(2, [(J, 1)], layers=2, hidden=(16, 16)).parameters())
         for J in (100, 200, 300)]
    assert n[2] - n[1] == n[1] - n[0] > 0
    per_member = (n[1] - n[0]) / 100
    assert per_member == 2 * 8 + 1 + 1 + 1 + 2  # 2 embeddings, shift, log-diag, lower (1x1), cross (2)


@pytest.mark.slow
def test_fit_and_diagnose_accept_a_sparse_flow():
    """A Gaussian with plate structure: the affine stage alone can be exact, and fit gets close."""
    layout = PlateLayout(1, ((20, 1),))
    M = torch.eye(layout.dim) * 0.5  # x_0 ~ N(0, 1), x_j = 0.8 x_0 + N(0, 0.5^2)
    M[0, 0], M[1:, 0] = 1.0, 0.8
    cov = M @ M.T
    target = krflows.targets.Gaussian(torch.linspace(-1, 1, layout.dim), cov)
    torch.manual_seed(4)
    flow = SparseKRFlow(1, [(20, 1)], layers=1, hidden=(16,))
    krflows.fit(flow, target, steps=300, batch_size=128, lr=5e-3, log_every=100)
    report = krflows.diagnose(flow, target, n=4000)
    assert report["ess"] > 0.8, report["ess"]


def test_member_features_and_errors():
    feats = torch.randn(5, 3)
    net = PlateConditioner(1, 5, 2, 4, hidden=(8,), embedding=0, features=feats)
    assert net(torch.randn(2, 1), torch.randn(2, 5, 2)).shape == (2, 5, 2, 4)
    with pytest.raises(ValueError, match=r"features must have shape \(5, f\)"):
        PlateConditioner(1, 5, 1, 4, features=torch.randn(4, 3))
    with pytest.raises(ValueError, match="at least one hidden layer"):
        PlateConditioner(1, 5, 1, 4, hidden=())
    with pytest.raises(ValueError, match="each plate"):
        SparseKRFlow(1, [(0, 1)])
    with pytest.raises(ValueError, match="one entry per plate"):
        SparseKRFlow(1, [(3, 1)], features=[None, None])


# ---- minibatches of members: the factorized log q -----------------------------------------------

def _flow_with_features(order=None):
    torch.manual_seed(0)
    feats = [torch.randn(3, 2), None]
    flow = SparseKRFlow(GLOBALS, PLATES, layers=2, hidden=(16, 16), embedding=3, features=feats, order=order)
    return randomized(flow.double(), std=0.3, seed=1)


def test_factors_sum_to_log_prob_and_the_globals_factor_is_the_marginal():
    """Oracles: the flow's own log_prob (inverse + change of variables, tested above against
    autograd) and its exact marginal of the leading g coordinates."""
    order = torch.randperm(10, generator=torch.Generator().manual_seed(5)).tolist()
    flow = _flow_with_features(order)
    z = torch.randn(6, flow.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y, log_g, log_m = flow.push_factors(z)
    assert [t.shape for t in log_m] == [(6, 3), (6, 2)]
    x = flow(z)  # user order
    torch.testing.assert_close(y, x[..., flow.order], atol=1e-12, rtol=0)
    total = log_g + sum(t.sum(-1) for t in log_m)
    torch.testing.assert_close(total, flow.log_prob(x), atol=1e-8, rtol=0)
    torch.testing.assert_close(log_g, flow.marginal_log_prob(y[..., :GLOBALS]), atol=1e-8, rtol=0)
    back_g, back_m = flow.log_prob_factors(y)
    torch.testing.assert_close(back_g, log_g, atol=1e-8, rtol=0)
    for a, b in zip(back_m, log_m, strict=True):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=0)


def test_a_minibatch_of_members_is_the_restriction_of_the_full_map():
    """Pushing the globals and members B gives exactly the full push's values and per-member
    factors at B (the block of member j reads z_G and z_j only), and inverts."""
    flow = _flow_with_features()
    z = torch.randn(4, flow.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y, log_g, log_m = flow.push_factors(z)
    z_g, (z_a, z_b) = flow.layout.split(z)
    y_g, (y_a, y_b) = flow.layout.split(y)
    idx_a, idx_b = torch.tensor([2, 0]), torch.tensor([1])
    sub = torch.cat([z_g, z_a[:, idx_a].flatten(-2), z_b[:, idx_b].flatten(-2)], -1)
    y_sub, log_g_sub, (log_a, log_b) = flow.push_factors(sub, [idx_a, idx_b])
    want = torch.cat([y_g, y_a[:, idx_a].flatten(-2), y_b[:, idx_b].flatten(-2)], -1)
    torch.testing.assert_close(y_sub, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(log_g_sub, log_g, atol=1e-12, rtol=0)
    torch.testing.assert_close(log_a, log_m[0][:, idx_a], atol=1e-12, rtol=0)
    torch.testing.assert_close(log_b, log_m[1][:, idx_b], atol=1e-12, rtol=0)
    back_g, (back_a, _) = flow.log_prob_factors(y_sub, [idx_a, idx_b])
    torch.testing.assert_close(back_a, log_a, atol=1e-8, rtol=0)
    # one plate subsampled, the other in full
    y_mix, _, (log_a2, log_b2) = flow.push_factors(
        torch.cat([z_g, z_a[:, idx_a].flatten(-2), z_b.flatten(-2)], -1), [idx_a, None])
    torch.testing.assert_close(log_b2, log_m[1], atol=1e-12, rtol=0)


def test_member_indices_are_checked():
    flow = _flow_with_features()
    z = torch.randn(2, GLOBALS + 2 * 2 + 2, dtype=torch.float64)  # plate (3, 2): 2 members; (2, 1): all
    with pytest.raises(ValueError, match=r"indices in \[0, 3\)"):
        flow.push_factors(z, [torch.tensor([0, 3]), None])
    with pytest.raises(ValueError, match="integer tensor"):
        flow.push_factors(z, [torch.tensor([0.0, 1.0]), None])
    with pytest.raises(ValueError, match="one entry per plate"):
        flow.push_factors(z, [torch.tensor([0, 1])])
    with pytest.raises(ValueError, match=r"shape \(\*, 8\)"):
        flow.push_factors(z[:, :5], [torch.tensor([0, 1]), None])


@pytest.mark.slow
def test_compiled_sparse_flow_matches_eager():
    """``SparseKRFlow.compile()`` (``KRFlow``'s: the push and the analytic-inverse pull go through
    ``torch.compile``): same samples, densities and gradients as eager with the same weights and
    random numbers. float64, as ``test_flows``: a randomized map's float32 inverse is too
    ill-conditioned to compare (eager and compiled float32 log_prob differ by rounding amplified
    up to O(1) at some points; the float32 push agrees to 1e-4)."""
    import warnings

    def make():
        torch.manual_seed(0)
        return randomized(SparseKRFlow(2, [(3, 2)], layers=1, hidden=(8,), embedding=3).double(), std=0.3)

    eager, compiled = make(), make()
    compiled.compile()
    for seed in (0, 1):
        draws = []
        for flow in (eager, compiled):
            torch.manual_seed(seed)
            # the second compiled draw runs what the first compiled (no recompilation)
            with torch.compiler.set_stance("fail_on_recompile") if seed and flow is compiled \
                    else contextlib.nullcontext():
                x, log_q = flow.rsample_and_log_prob((32,))
            grads = torch.autograd.grad(log_q.mean() + x.square().mean(), list(flow.parameters()))
            draws.append((x.detach(), log_q.detach(), grads))
        (x1, lq1, g1), (x2, lq2, g2) = draws
        torch.testing.assert_close(x2, x1, atol=1e-10, rtol=0)
        torch.testing.assert_close(lq2, lq1, atol=1e-10, rtol=0)
        for a, b in zip(g1, g2, strict=True):
            torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager happened
        torch.testing.assert_close(compiled.log_prob(x1), eager.log_prob(x1), atol=1e-8, rtol=0)
    assert set(compiled._compiled) == {"push", "pull"}, "the compiled path fell back to eager"
