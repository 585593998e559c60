r"""Mode statistics: the flow's mode weights against the truth, missing modes, valley mass, and
the modes a search finds that the flow misses.

Pure functions of tensors, and two stages of :func:`~krflows.diagnose`: :func:`mode_stats`
applies them to a target that knows its modes (``weights`` and ``assign``, optionally ``modes``
and, in 1-D, a ``gap`` where the density is zero); :func:`mode_search` needs nothing of the
target but its log density (:func:`~krflows.find_modes`, then :func:`missed_modes`).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MISSING_RATIO", "MISSING_MIN_EXPECTED", "mode_weights", "total_variation", "missing_modes",
           "valley_mask", "proportion", "ModeStats", "mode_stats", "MissedModes", "missed_modes",
           "mode_search"]

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


# =============================================================================================
# modes the flow missed, found by a search (no reference samples, no known modes needed)

MISSED_MIN_MASS = 0.01  # a found mode matters if its Laplace mass is at least this fraction
MISSED_FLOW_SHARE = 0.1  # missed: the flow gives it less than this share of that mass ...
MISSED_LOG_RATIO = math.log(10.0)  # ... and its density at the mode is over 10x too low


@dataclass
class MissedModes:
    """What a mode search says of the flow (the report's keys): the modes it (almost) drops."""

    n_modes_found: int
    missed_modes: list[dict]
    n_missed_modes: int
    missed_mass: float
    log_z_missed_bias: float
    mode_search_seconds: float
    #: with several found modes: the flow's share of its draws per found mode, the same share
    #: importance-reweighted (an estimate of the target's), and that estimate's standard error
    found_mode_weights: list[float] | None = None
    found_mode_weights_reweighted: list[float] | None = None
    found_mode_weights_se: list[float] | None = None
    found_mode_tv: float | None = None


def missed_modes(modes, x: Tensor, log_q_modes: Tensor, log_z: float, *, log_w: Tensor | None = None,
                 min_mass: float = MISSED_MIN_MASS, flow_share: float = MISSED_FLOW_SHARE,
                 log_ratio: float = MISSED_LOG_RATIO, seconds: float = 0.0) -> MissedModes:
    r"""The found modes that the flow gives (almost) no mass to, and the bias that implies.

    For each mode :math:`\mu_k` of a :class:`~krflows.correct.ModeSet` with Laplace mass
    :math:`M_k`, compare what the flow should put there with what it does, where
    :math:`\hat Z` is the flow's importance-sampling estimate (which counts only the modes
    the flow visits):

    * the expected share :math:`e_k = M_k / (\hat Z + M_k)`, which matters if :math:`e_k \ge`
      ``min_mass``;
    * the flow's share :math:`\hat q_k`: the fraction of its samples ``x`` that
      :meth:`~krflows.correct.ModeSet.assign` gives to mode ``k`` within the Mahalanobis radius
      of 99.9 % of a Gaussian mode;
    * the density ratio :math:`r_k = \log\tilde p(\mu_k) - \log\hat Z - \log q(\mu_k)`, about 0
      where the flow covers the mode with its right weight.

    Mode ``k`` is missed iff :math:`e_k \ge` ``min_mass``, :math:`\hat q_k <` ``flow_share``
    :math:`\cdot e_k` and :math:`r_k >` ``log_ratio``: two independent signs (samples and
    density) must agree, so a covered but non-Gaussian mode (a banana, a funnel's neck, whose
    Laplace mass is a poor guess) does not raise a false alarm. With missed masses
    :math:`M_m`, the flow's :math:`\log \hat Z` underestimates :math:`\log Z` by about
    :math:`\log(1 - s + \sum_m M_m / \hat Z)` (``log_z_missed_bias``), and the missed fraction
    of the target is :math:`\sum_m M_m / ((1 - s)\hat Z + \sum_m M_m)` (``missed_mass``), where
    :math:`s` is the share of :math:`\hat Z` that the few flow draws near the missed modes
    carry (0 without ``log_w``): :math:`M_m` replaces their contribution rather than adding to it.
    Those draws have huge weights, so without this correction a flow that sends a handful of
    draws into a missed mode would get a bias understated by their share (0.22 instead of 0.36
    nats in notebook 02).

    Arguments:
        modes: a :class:`~krflows.correct.ModeSet` (e.g. from :func:`~krflows.find_modes`).
        x: flow samples ``(n, d)``.
        log_q_modes: the flow's :math:`\log q(\mu_k)`, ``(k,)``.
        log_z: :math:`\log \hat Z` from the flow's importance weights.
        log_w: optional log importance weights of ``x`` ``(n,)`` (for :math:`s` above).

    Returns:
        :class:`MissedModes`; each entry of ``missed_modes`` is a dict with ``location``,
        ``log_density``, ``log_mass``, ``expected_mass`` (its share of the target,
        :math:`M_k / ((1 - s)\hat Z + \sum_m M_m)`; :math:`e_k` without ``log_w``), ``flow_mass``
        (:math:`\hat q_k`), ``log_density_ratio`` (:math:`r_k`) and ``negative_definite``.
    """
    from scipy.stats import chi2  # a dependency already (quadrature oracles, exact maps)

    k = len(modes)
    if k == 0:
        return MissedModes(0, [], 0, 0.0, 0.0, seconds)
    shares = _reweighted_shares(modes, x, log_w) if k > 1 and log_w is not None else {}
    radius = math.sqrt(chi2.ppf(0.999, modes.dim))
    flow_mass = modes.mass(x, radius=radius)
    log_mass = modes.log_mass.double().cpu()
    expected = torch.exp(log_mass - torch.logaddexp(log_mass, torch.tensor(float(log_z)).double()))
    ratio = modes.log_density.double().cpu() - float(log_z) - log_q_modes.double().cpu()
    missed = (expected >= min_mass) & (flow_mass.cpu() < flow_share * expected) & (ratio > log_ratio)
    rows = [{"location": modes.locations[j].tolist(), "log_density": float(modes.log_density[j]),
             "log_mass": float(log_mass[j]), "expected_mass": float(expected[j]),
             "flow_mass": float(flow_mass[j]), "log_density_ratio": float(ratio[j]),
             "negative_definite": bool(modes.negative_definite[j])}
            for j in torch.nonzero(missed).reshape(-1).tolist()]
    if not rows:
        return MissedModes(k, [], 0, 0.0, 0.0, seconds, **shares)
    log_missed = torch.logsumexp(log_mass[missed], 0) - float(log_z)  # log(sum M_m / Z-hat)
    share = 0.0
    if log_w is not None:  # the share of Z-hat carried by draws near the missed modes
        share = float(modes.mass(x, log_w, radius=radius)[missed.to(x.device)].sum().clamp(0.0, 1.0))
    rest = torch.tensor(1.0 - share).double()
    bias = float(torch.log(rest + log_missed.exp()))
    frac = float(log_missed.exp() / (rest + log_missed.exp()))
    for row in rows:  # each missed mode's share of the target under the corrected Z
        row["expected_mass"] = math.exp(row["log_mass"] - float(log_z)) / float(rest + log_missed.exp())
    return MissedModes(k, rows, len(rows), frac, bias, seconds, **shares)


def _reweighted_shares(modes, x: Tensor, log_w: Tensor) -> dict:
    r"""Each found mode's share of the flow's draws (:meth:`~krflows.correct.ModeSet.assign`) and
    the self-normalized importance estimate of the target's share, with its delta-method
    standard error :math:`\sqrt{\sum_i \bar w_i^2 (1_{k_i = k} - \hat p_k)^2}`. A misweighted
    but covered mode shows as a gap between the two that the standard error cannot explain;
    unlike the missed-mode check this needs no Laplace mass (its draws carry the weights)."""
    lw = log_w.double().reshape(-1)
    ok = torch.isfinite(lw)
    if not bool(ok.any()):
        return {}
    w = torch.softmax(lw[ok], 0)
    # one assignment serves both shares and the standard error
    onehot = torch.nn.functional.one_hot(modes.assign(x[ok]), len(modes)).double().to(w.device)
    flow, share = onehot.mean(0), w @ onehot
    se = torch.sqrt(((w[:, None] * (onehot - share[None, :])) ** 2).sum(0))
    return {"found_mode_weights": flow.tolist(), "found_mode_weights_reweighted": share.tolist(),
            "found_mode_weights_se": se.tolist(), "found_mode_tv": float(0.5 * (flow - share).abs().sum())}


def mode_search(flow, target, x: Tensor, log_z: float, modes="search", options: dict | None = None,
                log_w: Tensor | None = None) -> MissedModes | None:
    """The stage of :func:`~krflows.diagnose`: :func:`~krflows.find_modes` started from the
    flow (unless ``modes`` is a given ModeSet, or ``None``: skipped), then :func:`missed_modes`."""
    if modes is None or not math.isfinite(log_z):
        return None
    # imported here: krflows.correct builds on the diagnostics' estimators
    from krflows.correct.modes import ModeSet, find_modes

    start = time.perf_counter()
    if isinstance(modes, str):
        if modes != "search":
            raise ValueError(f"modes must be 'search', a ModeSet or None, got {modes!r}")
        with warnings.catch_warnings():  # e.g. "no maximum found": the report says 0 modes found
            warnings.simplefilter("ignore", RuntimeWarning)
            modes = find_modes(target, flow, **(options or {}))
    elif not isinstance(modes, ModeSet):
        raise ValueError(f"modes must be 'search', a ModeSet or None, got {type(modes).__name__}")
    log_q = flow.log_prob(modes.locations.to(x)) if len(modes) else torch.zeros(0)
    return missed_modes(modes, x, log_q, log_z, log_w=log_w, seconds=time.perf_counter() - start)
