import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import krflows


def randomized(flow: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Gives every parameter random values, so that no map is the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return flow


FAMILY_NAMES = ["affine", "spline", "bernstein", "integrated"]


def make_flow(family: str, dim: int = 3, std: float = 0.3, seed: int = 0, **kw) -> krflows.KRFlow:
    torch.manual_seed(seed)
    flow = krflows.KRFlow(dim, family=family, layers=kw.pop("layers", 2),
                          hidden=kw.pop("hidden", (16, 16)), **kw)
    return randomized(flow.double(), std=std, seed=seed)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def run_smoke(name: str, out: Path) -> dict:
    """Runs ``experiments/<name>.py --smoke --out out``; checks its three files; returns the JSON."""
    script = EXPERIMENTS / f"{name}.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 0, \
        f"{script.name} --smoke failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    for suffix in (".md", ".png", ".json"):
        path = out / f"{name}{suffix}"
        assert path.is_file() and path.stat().st_size > 0, f"{path.name} was not written"
    assert (out / f"{name}.png").stat().st_size < 300_000, "the figure should stay small"
    assert "SMOKE" in (out / f"{name}.md").read_text()
    return json.loads((out / f"{name}.json").read_text())
