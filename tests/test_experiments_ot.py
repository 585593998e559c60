"""The optimal-transport experiment scripts run end to end on a tiny budget (``--smoke``)."""

import pytest
from conftest import run_smoke


@pytest.mark.slow
def test_ot_kr_vs_brenier_smoke(tmp_path):
    result = run_smoke("ot_kr_vs_brenier", tmp_path)
    rows, w2sq = result["rows"], result["w2_squared"]
    assert rows["brenier"]["exact_cost"] == pytest.approx(w2sq, abs=1e-9), "Brenier attains W2^2"
    assert rows["kr"]["exact_cost"] > w2sq + 0.5, "the KR map costs more"
    for key in ("kr", "brenier"):  # Monte Carlo agrees with the closed form within 5 standard errors
        assert abs(rows[key]["mc_cost"] - rows[key]["exact_cost"]) < 5 * rows[key]["mc_se"]
    kr_jac, br_jac = rows["kr"]["jacobian"], rows["brenier"]["jacobian"]
    assert kr_jac[0][1] == 0.0 and rows["flow"]["jacobian"][0][1] == 0.0, "triangular"
    assert br_jac[0][1] == pytest.approx(br_jac[1][0]), "symmetric"


@pytest.mark.slow
def test_ot_geodesic_smoke(tmp_path):
    result = run_smoke("ot_geodesic", tmp_path)
    gauss = result["gaussian"]
    brenier = [r for r in gauss["rows"] if r["map"] == "brenier"]
    kr = [r for r in gauss["rows"] if r["map"] == "kr"]
    assert max(abs(r["defect"]) for r in brenier) < 1e-9, "the Brenier path is the W2 geodesic"
    assert max(abs(r["defect"]) for r in kr) > 1e-3, "the KR path is not"
    assert gauss["path_length"]["brenier"] == pytest.approx(gauss["w2"], rel=1e-9)
    assert gauss["path_length"]["kr"] > gauss["w2"] * (1 + 1e-4)
    for f in result["flows"]:
        for r in f["rows"]:  # the interpolated densities are normalized (up to the box and the grid)
            assert 0.9 < r["grid_mass"] < 1.05, r
            assert r["roundtrip_max"] < 1e-4


@pytest.mark.slow
def test_ot_sinkhorn_eps_smoke(tmp_path):
    result = run_smoke("ot_sinkhorn_eps", tmp_path)
    for res in result["results"]:
        rows = sorted(res["rows"], key=lambda r: r["eps_rel"])
        collapse = [r["collapse"] for r in rows]
        assert collapse[-1] < 0.1 < 0.8 < collapse[0], "the barycentric map collapses to the mean"
        support = [r["row_support_mean"] for r in rows]
        assert support[0] < support[-1], "the plan blurs as eps grows"
        assert all(r["sinkhorn_divergence"] > -1e-6 for r in rows)
        if res["target"] == "gaussian":
            assert rows[0]["map_rmse"] < rows[-1]["map_rmse"]
        else:  # a medium eps splits the middle point's row between both modes; emd does not
            assert max(min(r["middle_left"], r["middle_right"]) for r in rows) > 0.3
            assert res["emd_middle_left"] in (0.0, 1.0)


@pytest.mark.slow
def test_ot_langevin_smoke(tmp_path):
    result = run_smoke("ot_langevin", tmp_path)
    for r in result["runs"]:
        if r["method"].startswith("MALA"):
            assert 0 < r["acceptance"] < 1
        elif r["method"].startswith("ULA"):
            assert r["acceptance"] == 1.0
        curve = r["curve"]
        assert all(c["divergence"] > -1e-4 for c in curve)
        assert curve[-1]["grad_evals"] > curve[0]["grad_evals"]
    assert all(floor >= 0 for floor in result["floors"].values())
    for r in result["runs"]:
        if "h=" not in r["method"]:
            continue
        if r["target"] == "banana":  # the particles moved towards the target from their broad start
            assert r["curve"][-1]["divergence"] < r["curve"][0]["divergence"]
        else:  # but barely between the modes: the left-mode weight is still far from the true 0.25
            assert r["curve"][-1]["w0"] > 0.35
    for b in result["gaussian_bias"]:  # ULA's biased stationary covariance is the closed form's
        if b["method"] == "MALA":
            assert 0 < b["acceptance"] < 1
        elif b["h"] == max(x["h"] for x in result["gaussian_bias"]):
            assert b["err_vs_ula_closed_form"] < b["err_vs_sigma"]
