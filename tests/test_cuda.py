"""krflows on a CUDA device: every family, compile, fit, Lightning on a GPU, save/load to the CPU.

All tests are marked ``cuda`` and skipped without a CUDA device; ``pytest -m cuda`` runs only
them (``benchmarks/gpu_check.sh`` does). The oracle is the CPU: the same weights and the same
reference points give the same samples and densities on the CPU, up to the dtype's rounding.

``KRFLOWS_TEST_DEVICE=cpu pytest -m cuda tests/test_cuda.py`` rehearses them on the CPU (the
device comparisons are then trivially equal, everything else is checked as on a GPU).
"""

import copy
import math
import os

import lightning as L
import pytest
import torch
from conftest import FAMILY_NAMES, make_flow

import krflows
from krflows.callbacks import DiagnosticsReport, TrainingMetrics
from krflows.lightning import KRFlowModule

DEVICE = torch.device(os.environ.get("KRFLOWS_TEST_DEVICE", "cuda"))

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# (atol of the device against the CPU, atol of log_prob(x) against the sampling pass's log q)
TOLERANCES = {torch.float64: (1e-8, 1e-6), torch.float32: (1e-4, 5e-3)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_flow_on_device_matches_the_cpu(family, dtype):
    cpu = make_flow(family, 3).to(dtype)
    flow = copy.deepcopy(cpu).to(DEVICE)
    assert flow.device.type == DEVICE.type and flow.dtype == dtype
    same, round_trip = TOLERANCES[dtype]
    z = torch.randn(256, 3, dtype=dtype)
    with torch.no_grad():
        x = flow(z.to(DEVICE))
        assert x.device.type == DEVICE.type and x.dtype == dtype
        torch.testing.assert_close(x.cpu(), cpu(z), atol=same, rtol=same)
        x, log_q = flow.rsample_and_log_prob((256,))
        assert x.device.type == DEVICE.type and torch.isfinite(log_q).all()
        torch.testing.assert_close(flow.log_prob(x), log_q, atol=round_trip, rtol=0)
        torch.testing.assert_close(flow.log_prob(x).cpu(), cpu.log_prob(x.cpu()), atol=round_trip, rtol=0)
        assert flow.sample((5,)).device.type == DEVICE.type


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_large_batch_training_pass_on_device_matches_the_cpu(dtype):
    """A batch of 2051 points through the training pass, gradients included: the CPU runs the
    block-product Function (forced at this size) and the C spline and clamp kernels, the device
    one dense product per layer and the Triton kernels (the torch operations where Triton is
    missing), so this compares two implementations, not one with itself."""
    cpu = make_flow("spline", 5, layers=2, hidden=(32, 32)).to(dtype)
    for m in cpu.modules():
        if isinstance(m, krflows.nn.MaskedLinear):
            m.block_rows = 1
    flow = copy.deepcopy(cpu).to(DEVICE)
    rows = 2 * krflows.nn.MaskedLinear.block_rows + 3
    z = torch.randn(rows, 5, dtype=dtype) * 2  # some points beyond the spline's box (tails)
    same = TOLERANCES[dtype][0] * (1 if dtype == torch.float64 else 10)
    results = []
    for f, zz in ((cpu, z), (flow, z.to(DEVICE))):
        x, log_q, _ = f.push(zz)
        loss = (log_q + 0.5 * x.square().sum(-1)).mean()
        results.append((x, log_q, torch.autograd.grad(loss, list(f.parameters()))))
    (x0, ld0, g0), (x1, ld1, g1) = results
    assert x1.device.type == DEVICE.type
    torch.testing.assert_close(x1.cpu(), x0, atol=same, rtol=same)
    torch.testing.assert_close(ld1.cpu(), ld0, atol=same, rtol=same)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=same, rtol=same * 10)


def test_the_device_runs_the_triton_kernels():
    """On a CUDA device with Triton (torch's CUDA wheels bring it) the spline runs the Triton
    kernels, and they agree with the CPU's C kernels over many programs' worth of points."""
    if DEVICE.type != "cuda":
        pytest.skip("the Triton kernels are for CUDA devices")
    pytest.importorskip("triton")
    from krflows.transforms import _native, _spline_triton
    from krflows.transforms.monotone import Spline

    assert _native.gpu_status() == "triton kernels"
    assert _native.kernel(torch.zeros(1, device=DEVICE)) is _spline_triton
    fam = Spline()
    g = torch.Generator().manual_seed(0)
    pt = torch.randn(4, fam.n_params, 5000, generator=g, dtype=torch.float64) * 2
    zt = torch.randn(4, 5000, generator=g, dtype=torch.float64) * 4
    gX, gL = (torch.randn(4, 5000, generator=g, dtype=torch.float64) for _ in range(2))
    lib = _native.kernel(zt)
    if lib is None:
        pytest.skip(f"no C kernel to compare with: {_native.status()}")
    bias = torch.randn(4, fam.n_params, generator=g, dtype=torch.float64)
    on = [t.to(DEVICE) for t in (zt, pt, gX, gL)]
    pairs = []
    for fold in ((None, 0.0), (bias, 4.0)):  # and a conditioner's bias and clamp folded in (forward_raw)
        fold_on = (None if fold[0] is None else fold[0].to(DEVICE), fold[1])
        pairs += [(_native.forward(_spline_triton, *on[:2], fam, name, *fold_on),
                   _native.forward(lib, zt, pt, fam, name, *fold)) for name in ("forward", "inverse")]
        pairs.append((_native.backward(_spline_triton, *on, fam, *fold_on),
                      _native.backward(lib, zt, pt, gX, gL, fam, *fold)))
    for got, want in pairs:
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.cpu(), b, atol=1e-9, rtol=1e-9)


