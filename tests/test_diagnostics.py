"""Diagnostics: every number against a closed form or an independent computation.

Flows are set exactly (``KRFlow(d, family="affine", layers=0)`` + ``affine.initialize``), so
that ``q`` is a known Gaussian and the truth of each diagnostic is known in closed form.
"""

import dataclasses
import json
import math

import pytest
import torch
from scipy import optimize, stats
from torch.distributions import MultivariateNormal, kl_divergence

import krflows
from krflows import KRFlow, diagnostics, targets
from krflows.diagnostics import (
    eubo,
    forward_ess,
    missing_modes,
    mode_weights,
    proportion,
    sample_distances,
    self_normalized,
    total_variation,
    valley_mask,
)
from krflows.objectives import NonFiniteTargetError

MEAN = torch.tensor([1.0, -2.0], dtype=torch.float64)
COV = torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
N = 4000  # flow samples per report: enough for the checks below, fast on two cores
SUB = 400  # subsample of the O(n^2) Sinkhorn


def gaussian_flow(mean, cov) -> KRFlow:
    """A flow that is exactly N(mean, cov), in float64."""
    flow = KRFlow(len(mean), family="affine", layers=0).double()
    flow.affine.initialize(torch.as_tensor(mean, dtype=torch.float64),
                           torch.as_tensor(cov, dtype=torch.float64))
    return flow


@pytest.fixture(scope="module")
def gauss_target():
    return targets.Gaussian(MEAN, COV, dtype=torch.float64)


@pytest.fixture(scope="module")
def exact_report(gauss_target):
    return krflows.diagnose(gaussian_flow(MEAN, COV), gauss_target, n=N, seed=0, n_sub=SUB,
                            functions={"x0": lambda x: x[:, 0]})


@pytest.fixture(scope="module")
def wide_report(gauss_target):
    """q = N(m + 0.3, 1.5^2 Σ): over-dispersed and shifted."""
    flow = gaussian_flow(MEAN + 0.3, 1.5**2 * COV)
    fs = {"x0": lambda x: x[:, 0], "x0_sq": lambda x: x[:, 0] ** 2}
    return krflows.diagnose(flow, gauss_target, n=N, seed=1, n_sub=SUB, functions=fs)


@pytest.fixture(scope="module")
def one_mode_report():
    """An equal 1-D mixture 12 sd apart and a flow that is exactly its left component."""
    target = targets.Bimodal1D(separation=12.0, dtype=torch.float64)
    return krflows.diagnose(gaussian_flow([-6.0], [[1.0]]), target, n=N, seed=2, n_sub=SUB)


# ---- the exact flow ---------------------------------------------------------------------------


def test_exact_flow_is_perfect(exact_report, gauss_target):
    r = exact_report
    assert r["ess"] == pytest.approx(1.0, abs=1e-12)
    assert r["forward_ess"] == pytest.approx(1.0, abs=1e-12)
    assert abs(r["kl_reverse"]) < 1e-10 and abs(r["kl_forward"]) < 1e-10
    assert r["log_z"] == pytest.approx(gauss_target.log_z, abs=1e-10)
    assert r["true_log_z"] == gauss_target.log_z
    assert r["pareto_k"] < 0.5  # constant weights: reported as the bounded-tail limit -inf
    tol = 1e-10
    assert r["elbo"] <= r["log_z"] + tol and r["log_z"] <= r["eubo"] + tol
    for key in ("mode_weights", "true_mode_weights", "mode_tv", "valley_mass", "missing_modes"):
        assert key not in r
    assert r["n_dropped"] == 0 and r["frac_zero_density"] == 0.0
    assert r["verdict"].startswith("no problems detected"), r["verdict"]
    # the affine map's log-slopes are log diag(chol(Σ)), at every z
    log_diag = torch.linalg.cholesky(COV).diagonal().log()
    for row in r["log_slope_quantiles"].values():
        assert row == pytest.approx(log_diag.tolist(), abs=1e-12)
    assert r["inverse_residual_max"] < 1e-12


def test_exact_flow_distances_sit_at_the_noise_floor(exact_report):
    r = exact_report
    assert r["distance_n"] == SUB
    assert r["sinkhorn"] < 2.5 * r["sinkhorn_floor"], (r["sinkhorn"], r["sinkhorn_floor"])
    assert r["sliced_w2"] < 2.5 * r["sliced_w2_floor"], (r["sliced_w2"], r["sliced_w2_floor"])


