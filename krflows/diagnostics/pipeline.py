r""":func:`diagnose`: the bias report, assembled from stages that each return a small dataclass.

Stages, in order: flow samples and their log-weights (:func:`krflows.importance.log_weights`),
:func:`~krflows.diagnostics.weights.evidence`, target samples and
:func:`~krflows.diagnostics.weights.forward_evidence`,
:func:`~krflows.diagnostics.modes.mode_stats`, :func:`~krflows.diagnostics.distances.distances`,
:func:`~krflows.diagnostics.conditioning.conditioning`, expectations, then the verdict
(:func:`~krflows.diagnostics.report.problems`). Their fields are the report's keys.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from krflows._checks import check_int
from krflows.diagnostics.conditioning import conditioning
from krflows.diagnostics.distances import distances
from krflows.diagnostics.modes import mode_search, mode_stats
from krflows.diagnostics.report import Report, entries_doc, problems, verdict
from krflows.diagnostics.weights import (
    evidence,
    forward_evidence,
    mean_se,
    rounding_level,
    self_normalized,
    tails,
)
from krflows.flows import eagerly
from krflows.importance import check_nan_policy, log_weights
from krflows.targets import as_target

__all__ = ["diagnose"]


def diagnose(flow, target, n: int = 20000, reference: Tensor | None = None,
             functions: dict[str, Callable[[Tensor], Tensor]] | None = None,
             seed: int | None = None, *, n_exact: int | None = None, n_sub: int = 1000,
             n_inverse: int = 1000, valley_level: float = 0.01, max_modes: int = 256,
             nan: str = "error", modes="search", mode_options: dict | None = None) -> Report:
    r"""How biased is ``flow`` as an approximation of ``target``? The assembled bias report.

    Draws ``n`` samples :math:`x_i \sim q` of the flow (in one pass, keeping ``z`` and the
    per-coordinate slopes) and, when the target has an exact sampler or ``reference`` is given,
    ``n_exact`` samples :math:`y_j \sim p`, at which ``log q`` is evaluated through the inverse.
    Everything runs under :func:`torch.no_grad`, and a compiled flow eagerly (:meth:`KRFlow.eager
    <krflows.KRFlow.eager>`).

    Entries of the :class:`~krflows.diagnostics.Report`, where they apply (``K`` modes, ``d``
    dimensions; the table :data:`~krflows.diagnostics.report.LAYOUT` declares them):

