r"""Training objectives for a flow ``q`` and an unnormalized target ``p``.

* Reverse KL, the negative ELBO: :math:`\mathbb E_q[\log q(x) - \beta \log p(x)]`, with
  reparametrized samples ``x = T(z)`` (one pass of the cheap direction). Mode seeking.
  ``path_gradient=True`` gives the "sticking the landing" estimator (Roeder et al. 2017):
  ``log q`` is evaluated with detached parameters, so only the path through ``x`` carries
  gradient; its variance vanishes as ``q -> p``. It costs one inverse (``d`` passes).
* Forward KL (maximum likelihood) from samples of ``p``: :math:`-\mathbb E_p[\log q(x)]`.
  Mass covering; needs samples (exact, MCMC, or a previous fit).

``beta`` tempers the target, :math:`p^\beta`: flatter for ``beta < 1``, so reverse KL
spreads over the modes before it sharpens (``fit``'s annealing schedule).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call

from krflows.importance import NonFiniteTargetError, evaluate_target, log_weights

__all__ = ["Batch", "NonFiniteTargetError", "NonDifferentiableTargetError", "TrainingDivergedError",
           "evaluate_target", "reverse_kl", "forward_kl", "support_elbo"]


class TrainingDivergedError(RuntimeError):
    """The optimizer moved the flow off the target's support (the flow, not the target, is at fault)."""


class NonDifferentiableTargetError(ValueError):
    """The target's log density carries no gradient to the flow's samples (reverse KL needs one)."""


@dataclass
class Batch:
    """One objective evaluation: the loss and what a training loop logs about it."""

    loss: Tensor
    log_w: Tensor  # (n,) log p - log q at the batch's samples, detached; -inf where dropped
    dropped: int  # samples whose log p was not finite (zero density, or NaN read as zero)
    n: int

    @property
    def elbo(self) -> Tensor:
        """The ELBO of the flow restricted to the target's support (:func:`support_elbo`)."""
        return support_elbo(self.log_w)


def support_elbo(log_w: Tensor) -> Tensor:
    r"""The ELBO of ``q_S``, the flow ``q`` restricted to the target's support ``S`` and
    renormalized, from log-weights ``log p - log q`` at samples of ``q`` (``-inf`` outside ``S``):
    :math:`\mathbb E_{q_S}[\log p - \log q] + \log P_q(S)`, the mean of the finite log-weights
    plus the log of their fraction. A lower bound on ``log Z`` like any ELBO (``q_S`` is a
    distribution; it is what importance weighting samples: weight 0 outside ``S``); the plain
    ELBO of ``q`` is ``-inf`` as soon as ``q`` has mass outside ``S``, which a flow onto
    ``R^d`` always has when the support is bounded. Equal to the mean where every weight is finite."""
    log_w = log_w.reshape(-1)
    finite = torch.isfinite(log_w)
    kept = int(finite.sum())
    if kept == log_w.numel():
        return log_w.mean()
    if kept == 0:
        return log_w.new_tensor(-math.inf)
    return log_w[finite].mean() + math.log(kept / log_w.numel())


