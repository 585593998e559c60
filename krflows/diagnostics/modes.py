r"""Mode statistics: the flow's mode weights against the truth, missing modes, valley mass.

Pure functions of tensors, and :func:`mode_stats`, the stage of :func:`~krflows.diagnose` that
applies them to a target that knows its modes (``weights`` and ``assign``, optionally ``modes``
and, in 1-D, a ``gap`` where the density is zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MISSING_RATIO", "MISSING_MIN_EXPECTED", "mode_weights", "total_variation", "missing_modes",
           "valley_mask", "proportion", "ModeStats", "mode_stats"]

MISSING_RATIO, MISSING_MIN_EXPECTED = 0.1, 20.0


def mode_weights(labels: Tensor, n_modes: int) -> Tensor:
    r"""The fraction of points assigned to each mode, :math:`\hat q_k = \#\{i: \ell_i = k\} / N`.

    Arguments:
        labels: mode indices in ``[0, n_modes)``, a LongTensor of shape ``(N,)``.
        n_modes: the number of modes ``K``.

    Returns:
        float64 ``(K,)``, summing to 1.

    Example:
        >>> mode_weights(torch.tensor([0, 0, 2, 0]), 3)
        tensor([0.7500, 0.0000, 0.2500], dtype=torch.float64)
    """
    labels = labels.reshape(-1)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_modes):
        raise ValueError(f"labels must lie in [0, {n_modes}), got [{int(labels.min())}, "
                         f"{int(labels.max())}]")
    counts = torch.bincount(labels.cpu(), minlength=n_modes).double()
    return counts / max(labels.numel(), 1)


def total_variation(p: Tensor, q: Tensor) -> Tensor:
    r"""Total-variation distance :math:`\tfrac12 \sum_k |p_k - q_k|` of two discrete distributions.

    Arguments:
        p, q: probability vectors of shape ``(K,)``.

    Example:
        >>> float(total_variation(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])))
        0.5
    """
    return 0.5 * (p.double().cpu() - q.double().cpu()).abs().sum()


def missing_modes(flow_weights: Tensor, true_weights: Tensor, n: int,
                  ratio: float = MISSING_RATIO, min_expected: float = MISSING_MIN_EXPECTED) -> Tensor:
    r"""Modes the flow has (nearly) dropped: :math:`\hat q_k < r\, p_k` where :math:`N p_k \ge m`.

    A mode counts as missing if the flow puts less than ``ratio`` (default 0.1) of its true
    weight on it, among the modes on which ``n`` samples of the truth would land at least
    ``min_expected`` (default 20) times, so that sampling noise cannot fake the verdict.

    Arguments:
        flow_weights: :math:`\hat q`, ``(K,)`` (from :func:`mode_weights`).
        true_weights: :math:`p`, ``(K,)``.
        n: the number of flow samples behind ``flow_weights``.

    Returns:
        the indices of the missing modes, a LongTensor ``(m,)``.

    Example:
        >>> missing_modes(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]), n=1000)
        tensor([1])
    """
    p, q = true_weights.double().cpu(), flow_weights.double().cpu()
    return torch.nonzero((p * n >= min_expected) & (q < ratio * p)).reshape(-1)


def valley_mask(x: Tensor, log_p: Tensor, labels: Tensor, modes: Tensor, log_p_modes: Tensor,
                level: float = 0.01) -> Tensor:
    r"""Points in the low-density valley between modes.

    With :math:`k = \ell(x)` the mode ``x`` is assigned to and ``j`` the mode nearest to
    ``x`` among the others, ``x`` lies in the valley ``V`` iff it is in the slab between the
    two modes and its density is below ``level`` times that of its own mode:

    .. math:: 0 < t < 1, \quad t = \frac{\langle x - m_k, m_j - m_k \rangle}{\lVert m_j - m_k
        \rVert^2}, \qquad \text{and} \qquad \tilde p(x) < \text{level} \cdot \tilde p(m_k).

    Tails on the far side of a mode (``t <= 0``) do not count. The mass :math:`P(V)` under the
    flow and under the target (from its samples) measure how much mass a flow leaks into the
    valley. Memory is ``O(N K)``.

    Arguments:
        x: points ``(N, d)``.
        log_p: :math:`\log \tilde p(x)`, ``(N,)``.
        labels: mode indices ``(N,)``.
        modes: mode locations ``(K, d)``, ``K >= 2``.
        log_p_modes: :math:`\log \tilde p(m_k)`, ``(K,)``.
        level: the density ratio that defines "low".

    Returns:
        a bool tensor ``(N,)``.

    Example:
        >>> modes = torch.tensor([[-3.0], [3.0]])
        >>> x = torch.tensor([[-3.0], [0.0], [-6.0]])
        >>> log_p = -((x[:, 0].abs() - 3) ** 2)
        >>> valley_mask(x, log_p, torch.tensor([0, 0, 0]), modes, torch.zeros(2))
        tensor([False,  True, False])
    """
    x, modes = x.double(), modes.double().to(x.device)
    own = modes[labels]  # (N, d)
    dist = torch.cdist(x, modes)  # (N, K)
    dist.scatter_(1, labels[:, None], math.inf)
    other = modes[dist.argmin(1)]
    axis = other - own
    t = ((x - own) * axis).sum(-1) / (axis**2).sum(-1)
    low = log_p.double() < log_p_modes.double().to(x.device)[labels] + math.log(level)
    return (t > 0) & (t < 1) & low


def proportion(mask: Tensor) -> tuple[float, float]:
    r"""The fraction :math:`\hat\pi` of ``True`` in ``mask`` and its binomial standard error
    :math:`\sqrt{\hat\pi (1 - \hat\pi) / N}`.

    Example:
        >>> proportion(torch.tensor([True, False, False, False]))
        (0.25, 0.21650635094610965)
    """
    n = max(mask.numel(), 1)
    pi = float(mask.double().mean()) if mask.numel() else float("nan")
    return pi, math.sqrt(pi * (1 - pi) / n)


def _target_modes(target) -> tuple[Tensor, Tensor | None] | None:
    """``(weights, modes or None)`` if the target knows its modes' weights and ``assign``."""
    if not callable(getattr(target, "assign", None)):
        return None
    try:
        weights = torch.as_tensor(target.weights, dtype=torch.float64).reshape(-1)
        modes = getattr(target, "modes", None)
    except ValueError:  # e.g. too many modes to list
        return None
    if modes is not None and (modes.dim() != 2 or modes.shape[0] != weights.numel()):
        modes = None
    return weights, modes


