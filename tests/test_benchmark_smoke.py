"""The peer benchmark script runs (tiny settings), so it never rots."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_training.py"


@pytest.mark.slow
def test_benchmark_quick_mode_writes_a_table(tmp_path):
    pytest.importorskip("zuko")
    out = tmp_path / "results.md"
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-memory", "--out", str(out)],
                   check=True, timeout=600, capture_output=True)
    text = out.read_text()
    assert "krflows" in text and "zuko" in text and "|" in text


@pytest.mark.slow
def test_gpu_check_dry_run_writes_a_report(tmp_path):
    """``benchmarks/gpu_check.sh --dry-run``: every step of the GPU check on the CPU (the CUDA
    tests skip), exit 0, and a report with each step's wall time and the benchmark tables."""
    pytest.importorskip("zuko")
    out = tmp_path / "RESULTS_gpu.md"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=REPO, env=env, timeout=600, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    for step in ("card", "cuda_tests", "fit", "benchmark"):
        assert f"| {step} | " in text and f"[gpu_check] {step}: ok in " in proc.stdout
    assert "skipped" in text and "ESS/N" in text
    assert "| metric | krflows | zuko |" in text and "mlp-floor" in text