# ---- a mis-scaled Gaussian flow: closed-form KLs -----------------------------------------------


def test_kls_match_closed_form_gaussian_kls(wide_report):
    r = wide_report
    q = MultivariateNormal(MEAN + 0.3, 1.5**2 * COV)
    p = MultivariateNormal(MEAN, COV)
    kl_qp, kl_pq = float(kl_divergence(q, p)), float(kl_divergence(p, q))
    assert abs(r["kl_reverse"] - kl_qp) < 4 * r["elbo_se"], (r["kl_reverse"], kl_qp, r["elbo_se"])
    assert abs(r["kl_forward"] - kl_pq) < 4 * r["eubo_se"], (r["kl_forward"], kl_pq, r["eubo_se"])
    assert r["elbo"] < r["true_log_z"] < r["eubo"]
    assert r["jeffreys"] == pytest.approx(r["kl_reverse"] + r["kl_forward"])
    assert abs(r["log_z"] - r["true_log_z"]) < 4 * r["log_z_se"]


def test_ess_match_their_population_values(gauss_target):
    """ESS -> 1 / (1 + chi2): reverse 1 / E_q[(p/q)^2], forward 1 / E_p[(q/p)^2], here by a
    separate Monte Carlo of 200k fresh samples. q = N(m + 0.2, 0.9^2 Σ): both chi2 and the
    fourth moments of the weights are finite (for the wide flow above chi2(q||p) = inf)."""
    shift, scale = 0.2, 0.9
    q = MultivariateNormal(MEAN + shift, scale**2 * COV)
    p = MultivariateNormal(MEAN, COV)
    r = krflows.diagnose(gaussian_flow(MEAN + shift, scale**2 * COV), gauss_target, n=N, seed=6,
                         n_sub=SUB)
    torch.manual_seed(7)
    x, y = q.sample((200_000,)), p.sample((200_000,))
    rev = 1 / torch.exp(2 * (p.log_prob(x) - q.log_prob(x))).mean()
    fwd = 1 / torch.exp(2 * (q.log_prob(y) - p.log_prob(y))).mean()
    assert r["ess"] == pytest.approx(float(rev), abs=0.03), (r["ess"], float(rev))
    assert r["forward_ess"] == pytest.approx(float(fwd), abs=0.03), (r["forward_ess"], float(fwd))
    assert r["pareto_k"] < 0.5 and r["forward_pareto_k"] < 0.5


def test_forward_pareto_k_flags_a_too_wide_flow(wide_report):
    """chi2(q||p) = inf for q = N(., 1.5^2 Σ): the forward weights u = q/p at y ~ p have the
    tail P(u > t) ~ t^(-1/(1 - 1/1.5^2)), a Pareto shape k = 1 - 1/2.25 ≈ 0.56 (no variance)."""
    assert wide_report["forward_pareto_k"] > 0.5
    assert wide_report["pareto_k"] < 0.5  # the reverse weights p/q are bounded


def test_self_normalized_expectations_cover_the_truth(wide_report):
    e = wide_report["expectations"]
    truths = {"x0": float(MEAN[0]), "x0_sq": float(COV[0, 0] + MEAN[0] ** 2)}
    for name, truth in truths.items():
        assert abs(e[name]["is"] - truth) < 4 * e[name]["is_se"], (name, e[name], truth)
        assert abs(e[name]["exact"] - truth) < 4 * e[name]["exact_se"]
    # the plain flow average of x0^2 is that of q: 1.5^2 * 2 + 1.3^2, far from the truth
    flow = e["x0_sq"]
    assert flow["flow"] == pytest.approx(1.5**2 * 2.0 + 1.3**2, abs=5 * flow["flow_se"])
    assert abs(flow["flow"] - truths["x0_sq"]) > 10 * flow["flow_se"]


def test_wrong_flow_distances_clearly_above_the_floor(wide_report):
    r = wide_report
    assert r["sinkhorn"] > 5 * r["sinkhorn_floor"]
    assert r["sliced_w2"] > 2.5 * r["sliced_w2_floor"]
    assert "beyond sampling noise" in r["verdict"]


