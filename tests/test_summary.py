"""krflows.summary, PSIS smoothing, the ArviZ export and the corner plot."""

import json
import math
import sys

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from matplotlib.figure import Figure

import krflows
from krflows.correct import DebiasResult
from krflows.diagnostics import pareto_k, psis_smooth
from krflows.plot import corner, plot_samples
from krflows.pyro import potential_from_model


def model():
    pyro.sample("tau", dist.LogNormal(0.0, 0.5))
    pyro.sample("theta", dist.Normal(torch.tensor([1.0, -1.0]), 1.0).to_event(1))


def weighted_normal(n=20000, shift=1.0, seed=0):
    """Draws of N(0, 1.5^2) weighted towards N(shift, 1): (x, log_w)."""
    g = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    log_w = -0.5 * ((x[:, 0] - shift) ** 2) + 0.5 * (x[:, 0] / 1.5) ** 2 + 7.0  # any offset
    return x, log_w


def test_unweighted_summary_is_plain_moments_and_quantiles_with_ess_n():
    x = torch.randn(3000, 3, dtype=torch.float64)
    s = krflows.summary(x, probs=(0.1, 0.5))
    assert s.names == ["x[0]", "x[1]", "x[2]"] and s.columns == ["mean", "sd", "10%", "50%", "ess"]
    torch.testing.assert_close(s.mean, x.mean(0))
    torch.testing.assert_close(s.sd, x.std(0))
    torch.testing.assert_close(s.quantiles, torch.quantile(x, torch.tensor([0.1, 0.5], dtype=x.dtype), 0).T)
    assert s["x[1]"]["ess"] == 3000 and not s.weighted and s.pareto_k is None
    assert "independent" in s.note


def test_weighted_summary_uses_psis_weights_weighted_quantiles_and_kish_ess():
    x, log_w = weighted_normal()
    s = krflows.summary((x, log_w))
    row = s["x[0]"]
    assert s.weighted and s.pareto_k is not None and s.pareto_k < 0.7
    assert abs(row["mean"] - 1.0) < 0.05 and abs(row["sd"] - 1.0) < 0.05
    assert abs(row["5%"] - (1 - 1.6449)) < 0.08 and abs(row["95%"] - (1 + 1.6449)) < 0.08
    smoothed, _ = psis_smooth(log_w)
    kish = float(torch.softmax(smoothed, 0).square().sum().reciprocal())
    assert math.isclose(row["ess"], kish, rel_tol=1e-9) and 1000 < kish < 20000
    assert "Pareto-smoothed" in s.note and "Kish" in s.note
    raw = krflows.summary(x, log_w, smooth=False)
    assert "raw" in raw.note and abs(raw["x[0]"]["mean"] - row["mean"]) < 0.05


def test_psis_smoothing_replaces_only_the_tail_and_keeps_order():
    g = torch.Generator().manual_seed(1)
    log_w = 2.0 * torch.randn(2000, generator=g, dtype=torch.float64)  # heavy (lognormal) weights
    smoothed, k = psis_smooth(log_w)
    assert k == pareto_k(log_w)
    changed = smoothed != log_w
    m = math.ceil(min(0.2 * 2000, 3 * math.sqrt(2000)))
    assert 0 < int(changed.sum()) <= m
    assert float(smoothed.max()) <= float(log_w.max())
    order = torch.argsort(log_w)
    assert bool((smoothed[order].diff() >= -1e-12).all())  # monotone in the raw weights
    same, k_small = psis_smooth(torch.randn(10, dtype=torch.float64))  # too few for a fit
    assert math.isnan(k_small) and same.shape == (10,)


def test_summary_per_site_of_a_pyro_potential_and_of_a_debias_result():
    potential = potential_from_model(model)
    x = torch.randn(4000, potential.dim, dtype=potential.dtype)
    s = krflows.summary(x, target=potential)
    assert s.names == ["tau", "theta[0]", "theta[1]"] and s.sites == {"tau": (), "theta": (2,)}
    assert s["tau"]["5%"] > 0  # constrained (positive) values, not the unconstrained coordinate
    res = DebiasResult(samples=x, log_weights=torch.zeros(4000, dtype=torch.float64), log_z=0.0,
                       log_z_se=0.0, ess=1.0, pareto_k=0.0, target=potential)
    weighted = krflows.summary(res)
    assert weighted.names == s.names and weighted.weighted
    assert abs(weighted["theta[1]"]["mean"] - s["theta[1]"]["mean"]) < 1e-6  # equal weights
    sites = krflows.summary(potential.unpack(x))  # a mapping {site: draws}
    assert sites.names == s.names


