r"""Lightning callbacks for :class:`~krflows.lightning.KRFlowModule` runs.

* :class:`TrainingMetrics`: scalars of each logged step's reverse-KL batch,
  ``train/elbo``, ``train/ess`` (ESS/N), ``train/pareto_k``, ``train/log_z`` (and its
  s.e.), ``train/grad_norm`` (before clipping), ``train/lr``, ``train/beta``,
  ``train/dropped`` (``train/loss`` is logged by the module).
* :class:`SamplePlots`: every ``every_n_steps`` a TensorBoard image ``samples`` (2-D: flow
  samples over the target's log-density contours; otherwise a pair plot of the first
  coordinates) and a histogram ``log_weights``.
* :class:`DiagnosticsReport`: when training ends, the bias report
  (:func:`krflows.diagnose` when available) as TensorBoard text and ``report/*`` scalars,
  and as ``report.md`` / ``report.json`` in the run directory.
* :class:`RunCheckpoint`: a ``ModelCheckpoint`` that also writes ``last.ckpt`` at the end
  and where SIGTERM or SIGINT stops the run.

The diagnostics themselves are the pure functions of :mod:`krflows.diagnostics`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from collections.abc import Iterator, Mapping

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from krflows import diagnostics
from krflows.diagnostics import ess, log_z_estimate, pareto_k
from krflows.objectives import evaluate_target

__all__ = ["TrainingMetrics", "SamplePlots", "DiagnosticsReport", "RunCheckpoint", "bias_report",
           "plot_samples"]


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
    step's batch (on rank 0 under DDP); ``dropped`` counts the non-finite target values
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
            "train/elbo": log_w.mean(), "train/log_z": log_z, "train/log_z_se": log_z_se,
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
        every_n_steps: plotting period in optimizer steps (0: only at the end).
        n_samples: flow samples per plot.
        pairs: the pair plot shows the first this many coordinates (``dim > 2``).
    """

    def __init__(self, every_n_steps: int = 500, n_samples: int = 2000, pairs: int = 4):
        self.every_n_steps, self.n_samples, self.pairs = every_n_steps, n_samples, pairs
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._plot(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if _step(trainer) != self._last_step:
            self._plot(trainer, pl_module)

    def _plot(self, trainer, pl_module) -> None:
        writer = _tensorboard(trainer)
        if writer is None or not trainer.is_global_zero:
            return
        self._last_step = step = _step(trainer)
        with torch.no_grad():
            x, log_q = pl_module.flow.rsample_and_log_prob((self.n_samples,))
            log_w = pl_module.target(x) - log_q
        writer.add_image("samples", plot_samples(x, pl_module.target, self.pairs), step, dataformats="HWC")
        log_w = log_w[torch.isfinite(log_w)]
        if log_w.numel():
            writer.add_histogram("log_weights", log_w.float().cpu(), step)


class DiagnosticsReport(Callback):
    """When training ends, reports the flow's bias (rank 0).

    Logs the report's markdown as TensorBoard text ``report`` and its scalars as
    ``report/<key>`` to every logger, and writes ``report.md`` and ``report.json``.

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
        self.report = report = bias_report(pl_module.flow, pl_module.target, self.n_samples)
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


# ---- the report ---------------------------------------------------------------------------

def bias_report(flow, target, n: int = 20000) -> Mapping:
    """The bias report of ``flow`` against ``target``: :func:`krflows.diagnose` when the
    package has it, else :class:`BasicReport` (ELBO, log Z ± s.e., ESS/N, k̂, mode weights).
    """
    diagnose = getattr(diagnostics, "diagnose", None)
    if diagnose is not None:
        return diagnose(flow, target, n=n)
    return BasicReport.of(flow, target, n)


class BasicReport(Mapping):
    """A minimal bias report with the interface (and key names) of :func:`krflows.diagnose`.

    Keys: ``n``, ``n_dropped``, ``elbo``, ``log_z``, ``log_z_se``, ``ess``, ``pareto_k``,
    ``verdict``, and where the target knows them ``true_log_z``, ``mode_weights`` (flow
    frequencies via ``target.assign``) and ``true_mode_weights``.
    """

    def __init__(self, values: dict):
        self._values = values

    @classmethod
    @torch.no_grad()
    def of(cls, flow, target, n: int) -> BasicReport:
        x, log_q = flow.rsample_and_log_prob((n,))
        log_p, ok = evaluate_target(target, x)
        log_w = (log_p - log_q)[ok].double()
        v: dict = {"n": int(ok.sum()), "n_dropped": n - int(ok.sum()), "elbo": math.nan, "log_z": math.nan,
                   "log_z_se": math.nan, "ess": math.nan, "pareto_k": math.nan}
        if log_w.numel():
            log_z, se = log_z_estimate(log_w)
            v.update(elbo=float(log_w.mean()), log_z=float(log_z), log_z_se=float(se),
                     ess=float(ess(log_w)), pareto_k=pareto_k(log_w))
        if getattr(target, "log_z", None) is not None:
            v["true_log_z"] = float(target.log_z)
        weights = getattr(target, "weights", None)
        if isinstance(weights, Tensor) and hasattr(target, "assign") and weights.numel() <= 64 and v["n"]:
            counts = torch.bincount(target.assign(x[ok]).reshape(-1).cpu(), minlength=weights.numel())
            v["mode_weights"] = (counts / counts.sum()).tolist()
            v["true_mode_weights"] = weights.double().cpu().tolist()
        k = v["pareto_k"]
        v["verdict"] = ("good" if k < 0.5 and v["ess"] > 0.5 else "usable" if k < 0.7
                        else "unreliable (k̂ > 0.7 or undefined)")
        return cls(v)

    def __getitem__(self, key: str):
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def scalars(self) -> dict[str, float]:
        """Flat numbers for logging; the mode weights as ``mode_weight/{k}``, ``true_mode_weight/{k}``."""
        out = {k: float(v) for k, v in self._values.items() if isinstance(v, int | float)}
        for key, name in (("mode_weights", "mode_weight"), ("true_mode_weights", "true_mode_weight")):
            out.update({f"{name}/{i}": float(w) for i, w in enumerate(self._values.get(key, []))})
        return out

    def _rows(self) -> list[tuple[str, str]]:
        v = self._values
        rows = [("ELBO", f"{v['elbo']:.4g}"), ("log Z (IS)", f"{v['log_z']:.4g} ± {v['log_z_se']:.2g}")]
        if "true_log_z" in v:
            rows.append(("log Z (exact)", f"{v['true_log_z']:.4g}"))
        rows += [("ESS / N", f"{v['ess']:.4g}"), ("Pareto k̂", f"{v['pareto_k']:.3g}"),
                 ("dropped samples", f"{v['n_dropped']} of {v['n'] + v['n_dropped']}")]
        for key, label in (("mode_weights", "mode weights, flow"),
                           ("true_mode_weights", "mode weights, target")):
            if key in v:
                rows.append((label, "[" + ", ".join(f"{w:.4g}" for w in v[key]) + "]"))
        return rows

    def to_text(self) -> str:
        lines = ["krflows basic report", f"verdict: {self._values['verdict']}"]
        return "\n".join(lines + [f"  {k:<22} {v}" for k, v in self._rows()]) + "\n"

    def to_markdown(self) -> str:
        lines = [f"**Verdict:** {self._values['verdict']}", "", "| quantity | value |", "|---|---|"]
        return "\n".join(lines + [f"| {k} | {v} |" for k, v in self._rows()]) + "\n"

    def to_json(self, **kwargs) -> str:
        return json.dumps(self._values, **kwargs)


# ---- the sample image ---------------------------------------------------------------------

def plot_samples(x: Tensor, target, pairs: int = 4) -> np.ndarray:
    """An RGB image ``(H, W, 3)`` of flow samples ``x`` ``(n, d)`` against the target.

    ``d = 1``: a histogram over the normalized target density; ``d = 2``: a scatter over
    the contours of ``log p``; ``d > 2``: a pair plot of the first ``pairs`` coordinates
    (the target's exact samples in the upper triangle and on the diagonal when it has a
    sampler). Drawn with matplotlib's Agg canvas (no display needed).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    d = x.shape[-1]
    k = 1 if d <= 2 else min(d, pairs)
    fig = Figure(figsize=(4.5, 4) if k == 1 else (2.2 * k, 2.2 * k), dpi=90)
    canvas = FigureCanvasAgg(fig)
    if d <= 2:
        _density_panel(fig.add_subplot(), x, target)
    else:
        _pair_plot(fig, x, target, k)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _grid_log_prob(target, points: Tensor, like: Tensor) -> np.ndarray:
    with torch.no_grad():
        lp = target(points.to(like)).double().cpu()
    lp = torch.where(torch.isfinite(lp), lp, torch.tensor(math.nan, dtype=lp.dtype))
    return lp.numpy()


def _limits(x: Tensor, target) -> tuple[Tensor, Tensor]:
    lo, hi = torch.quantile(x, 0.005, dim=0), torch.quantile(x, 0.995, dim=0)
    modes = getattr(target, "modes", None)
    if isinstance(modes, Tensor) and modes.shape[-1] == x.shape[-1] and modes.shape[0] <= 64:
        modes = modes.double().cpu()
        lo, hi = torch.minimum(lo, modes.min(0).values), torch.maximum(hi, modes.max(0).values)
    pad = 0.15 * (hi - lo) + 0.5
    return lo - pad, hi + pad


def _density_panel(ax, x: Tensor, target) -> None:
    xs = x.detach().double().cpu()
    lo, hi = _limits(xs, target)
    if xs.shape[-1] == 1:
        grid = torch.linspace(float(lo[0]), float(hi[0]), 400, dtype=torch.float64)
        lp = _grid_log_prob(target, grid[:, None], x)
        p = np.exp(lp - np.nanmax(lp))
        p = p / (np.nansum(p) * float(grid[1] - grid[0]))
        ax.hist(xs[:, 0].numpy(), bins=80, density=True, alpha=0.5, color="C3", label="flow")
        ax.plot(grid.numpy(), p, color="k", lw=1, label="target")
        ax.legend(loc="upper right", fontsize=7)
        ax.set_xlabel("x_0")
        return
    g0 = torch.linspace(float(lo[0]), float(hi[0]), 120, dtype=torch.float64)
    g1 = torch.linspace(float(lo[1]), float(hi[1]), 120, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g0, g1, indexing="xy"), -1)
    lp = _grid_log_prob(target, grid, x)
    lp = lp - np.nanmax(lp)
    ax.contour(g0.numpy(), g1.numpy(), lp, levels=np.linspace(-12.0, 0.0, 13), cmap="viridis",
               linewidths=0.8)
    ax.scatter(xs[:, 0].numpy(), xs[:, 1].numpy(), s=3, alpha=0.35, color="C3", linewidths=0)
    ax.set(xlim=(float(lo[0]), float(hi[0])), ylim=(float(lo[1]), float(hi[1])), xlabel="x_0", ylabel="x_1",
           title="flow samples over log p contours")