# ---- a flow on one mode of two ------------------------------------------------------------------


def test_one_mode_flow_reports_the_missing_mode(one_mode_report):
    r = one_mode_report
    assert r["mode_weights"] == pytest.approx([1.0, 0.0], abs=1e-3)
    assert r["true_mode_weights"] == pytest.approx([0.5, 0.5])
    assert r["mode_tv"] == pytest.approx(0.5, abs=1e-3)
    assert r["missing_modes"] == [1] and r["missing_mass"] == pytest.approx(0.5)
    # forward ESS = the fraction of target samples in the covered mode: binomial(N, 1/2) / N
    assert r["forward_ess"] == pytest.approx(0.5, abs=4 * math.sqrt(0.25 / r["n_exact"]))
    # the reverse quantities cannot see it: q = 2 p on its support
    assert r["ess"] == pytest.approx(1.0, abs=1e-9)
    assert r["kl_reverse"] == pytest.approx(math.log(2.0), abs=1e-9)
    assert r["log_z"] == pytest.approx(r["true_log_z"] - math.log(2.0), abs=1e-9)
    assert "mode 1" in r["verdict"] and "missing" in r["verdict"]
    assert r["verdict"].startswith("50% of the target's mass (mode 1) is missing")


def test_exact_kr_map_is_steep_where_the_flow_is_not(one_mode_report):
    """Design notes §3: the exact map crosses the valley with a large slope; this flow's slope is 1."""
    r = one_mode_report
    assert r["log_slope_max"] == [pytest.approx(0.0, abs=1e-12)]
    assert r["exact_log_slope_max"] > 5.0


# ---- valley mass ---------------------------------------------------------------------------------


def test_valley_mass_of_a_bridging_flow_matches_quadrature():
    """A single Gaussian over both modes of Bimodal1D(8): its valley mass by the normal CDF."""
    sep, level = 8.0, 0.01
    target = targets.Bimodal1D(separation=sep, dtype=torch.float64)
    sd = math.sqrt(1 + (sep / 2) ** 2)  # moment-matched: mixture variance
    r = krflows.diagnose(gaussian_flow([0.0], [[sd**2]]), target, n=N, seed=3, n_sub=SUB)

    def log_mix(x):  # the mixture's log-density, up to a constant
        return math.log(0.5 * stats.norm.pdf(x, -sep / 2) + 0.5 * stats.norm.pdf(x, sep / 2))

    # valley = (-c, c): between the modes where the density is below level x mode density
    c = optimize.brentq(lambda x: log_mix(x) - log_mix(sep / 2) - math.log(level), 0.0, sep / 2)
    flow_mass = stats.norm.cdf(c / sd) - stats.norm.cdf(-c / sd)
    true_mass = (0.5 * (stats.norm.cdf(c, -sep / 2) - stats.norm.cdf(-c, -sep / 2))
                 + 0.5 * (stats.norm.cdf(c, sep / 2) - stats.norm.cdf(-c, sep / 2)))
    assert abs(r["valley_mass"] - flow_mass) < 4 * r["valley_mass_se"], (r["valley_mass"], flow_mass)
    assert abs(r["true_valley_mass"] - true_mass) < 4 * r["true_valley_mass_se"] + 1e-3
    assert r["missing_modes"] == []
    assert "in the valley between modes" in r["verdict"]


def test_gap_target_zero_density_and_json_of_infinities():
    """A flow N(0, 1) over GappedMixture1D: mass in the gap (-1, 1) is Φ(1) - Φ(-1), ELBO = -inf."""
    target = targets.GappedMixture1D(dtype=torch.float64)
    r = krflows.diagnose(gaussian_flow([0.0], [[1.0]]), target, n=N, seed=4, n_sub=SUB)
    gap_mass = stats.norm.cdf(1.0) - stats.norm.cdf(-1.0)
    assert abs(r["valley_mass"] - gap_mass) < 4 * r["valley_mass_se"]
    assert r["frac_zero_density"] == r["valley_mass"]
    assert r["true_valley_mass"] == 0.0
    assert r["elbo"] == -math.inf and r["kl_reverse"] == math.inf
    assert math.isfinite(r["log_z"])  # zero weights are kept in the average
    assert "target density is zero" in r["verdict"]
    loaded = json.loads(r.to_json())
    assert loaded["elbo"] == "-inf" and loaded["verdict"] == r["verdict"]
    assert all(isinstance(v, float) for v in r.scalars().values())