@dataclass
class ModeStats:
    """Mode weights and valley mass of the flow against the target (the report's keys)."""

    mode_weights: list[float]
    true_mode_weights: list[float]
    mode_tv: float
    missing_modes: list[int]
    missing_mass: float
    valley_definition: str | None = None
    valley_mass: float | None = None
    valley_mass_se: float | None = None
    true_valley_mass: float | None = None
    true_valley_mass_se: float | None = None


def mode_stats(target, x: Tensor, log_p: Tensor, y: Tensor | None, log_p_y: Tensor | None,
               level: float, max_modes: int) -> ModeStats | None:
    """The mode statistics of flow samples ``x`` (and target samples ``y``), ``None`` if the
    target does not know its modes. The valley is the ``gap`` of a 1-D target, else
    :func:`valley_mask` with ``level`` (needs ``modes``, ``2 <= K <= max_modes``)."""
    known = _target_modes(target)
    if known is None:
        return None
    weights, modes = known
    K, n = weights.numel(), x.shape[0]
    flow_w = mode_weights(target.assign(x), K)
    missing = missing_modes(flow_w, weights, n)
    out = ModeStats(flow_w.tolist(), weights.tolist(), float(total_variation(flow_w, weights)),
                    missing.tolist(), float(weights[missing].sum()))
    gap = getattr(target, "gap", None)
    if gap is not None and target.dim == 1:
        a, b = gap
        out.valley_definition = f"mass in the gap ({a:g}, {b:g}) where p = 0"
        out.valley_mass, out.valley_mass_se = proportion((x[:, 0] > a) & (x[:, 0] < b))
        out.true_valley_mass, out.true_valley_mass_se = 0.0, 0.0
    elif modes is not None and 2 <= K <= max_modes:
        modes = modes.to(x)
        log_p_modes = target.log_prob(modes)
        out.valley_definition = (f"between a point's mode and the nearest other, "
                                 f"p~ < {level:g} x p~(own mode)")
        mask = valley_mask(x, log_p, target.assign(x), modes, log_p_modes, level)
        out.valley_mass, out.valley_mass_se = proportion(mask)
        if y is not None:
            mask = valley_mask(y, log_p_y, target.assign(y), modes, log_p_modes, level)
            out.true_valley_mass, out.true_valley_mass_se = proportion(mask)
    return out
