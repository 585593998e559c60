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

A run never writes into another run's directory: an existing ``--name`` is refused (exit 2),
and ``--ckpt_path`` is checked before anything is written. SIGTERM or SIGINT stops a run after
the current step with ``checkpoints/last.ckpt`` saved there, and exits 143 or 130 (``128 +
signal``, as a shell reports a killed process): resuming from it continues bit for bit.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from krflows.callbacks import DiagnosticsReport, RunCheckpoint, SamplePlots, TrainingMetrics
from krflows.lightning import KRFlowModule
from krflows.objectives import NonDifferentiableTargetError, NonFiniteTargetError, TrainingDivergedError
from krflows.targets import TARGETS

__all__ = ["KRFlowCLI", "main"]

_NAME_ENV = "KRFLOWS_RUN_NAME"  # hands the run name to the DDP worker processes

DEFAULTS = {
    "model.target": "bimodal2d",
    "model.target_options": {"separation": 7.0, "weights": [0.3, 0.7]},
    "model.family": "spline",
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

PROGRESS_EVERY = 10  # steps between redraws of the default progress bar

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
  --model.target NAME               a registered target (list below), or your own as
                 path/file.py:NAME  or package.module:NAME: a log density log_prob(x) -> (n,)
                                    (with --model.dim N unless it has .dim), a krflows Target
                                    (instance or class), or a Pyro model (fitted on its
                                    unconstrained potential; draws per site in samples.pt)
  --model.dim N                     the dimension of a log-density callable
  --model.target_options '{{...}}'    e.g. '{{separation: 8.0, weights: [0.5, 0.5]}}' or '{{dim: 8}}'
                                    (the default options go with the default target only)
  --model.family FAMILY             spline | affine | bernstein | integrated
  --model.nan error|zero            a NaN target log density: an error (default) or zero density
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


#: model options that a resumed run may change: how the target's values are read, not the model
RESUME_MAY_CHANGE = ("nan",)
_RUN_DIR: list[str | None] = [None]  # the run directory of the last CLI run in this process


class KRFlowCLI(LightningCLI):
    """``LightningCLI`` with the ``fit`` subcommand, krflows' callbacks and a run directory."""

    _resume_overrides: dict  # RESUME_MAY_CHANGE options given with --ckpt_path (parse_arguments)

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

    def parse_arguments(self, parser, args) -> None:
        """Parses, then checks ``--ckpt_path`` before anything is read from it or written.

        Lightning then merges the checkpoint's hyperparameters over the parsed model options;
        a model option given here that differs from them would be silently ignored, so it is
        refused (trainer options, e.g. ``--trainer.max_steps``, may change on resume), except
        :data:`RESUME_MAY_CHANGE`: ``--model.nan zero`` is what a run stopped by a NaN target is
        told to resume with.
        """
        super().parse_arguments(parser, args)
        self._resume_overrides = {}
        if self.config.get("subcommand") != "fit" or not self.config.fit.get("ckpt_path"):
            return
        path = self.config.fit.ckpt_path
        hparams = load_checkpoint(path)["hyper_parameters"]
        given = _given_model_keys(sys.argv[1:] if args is None else args)
        defaults = self._subcommand_parsers["fit"].get_defaults().model
        model = self.config.fit.model
        conflicts = []
        for key in sorted(set(vars(model)) & set(hparams)):
            value, saved = _plain(model[key]), _plain(hparams[key])
            if key in RESUME_MAY_CHANGE:
                if key in given and value != saved:  # Lightning merges the saved value over it next
                    self._resume_overrides[key] = model[key]
                continue
            if (key in given or value != _plain(defaults[key])) and value != saved:
                conflicts.append(f"--model.{key} {_show(value)} (the checkpoint has {_show(saved)})")
        if conflicts:
            _usage_error(f"resuming from {path} keeps the model it was trained with; these options differ "
                         f"from it: {'; '.join(conflicts)}. Drop them, or start a new run without "
                         "--ckpt_path (trainer options such as --trainer.max_steps may change)")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        model = config.model
        for key, value in self._resume_overrides.items():  # over the checkpoint's, merged since
            model[key] = value
        if (model.target != DEFAULTS["model.target"]
                and model.target_options == DEFAULTS["model.target_options"]):
            model.target_options = None  # the default options belong to the default target
        root, name = config.root_dir, config.name
        ckpt = Path(config.ckpt_path) if config.get("ckpt_path") else None
        run_of_ckpt = ckpt.parent.parent if ckpt is not None and ckpt.parent.name == "checkpoints" else None
        if name is None and run_of_ckpt is not None:
            root, name = str(run_of_ckpt.parent), run_of_ckpt.name
        main_rank = os.environ.get("LOCAL_RANK", "0") == "0"
        if name is None and not main_rank:
            name = os.environ.get(_NAME_ENV)
        timestamped = name is None
        if timestamped:
            name = time.strftime("%Y%m%d-%H%M%S")
        self._claimed = None
        if main_rank and not config.trainer.get("fast_dev_run"):
            resuming_here = run_of_ckpt is not None and Path(root, name).resolve() == run_of_ckpt.resolve()
            if resuming_here:  # the run's own directory: its first config stays, this one goes beside it
                self.save_config_kwargs["config_filename"] = _free_name(os.path.join(root, name))
            else:
                name = self._claim(root, name, versioned=timestamped)
        os.environ[_NAME_ENV] = name
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.run_dir = os.path.join(root, name)
        self.run_root, self.run_name = root, name

    def _claim(self, root: str, name: str, versioned: bool) -> str:
        """Creates ``<root>/<name>`` (atomically, so two runs never share it) and returns the name.

        An existing directory is never written into: a name the user chose is refused, a
        timestamp gets a suffix (``-1``, ``-2``, ...) as two runs started in one second would.
        """
        os.makedirs(root, exist_ok=True)
        for i in range(1000):
            candidate = name if i == 0 else f"{name}-{i}"
            path = os.path.join(root, candidate)
            try:
                os.mkdir(path)
            except FileExistsError:
                if versioned:
                    continue
                last = os.path.join(path, "checkpoints", "last.ckpt")
                resume = (f"resume that run with --ckpt_path {last}" if os.path.isfile(last) else
                          "(it holds no checkpoint: that run stopped before its first)")
                _usage_error(f"the run directory {path} already exists, and krflows never writes into "
                             f"another run: choose another --name, {resume}, or remove the directory")
            self._claimed = path
            return candidate
        raise RuntimeError(f"no free run name {name}-N in {root}")

    def instantiate_classes(self) -> None:
        """Builds the model, callbacks and trainer; a bad option is a usage error, not a traceback."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, MisconfigurationException) as err:
            # MisconfigurationException: e.g. --trainer.accelerator gpu on a machine without one
            if self._claimed is not None and not os.listdir(self._claimed):
                os.rmdir(self._claimed)  # nothing was written: give the name back
            _usage_error(f"{type(err).__name__}: {err}" if isinstance(err, MisconfigurationException)
                         else str(err))

    def instantiate_trainer(self, **kwargs):
        _RUN_DIR[0] = os.path.join(self.run_root, self.run_name)  # for main's error message
        config = self._get(self.config_init, "trainer", default={})
        logger = config.get("logger")
        if logger is None or logger is True:
            kwargs["logger"] = TensorBoardLogger(save_dir=self.run_root, name=self.run_name, version="",
                                                 default_hp_metric=False)
        # Lightning's default progress bar redraws at every step (~1 ms of a ~8 ms step of the
        # default model, measured); every 10th step it costs a tenth. Not where the run sets a
        # progress bar of its own or none.
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar)
                                                                      for c in callbacks):
            kwargs["callbacks"] = [*callbacks, TQDMProgressBar(refresh_rate=PROGRESS_EVERY)]
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
            lines += [f"  {Path(p).stem:<12} {p}" for p in report.paths[2:]]  # samples.pt (Pyro sites)
        if report is not None and report.report is not None:
            lines += ["", *_summary(report.report)]
        lines += ["", f"View the curves and images:  tensorboard --logdir {log_dir}", ""]
        print("\n".join(lines), flush=True)


def load_checkpoint(path: str) -> dict:
    """Reads a ``krflows fit`` checkpoint (on the CPU), or exits with a usage error that says why not:
    ``not a krflows checkpoint: <path>: <reason>``."""
    def refuse(reason: str):
        _usage_error(f"not a krflows checkpoint: {path}: {reason}")

    if not os.path.exists(path):
        refuse("no such file")
    if not os.path.isfile(path):
        refuse("not a file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as err:
        refuse(f"cannot be read ({err.strerror})")
    except Exception as err:  # noqa: BLE001 - every unreadable file gets the same clear message
        first = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:160]
        refuse(f"truncated or not a torch checkpoint file ({type(err).__name__}: {first})")
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    missing = [k for k in ("state_dict", "global_step", "hyper_parameters") if not isinstance(ckpt, dict)
               or k not in ckpt]
    if missing:
        refuse(f"no {', '.join(missing)} (not a Lightning checkpoint)")
    if not isinstance(hparams, dict) or not {"target", "transform", "layers"} <= set(hparams):
        refuse("its hyperparameters are not a KRFlowModule's (a checkpoint of another model?)")
    return ckpt


def _given_model_keys(args: list[str]) -> set[str]:
    """The ``--model.KEY`` options named on the command line."""
    keys = set()
    for arg in args:
        if isinstance(arg, str) and arg.startswith("--model."):
            keys.add(arg[len("--model."):].split("=", 1)[0].split(".", 1)[0])
    return keys


def _plain(value):
    """Config values as plain Python (namespaces as dicts, tuples as lists) for comparison."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _show(value) -> str:
    return "null" if value is None else str(value)


def _free_name(run_dir: str) -> str:
    """``config.yaml``, else the first free ``config-resume-N.yaml`` of the run directory."""
    if not os.path.exists(os.path.join(run_dir, "config.yaml")):
        return "config.yaml"
    i = 1
    while os.path.exists(os.path.join(run_dir, f"config-resume-{i}.yaml")):
        i += 1
    return f"config-resume-{i}.yaml"


def _usage_error(message: str) -> None:
    """Exits with status 2 and ``krflows fit: error: <message>`` on stderr, as argparse does."""
    print(f"krflows fit: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _summary(report) -> list[str]:
    """The headline numbers of a bias report (:meth:`krflows.diagnostics.Report.headline`)."""
    return report.headline()


def main(args: list[str] | None = None) -> None:
    """Runs the ``krflows`` command line (``args`` default to ``sys.argv[1:]``)."""
    _RUN_DIR[0] = None
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # no data to load
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning vs torch
    description = DESCRIPTION.format(targets=", ".join(sorted(TARGETS)), steps=TRAINER_DEFAULTS["max_steps"])
    try:
        _run_cli(description, args)
    except (TrainingDivergedError, NonFiniteTargetError, NonDifferentiableTargetError) as err:
        kept = "" if _RUN_DIR[0] is None else os.path.join(_RUN_DIR[0], "checkpoints", "last.ckpt")
        if kept and os.path.isfile(kept):
            nan = " --model.nan zero" if isinstance(err, NonFiniteTargetError) and "NaN" in str(err) else ""
            kept = f"; the last checkpoint is kept: resume with krflows fit --ckpt_path {kept}{nan}"
        else:
            kept = ""
        print(f"krflows fit: error: {type(err).__name__}: {err}{kept}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except SIGTERMException as stop:  # a SystemExit with code None: it would exit 0
        signum, step, path = getattr(stop, "krflows_stop", (signal.SIGTERM, None, None))
        where = "" if step is None else f" at step {step}"
        saved = (f"; checkpoint {path} (resume: krflows fit --ckpt_path {path})" if path
                 else "; no checkpoint was saved")
        name = signal.Signals(signum).name
        print(f"krflows fit: stopped by {name}{where}{saved}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None


def _run_cli(description: str, args: list[str] | None) -> None:
    KRFlowCLI(
        KRFlowModule,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": False},  # never; the run directory is checked first
        seed_everything_default=False,  # the run is seeded by --model.seed
        auto_configure_optimizers=False,  # Adam + cosine schedule, as in krflows.fit
        parser_kwargs={"description": "krflows: monotone triangular flows for Bayesian inference.",
                       "formatter_class": _HelpFormatter, "fit": {"description": description}},
        args=args,
    )


if __name__ == "__main__":
    main()