# ---- rendering and the scalars ----------------------------------------------------------------


def test_report_renders_and_scalars_are_floats(wide_report):
    r = wide_report
    text, md = r.to_text(), r.to_markdown()
    assert "verdict:" in text and "< 0.5 good, 0.5-0.7 usable, > 0.7 unreliable" in text
    assert md.startswith("### ") and "| quantity | value | note |" in md
    assert "KL(q \\|\\| p)" in md  # pipes escaped inside table cells
    loaded = json.loads(r.to_json())
    assert set(loaded) == set(r) and loaded["ess"] == r["ess"]
    s = r.scalars()
    assert s and all(type(v) is float for v in s.values())
    for key in ("elbo", "log_z", "log_z_se", "eubo", "true_log_z", "kl_reverse", "kl_forward", "ess",
                "forward_ess", "pareto_k", "sinkhorn", "sinkhorn_floor", "sliced_w2", "sliced_w2_floor",
                "log_slope_max", "log_slope_max/0", "log_slope_q0.99/1", "inverse_residual_max",
                "expect/x0/is", "expect/x0/is_se", "expect/x0/flow", "expect/x0/exact"):
        assert key in s, key
    assert isinstance(r, dict) or hasattr(r, "keys")
    assert str(r) == text


def test_mode_scalars(one_mode_report):
    s = one_mode_report.scalars()
    assert s["mode_weight/0"] == pytest.approx(1.0, abs=1e-3) and s["true_mode_weight/1"] == 0.5
    assert s["n_missing_modes"] == 1.0 and s["mode_tv"] == pytest.approx(0.5, abs=1e-3)


# ---- callables, non-finite values, reference samples, seeds ------------------------------------


def test_callable_target_with_nan_region_and_reference_samples():
    gauss = targets.Gaussian(MEAN, COV, dtype=torch.float64)

    def half_nan(x):
        lp = gauss.log_prob(x)
        return torch.where(x[..., 0] > float(MEAN[0]), lp, torch.full_like(lp, float("nan")))

    flow = gaussian_flow(MEAN, COV)
    with pytest.raises(NonFiniteTargetError, match="NaN at .* nan='zero'"):
        krflows.diagnose(flow, half_nan, n=N, seed=5, n_sub=SUB)  # NaN is an error by default
    r = krflows.diagnose(flow, half_nan, n=N, seed=5, n_sub=SUB, nan="zero")  # NaN: zero density
    assert r["n"] == N and r["n_dropped"] == 0
    assert r["frac_zero_density"] == pytest.approx(0.5, abs=4 * math.sqrt(0.25 / N))
    assert "target density is zero" in r["verdict"] and r["elbo"] == -math.inf
    for key in ("true_log_z", "eubo", "forward_ess", "kl_reverse", "sinkhorn"):
        assert key not in r  # nothing is known about the truth of a bare callable
    torch.manual_seed(0)
    ref = gauss.sample((N,))
    ref[:3, 1] = float("nan")  # non-finite reference points are dropped and counted
    r = krflows.diagnose(flow, gauss.log_prob, n=N, reference=ref, seed=5, n_sub=SUB)
    assert r["reference_source"] == "reference" and r["n_exact"] == N - 3 and r["n_dropped_exact"] == 3
    assert r["forward_ess"] == pytest.approx(1.0, abs=1e-12)
    assert r["jeffreys"] == pytest.approx(0.0, abs=1e-10)


def test_seed_reproducible_and_global_rng_untouched(gauss_target):
    flow = gaussian_flow(MEAN + 0.3, 1.5**2 * COV)
    state = torch.get_rng_state()
    a = krflows.diagnose(flow, gauss_target, n=500, seed=11, n_sub=100)
    b = krflows.diagnose(flow, gauss_target, n=500, seed=11, n_sub=100)
    assert torch.equal(state, torch.get_rng_state())
    assert {k: v for k, v in a.scalars().items() if not k.endswith("seconds")} == \
        {k: v for k, v in b.scalars().items() if not k.endswith("seconds")}  # wall times differ


