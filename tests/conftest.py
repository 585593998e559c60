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
    flow = krflows.KRFlow(dim, transform=family, layers=kw.pop("layers", 2),
                          hidden=kw.pop("hidden", (16, 16)), **kw)
    return randomized(flow.double(), std=std, seed=seed)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
