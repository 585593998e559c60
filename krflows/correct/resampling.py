r"""Importance resampling, independence Metropolis–Hastings and self-normalized expectations.

Each corrects a fitted flow's bias with the importance weights :math:`w = \tilde p / q` of its
samples (:func:`krflows.importance.log_weights`, whose NaN policy ``nan`` they take). No Pyro
needed; :mod:`krflows.pyro` re-exports them for its models' potentials.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from krflows._checks import check_int
from krflows.diagnostics.weights import ess, self_normalized
from krflows.importance import log_weights
from krflows.targets import as_target

__all__ = ["Resampled", "importance_resample", "self_normalized_expectation", "IMHResult", "independence_mh"]


class Resampled(NamedTuple):
    samples: Tensor  # (n, d)
    log_w: Tensor  # (m,) the proposals' log weights
    ess: float  # normalized ESS of the m weights


def _weighted_draws(flow, target, m: int, nan: str, generator: torch.Generator | None = None
                    ) -> tuple[Tensor, Tensor]:
    """``m`` flow samples and their log-weights; ``-inf`` (zero weight) where not usable. With a
    ``generator``, the flow draws on a stream seeded from it (the global one left as it was):
    the same generator state gives the same draws (a probe: ``generator=`` drove only the
    resampling, so seeded runs differed)."""
    with torch.no_grad(), contextlib.ExitStack() as stack:
        if generator is not None:
            device = getattr(flow, "device", torch.device("cpu"))
            stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        x, log_q = flow.rsample_and_log_prob((m,))
        w = log_weights(target, x, log_q, nan)
    return x, torch.where(w.valid, w.log_w, torch.full_like(w.log_w, -math.inf))



def importance_resample(flow, target, n: int, m: int | None = None,
                        generator: torch.Generator | None = None, nan: str = "error") -> Resampled:
    r"""Sampling-importance-resampling: ``n`` draws, with replacement, from ``m`` flow samples
    weighted by :math:`w = \tilde p / q`.

    Consistent as ``m -> inf`` (bias :math:`O(1/m)`); trustworthy only when
    :func:`~krflows.diagnostics.pareto_k` of ``log_w`` is below about 0.7.

    Arguments:
        flow: the proposal (``rsample_and_log_prob``), e.g. a :class:`~krflows.KRFlow`.
        target: a krflows target or callable ``log_prob(x) -> (m,)``.
        n: resampled points; ``m``: proposals (default ``10 n``).
        nan: ``"error"`` or ``"zero"``: what a NaN from the target means (:mod:`krflows.importance`).
    """
    n = check_int("n", n, 1)
    m = 10 * n if m is None else check_int("m", m, 1)
    x, log_w = _weighted_draws(flow, as_target(target, dim=flow.dim), m, nan, generator)
    if not bool(torch.isfinite(log_w).any()):
        raise ValueError("no proposal has a finite importance weight")
    idx = torch.multinomial(torch.softmax(log_w.double(), 0), n, replacement=True, generator=generator)
    # every one of the m weights, zeros (log -inf) included: a probe's flow with 93% of its
    # proposals outside the support read 0.9995 when the zeros were left out
    return Resampled(x[idx.to(x.device)], log_w, float(ess(log_w)))


def self_normalized_expectation(flow, target, fn: Callable[[Tensor], Tensor], n: int = 10000,
                                nan: str = "error") -> tuple[Tensor, Tensor]:
    r"""The self-normalized importance estimate of :math:`E_p[f]` and its standard error,
    from ``n`` flow samples (:func:`krflows.diagnostics.self_normalized`); ``fn`` maps
    ``(n, d)`` to ``(n, *)``."""
    x, log_w = _weighted_draws(flow, as_target(target, dim=flow.dim), check_int("n", n, 1), nan)
    keep = torch.isfinite(log_w)
    if not bool(keep.any()):
        raise ValueError("no flow sample has a finite importance weight")
    return self_normalized(fn(x[keep]), log_w[keep])


class IMHResult(NamedTuple):
    samples: Tensor  # (n_steps, d)
    acceptance_rate: float
    log_w: Tensor  # (n_steps,) log weights of the chain's states


def independence_mh(flow, target, n_steps: int, x0: Tensor | None = None, batch_size: int = 4096,
                    generator: torch.Generator | None = None, nan: str = "error") -> IMHResult:
    r"""Independent Metropolis–Hastings with the flow as proposal: an exact MCMC correction.

    From state ``x`` with weight :math:`w(x) = \tilde p(x)/q(x)`, propose ``x' ~ q`` and accept
    with probability :math:`\min(1, w(x')/w(x))`. The chain's stationary law is ``p``; it is
    uniformly ergodic when ``w`` is bounded, and the acceptance rate is at least
    :math:`1/\sup (p/q)` (normalized ``p``).

    Arguments:
        flow: the proposal, with ``rsample_and_log_prob`` (e.g. a :class:`~krflows.KRFlow`).
        target: a krflows target or callable ``log_prob(x) -> (n,)``.
        n_steps: chain length (the returned samples include repeats, no burn-in dropped).
        x0: the initial state ``(d,)`` (default: the first proposal of positive weight).
        batch_size: proposals drawn (and their weights evaluated) per batch.
        nan: ``"error"`` or ``"zero"``: what a NaN from the target means (:mod:`krflows.importance`).

    Returns:
        ``IMHResult(samples (n_steps, d), acceptance_rate, log_w (n_steps,))``.
    """
    n_steps, batch_size = check_int("n_steps", n_steps, 1), check_int("batch_size", batch_size, 1)
    target = as_target(target, dim=flow.dim)
    if x0 is None:  # the first proposal of positive weight (a state of zero weight never moves)
        x, lw = _weighted_draws(flow, target, batch_size, nan, generator)
        good = torch.isfinite(lw).nonzero()
        if not good.numel():
            raise ValueError(f"none of {batch_size} flow samples has a finite importance weight: no "
                             f"state to start the chain from (pass x0 in the target's support)")
        x, lw = x[int(good[0])], lw[int(good[0])]
    else:
        if not isinstance(x0, Tensor):
            raise ValueError(f"x0 must be a tensor of shape ({flow.dim},), got {type(x0).__name__}")
        with torch.no_grad():
            x, lw = x0, log_weights(target, x0[None], flow.log_prob(x0[None]), nan).log_w[0]
        if not math.isfinite(float(lw)):
            raise ValueError("x0 must lie where the target's density is positive (its weight is 0)")
    samples, log_ws, accepted, done = [], [], 0, 0
    while done < n_steps:
        m = min(batch_size, n_steps - done)
        prop, lw_prop = _weighted_draws(flow, target, m, nan, generator)
        log_u = torch.rand(m, generator=generator, dtype=torch.float64).log().tolist()
        states = torch.empty(m, dtype=torch.long)
        chosen_lw = torch.empty(m, dtype=lw_prop.dtype)
        current, current_lw = -1, float(lw)  # -1: the state carried over from before the batch
        for i, (lwp, lu) in enumerate(zip(lw_prop.tolist(), log_u, strict=True)):
            if lu < lwp - current_lw:
                current, current_lw, accepted = i, lwp, accepted + 1
            states[i], chosen_lw[i] = current, current_lw
        batch = torch.where((states >= 0)[:, None], prop[states.clamp(min=0)], x)
        samples.append(batch)
        log_ws.append(chosen_lw)
        x, lw, done = batch[-1], chosen_lw[-1], done + m
    return IMHResult(torch.cat(samples), accepted / n_steps, torch.cat(log_ws))