def test_bad_inputs_raise_clear_errors(gauss_target):
    flow = gaussian_flow(MEAN, COV)
    with pytest.raises(ValueError, match=r"reference must be a tensor of shape \(m, 2\)"):
        krflows.diagnose(flow, gauss_target, n=100, reference=torch.zeros(10, 3))
    with pytest.raises(ValueError, match="must map"):
        krflows.diagnose(flow, gauss_target, n=100, functions={"bad": lambda x: x})


# ---- the pure functions ---------------------------------------------------------------------------


def test_forward_ess_is_the_covered_fraction():
    """q = p restricted to A: u = q/p ∝ 1_A, so forward ESS = #A / M exactly."""
    log_v = torch.cat([torch.full((30,), 0.7), torch.full((70,), 80.0)])  # q ≈ 0 at 70 of 100
    assert float(forward_ess(log_v)) == pytest.approx(0.3, abs=1e-12)
    assert float(forward_ess(torch.full((10,), -3.0))) == pytest.approx(1.0)


def test_self_normalized_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    log_w = torch.randn(50, generator=g, dtype=torch.float64)
    f = torch.randn(50, 3, generator=g, dtype=torch.float64)
    est, se = self_normalized(f, log_w)
    w = log_w.exp() / log_w.exp().sum()
    direct = (w[:, None] * f).sum(0)
    assert torch.allclose(est, direct)
    assert torch.allclose(se, ((w[:, None] ** 2) * (f - direct) ** 2).sum(0).sqrt())


def test_mode_and_distance_helpers():
    labels = torch.tensor([0, 2, 2, 1, 2])
    assert mode_weights(labels, 4).tolist() == [0.2, 0.2, 0.6, 0.0]
    assert float(total_variation(torch.tensor([0.2, 0.8]), torch.tensor([0.5, 0.5]))) == pytest.approx(0.3)
    assert missing_modes(torch.tensor([0.99, 0.01]), torch.tensor([0.6, 0.4]), n=1000).tolist() == [1]
    assert missing_modes(torch.tensor([0.99, 0.01]), torch.tensor([0.99, 0.01]), n=1000).tolist() == []
    assert proportion(torch.tensor([True, True, False, False])) == (0.5, 0.25)
    est, se = eubo(torch.tensor([1.0, 3.0]))
    assert float(est) == 2.0 and float(se) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="labels must lie in"):
        mode_weights(torch.tensor([0, 3]), 2)
    # the slab: only points between their mode and the other one count
    modes = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    x = torch.tensor([[2.0, 0.5], [-2.0, 0.0], [2.0, 0.0]])
    mask = valley_mask(x, torch.full((3,), -10.0), torch.tensor([0, 0, 1]), modes, torch.zeros(2))
    assert mask.tolist() == [True, False, True]