def reverse_kl(flow, target, n: int, beta: float = 1.0, path_gradient: bool = False,
               nan: str = "error") -> Batch:
    r"""Monte-Carlo reverse KL (negative tempered ELBO) on ``n`` samples of the flow.

    Samples where ``log p`` is not finite (``-inf``: zero density) are dropped and counted,
    and the loss is the tempered negative ELBO of ``q_S``, the flow restricted to the target's
    support ``S`` (:func:`support_elbo`): the kept samples' mean of ``log q - beta log p`` plus
    ``-log P_q(S)``, estimated as ``-log(kept / n)`` with the score-function gradient
    :math:`\frac1{\text{kept}} \sum_{\text{dropped}} \nabla \log q(x_i)` (the points held
    fixed; one inverse pass over the dropped samples only). The kept samples' mean alone equals
    ``KL(q_S || p) + log P_q(S)`` up to ``log Z``: it falls as mass leaves ``S``, so dropping
    alone rewarded leaking. On a 3-D Gaussian cut at ``x_1 > 3`` (2.3% of its mass), plain
    dropping ended with 90% of the samples outside after 1000 steps of ``fit``; this loss with
    2.3% (the uncut law's: the loss is neutral about the mass outside once the shape inside is
    right) and the mean and sd of ``x_1`` inside within 0.02 of the truth.

    A NaN raises :class:`NonFiniteTargetError` unless ``nan="zero"`` reads it as zero density
    (:mod:`krflows.importance`). If no sample is left, an error is raised before any gradient
    is formed: :class:`TrainingDivergedError` if the flow is at fault (non-finite parameters or
    samples, or samples far beyond those at which this target was finite before: :func:`_flow_fault`), else
    :class:`NonFiniteTargetError`. A loss that is not finite although every kept ``log p`` is
    (``log q`` or the sum overflowed: the flow's scale exploded) raises
    :class:`TrainingDivergedError`. A ``log p`` that carries no gradient to ``x`` raises
    :class:`NonDifferentiableTargetError`.
    """
    if path_gradient:
        x = flow.rsample((n,))
        log_q = _log_prob_detached(flow, x)
    else:
        x, log_q = flow.rsample_and_log_prob((n,))
    try:
        weights = log_weights(target, x, log_q, nan)
    except NonFiniteTargetError as err:  # NaN under nan="error": the target's fault, or the flow's?
        why = _flow_fault(flow, target, x)
        if why is not None:
            raise _diverged(f"the target's log density was NaN and {why}", _scale(x)) from err
        raise
    ok = weights.finite
    kept = int(ok.sum())
    if kept == 0:
        raise _no_finite_value(flow, target, x)
    _remember_finite(flow, target, x)
    check_differentiable(weights.log_p, x)
    loss = (log_q[ok] - beta * weights.log_p[ok]).mean()
    if not bool(torch.isfinite(loss)):  # finite log p: log q or the sum overflowed, the flow's fault
        scale = float(x.detach().abs().amax())
        raise _diverged(f"the loss is not finite (log q - beta log p = {float(loss.detach()):.3g} "
                        f"over {kept} samples with a finite log p)", scale)
    log_w = weights.log_w.detach()
    if kept < n:
        loss = loss + _outside_mass(flow, x[~ok], kept, n)
        log_w = torch.where(ok, log_w, -math.inf)
    return Batch(loss, log_w, n - kept, n)


def _outside_mass(flow, x_out: Tensor, kept: int, n: int) -> Tensor | float:
    """``-log P_q(S)`` estimated from a batch of ``n`` flow samples of which ``x_out`` fell
    outside the target's support: the value ``-log(kept / n)``, and the gradient
    ``(1 / kept) sum grad log q(x_out)`` with the points held fixed (score function: the
    indicator of ``S`` has no useful pathwise gradient), from one inverse pass over them,
    eagerly (a compiled flow would compile its inverse under autograd for these few points)."""
    value = -math.log(kept / n)
    log_prob = getattr(flow, "log_prob", None)
    if log_prob is None or not torch.is_grad_enabled() or not any(p.requires_grad for p in flow.parameters()):
        return value
    x_out = x_out.detach()
    x_out = x_out[torch.isfinite(x_out).all(-1)]
    if not x_out.shape[0]:
        return value
    eager = getattr(flow, "eager", None)
    with eager() if eager is not None else contextlib.nullcontext():
        log_q = log_prob(x_out)
    log_q = log_q[torch.isfinite(log_q)]
    return value + (log_q - log_q.detach()).sum() / kept


# flow -> (weak reference to the last target that was finite on one of its batches, that batch's
# samples): kept as they are (no copy, no reduction: this runs at every training step, where a
# reduction would be a host synchronization on a GPU); their scale is read only on a failure
_FINITE_ONCE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# a batch reaching more than this many times the largest |x| at which the target was finite
# before is the flow's doing (an optimizer step that blew it up), not the target's
_BLOWN_UP = 4.0


def _remember_finite(flow, target, x: Tensor | None = None) -> None:
    """Records that ``target`` was finite on the batch ``x`` of ``flow`` (``None``: no batch known,
    which blames the flow only for non-finite parameters or samples)."""
    try:
        _FINITE_ONCE[flow] = (weakref.ref(target), None if x is None else x.detach())
    except TypeError:  # an object without weak references: no memory, the target is blamed
        pass


def _remember_as(flow, other) -> None:
    """What :func:`_remember_finite` recorded for ``other`` (a view of ``flow``), for ``flow``."""
    try:
        record = _FINITE_ONCE.get(other)
        if record is not None:
            _FINITE_ONCE[flow] = record
    except TypeError:
        pass


