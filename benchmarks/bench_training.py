r"""Reverse-KL training benchmark: krflows against zuko, nflows and Pyro at a matched architecture.

Every library builds the same kind of flow: 4 masked autoregressive layers of monotone
rational-quadratic splines (8 bins, box ``[-5, 5]``, linear/identity tails outside it),
conditioners with hidden widths (64, 64), a standard normal reference, float32, and **one
fixed variable order** (the identity, no permutations between layers), so that each flow is
a lower-triangular monotone (Knothe–Rosenblatt-type) map ``T: z -> x``. Each library is used
in its cheap sampling direction (IAF style): ``x = T(z)`` and ``log q(x)`` come from one pass
per layer; ``log q`` at an arbitrary ``x`` needs ``d`` sequential passes per layer.

Before anything is measured, the Jacobian ``dT/dz`` of each library's sampling map is computed
with autograd at one point (``d = 10``, parameters randomly perturbed so that the check is not
trivially passed by an identity initialisation) and must be lower triangular with a positive
diagonal; a library that fails is excluded from every measurement and reported.

Measured (see ``benchmarks/README.md``):

* median milliseconds per Adam step (lr 1e-3, loss ``mean(log q(x) - log p(x))`` with
  reparametrized samples) on funnel-10, at batch sizes 512 and 4096 (``--batches``), libraries
  interleaved round-robin in blocks of steps, warm-up steps excluded, and beside them the
  conditioner-MLP floor (krflows' 4 masked MLPs alone, no spline: ``FloorTrainer``);
  ``--device cuda`` runs everything on the GPU, each timed region between synchronizations;
* sampling (``x`` and ``log q`` in one pass) and ``log_prob`` (at fresh points) throughput;
* the peak resident-memory increase of a training step, in a fresh subprocess per library;
* ESS/N (20000 fresh samples) after the same number of plain Adam steps on funnel-10, banana,
  a 0.3/0.7 two-mode mixture (8 sd apart) and a four-mode mixture (0.1/0.2/0.3/0.4 on the
  corners of a square of side 9 sd), the fraction of mass on each mode of the mixtures and its
  total variation from the truth, and the same for krflows' defaults (``KRFlow(d)`` +
  ``krflows.fit``, whose default is mode covering since issue 11).

Usage::

    python benchmarks/bench_training.py                  # full run, writes benchmarks/RESULTS.md
    python benchmarks/bench_training.py --quick --out /tmp/x.md    # smoke test (tiny settings)
    python benchmarks/bench_training.py --only quality --targets bimodal four-mode --out /tmp/q.md
    python benchmarks/bench_training.py --device cuda --batches 4096 65536 --only timing throughput
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

import krflows
from krflows.diagnostics import ess

LIBRARIES = ("krflows", "krflows-compile", "krflows-compile-cg", "krflows-unfolded", "krflows-whole",
             "krflows-compile-unfolded", "krflows-compile-blocked", "zuko", "zuko-compile", "zuko-compile-cg",
             "nflows", "pyro")
# torch.compile'd hot paths; not in --quick's default
COMPILED = ("krflows-compile", "krflows-compile-cg", "krflows-compile-unfolded", "krflows-compile-blocked",
            "zuko-compile", "zuko-compile-cg")
# CUDA graphs (mode="reduce-overhead"): not in a CPU run's default
CUDA_ONLY = ("krflows-compile-cg", "zuko-compile-cg")
# krflows without one of its optimizations, for an A/B in one process: only when named in --libs
AB_ONLY = ("krflows-unfolded", "krflows-whole", "krflows-compile-unfolded", "krflows-compile-blocked")
# (numerator, denominator) of the ratio columns
RATIOS = (("krflows", "zuko"), ("krflows", "nflows"), ("krflows", "pyro"),
          ("krflows-compile", "zuko"), ("krflows-compile", "zuko-compile"),
          ("krflows-compile-cg", "zuko-compile"), ("krflows-compile-cg", "zuko-compile-cg"),
          ("krflows", "krflows-unfolded"), ("krflows", "krflows-whole"),
          ("krflows-compile", "krflows-compile-unfolded"),
          ("krflows-compile", "krflows-compile-blocked"))
FLOOR = "mlp-floor"  # the conditioner MLPs alone, timed with the libraries (see `FloorTrainer`)
FLOOR_COMPILED = "mlp-floor-compile"  # the same under torch.compile: the floor of krflows-compile
BIMODAL_WEIGHTS = (0.3, 0.7)
# four unit-sd modes on the corners of a square of side 9 (neighbours 9 sd apart), as in
# experiments/mode_covering_defaults.py (issue 11's four-mode goal: mode-weight TV <= 0.1)
FOUR_MODE_MEANS = ((-4.5, -4.5), (4.5, -4.5), (-4.5, 4.5), (4.5, 4.5))
FOUR_MODE_WEIGHTS = (0.1, 0.2, 0.3, 0.4)
MULTIMODAL = ("bimodal", "four-mode")  # the targets whose mode masses are reported
SECTIONS = ("checks", "timing", "throughput", "memory", "quality")


# ============================================================================ settings
@dataclass(frozen=True)
class Settings:
    dim: int = 10  # funnel dimension (timing, throughput, memory, ESS)
    layers: int = 4
    hidden: tuple[int, ...] = (64, 64)
    bins: int = 8
    bound: float = 5.0  # spline box [-bound, bound] in every library
    lr: float = 1e-3
    batches: tuple[int, ...] = (512, 4096)  # timing batch sizes
    device: str = "cpu"  # where every model, target and batch lives
    warmup: int = 20  # untimed steps per library before timing
    rounds: int = 10  # round-robin rounds
    block: int = 10  # timed steps per library per round
    steps: int = 2000  # training steps for the ESS comparison
    train_batch: int = 256
    eval_samples: int = 20000
    throughput_batches: tuple[int, ...] = (4096,)
    throughput_reps: int = 10
    memory_batch: int = 4096
    memory_steps: int = 3
    memory_repeats: int = 5  # fresh subprocesses per library, interleaved; the median is reported
    seed: int = 0
    log_prob: bool = True  # time log_prob (the inverse) and check it; --sample-only: not
    dynamic: bool | None = None  # torch.compile's `dynamic` for every compiled library (--dynamic)


# --quick: every code path, small sizes (smoke test only; the numbers mean nothing)
QUICK = dict(batches=(64, 512), warmup=1, rounds=2, block=2, steps=5, train_batch=64, eval_samples=1000,
             throughput_batches=(512,), throughput_reps=1, memory_batch=512, memory_steps=1, memory_repeats=1)


# ============================================================================ the flows
@dataclass
class Model:
    """One library's flow behind a common interface (all maps go ``z -> x``)."""

    name: str
    module: nn.Module  # owns every trainable parameter
    rsample_and_log_prob: Callable[[int], tuple[Tensor, Tensor]]  # n -> (x, log q(x)), one pass
    sample_map: Callable[[Tensor], Tensor]  # z (n, d) -> x (n, d), the sampling map T
    log_prob: Callable[[Tensor], Tensor]  # log q at arbitrary x (n, d): the inverse direction