def test_sample_distances_of_shifted_samples():
    """Sliced W2 of a shift by s is |s| times the RMS of the projection of a unit direction:
    in 1-D exactly |s|; the Sinkhorn divergence of a shift in 1-D is s^2 (translation)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(300, 1, generator=g, dtype=torch.float64)
    d = sample_distances(y + 0.5, y, y2=y.clone())
    assert d["sliced_w2"] == pytest.approx(0.5, rel=1e-9)
    assert d["sinkhorn"] == pytest.approx(0.25, rel=1e-3)
    assert d["sinkhorn_floor"] == 0.0 and d["sliced_w2_floor"] == 0.0


def test_public_names():
    assert krflows.diagnose is diagnostics.diagnose
    assert "diagnose" in krflows.__all__
    assert diagnostics.ess(torch.zeros(5)) == pytest.approx(1.0)  # unchanged


def test_light_tailed_flow_is_flagged_by_the_jeffreys_gap():
    """A standard normal flow on N(0, 3² I_5): closed form EUBO - ELBO = KL(p||q) + KL(q||p)
    = 5 · ½ (9 + 1/9 - 2) ≈ 17.8 nats > 10, so the verdict names the light tails."""
    d = 5
    target = targets.Gaussian(torch.zeros(d), 9 * torch.eye(d), dtype=torch.float64)
    flow = KRFlow(d, family="affine", layers=1, hidden=(4,)).double()  # the identity map
    p = MultivariateNormal(torch.zeros(d, dtype=torch.float64), 9 * torch.eye(d, dtype=torch.float64))
    q = MultivariateNormal(torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64))
    exact = float(kl_divergence(p, q) + kl_divergence(q, p))
    r = krflows.diagnose(flow, target, n=4000, seed=0, n_sub=200)
    assert r["jeffreys"] == pytest.approx(exact, rel=0.1)
    assert exact > 10 and "EUBO - ELBO" in r["verdict"], r["verdict"]


def test_every_stage_entry_is_declared_once_in_the_layout(gauss_target):
    """The stages' fields are the report's keys, all declared in LAYOUT, and the report follows it."""
    import dataclasses

    from krflows.diagnostics import conditioning, distances, modes, report, weights

    keys = [e.key for e in report.LAYOUT]
    assert len(keys) == len(set(keys))
    for stage in (weights.Evidence, weights.ForwardEvidence, modes.ModeStats, distances.Distances,
                  conditioning.Conditioning):
        assert {f.name for f in dataclasses.fields(stage)} <= set(keys), stage.__name__
    r = krflows.diagnose(gaussian_flow(MEAN, COV), gauss_target, n=500, seed=0, n_sub=100)
    assert list(r) == [k for k in keys if k in r]
    assert all(f"``{k}``" in krflows.diagnose.__doc__ for k in keys)
    assert r.headline()[0].startswith("verdict") and any(line.startswith("ESS/N") for line in r.headline())


def test_old_sinkhorn_name_is_deprecated():
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="sharp_sinkhorn_divergence"):
        old = diagnostics.sinkhorn_divergence(x, x + 1, reg=0.1)
    assert old == diagnostics.sharp_sinkhorn_divergence(x, x + 1, 0.1)


# ---- the mode search: missed modes without reference samples ------------------------------------

def test_mode_search_finds_the_mode_a_flow_misses_on_a_plain_callable():
    """Truth: a 0.3/0.7 mixture 8 sd apart, log Z = 0; the flow is exactly the 0.7 component."""
    mixture = targets.Bimodal2D(separation=8.0, weights=[0.3, 0.7], dtype=torch.float64)
    log_z = float(mixture.log_z)
    flow = gaussian_flow([4.0, 0.0], [[1.0, 0.0], [0.0, 1.0]])
    r = krflows.diagnose(flow, lambda x: mixture.log_prob(x), n=N, seed=0, n_sub=SUB)
    assert "missing_modes" not in r  # a plain callable: the truth is unknown to the report
    assert r["n_modes_found"] == 2 and r["n_missed_modes"] == 1
    (missed,) = r["missed_modes"]
    assert missed["location"] == pytest.approx([-4.0, 0.0], abs=1e-4)
    assert missed["expected_mass"] == pytest.approx(0.3, abs=1e-3)
    assert missed["flow_mass"] == 0.0 and missed["negative_definite"]
    assert r["missed_mass"] == pytest.approx(0.3, abs=1e-3)
    # the flow's log Z is log 0.7 + log Z; the implied bias is the truth's log(1 / 0.7)
    assert r["log_z"] - log_z == pytest.approx(math.log(0.7), abs=0.01)
    assert r["log_z_missed_bias"] == pytest.approx(-math.log(0.7), abs=0.01)
    assert r["verdict"].startswith("the flow misses 1 mode found by a mode search: at [-4, 0]")
    assert "log Z is underestimated by ≈0.36 nats" in r["verdict"]
    assert r.scalars()["n_missed_modes"] == 1.0
    assert "missed at [-4, 0]" in r.to_text()


def test_mode_search_does_not_cry_wolf_on_a_covered_mode(gauss_target):
    r = krflows.diagnose(gaussian_flow(MEAN, COV), gauss_target.log_prob, n=N, seed=0, n_sub=SUB)
    assert r["n_modes_found"] == 1 and r["n_missed_modes"] == 0 and r["missed_modes"] == []
    assert r["verdict"].startswith("no problems detected")


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs", [("banana", {}), ("funnel", {"dim": 10})])
def test_mode_search_no_false_alarm_on_fitted_unimodal_flows(name, kwargs):
    torch.manual_seed(0)
    target = targets.get_target(name, **kwargs)
    flow = KRFlow(target.dim)
    krflows.fit(flow, target, steps=300, batch_size=256)
    r = krflows.diagnose(flow, target.log_prob, n=N, seed=0, n_sub=SUB)
    assert r["n_missed_modes"] == 0, r["missed_modes"]


def test_mode_search_can_be_given_or_skipped(gauss_target):
    flow = gaussian_flow(MEAN, COV)
    r = krflows.diagnose(flow, gauss_target, n=500, seed=0, n_sub=100, modes=None)
    assert "n_modes_found" not in r and "missed_modes" not in r
    modes = krflows.find_modes(gauss_target, flow, seed=0)
    r = krflows.diagnose(flow, gauss_target, n=500, seed=0, n_sub=100, modes=modes)
    assert r["n_modes_found"] == 1 and r["n_missed_modes"] == 0
    with pytest.raises(ValueError, match="modes must be 'search', a ModeSet or None"):
        krflows.diagnose(flow, gauss_target, n=500, modes="all")


def test_missed_bias_replaces_the_few_draws_in_a_missed_mode():
    """A wide flow on the 0.7 mode sends ~1-2 % of its draws into the 0.3 mode; those draws
    carry huge weights and part of that mode's mass in Z-hat. Oracle: the mixture's exact log Z
    (the true error of the flow's log Z-hat), over seeds where the mode is flagged."""
    from krflows.diagnostics.modes import missed_modes

    mixture = targets.Bimodal2D(separation=8.0, weights=[0.3, 0.7], dtype=torch.float64)
    flow = gaussian_flow([3.0, 0.0], [[1.6 ** 2, 0.0], [0.0, 1.0]])
    modes = krflows.find_modes(mixture, flow, seed=0)
    log_q_modes = flow.log_prob(modes.locations).detach()
    flagged = 0
    for seed in (0, 1, 3, 4, 5):
        torch.manual_seed(seed)
        x, log_q = (t.detach() for t in flow.rsample_and_log_prob((N,)))
        log_w = mixture.log_prob(x) - log_q
        log_z = float(torch.logsumexp(log_w, 0) - math.log(N))
        found = missed_modes(modes, x, log_q_modes, log_z, log_w=log_w)
        if found.n_missed_modes:
            flagged += 1
            assert found.log_z_missed_bias == pytest.approx(float(mixture.log_z) - log_z, abs=0.03)
    assert flagged >= 4


@pytest.mark.parametrize("weights, flow_weights, flagged", [
    ([0.3, 0.7], [0.5, 0.5], True), ([0.3, 0.7], [0.3, 0.7], False),
    # a small mode given under half its share: a TV of 0.03 (a probe's d = 5 fit: 0.023 for 0.05)
    ([0.05, 0.95], [0.02, 0.98], True), ([0.05, 0.95], [0.04, 0.96], False)])
def test_reweighted_mode_shares_find_a_misweighted_covered_mode(weights, flow_weights, flagged):
    """The 'flow' is an exact sampler of a 2-component mixture with known density, the target
    the ``weights`` mixture: the found modes' reweighted shares must estimate its weights within
    their standard errors (oracle: the target's weights), and the verdict must flag the
    misweighted flow and stay silent on the right one."""
    from krflows.diagnostics.modes import missed_modes
    from krflows.diagnostics.report import problems

    target = targets.Bimodal2D(separation=8.0, weights=weights, dtype=torch.float64)
    proposal = targets.Bimodal2D(separation=8.0, weights=flow_weights, dtype=torch.float64)
    torch.manual_seed(0)
    x = proposal.sample((N,))
    log_w = target.log_prob(x) - proposal.log_prob(x)
    log_z = float(torch.logsumexp(log_w, 0) - math.log(N))
    modes = krflows.find_modes(target, box=(-10.0, 10.0), seed=0)
    left = int(modes.locations[:, 0].argmin())
    found = missed_modes(modes, x, proposal.log_prob(modes.locations), log_z, log_w=log_w)
    assert found.n_missed_modes == 0
    share, se = found.found_mode_weights_reweighted[left], found.found_mode_weights_se[left]
    assert abs(share - weights[0]) < 4 * se and se < 0.02
    assert found.found_mode_weights[left] == pytest.approx(flow_weights[0], abs=0.03)
    e = {"ess": 0.9, "pareto_k": 0.2, **dataclasses.asdict(found)}
    text = "; ".join(problems(e, 1.0))
    assert ("misweights the modes it covers" in text) == flagged


@pytest.mark.parametrize("flow_weights, flagged", [([0.02, 0.98], True), ([0.045, 0.955], False)])
def test_a_small_mode_given_under_half_its_known_weight_is_flagged(flow_weights, flagged):
    """Against a target's known weights 0.05/0.95 at n = 20000 draws: a TV of 0.03 passed the TV
    rule; a mode given under half its weight, beyond 3 binomial standard errors, is a finding."""
    from krflows.diagnostics.report import problems

    e = {"n": 20000, "ess": 0.9, "pareto_k": 0.2, "mode_weights": flow_weights,
         "true_mode_weights": [0.05, 0.95], "mode_tv": abs(flow_weights[0] - 0.05)}
    text = "; ".join(problems(e, 1.0))
    assert ("mode weights are off" in text) == flagged, text
    assert ("mode 0 gets 0.02 against 0.05" in text) == flagged, text


def test_power_law_tails_are_found_and_light_tails_are_not():
    """Oracles: log p of a Student t decays like -(nu + d) log r (decay ratio 1), a Laplace's
    linearly (2), a Gaussian's quadratically (4); a probe's Cauchy fits read k̂ 0.4-0.69 and
    "no problems detected" with log Z 10-20 standard errors low (Gaussian flow tails)."""
    from krflows.diagnostics.report import problems
    from krflows.diagnostics.weights import tails

    torch.manual_seed(0)
    x = torch.randn(4000, 3, dtype=torch.float64)  # stands for the flow's samples

    def student(nu):
        return targets.as_target(lambda y: -0.5 * (nu + 3) * torch.log1p(y.square().sum(-1) / nu), dim=3)

    for nu in (1.0, 5.0):
        t = tails(student(nu), x)
        assert t.tail_rays == t.tail_rays_power == 18 and t.tail_decay_ratio == pytest.approx(1.0, abs=0.02)
    for lp, ratio in ((lambda y: -0.5 * y.square().sum(-1), 4.0), (lambda y: -y.abs().sum(-1), 2.0)):
        t = tails(targets.as_target(lp, dim=3), x)
        assert t.tail_rays_power == 0 and t.tail_decay_ratio == pytest.approx(ratio, rel=0.02)
    funnel = targets.Funnel(10, dtype=torch.float64)
    assert tails(funnel, funnel.sample((4000,))).tail_rays_power == 0  # heavy marginals, not along rays
    cut = targets.as_target(lambda y: torch.where(y[:, 0] < 2, -y.square().sum(-1), -torch.inf), dim=3)
    assert tails(cut, x).tail_rays_power == 0  # -inf beyond a bound: those rays are not read
    e = {"ess": 0.99, "pareto_k": 0.4, "tail_rays": 12, "tail_rays_power": 12, "tail_decay_ratio": 1.0}
    assert "decays like a power of the distance along 12 of 12 rays" in "; ".join(problems(e, 1.0))


def test_target_draws_the_flow_starves_are_a_finding_where_the_eubo_test_cannot_see_them():
    """One target draw with log q = -3e17 (a probe's Cauchy fit) makes the EUBO and its
    standard error equally huge: the EUBO test stays silent, the count of starved draws not."""
    from krflows.diagnostics.report import problems
    from krflows.diagnostics.weights import evidence, forward_evidence

    torch.manual_seed(0)
    log_w = 0.1 * torch.randn(4000, dtype=torch.float64)
    log_v = 0.1 * torch.randn(4000, dtype=torch.float64)
    rev = evidence(log_w, None, 1e-12)
    assert forward_evidence(log_v, 1e-12, rev).forward_starved == 0
    log_v[7] = 3e17
    fwd = forward_evidence(log_v, 1e-12, rev)
    assert fwd.forward_starved == 1 and fwd.jeffreys - 3 * fwd.eubo_se < 10  # the EUBO test's blind spot
    e = {"ess": 0.99, "pareto_k": 0.4, "n_exact": 4000, **dataclasses.asdict(rev), **dataclasses.asdict(fwd)}
    assert "1 of the 4000 target draws get a flow density below e^-50" in "; ".join(problems(e, 1.0))
