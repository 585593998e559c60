r"""Importance log-weights of points against a target: the one home of the NaN policy.

Every caller that compares the flow ``q`` with the unnormalized target :math:`\tilde p` at
points ``x`` (training, callbacks, Pyro corrections, diagnostics) computes

.. math:: \log w(x) = \log \tilde p(x) - \log q(x)

through :func:`log_weights`, so the values the target may return mean the same everywhere:

* a finite value is a density;
* ``-inf`` is **zero density**: a legitimate value (outside a support). Its weight is zero;
  training drops such samples from the loss and counts them (``dropped``);
* ``NaN`` is an **error** by default (``nan="error"``): :class:`NonFiniteTargetError` says how
  many points of the batch were NaN. ``nan="zero"`` opts in to reading NaN as zero density
  (``-inf``), for targets that are undefined outside their support;
* ``+inf``, and points where ``x`` or ``log q`` is not finite, are **invalid**: they are
  never used (dropped and counted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["NAN_POLICIES", "NonFiniteTargetError", "LogWeights", "check_nan_policy", "evaluate_target",
           "log_weights"]

NAN_POLICIES = ("error", "zero")


class NonFiniteTargetError(RuntimeError):
    """The target gave NaN (under ``nan="error"``), no usable value on a whole batch, or raised."""


@dataclass
class LogWeights:
    """Log densities and log-weights at ``n`` points (see the module's notes for the values)."""

    log_p: Tensor  # (n,) log p~(x); NaN read as -inf under nan="zero"
    log_w: Tensor  # (n,) log p~(x) - log q(x); -inf where p~ = 0
    valid: Tensor  # (n,) bool: finite x and log q, log p~ not NaN and not +inf

    @property
    def n(self) -> int:
        return self.valid.numel()

    @property
    def finite(self) -> Tensor:
        """Points where ``log p~`` is finite (positive density): those a training loss averages."""
        return torch.isfinite(self.log_p)


def check_nan_policy(nan: str) -> str:
    """Returns ``nan`` if it is one of :data:`NAN_POLICIES`, else raises ``ValueError``."""
    if nan not in NAN_POLICIES:
        raise ValueError(f"nan must be one of {NAN_POLICIES}, got {nan!r}")
    return nan


def evaluate_target(target, x: Tensor, nan: str = "error") -> tuple[Tensor, Tensor]:
    """``log p~(x)`` ``(n,)`` under the NaN policy, and the mask of finite values.

    A target that raises, or returns the wrong shape, is reported (never swallowed).
    """
    check_nan_policy(nan)
    try:
        log_p = target(x)
    except Exception as err:  # noqa: BLE001 - reported to the user, never swallowed silently
        raise NonFiniteTargetError(f"the target raised on a batch of {x.shape[0]} points: "
                                   f"{type(err).__name__}: {err}") from err
    if not isinstance(log_p, Tensor) or log_p.shape != x.shape[:-1]:
        got = tuple(log_p.shape) if isinstance(log_p, Tensor) else type(log_p).__name__
        raise ValueError(f"the target's log_prob must return shape {tuple(x.shape[:-1])}, got {got}")
    is_nan = torch.isnan(log_p)
    if bool(is_nan.any()):
        if nan == "error":
            raise NonFiniteTargetError(
                f"the target's log density is NaN at {int(is_nan.sum())} of {is_nan.numel()} points "
                f"(NaN is an error by default); fix the target, or pass nan='zero' to read NaN as "
                f"zero density (log p = -inf: such samples get zero weight and are dropped from "
                f"training, and counted)")
        log_p = torch.where(is_nan, torch.full_like(log_p, -torch.inf), log_p)
    return log_p, torch.isfinite(log_p)


def log_weights(target, x: Tensor, log_q: Tensor, nan: str = "error") -> LogWeights:
    r"""The importance log-weights :math:`\log \tilde p(x) - \log q(x)` at points ``x``.

    Arguments:
        target: a callable ``log_prob(x) -> (n,)`` (e.g. a :class:`~krflows.targets.Target`).
        x: points ``(n, d)`` (e.g. flow samples, user order).
        log_q: :math:`\log q(x)`, shape ``(n,)``; gradients flow through it and ``x``.
        nan: ``"error"`` (default) or ``"zero"``: what a NaN from the target means.

    Returns:
        :class:`LogWeights`: ``log_p``, ``log_w`` (not detached) and the ``valid`` mask.

    Example:
        >>> x, log_q = torch.tensor([[0.0], [1.0]]), torch.zeros(2)
        >>> lw = log_weights(lambda x: 1 - x.square().sum(-1), x, log_q)
        >>> lw.log_w, lw.valid
        (tensor([1., 0.]), tensor([True, True]))
        >>> log_weights(lambda x: x[:, 0].log(), -x, log_q, nan="zero").log_p
        tensor([-inf, -inf])
    """
    log_p, _ = evaluate_target(target, x, nan)
    valid = (torch.isfinite(x).all(-1) & torch.isfinite(log_q) & (log_p < torch.inf))
    return LogWeights(log_p, log_p - log_q, valid)
