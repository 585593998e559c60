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
def test_benchmark_ab_libraries_have_their_ratio_columns(tmp_path):
    """The A/B libraries (krflows without one optimization, named in --libs) build and get a ratio
    column against krflows; B = 16384 is above the chunk size, so ``krflows-whole`` differs."""
    out = tmp_path / "results.md"
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-memory", "--only", "throughput",
                    "--libs", "krflows,krflows-unfolded,krflows-whole", "--batches", "16384",
                    "--threads", "1", "--out", str(out)], check=True, timeout=600, capture_output=True)
    text = out.read_text()
    assert "| metric | krflows | krflows-unfolded | krflows-whole | krflows/krflows-unfolded | " \
           "krflows/krflows-whole |" in text
    assert "| sample + log q, B=16384, samples/s |" in text and "| log_prob at fresh x, B=16384" in text


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
    for step in ("card", "cuda_tests", "fit", "warm_compiled", "benchmark", "benchmark_compiled", "profile"):
        assert f"| {step} | " in text and f"[gpu_check] {step}: ok in " in proc.stdout
    assert "skipped" in text and "ESS/N" in text
    assert "| metric | krflows | zuko |" in text and "mlp-floor" in text
    assert "| metric | krflows-compile | zuko-compile |" in text and "dynamic=True" in text
    assert "| mlp-floor-compile ms |" in text  # the compiled run's floor is compiled too
    assert "| 64 | krflows-compile |" in text  # the profile's row


@pytest.mark.slow
def test_time_to_quality_smoke_writes_a_table_and_a_plot(tmp_path):
    """``bench_time_to_quality.py --smoke``: every library on every target for a second each;
    the table has a cell per (target, library), none of them an error, and the plot is written."""
    pytest.importorskip("zuko")
    pytest.importorskip("nflows")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_time_to_quality.py"), "--smoke",
                           "--out", str(tmp_path)], timeout=600, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = (tmp_path / "RESULTS_ttq.md").read_text()
    assert "SMOKE" in text and "| target | krflows | zuko | nflows | pyro |" in text
    rows = [line for line in text.splitlines() if line.startswith(("| banana |", "| funnel-10 |",
                                                                   "| eight-schools |"))]
    assert len(rows) == 3 + 3 * 4, rows  # the summary table, then one detail row per run
    assert not any("error" in row for row in rows), rows
    assert all(("not reached" in c or " s** (" in c) for row in rows[:3] for c in row.split(" | ")[1:]), rows
    png = tmp_path / "time_to_quality.png"
    assert png.is_file() and 0 < png.stat().st_size < 300_000


@pytest.mark.slow
def test_profile_step_prints_a_row_per_library():
    """``profile_step.py`` on the CPU (no kernels to count there): one row per library."""
    pytest.importorskip("zuko")
    script = REPO / "benchmarks" / "profile_step.py"
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "32"],
                          check=True, timeout=300, capture_output=True, text=True)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 32 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["krflows", "zuko", "mlp-floor"]
    assert all(float(row.split("|")[3]) > 0 for row in rows)  # wall ms/step
