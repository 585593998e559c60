r"""Training with Lightning: :class:`KRFlowModule`, reverse KL of a flow against a target.

The module is thin: the loss is :func:`krflows.objectives.reverse_kl`; the warm-up of the
affine stage, the tempering schedule, the optimizer and its schedule and the skipping of
non-finite gradients are those of :mod:`krflows.train`, exactly as in :func:`krflows.fit`.
What Lightning adds: devices (``accelerator="auto"``), DDP, checkpoints and resumption, gradient clipping
(``Trainer(gradient_clip_val=...)``) and loggers. What is logged, plotted and reported lives
in :mod:`krflows.callbacks`; the command line ``krflows fit`` is :mod:`krflows.cli`.

Reverse KL needs no data: every step draws ``batch_size`` points ``z ~ N(0, I)`` of the
reference and pushes them through ``T: z -> x``. The dataloader only counts steps, so the
run length is ``Trainer(max_steps=...)``. The draws of step ``t`` on rank ``r`` come from a
generator seeded by ``(seed, r, t)``: ranks draw different points, and a run resumed from a
checkpoint draws what the uninterrupted run would have drawn, with no RNG state to save.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from krflows.flows import KRFlow
from krflows.importance import check_nan_policy
from krflows.io import flow_config, flow_from_config
from krflows.objectives import Batch, reverse_kl
from krflows.spec import resolve_target
from krflows.targets import Target, as_target
from krflows.train import (
    ModeMixture,
    adam,
    default_warmup,
    defensive_kl,
    defensive_weight,
    finite_grads,
    keep_freed_memory,
    temperature,
    warm_start,
    warn_dropped,
)

__all__ = ["KRFlowModule"]

_INIT, _WARMUP, _TRAIN = 0, 1, 2  # streams of the counter-based seeding

# The step counter below is an IterableDataset with a length (for the progress bar's total);
# Lightning warns about that for multi-worker loading, which it never uses.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


class KRFlowModule(L.LightningModule):
    r"""Fits a :class:`~krflows.KRFlow` (``z -> x``) to an unnormalized target by reverse KL.

    Either inject the objects, ``KRFlowModule(flow=flow, target=target)``, or give plain
    configuration values (what ``krflows fit`` does): the target by name with its options,
    the flow by family, layers and widths; its dimension is the target's. An injected flow
    wins over ``family``/``layers``/``hidden``/``family_options``. Injected objects are
    not saved as hyperparameters; a module built from configuration values is restored by
    ``KRFlowModule.load_from_checkpoint(path)``, and so is one with an injected flow: the
    checkpoint records the flow's configuration (:func:`krflows.io.flow_config`) and the
    flow is rebuilt from it before its weights are loaded (a flow with a custom family is
    passed again, ``load_from_checkpoint(path, flow=flow)``). An injected target object is
    not recorded: pass it again (``target=...``); loading without it warns.

    Each step: ``β = temperature(t, max_steps, anneal, beta0)``, one
    :func:`~krflows.objectives.reverse_kl` batch (logged: ``train/loss``, the tempered
    objective that is minimized, and ``train/loss_untempered``, the negative ELBO
    :math:`E_q[\log q - \log \tilde p]`, which under annealing is the one to watch fall),
    Adam with a cosine schedule (to ``lr / 20`` at ``max_steps``). Resumed with another
    ``max_steps`` (``Trainer.fit(..., ckpt_path=...)``), the run keeps the checkpoint's plan for
    the annealing and the defensive term (finished stays finished) and the learning rate
    decays from its value at the checkpoint to ``lr / 20`` at the new ``max_steps``; a
    checkpoint at or past ``max_steps`` warns that there is nothing to train. Samples where the target
    is ``-inf`` (zero density) are dropped and counted (:attr:`dropped`); NaN is an error
    unless ``nan="zero"``; a batch with no finite value raises
    :class:`~krflows.objectives.NonFiniteTargetError`; a step whose gradient is not finite
    changes no parameter (counted in :attr:`skipped`). Before the first step of a fresh
    run, :func:`~krflows.train.warm_start` fits the affine stage (Gaussian VI), which moves the
    reference onto the target's location and scale; a resumed run skips it. With
    ``modes="search"`` (default) it is the mode-covering start of :func:`krflows.fit`: a
    tempered warm-up and a mode search; when several modes are found, the flow starts from
    their Laplace mixture and each step adds the decaying defensive forward-KL term.

    Arguments:
        flow: a flow with ``.dim``, ``.affine`` and ``rsample_and_log_prob`` (e.g.
            :class:`~krflows.KRFlow`); built from the options below when ``None``.
        target: a name of :data:`krflows.targets.TARGETS`, a spec ``"path/file.py:NAME"`` or
            ``"package.module:NAME"`` of a log density, a ``Target`` or a Pyro model
            (:func:`krflows.spec.resolve_target`; the string is saved, so a checkpoint imports
            it again), or a target object, a distribution or a callable
            ``log_prob(x) -> (n,)`` (then ``flow`` or ``dim`` gives the dimension).
            A target object is moved to the module's device when fitting starts.
        target_options: keyword arguments of the named target, e.g.
            ``{"separation": 7.0, "weights": [0.3, 0.7]}`` (or of a Target class, a Pyro model).
        dim: the dimension of a log-density callable without ``.dim`` (checked otherwise).
        family: the monotone family of the built flow (``"spline"``, ``"affine"``,
            ``"bernstein"``, ``"integrated"``).
        transform: deprecated name of ``family`` (``DeprecationWarning``; wins when given).
        layers: autoregressive layers of the built flow.
        hidden: hidden widths of each layer's conditioner.
        family_options: options of the family, e.g. ``{"bins": 8, "bound": 5.0}``.
        batch_size: reference samples per step (per device under DDP).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        anneal: fraction of ``max_steps`` over which ``β`` rises from ``beta0`` to 1 (0: off).
        beta0: the initial inverse temperature.
        warmup: affine warm-up steps (default ``min(200, max_steps // 5)``; 0: off).
        modes: ``"search"`` (cover separated modes, as in :func:`krflows.fit`) or ``None``
            (the plain Gaussian-VI warm-up).
        path_gradient: use the sticking-the-landing estimator (one inverse per step).
        seed: seeds the flow's initialization and every draw of the run.
        compile: compile the built flow's hot paths (:meth:`krflows.KRFlow.compile`):
            about half the CPU step time after a one-time compilation of tens of seconds.
        nan: what a NaN log density of the target means (:mod:`krflows.importance`):
            ``"error"`` (default) raises :class:`~krflows.objectives.NonFiniteTargetError`,
            ``"zero"`` reads it as zero density (dropped and counted, like ``-inf``).

    Example:
        >>> module = KRFlowModule(target="banana", layers=1, hidden=(8,))
        >>> trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module)
        >>> trainer.global_step
        3
    """

    def __init__(
        self,
        flow: KRFlow | None = None,
        target: str | Target | Callable = "bimodal2d",
        *,
        target_options: dict | None = None,
        dim: int | None = None,
        family: str = "spline",
        layers: int = 4,
        hidden: Sequence[int] = (64, 64),
        family_options: dict | None = None,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        anneal: float = 0.0,
        beta0: float = 0.1,
        warmup: int | None = None,
        modes: str | None = "search",
        path_gradient: bool = False,
        seed: int = 0,
        compile: bool = False,
        nan: str = "error",
        transform: str | None = None,
    ):
        super().__init__()
        if transform is not None:
            warnings.warn("KRFlowModule(transform=...) is deprecated: use family=", DeprecationWarning,
                          stacklevel=2)
            family = transform
        check_nan_policy(nan)
        injected = [k for k, v in (("flow", flow), ("target", target)) if not isinstance(v, str | None)]
        self.save_hyperparameters(ignore=injected)
        if isinstance(target, str):
            target = resolve_target(target, target_options, dim=dim)
        self.target = as_target(target, dim=getattr(flow, "dim", None) or dim)
        if flow is None:
            with _seeded(torch.device("cpu"), seed, _INIT):
                flow = KRFlow(self.target.dim, family, layers, tuple(hidden), compile=compile,
                              **(family_options or {}))
        self.flow = flow
        self.dropped = 0  # samples with a non-finite target, over the run (this rank)
        self.skipped = 0  # steps whose gradient was not finite
        self.beta = 1.0  # the inverse temperature of the last step
        self.last_batch: Batch | None = None  # the last reverse-KL batch, for the callbacks
        self.mixture: ModeMixture | None = None  # the modes the defensive term covers
        self._warmed_up = False
        self._warned = False  # about dropped samples (once per process)
        # the schedules' plan: the horizon of the annealing and the defensive term, and the
        # learning rate's cosine segment (start step, start factor, end step); None: this run's
        # max_steps, from factor 1 at step 0 (a fresh run); set by a resumed checkpoint
        self._horizon: int | None = None
        self._lr_segment: tuple[int, float, int] | None = None

    def forward(self, z: Tensor) -> Tensor:
        """``x = T(z)``: reference points ``(*, d)`` pushed to the target side."""
        return self.flow(z)

    @property
    def total_steps(self) -> int:
        """The run length, ``Trainer(max_steps=...)``, which the schedules are laid out over."""
        if self.trainer.max_steps is None or self.trainer.max_steps < 0:
            raise ValueError("KRFlowModule counts optimizer steps, not epochs: build the Trainer "
                             "with max_steps, e.g. Trainer(max_steps=2000)")
        return max(1, int(self.trainer.max_steps))

    @property
    def horizon(self) -> int:
        """The run length the annealing and the defensive term are laid out over: ``max_steps``,
        or the first run's when a checkpoint was resumed with another ``max_steps``."""
        return self._horizon or self.total_steps

    @property
    def lr_segment(self) -> tuple[int, float, int]:
        """The learning rate's cosine: (start step, factor there, end step); from factor 1 at step 0
        to ``max_steps`` unless a resumed checkpoint set another."""
        return self._lr_segment or (0, 1.0, self.total_steps)

    def lr_factor(self, step: int) -> float:
        """The learning rate at ``step`` over ``lr``: a cosine to ``1/20`` at ``max_steps``;
        after a resume with another ``max_steps``, a cosine from the checkpoint's value."""
        start, factor, end = self.lr_segment
        floor = 1 / 20
        t = min(1.0, max(0.0, (step - start) / max(1, end - start)))
        return floor + (factor - floor) * 0.5 * (1 + math.cos(math.pi * t))

    # ---- data: only a step counter ----------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Steps(self.total_steps), batch_size=None)

    # ---- the run ------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        keep_freed_memory()
        if callable(getattr(self.target, "to", None)):  # (log_prob casts dtypes itself)
            self.target.to(device=self.device)
        if self._warmed_up:
            if self.mixture is not None:  # restored from a checkpoint (on the CPU)
                self.mixture = self.mixture.to(device=self.device)
            return
        hp, steps = self.hparams, self.horizon
        n = default_warmup(steps) if hp.warmup is None else hp.warmup
        with _seeded(self.device, hp.seed, _WARMUP):  # the same on every rank
            self.mixture, _ = warm_start(self.flow, self.target, n, hp.batch_size, modes=hp.modes, lr=hp.lr,
                                         beta=temperature(0, steps, hp.anneal, hp.beta0), beta0=hp.beta0,
                                         nan=hp.nan)
        if getattr(self.flow, "affine", None) is not None and self.trainer.world_size > 1:
            state = self.flow.state_dict() if self.mixture is not None else self.flow.affine.state_dict()
            state, mix = self.trainer.strategy.broadcast(
                (state, None if self.mixture is None else self.mixture.state_dict()), src=0)
            (self.flow if mix is not None else self.flow.affine).load_state_dict(state)
            self.mixture = None if mix is None else ModeMixture.from_state_dict(mix)
        self.flow.zero_grad(set_to_none=True)
        self._warmed_up = True

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        hp, step = self.hparams, self.global_step + 1
        self.beta = temperature(step, self.horizon, hp.anneal, hp.beta0)
        with _seeded(self.device, hp.seed, _TRAIN, self.global_rank, step):
            out = reverse_kl(self.flow, self.target, hp.batch_size, beta=self.beta,
                             path_gradient=hp.path_gradient, nan=hp.nan)
            loss, weight = out.loss, defensive_weight(step, self.horizon)
            if self.mixture is not None and weight > 0:
                defensive = defensive_kl(self.flow, self.target, self.mixture, hp.batch_size, hp.nan)
                loss = loss + weight * defensive
        self.dropped += out.dropped
        self._warned = warn_dropped(out, step, self._warned)
        self.last_batch = out
        if self._logs_written():
            self.log("train/loss", loss, prog_bar=True, batch_size=hp.batch_size)
            # the tempered loss rises while beta anneals to 1; this one is comparable across steps
            self.log("train/loss_untempered", -out.elbo, batch_size=hp.batch_size)
        return loss

    def _logs_written(self) -> bool:
        """Whether Lightning writes this step's logs (every ``log_every_n_steps`` steps; its own
        test, read before the step as it reads it). The module logs its losses on those steps
        only: Lightning's bookkeeping of a ``self.log`` call (it moves the metric's state to the
        value's device at every call) cost ~0.5 ms here (1000 steps of the CLI's default model:
        10.5 s logging every step, 9.4 s on these), and the steps in between write nothing.
        True where the trainer cannot tell."""
        trainer = self._trainer
        connector = getattr(trainer, "_logger_connector", None)
        if connector is None:
            return True
        return bool(trainer.fast_dev_run) or bool(connector.should_update_logs)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A non-finite gradient is discarded, so that Adam leaves every parameter alone."""
        if not finite_grads(self.parameters()):
            for p in self.parameters():
                p.grad = None
            self.skipped += 1

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.flow.parameters() if p.requires_grad]
        # not fused: Lightning's gradient clipping and precision plugins expect the plain kernel
        opt = adam(params, fused=False, lr=hp.lr, weight_decay=hp.weight_decay)
        # the factor is read from the module at each step (lr_factor): a resumed run's plan is set
        # before this, and the scheduler's restored state (its step count) does not carry it
        sched = _LRSchedule(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- checkpoints: counters and the warm-up flag ----------------------------------------

    def _restore_flow(self, checkpoint: dict) -> None:
        """Rebuilds the flow a checkpoint was trained with when it was injected (it is not in
        the hyperparameters), before the weights are loaded into it."""
        if "target" not in checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY, {}) and "target" in self.hparams:
            warnings.warn(f"this checkpoint was trained on an injected target object, which it does not "
                          f"store; the module now has target={self.hparams.target!r}: pass the target "
                          f"again, KRFlowModule.load_from_checkpoint(path, target=...)", stacklevel=2)
        if "flow" not in self.hparams:
            return  # a flow was passed in again: its weights must fit
        if "krflows_flow" in checkpoint and checkpoint["krflows_flow"] is None:
            raise ValueError("this checkpoint's flow was injected with a custom family, which a checkpoint "
                             "does not record: build the flow again and pass it, "
                             "KRFlowModule.load_from_checkpoint(path, flow=flow)")
        config = checkpoint.get("krflows_flow")
        if config is not None and _flow_config_or_none(self.flow) != config:
            self.flow = flow_from_config(config, device=self.flow.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["krflows_flow"] = _flow_config_or_none(self.flow)
        checkpoint["krflows"] = {"dropped": self.dropped, "skipped": self.skipped,
                                 "warmed_up": self._warmed_up, "horizon": self.horizon,
                                 "lr_segment": self.lr_segment,
                                 "mixture": None if self.mixture is None else self.mixture.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._restore_flow(checkpoint)
        state = checkpoint.get("krflows", {})
        self.dropped = int(state.get("dropped", 0))
        self.skipped = int(state.get("skipped", 0))
        self._warmed_up = bool(state.get("warmed_up", True))
        mixture = state.get("mixture")
        self.mixture = None if mixture is None else ModeMixture.from_state_dict(mixture)
        if self._trainer is None or self.trainer.max_steps is None or self.trainer.max_steps < 0:
            return  # loaded outside a run (load_from_checkpoint): no schedule to plan
        step, total = int(checkpoint.get("global_step", 0)), self.total_steps
        if step >= total:
            warnings.warn(f"the checkpoint is at step {step}, at or past max_steps = {total}: nothing "
                          f"is trained; resume with a larger max_steps (--trainer.max_steps)", stacklevel=2)
        # a checkpoint written before the plan was recorded: its own max_steps is unknown
        self._horizon = int(state.get("horizon", total))
        segment = tuple(state.get("lr_segment", (0, 1.0, total)))
        self._lr_segment = (int(segment[0]), float(segment[1]), int(segment[2]))
        if self._lr_segment[2] != total:  # resumed with another max_steps: decay from here
            self._lr_segment = (step, self.lr_factor(step), total)


class _LRSchedule(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` whose factor is the module's :meth:`KRFlowModule.lr_factor`, and which loads
    the state of the ``CosineAnnealingLR`` that checkpoints written before it hold (no
    ``lr_lambdas`` there; only the step count and base rates matter)."""

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        state.setdefault("lr_lambdas", [None] * len(self.lr_lambdas))
        super().load_state_dict(state)


class _Steps(IterableDataset):
    """``0, 1, ..., n - 1``: the step counter that stands in for a dataset."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


def _flow_config_or_none(flow) -> dict | None:
    """The flow's :func:`~krflows.io.flow_config`, or ``None`` where it has none (a custom family)."""
    try:
        return flow_config(flow)
    except ValueError:
        return None


def _seed_of(*entropy: int) -> int:
    """A 63-bit seed hashed from nonnegative integers (NumPy's ``SeedSequence``)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] >> np.uint64(1))


@contextmanager
def _seeded(device: torch.device, *entropy: int):
    """Runs the block with the CPU (and ``device``'s) generator seeded from ``entropy``.

    The global RNG state is restored afterwards, so callbacks that draw samples do not
    change the training draws and vice versa.
    """
    seed = _seed_of(*entropy)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index]):
            torch.random.default_generator.manual_seed(seed)
            torch.cuda.default_generators[index].manual_seed(seed)
            yield
    elif device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
    else:  # other accelerators: seed them all, restore only the CPU generator
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
