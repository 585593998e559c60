"""The peer benchmark script runs (tiny settings), so it never rots."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "bench_training.py"


@pytest.mark.slow
def test_benchmark_quick_mode_writes_a_table(tmp_path):
    pytest.importorskip("zuko")
    out = tmp_path / "results.md"
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-memory", "--out", str(out)],
                   check=True, timeout=600, capture_output=True)
    text = out.read_text()
    assert "krflows" in text and "zuko" in text and "|" in text
