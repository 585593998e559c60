r"""The command line ``krflows fit``: Lightning's CLI over :class:`~krflows.lightning.KRFlowModule`.

``krflows fit`` with no arguments fits the embedded default, a 2-D bimodal posterior
(:class:`~krflows.targets.Bimodal2D`, modes 7 standard deviations apart with weights 0.3 and
0.7) with annealing and the mode-covering start of :class:`~krflows.lightning.KRFlowModule`
(``--model.modes search``: a mode search, then a decaying defensive forward-KL term), so that
both modes are kept with their weights. Every run writes ``<root_dir>/<name>/``:
TensorBoard events, ``config.yaml``, ``checkpoints/last.ckpt`` (every
``--checkpoint.every_n_train_steps`` steps and at the end) and the bias report
``report.md`` / ``report.json``. Options come from flags or YAML (``--config run.yaml``);
``krflows fit --print_config`` prints the full configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from krflows.callbacks import DiagnosticsReport, RunCheckpoint, SamplePlots, TrainingMetrics
from krflows.lightning import KRFlowModule
from krflows.targets import TARGETS

__all__ = ["KRFlowCLI", "main"]

_NAME_ENV = "KRFLOWS_RUN_NAME"  # hands the run name to the DDP worker processes

DEFAULTS = {
    "model.target": "bimodal2d",
    "model.target_options": {"separation": 7.0, "weights": [0.3, 0.7]},
    "model.transform": "spline",
    "model.layers": 2,
    "model.hidden": [32, 32],
    "model.batch_size": 256,
    "model.lr": 3e-3,
    "model.anneal": 0.5,
    "model.beta0": 0.1,
    "checkpoint.save_last": True,
    "checkpoint.save_top_k": 0,
    "checkpoint.every_n_train_steps": 500,
    "checkpoint.enable_version_counter": False,
}

TRAINER_DEFAULTS = {
    "max_steps": 2000,
    "accelerator": "auto",
    "devices": 1,
    "gradient_clip_val": 10.0,
    "log_every_n_steps": 10,
    "callbacks": [TrainingMetrics()],
}

DESCRIPTION = """\
Fit a monotone triangular (Knothe-Rosenblatt) flow to an unnormalized posterior by reverse KL.

Without arguments: a 2-D bimodal posterior (modes 7 sd apart, weights 0.3 / 0.7), {steps} steps
with annealing. Outputs go to <root_dir>/<name>/ (TensorBoard events, config.yaml,
checkpoints/last.ckpt, report.md, report.json).

Common options:
  --model.target NAME               a registered target (list below)
  --model.target_options '{{...}}'    e.g. '{{separation: 8.0, weights: [0.5, 0.5]}}' or '{{dim: 8}}'
                                    (the default options go with the default target only)
  --model.transform FAMILY          spline | affine | bernstein | integrated
  --model.layers N --model.hidden '[64, 64]'
  --model.anneal F --model.lr F --model.batch_size N --model.seed N
  --model.modes search|null         cover separated modes (default: search) or plain warm-up
  --trainer.max_steps N             run length (steps)
  --trainer.accelerator cpu|cuda    device (default auto); --trainer.devices N --trainer.strategy ddp
  --name NAME --root_dir DIR        where the run goes
  --ckpt_path PATH                  resume (e.g. runs/NAME/checkpoints/last.ckpt)
  --config run.yaml                 a YAML config (see --print_config)
  --threads N                       torch CPU threads (default 1, fastest for small flows)

Targets: {targets}.
"""


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of the description."""


