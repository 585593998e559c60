r"""Diagnostics of bias: pure functions of tensors.

All take log importance weights :math:`\log w_i = \log p(x_i) - \log q(x_i)` of samples
:math:`x_i \sim q` (``p`` unnormalized) unless said otherwise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ess", "log_z_estimate", "pareto_k"]


def ess(log_w: Tensor) -> Tensor:
    r"""Normalized importance-sampling effective sample size :math:`(\sum w)^2 / (N \sum w^2)`.

    In ``[1/N, 1]``; 1 when ``q`` is proportional to ``p``.

    Example:
        >>> float(ess(torch.zeros(100)))
        1.0
    """
    log_w = log_w.reshape(-1)
    n = log_w.numel()
    return torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0) - math.log(n))


def log_z_estimate(log_w: Tensor) -> tuple[Tensor, Tensor]:
    r"""Importance-sampling estimate of :math:`\log Z` and its standard error (delta method).

    :math:`\widehat{\log Z} = \log \frac1N \sum_i w_i`, with standard error
    :math:`\mathrm{sd}(w) / (\sqrt N\, \bar w)`. Unbiased for :math:`Z`, not for :math:`\log Z`.
    """
    log_w = log_w.reshape(-1)
    n = log_w.numel()
    est = torch.logsumexp(log_w, 0) - math.log(n)
    w = torch.exp(log_w - est)  # weights relative to their mean
    return est, w.std() / math.sqrt(n)


def pareto_k(log_w: Tensor) -> float:
    r"""The PSIS shape estimate :math:`\hat k` of the importance weights' upper tail.

    Fits a generalized Pareto distribution (Pyro's ``fit_generalized_pareto``, Zhang &
    Stephens 2009) to the largest :math:`M = \min(N/5, 3\sqrt N)` weights, as in
    Vehtari et al. (2015) and ``pyro.infer.importance.psis_diagnostic``. Reading:
    < 0.5 good, 0.5–0.7 usable, > 0.7 unreliable (the weights' variance is infinite).
    """
    from pyro.ops.stats import fit_generalized_pareto

    log_w = torch.sort(log_w.detach().reshape(-1).double() - log_w.max().double())[0]
    n = log_w.numel()
    cut = -int(math.ceil(min(0.2 * n, 3.0 * math.sqrt(n)))) - 1
    if n < 20:
        return float("nan")
    cutoff = max(math.log(1e-15), float(log_w[cut]))
    tail = log_w[log_w > cutoff]
    if tail.numel() < 5:
        return float("nan")
    k, _ = fit_generalized_pareto(tail.exp() - math.exp(cutoff))
    return float(k)
