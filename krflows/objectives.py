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

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call

from krflows.importance import NonFiniteTargetError, evaluate_target, log_weights

__all__ = ["Batch", "NonFiniteTargetError", "evaluate_target", "reverse_kl", "forward_kl"]


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
    (:mod:`krflows.importance`); if no sample is left, :class:`NonFiniteTargetError` is raised
    before any gradient is formed.
    """
    if path_gradient:
        x = flow.rsample((n,))
        log_q = _log_prob_detached(flow, x)
    else:
        x, log_q = flow.rsample_and_log_prob((n,))
    weights = log_weights(target, x, log_q, nan)
    ok = weights.finite
    kept = int(ok.sum())
    if kept == 0:
        raise NonFiniteTargetError(
            f"the target's log density was NaN or inf at all {n} flow samples; "
            "check the target's support and the flow's initialisation")
    log_p, log_q = weights.log_p[ok], log_q[ok]
    loss = (log_q - beta * log_p).mean()
    return Batch(loss, weights.log_w[ok].detach(), n - kept, n)


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