{entries}

    The mode search (``modes="search"``, the default) needs neither reference samples nor a
    target that knows its modes: :func:`~krflows.find_modes` started from the flow's samples
    (and a box around them) finds the target's local maxima with Laplace masses, and
    :func:`~krflows.diagnostics.modes.missed_modes` lists those the flow gives (almost) no
    mass to, with the bias that implies for log Z. This is what sees a dropped mode of a real
    posterior, where ESS and :math:`\hat k` cannot.

    The verdict lists, most serious first: dropped samples; flow mass where :math:`\tilde p = 0`;
    modes the search found that the flow misses (with their mass and the implied log Z bias);
    missing modes of a target that knows them (and their mass); mode TV > 0.05 or a mode given
    less than half its share (known or reweighted); valley mass
    above twice the target's; forward ESS < 0.5 (saying so when the forward weights'
    :math:`\hat k` > 0.7 makes it unreliable); EUBO − ELBO above 10 nats beyond three
    standard errors, or target draws given a flow density below :math:`e^{-50}` of the target's
    (the flow's tails far too light there); target tails that decay like a power of the distance
    (:func:`~krflows.diagnostics.weights.tails`: the weights are unbounded whatever
    :math:`\hat k` says); :math:`\hat k` > 0.7
    (unreliable) or > 0.5; ESS < 0.05; both sample distances above 3x their floor; a large
    inverse residual. Else "no problems detected".

    Arguments:
        flow: a :class:`~krflows.KRFlow`.
        target: a target or a callable ``log_prob(x) -> (n,)`` (see :func:`~krflows.targets.as_target`).
        n: flow samples.
        reference: samples of the target ``(m, d)`` (e.g. a long MCMC run) used instead of
            the target's sampler.
        functions: ``{name: f}``, ``f`` mapping points ``(n, d)`` to ``(n,)``.
        seed: seeds all draws (the global RNG state is restored afterwards).
        n_exact: target samples to draw from ``target.sample`` (default ``n``); a
            ``reference`` set is used whole.
        n_sub: subsample size of the sample distances (``O(n_sub^2)``).
        n_inverse: points on which the inverse residual is measured.
        valley_level: density ratio of the valley (see :func:`valley_mask`).
        max_modes: skip the valley for targets with more modes.
        nan: what a NaN log density of the target means (:mod:`krflows.importance`):
            ``"error"`` (default) raises :class:`~krflows.objectives.NonFiniteTargetError`,
            ``"zero"`` reads it as zero density (counted in ``frac_zero_density``).
        modes: ``"search"`` (default: :func:`~krflows.find_modes` from the flow), a
            :class:`~krflows.correct.ModeSet` found earlier, or ``None`` (no mode search).
        mode_options: keyword arguments of :func:`~krflows.find_modes` (e.g. ``box``,
            ``starts``, ``n_starts``).

    Example:
        >>> from krflows import KRFlow, targets
        >>> flow = KRFlow(1, family="affine", layers=0)
        >>> report = diagnose(flow, targets.Gaussian(dim=1), n=2000, seed=0)
        >>> round(report["ess"], 6), report["verdict"]
        (1.0, 'no problems detected (ESS 1.00, forward ESS 1.00, k̂ -inf)')
    """
    check_nan_policy(nan)
    check_int("n", n, 2)
    target = as_target(target, dim=flow.dim)
    devices = [flow.device] if flow.device.type == "cuda" else []
    # a compiled flow runs eagerly here: each new batch shape would cost a compilation (minutes
    # for log_prob at d = 10) to save well under a second
    with torch.random.fork_rng(devices=devices, enabled=seed is not None), torch.no_grad(), eagerly(flow):
        if seed is not None:
            torch.manual_seed(seed)
        return _diagnose(flow, target, n, reference, functions or {}, seed, n_exact or n,
                         n_sub, n_inverse, valley_level, max_modes, nan, modes, mode_options)


diagnose.__doc__ = diagnose.__doc__.replace("{entries}", entries_doc())


@dataclass
class _Samples:
    """Points, their target log density and log-weights, and the report's counts of them."""

    x: Tensor
    log_p: Tensor
    log_w: Tensor
    tol: float  # the rounding level of the log-weights
    counts: dict


def _flow_samples(flow, target, n: int, nan: str) -> tuple[_Samples, Tensor, Tensor]:
    """``n`` flow samples (their usable part), with the reference points ``z`` and log-slopes."""
    z = flow.base.sample((n,))
    x, log_q, log_diag = flow.push(z)
    lw = log_weights(target, x, log_q, nan)
    keep = lw.valid
    if not bool(keep.any()):
        raise ValueError(f"no flow sample has a finite log-density under the target (n = {n})")
    log_p, log_q = lw.log_p[keep], log_q[keep]
    counts = {"n": int(keep.sum()), "n_dropped": int((~keep).sum()),
              "frac_zero_density": float((log_p == -math.inf).double().mean())}
    s = _Samples(x[keep], log_p, log_p.double() - log_q.double(), rounding_level(log_p, log_q), counts)
    return s, z[keep], log_diag[keep]


def _target_samples(flow, target, reference: Tensor | None, m: int, like: Tensor, nan: str
                    ) -> _Samples | None:
    """Target samples (``reference``, else the target's sampler) whose density is positive."""
    if reference is not None:
        if not isinstance(reference, Tensor) or reference.dim() != 2 or reference.shape[1] != target.dim:
            shape = tuple(reference.shape) if isinstance(reference, Tensor) else type(reference).__name__
            raise ValueError(f"reference must be a tensor of shape (m, {target.dim}), got {shape}")
        ref = reference.detach().to(like)
        y, source = ref[torch.randperm(ref.shape[0], device=ref.device)], "reference"
    elif getattr(target, "has_sampler", False):
        try:
            y, source = target.sample((m,)).to(like), "target.sample"
        except NotImplementedError:
            return None
    else:
        return None
    m = y.shape[0]
    y = y[torch.isfinite(y).all(-1)]  # the inverse accepts finite points only
    log_q = flow.log_prob(y)
    lw = log_weights(target, y, log_q, nan)
    keep = lw.valid & (lw.log_p > -math.inf)
    log_p, log_q = lw.log_p[keep], log_q[keep]
    counts = {"n_exact": int(keep.sum()), "n_dropped_exact": m - int(keep.sum()), "reference_source": source}
    return _Samples(y[keep], log_p, log_p.double() - log_q.double(), rounding_level(log_p, log_q), counts)


def _expectations(functions: dict[str, Callable[[Tensor], Tensor]], x: Tensor, log_w: Tensor,
                  y: Tensor | None) -> dict[str, dict[str, float]]:
    out = {}
    for name, f in functions.items():
        values = f(x)
        if not isinstance(values, Tensor) or values.shape != x.shape[:1]:
            got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(f"functions[{name!r}] must map (n, d) points to (n,), got {got}")
        est, se = self_normalized(values, log_w)
        flow_mean, flow_se = mean_se(values)
        row = {"is": float(est), "is_se": float(se), "flow": float(flow_mean), "flow_se": float(flow_se)}
        if y is not None:
            ex, ex_se = mean_se(f(y))
            row["exact"], row["exact_se"] = float(ex), float(ex_se)
        out[name] = row
    return out


def _fields(stage) -> dict:
    """A stage's entries: its dataclass fields that are not ``None``."""
    return {} if stage is None else {k: v for k, v in dataclasses.asdict(stage).items() if v is not None}


def _diagnose(flow, target, n, reference, functions, seed, n_exact, n_sub, n_inverse,
              valley_level, max_modes, nan, modes, mode_options) -> Report:
    start = time.perf_counter()
    fs, z, log_diag = _flow_samples(flow, target, n, nan)
    rev = evidence(fs.log_w, target.log_z, fs.tol)
    ts = _target_samples(flow, target, reference, n_exact, fs.x, nan)
    fwd = forward_evidence(ts.log_w, ts.tol, rev) if ts is not None and ts.x.shape[0] else None
    y = None if ts is None else ts.x
    log_p_y = None if ts is None else ts.log_p
    stages = [rev, fwd, mode_stats(target, fs.x, fs.log_p, y, log_p_y, valley_level, max_modes),
              None if y is None else distances(fs.x, y, n_sub, seed),
              conditioning(flow, target, fs.x, z, log_diag, y, n_inverse),
              mode_search(flow, target, fs.x, rev.log_z, modes, mode_options, fs.log_w),
              tails(target, fs.x, 0 if seed is None else seed)]
    e = {**fs.counts, **({} if ts is None else ts.counts)}
    for stage in stages:
        e.update(_fields(stage))
    if functions:
        e["expectations"] = _expectations(functions, fs.x, fs.log_w, y)
    scale = float(fs.x.double().std(0).mean()) if fs.x.shape[0] > 1 else 1.0
    e["problems"] = problems(e, scale)
    e["verdict"] = verdict(e, e["problems"])
    e["seconds"] = time.perf_counter() - start
    return Report(e, title=f"krflows diagnostics: {type(target).__name__}(dim={target.dim}), "
                           f"{type(flow).__name__}")
