r"""Importance weights and the estimators built on them: ESS, Pareto :math:`\hat k`, log Z, ELBO, EUBO.

Pure functions of tensors. ``log_w`` are :math:`\log \tilde p(x_i) - \log q(x_i)` at samples
:math:`x_i \sim q` of the flow, ``log_v`` the same at samples :math:`y_j \sim p` of the target
(compute both with :func:`krflows.importance.log_weights`). :func:`evidence` and
:func:`forward_evidence` are the stages of :func:`~krflows.diagnose` built from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ess", "log_z_estimate", "pareto_k", "psis_smooth",
           "mean_se", "elbo", "eubo", "forward_ess", "self_normalized",
           "pareto_k_or_bounded", "rounding_level", "Evidence", "evidence", "ForwardEvidence",
           "forward_evidence", "STARVED_NATS", "Tails", "tails"]

#: a target draw whose log weight log p~ - log q exceeds log Z by more than this is one the flow
#: gives almost no density (below e^-50 of the target's): its tails are far too light there
STARVED_NATS = 50.0


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


def _tail_fit(log_w: Tensor) -> tuple[float, float, float, int] | None:
    r"""The generalized Pareto fit of the upper tail of ``log_w`` (PSIS, Vehtari et al.):
    ``(k, sigma, log cutoff, tail size)`` on weights relative to the largest, or ``None``
    where there are too few weights (``N < 20`` or fewer than 5 in the tail)."""
    from pyro.ops.stats import fit_generalized_pareto

    # on the CPU: a few thousand weights, and Pyro's fit builds its grid there (a CUDA tensor
    # raised a device mismatch inside it)
    log_w = log_w.detach().reshape(-1).double().cpu()
    log_w = torch.sort(log_w - log_w.max())[0]
    n = log_w.numel()
    cut = -int(math.ceil(min(0.2 * n, 3.0 * math.sqrt(n)))) - 1
    if n < 20:
        return None
    cutoff = max(math.log(1e-15), float(log_w[cut]))
    tail = log_w[log_w > cutoff]
    if tail.numel() < 5:
        return None
    k, sigma = fit_generalized_pareto(tail.exp() - math.exp(cutoff))
    return float(k), float(sigma), cutoff, tail.numel()


def pareto_k(log_w: Tensor) -> float:
    r"""The PSIS shape estimate :math:`\hat k` of the importance weights' upper tail.

    Fits a generalized Pareto distribution (Pyro's ``fit_generalized_pareto``, Zhang &
    Stephens 2009) to the largest :math:`M = \min(N/5, 3\sqrt N)` weights, as in
    Vehtari et al. (2015) and ``pyro.infer.importance.psis_diagnostic``. Reading:
    < 0.5 good, 0.5–0.7 usable, > 0.7 unreliable (the weights' variance is infinite).
    """
    fit = _tail_fit(log_w)
    return float("nan") if fit is None else fit[0]


def psis_smooth(log_w: Tensor) -> tuple[Tensor, float]:
    r"""Pareto-smoothed importance weights (PSIS, Vehtari et al. 2024): ``(log_w smoothed, k)``.

    The largest :math:`M = \min(N/5, 3\sqrt N)` weights are replaced, in their order, by the
    quantiles :math:`F^{-1}\big((i - \tfrac12)/M\big)`, ``i = 1..M``, of the generalized
    Pareto distribution fitted to them (the fit of :func:`pareto_k`), capped at the largest
    raw weight. That lowers the variance of self-normalized estimates at a small bias, and
    :math:`\hat k` says whether they can be trusted (< 0.7). Where the fit is undefined
    (``N < 20``, a tail of fewer than 5 weights, :math:`\hat k` not finite) the weights come
    back unchanged. Pyro ships the fit but not the smoothing.

    Arguments:
        log_w: log importance weights ``(N,)`` (``-inf``: zero weight).

    Returns:
        the smoothed log weights ``(N,)`` float64 (same offset as ``log_w``) and :math:`\hat k`.

    Example:
        >>> log_w = torch.distributions.StudentT(2.0).sample((1000,)).abs().log() * 3
        >>> smoothed, k = psis_smooth(log_w)
        >>> bool(smoothed.max() <= log_w.max().double()), smoothed.shape
        (True, torch.Size([1000]))
    """
    log_w = log_w.detach().reshape(-1).double()
    fit = _tail_fit(log_w)
    if fit is None or not math.isfinite(fit[0]):
        return log_w.clone(), float("nan") if fit is None else fit[0]
    k, sigma, cutoff, m = fit
    top = log_w.max()
    order = torch.argsort(log_w)[-m:]  # the tail, ascending
    p = (torch.arange(1, m + 1, dtype=torch.float64, device=log_w.device) - 0.5) / m
    q = -sigma * torch.log1p(-p) if abs(k) < 1e-12 else sigma / k * ((1 - p) ** (-k) - 1)
    smoothed = log_w.clone()
    smoothed[order] = torch.log(math.exp(cutoff) + q).clamp(max=0.0) + top
    return smoothed, k


def mean_se(values: Tensor) -> tuple[Tensor, Tensor]:
    """The mean of ``values`` and its standard error, float64."""
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
    return mean_se(log_w)


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
    return mean_se(log_v)


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


def pareto_k_or_bounded(log_w: Tensor, tol: float) -> float:
    """:func:`pareto_k`, or ``-inf`` (the bounded-tail limit) when the weights are constant up
    to the rounding level ``tol`` of the log weights, where the fit is undefined."""
    finite = log_w[torch.isfinite(log_w)]
    constant = finite.numel() > 0 and float(finite.max() - finite.min()) <= tol
    return -math.inf if constant else pareto_k(log_w)


def rounding_level(log_p: Tensor, log_q: Tensor) -> float:
    """The rounding level of ``log p~ - log q``: 100 ulps of the largest magnitude met."""
    size = float(torch.cat([log_q.abs(), log_p[log_p > -math.inf].abs()]).max())
    return 100 * torch.finfo(log_q.dtype).eps * (1 + size)


@dataclass
class Evidence:
    """What the flow's own samples say (the report's keys)."""

    elbo: float
    elbo_se: float
    log_z: float
    log_z_se: float
    ess: float
    pareto_k: float
    true_log_z: float | None = None
    kl_reverse: float | None = None


def evidence(log_w: Tensor, true_log_z: float | None, tol: float) -> Evidence:
    """ELBO, IS log Z, ESS and :math:`\\hat k` of the flow's log-weights ``log_w`` (``-inf``:
    zero density, kept as zero weights in ``N``); ``tol`` is :func:`rounding_level`."""
    est, se = elbo(log_w)
    log_z, log_z_se = log_z_estimate(log_w)
    out = Evidence(float(est), float(se), float(log_z), float(log_z_se), float(ess(log_w)),
                   pareto_k_or_bounded(log_w, tol))
    if true_log_z is not None:
        out.true_log_z = float(true_log_z)
        out.kl_reverse = out.true_log_z - out.elbo
    return out


@dataclass
class ForwardEvidence:
    """What the target's samples say about the flow (the report's keys)."""

    eubo: float
    eubo_se: float
    jeffreys: float
    forward_ess: float
    forward_pareto_k: float
    forward_starved: int = 0
    forward_starved_max: float | None = None
    kl_forward: float | None = None


def forward_evidence(log_v: Tensor, tol: float, rev: Evidence) -> ForwardEvidence:
    """EUBO, the Jeffreys gap to ``rev``'s ELBO, the forward ESS and its :math:`\\hat k`, and the
    target draws the flow starves (:data:`STARVED_NATS`). The count is what the EUBO's own test
    cannot give: one draw with ``log q`` of -3e17 (a Cauchy target, a probe) makes the EUBO and
    its standard error equally huge, so "EUBO - ELBO beyond three standard errors" never fires."""
    est, se = eubo(log_v)
    kl = None if rev.true_log_z is None else float(est) - rev.true_log_z
    log_z = rev.true_log_z if rev.true_log_z is not None else rev.log_z
    excess = log_v.double() - log_z
    starved = int((excess > STARVED_NATS).sum())
    return ForwardEvidence(float(est), float(se), float(est) - rev.elbo, float(forward_ess(log_v)),
                           pareto_k_or_bounded(-log_v, tol), starved,
                           float(excess.max()) if starved else None, kl)


@dataclass
class Tails:
    """How the target's log density decays far from the flow's samples (the report's keys)."""

    tail_rays: int
    tail_rays_power: int
    tail_decay_ratio: float | None = None


#: multiples of the flow's spread along a ray at which the target's log density is read
TAIL_RADII = (8.0, 16.0, 32.0, 64.0)


def tails(target, x: Tensor, seed: int = 0) -> Tails | None:
    r"""Whether the target's tails are heavier than any flow's: along rays from the flow
    samples' median (each coordinate axis both ways, and ``2d`` random directions both ways),
    ``log p`` at 8, 16, 32 and 64 times the samples' spread along the ray. Where it decays at
    all three steps, the ratio of its last two decrements is 4 for Gaussian tails, 2 for
    exponential ones and 1 for a power of the distance (Student t, Cauchy: :math:`-(\nu + d) \log r`).
    A flow's tails are Gaussian (the spline's are linear, the affine stage is linear), so
    against power-law tails its importance weights are unbounded (:math:`k = 1` in the limit)
    while :math:`\hat k` from a finite sample can read 0.4-0.7: log Z and tail probabilities are
    then biased low with standard errors far too small (a probe: Cauchy, d = 10, k̂ 0.69, log Z
    15 standard errors low; d = 2, one report seed in twelve said "no problems detected").
    ``tail_rays_power`` counts the rays with a ratio below 1.5; ``None`` where the target cannot
    be read that far (it raises, or is ``-inf``: a bounded support). Reading it costs
    ``24 d`` evaluations of ``log p`` (``6 d`` rays)."""
    x = x.detach()
    n, d = x.shape
    if n < 2:
        return None
    centre = x.median(0).values
    g = torch.Generator(device="cpu").manual_seed(seed)
    rand = torch.randn(2 * d, d, generator=g, dtype=torch.float64).to(x)
    dirs = torch.cat([torch.eye(d, dtype=x.dtype, device=x.device), rand / rand.norm(dim=-1, keepdim=True)])
    dirs = torch.cat([dirs, -dirs])  # (4d, d)
    spread = ((x - centre) @ dirs.T).std(0)  # (4d,)
    radii = torch.tensor(TAIL_RADII, dtype=x.dtype, device=x.device)
    pts = centre + (radii[:, None, None] * spread[None, :, None]) * dirs[None]  # (4, 4d, d)
    try:
        with torch.no_grad():
            lp = target.log_prob(pts.reshape(-1, d)).double().reshape(len(TAIL_RADII), -1)
    except Exception:  # noqa: BLE001 - a target that cannot be read that far out: no verdict
        return None
    drop = lp[:-1] - lp[1:]  # (3, 4d): the decrements
    ok = torch.isfinite(lp).all(0) & (drop > 0).all(0) & (spread > 0)
    if not bool(ok.any()):
        return None
    ratio = drop[2][ok] / drop[1][ok]
    return Tails(int(ok.sum()), int((ratio < 1.5).sum()), float(ratio.min()))
