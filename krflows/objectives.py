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

import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call

from krflows.importance import NonFiniteTargetError, evaluate_target, log_weights

__all__ = ["Batch", "NonFiniteTargetError", "NonDifferentiableTargetError", "TrainingDivergedError",
           "evaluate_target", "reverse_kl", "forward_kl"]


class TrainingDivergedError(RuntimeError):
    """The optimizer moved the flow off the target's support (the flow, not the target, is at fault)."""


class NonDifferentiableTargetError(ValueError):
    """The target's log density carries no gradient to the flow's samples (reverse KL needs one)."""


@dataclass
class Batch:
    """One objective evaluation: the loss and what a training loop logs about it."""

    loss: Tensor
    log_w: Tensor  # log p - log q of the kept samples, detached
    dropped: int  # samples whose log p was not finite (zero density, or NaN read as zero)
    n: int


def reverse_kl(flow, target, n: int, beta: float = 1.0, path_gradient: bool = False,
               nan: str = "error") -> Batch:
    r"""Monte-Carlo reverse KL (negative tempered ELBO) on ``n`` samples of the flow.

    Samples where ``log p`` is not finite (``-inf``: zero density) are dropped and counted;
    a NaN raises :class:`NonFiniteTargetError` unless ``nan="zero"`` reads it as zero density
    (:mod:`krflows.importance`). If no sample is left, an error is raised before any gradient
    is formed: :class:`TrainingDivergedError` if the flow is at fault (non-finite parameters or
    samples, or this target was finite on an earlier batch of this flow), else
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
    _remember_finite(flow, target)
    check_differentiable(weights.log_p, x)
    log_p, log_q = weights.log_p[ok], log_q[ok]
    loss = (log_q - beta * log_p).mean()
    if not bool(torch.isfinite(loss)):  # finite log p: log q or the sum overflowed, the flow's fault
        scale = float(x.detach().abs().amax())
        raise _diverged(f"the loss is not finite (log q - beta log p = {float(loss.detach()):.3g} "
                        f"over {kept} samples with a finite log p)", scale)
    return Batch(loss, weights.log_w[ok].detach(), n - kept, n)


# flow -> weak reference to the last target that was finite on one of its batches
_FINITE_ONCE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _remember_finite(flow, target) -> None:
    try:
        if _FINITE_ONCE.get(flow, lambda: None)() is not target:
            _FINITE_ONCE[flow] = weakref.ref(target)
    except TypeError:  # an object without weak references: no memory, the target is blamed
        pass


def _flow_fault(flow, target, x: Tensor) -> str | None:
    """Why the flow, not the target, is at fault for non-finite target values, or ``None``.

    The flow is at fault if its parameters or samples are not finite, or if the same target
    was finite on an earlier batch of this flow (the optimizer then moved it off the support:
    a learning rate too high, typically).
    """
    if not all(bool(torch.isfinite(p).all()) for p in flow.parameters()):
        return "the flow's parameters are not finite"
    if not bool(torch.isfinite(x).all()):
        return "the flow's samples are not finite"
    try:
        seen = _FINITE_ONCE.get(flow, lambda: None)() is target
    except TypeError:
        seen = False
    return "the same target was finite on earlier samples of this flow" if seen else None


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
