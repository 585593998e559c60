"""KRFlowModule and its callbacks: fast_dev_run, checkpoints, resumption, TensorBoard, DDP."""

import math
import os
import subprocess
import sys
import textwrap

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import krflows
from krflows.callbacks import DiagnosticsReport, SamplePlots, TrainingMetrics
from krflows.lightning import KRFlowModule
from krflows.objectives import NonDifferentiableTargetError, NonFiniteTargetError, TrainingDivergedError

SMALL = {"layers": 1, "hidden": (8,), "batch_size": 64}
SCALARS = ["train/loss", "train/loss_untempered", "train/elbo", "train/ess", "train/pareto_k", "train/log_z",
           "train/grad_norm", "train/lr", "train/beta", "train/dropped"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny flows train fastest on one thread (and much faster on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trainer(tmp_path=None, **kw) -> L.Trainer:
    kw.setdefault("logger", False)
    checkpoints = any(isinstance(c, ModelCheckpoint) for c in kw.get("callbacks", []))
    kw.setdefault("enable_checkpointing", checkpoints)
    return L.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, **kw)


def params(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.flow.parameters()]


def test_fast_dev_run_with_all_callbacks():
    module = KRFlowModule(target="banana", **SMALL)
    t = trainer(fast_dev_run=True, callbacks=[TrainingMetrics(), SamplePlots(), DiagnosticsReport()])
    t.fit(module)
    assert t.global_step == 1 and module.last_batch is not None
    assert module.flow.dim == 2 and module.hparams.target == "banana"


def test_injected_flow_and_callable_target():
    flow = krflows.KRFlow(3, layers=1, hidden=(8,))
    module = KRFlowModule(flow=flow, target=lambda x: -0.5 * (x**2).sum(-1), batch_size=32,
                          path_gradient=True)
    assert module.flow is flow and module.target.dim == 3
    assert "flow" not in module.hparams and "target" not in module.hparams
    trainer(max_steps=3).fit(module)
    assert all(torch.isfinite(p).all() for p in flow.parameters())


def test_needs_max_steps():
    with pytest.raises(ValueError, match="max_steps"):
        trainer(max_epochs=1).fit(KRFlowModule(target="banana", **SMALL))


def test_checkpoint_reloads_a_config_built_module(tmp_path):
    module = KRFlowModule(target="bimodal2d", target_options={"separation": 6.0, "weights": [0.3, 0.7]},
                          family="bernstein", family_options={"degree": 6}, warmup=2, **SMALL)
    t = trainer(tmp_path, max_steps=4, enable_checkpointing=True)
    t.fit(module)
    path = t.checkpoint_callback.best_model_path
    loaded = KRFlowModule.load_from_checkpoint(path)
    assert loaded.target.separation == 6.0 and loaded.hparams.family == "bernstein"
    assert all(torch.equal(a, b) for a, b in zip(params(module), params(loaded), strict=True))
    assert loaded._warmed_up  # a fine-tuning run from here skips the warm-up


def test_resume_equals_the_uninterrupted_run(tmp_path):
    """Same seed: stop at step 6, resume to 12 == straight to 12 (warm-up, annealing, Adam, cosine)."""
    def make():
        return KRFlowModule(target="bimodal2d", anneal=0.5, warmup=3, seed=3, **SMALL)

    full = make()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=6, save_top_k=-1)
    trainer(max_steps=12, callbacks=[ckpt], log_every_n_steps=1).fit(full)
    resumed = make()
    before = params(resumed)
    t = trainer(max_steps=12)
    t.fit(resumed, ckpt_path=str(tmp_path / "step=6.ckpt"))
    assert t.global_step == 12
    assert not all(torch.equal(a, b) for a, b in zip(before, params(resumed), strict=True))
    for a, b in zip(params(full), params(resumed), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a different seed draws differently
    other = KRFlowModule(target="bimodal2d", anneal=0.5, warmup=3, seed=4, **SMALL)
    trainer(max_steps=12).fit(other)
    assert not all(torch.equal(a, b) for a, b in zip(params(full), params(other), strict=True))


class _Schedules(L.Callback):
    """Records (step, beta, lr) after every step."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append((trainer.global_step, pl_module.beta, trainer.optimizers[0].param_groups[0]["lr"]))


def test_resume_with_more_steps_keeps_the_annealing_and_decays_the_lr(tmp_path):
    """A probe: resuming with a larger max_steps (the README's own example) restarted the
    tempering (beta fell from 1 to 0.48) and cycled the learning rate (CosineAnnealingLR's
    restored period). Now beta stays on the first run's plan and the rate decays from its
    value at the checkpoint to lr / 20 at the new max_steps; a checkpoint past max_steps warns."""
    lr = 1e-2
    first = KRFlowModule(target="bimodal2d", anneal=0.5, warmup=2, seed=3, lr=lr, **SMALL)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=4, save_top_k=-1)
    seen = _Schedules()
    trainer(max_steps=4, callbacks=[ckpt, seen]).fit(first)
    assert seen.rows[-1][1] == 1.0 and seen.rows[-1][2] == pytest.approx(lr / 20)  # annealed, decayed
    resumed = KRFlowModule(target="bimodal2d", anneal=0.5, warmup=2, seed=3, lr=lr, **SMALL)
    more = _Schedules()
    trainer(max_steps=20, callbacks=[more]).fit(resumed, ckpt_path=str(tmp_path / "step=4.ckpt"))
    steps, betas, lrs = zip(*more.rows, strict=True)
    assert steps == tuple(range(5, 21))
    assert all(b == 1.0 for b in betas), betas
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False)), lrs  # no cycling back up
    assert lrs[-1] == pytest.approx(lr / 20) and lrs[0] <= lr / 20 + 1e-12
    with pytest.warns(UserWarning, match="at step 4, at or past max_steps = 3: nothing is trained"):
        trainer(max_steps=3).fit(KRFlowModule(target="bimodal2d", **SMALL),
                                 ckpt_path=str(tmp_path / "step=4.ckpt"))
    # a run stopped halfway and resumed with a longer plan decays from where it was
    half = KRFlowModule(target="bimodal2d", anneal=0.5, warmup=2, seed=3, lr=lr, **SMALL)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "half", filename="{step}", every_n_train_steps=4, save_top_k=-1)
    trainer(max_steps=8, callbacks=[ckpt]).fit(half)
    at4 = half.lr_factor(4)
    longer = KRFlowModule(target="bimodal2d", anneal=0.5, warmup=2, seed=3, lr=lr, **SMALL)
    more = _Schedules()
    trainer(max_steps=16, callbacks=[more]).fit(longer, ckpt_path=str(tmp_path / "half" / "step=4.ckpt"))
    _, betas, lrs = zip(*more.rows, strict=True)
    assert lr * at4 >= lrs[0] > lrs[1] and lrs[-1] == pytest.approx(lr / 20)
    assert betas[0] == pytest.approx(min(1.0, 0.1 + 0.9 * 5 / 4))  # the 8-step plan's annealing


def test_the_report_and_summary_of_a_seeded_run_are_reproducible(tmp_path):
    """A probe: runs with bit-identical weights wrote reports with different numbers and
    verdicts (the report's draws were not seeded)."""
    texts = []
    for name in ("a", "b"):
        module = KRFlowModule(target="bimodal2d", warmup=2, seed=5, **SMALL)
        report = DiagnosticsReport(n_samples=500, dirpath=str(tmp_path / name))
        trainer(max_steps=3, callbacks=[report]).fit(module)
        scalars = {k: v for k, v in report.report.scalars().items() if not k.endswith("seconds")}
        texts.append((scalars, report.report["verdict"], (tmp_path / name / "summary.md").read_text()))
    assert texts[0] == texts[1]


def test_tensorboard_scalars_images_histograms_and_report(tmp_path):
    module = KRFlowModule(target="bimodal2d", warmup=2, **SMALL)
    report = DiagnosticsReport(n_samples=500)
    callbacks = [TrainingMetrics(), SamplePlots(every_n_steps=4, n_samples=200), report]
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    trainer(max_steps=8, logger=logger, log_every_n_steps=2, callbacks=callbacks).fit(module)

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0, "histograms": 0,
                                                             "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for tag in SCALARS:
        values = [e.value for e in events.Scalars(tag)]
        assert values and all(math.isfinite(v) for v in values), (tag, values)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 3, 5, 7]  # Lightning: 0-based
    assert [e.step for e in events.Images("samples")] == [3, 7]  # after steps 4 and 8, on that axis
    assert "log_weights" in tags["histograms"]
    assert any(t.startswith("report") for t in tags["tensors"])  # the markdown report (text plugin)
    assert {"report/elbo", "report/ess", "report/pareto_k", "report/log_z"} <= set(tags["scalars"])
    assert report.report is not None and "mode_weights" in report.report
    assert all(os.path.exists(p) for p in report.paths)


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_plot_samples_is_an_rgb_image(dim):
    target = krflows.targets.Gaussian(dim=dim) if dim != 2 else krflows.targets.Bimodal2D()
    image = krflows.plot.plot_samples(torch.randn(300, dim), target)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3


def test_nan_on_half_the_batch_trains_on_and_logs_dropped(tmp_path):
    def half_nan(x):
        lp = -0.5 * (x**2).sum(-1)
        return torch.where(x[..., 0] > 0, lp, torch.full_like(lp, math.nan))

    with pytest.raises(NonFiniteTargetError, match="NaN at .* of 64 points.*nan='zero'"):
        trainer(max_steps=2).fit(KRFlowModule(flow=krflows.KRFlow(2, layers=1, hidden=(8,)), target=half_nan,
                                              batch_size=64, warmup=0))  # NaN is an error by default
    module = KRFlowModule(flow=krflows.KRFlow(2, layers=1, hidden=(8,)), target=half_nan, batch_size=64,
                          warmup=0, nan="zero")
    report = DiagnosticsReport(n_samples=400, dirpath=str(tmp_path))
    t = trainer(max_steps=6, log_every_n_steps=2, callbacks=[TrainingMetrics(), report])
    t.fit(module)
    assert module.dropped > 0 and float(t.callback_metrics["train/dropped"]) > 0
    assert all(torch.isfinite(p).all() for p in module.flow.parameters())
    # the ELBO of the flow restricted to the support: finite although samples were dropped
    assert math.isfinite(float(t.callback_metrics["train/elbo"]))
    # the summary leaves out the draws where the target's density is zero, and says so
    heading = (tmp_path / "summary.md").read_text().split("|")[0]
    assert "fell where the target's density is zero and are left out" in heading, heading


def test_whole_bad_batch_raises_and_nonfinite_gradients_are_skipped():
    module = KRFlowModule(flow=krflows.KRFlow(2, layers=1, hidden=(8,)), batch_size=32,
                          target=lambda x: torch.full(x.shape[:-1], math.nan), warmup=0, nan="zero")
    with pytest.raises(NonFiniteTargetError, match="NaN or inf at all 32"):
        trainer(max_steps=2).fit(module)

    def nan_gradient(x):  # finite values, NaN gradient (through the branch that is not taken)
        return torch.where(x[..., 0] > 100, torch.sqrt(-x[..., 0] - 1), -0.5 * (x**2).sum(-1))

    module = KRFlowModule(flow=krflows.KRFlow(2, layers=1, hidden=(8,)), target=nan_gradient,
                          batch_size=32, warmup=0)
    before = params(module)
    trainer(max_steps=3).fit(module)
    assert module.skipped == 3
    assert all(torch.equal(a, b) for a, b in zip(before, params(module), strict=True))


def test_target_without_gradient_is_refused():
    module = KRFlowModule(flow=krflows.KRFlow(2, layers=1, hidden=(8,)), batch_size=32,
                          target=lambda x: -0.5 * (x.detach() ** 2).sum(-1), warmup=0)
    with pytest.raises(NonDifferentiableTargetError, match="does not depend on x through autograd"):
        trainer(max_steps=2).fit(module)


def test_divergence_is_blamed_on_the_flow():
    module = KRFlowModule(target="banana", layers=2, hidden=(32, 32), lr=10.0)
    with pytest.raises(TrainingDivergedError, match="training diverged"):
        trainer(max_steps=200, gradient_clip_val=10.0).fit(module)


RANK_DUMP = '''
import torch
from lightning.pytorch.callbacks import Callback


class RankDump(Callback):
    """Saves each rank's first-step log-weights and final parameters."""

    def __init__(self, out: str):
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            torch.save(pl_module.last_batch.log_w, f"{self.out}/draws{trainer.global_rank}.pt")

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.flow.parameters()])
        torch.save(flat, f"{self.out}/params{trainer.global_rank}.pt")
'''


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path):
    """gloo DDP through the CLI: it finishes, the ranks draw different samples, parameters agree."""
    (tmp_path / "rankdump.py").write_text(RANK_DUMP)
    (tmp_path / "ddp.yaml").write_text(textwrap.dedent(f"""\
        trainer:
          callbacks:
            - class_path: rankdump.RankDump
              init_args: {{out: {tmp_path}}}
        """))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "krflows.cli", "fit", "--config", str(tmp_path / "ddp.yaml"),
           "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
           "--trainer.max_steps", "4", "--trainer.enable_progress_bar", "false",
           "--model.layers", "1", "--model.hidden", "[8]", "--model.batch_size", "64", "--model.warmup", "3",
           "--report.n_samples", "500", "--plots.n_samples", "200",
           "--root_dir", str(tmp_path / "runs"), "--name", "ddp"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    draws = [torch.load(tmp_path / f"draws{r}.pt") for r in (0, 1)]
    assert not torch.allclose(draws[0], draws[1])
    final = [torch.load(tmp_path / f"params{r}.pt") for r in (0, 1)]
    torch.testing.assert_close(final[0], final[1])  # warm-up broadcast + DDP keep the ranks in step
    assert (tmp_path / "runs" / "ddp" / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "runs" / "ddp" / "report.md").exists()


def test_compile_option_compiles_the_built_flow(monkeypatch):
    """``KRFlowModule(compile=True)`` (CLI: ``--model.compile true``) compiles the flow it builds
    (torch.compile itself is stubbed here; tests/test_flows.py runs the real compiler)."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: calls.append(fn.__name__) or fn)
    module = KRFlowModule(target="banana", layers=1, hidden=(8,), compile=True)
    assert set(module.flow._compiled) == {"push", "pull"} and calls == ["_push", "_pull"]
    assert module.hparams.compile is True
    assert not KRFlowModule(target="banana", layers=1, hidden=(8,)).flow._compiled


def test_untempered_loss_is_logged_and_images_scale_with_the_run(tmp_path):
    """Under annealing train/loss is the tempered objective; train/loss_untempered = -ELBO of the
    step's batch. SamplePlots' default period is an eighth of the run."""
    module = KRFlowModule(target="banana", anneal=1.0, beta0=0.1, warmup=0, **SMALL)
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    callbacks = [TrainingMetrics(), SamplePlots(n_samples=100)]
    trainer(max_steps=16, logger=logger, log_every_n_steps=1, callbacks=callbacks).fit(module)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    untempered = {e.step: e.value for e in events.Scalars("train/loss_untempered")}
    elbo = {e.step: e.value for e in events.Scalars("train/elbo")}
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert set(untempered) == set(elbo) and all(abs(untempered[s] + elbo[s]) < 1e-4 for s in elbo)
    assert abs(loss[0] - untempered[0]) > 1e-3  # beta < 1 at the start: the two differ
    assert [e.step for e in events.Images("samples")] == [1, 3, 5, 7, 9, 11, 13, 15]  # every 2 of 16
    assert SamplePlots.period(None, 2000) == 250 and SamplePlots.period(None, 3) == 1
    assert SamplePlots.period(0, 2000) == 0 and SamplePlots.period(100, 2000) == 100