def _draw(flow, seed: int):
    torch.manual_seed(seed)
    x, log_q = flow.rsample_and_log_prob((128,))
    grads = torch.autograd.grad(log_q.mean() + x.square().mean(), list(flow.parameters()))
    return x.detach(), log_q.detach(), grads


@pytest.mark.slow
def test_compiled_flow_on_device_matches_eager():
    """``flow.compile()`` on the device: same samples, densities and gradients as eager there."""
    eager = make_flow("spline", 3).to(DEVICE)
    compiled = copy.deepcopy(eager).compile()
    (x1, lq1, g1), (x2, lq2, g2) = _draw(eager, 0), _draw(compiled, 0)
    assert x2.device.type == DEVICE.type
    torch.testing.assert_close(x2, x1, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lq2, lq1, atol=1e-9, rtol=1e-9)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(b, a, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(compiled.log_prob(x1), lq1, atol=1e-6, rtol=0)


def test_fit_on_device_finds_a_gaussian():
    """``krflows.fit`` with its defaults on the device (mode search included); the oracle is the
    Gaussian target's mean and covariance."""
    mean = torch.tensor([1.0, -2.0])
    cov = torch.tensor([[1.0, 0.6], [0.6, 2.0]])
    target = krflows.targets.Gaussian(mean, cov, device=DEVICE)
    torch.manual_seed(0)
    flow = krflows.KRFlow(2, layers=1, hidden=(16,)).to(DEVICE)
    history = krflows.fit(flow, target, steps=100, batch_size=256)
    assert all(map(torch.isfinite, map(torch.tensor, history["loss"])))
    with torch.no_grad():
        x = flow.sample((20000,))
    assert x.device.type == DEVICE.type
    torch.testing.assert_close(x.mean(0).cpu(), mean, atol=0.08, rtol=0)
    torch.testing.assert_close(torch.cov(x.T).cpu(), cov, atol=0.15, rtol=0)


class _Where(L.Callback):
    """Records where the flow's parameters live while Lightning trains it."""

    def __init__(self):
        self.devices = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.devices |= {p.device.type for p in pl_module.flow.parameters()}


def test_lightning_trains_on_the_gpu(tmp_path):
    """With the CLI's callbacks: its TensorBoard metrics (Pareto k of each logged batch) and the
    closing bias report run on the device's tensors (a GPU `krflows fit` once crashed there)."""
    module = KRFlowModule(target="banana", layers=1, hidden=(8,), batch_size=64)
    before = [p.detach().clone() for p in module.flow.parameters()]
    where = _Where()
    report = DiagnosticsReport(n_samples=2000, dirpath=str(tmp_path))
    trainer = L.Trainer(accelerator="gpu" if DEVICE.type == "cuda" else "cpu", devices=1, max_steps=3,
                        logger=L.pytorch.loggers.CSVLogger(tmp_path), log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[where, TrainingMetrics(), report])
    trainer.fit(module)
    assert trainer.global_step == 3 and where.devices == {DEVICE.type}
    assert math.isfinite(trainer.logged_metrics["train/pareto_k"])
    assert report.report is not None and 0 < report.report["ess"] <= 1
    after = [p.detach().cpu() for p in module.flow.parameters()]
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True)), "nothing was trained"


def test_importance_diagnostics_on_device_match_the_cpu():
    """Pareto k, PSIS, the weighted summary and the bias report take device tensors; the
    oracle is the same weights on the CPU (and the target's known mode weights)."""
    torch.manual_seed(0)
    log_w = torch.distributions.StudentT(2.0).sample((4000,)).abs().log().double() * 3
    smoothed, k = krflows.diagnostics.psis_smooth(log_w.to(DEVICE))
    smoothed_cpu, k_cpu = krflows.diagnostics.psis_smooth(log_w)
    assert smoothed.device.type == DEVICE.type and k == pytest.approx(k_cpu, abs=1e-12)
    torch.testing.assert_close(smoothed.cpu(), smoothed_cpu)
    assert krflows.diagnostics.pareto_k(log_w.to(DEVICE)) == pytest.approx(k_cpu, abs=1e-12)
    x = torch.randn(4000, 2, dtype=torch.float64)
    on_device = krflows.diagnostics.summary(x.to(DEVICE), log_w.to(DEVICE))
    torch.testing.assert_close(on_device.mean.cpu(), krflows.diagnostics.summary(x, log_w).mean)

    target = krflows.targets.Bimodal2D(separation=8, weights=(0.3, 0.7)).to(device=DEVICE)
    torch.manual_seed(0)
    flow = krflows.KRFlow(2, layers=1, hidden=(16,)).to(DEVICE)
    krflows.fit(flow, target, steps=300, batch_size=256)
    report = krflows.diagnose(flow, target, n=4000, seed=0)
    assert report["n_modes_found"] == 2 and report["n_missed_modes"] == 0
    torch.testing.assert_close(torch.tensor(report["mode_weights"]), torch.tensor([0.3, 0.7]),
                               atol=0.08, rtol=0)


def test_save_on_device_load_on_cpu(tmp_path):
    flow = make_flow("spline", 3).to(DEVICE)
    path = tmp_path / "flow.pt"
    krflows.save(flow, path)
    on_cpu = krflows.load(path, map_location="cpu")
    assert on_cpu.device.type == "cpu" and on_cpu.dtype == flow.dtype
    back = krflows.load(path)
    assert back.device.type == DEVICE.type
    with torch.no_grad():
        x = flow.sample((64,))
        torch.testing.assert_close(on_cpu.log_prob(x.cpu()), flow.log_prob(x).cpu(), atol=1e-8, rtol=0)
        torch.testing.assert_close(back.log_prob(x), flow.log_prob(x), atol=0, rtol=0)