def _pair_plot(fig, x: Tensor, target, k: int) -> None:
    xs = x.detach().double().cpu()[:, :k].numpy()
    truth = None
    if getattr(target, "has_sampler", False):
        try:
            truth = target.sample((xs.shape[0],)).double().cpu()[:, :k].numpy()
        except (NotImplementedError, ValueError):
            truth = None
    both = xs if truth is None else np.concatenate([xs, truth])
    lo, hi = np.quantile(both, 0.005, axis=0), np.quantile(both, 0.995, axis=0)
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)  # shared limits per coordinate
    axes = fig.subplots(k, k, squeeze=False)
    for i in range(k):
        for j in range(k):
            ax = axes[i, j]
            if i == j:
                bins = np.linspace(lo[i], hi[i], 50)
                ax.hist(xs[:, i], bins=bins, density=True, alpha=0.5, color="C3")
                if truth is not None:
                    ax.hist(truth[:, i], bins=bins, density=True, histtype="step", color="k")
            elif i > j or truth is not None:
                pts = xs if i > j else truth
                ax.scatter(pts[:, j], pts[:, i], s=1, alpha=0.3, color="C3" if i > j else "k", linewidths=0)
                ax.set_ylim(lo[i], hi[i])
            else:
                ax.axis("off")
            ax.set_xlim(lo[j], hi[j])
            ax.tick_params(labelsize=6)
            if i == k - 1:
                ax.set_xlabel(f"x_{j}", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"x_{i}", fontsize=7)
    fig.suptitle("flow (red, lower) vs target (black, upper)" if truth is not None else "flow samples",
                 fontsize=8)
