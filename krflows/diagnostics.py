r"""Diagnostics of bias: pure functions of tensors, and :func:`diagnose`, which assembles them.

Notation. ``q`` is the flow, :math:`\tilde p = Z p` the unnormalized target. Samples of the
flow are :math:`x_i \sim q`, ``i = 1..N``, with log importance weights
:math:`\log w_i = \log \tilde p(x_i) - \log q(x_i)`; samples of the target (exact, or a
user's reference set) are :math:`y_j \sim p`, ``j = 1..M``, with
:math:`\log v_j = \log \tilde p(y_j) - \log q(y_j)` (``q`` at ``y`` needs the flow's inverse).
Unless said otherwise a function takes ``log_w``.

What the numbers can and cannot see (design notes, section 3): a finite flow leaks mass into
the low-density valleys between modes, misweights or drops modes. Samples of ``q`` never
visit a mode ``q`` has dropped, so everything computed from them alone (ELBO, ESS, Pareto
:math:`\hat k`) can look perfect while half of the target is missing. Only samples of ``p``
(EUBO, :func:`forward_ess`, mode weights against the truth, sample distances) see it.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ess",
    "log_z_estimate",
    "pareto_k",
    "elbo",
    "eubo",
    "forward_ess",
    "self_normalized",
    "mode_weights",
    "total_variation",
    "missing_modes",
    "valley_mask",
    "proportion",
    "sinkhorn_divergence",
    "sliced_w2",
    "sample_distances",
    "log_slope_summary",
    "Report",
    "diagnose",
]

# Thresholds of the verdict (documented in :func:`diagnose`).
PARETO_GOOD, PARETO_UNRELIABLE = 0.5, 0.7
ESS_LOW = 0.05
FORWARD_ESS_LOW = 0.5
MODE_TV_HIGH = 0.05
MISSING_RATIO, MISSING_MIN_EXPECTED = 0.1, 20.0
DISTANCE_RATIO = 3.0
JEFFREYS_HIGH = 10.0  # nats of EUBO - ELBO, beyond three standard errors
SLOPE_QUANTILES = (0.01, 0.5, 0.99)


# =============================================================================================
# importance weights


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


def _mean_se(values: Tensor) -> tuple[Tensor, Tensor]:
    values = values.reshape(-1).double()
    return values.mean(), values.std() / math.sqrt(values.numel())


def elbo(log_w: Tensor) -> tuple[Tensor, Tensor]:
    r"""The evidence lower bound and its Monte-Carlo standard error, from samples of ``q``.

    .. math:: \mathrm{ELBO} = E_q[\log \tilde p - \log q] = \log Z - \mathrm{KL}(q \,\|\, p)
        \le \log Z, \qquad \widehat{\mathrm{ELBO}} = \tfrac1N \textstyle\sum_i \log w_i,
        \quad \mathrm{se} = \mathrm{sd}(\log w) / \sqrt N .

    Arguments:
        log_w: :math:`\log \tilde p(x_i) - \log q(x_i)`, :math:`x_i \sim q`, shape ``(N,)``.

    Returns:
        ``(estimate, se)``, 0-dim float64 tensors. ``-inf`` if some :math:`\tilde p(x_i) = 0`.

    Example:
        >>> est, se = elbo(torch.tensor([1.0, 2.0, 3.0]))
        >>> float(est), round(float(se), 4)
        (2.0, 0.5774)
    """
    return _mean_se(log_w)


def eubo(log_v: Tensor) -> tuple[Tensor, Tensor]:
    r"""The evidence upper bound and its Monte-Carlo standard error, from samples of ``p``.

    .. math:: \mathrm{EUBO} = E_p[\log \tilde p - \log q] = \log Z + \mathrm{KL}(p \,\|\, q)
        \ge \log Z, \qquad \widehat{\mathrm{EUBO}} = \tfrac1M \textstyle\sum_j \log v_j ,

    so :math:`\mathrm{ELBO} \le \log Z \le \mathrm{EUBO}` brackets the evidence, and
    :math:`\mathrm{EUBO} - \mathrm{ELBO}` is the symmetric (Jeffreys) divergence.

    Arguments:
        log_v: :math:`\log \tilde p(y_j) - \log q(y_j)`, :math:`y_j \sim p`, shape ``(M,)``.

    Returns:
        ``(estimate, se)``, 0-dim float64 tensors.

    Example:
        >>> [float(t) for t in eubo(torch.full((4,), 0.5))]
        [0.5, 0.0]
    """
    return _mean_se(log_v)


def forward_ess(log_v: Tensor) -> Tensor:
    r"""Normalized ESS of the *reverse* importance weights :math:`u_j = q(y_j) / \tilde p(y_j)`
    at samples :math:`y_j \sim p` of the target.

    .. math::
        \mathrm{ESS}_{\rightarrow} = \frac{(\sum_j u_j)^2}{M \sum_j u_j^2}
        \;\xrightarrow{M \to \infty}\; \frac{(E_p[q/p])^2}{E_p[(q/p)^2]}
        = \frac{1}{E_q[q/p]} = \frac{1}{1 + \chi^2(q \,\|\, p)} ,

    i.e. the ESS of weighting the target's samples to represent the flow. It is 1 iff
    ``q = p``, and if the flow is the target restricted to a set ``A`` (it drops the modes
    outside ``A``), :math:`u \propto 1_A` and it equals the covered mass :math:`p(A)`, exactly
    (the fraction of target samples in ``A``). The reverse ESS :func:`ess` estimates
    :math:`1/(1 + \chi^2(p \,\|\, q))` from samples of ``q`` and is then 1.

    Its blind spot is the mirror image: mass of ``q`` where ``p`` has little (a too wide
    flow) is rarely visited by samples of ``p``, and :math:`\chi^2(q \,\|\, p)` may even be
    infinite while the estimate stays moderate; :func:`pareto_k` of ``-log_v`` (reported as
    ``forward_pareto_k`` by :func:`diagnose`) says whether the estimate can be trusted.

    Not the same as the "forward ESS" :math:`M^2 / (\sum_j v_j \sum_j v_j^{-1})` used e.g. for
    Boltzmann generators: that one estimates the reverse ESS's population value with samples
    of ``p`` and drops to about 0, not to ``p(A)``, when a mode is missing.

    Arguments:
        log_v: :math:`\log \tilde p(y_j) - \log q(y_j)`, shape ``(M,)``; ``-inf`` (``q = 0``)
            allowed.

    Example:
        >>> log_v = torch.tensor([0.0, 0.0, 30.0, 30.0])  # q ≈ 0 at the last two: mode missing
        >>> round(float(forward_ess(log_v)), 6)
        0.5
    """
    return ess(-log_v.double())


def self_normalized(values: Tensor, log_w: Tensor) -> tuple[Tensor, Tensor]:
    r"""The self-normalized importance-sampling estimate of :math:`E_p[f]` and its standard error.

    With :math:`\bar w_i = w_i / \sum_k w_k` (Owen 2013, eq. 9.8, delta method)

    .. math:: \hat\mu = \sum_i \bar w_i f(x_i), \qquad
        \mathrm{se} = \Big(\sum_i \bar w_i^2 (f(x_i) - \hat\mu)^2\Big)^{1/2} .

    Trustworthy only if :func:`pareto_k` is below about 0.7.

    Arguments:
        values: :math:`f(x_i)`, shape ``(N, *)``.
        log_w: log importance weights, shape ``(N,)`` (any constant offset cancels).

    Returns:
        ``(estimate, se)``, each of shape ``(*)``, float64.

    Example:
        >>> est, se = self_normalized(torch.tensor([0.0, 1.0]), torch.log(torch.tensor([1.0, 3.0])))
        >>> round(float(est), 6), round(float(se), 4)
        (0.75, 0.2652)
    """
    if values.shape[:1] != log_w.shape or log_w.dim() != 1:
        raise ValueError(f"values must have shape (N, *) and log_w (N,), "
                         f"got {tuple(values.shape)} and {tuple(log_w.shape)}")
    w = torch.softmax(log_w.double(), 0).reshape(-1, *([1] * (values.dim() - 1)))
    f = values.double()
    est = (w * f).sum(0)
    return est, ((w * (f - est)) ** 2).sum(0).sqrt()


# =============================================================================================
# modes and valleys


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


# =============================================================================================
# distances between sample sets (POT)


def _pot_points(x: Tensor) -> Tensor:
    return x.detach().reshape(x.shape[0], -1).to(device="cpu", dtype=torch.float64)


def _sinkhorn_cost(x: Tensor, y: Tensor, reg: float) -> float:
    """Entropic OT cost with squared Euclidean ground cost, uniform weights (``ot.sinkhorn2``)."""
    import ot

    a = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=torch.float64)
    b = torch.full((y.shape[0],), 1.0 / y.shape[0], dtype=torch.float64)
    cost = ot.dist(x, y)  # squared Euclidean
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(ot.sinkhorn2(a, b, cost, reg, numItermax=2000, stopThr=1e-5))
        if not math.isfinite(value) or any("numerical errors" in str(w.message) for w in caught):
            # exp(-C / reg) underflowed: redo in the log domain (slower)
            value = float(ot.sinkhorn2(a, b, cost, reg, method="sinkhorn_log", numItermax=1000,
                                       stopThr=1e-5))
    return value


def _nearest_cost(a: Tensor, b: Tensor) -> float:
    """The largest squared distance from a point of one set to its nearest point in the other."""
    cost = torch.cdist(a, b).square()
    return float(torch.maximum(cost.min(1).values.max(), cost.min(0).values.max()))


def sinkhorn_divergence(x: Tensor, y: Tensor, reg: float) -> float:
    r"""A debiased *sharp* Sinkhorn divergence between two empirical measures (POT's ``sinkhorn2``).

    .. math:: S_\varepsilon(\mu, \nu) = W_\varepsilon(\mu, \nu)
        - \tfrac12 W_\varepsilon(\mu, \mu) - \tfrac12 W_\varepsilon(\nu, \nu),

    where :math:`W_\varepsilon = \langle \gamma_\varepsilon, C\rangle` is the transport cost of the
    entropic plan *without* its entropy term (what ``ot.sinkhorn2`` returns), squared Euclidean
    cost (units of :math:`x^2`), :math:`\varepsilon` = ``reg``, uniform weights. Without the entropy
    term nonnegativity is not guaranteed, so the value is clipped at 0. It is what
    :func:`diagnose` reports (with a noise floor from a second exact sample); the regularized
    divergence of Feydy et al. (2019), nonnegative by construction and with weights, is
    :func:`krflows.ot.sinkhorn_divergence`. Both tend to :math:`W_2^2` as ``reg -> 0``.
    Cost ``O(N M)`` memory and time per iteration: use subsamples of a few thousand points.

    Arguments:
        x: points ``(N, d)``; y: points ``(M, d)``.
        reg: :math:`\varepsilon`, in the units of the cost.

    Example:
        >>> x = torch.tensor([[0.0], [1.0]])
        >>> sinkhorn_divergence(x, x, reg=0.1)
        0.0
    """
    x, y = _pot_points(x), _pot_points(y)
    value = _sinkhorn_cost(x, y, reg) - 0.5 * (_sinkhorn_cost(x, x, reg) + _sinkhorn_cost(y, y, reg))
    return max(0.0, value)


def sliced_w2(x: Tensor, y: Tensor, n_projections: int = 100, seed: int = 0) -> float:
    r"""The sliced 2-Wasserstein distance (POT's ``sliced_wasserstein_distance``).

    .. math:: \mathrm{SW}_2(\mu, \nu) = \Big(E_{\theta \sim U(S^{d-1})}
        W_2^2(\theta_\# \mu, \theta_\# \nu)\Big)^{1/2},

    in the units of ``x``, estimated with ``n_projections`` random directions drawn from
    ``seed`` (so two calls with one seed use the same directions). ``O(N log N)`` per direction.

    Example:
        >>> sliced_w2(torch.tensor([[0.0], [1.0]]), torch.tensor([[1.0], [2.0]]))
        1.0
    """
    import ot

    return float(ot.sliced_wasserstein_distance(_pot_points(x), _pot_points(y),
                                                n_projections=n_projections, seed=seed))


def sample_distances(x: Tensor, y: Tensor, y2: Tensor | None = None, *, blur: float = 0.05,
                     n_projections: int = 100, seed: int = 0) -> dict[str, float]:
    r"""Sinkhorn divergence and sliced W2 between ``x`` and ``y``, with their noise floor.

    The Sinkhorn regularization is relative to the spread of ``y``:
    :math:`\varepsilon = \text{blur} \cdot \tfrac12 \operatorname{median}_{i \ne j}
    \lVert y_i - y_j \rVert^2` (about :math:`\text{blur} \cdot \operatorname{tr}\mathrm{Cov}(y)`
    for a Gaussian, and robust to heavy tails), raised where needed to a hundredth of the largest
    squared distance from a point to the other set, so that no row of the kernel
    :math:`e^{-C/\varepsilon}` underflows (plain Sinkhorn stays finite and fast; far outliers,
    as in heavy-tailed targets, thus blur the divergence: ``sinkhorn_reg`` is returned). With a second,
    independent sample ``y2`` of the same law as ``y`` (and of the size of ``x``), the same
    distances between ``y`` and ``y2`` are the *noise floor*: what a perfect ``x`` would score.

    Arguments:
        x: points ``(N, d)`` (the flow's); y: points ``(M, d)`` (the target's).
        y2: optional second target sample ``(N, d)``.
        blur: relative Sinkhorn regularization.
        n_projections, seed: of :func:`sliced_w2`.

    Returns:
        ``{"sinkhorn", "sliced_w2", "sinkhorn_reg"}`` and, with ``y2``,
        ``{"sinkhorn_floor", "sliced_w2_floor"}``.
    """
    x, y = _pot_points(x), _pot_points(y)
    y2 = None if y2 is None else _pot_points(y2)
    pairs = torch.cdist(y, y).square()
    off = pairs[~torch.eye(y.shape[0], dtype=torch.bool)]
    reg = blur * 0.5 * float(off.median()) if off.numel() else blur
    reg = reg if reg > 0 else blur
    reach = max([_nearest_cost(x, y)] + ([] if y2 is None else [_nearest_cost(y2, y)]))
    reg = max(reg, reach / 100)
    self_y = _sinkhorn_cost(y, y, reg)

    def divergence(a: Tensor, self_a: float) -> float:
        return max(0.0, _sinkhorn_cost(a, y, reg) - 0.5 * (self_a + self_y))

    out = {"sinkhorn": divergence(x, _sinkhorn_cost(x, x, reg)),
           "sliced_w2": sliced_w2(x, y, n_projections, seed), "sinkhorn_reg": reg}
    if y2 is not None:
        out["sinkhorn_floor"] = divergence(y2, _sinkhorn_cost(y2, y2, reg))
        out["sliced_w2_floor"] = sliced_w2(y2, y, n_projections, seed)
    return out


# =============================================================================================
# map conditioning


def log_slope_summary(log_diag: Tensor, quantiles: tuple[float, ...] = SLOPE_QUANTILES
                      ) -> dict[str, Any]:
    r"""Quantiles and maxima of the map's log-slopes :math:`\log \partial T_k / \partial z_k`.

    A monotone map ``z -> x`` that crosses a low-density valley is steep there:
    :math:`\partial T_k / \partial z_k = \varphi(z_k) / p(x_k \mid x_{<k})` (for the exact map)
    grows without bound as the valley deepens; a flow of bounded slope leaks mass instead.

    Arguments:
        log_diag: :math:`\log \partial T_k / \partial z_k` at samples of the reference,
            shape ``(N, d)`` (from ``flow.triangular.call_and_log_diag(z)``, flow order).
        quantiles: levels in ``(0, 1)``.

    Returns:
        ``{"quantiles": {str(q): [d floats]}, "max": [d floats], "max_overall": float}``.

    Example:
        >>> s = log_slope_summary(torch.tensor([[0.0, 1.0], [2.0, 3.0]]), quantiles=(0.5,))
        >>> s["quantiles"], s["max"], s["max_overall"]
        ({'0.5': [1.0, 2.0]}, [2.0, 3.0], 3.0)
    """
    ld = log_diag.detach().reshape(-1, log_diag.shape[-1]).double().cpu()
    qs = torch.quantile(ld, torch.tensor(quantiles, dtype=torch.float64), dim=0)
    return {"quantiles": {f"{q:g}": row.tolist() for q, row in zip(quantiles, qs, strict=True)},
            "max": ld.amax(0).tolist(), "max_overall": float(ld.max())}


# =============================================================================================
# the report


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        items = [_fmt(t) for t in v[:16]]
        return "[" + ", ".join(items) + (f", … ({len(v)} in all)" if len(v) > 16 else "") + "]"
    return str(v)


# (title, rows); a row is (key, se key or None, label, note). Rows whose key is absent are skipped.
_SECTIONS: list[tuple[str, list[tuple[str, str | None, str, str]]]] = [
    ("evidence (ELBO ≤ log Z ≤ EUBO)", [
        ("elbo", "elbo_se", "ELBO", "E_q[log p~ - log q]"),
        ("log_z", "log_z_se", "log Z, importance sampling", "log mean w"),
        ("true_log_z", None, "log Z, exact", "from the target"),
        ("eubo", "eubo_se", "EUBO", "E_p[log p~ - log q], needs the inverse"),
        ("kl_reverse", None, "KL(q || p)", "log Z - ELBO"),
        ("kl_forward", None, "KL(p || q)", "EUBO - log Z"),
        ("jeffreys", None, "KL(q || p) + KL(p || q)", "EUBO - ELBO"),
    ]),
    ("importance weights", [
        ("ess", None, "ESS / N (reverse)", "samples of q; 1 = perfect; blind to missing modes"),
        ("forward_ess", None, "ESS / N (forward)", "weights q/p at samples of p; = covered mass"),
        ("pareto_k", None, "Pareto k-hat", "< 0.5 good, 0.5-0.7 usable, > 0.7 unreliable"),
        ("forward_pareto_k", None, "Pareto k-hat of q/p at p", "reliability of the forward ESS"),
    ]),
    ("modes", [
        ("mode_weights", None, "mode weights, flow", "from flow samples via target.assign"),
        ("true_mode_weights", None, "mode weights, target", "target.weights"),
        ("mode_tv", None, "total variation", "1/2 sum |flow - target|"),
        ("missing_modes", None, "missing modes", "flow weight < 0.1 x true weight"),
        ("missing_mass", None, "missing mass", "target mass of the missing modes"),
        ("valley_mass", "valley_mass_se", "valley mass, flow", ""),
        ("true_valley_mass", "true_valley_mass_se", "valley mass, target", ""),
    ]),
    ("sample distances (flow vs target subsamples; floor = two target sets)", [
        ("sinkhorn", None, "Sinkhorn divergence", ""),
        ("sinkhorn_floor", None, "  noise floor", ""),
        ("sliced_w2", None, "sliced W2", ""),
        ("sliced_w2_floor", None, "  noise floor", ""),
    ]),
    ("map conditioning (log dT_k/dz_k at reference samples, flow order)", [
        ("log_slope_max", None, "max log slope per coordinate", ""),
        ("max_slope", None, "largest slope met", "exp(max log slope)"),
        ("exact_log_slope_max", None, "exact KR map: max log slope", "KR1D on a grid, same z"),
        ("exact_log_slope_q99", None, "exact KR map: q0.99", ""),
        ("inverse_residual_max", None, "inverse residual, max", "max_k |T(S(x))_k - x_k|"),
        ("inverse_residual_median", None, "inverse residual, median", ""),
    ]),
]


class Report(Mapping):
    r"""The result of :func:`diagnose`: a read-only mapping of named entries, plus renderers.

    Entries are floats, ints, strings, lists and (for ``"log_slope_quantiles"`` and
    ``"expectations"``) dicts; see :func:`diagnose` for the keys. Render with
    :meth:`to_text` (also ``str(report)``), :meth:`to_markdown`, :meth:`to_json`; log the
    numbers with :meth:`scalars`.
    """

    def __init__(self, entries: dict[str, Any], title: str = "krflows diagnostics"):
        self._entries = dict(entries)
        self.title = title

    def __getitem__(self, key: str) -> Any:
        return self._entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Report({self.get('verdict', '')!r}, {len(self)} entries)"

    def __str__(self) -> str:
        return self.to_text()

    # ---- numbers ---------------------------------------------------------------------------

    def scalars(self) -> dict[str, float]:
        r"""Flat ``{name: float}`` for loggers (TensorBoard). Keys, where their entry exists:

        * every scalar entry under its own name: ``n, n_exact, n_dropped, n_dropped_exact,
          frac_zero_density, elbo, elbo_se, log_z, log_z_se, true_log_z, eubo, eubo_se,
          kl_reverse, kl_forward, jeffreys, ess, forward_ess, forward_pareto_k, pareto_k, mode_tv,
          missing_mass,
          valley_mass, valley_mass_se, true_valley_mass, true_valley_mass_se, sinkhorn,
          sinkhorn_floor, sinkhorn_reg, sliced_w2, sliced_w2_floor, distance_n, max_slope,
          exact_log_slope_max, exact_log_slope_q99, inverse_residual_max,
          inverse_residual_median, seconds``;
        * ``n_missing_modes``; ``mode_weight/{k}`` and ``true_mode_weight/{k}`` when ``K <= 16``;
        * ``log_slope_max/{k}`` and ``log_slope_q{q}/{k}`` (``q`` in ``0.01, 0.5, 0.99``) when
          ``d <= 16``, and always ``log_slope_max`` (over all coordinates);
        * ``expect/{name}/{is, is_se, flow, flow_se, exact, exact_se}``.

        Values may be ``inf`` or ``nan`` (e.g. ``elbo = -inf`` when the flow puts mass where the
        target density is zero).
        """
        out: dict[str, float] = {}
        for key, v in self._entries.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[key] = float(v)
        if "missing_modes" in self._entries:
            out["n_missing_modes"] = float(len(self._entries["missing_modes"]))
        for key, name in (("mode_weights", "mode_weight"), ("true_mode_weights", "true_mode_weight")):
            if key in self._entries and len(self._entries[key]) <= 16:
                out.update({f"{name}/{k}": float(v) for k, v in enumerate(self._entries[key])})
        if "log_slope_max" in self._entries:
            per = self._entries["log_slope_max"]
            out["log_slope_max"] = float(max(per))
            if len(per) <= 16:
                out.update({f"log_slope_max/{k}": float(v) for k, v in enumerate(per)})
                for q, row in self._entries["log_slope_quantiles"].items():
                    out.update({f"log_slope_q{q}/{k}": float(v) for k, v in enumerate(row)})
        for name, e in self._entries.get("expectations", {}).items():
            out.update({f"expect/{name}/{k}": float(v) for k, v in e.items()})
        return out

    # ---- rendering -------------------------------------------------------------------------

    def _rows(self) -> list[tuple[str, list[tuple[str, str, str]]]]:
        e = self._entries
        sections = []
        for title, spec in _SECTIONS:
            rows = []
            for key, se, label, note in spec:
                if key not in e:
                    continue
                value = _fmt(e[key]) + (f" ± {e[se]:.2g}" if se and se in e else "")
                if key.endswith("valley_mass"):
                    note = e.get("valley_definition", "")
                rows.append((label, value, note))
            if title.startswith("map") and "log_slope_quantiles" in e:
                rows[1:1] = [(f"  quantile {q}", _fmt(v), "per coordinate")
                             for q, v in e["log_slope_quantiles"].items()]
            if rows:
                sections.append((title, rows))
        if e.get("expectations"):
            rows = []
            for name, x in e["expectations"].items():
                note = f"flow average {x['flow']:.4g} ± {x['flow_se']:.2g}"
                if "exact" in x:
                    note += f"; exact samples {x['exact']:.4g} ± {x['exact_se']:.2g}"
                rows.append((name, f"{x['is']:.4g} ± {x['is_se']:.2g}", note))
            sections.append(("expectations (importance-corrected ± se)", rows))
        return sections

    def _header(self) -> list[str]:
        e = self._entries
        lines = [f"n = {e.get('n')} flow samples ({e.get('n_dropped', 0)} dropped: non-finite)"]
        if "n_exact" in e:
            lines.append(f"{e['n_exact']} target samples from {e.get('reference_source')} "
                         f"({e.get('n_dropped_exact', 0)} dropped)")
        if e.get("frac_zero_density"):
            lines.append(f"{100 * e['frac_zero_density']:.2f}% of flow samples where p~ = 0")
        return lines

    def to_text(self) -> str:
        """A plain-text report: verdict first, then one section per topic."""
        lines = [self.title, f"verdict: {self.get('verdict', '')}", *self._header()]
        for title, rows in self._rows():
            lines += ["", title]
            lines += [f"  {label:<30} {value:<26} {note}".rstrip() for label, value, note in rows]
        return "\n".join(lines) + "\n"

    def to_markdown(self) -> str:
        """A Markdown report: the verdict in bold, then one table per section."""
        lines = [f"### {self.title}", "", f"**Verdict:** {self.get('verdict', '')}", ""]
        lines += [f"- {h}" for h in self._header()]
        for title, rows in self._rows():
            lines += ["", f"**{title}**", "", "| quantity | value | note |", "|---|---|---|"]
            lines += [f"| {_md(label.strip())} | {_md(value)} | {_md(note)} |" for label, value, note in rows]
        return "\n".join(lines) + "\n"

    def to_json(self, **kwargs) -> str:
        """Strict JSON of all entries; non-finite floats become the strings ``"inf"``,
        ``"-inf"``, ``"nan"``. ``kwargs`` go to :func:`json.dumps` (e.g. ``indent=2``)."""
        return json.dumps(_jsonable(self._entries), allow_nan=False, **kwargs)


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


# =============================================================================================
# diagnose


def _finite_rows(x: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """Rows to keep: finite point and ``log q``, ``log p~`` not NaN or ``+inf`` (``-inf`` is a
    legitimate zero density)."""
    return torch.isfinite(x).all(-1) & torch.isfinite(log_q) & ~torch.isnan(log_p) & (log_p < math.inf)


def _flow_samples(flow, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x ~ q`` (user order), ``log q(x)``, the per-coordinate ``log dT_k/dz_k`` (flow order)
    and the reference samples ``z``."""
    z = flow.base.sample((n,))
    y, log_diag = flow.triangular.call_and_log_diag(z)
    x = y if flow.order is None else y[..., torch.argsort(flow.order)]
    return x, flow.base.log_prob(z) - log_diag.sum(-1), log_diag, z


def _target_samples(target, reference: Tensor | None, m: int, like: Tensor
                    ) -> tuple[Tensor | None, str | None]:
    if reference is not None:
        if not isinstance(reference, Tensor) or reference.dim() != 2 or reference.shape[1] != target.dim:
            shape = tuple(reference.shape) if isinstance(reference, Tensor) else type(reference).__name__
            raise ValueError(f"reference must be a tensor of shape (m, {target.dim}), got {shape}")
        ref = reference.detach().to(like)
        return ref[torch.randperm(ref.shape[0], device=ref.device)], "reference"
    if getattr(target, "has_sampler", False):
        try:
            return target.sample((m,)).to(like), "target.sample"
        except NotImplementedError:
            pass
    return None, None


def _importance(e: dict, log_w: Tensor, log_z_true: float | None, tol: float) -> None:
    est, se = elbo(log_w)
    e["elbo"], e["elbo_se"] = float(est), float(se)
    # zero densities are zero weights: keep them in N (their log weight is -inf)
    log_z, log_z_se = log_z_estimate(log_w)
    e["log_z"], e["log_z_se"] = float(log_z), float(log_z_se)
    if log_z_true is not None:
        e["true_log_z"] = float(log_z_true)
        e["kl_reverse"] = e["true_log_z"] - e["elbo"]
    e["ess"] = float(ess(log_w))
    e["pareto_k"] = _pareto_k_or_bounded(log_w, tol)


def _pareto_k_or_bounded(log_w: Tensor, tol: float) -> float:
    """:func:`pareto_k`, or ``-inf`` (the bounded-tail limit) when the weights are constant up
    to the rounding level ``tol`` of the log weights, where the fit is undefined."""
    finite = log_w[torch.isfinite(log_w)]
    constant = finite.numel() > 0 and float(finite.max() - finite.min()) <= tol
    return -math.inf if constant else pareto_k(log_w)


def _forward(e: dict, log_v: Tensor, tol: float) -> None:
    est, se = eubo(log_v)
    e["eubo"], e["eubo_se"] = float(est), float(se)
    e["jeffreys"] = e["eubo"] - e["elbo"]
    if "true_log_z" in e:
        e["kl_forward"] = e["eubo"] - e["true_log_z"]
    e["forward_ess"] = float(forward_ess(log_v))
    e["forward_pareto_k"] = _pareto_k_or_bounded(-log_v, tol)


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


def _modes(e: dict, target, x: Tensor, log_p: Tensor, y: Tensor | None, log_p_y: Tensor | None,
           level: float, max_modes: int) -> None:
    known = _target_modes(target)
    if known is None:
        return
    weights, modes = known
    K, n = weights.numel(), x.shape[0]
    flow_w = mode_weights(target.assign(x), K)
    e["mode_weights"], e["true_mode_weights"] = flow_w.tolist(), weights.tolist()
    e["mode_tv"] = float(total_variation(flow_w, weights))
    missing = missing_modes(flow_w, weights, n)
    e["missing_modes"] = missing.tolist()
    e["missing_mass"] = float(weights[missing].sum())
    gap = getattr(target, "gap", None)
    if gap is not None and target.dim == 1:
        a, b = gap
        e["valley_definition"] = f"mass in the gap ({a:g}, {b:g}) where p = 0"
        e["valley_mass"], e["valley_mass_se"] = proportion((x[:, 0] > a) & (x[:, 0] < b))
        e["true_valley_mass"], e["true_valley_mass_se"] = 0.0, 0.0
    elif modes is not None and 2 <= K <= max_modes:
        modes = modes.to(x)
        log_p_modes = target.log_prob(modes)
        e["valley_definition"] = (f"between a point's mode and the nearest other, "
                                  f"p~ < {level:g} x p~(own mode)")
        mask = valley_mask(x, log_p, target.assign(x), modes, log_p_modes, level)
        e["valley_mass"], e["valley_mass_se"] = proportion(mask)
        if y is not None:
            mask = valley_mask(y, log_p_y, target.assign(y), modes, log_p_modes, level)
            e["true_valley_mass"], e["true_valley_mass_se"] = proportion(mask)


def _distances(e: dict, x: Tensor, y: Tensor, n_sub: int, seed: int | None) -> None:
    m = min(n_sub, x.shape[0], y.shape[0] // 2)
    if m < 10:
        return
    d = sample_distances(x[:m], y[:m], y[m:2 * m], seed=0 if seed is None else seed)
    e.update(d)
    e["distance_n"] = m


def _conditioning(e: dict, flow, target, x: Tensor, z: Tensor, log_diag: Tensor,
                  y: Tensor | None, n_inverse: int) -> None:
    s = log_slope_summary(log_diag)
    e["log_slope_quantiles"], e["log_slope_max"] = s["quantiles"], s["max"]
    e["max_slope"] = math.exp(min(s["max_overall"], 709.0))
    if flow.dim == 1 and y is not None:
        from krflows.exact import KR1D

        pts = torch.cat([x[:, 0], y[:, 0]]).double()
        lo, hi = float(pts.min()), float(pts.max())
        pad = 0.1 * (hi - lo) + 1e-6
        kr = KR1D.from_log_prob(lambda t: target.log_prob(t), lo - pad, hi + pad, n=8001)
        exact = kr.call_and_log_diag(z.double())[1][:, 0]
        e["exact_log_slope_max"] = float(exact.max())
        e["exact_log_slope_q99"] = float(torch.quantile(exact, 0.99))
    res = flow.inverse_residual(x[:n_inverse]).double()
    e["inverse_residual_max"], e["inverse_residual_median"] = float(res.max()), float(res.median())


def _expectations(functions: dict[str, Callable[[Tensor], Tensor]], x: Tensor, log_w: Tensor,
                  y: Tensor | None) -> dict[str, dict[str, float]]:
    out = {}
    for name, f in functions.items():
        values = f(x)
        if not isinstance(values, Tensor) or values.shape != x.shape[:1]:
            got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(f"functions[{name!r}] must map (n, d) points to (n,), got {got}")
        est, se = self_normalized(values, log_w)
        flow_mean, flow_se = _mean_se(values)
        row = {"is": float(est), "is_se": float(se), "flow": float(flow_mean), "flow_se": float(flow_se)}
        if y is not None:
            ex, ex_se = _mean_se(f(y))
            row["exact"], row["exact_se"] = float(ex), float(ex_se)
        out[name] = row
    return out


def _problems(e: dict, scale: float) -> list[str]:
    """The verdict's findings, most serious first (thresholds at the top of the module)."""
    out = []
    if e.get("n_dropped"):
        out.append(f"{e['n_dropped']} of {e['n'] + e['n_dropped']} flow samples had a NaN/+inf "
                   f"log-density and were dropped")
    if e.get("frac_zero_density", 0) > 0:
        out.append(f"{100 * e['frac_zero_density']:.2g}% of the flow's samples fall where the "
                   f"target density is zero (ELBO = -inf)")
    if e.get("missing_modes"):
        idx = e["missing_modes"]
        which = f"mode {idx[0]}" if len(idx) == 1 else f"modes {_fmt(idx)}"
        if len(idx) > 5:
            which = f"{len(idx)} modes, e.g. {_fmt(idx[:5])[:-1]}, …]"
        msg = f"{100 * e['missing_mass']:.0f}% of the target's mass ({which}) is missing"
        if e["ess"] > 0.5:
            msg += f" (the reverse ESS {e['ess']:.2f} cannot see this)"
        out.append(msg)
    elif e.get("mode_tv", 0) > MODE_TV_HIGH:
        out.append(f"mode weights are off: TV {e['mode_tv']:.2f} (flow {_fmt(e['mode_weights'])} "
                   f"vs target {_fmt(e['true_mode_weights'])})")
    in_gap = e.get("valley_definition", "").startswith("mass in the gap")
    if "true_valley_mass" in e and not (in_gap and e.get("frac_zero_density", 0) > 0):
        v, t = e["valley_mass"], e["true_valley_mass"]
        noise = 3 * math.hypot(e["valley_mass_se"], e["true_valley_mass_se"])
        if v > 2 * t + max(0.005, noise):
            out.append(f"the flow puts {100 * v:.1f}% of its mass in the valley between modes "
                       f"(target: {100 * t:.1f}%)")
    if e.get("forward_ess", 1.0) < FORWARD_ESS_LOW and not e.get("missing_modes"):
        msg = f"forward ESS {e['forward_ess']:.2f}: the flow misses or misweights part of the target"
        if "missing_modes" not in e:  # modes unknown: say what a dropped mode would look like
            msg += f" (about {100 * (1 - e['forward_ess']):.0f}% of its mass if whole modes are missing)"
        if e.get("forward_pareto_k", -math.inf) > PARETO_UNRELIABLE:
            msg += (f", or is too wide in places (the forward weights' k̂ = "
                    f"{e['forward_pareto_k']:.2f} makes this ESS unreliable)")
        out.append(msg)
    if e.get("jeffreys", 0.0) - 3 * e.get("eubo_se", 0.0) > JEFFREYS_HIGH:
        out.append(f"EUBO - ELBO = {e['jeffreys']:.3g} nats: the flow gives almost zero density to "
                   f"some of the target's draws (its tails are too light there), so tail "
                   f"probabilities and the forward ESS are not to be trusted")
    k = e.get("pareto_k", math.nan)
    if k > PARETO_UNRELIABLE:
        out.append(f"k̂ = {k:.2f} > 0.7: importance-weighted estimates (log Z, expectations) are "
                   f"unreliable")
    elif k > PARETO_GOOD:
        out.append(f"k̂ = {k:.2f}: importance weighting is usable but converges slowly")
    if e.get("ess", 1.0) < ESS_LOW:
        out.append(f"ESS {e['ess']:.3f}: only about {100 * e['ess']:.1f}% of the samples carry weight")
    floor_s, floor_w = e.get("sinkhorn_floor"), e.get("sliced_w2_floor")
    if floor_s is not None and e["sinkhorn"] > DISTANCE_RATIO * floor_s + 1e-12 \
            and e["sliced_w2"] > DISTANCE_RATIO * floor_w:
        out.append(f"the samples differ from the target's beyond sampling noise (Sinkhorn "
                   f"{e['sinkhorn']:.3g} vs floor {floor_s:.3g}, sliced W2 {e['sliced_w2']:.3g} "
                   f"vs {floor_w:.3g})")
    if e.get("inverse_residual_max", 0.0) > 1e-3 * (1 + scale):
        out.append(f"inverse residual {e['inverse_residual_max']:.2g}: log q at given points "
                   f"(EUBO, forward ESS) is inexact")
    return out


def _verdict(e: dict, problems: list[str]) -> str:
    if problems:
        return "; ".join(problems)
    parts = [f"ESS {e['ess']:.2f}"]
    if "forward_ess" in e:
        parts.append(f"forward ESS {e['forward_ess']:.2f}")
    parts.append(f"k̂ {e['pareto_k']:.2f}")
    return f"no problems detected ({', '.join(parts)})"


def diagnose(flow, target, n: int = 20000, reference: Tensor | None = None,
             functions: dict[str, Callable[[Tensor], Tensor]] | None = None,
             seed: int | None = None, *, n_exact: int | None = None, n_sub: int = 1000,
             n_inverse: int = 1000, valley_level: float = 0.01, max_modes: int = 256) -> Report:
    r"""How biased is ``flow`` as an approximation of ``target``? The assembled bias report.

    Draws ``n`` samples :math:`x_i \sim q` of the flow (in one pass, keeping ``z`` and the
    per-coordinate slopes) and, when the target has an exact sampler or ``reference`` is given,
    ``n_exact`` samples :math:`y_j \sim p`, at which ``log q`` is evaluated through the inverse.
    Everything runs under :func:`torch.no_grad`.

    Entries of the :class:`Report` (``K`` modes, ``d`` dimensions):

    * always: ``n``, ``n_dropped`` (flow samples with NaN/+inf :math:`\log\tilde p` or
      non-finite ``x``/``log q``, dropped), ``frac_zero_density`` (fraction with
      :math:`\tilde p = 0`: kept as zero importance weights; they make the ELBO ``-inf``),
      ``elbo``, ``elbo_se``, ``log_z``, ``log_z_se`` (:func:`log_z_estimate`), ``ess``,
      ``pareto_k`` (``-inf`` when the weights are constant: a bounded tail),
      ``log_slope_quantiles``, ``log_slope_max``, ``max_slope``, ``inverse_residual_max``,
      ``inverse_residual_median`` (on ``n_inverse`` flow samples), ``seconds``, ``problems``
      (list of findings), ``verdict``;
    * if the target knows :math:`\log Z`: ``true_log_z``, ``kl_reverse`` = log Z − ELBO;
    * with target samples (exact or ``reference``): ``n_exact``, ``n_dropped_exact``,
      ``reference_source``, ``eubo``, ``eubo_se``, ``jeffreys`` = EUBO − ELBO,
      ``forward_ess`` (:func:`forward_ess`), ``forward_pareto_k`` (:func:`pareto_k` of the
      forward weights :math:`q/\tilde p`: above 0.7 the forward ESS is unreliable),
      ``sinkhorn``, ``sinkhorn_floor``, ``sinkhorn_reg``, ``sliced_w2``, ``sliced_w2_floor``,
      ``distance_n`` (:func:`sample_distances` on ``n_sub`` points each, the floor from two
      disjoint target subsamples); with :math:`\log Z` as well, ``kl_forward`` = EUBO − log Z;
      for ``d = 1`` also ``exact_log_slope_max``, ``exact_log_slope_q99``: the exact KR map's
      (:class:`~krflows.exact.KR1D`) log-slope at the same ``z``;
    * if the target has ``weights`` and ``assign``: ``mode_weights``, ``true_mode_weights``,
      ``mode_tv``, ``missing_modes``, ``missing_mass`` (:func:`missing_modes`); and
      ``valley_mass`` ± ``valley_mass_se``, ``valley_definition``, and with target samples
      (or a ``gap``) ``true_valley_mass`` ± ``true_valley_mass_se``. The valley is the gap
      for a 1-D target with a ``gap``, else :func:`valley_mask` with ``level = valley_level``
      (needs ``modes``, ``2 <= K <= max_modes``);
    * with ``functions``: ``expectations[name] = {is, is_se, flow, flow_se[, exact, exact_se]}``
      (:func:`self_normalized` vs the plain flow average vs the target samples' average).

    The verdict lists, most serious first: dropped samples; flow mass where :math:`\tilde p = 0`;
    missing modes (and their mass); mode TV > 0.05; valley mass above twice the target's;
    forward ESS < 0.5 (saying so when the forward weights' :math:`\hat k` > 0.7 makes it
    unreliable); EUBO − ELBO above 10 nats beyond three standard errors (target draws where
    the flow's density is almost zero); :math:`\hat k` > 0.7 (unreliable) or > 0.5; ESS < 0.05; both sample
    distances above 3x their floor; a large inverse residual. Else "no problems detected".

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

    Example:
        >>> from krflows import KRFlow, targets
        >>> flow = KRFlow(1, transform="affine", layers=0)
        >>> report = diagnose(flow, targets.Gaussian(dim=1), n=2000, seed=0)
        >>> round(report["ess"], 6), report["verdict"]
        (1.0, 'no problems detected (ESS 1.00, forward ESS 1.00, k̂ -inf)')
    """
    from krflows.targets import as_target

    target = as_target(target, dim=flow.dim)
    devices = [flow._ref.device] if flow._ref.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None), torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        return _diagnose(flow, target, n, reference, functions or {}, seed, n_exact or n,
                         n_sub, n_inverse, valley_level, max_modes)


def _rounding(log_p: Tensor, log_q: Tensor) -> float:
    """The rounding level of ``log p~ - log q``: 100 ulps of the largest magnitude met."""
    size = float(torch.cat([log_q.abs(), log_p[log_p > -math.inf].abs()]).max())
    return 100 * torch.finfo(log_q.dtype).eps * (1 + size)


def _diagnose(flow, target, n, reference, functions, seed, n_exact, n_sub, n_inverse,
              valley_level, max_modes) -> Report:
    start = time.perf_counter()
    e: dict[str, Any] = {}
    x, log_q, log_diag, z = _flow_samples(flow, n)
    log_p = target.log_prob(x)
    keep = _finite_rows(x, log_p, log_q)
    x, log_q, log_p, log_diag, z = x[keep], log_q[keep], log_p[keep], log_diag[keep], z[keep]
    e["n"], e["n_dropped"] = int(keep.sum()), int((~keep).sum())
    if e["n"] == 0:
        raise ValueError(f"no flow sample has a finite log-density under the target (n = {n})")
    log_w = (log_p.double() - log_q.double())
    e["frac_zero_density"] = float((log_p == -math.inf).double().mean())
    _importance(e, log_w, target.log_z, _rounding(log_p, log_q))

    y, source = _target_samples(target, reference, n_exact, x)
    log_p_y = None
    if y is not None:
        m = y.shape[0]
        y = y[torch.isfinite(y).all(-1)]  # the inverse accepts finite points only
        log_p_y, log_q_y = target.log_prob(y), flow.log_prob(y)
        keep_y = _finite_rows(y, log_p_y, log_q_y) & (log_p_y > -math.inf)
        e["n_exact"], e["n_dropped_exact"] = int(keep_y.sum()), m - int(keep_y.sum())
        e["reference_source"] = source
        y, log_p_y, log_q_y = y[keep_y], log_p_y[keep_y], log_q_y[keep_y]
        if y.shape[0]:
            _forward(e, log_p_y.double() - log_q_y.double(), _rounding(log_p_y, log_q_y))
    _modes(e, target, x, log_p, y, log_p_y, valley_level, max_modes)
    if y is not None:
        _distances(e, x, y, n_sub, seed)
    _conditioning(e, flow, target, x, z, log_diag, y, n_inverse)
    if functions:
        e["expectations"] = _expectations(functions, x, log_w, y)
    scale = float(x.double().std(0).mean()) if x.shape[0] > 1 else 1.0
    e["problems"] = _problems(e, scale)
    e["verdict"] = _verdict(e, e["problems"])
    e["seconds"] = time.perf_counter() - start
    return Report(e, title=f"krflows diagnostics: {type(target).__name__}(dim={target.dim}), "
                           f"{type(flow).__name__}")