class KRFlowCLI(LightningCLI):
    """``LightningCLI`` with the ``fit`` subcommand, krflows' callbacks and a run directory."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--name", type=str | None, default=None,
                            help="Run name: outputs go to <root_dir>/<name>/ (default: the run of "
                                 "--ckpt_path, else a timestamp).")
        parser.add_argument("--root_dir", type=str, default="runs", help="Directory of the runs.")
        parser.add_argument("--threads", type=int | None, default=1,
                            help="torch CPU threads (torch.set_num_threads); null: torch's default. One "
                                 "thread is fastest for small flows, and much faster on a busy machine.")
        parser.add_lightning_class_args(SamplePlots, "plots")
        parser.add_lightning_class_args(DiagnosticsReport, "report")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(DEFAULTS)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        model = config.model
        if (model.target != DEFAULTS["model.target"]
                and model.target_options == DEFAULTS["model.target_options"]):
            model.target_options = None  # the default options belong to the default target
        root, name = config.root_dir, config.name
        ckpt = Path(config.ckpt_path) if config.get("ckpt_path") else None
        if name is None and ckpt is not None and ckpt.parent.name == "checkpoints":
            root, name = str(ckpt.parent.parent.parent), ckpt.parent.parent.name
        if name is None and os.environ.get("LOCAL_RANK", "0") != "0":
            name = os.environ.get(_NAME_ENV)
        if name is None:
            name = time.strftime("%Y%m%d-%H%M%S")
        os.environ[_NAME_ENV] = name
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.run_dir = os.path.join(root, name)
        self.run_root, self.run_name = root, name

    def instantiate_trainer(self, **kwargs):
        logger = self._get(self.config_init, "trainer", default={}).get("logger")
        if logger is None or logger is True:
            kwargs["logger"] = TensorBoardLogger(save_dir=self.run_root, name=self.run_name, version="",
                                                 default_hp_metric=False)
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        report = next((c for c in trainer.callbacks if isinstance(c, DiagnosticsReport)), None)
        ckpt = next((c.last_model_path for c in trainer.callbacks if isinstance(c, RunCheckpoint)), "")
        log_dir = os.path.normpath(getattr(trainer.logger, "log_dir", None) or self.run_dir)
        lines = ["", f"krflows: run written to {log_dir}"]
        if ckpt:
            lines.append(f"  checkpoint   {ckpt}   (resume: krflows fit --ckpt_path {ckpt})")
        if report is not None and report.paths:
            lines.append(f"  report       {report.paths[0]}")
        if report is not None and report.report is not None:
            lines += ["", *_summary(report.report)]
        lines += ["", f"View the curves and images:  tensorboard --logdir {log_dir}", ""]
        print("\n".join(lines), flush=True)


def _summary(report) -> list[str]:
    """The headline numbers of a bias report (:func:`krflows.diagnose`'s keys), one per line."""
    def num(key: str, fmt: str = ".4g") -> str:
        value = report.get(key)
        return "n/a" if value is None else format(value, fmt)

    lines = [f"verdict      {report.get('verdict', '')}",
             f"ELBO         {num('elbo')}",
             f"log Z        {num('log_z')} ± {num('log_z_se', '.2g')} (importance sampling)"
             + (f", exact {num('true_log_z')}" if "true_log_z" in report else ""),
             f"ESS/N        {num('ess', '.3f')}",
             f"Pareto k̂     {num('pareto_k', '.3f')}"]
    if "mode_weights" in report and len(report["mode_weights"]) <= 16:
        def fmt(ws) -> str:
            return ", ".join(f"{w:.3f}" for w in ws)
        lines.append(f"mode weights {fmt(report['mode_weights'])} (flow) vs "
                     f"{fmt(report.get('true_mode_weights', []))} (truth)")
    return lines


def main(args: list[str] | None = None) -> None:
    """Runs the ``krflows`` command line (``args`` default to ``sys.argv[1:]``)."""
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # no data to load
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning vs torch
    description = DESCRIPTION.format(targets=", ".join(sorted(TARGETS)), steps=TRAINER_DEFAULTS["max_steps"])
    KRFlowCLI(
        KRFlowModule,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=False,  # the run is seeded by --model.seed
        auto_configure_optimizers=False,  # Adam + cosine schedule, as in krflows.fit
        parser_kwargs={"description": "krflows: monotone triangular flows for Bayesian inference.",
                       "formatter_class": _HelpFormatter, "fit": {"description": description}},
        args=args,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