def build_krflows(d: int, s: Settings) -> Model:
    flow = krflows.KRFlow(d, "spline", layers=s.layers, hidden=s.hidden, bins=s.bins, bound=s.bound)
    return Model("krflows", flow, lambda n: flow.rsample_and_log_prob((n,)), flow.forward, flow.log_prob)


def build_krflows_compiled(d: int, s: Settings) -> Model:
    """The same flow with ``KRFlow.compile()``: sampling and log_prob through torch.compile."""
    model = build_krflows(d, s)
    model.module.compile(dynamic=s.dynamic)
    return replace(model, name="krflows-compile")


def build_zuko_compiled(d: int, s: Settings, mode: str | None = None) -> Model:
    """zuko's flow with its training hot path wrapped in ``torch.compile`` (one line for a zuko
    user): the fair reference for krflows' compiled training step. Its ``log_prob`` (``d``
    fixed-point passes per layer) stays eager: compiling the unrolled passes took minutes.
    ``mode="reduce-overhead"``: ``zuko-compile-cg``, the reference for ``krflows-compile-cg``
    (CUDA graphs hide the host's launch time of both libraries)."""
    model = build_zuko(d, s)
    flow = model.module
    sample = torch.compile(lambda n: flow().rsample_and_log_prob((n,)), mode=mode, dynamic=s.dynamic)
    name = "zuko-compile-cg" if mode else "zuko-compile"
    return Model(name, flow, sample, model.sample_map, model.log_prob)


def build_zuko(d: int, s: Settings) -> Model:
    from functools import partial

    from zuko.distributions import DiagNormal
    from zuko.flows import MaskedAutoregressiveTransform
    from zuko.lazy import Flow, LazyInverse, UnconditionalDistribution
    from zuko.transforms import MonotonicRQSTransform

    # zuko's flows map x -> z and its MaskedAutoregressiveTransform is one pass in its
    # forward call: wrapping each layer in LazyInverse makes z -> x the one-pass direction.
    # The masks are built at construction from `order`; the same order for every layer.
    layers = [
        LazyInverse(MaskedAutoregressiveTransform(
            d, order=torch.arange(d),
            univariate=partial(MonotonicRQSTransform, bound=s.bound, slope=1e-3),
            shapes=[(s.bins,), (s.bins,), (s.bins - 1,)],
            hidden_features=tuple(s.hidden)))
        for _ in range(s.layers)]
    base = UnconditionalDistribution(DiagNormal, torch.zeros(d), torch.ones(d), buffer=True)
    flow = Flow(layers, base)
    return Model("zuko", flow,
                 lambda n: flow().rsample_and_log_prob((n,)),
                 lambda z: flow().transform.inv(z),
                 lambda x: flow().log_prob(x))


def build_nflows(d: int, s: Settings) -> Model:
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.transforms import CompositeTransform, InverseTransform
    from nflows.transforms.autoregressive import (
        MaskedPiecewiseRationalQuadraticAutoregressiveTransform as MaskedRQS,
    )

    if len(set(s.hidden)) != 1:
        raise ValueError(f"nflows' MADE needs equal hidden widths, got {s.hidden}")
    # nflows' transforms map x -> z; its MADE layer is one pass in `forward` and d passes in
    # `inverse`, and Flow samples through `inverse`. InverseTransform swaps them, so
    # sampling (z -> x) runs each MADE forward once. Fixed MADE degrees 1..d (no random
    # masks), no permutation layers, plain (non-residual) blocks: two hidden layers of 64.
    layers = [
        InverseTransform(MaskedRQS(
            d, hidden_features=s.hidden[0], num_bins=s.bins, tails="linear", tail_bound=s.bound,
            num_blocks=len(s.hidden) - 1, use_residual_blocks=False, random_mask=False))
        for _ in range(s.layers)]
    flow = Flow(CompositeTransform(layers), StandardNormal([d]))
    return Model("nflows", flow,
                 lambda n: flow.sample_and_log_prob(n),
                 lambda z: flow._transform.inverse(z)[0],
                 flow.log_prob)


def build_pyro(d: int, s: Settings) -> Model:
    import pyro.distributions as pdist
    from pyro.distributions.transforms import SplineAutoregressive
    from pyro.nn import AutoRegressiveNN

    # Pyro's SplineAutoregressive is IAF style: its forward (z -> x) is one pass, its inverse
    # d passes. AutoRegressiveNN draws a random variable order unless `permutation` is given:
    # the identity for every layer. order="quadratic" is the rational-quadratic spline
    # (param_dims: widths, heights, interior derivatives); identity outside the box.
    transforms = [
        SplineAutoregressive(
            d, AutoRegressiveNN(d, list(s.hidden), param_dims=[s.bins, s.bins, s.bins - 1],
                                permutation=torch.arange(d)),
            count_bins=s.bins, bound=s.bound, order="quadratic")
        for _ in range(s.layers)]
    module = nn.ModuleList(transforms)
    base = pdist.Normal(torch.zeros(d), torch.ones(d)).to_event(1)
    dist = pdist.TransformedDistribution(base, transforms)

    def rsample_and_log_prob(n: int) -> tuple[Tensor, Tensor]:
        # The transforms cache (cache_size=1) the last z -> x pass and its log-determinant:
        # log_prob of the value just sampled reuses them, no inverse is run.
        x = dist.rsample((n,))
        return x, dist.log_prob(x)

    def sample_map(z: Tensor) -> Tensor:
        for t in transforms:
            z = t(z)
        return z

    return Model("pyro", module, rsample_and_log_prob, sample_map, dist.log_prob)


