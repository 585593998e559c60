"""The plated-model benchmark runs in its smoke mode (seconds), so it never rots."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "bench_plates.py"


@pytest.mark.slow
def test_bench_plates_smoke(tmp_path):
    out = tmp_path / "plates.md"
    args = [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)]
    variants = {"krflows-sparse", "krflows-dense", "zuko-NSF", "AutoIAFNormal"}
    if importlib.util.find_spec("zuko") is None:  # the [bench] extra: without it, the rest still runs
        variants.discard("zuko-NSF")
        args += ["--variants", ",".join(sorted(variants))]
    proc = subprocess.run(args, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    assert "SMOKE" in text and "krflows-sparse" in text and "AutoMultivariateNormal" in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert {r["guide"] for r in data["results"]} >= {"krflows-sparse", "krflows-dense", "AutoNormal"}
    assert all(r["seconds"] >= 0 for r in data["results"]) and data["scaling"]
    rows = data["scaling"]
    assert {r["guide"] for r in rows} == variants
    measured = [r for r in rows if "skipped" not in r]
    assert measured and all(r["step_ms"] > 0 and r["log_prob_ms"] > 0 for r in measured)
    skipped = [r for r in rows if "skipped" in r]  # the smoke run's tiny cap: the largest size is estimated
    assert skipped and all(r["d"] == 40 and "> cap" in r["skipped"] for r in skipped)
    assert "skipped: time: step ~" in text


def test_oracle_agrees_with_importance_sampling_from_the_prior():
    """The grid oracle against an independent estimate: prior draws of (μ, τ) weighted by the
    marginal likelihood (η integrated out), thetas' conditional moments averaged with the weights."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench_plates", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    y, sigma = bench.make_data(8)
    truth = bench.oracle(y, sigma)
    g = torch.Generator().manual_seed(0)
    n = 400_000
    y, sigma = y.double(), sigma.double()
    mu = torch.randn(n, generator=g, dtype=torch.float64) * 5
    tau = 5 * torch.tan(torch.rand(n, generator=g, dtype=torch.float64) * torch.pi / 2)
    var = sigma**2 + tau[:, None] ** 2
    log_w = (-0.5 * ((y - mu[:, None]) ** 2 / var + var.log())).sum(-1)
    w = torch.softmax(log_w, 0)
    for name, v in (("mu", mu), ("tau", tau)):
        m, s = truth[name]
        assert abs(float((w * v).sum()) - m) < 0.05 * s, name
        assert abs(float((w * (v - m) ** 2).sum()).__pow__(0.5) / s - 1) < 0.05, name
    t2 = tau[:, None] ** 2
    v = 1 / (1 / sigma**2 + 1 / t2)
    m = v * (y / sigma**2 + mu[:, None] / t2)
    mean = (w[:, None] * m).sum(0)
    torch.testing.assert_close(mean, truth["theta"][0], atol=0.05 * float(truth["theta"][1].min()), rtol=0)
