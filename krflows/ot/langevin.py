r"""Langevin samplers (ULA, MALA): the particle discretization of the Wasserstein gradient flow
of :math:`\mathrm{KL}(\cdot \,\|\, p)`; a baseline, and dynamics a flow's bias can be corrected with."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from krflows._checks import check_int
from krflows.targets import as_target

__all__ = ["LangevinResult", "ula", "mala"]


class LangevinResult(NamedTuple):
    """Final particles ``(*, d)``, the trace ``(n_steps, *, d)`` (or None), the acceptance rate."""

    x: Tensor
    trace: Tensor | None
    acceptance: float


def _log_prob_and_grad(log_prob: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        lp = log_prob(x)
        (grad,) = torch.autograd.grad(lp.sum(), x)
    return lp.detach(), grad


def _setup(target, x0: Tensor, step: float, n_steps: int):
    if not isinstance(x0, Tensor) or x0.dim() < 1 or not x0.is_floating_point():
        raise ValueError(f"x0 must be a floating tensor of shape (*, d), got {type(x0).__name__}")
    if not step > 0:
        raise ValueError(f"step must be positive, got {step}")
    check_int("n_steps", n_steps, 0)
    return as_target(target, x0.shape[-1]).log_prob


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def ula(target, x0: Tensor, step: float, n_steps: int, trace: bool = False,
        generator: torch.Generator | None = None) -> LangevinResult:
    r"""The unadjusted Langevin algorithm, run on a batch of independent particles.

    .. math:: x_{n+1} = x_n + h \nabla \log p(x_n) + \sqrt{2h}\, \xi_n, \qquad \xi_n \sim N(0, I),

    the Euler–Maruyama discretization of the Langevin diffusion, whose law follows the
    Wasserstein gradient flow of :math:`\mathrm{KL}(\cdot \,\|\, p)`. Biased by :math:`O(h)`:
    for :math:`p = N(m, \Sigma)` its stationary law is
    :math:`N(m, \Sigma (I - \tfrac h2 \Sigma^{-1})^{-1})` (stable for :math:`h < 2 \lambda_{\min}(\Sigma)`).

    Arguments:
        target: a krflows target, a distribution, or a callable ``log_prob(x) -> (*,)``
            (unnormalized; differentiable).
        x0: the initial particles ``(*, d)``.
        step: :math:`h > 0`.
        n_steps: the number of steps.
        trace: also return every step's particles ``(n_steps, *, d)``.
        generator: an optional :class:`torch.Generator` for the noise.

    Returns:
        :class:`LangevinResult` ``(x, trace, acceptance=1.0)``.

    Example:
        >>> out = ula(lambda x: -0.5 * (x**2).sum(-1), torch.zeros(1000, 2), 0.1, 100)
        >>> out.x.shape
        torch.Size([1000, 2])
    """
    log_prob = _setup(target, x0, step, n_steps)
    x, states = x0.detach(), []
    for _ in range(int(n_steps)):
        _, grad = _log_prob_and_grad(log_prob, x)
        x = x + step * grad + math.sqrt(2 * step) * _noise(x, generator)
        if trace:
            states.append(x)
    return LangevinResult(x, torch.stack(states) if trace else None, 1.0)


def mala(target, x0: Tensor, step: float, n_steps: int, trace: bool = False,
         generator: torch.Generator | None = None) -> LangevinResult:
    r"""The Metropolis-adjusted Langevin algorithm, run on a batch of independent chains.

    An ULA proposal :math:`y = x + h \nabla \log p(x) + \sqrt{2h}\, \xi` is accepted with
    probability

    .. math:: \alpha = \min\Big(1, \frac{p(y)\, q(x \mid y)}{p(x)\, q(y \mid x)}\Big), \qquad
        \log q(y \mid x) = -\frac{\lVert y - x - h \nabla \log p(x) \rVert^2}{4h} + \text{const},

    which makes ``p`` exactly invariant (no :math:`O(h)` bias). A proposal with a non-finite
    log-density is rejected.

    Arguments:
        target: a krflows target, a distribution, or a callable ``log_prob(x) -> (*,)``.
        x0: the initial particles ``(*, d)``; they should have finite log-density.
        step: :math:`h > 0`.
        n_steps: the number of steps.
        trace: also return every step's particles ``(n_steps, *, d)``.
        generator: an optional :class:`torch.Generator` for the noise and the coins.

    Returns:
        :class:`LangevinResult` ``(x, trace, acceptance)``, ``acceptance`` the fraction of
        accepted proposals over all chains and steps.

    Example:
        >>> out = mala(lambda x: -0.5 * (x**2).sum(-1), torch.zeros(1000, 2), 0.5, 50)
        >>> 0 < out.acceptance < 1
        True
    """
    log_prob = _setup(target, x0, step, n_steps)
    x, states, accepted = x0.detach(), [], 0.0
    lp, grad = _log_prob_and_grad(log_prob, x)

    def log_q(to: Tensor, start: Tensor, grad_start: Tensor) -> Tensor:
        return -((to - start - step * grad_start) ** 2).sum(-1) / (4 * step)

    for _ in range(int(n_steps)):
        y = x + step * grad + math.sqrt(2 * step) * _noise(x, generator)
        lp_y, grad_y = _log_prob_and_grad(log_prob, y)
        log_alpha = lp_y - lp + log_q(x, y, grad_y) - log_q(y, x, grad)
        u = torch.rand(lp.shape, generator=generator, dtype=x.dtype, device=x.device)
        accept = (u.log() < log_alpha) & torch.isfinite(lp_y)  # NaN compares False: rejected
        x = torch.where(accept.unsqueeze(-1), y, x)
        lp, grad = torch.where(accept, lp_y, lp), torch.where(accept.unsqueeze(-1), grad_y, grad)
        accepted += float(accept.double().mean())
        if trace:
            states.append(x)
    rate = accepted / n_steps if n_steps else float("nan")
    return LangevinResult(x, torch.stack(states) if trace else None, rate)