BUILDERS: dict[str, Callable[[int, Settings], Model]] = {
    "krflows": build_krflows, "krflows-compile": build_krflows_compiled, "zuko": build_zuko,
    "zuko-compile": build_zuko_compiled, "nflows": build_nflows, "pyro": build_pyro}

CONSTRUCTION = {
    "krflows": "`KRFlow(d, 'spline', layers=4, hidden=(64, 64), bins=8, bound=5)`: "
               "`rsample_and_log_prob` (T direction, one pass); spline + per-coordinate affine per "
               "layer, learned boundary slopes (linear tails), final lower-triangular affine stage",
    "krflows-compile": "the krflows flow above after `flow.compile()` (torch.compile of "
                       "`rsample_and_log_prob` and `log_prob`, default inductor backend)",
    "zuko-compile": "the zuko flow above with `torch.compile(lambda n: flow().rsample_and_log_prob((n,)))`; "
                    "`log_prob` eager",
    "zuko": "`Flow([LazyInverse(MaskedAutoregressiveTransform(d, order=arange(d), "
            "univariate=MonotonicRQSTransform(bound=5), hidden_features=(64, 64)))] * 4)`: "
            "`flow().rsample_and_log_prob` (inverse of each x -> z layer = its one-pass forward); "
            "identity outside the box",
    "nflows": "`Flow(CompositeTransform([InverseTransform(MaskedPiecewiseRationalQuadratic"
              "AutoregressiveTransform(d, 64, num_bins=8, tails='linear', tail_bound=5, num_blocks=1, "
              "use_residual_blocks=False))] * 4), StandardNormal)`: `sample_and_log_prob` (MADE forward "
              "once per layer); no permutation layers",
    "pyro": "`TransformedDistribution(Normal, [SplineAutoregressive(d, AutoRegressiveNN(d, [64, 64], "
            "param_dims=[8, 8, 7], permutation=arange(d)), bound=5, order='quadratic')] * 4)`: `rsample` "
            "then `log_prob` of that value (served from the transforms' cache, cache_size=1); "
            "identity outside the box",
}


def build_krflows_cudagraphs(d: int, s: Settings) -> Model:
    """``flow.compile(mode="reduce-overhead")``: inductor plus CUDA graphs (CUDA only)."""
    model = build_krflows(d, s)
    model.module.compile(mode="reduce-overhead", dynamic=s.dynamic)
    return replace(model, name="krflows-compile-cg")


def _unfolded(flow: krflows.KRFlow) -> None:
    """The spline does not fold the conditioners' output bias and soft clamp into its kernels
    (``Spline.folds`` off: they run as the conditioner's own operations, as before the fold)."""
    flow.family.folds = lambda z: False


def _whole(flow: krflows.KRFlow) -> None:
    """Every call over its whole batch: no chunks of ``KRFlow._chunk``'s size without autograd."""
    flow._chunk = lambda x, direction: None


def _blocked(flow: krflows.KRFlow) -> None:
    """The masked layers take their block products on every device (``MaskedLinear.blocked_anywhere``;
    the CPU takes them anyway), from ``block_rows`` rows: B >= 7767 for the output layers, 32768 for
    the second hidden layers."""
    for m in flow.modules():
        if isinstance(m, krflows.nn.MaskedLinear):
            m.blocked_anywhere = True


def build_krflows_variant(d: int, s: Settings, name: str, change: Callable[[krflows.KRFlow], None],
                          compiled: bool) -> Model:
    """The krflows flow with one of its optimizations changed (``change``), compiled or not: an A/B
    of that optimization in one process (``AB_ONLY``: timed only when named in ``--libs``)."""
    model = build_krflows(d, s)
    change(model.module)
    if compiled:
        model.module.compile(dynamic=s.dynamic)
    return replace(model, name=name)


for _name, _change, _compiled, _what in (
        ("krflows-unfolded", _unfolded, False,
         "the krflows flow with `flow.family.folds = lambda z: False`: the conditioners' output bias and "
         "clamp as their own operations"),
        ("krflows-whole", _whole, False,
         "the krflows flow with `flow._chunk = lambda x, direction: None`: batches without autograd "
         "in one call, not in chunks of a cache's size"),
        ("krflows-compile-unfolded", _unfolded, True, "`krflows-unfolded` after `flow.compile()`"),
        ("krflows-compile-blocked", _blocked, True,
         "`krflows-compile` with every `MaskedLinear.blocked_anywhere = True`: block products of the "
         "masked layers on every device")):
    BUILDERS[_name] = partial(build_krflows_variant, name=_name, change=_change, compiled=_compiled)
    CONSTRUCTION[_name] = _what
BUILDERS["krflows-compile-cg"] = build_krflows_cudagraphs
BUILDERS["zuko-compile-cg"] = partial(build_zuko_compiled, mode="reduce-overhead")
CONSTRUCTION["krflows-compile-cg"] = ("the krflows flow after `flow.compile(mode='reduce-overhead')` "
                                      "(inductor and CUDA graphs; CUDA only)")
CONSTRUCTION["zuko-compile-cg"] = ("the zuko flow above with `torch.compile(lambda n: "
                                   "flow().rsample_and_log_prob((n,)), mode='reduce-overhead')` "
                                   "(inductor and CUDA graphs; CUDA only)")


def build(name: str, d: int, s: Settings, seed: int) -> Model:
    """Library ``name``'s flow, seeded, built directly on ``s.device``."""
    torch.manual_seed(seed)
    with torch.device(s.device):  # tensors a builder creates outside modules (Pyro's base) too
        model = BUILDERS[name](d, s)
    model.module.to(s.device)
    return model


