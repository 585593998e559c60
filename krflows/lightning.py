r"""Training with Lightning: :class:`KRFlowModule`, reverse KL of a flow against a target.

The module is thin: the loss is :func:`krflows.objectives.reverse_kl`, the warm-up of the
affine stage (with the default mode search), the tempering schedule and the defensive
term are :func:`krflows.fit.warm_start`, :func:`krflows.fit.temperature` and
:func:`krflows.fit.defensive_kl`, exactly as in :func:`krflows.fit`. What Lightning adds:
devices (``accelerator="auto"``), DDP, checkpoints and resumption, gradient clipping
(``Trainer(gradient_clip_val=...)``) and loggers. What is logged, plotted and reported lives
in :mod:`krflows.callbacks`; the command line ``krflows fit`` is :mod:`krflows.cli`.

Reverse KL needs no data: every step draws ``batch_size`` points ``z ~ N(0, I)`` of the
reference and pushes them through ``T: z -> x``. The dataloader only counts steps, so the
run length is ``Trainer(max_steps=...)``. The draws of step ``t`` on rank ``r`` come from a
generator seeded by ``(seed, r, t)``: ranks draw different points, and a run resumed from a
checkpoint draws what the uninterrupted run would have drawn, with no RNG state to save.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from krflows.fit import ModeMixture, defensive_kl, defensive_weight, temperature, warm_start
from krflows.flows import KRFlow
from krflows.objectives import Batch, reverse_kl
from krflows.targets import Target, as_target, get_target

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
    wins over ``transform``/``layers``/``hidden``/``family_options``. Injected objects are
    not saved as hyperparameters; a module built from configuration values is restored by
    ``KRFlowModule.load_from_checkpoint(path)``.

    Each step: ``β = temperature(t, max_steps, anneal, beta0)``, one
    :func:`~krflows.objectives.reverse_kl` batch, Adam with a cosine schedule (to ``lr / 20``
    at ``max_steps``). Samples where the target is NaN or inf are dropped and counted
    (:attr:`dropped`); a batch with no finite value raises
    :class:`~krflows.objectives.NonFiniteTargetError`; a step whose gradient is not finite
    changes no parameter (counted in :attr:`skipped`). Before the first step of a fresh
    run, :func:`~krflows.fit.warm_start` fits the affine stage (Gaussian VI), which moves the
    reference onto the target's location and scale; a resumed run skips it. With
    ``modes="search"`` (default) it is the mode-covering start of :func:`krflows.fit`: a
    tempered warm-up and a mode search; when several modes are found, the flow starts from
    their Laplace mixture and each step adds the decaying defensive forward-KL term.

    Arguments:
        flow: a flow with ``.dim``, ``.affine`` and ``rsample_and_log_prob`` (e.g.
            :class:`~krflows.KRFlow`); built from the options below when ``None``.
        target: a name of :data:`krflows.targets.TARGETS`, or a target object, a
            distribution or a callable ``log_prob(x) -> (n,)`` (then ``flow`` gives the dim).
            A target object is moved to the module's device when fitting starts.
        target_options: keyword arguments of the named target, e.g.
            ``{"separation": 7.0, "weights": [0.3, 0.7]}``.
        transform: the monotone family of the built flow (``"spline"``, ``"affine"``,
            ``"bernstein"``, ``"integrated"``).
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
        transform: str = "spline",
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
    ):
        super().__init__()
        injected = [k for k, v in (("flow", flow), ("target", target)) if not isinstance(v, str | None)]
        self.save_hyperparameters(ignore=injected)
        if isinstance(target, str):
            target = get_target(target, **(target_options or {}))
        self.target = as_target(target, dim=getattr(flow, "dim", None))
        if flow is None:
            with _seeded(torch.device("cpu"), seed, _INIT):
                flow = KRFlow(self.target.dim, transform, layers, tuple(hidden), compile=compile,
                              **(family_options or {}))
        self.flow = flow
        self.dropped = 0  # samples with a non-finite target, over the run (this rank)
        self.skipped = 0  # steps whose gradient was not finite
        self.beta = 1.0  # the inverse temperature of the last step
        self.last_batch: Batch | None = None  # the last reverse-KL batch, for the callbacks
        self.mixture: ModeMixture | None = None  # the modes the defensive term covers
        self._warmed_up = False

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

    # ---- data: only a step counter ----------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Steps(self.total_steps), batch_size=None)

    # ---- the run ------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        if callable(getattr(self.target, "to", None)):  # (log_prob casts dtypes itself)
            self.target.to(device=self.device)
        if self._warmed_up:
            if self.mixture is not None:  # restored from a checkpoint (on the CPU)
                self.mixture = self.mixture.to(device=self.device)
            return
        hp, steps = self.hparams, self.total_steps
        n = min(200, steps // 5) if hp.warmup is None else hp.warmup
        with _seeded(self.device, hp.seed, _WARMUP):  # the same on every rank
            self.mixture, _ = warm_start(self.flow, self.target, n, hp.batch_size, modes=hp.modes, lr=hp.lr,
                                         beta=temperature(0, steps, hp.anneal, hp.beta0), beta0=hp.beta0)
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
        self.beta = temperature(step, self.total_steps, hp.anneal, hp.beta0)
        with _seeded(self.device, hp.seed, _TRAIN, self.global_rank, step):
            out = reverse_kl(self.flow, self.target, hp.batch_size, beta=self.beta,
                             path_gradient=hp.path_gradient)
            loss, weight = out.loss, defensive_weight(step, self.total_steps)
            if self.mixture is not None and weight > 0:
                loss = loss + weight * defensive_kl(self.flow, self.target, self.mixture, hp.batch_size)
        self.dropped += out.dropped
        self.last_batch = out
        self.log("train/loss", loss, prog_bar=True, batch_size=hp.batch_size)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A non-finite gradient is discarded, so that Adam leaves every parameter alone."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads and not all(bool(torch.isfinite(g).all()) for g in grads):
            for p in self.parameters():
                p.grad = None
            self.skipped += 1

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.flow.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.total_steps, eta_min=hp.lr / 20)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- checkpoints: counters and the warm-up flag ----------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["krflows"] = {"dropped": self.dropped, "skipped": self.skipped,
                                 "warmed_up": self._warmed_up,
                                 "mixture": None if self.mixture is None else self.mixture.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("krflows", {})
        self.dropped = int(state.get("dropped", 0))
        self.skipped = int(state.get("skipped", 0))
        self._warmed_up = bool(state.get("warmed_up", True))
        mixture = state.get("mixture")
        self.mixture = None if mixture is None else ModeMixture.from_state_dict(mixture)


class _Steps(IterableDataset):
    """``0, 1, ..., n - 1``: the step counter that stands in for a dataset."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


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
