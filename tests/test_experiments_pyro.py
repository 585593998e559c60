"""The Pyro experiments (``experiments/two_philosophies.py``, ``experiments/hier_logistic.py``) run end to end
on a tiny budget; the hierarchical logistic model against its log joint written by hand."""

import importlib
import math

import pytest
import torch
from conftest import run_smoke

METHODS = {"NUTS", "flow", "flow+SIR", "flow-IMH", "NeuTra-NUTS"}


@pytest.mark.slow
def test_two_philosophies_smoke(tmp_path):
    result = run_smoke("two_philosophies", tmp_path)
    assert result["smoke"] is True
    problems = {p["problem"]: p for p in result["problems"]}
    assert len(problems) == 4
    assert any("non-centred" in k for k in problems) and any(k.endswith(", centred") for k in problems)
    assert any("funnel" in k for k in problems) and any("mixture" in k for k in problems)
    chains = result["config"]["chains"]
    assert chains >= 2
    for name, p in problems.items():
        assert set(p["methods"]) == METHODS, name
        ref = p["reference"]
        assert len(ref["mean"]) == len(ref["sd"]) == len(p["quantities"])
        assert all(s > 0 for s in ref["sd"])
        for method, m in p["methods"].items():
            where = f"{name} / {method}"
            assert m["seconds"] > 0, where
            assert m["grad_evals"] > 0, where
            assert m["chains"] >= 2, where
            # ESS: positive and at most a few times the number of draws (antithetic chains can exceed it)
            assert 0 < m["ess_bulk_min"] <= 3 * m["n_draws"], where
            assert 0 <= m["ess_tail_min"] <= 3 * m["n_draws"], where
            assert m["ess_bulk_per_s"] == pytest.approx(m["ess_bulk_min"] / m["seconds"]), where
            assert float(m["rhat_max"]) > 0.8, where  # "inf" when a chain is constant
            assert len(m["mean"]) == len(p["quantities"]), where
            assert m["bias_mean_z_max"] >= 0 and m["bias_sd_z_max"] >= 0, where
            acc = float(m["acceptance"])
            if method in ("NUTS", "flow-IMH"):
                assert 0.0 <= acc <= 1.0, where
            if method in ("flow-IMH", "flow+SIR"):
                assert m["plain_evals"] > 0, where
            assert 0.0 <= m["key"] <= 1.0 or p["key_name"] == "E[tau]", where
        # every flow method includes the flow's training
        flow = p["methods"]["flow"]
        for method in ("flow+SIR", "flow-IMH", "NeuTra-NUTS"):
            assert p["methods"][method]["seconds"] >= flow["seconds"] * 0.5
            assert p["methods"][method]["grad_evals"] >= flow["grad_evals"]
        assert p["methods"]["NeuTra-NUTS"]["grad_evals"] > flow["grad_evals"]
        report = p["flow_report"]
        assert 0 < report["ess"] <= 1 and isinstance(report["verdict"], str)
        assert not math.isnan(float(report["pareto_k"]))
    schools = result["schools_reference"]
    assert len(schools["draws"]) == result["config"]["ref_keep"]


@pytest.mark.slow
def test_hier_logistic_smoke(tmp_path):
    result = run_smoke("hier_logistic", tmp_path)
    assert result["smoke"] is True
    small, large = result["results"]
    assert small["J"] < large["J"] and small["d"] == 6 + 3 * small["J"] and large["d"] == 6 + 3 * large["J"]
    assert [r["guide"] for r in small["guides"]] == ["krflows-sparse", "krflows-dense", "AutoNormal",
                                                     "AutoMultivariateNormal", "AutoLowRank"]
    assert [r["guide"] for r in large["guides"]] == ["krflows-sparse", "AutoNormal", "AutoLowRank"]
    assert small["nuts"]["chains"] == 2 and 0.8 < small["nuts"]["rhat_max"] < 10
    for res in (small, large):
        nuts = res["nuts"]
        assert len(nuts["ess_globals"]) == 6 and all(v > 0 for v in nuts["ess_globals"])
        assert 0.0 <= nuts["beta_coverage90"] <= 1.0
        for r in res["guides"]:
            where = f"J = {res['J']} / {r['guide']}"
            assert r["seconds"] >= r["first_step_seconds"] > 0, where
            assert len(r["glob_mean_err_sd"]) == len(r["glob_sd_ratio"]) == 6, where
            assert all(math.isfinite(v) for v in r["glob_mean_err_sd"]), where
            assert all(v > 0 for v in r["glob_sd_ratio"]), where
            assert r["beta_med_abs_mean_err_sd"] >= 0 and r["beta_med_abs_sd_ratio_m1"] >= 0, where
            assert 0.0 <= r["beta_coverage90"] <= 1.0, where
            # ELBO = mean log weight <= log Z: finite, and ESS in [1/N, 1]
            assert math.isfinite(r["elbo"]) and r["elbo_se"] > 0, where
            assert 0 < r["ess"] <= 1, where
            assert r["parameters"] > 0, where
            if r["guide"].startswith("krflows"):
                assert r["flow"] == ("SparseKRFlow" if r["guide"] == "krflows-sparse" else "KRFlow"), where
        sparse = res["guides"][0]
        assert sparse["plates"] == [["groups", res["J"], 3]]  # one member plate: eta_j (p = 3)


def test_hier_logistic_model_log_joint(monkeypatch):
    """The experiment's model, vectorized over points, against its log joint written by hand."""
    from conftest import EXPERIMENTS
    from torch.distributions import HalfNormal, Normal

    from krflows.pyro import potential_from_model

    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    hl = importlib.import_module("hier_logistic")
    data = hl.make_data(7, seed=3)
    x, y, mask = data["x"], data["y"], data["mask"]
    assert data["n_obs"] == int(mask.sum()) and 5 * 7 <= data["n_obs"] <= 20 * 7
    assert bool((y[~mask] == 0).all()) and bool((x[~mask] == 0).all())
    potential = potential_from_model(hl.model, x, y, mask)
    assert potential.dim == 6 + 3 * 7
    u = torch.randn(5, potential.dim)
    mu, log_tau, eta = u[:, :3], u[:, 3:6], u[:, 6:].reshape(5, 7, 3)
    tau = log_tau.exp()
    beta = mu[:, None] + tau[:, None] * eta  # (5, J, p)
    logits = torch.einsum("jnp,sjp->sjn", x, beta)
    loglik = (y * torch.nn.functional.logsigmoid(logits) + (1 - y) * torch.nn.functional.logsigmoid(-logits))
    expected = (Normal(0.0, 2.0).log_prob(mu).sum(-1) + HalfNormal(1.0).log_prob(tau).sum(-1)
                + log_tau.sum(-1) + Normal(0.0, 1.0).log_prob(eta).sum((-1, -2))
                + (loglik * mask).sum((-1, -2)))
    assert torch.allclose(potential(u), expected, atol=1e-4, rtol=1e-5)