class FloorTrainer:
    r"""The **conditioner-MLP floor**: krflows' own conditioners (the ``layers`` masked MLPs of
    ``KRFlow(d, "spline", ...)``, :class:`krflows.nn.MaskedMLP`, same shapes and products)
    with no spline, doing what a training step does around them: draw ``z``, run the layers in
    sequence (``h <- h + sum_p params(h)[..., p]``, so each layer's input depends on the one
    before, as in the flow), backward, one Adam step. A step of any flow with these
    conditioners costs at least this much. With ``compiled``, the layers and the loss run
    through ``torch.compile`` (``FLOOR_COMPILED``): the floor of ``krflows-compile``, whose
    compiler fuses the conditioners' bias, activation and clamp into few loops (eager code runs
    each as its own kernel), so compare compiled code with this one.
    """

    def __init__(self, s: Settings, batch: int, compiled: bool = False):
        flow = build("krflows", s.dim, s, s.seed)
        self.nets = flow.module.conditioners
        self.batch, self.dim, self.device = batch, s.dim, torch.device(s.device)
        self.opt = torch.optim.Adam(self.nets.parameters(), lr=s.lr)
        self.nonfinite = 0
        self.loss = torch.compile(self._loss, dynamic=s.dynamic) if compiled else self._loss

    def _loss(self, h: Tensor) -> Tensor:
        for net in self.nets:
            h = h + net(h).sum(-1)
        return h.square().mean()

    def step(self) -> None:
        loss = self.loss(torch.randn(self.batch, self.dim, device=self.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def cudagraph_step(model: Model) -> None:
    """Tells CUDA-graph trees that a new iteration begins (``krflows-compile-cg`` only): the
    outputs of the previous replay may then be overwritten."""
    if model.name.endswith("-cg"):
        torch.compiler.cudagraph_mark_step_begin()


def synchronize(s: Settings) -> None:
    """Waits for the device's queued kernels (CUDA runs asynchronously): call around timed regions."""
    if torch.device(s.device).type == "cuda":
        torch.cuda.synchronize()


def n_params(model: Model) -> int:
    return sum(p.numel() for p in model.module.parameters() if p.requires_grad)


# ============================================================================ checks
@dataclass
class Check:
    ok: bool
    upper: float = math.nan  # max |dT_i/dz_j|, j > i (must be 0)
    lower: float = math.nan  # max |dT_i/dz_j|, j < i (nonzero: the check is not trivial)
    min_diag: float = math.nan  # min dT_i/dz_i (must be > 0)
    log_prob_err: float = math.nan  # max |log_prob(x) - log q(x) from the sampling pass|
    error: str = ""


def check_triangular(name: str, s: Settings, seed: int) -> Check:
    """Autograd Jacobian of the sampling map at one point, with perturbed parameters."""
    d = s.dim
    try:
        model = build(name, d, s, seed)
        with torch.no_grad():  # move off the (often exactly diagonal) initialisation
            for p in model.module.parameters():
                p.add_(0.1 * torch.randn_like(p))
        z = torch.randn(d, device=s.device)
        jac = torch.autograd.functional.jacobian(lambda v: model.sample_map(v[None])[0], z)
        scale = float(jac.abs().max())
        upper, lower = float(jac.triu(1).abs().max()), float(jac.tril(-1).abs().max())
        min_diag = float(jac.diagonal().min())
        err = math.nan
        if s.log_prob:
            with torch.no_grad():
                x, log_q = model.rsample_and_log_prob(256)
                err = float((model.log_prob(x.clone()) - log_q).abs().max())
    except Exception as exc:  # noqa: BLE001 - a peer that cannot be built is reported, not fatal
        return Check(False, error=f"{type(exc).__name__}: {exc}")
    ok = upper <= 1e-6 * scale and min_diag > 0 and lower > 0 and math.isfinite(scale)
    why = "" if ok else "Jacobian not lower triangular with positive diagonal"
    return Check(ok, upper, lower, min_diag, err, why)


# ============================================================================ training
@dataclass
class Trainer:
    model: Model
    target: krflows.targets.Target
    batch: int
    lr: float
    guard: bool  # mask non-finite terms and skip steps with non-finite gradients
    opt: torch.optim.Optimizer = field(init=False)
    nonfinite: int = 0  # steps whose loss (or, with guard, gradient) was not finite
    steps: int = 0

    def __post_init__(self):
        self.opt = torch.optim.Adam(self.model.module.parameters(), lr=self.lr)

    def step(self) -> None:
        """One Adam step on the reverse KL ``mean(log q(x) - log p(x))``, ``x = T(z)``."""
        cudagraph_step(self.model)
        x, log_q = self.model.rsample_and_log_prob(self.batch)
        diff = log_q - self.target(x)
        if self.guard:
            ok = torch.isfinite(diff)
            loss = torch.where(ok, diff, 0.0).sum() / ok.sum().clamp(min=1)
        else:
            loss = diff.mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.steps += 1
        if self.guard:
            grads = [p.grad for p in self.model.module.parameters() if p.grad is not None]
            if not bool(torch.isfinite(torch.stack([g.sum() for g in grads])).all()):
                self.nonfinite += 1
                return
        elif not math.isfinite(float(loss.detach())):
            self.nonfinite += 1
        self.opt.step()


def _trainer(name: str, s: Settings, target, batch: int) -> Trainer:
    return Trainer(build(name, s.dim, s, s.seed), target, batch, s.lr, guard=False)


def _warmed_up(name: str, make: Callable[[], object], s: Settings, log):
    """A trainer after its untimed warm-up steps, or None (logged) if building or stepping raised."""
    try:
        t = make()
        for _ in range(s.warmup):
            t.step()
        synchronize(s)
        return t
    except Exception as exc:  # noqa: BLE001 - one library failing (e.g. CUDA graphs) must not end the run
        log(f"  {name} raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
            f"not timed")
        return None


def time_training(libs: list[str], s: Settings, log) -> dict[tuple[str, int], float]:
    """Median ms per Adam step, libraries and the conditioner-MLP floor (``FLOOR``) interleaved
    round-robin in blocks of steps; each step is timed between device synchronizations."""
    out: dict[tuple[str, int], float] = {}
    for batch in s.batches:
        target = krflows.targets.Funnel(s.dim, device=s.device)
        makers = {name: partial(_trainer, name, s, target, batch) for name in libs}
        makers[FLOOR] = partial(FloorTrainer, s, batch)
        if any(n.startswith("krflows-compile") for n in libs):
            makers[FLOOR_COMPILED] = partial(FloorTrainer, s, batch, compiled=True)
        trainers = {name: t for name, make in makers.items()
                    if (t := _warmed_up(name, make, s, log)) is not None}
        names = list(trainers)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(s.rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:  # rotate who goes first
                t = trainers[name]
                for _ in range(s.block):
                    synchronize(s)
                    start = time.perf_counter()
                    t.step()
                    synchronize(s)
                    times[name].append(time.perf_counter() - start)
        for name in names:
            out[name, batch] = 1e3 * statistics.median(times[name])
            if trainers[name].nonfinite:
                log(f"  warning: {name} had {trainers[name].nonfinite} non-finite losses at B={batch}")
        log(f"  B={batch}: " + ", ".join(f"{n} {out[n, batch]:.2f} ms" for n in names))
    return out


def time_throughput(libs: list[str], s: Settings, log) -> dict[tuple[str, str, int], float]:
    """Samples per second of sampling (x and log q, one pass) and of log_prob at fresh points,
    at each of ``s.throughput_batches``; keys ``(library, "sample" | "log_prob", batch)``
    (sampling only where ``s.log_prob`` is false)."""
    out: dict[tuple[str, str, int], float] = {}
    kinds = ("sample", "log_prob") if s.log_prob else ("sample",)
    models = {name: build(name, s.dim, s, s.seed) for name in libs}
    for n in s.throughput_batches:
        with torch.no_grad():
            points = {}
            for name in libs:
                cudagraph_step(models[name])
                points[name] = models[name].rsample_and_log_prob(n)[0].clone()
            times: dict[tuple[str, str], list[float]] = {(name, k): [] for name in libs for k in kinds}
            for r in range(s.throughput_reps + 1):  # the first repetition is a warm-up
                k = r % len(libs)
                for name in libs[k:] + libs[:k]:
                    m = models[name]
                    synchronize(s)
                    start = time.perf_counter()
                    cudagraph_step(m)
                    m.rsample_and_log_prob(n)
                    synchronize(s)
                    mid = time.perf_counter()
                    if r:
                        times[name, "sample"].append(mid - start)
                    if s.log_prob:
                        cudagraph_step(m)
                        m.log_prob(points[name].clone())  # a new tensor: no cached inverse to reuse
                        synchronize(s)
                        if r:
                            times[name, "log_prob"].append(time.perf_counter() - mid)
        for (name, kind), v in times.items():
            out[name, kind, n] = n / statistics.median(v)
        log(f"  B={n}: " + ", ".join(f"{name} {out[name, 'sample', n]:.3g}/"
                                     f"{out.get((name, 'log_prob', n), math.nan):.3g}"
                                     for name in libs) + " samples/s (sample/log_prob)")
    return out


# ============================================================================ memory
def _status_mib(key: str) -> float:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def memory_probe(name: str, s: Settings) -> dict:
    """Run in a fresh subprocess: peak RSS increase over ``memory_steps`` training steps.

    ``ru_maxrss`` is useless here (Linux carries it over from the parent through fork and
    exec); ``VmHWM`` is the high-water mark of this process's own memory map, and writing
    5 to /proc/self/clear_refs resets it to the current RSS just before the steps.
    """
    target = krflows.targets.Funnel(s.dim, device=s.device)
    trainer = Trainer(build(name, s.dim, s, s.seed), target, s.memory_batch, s.lr, guard=False)
    trainer.step()  # untimed warm-up: Adam's state and (compiled libraries) the compilation
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    before = _status_mib("VmRSS")
    hwm_before = _status_mib("VmHWM")
    for _ in range(s.memory_steps):
        trainer.step()
    peak = _status_mib("VmHWM")
    return {"rss_before_mib": before, "peak_mib": peak, "delta_mib": peak - before,
            "lower_bound": not reset and peak <= hwm_before}


def saved_for_backward_mib(model: Model, target, batch: int) -> float:
    """MiB of the distinct tensor storages a training step saves for its backward pass (the
    activation memory, which grows with the batch): deterministic, unlike RSS peaks."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x, log_q = model.rsample_and_log_prob(batch)
        loss = (log_q - target(x)).mean()
    loss.backward()
    model.module.zero_grad(set_to_none=True)
    return sum(storages.values()) / 2 ** 20


def measure_saved(libs: list[str], s: Settings, log) -> dict[str, float]:
    target = krflows.targets.Funnel(s.dim, device=s.device)
    out = {name: saved_for_backward_mib(build(name, s.dim, s, s.seed), target, s.memory_batch)
           for name in libs}
    log("  saved for backward: " + ", ".join(f"{n} {v:.1f} MiB" for n, v in out.items()))
    return out


def measure_memory(libs: list[str], s: Settings, threads: int, log) -> dict[str, float]:
    """Median over ``s.memory_repeats`` interleaved fresh subprocesses per library (RSS-based
    peaks move by several MiB from run to run with the allocator's caching)."""
    out: dict[str, float] = {}
    if not Path("/proc/self/status").exists():
        log("  skipped: needs Linux /proc")
        return out
    if torch.device(s.device).type != "cpu":
        log(f"  skipped: the resident set is host memory, the models live on {s.device}")
        return out
    deltas: dict[str, list[float]] = {name: [] for name in libs}
    for _ in range(s.memory_repeats):
        for name in libs:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", name,
                   "--threads", str(threads), "--memory-steps", str(s.memory_steps),
                   "--memory-batch", str(s.memory_batch), "--seed", str(s.seed)]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
                probe = json.loads(res.stdout.strip().splitlines()[-1])
            except (subprocess.SubprocessError, ValueError, IndexError) as exc:
                log(f"  {name}: probe failed ({type(exc).__name__})")
                continue
            if probe["lower_bound"]:
                log(f"  {name}: high-water mark not reset and unchanged (a lower bound)")
            deltas[name].append(probe["delta_mib"])
    for name, values in deltas.items():
        if values:
            out[name] = statistics.median(values)
            log(f"  {name}: +{out[name]:.1f} MiB (median of {', '.join(f'{v:.1f}' for v in values)})")
    return out


# ============================================================================ quality
@dataclass
class Quality:
    ess: float
    bad: int  # samples whose log weight was not finite (counted as weight 0)
    mode_mass: tuple[float, ...] | None = None
    skipped: int = 0  # training steps skipped for non-finite gradients
    error: str = ""  # set when training or evaluation raised


@torch.no_grad()
def evaluate(model: Model, target, n: int, modes: bool) -> Quality:
    xs, log_ws = [], []
    for chunk in range(0, n, 10000):
        x, log_q = model.rsample_and_log_prob(min(10000, n - chunk))
        xs.append(x)
        log_ws.append(target(x) - log_q)
    x, log_w = torch.cat(xs), torch.cat(log_ws)
    good = torch.isfinite(log_w)
    value = float(ess(torch.where(good, log_w, -math.inf))) if bool(good.any()) else math.nan
    mass = None
    if modes:
        ok = torch.isfinite(x).all(-1)
        k = target.assign(x[ok])
        mass = tuple(float((k == i).sum()) / max(1, int(ok.sum())) for i in range(len(target.weights)))
    return Quality(value, int((~good).sum()), mass)


def make_targets(s: Settings) -> dict[str, krflows.targets.Target]:
    targets = {
        f"funnel-{s.dim}": krflows.targets.Funnel(s.dim),
        "banana": krflows.targets.Banana(),
        "bimodal": krflows.targets.Bimodal2D(separation=8, weights=BIMODAL_WEIGHTS),
        "four-mode": krflows.targets.GaussianMixture(FOUR_MODE_MEANS, weights=FOUR_MODE_WEIGHTS),
    }
    return {name: t.to(device=s.device) for name, t in targets.items()}


def _train_one(name: str, target, s: Settings, modes: bool) -> Quality:
    if name == "krflows fit()":
        torch.manual_seed(s.seed)
        flow = krflows.KRFlow(target.dim).to(s.device)
        history = krflows.fit(flow, target, steps=s.steps, batch_size=s.train_batch)
        model = Model(name, flow, lambda n: flow.rsample_and_log_prob((n,)), flow.forward, flow.log_prob)
        q = evaluate(model, target, s.eval_samples, modes)
        q.skipped = int(history["skipped_steps"][0])
        return q
    trainer = Trainer(build(name, target.dim, s, s.seed), target, s.train_batch, s.lr, guard=True)
    for _ in range(s.steps):
        trainer.step()
    q = evaluate(trainer.model, target, s.eval_samples, modes)
    q.skipped = trainer.nonfinite
    return q


def train_quality(libs: list[str], s: Settings, log, targets: list[str] | None = None
                  ) -> dict[tuple[str, str], Quality]:
    """ESS/N (and mode masses) after ``s.steps`` plain Adam steps; krflows also with ``fit``
    (its defaults: since issue 11 the mode-covering start, ``modes="search"``)."""
    out: dict[tuple[str, str], Quality] = {}
    for tname, target in make_targets(s).items():
        if targets is not None and tname not in targets:
            continue
        modes = tname in MULTIMODAL
        eager = [n for n in libs if n not in COMPILED]  # compiled = same numerics: not retrained
        for name in eager + (["krflows fit()"] if "krflows" in libs else []):
            try:
                out[name, tname] = _train_one(name, target, s, modes)
            except Exception as exc:  # noqa: BLE001 - one library failing must not end the run
                log(f"  {name} on {tname} raised {type(exc).__name__}: {exc}")
                out[name, tname] = Quality(math.nan, 0, error=type(exc).__name__)
        log(f"  {tname}: " + ", ".join(f"{n} {q.ess:.3f}" for (n, t), q in out.items() if t == tname))
    return out


# ============================================================================ report
def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if abs(v) >= 1e4:
        return f"{v:.3g}"
    return f"{v:.{digits}g}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return "—"
    return f"{a / b:.2f}"


def machine_info(threads: int, device: str = "cpu") -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    try:
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "?"
    return {"CPU": cpu, "cores": f"{cores} logical ({usable} usable by this process)",
            "torch threads": f"{threads} intra-op (torch.get_num_threads() = {torch.get_num_threads()})",
            "load average (1/5/15 min) at start": load,
            "OS": platform.platform(),
            "krflows' eager CPU spline": krflows.transforms._native.status(),
            "C allocator": allocator_info(), **gpu_info(device)}


def allocator_info() -> str:
    """The allocator policy every library of the run trains under (one process, one policy)."""
    if krflows.train.keep_freed_memory():
        return ("glibc, freed memory kept in the process (krflows.train.keep_freed_memory, which "
                "krflows.fit sets; for every library of the run; KRFLOWS_MALLOC=system: glibc's own)")
    return "the system's policy (krflows.train.keep_freed_memory not in effect)"


def gpu_info(device: str) -> dict[str, str]:
    """The CUDA card's name, memory and driver-side versions (empty on the CPU)."""
    if torch.device(device).type != "cuda":
        return {"device": "cpu"}
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"device": f"cuda: {props.name}, {props.total_memory / 2 ** 30:.0f} GiB, "
                      f"{props.multi_processor_count} SMs, compute capability {props.major}.{props.minor}",
            "CUDA (torch build)": str(torch.version.cuda),
            "krflows' CUDA spline": krflows.transforms._native.gpu_status(),
            "TF32 matmul": str(torch.backends.cuda.matmul.allow_tf32)}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "triton", "zuko", "nflows", "pyro-ppl", "krflows"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def results_table(libs: list[str], s: Settings, params, timing, throughput, memory, quality,
                  saved: dict[str, float] | None = None) -> str:
    has_fit = any(name == "krflows fit()" for name, _ in quality)
    cols = [n for n in LIBRARIES if n in libs]
    if has_fit:
        cols.insert(cols.index("krflows") + 1, "krflows fit()")
    ratio_cols = [(a, b) for a, b in RATIOS if a in libs and b in libs]
    head = ["metric", *cols, *(f"{a}/{b}" for a, b in ratio_cols)]
    rows = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]

    def row(label: str, values: dict[str, float | None], text: dict[str, str] | None = None,
            ratios: bool = True) -> None:
        text = text or {}
        cells = [text.get(c, _fmt(values.get(c))) for c in cols]
        rcells = [_ratio(values.get(a), values.get(b)) if ratios else "—" for a, b in ratio_cols]
        rows.append("| " + " | ".join([label, *cells, *rcells]) + " |")

    row("trainable parameters", {n: float(v) for n, v in params.items()},
        {n: str(v) for n, v in params.items()})
    if timing:
        for b in s.batches:
            row(f"train step, B={b}, ms (median; lower is better)", {n: timing.get((n, b)) for n in libs})
    if throughput:
        for tb in s.throughput_batches:
            row(f"sample + log q, B={tb}, samples/s", {n: throughput.get((n, "sample", tb)) for n in libs})
            if s.log_prob:
                row(f"log_prob at fresh x, B={tb}, samples/s",
                    {n: throughput.get((n, "log_prob", tb)) for n in libs})
    if saved:
        row(f"saved for backward in a train step, B={s.memory_batch}, MiB", {n: saved.get(n) for n in libs})
    if memory:
        row(f"peak RSS increase of a train step, B={s.memory_batch}, MiB (median of "
            f"{s.memory_repeats})", {n: memory.get(n) for n in libs})
    names = [t for t in make_targets(s) if any(tt == t for _, tt in quality)]
    for tname in names:
        vals = {n: quality[n, tname].ess for n, t in quality if t == tname}
        text = {}
        for n, t in quality:
            q = quality[n, t]
            if t == tname and q.error:
                text[n] = f"error: {q.error}"
            elif t == tname and (q.bad or q.skipped):
                text[n] = _fmt(q.ess) + f" ({q.bad} bad, {q.skipped} skipped)"
        row(f"ESS/N on {tname} after {s.steps} steps at B={s.train_batch}", vals, text)
    targets = make_targets(s)
    for tname in (t for t in MULTIMODAL if t in names):
        mass = {n: quality[n, tname].mode_mass for n, t in quality if t == tname}
        truth = [float(w) for w in targets[tname].weights]
        modes = "/".join(str(i) for i in range(len(truth)))
        row(f"{tname}: mass on mode {modes} (truth {'/'.join(f'{w:.2f}' for w in truth)})", {},
            {n: "/".join(f"{v:.3f}" for v in m) if m else "—" for n, m in mass.items()}, ratios=False)
        row(f"{tname}: total variation of the mode masses", {},
            {n: f"{0.5 * sum(abs(v - w) for v, w in zip(m, truth, strict=True)):.3f}" if m else "—"
             for n, m in mass.items()}, ratios=False)
    return "\n".join(rows)


def floor_table(libs: list[str], s: Settings, timing: dict[tuple[str, int], float]) -> str:
    """The conditioner-MLP floors against krflows' step times, at each timing batch size: eager
    krflows over the eager floor, compiled krflows over the compiled floor (like with like)."""
    flows = [n for n in ("krflows", "krflows-compile", "krflows-compile-cg") if n in libs]
    floors = [FLOOR] + [FLOOR_COMPILED] * any(n != "krflows" for n in flows)
    head = ["B", *(f"{f} ms" for f in floors), *(c for n in flows for c in (f"{n} ms", f"{n} / floor"))]
    rows = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for b in s.batches:
        cells = [str(b), *(_fmt(timing.get((f, b))) for f in floors)]
        for n in flows:
            floor = timing.get((FLOOR if n == "krflows" else FLOOR_COMPILED, b))
            cells += [_fmt(timing.get((n, b))), _ratio(timing.get((n, b)), floor)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def checks_table(checks: dict[str, Check]) -> str:
    rows = ["| library | construction (sampling direction z -> x, identity order) | max abs dT_i/dz_j, j>i "
            "| max abs dT_i/dz_j, j<i | min dT_i/dz_i | max abs(log_prob - log q) | check |",
            "|---|---|---|---|---|---|---|"]
    for name, c in checks.items():
        status = "pass" if c.ok else f"**FAIL** ({c.error}): not measured"
        rows.append(f"| {name} | {CONSTRUCTION[name]} | {c.upper:.2g} | {c.lower:.2g} | {c.min_diag:.3g} "
                    f"| {c.log_prob_err:.2g} | {status} |")
    return "\n".join(rows)


# ============================================================================ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny settings for smoke tests (numbers are meaningless)")
    p.add_argument("--steps", type=int,
                   help="training steps for the ESS comparison (default 2000; 5 with --quick)")
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads (default 2; 1 with --quick, which a loaded CI machine "
                        "runs much faster than 2 threads fighting over its cores)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md",
                   help="markdown file to (over)write (default benchmarks/RESULTS.md)")
    p.add_argument("--libs", help=f"comma-separated subset of {','.join(LIBRARIES)} (default: all but "
                                  f"the A/B ones, {','.join(AB_ONLY)}, and off CUDA the CUDA-graph ones; "
                                  f"with --quick also not the compiled ones: {','.join(COMPILED)})")
    p.add_argument("--no-memory", action="store_true", help="skip the per-library memory subprocesses")
    p.add_argument("--seed", type=int, default=0, help="seed of every initialisation and training run")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="run only these sections (default: all); e.g. `--only quality` on a loaded "
                        "machine, where the timing sections would mean nothing. The triangularity "
                        "checks always run (a library failing them is not measured)")
    p.add_argument("--targets", nargs="+", choices=("funnel", "banana", "bimodal", "four-mode"),
                   help="quality section: only these targets (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where models, targets and batches live (default cpu); timed regions are "
                        "bracketed by torch.cuda.synchronize() on cuda")
    p.add_argument("--batches", type=int, nargs="+", metavar="B",
                   help="batch sizes of the timing and throughput sections (default: timing 512 4096, "
                        "throughput 4096; --quick: 64 512 and 512)")
    p.add_argument("--sample-only", action="store_true",
                   help="no log_prob (the inverse) in the checks and the throughput section: compiling "
                        "it costs minutes on a cold machine (gpu_check.sh's compiled run)")
    p.add_argument("--dynamic", action="store_true",
                   help="torch.compile every compiled library with dynamic=True: one compilation "
                        "for all batch sizes instead of one static and one dynamic (gpu_check.sh)")
    p.add_argument("--memory-probe", metavar="LIB", help=argparse.SUPPRESS)
    p.add_argument("--memory-steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--memory-batch", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to torch")
    s = Settings(seed=args.seed, device=args.device, log_prob=not args.sample_only,
                 dynamic=True if args.dynamic else None)
    if args.quick:
        s = replace(s, **QUICK)
    if args.batches is not None:
        if min(args.batches) < 1:
            raise SystemExit(f"--batches must be positive batch sizes, got {args.batches}")
        s = replace(s, batches=tuple(args.batches), throughput_batches=tuple(args.batches))
    if args.steps is not None:
        s = replace(s, steps=args.steps)
    if args.memory_steps is not None:
        s = replace(s, memory_steps=args.memory_steps)
    if args.memory_batch is not None:
        s = replace(s, memory_batch=args.memory_batch)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, s)))
        return 0
    if args.libs is None:
        args.libs = ",".join(n for n in LIBRARIES if not (args.quick and n in COMPILED) and n not in AB_ONLY
                             and not (args.device != "cuda" and n in CUDA_ONLY))
    libs = [n.strip() for n in args.libs.split(",") if n.strip()]
    unknown = sorted(set(libs) - set(LIBRARIES))
    if unknown:
        raise SystemExit(f"unknown libraries {unknown}; choose from {LIBRARIES}")
    if args.device != "cuda" and set(libs) & set(CUDA_ONLY):
        raise SystemExit(f"{sorted(set(libs) & set(CUDA_ONLY))} need --device cuda (CUDA graphs)")

    started = time.perf_counter()

    def log(msg: str) -> None:  # elapsed seconds first: where a long run spends its time
        print(f"[{time.perf_counter() - started:6.1f} s] {msg}", file=sys.stderr, flush=True)

    info, vers = machine_info(args.threads, args.device), versions()  # (sets the allocator policy)
    log(f"triangularity of dT/dz (autograd, one point, d={s.dim}, perturbed parameters):")
    checks = {name: check_triangular(name, s, s.seed) for name in libs}
    for name, c in checks.items():
        log(f"  {name:8s} {'pass' if c.ok else 'FAIL'}  upper {c.upper:.2g}  lower {c.lower:.2g}  "
            f"min diag {c.min_diag:.3g}  |log_prob - log q| {c.log_prob_err:.2g}  {c.error}")
    libs = [name for name in libs if checks[name].ok]
    if not libs:
        raise SystemExit("no library passed the triangularity check")
    params = {name: n_params(build(name, s.dim, s, s.seed)) for name in libs}
    timing, throughput, saved, memory, quality = {}, {}, {}, {}, {}
    # throughput first: for compiled libraries it compiles only the no-grad graphs, so a run cut
    # short while compiling the training step (gpu_check.sh's time limits) has logged it already
    if "throughput" in args.only:
        log(f"throughput at B={', '.join(map(str, s.throughput_batches))}:")
        throughput = time_throughput(libs, s, log)
    if "timing" in args.only:
        log("timing train steps:")
        timing = time_training(libs, s, log)
    if "memory" in args.only:
        log(f"activation memory (tensors saved for backward, B={s.memory_batch}):")
        saved = measure_saved(libs, s, log)
        if not args.no_memory:
            log(f"memory (fresh subprocess per library, B={s.memory_batch}):")
            memory = measure_memory(libs, s, args.threads, log)
    if "quality" in args.only:
        log(f"training {s.steps} steps at B={s.train_batch} for ESS:")
        targets = None if args.targets is None else [f"funnel-{s.dim}" if t == "funnel" else t
                                                     for t in args.targets]
        quality = train_quality(libs, s, log, targets)

    table = results_table(libs, s, params, timing, throughput, memory, quality, saved)
    print(table)
    floor = floor_table(libs, s, timing) if timing else ""
    if floor:
        print("\n" + floor)
    command = "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# krflows training benchmark",
        "",
        f"Written by `benchmarks/bench_training.py` on {now} in {time.perf_counter() - started:.0f} s.",
        "",
        f"Command: `{command}`",
        "",
    ]
    if args.quick:
        lines += ["**`--quick` run: tiny settings for a smoke test; the numbers mean nothing.**", ""]
    lines += ["## Results", "", table, ""]
    if s.dynamic:
        lines += ["Compiled libraries: `torch.compile(..., dynamic=True)` (`--dynamic`), one "
                  "compilation for every batch size.", ""]
    if floor:
        lines += ["### Conditioner-MLP floor", "",
                  f"`{FLOOR}`: krflows' own conditioners alone ({s.layers} `krflows.nn.MaskedMLP`, "
                  f"hidden {s.hidden}, the shapes and products of the flow's layers), "
                  "no spline: draw z, run the layers in sequence (each layer's input depends on the "
                  "previous layer's output), backward, one Adam step; timed in the same interleaved "
                  "rounds as the libraries. No step of a flow with these conditioners can be faster. "
                  f"`{FLOOR_COMPILED}`: the same under `torch.compile`, the floor of the compiled "
                  "variants (each `/ floor` ratio divides by the floor of its own kind).",
                  "", floor, ""]
    lines += [
              "Ratios are krflows (the matched architecture, same plain Adam loop as the peers) over "
              "the peer, and krflows-compile over zuko (eager) and over zuko-compile (zuko's training "
              "call under `torch.compile`, the like-for-like comparison): below 1 is better for times "
              "and memory, above 1 for throughput and ESS. The compiled variants are not retrained for "
              "the ESS rows (same model and numerics). "
              "`krflows fit()` is `KRFlow(d)` trained by `krflows.fit(flow, target, steps, batch_size)` "
              "with its defaults (mode covering: tempered affine warm-up, mode search, with several "
              "modes a Laplace-mixture start and a decaying defensive forward-KL term; cosine schedule, "
              "gradient clipping). ESS/N is the normalized importance "
              f"ESS of {s.eval_samples} fresh samples; samples with a non-finite log weight count as "
              "weight 0 ('bad'); 'skipped' counts training steps with non-finite gradients (not applied).",
              "",
              f"Timing: funnel-{s.dim}, float32, Adam lr {s.lr}, loss mean(log q - log p) on "
              f"reparametrized samples; {s.warmup} untimed warm-up step(s) per library, then {s.rounds} "
              f"round-robin rounds of {s.block} steps per library (rotated start), median of the "
              f"{s.rounds * s.block} per-step times. Throughput: median of {s.throughput_reps} interleaved "
              "repetition(s) after one warm-up under `torch.no_grad()`; `log_prob` at fresh points runs "
              "the inverse (d sequential passes per layer). Memory: peak RSS (`VmHWM` of "
              f"/proc/self/status, reset through /proc/self/clear_refs) over {s.memory_steps} training "
              "step(s) minus `VmRSS` just before them, in a fresh subprocess per library (model, "
              "optimizer and target already built, one untimed step taken); it includes activations, "
              f"gradients and allocator slack; median of {s.memory_repeats} interleaved subprocesses "
              "(it moves by tens of MiB between identical runs: glibc reuses the pages freed by the "
              "untimed step). The deterministic measure is the row above it: the distinct tensor "
              "storages saved for backward during one step (`torch.autograd.graph."
              "saved_tensors_hooks`), the activation memory that grows with the batch.",
              "",
              "## Construction and triangularity check", "",
              f"Jacobian dT/dz of each sampling map by autograd at one point (d = {s.dim}), after adding "
              "0.1·N(0, 1) noise to every parameter (so that an identity initialisation cannot pass "
              "trivially); pass = strictly-upper part 0 (below 1e-6 of max), positive diagonal, nonzero "
              "lower part. The log_prob column compares `log_prob(x)` (inverse direction) with the "
              "one-pass `log q` on 256 samples of the perturbed flow"
              + (" (nan: not measured, `--sample-only`)." if not s.log_prob else "."),
              "",
              checks_table(checks), "",
              "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", "## Versions", ""] + [f"- {k}: {v}" for k, v in vers.items()] + [""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    log(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
