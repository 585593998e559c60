r"""Lightning callbacks for :class:`~krflows.lightning.KRFlowModule` runs.

* :class:`TrainingMetrics`: scalars of each logged step's reverse-KL batch,
  ``train/elbo``, ``train/ess`` (ESS/N), ``train/pareto_k``, ``train/log_z`` (and its
  s.e.), ``train/grad_norm`` (before clipping), ``train/lr``, ``train/beta``,
  ``train/dropped`` (``train/loss`` and ``train/loss_untempered`` are logged by the module).
* :class:`SamplePlots`: every ``every_n_steps`` (default: an eighth of the run) a TensorBoard
  image ``samples`` (:func:`krflows.plot.corner`: 2-D: flow samples over the target's
  log-density contours; otherwise a pair plot of the first coordinates) and a histogram
  ``log_weights``.
* :class:`DiagnosticsReport`: when training ends, the bias report (:func:`krflows.diagnose`,
  under the module's NaN policy) as TensorBoard text and ``report/*`` scalars (the keys of
  :meth:`krflows.diagnostics.Report.scalars`), and as ``report.md`` / ``report.json`` in the
  run directory, with ``summary.md`` (:func:`krflows.summary` of the flow's draws, per site for a
  Pyro model's potential, whose draws also go to ``samples.pt``).
* :class:`RunCheckpoint`: a ``ModelCheckpoint`` that also writes ``last.ckpt`` at the end
  and where SIGTERM or SIGINT stops the run.

The diagnostics themselves are the pure functions of :mod:`krflows.diagnostics`; the figures
are :mod:`krflows.plot`.
"""

from __future__ import annotations

import os
import signal
import threading

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from krflows.diagnostics import diagnose, ess, log_z_estimate, pareto_k, summary
from krflows.flows import eagerly
from krflows.importance import evaluate_target, log_weights
from krflows.plot import plot_samples

__all__ = ["TrainingMetrics", "SamplePlots", "DiagnosticsReport", "RunCheckpoint"]


def _logging_step(trainer: L.Trainer, ahead: int = 0) -> bool:
    """Whether the trainer writes the logs of this step (``ahead=1`` before the optimizer step)."""
    n = trainer.log_every_n_steps
    return n > 0 and (trainer.global_step + ahead) % n == 0


def _step(trainer: L.Trainer) -> int:
    """The x-axis value of the step just taken, as Lightning stamps its scalars (0-based)."""
    return max(trainer.global_step - 1, 0)