def test_summary_views_are_plain():
    s = krflows.summary(torch.randn(500, 2), names=["a", "b"])
    d = s.to_dict()
    assert list(d) == ["a", "b"] and all(type(v) is float for v in d["a"].values())
    assert json.loads(s.to_json())["rows"]["b"]["ess"] == 500
    text, md = s.to_text(), s.to_markdown()
    assert "mean" in text and "95%" in text and text.splitlines()[1].startswith("a")
    assert md.startswith("| | mean | sd | 5% | 50% | 95% | ess |") and "| b |" in md
    with pytest.raises(KeyError, match="no row 'c'"):
        s["c"]
    with pytest.raises(ValueError, match=r"log_weights must have shape \(500,\)"):
        krflows.summary(torch.randn(500, 2), torch.zeros(499))


def test_to_inference_data_per_site_and_resampled():
    arviz = pytest.importorskip("arviz")
    potential = potential_from_model(model)
    x = torch.randn(300, potential.dim, dtype=potential.dtype)
    idata = krflows.to_inference_data(x, target=potential)
    assert isinstance(idata, arviz.InferenceData)
    assert idata.posterior["tau"].shape == (1, 300) and idata.posterior["theta"].shape == (1, 300, 2)
    assert float(idata.posterior["tau"].min()) > 0
    xw, log_w = weighted_normal(n=2000)
    weighted = krflows.to_inference_data((xw, log_w), names=["mu"], resample=1000,
                                         generator=torch.Generator().manual_seed(0))
    mu = weighted.posterior["mu"].values
    assert mu.shape == (1, 1000) and abs(mu.mean() - 1.0) < 0.15
    assert weighted.posterior.attrs["pareto_k"] < 0.7 and "ess_kish" in weighted.posterior.attrs
    plain = krflows.to_inference_data(torch.randn(50, 3))
    assert plain.posterior["x"].shape == (1, 50, 3)


def test_to_inference_data_without_arviz_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "arviz", None)
    with pytest.raises(ImportError, match=r"pip install 'krflows\[arviz\]'"):
        krflows.to_inference_data(torch.randn(10, 2))


def test_corner_plot_panels():
    target = krflows.targets.Bimodal2D()
    fig = corner(target.sample((500,)), target, names=["a", "b"])
    assert len(fig.axes) == 1 and fig.axes[0].get_xlabel() == "a"
    assert fig.axes[0].collections  # the contours and the scatter
    x, log_w = weighted_normal(n=500)
    fig = corner((torch.cat([x, x, x], 1), log_w), krflows.targets.Gaussian(dim=3))
    assert len(fig.axes) == 9
    assert len(corner(torch.randn(100, 6), None, pairs=3).axes) == 9
    image = plot_samples(torch.randn(100, 2), target)
    assert image.dtype == np.uint8 and image.shape[-1] == 3
    parent = Figure(figsize=(8, 3))
    for sub in parent.subfigures(1, 2):  # side by side (the notebooks do this)
        assert corner(target.sample((200,)), target, fig=sub) is sub and len(sub.axes) == 1
    fig = corner(torch.randn(200, 2), target, limits=(-8.0, (8.0, 3.0)))  # a shared window
    assert fig.axes[0].get_xlim() == (-8.0, 8.0) and fig.axes[0].get_ylim() == (-8.0, 3.0)


def test_weighted_quantiles_keep_the_smallest_draws_weight():
    """A probe: Pyro's weighed_quantile put the smallest draw's CDF at 0, dropping its weight
    (weights 0.7/0.1/0.1/0.1 at 0/1/2/3 gave a median of 1.5), and importance-weighted medians
    came out 0.28 sd too high. Oracles: numpy's Hazen quantiles for equal weights, the exact
    median of the reweighted law, the extreme draws of positive weight."""

    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    lw = torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64).log()
    q = krflows.summary(x, lw, probs=(0.25, 0.5), smooth=False).quantiles
    assert float(q[0, 0]) == 0.0 and float(q[0, 1]) < 0.5  # 70% of the mass sits at 0
    torch.manual_seed(0)
    y = torch.randn(1001, 2, dtype=torch.float64)
    q = krflows.summary(y, torch.zeros(1001, dtype=torch.float64), probs=(0.05, 0.5, 0.95), smooth=False)
    np.testing.assert_allclose(q.quantiles.numpy(), np.quantile(y.numpy(), [0.05, 0.5, 0.95], axis=0,
                                                                method="hazen").T, rtol=0, atol=1e-12)
    errors = []
    for seed in range(100):  # draws of N(0, 1) reweighted to N(-2, 1): median -2
        z = torch.randn(200, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        lw = -0.5 * (z[:, 0] + 2) ** 2 + 0.5 * z[:, 0] ** 2
        errors.append(float(krflows.summary(z, lw, probs=(0.5,), smooth=False).quantiles[0, 0]) + 2)
    assert abs(np.mean(errors)) < 0.1, np.mean(errors)  # Pyro's: +0.28
    lw = torch.zeros(50, dtype=torch.float64)
    lw[:3] = -math.inf
    q = krflows.summary(y[:50, :1], lw, probs=(0.0, 1.0), smooth=False).quantiles
    assert float(q[0, 0]) == float(y[3:50, 0].min()) and float(q[0, 1]) == float(y[3:50, 0].max())
