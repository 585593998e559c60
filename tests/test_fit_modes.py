"""The mode-covering default of ``fit`` and ``KRFlowModule`` (tempered warm-up, mode search,
Laplace-mixture start, decaying defensive forward-KL term), and that unimodal fits are unharmed."""

import math

import lightning as L
import pytest
import torch

import krflows
from krflows.correct import find_modes
from krflows.exact import gaussian_kr_map
from krflows.lightning import KRFlowModule
from krflows.targets import Banana, Bimodal2D, Gaussian, GaussianMixture
from krflows.train import ModeMixture, defensive_kl, defensive_weight


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def two_mode() -> Bimodal2D:
    return Bimodal2D(separation=8.0, weights=[0.3, 0.7])  # modes (-4, 0), (4, 0), unit sd


def weights(target, flow, n=5000) -> torch.Tensor:
    return torch.bincount(target.assign(flow.sample((n,))), minlength=target.n_components).double() / n


def test_default_fit_keeps_both_modes_with_their_weights():
    """A plain callable, no flags: both modes, weights within 0.1 (the old default: 0.000/1.000)."""
    torch.manual_seed(0)
    target = two_mode()
    flow = krflows.KRFlow(2, layers=2, hidden=(32, 32))
    history = krflows.fit(flow, lambda x: target.log_prob(x), steps=400, batch_size=256, lr=3e-3)
    assert history["modes"] == [2]
    w = weights(target, flow)
    assert (w - target.weights).abs().max() < 0.1, w


def test_plain_path_collapses_where_the_default_does_not():
    """``modes=None`` is the old default: the Gaussian-VI warm-up locks onto one mode."""
    torch.manual_seed(0)
    target = two_mode()
    flow = krflows.KRFlow(2, layers=1, hidden=(16,))
    history = krflows.fit(flow, target, steps=200, batch_size=256, lr=3e-3, warmup=200, modes=None)
    assert history["modes"] == [0]
    assert weights(target, flow).min() < 0.02


def test_a_given_mode_set_skips_the_search():
    torch.manual_seed(0)
    square = [[-4.5, -4.5], [4.5, -4.5], [-4.5, 4.5], [4.5, 4.5]]
    target = GaussianMixture(square, weights=[0.1, 0.2, 0.3, 0.4])
    modes = find_modes(target, box=(-10.0, 10.0), n_starts=64, seed=0)
    mixture = ModeMixture.from_modes(modes, like=torch.zeros(2))
    assert mixture.k == 4
    torch.testing.assert_close(mixture.log_w.exp().sort().values, target.weights.float(), atol=1e-4, rtol=0)
    mean, cov = mixture.moments()
    x = mixture.sample(20000)
    torch.testing.assert_close(x.mean(0), mean, atol=0.15, rtol=0)
    # the defensive term of an exact proposal: equal weights, -mean log q
    flow = krflows.KRFlow(2, layers=1, hidden=(8,))
    assert torch.isfinite(defensive_kl(flow, target, mixture, 64))
    assert defensive_weight(0, 10) == 1.0 and defensive_weight(10, 10) == 0.0
    history = krflows.fit(flow, target, steps=20, batch_size=64, modes=modes, log_every=10)
    assert history["modes"] == [4]
    # several modes: the default learning rate is the mode-covering one (cosine from 1e-3)
    assert history["lr"][0] == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 10 / 20))))


def test_unimodal_targets_take_the_plain_path_and_reach_the_exact_kr_map():
    """One mode found: the ``β = 1`` warm-up follows and the fit still converges pointwise to m + L z."""
    torch.manual_seed(0)
    mean, cov = torch.tensor([1.0, -2.0]), torch.tensor([[4.0, 1.2], [1.2, 1.0]])
    target = Gaussian(mean, cov)
    flow = krflows.KRFlow(2, layers=1, hidden=(16,))
    history = krflows.fit(flow, target, steps=300, batch_size=256, lr=3e-3)
    assert history["modes"] == [0]
    z = torch.randn(2000, 2).clamp(-2, 2)
    with torch.no_grad():
        learned, exact = flow(z), gaussian_kr_map(mean, cov)(z)
    rel = (learned - exact).norm(dim=-1) / (exact - mean).norm(dim=-1)
    assert rel.median() < 0.05, float(rel.median())


def test_one_mode_means_the_old_default_draw_for_draw():
    """The search runs on a forked random stream and the affine stage is reset: a unimodal fit
    is bit for bit the ``modes=None`` fit (only slower by the tempered warm-up and the search)."""
    target = Gaussian(torch.tensor([1.0, -2.0]), torch.tensor([[4.0, 1.2], [1.2, 1.0]]))
    flows = []
    for modes in ("search", None):
        torch.manual_seed(0)
        flows.append(krflows.KRFlow(2, layers=1, hidden=(8,)))
        history = krflows.fit(flows[-1], target, steps=30, batch_size=64, modes=modes, log_every=30)
        assert history["lr"] == [pytest.approx(3e-3 / 20)]  # one mode: 3e-3, cosine-decayed to lr / 20
    for a, b in zip(flows[0].parameters(), flows[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_banana_ess_stays_high_on_the_default_path():
    torch.manual_seed(0)
    banana = Banana()
    flow = krflows.KRFlow(2, layers=2, hidden=(32, 32))
    history = krflows.fit(flow, lambda x: banana.log_prob(x), steps=400, batch_size=256, lr=1e-2)
    assert history["modes"] == [0]
    with torch.no_grad():
        x, log_q = flow.rsample_and_log_prob((5000,))
    assert krflows.diagnostics.ess(banana.log_prob(x) - log_q) > 0.8


@pytest.mark.slow
def test_module_default_covers_the_modes():
    """``KRFlowModule`` (and so ``krflows fit``) has the same default."""
    module = KRFlowModule(target="bimodal2d", target_options={"separation": 8.0, "weights": [0.3, 0.7]},
                          layers=2, hidden=(32, 32), lr=3e-3, seed=0)
    L.Trainer(max_steps=400, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=10.0).fit(module)
    assert module.mixture is not None and module.mixture.k == 2
    w = weights(module.target, module.flow)
    assert (w - module.target.weights).abs().max() < 0.1, w


@pytest.mark.slow
def test_experiment_smoke(tmp_path):
    from conftest import run_smoke

    result = run_smoke("mode_covering_defaults", tmp_path)
    cells = {(c["design"], c["target"]): c for c in result["cells"]}
    used = {k: c["modes_used"] for k, c in cells.items()}
    assert used["default", "two-mode"] == 2 and used["default", "four-mode"] == 4
    assert used["default", "banana"] == 0 and used["old", "two-mode"] == 0
    assert all(0 <= c["ess"] <= 1 for c in result["cells"])
