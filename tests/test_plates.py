"""Plated Pyro models: graph-free guide draws, plate detection, the sparse AutoKRFlow."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.predictive import _predictive
from pyro.optim import Adam
from torch.distributions import Transform

from krflows.pyro import AutoKRFlow


@pytest.fixture(autouse=True)
def _clean_param_store():
    torch.set_num_threads(1)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def hierarchical(y, sigma):
    """The non-centred hierarchical normal model (eight schools, ``J`` groups)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("groups", y.shape[-1]):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * eta, sigma), obs=y)


def _data(J, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(J, generator=g) * 2 + 1, 0.5 + torch.rand(J, generator=g)


def _train(model, guide, args, steps, particles=2, lr=1e-2):
    svi = SVI(model, guide, Adam({"lr": lr}), Trace_ELBO(num_particles=particles, vectorize_particles=True))
    return [svi.step(*args) for _ in range(steps)]


def _held_tensor_bytes(obj, seen=None) -> int:
    """Bytes of the non-parameter tensors an object graph of transforms/distributions holds."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (torch.nn.Module, type)):
        return 0  # modules (the guide's parameters) are shared, not per draw
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return 0 if isinstance(obj, torch.nn.Parameter) else obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_held_tensor_bytes(v, seen) for v in obj)
    if isinstance(obj, dict):
        return sum(_held_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (Transform, torch.distributions.Distribution)):
        return sum(_held_tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


@pytest.mark.parametrize("sparse", [None])
def test_predictive_draws_hold_no_graph_and_no_square_matrix(sparse):
    """Predictive keeps every guide trace until it returns (4000 draws: 4000 traces). Each
    draw must hold O(d) memory: no autograd graph and no ``d x d`` matrix of the affine stage."""
    y, sigma = _data(150)
    kwargs = {} if sparse is None else {"sparse": sparse}
    guide = AutoKRFlow(hierarchical, layers=1, hidden=(8,), warmup=5, **kwargs)
    _train(hierarchical, guide, (y, sigma), steps=2)
    d = guide.latent_dim
    out = Predictive(hierarchical, guide=guide, num_samples=30)(y, sigma)
    assert out["eta"].shape == (30, 150)
    assert all(v.grad_fn is None and not v.requires_grad for v in out.values())
    traces = _predictive(guide, {}, 30, return_sites=None, model_args=(y, sigma)).trace
    assert len(traces) == 30
    for trace in traces:
        sites = [site for site in trace.nodes.values() if site["type"] == "sample"]
        held = sum(_held_tensor_bytes(site["fn"]) for site in sites)
        assert held < 20 * d * 8, f"a guide trace holds {held} bytes at d = {d}"
        assert all(site["value"].grad_fn is None for site in sites)