def _tensorboard(trainer: L.Trainer):
    """The ``SummaryWriter`` of the trainer's TensorBoard logger, or ``None``."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


class TrainingMetrics(Callback):
    """Logs the diagnostics of the last reverse-KL batch at the trainer's logging steps.

    ``elbo``, ``ess``, ``log_z`` and ``pareto_k`` are of the untempered target on the
    step's batch (on rank 0 under DDP), samples where the target's density is zero counted with
    weight 0 (``elbo``: of the flow restricted to the target's support,
    :func:`~krflows.objectives.support_elbo`); ``dropped`` counts the non-finite target values
    since the start of the run; ``grad_norm`` is the total norm before clipping.
    """

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not _logging_step(trainer, ahead=1):
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last = getattr(pl_module, "last_batch", None)
        if last is None or not _logging_step(trainer):
            return
        log_w = last.log_w
        log_z, log_z_se = log_z_estimate(log_w)
        metrics = {
            "train/elbo": last.elbo, "train/log_z": log_z, "train/log_z_se": log_z_se,
            "train/pareto_k": pareto_k(log_w), "train/lr": trainer.optimizers[0].param_groups[0]["lr"],
            "train/beta": float(pl_module.beta), "train/dropped": float(pl_module.dropped),
        }
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=last.n)
        pl_module.log("train/ess", ess(log_w), on_step=True, on_epoch=False, prog_bar=True,
                      batch_size=last.n)


class SamplePlots(Callback):
    """Every ``every_n_steps`` steps and at the end: the image ``samples`` and the histogram
    ``log_weights`` of fresh flow samples, in the trainer's TensorBoard logger (rank 0).

    Arguments:
        every_n_steps: plotting period in optimizer steps (0: only at the end; ``None``, the
            default: ``max(1, max_steps // 8)``, eight images whatever the run length).
        n_samples: flow samples per plot.
        pairs: the pair plot shows the first this many coordinates (``dim > 2``).
    """

    def __init__(self, every_n_steps: int | None = None, n_samples: int = 2000, pairs: int = 4):
        self.every_n_steps, self.n_samples, self.pairs = every_n_steps, n_samples, pairs
        self._last_step = -1

    @staticmethod
    def period(every_n_steps: int | None, max_steps: int | None) -> int:
        """The plotting period: ``every_n_steps``, or an eighth of ``max_steps`` when it is ``None``."""
        if every_n_steps is not None:
            return every_n_steps
        return max(1, max_steps // 8) if max_steps is not None and max_steps > 0 else 500

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.period(self.every_n_steps, trainer.max_steps)
        if every > 0 and trainer.global_step % every == 0:
            self._plot(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if _step(trainer) != self._last_step:
            self._plot(trainer, pl_module)

    def _plot(self, trainer, pl_module) -> None:
        writer = _tensorboard(trainer)
        if writer is None or not trainer.is_global_zero:
            return
        self._last_step = step = _step(trainer)
        with torch.no_grad(), eagerly(pl_module.flow):
            x, log_q = pl_module.flow.rsample_and_log_prob((self.n_samples,))
            weights = log_weights(pl_module.target, x, log_q, pl_module.hparams.nan)
        writer.add_image("samples", plot_samples(x, pl_module.target, self.pairs), step, dataformats="HWC")
        log_w = weights.log_w[weights.valid & weights.finite]
        if log_w.numel():
            writer.add_histogram("log_weights", log_w.float().cpu(), step)


class DiagnosticsReport(Callback):
    """When training ends, reports the flow's bias (rank 0).

    Logs the report's markdown as TensorBoard text ``report`` and its scalars as
    ``report/<key>`` to every logger, and writes ``report.md``, ``report.json`` and
    ``summary.md`` (:func:`krflows.summary`: mean, sd, quantiles of ``n_samples`` flow draws).
    When the target has an ``unpack`` (a Pyro model's :class:`~krflows.pyro.ModelPotential`),
    the summary is per site and it also writes ``samples.pt``: ``{site: (n_samples, *shape)}``,
    the draws mapped to the model's constrained sites (``torch.load(path)``).

    Arguments:
        n_samples: flow samples of the report.
        dirpath: where the files go (default: the trainer's ``log_dir``; ``None`` there: none).

    Attributes:
        report: the last report (a mapping), ``None`` before the end of training.
        paths: the files written.
    """

    def __init__(self, n_samples: int = 20000, dirpath: str | None = None):
        self.n_samples, self.dirpath = n_samples, dirpath
        self.report = None
        self.paths: list[str] = []

    def on_train_end(self, trainer, pl_module) -> None:
        dirpath = self.dirpath or trainer.log_dir  # trainer.log_dir is a collective under DDP
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        # seeded by the run's seed (a probe: two runs with bit-identical weights wrote reports with
        # different numbers and verdicts); diagnose restores the global random state afterwards
        seed = getattr(pl_module.hparams, "seed", None)
        self.report = report = diagnose(pl_module.flow, pl_module.target, n=self.n_samples,
                                        nan=pl_module.hparams.nan, seed=seed)
        step = _step(trainer)
        scalars = {f"report/{k}": float(v) for k, v in report.scalars().items()}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        writer = _tensorboard(trainer)
        if writer is not None:
            writer.add_text("report", report.to_markdown(), step)
        if dirpath:
            os.makedirs(dirpath, exist_ok=True)
            self.paths = [os.path.join(dirpath, "report.md"), os.path.join(dirpath, "report.json")]
            for path, text in zip(self.paths, (report.to_markdown(), report.to_json(indent=2)), strict=True):
                with open(path, "w") as f:
                    f.write(text.rstrip("\n") + "\n")
            self.paths += _write_sites(pl_module, self.n_samples, dirpath)


def _write_sites(pl_module, n: int, dirpath: str) -> list[str]:
    """``summary.md`` of ``n`` flow draws (:func:`krflows.summary`; per site for a Pyro
    potential, whose draws also go to ``samples.pt``, ``{site: (n, *shape)}``). Draws where the
    target's density is zero (``log p = -inf``, or NaN under ``nan="zero"``) are left out of
    both, and the heading says how many: they are no posterior draws (a flow onto ``R^d`` puts
    some mass outside a bounded support; a probe's run summarized 61% of such draws as the
    posterior)."""
    seed = getattr(pl_module.hparams, "seed", None)
    devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    with torch.no_grad(), eagerly(pl_module.flow), torch.random.fork_rng(devices=devices):
        if seed is not None:  # the run's seed: the same weights give the same summary
            torch.manual_seed(seed)
        x = pl_module.flow.sample((n,))
        inside = evaluate_target(pl_module.target, x, pl_module.hparams.nan)[1]
    heading = "### posterior summary (flow draws)\n\n"
    if not bool(inside.all()):
        x = x[inside]
        heading += (f"{x.shape[0]} of {n} draws: the other {n - x.shape[0]} fell where the target's "
                    f"density is zero and are left out (here and in samples.pt)\n\n")
    table = summary(x, target=pl_module.target)
    paths = [os.path.join(dirpath, "summary.md")]
    with open(paths[0], "w") as f:
        f.write(heading + table.to_markdown())
    unpack = getattr(pl_module.target, "unpack", None)
    if unpack is not None:
        with torch.no_grad():
            sites = {k: v.detach().cpu() for k, v in unpack(x).items()}
        paths.append(os.path.join(dirpath, "samples.pt"))
        torch.save(sites, paths[-1])
    return paths


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves ``last.ckpt`` when training ends, at any step count,
    and when the run is stopped by SIGTERM or SIGINT.

    With ``save_last=True`` and ``every_n_train_steps=N`` the last state is saved every
    ``N`` steps (so a crash loses at most ``N`` steps) and once more at the end.

    Stopping: Lightning's own SIGTERM handling ends the run after the current step with a
    ``SIGTERMException``; SIGINT (Ctrl-C) is routed the same way (a second one stops at
    once, without a checkpoint). At that step boundary ``last.ckpt`` is saved, from which a
    resumed run continues bit for bit. The exception carries ``krflows_stop = (signal,
    step, path)``; ``krflows fit`` reports it and exits ``128 + signal`` (143, 130).
    """

    _signal: int | None = None  # the signal that stopped the run

    def on_train_start(self, trainer, pl_module) -> None:
        """Wraps Lightning's SIGTERM handler (installed by now; Lightning puts the previous
        handlers back when fitting ends) to record the signal, and routes SIGINT to it."""
        super().on_train_start(trainer, pl_module)
        self._signal = None
        if os.name == "nt" or threading.current_thread() is not threading.main_thread():
            return
        lightning_handler = signal.getsignal(signal.SIGTERM)

        def stop(signum, frame) -> None:
            if signum == signal.SIGINT and self._signal is not None:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now
            self._signal = self._signal or signum
            if callable(lightning_handler):
                lightning_handler(signal.SIGTERM, frame)  # Lightning stops after this step

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or not self.dirpath or trainer.fast_dev_run:
            return  # an error: the last good checkpoint stays
        path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        trainer.save_checkpoint(path, weights_only=False)  # at a step boundary: consistent
        self.last_model_path = path
        exception.krflows_stop = (self._signal or signal.SIGTERM, trainer.global_step, path)

    def on_train_end(self, trainer, pl_module) -> None:
        if not (self.save_last and self.dirpath) or trainer.fast_dev_run:
            super().on_train_end(trainer, pl_module)
        else:  # replaces the parent's save, which only happens when nothing was saved yet
            path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
            trainer.save_checkpoint(path, weights_only=False)
            self.last_model_path = path
