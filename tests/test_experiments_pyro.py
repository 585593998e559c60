"""The Pyro experiment (``experiments/two_philosophies.py``) runs end to end on a tiny budget."""

import math

import pytest
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