def _flow_fault(flow, target, x: Tensor) -> str | None:
    """Why the flow, not the target, is at fault for non-finite target values, or ``None``.

    The flow is at fault if its parameters or samples are not finite, or if the same target
    was finite on the last batch of this flow and this batch reaches more than 4 times its
    largest ``|x|`` (the optimizer moved the flow far out: a learning rate too high, typically).
    A target that is NaN at points like those it was finite at is the target's fault (a NaN on
    part of the space: ``nan="zero"`` reads it as zero density), whatever happened before.
    """
    if not all(bool(torch.isfinite(p).all()) for p in flow.parameters()):
        return "the flow's parameters are not finite"
    if not bool(torch.isfinite(x).all()):
        return "the flow's samples are not finite"
    try:
        ref, before = _FINITE_ONCE.get(flow, (lambda: None, None))
    except TypeError:
        return None
    seen = 0.0 if before is None or not before.numel() else _scale(before)
    if ref() is target and 0.0 < seen < math.inf and _scale(x) > _BLOWN_UP * seen:
        return (f"this batch reaches max |x| = {_scale(x):.3g}, more than {_BLOWN_UP:g} times the "
                f"{seen:.3g} of the earlier samples of this flow at which the same target was finite")
    return None


def _scale(x: Tensor) -> float:
    return float(x.detach().abs().amax()) if bool(torch.isfinite(x).all()) else math.inf


def _no_finite_value(flow, target, x: Tensor) -> RuntimeError:
    """The error for a batch where ``log p`` is inf at every sample: :class:`TrainingDivergedError`
    if the flow is at fault (:func:`_flow_fault`), else :class:`NonFiniteTargetError`."""
    n, why = x.shape[0], _flow_fault(flow, target, x)
    if why is None:
        return NonFiniteTargetError(
            f"the target's log density was NaN or inf at all {n} flow samples (max |x| = {_scale(x):.3g}); "
            "check the target's support and the flow's initialisation")
    return _diverged(f"the target's log density was NaN or inf at all {n} flow samples and {why}", _scale(x))


def _diverged(what: str, scale: float) -> TrainingDivergedError:
    return TrainingDivergedError(
        f"training diverged: {what} (max |x| = {scale:.3g}): the optimizer blew the flow up, the "
        "target is not at fault. Lower the learning rate (lr) or clip the gradient norm harder; if "
        "the target is NaN or inf on part of the space, the flow may also have been pulled there")


def check_differentiable(log_p: Tensor, x: Tensor) -> None:
    r"""Raises :class:`NonDifferentiableTargetError` unless ``log p`` can pass a gradient to ``x``.

    Reverse KL's gradient is :math:`\nabla \mathbb E_q[\log q - \log p]`; a target that returns
    integers or cuts the graph (``.detach()``, ``.numpy()``, ``torch.from_numpy``, ``.item()``)
    leaves only ``log q``: the flow then maximizes its entropy and the loss rises, silently.
    Two flag reads, so it runs on every batch. Skipped when ``x`` carries no gradient
    (under ``torch.no_grad()`` or with a frozen flow).
    """
    if not torch.is_floating_point(log_p):
        raise NonDifferentiableTargetError(
            f"the target's log density must be a floating tensor differentiable in x, got dtype "
            f"{log_p.dtype}: reverse KL needs the gradient of log p. Compute it with torch "
            f"operations on x in x's dtype")
    if x.requires_grad and not log_p.requires_grad:
        raise NonDifferentiableTargetError(
            "the target's log density does not depend on x through autograd (its output has "
            "requires_grad=False while the flow's samples require grad), so reverse KL would fit "
            "log q alone, the wrong objective. Compute log p with torch operations on x (no "
            ".detach(), .numpy(), torch.from_numpy, .item() or torch.no_grad()), or wrap a "
            "non-torch density in a torch.autograd.Function with its gradient, or fit by "
            "objective='forward_kl' from target samples")


class _LogProb(torch.nn.Module):
    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor) -> Tensor:
        return self.flow.log_prob(x)


def _log_prob_detached(flow, x: Tensor) -> Tensor:
    """``log q(x)`` with the flow's parameters detached (gradient only through ``x``)."""
    params = {f"flow.{k}": v.detach() for k, v in flow.named_parameters()}
    return functional_call(_LogProb(flow), params, (x,))


def forward_kl(flow, samples: Tensor) -> Tensor:
    """Negative mean log-likelihood of target samples under the flow (forward KL up to a constant)."""
    return -flow.log_prob(samples).mean()
