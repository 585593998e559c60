r"""Mode search without a reference: :func:`find_modes` and its result, :class:`ModeSet`.

Directions: nothing here is a map; points ``x`` live in the target's space (for a Pyro
potential, the unconstrained latent space), the space the flow ``T: z -> x`` pushes to.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from krflows.targets import Target, as_target

__all__ = ["ModeSet", "find_modes", "mahalanobis"]

_LOG_2PI = math.log(2 * math.pi)
_STEP_SIZES = (1.0, 0.5, 0.25, 0.125, 1 / 16, 1 / 64, 1 / 256)  # Newton line search, one batch


@dataclass
class ModeSet:
    r"""Distinct local maxima of :math:`\log \tilde p` with their Laplace approximations.

    Mode ``k`` is approximated by :math:`N(\mu_k, \Sigma_k)` with :math:`\Sigma_k = (-H_k)^{-1}`,
    :math:`H_k` the Hessian of :math:`\log\tilde p` at :math:`\mu_k`, and its mass by

    .. math:: \log M_k = \log \tilde p(\mu_k) + \tfrac d2 \log 2\pi - \tfrac12 \log\det(-H_k),
        \qquad w_k = M_k / \textstyle\sum_j M_j .

    Where :math:`-H_k` is not positive definite (``negative_definite[k]`` is False) its
    eigenvalues were floored before ``covariances`` and ``log_mass`` were computed (see
    :func:`find_modes`): those two are then regularized guesses, not approximations.

    Attributes:
        locations: :math:`\mu_k`, ``(k, d)``, sorted by ``log_mass``, largest first.
        log_density: :math:`\log \tilde p(\mu_k)`, ``(k,)``.
        log_mass: :math:`\log M_k`, ``(k,)``; ``logsumexp(log_mass)`` estimates :math:`\log Z`
            when the modes are Gaussian-like and well separated.
        covariances: :math:`\Sigma_k`, ``(k, d, d)``, positive definite.
        negative_definite: ``(k,)`` bool, whether :math:`H_k` was negative definite.
        stats: how the search went: ``starts`` (per source), ``converged``, ``saddles``,
            ``not_converged``, ``evaluations`` (points at which :math:`\log\tilde p` was
            evaluated), ``gradient_passes`` (backward passes, one per Hessian row too),
            ``seconds``.

    Example:
        >>> from krflows import targets
        >>> modes = find_modes(targets.Bimodal2D(separation=8.0, weights=[0.3, 0.7]),
        ...                    box=(-8.0, 8.0), n_starts=64, seed=0)
        >>> len(modes), modes.locations[:, 0].round(decimals=4).tolist()  # the means (+-4, 0)
        (2, [4.0, -4.0])
        >>> modes.weights.round(decimals=4).tolist()
        [0.7, 0.3]
    """

    locations: Tensor
    log_density: Tensor
    log_mass: Tensor
    covariances: Tensor
    negative_definite: Tensor
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.locations.shape[0]

    @property
    def dim(self) -> int:
        return self.locations.shape[-1]

    @property
    def weights(self) -> Tensor:
        """The Laplace mass fractions ``softmax(log_mass)``, ``(k,)``."""
        return torch.softmax(self.log_mass, 0)

    @property
    def scale_trils(self) -> Tensor:
        """Lower Cholesky factors of ``covariances``, ``(k, d, d)``."""
        return torch.linalg.cholesky(self.covariances)

    def __getitem__(self, index) -> ModeSet:
        """The modes selected by ``index`` (an int, slice, index or bool tensor), as a ModeSet."""
        if isinstance(index, int):
            index = [index]
        return ModeSet(self.locations[index], self.log_density[index], self.log_mass[index],
                       self.covariances[index], self.negative_definite[index], dict(self.stats))

    def mahalanobis(self, x: Tensor) -> Tensor:
        r"""Distances :math:`\lVert L_k^{-1}(x - \mu_k) \rVert` of points ``(n, d)`` to every mode,
        each in its own metric :math:`\Sigma_k = L_k L_k^\top`; returns ``(n, k)``."""
        x = self._points(x)
        tril = self.scale_trils
        return mahalanobis(x, self.locations, tril)

    def log_responsibilities(self, x: Tensor) -> Tensor:
        r"""Log posterior probabilities ``(n, k)`` of the modes under the Laplace mixture
        :math:`\sum_k w_k N(\mu_k, \Sigma_k)`."""
        maha = self.mahalanobis(x)
        log_det = self.scale_trils.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        joint = self.log_mass - log_det - 0.5 * maha.square()
        return joint - torch.logsumexp(joint, -1, keepdim=True)

    def assign(self, x: Tensor) -> Tensor:
        """The mode of highest Laplace-mixture responsibility of each point, LongTensor ``(n,)``."""
        if len(self) == 0:
            raise ValueError("the ModeSet is empty: no mode to assign points to")
        return self.log_responsibilities(x).argmax(-1)

    def mass(self, x: Tensor, log_w: Tensor | None = None, radius: float | None = None) -> Tensor:
        r"""The (weighted) fraction of points ``x`` that belong to each mode, ``(k,)`` float64.

        A point belongs to the mode :meth:`assign` gives it and, if ``radius`` is set, only
        if its :meth:`mahalanobis` distance to that mode is below ``radius`` (so the result
        sums to less than 1 when points lie elsewhere, e.g. in a valley).

        Arguments:
            x: points ``(n, d)``, e.g. flow samples.
            log_w: optional log importance weights ``(n,)`` (self-normalized).
            radius: optional Mahalanobis radius.
        """
        x = self._points(x)
        k = self.assign(x)
        w = torch.full((x.shape[0],), 1.0 / max(x.shape[0], 1), dtype=torch.float64, device=x.device)
        if log_w is not None:
            w = torch.softmax(log_w.double().reshape(-1), 0)
        if radius is not None:
            near = self.mahalanobis(x).gather(1, k[:, None])[:, 0] < radius
            w = w * near
        return torch.zeros(len(self), dtype=torch.float64, device=x.device).index_add_(0, k, w)

    def flow_mass(self, flow, n: int = 4096, radius: float | None = None) -> Tensor:
        """:meth:`mass` of ``n`` fresh samples of ``flow`` (its mass near each mode), ``(k,)``."""
        return self.mass(flow.sample((n,)), radius=radius)

    def _points(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (n, {self.dim}), got {got}")
        return x.to(self.locations)


def mahalanobis(x: Tensor, loc: Tensor, scale_tril: Tensor, budget: int = 2**22) -> Tensor:
    r"""Distances :math:`\lVert L_k^{-1}(x_i - \mu_k) \rVert`, ``(n, k)``, of points ``(n, d)``
    to ``k`` centres ``loc`` ``(k, d)`` with metrics ``scale_tril`` ``(k, d, d)``; computed in
    chunks of points so that the ``(k, d, chunk)`` temporary stays near ``budget`` elements."""
    size = max(1, budget // max(1, loc.shape[0] * x.shape[-1]))
    out = []
    for chunk in (torch.split(x, size) if x.shape[0] else (x,)):
        diff = (chunk[None] - loc[:, None]).mT  # (k, d, chunk)
        out.append(torch.linalg.solve_triangular(scale_tril, diff, upper=False).square().sum(1).sqrt().mT)
    return torch.cat(out)


# =============================================================================================
# derivatives of a batch (log p of a batch is a sum of independent terms)


def _log_prob(target: Target, x: Tensor) -> Tensor:
    out = target.log_prob(x)
    return torch.where(torch.isnan(out), torch.full_like(out, -math.inf), out)


def _gradient(target: Target, x: Tensor) -> tuple[Tensor, Tensor]:
    """``log p`` ``(n,)`` and its gradient ``(n, d)``: one backward pass of the batch's sum."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        lp = _log_prob(target, x)
        ok = torch.isfinite(lp)
        # a log p without a graph (constant where finite, e.g. a uniform on a box) is flat: gradient 0
        flat = not lp.requires_grad or not bool(ok.any())
        (g,) = (torch.zeros_like(x),) if flat else torch.autograd.grad(lp[ok].sum(), x)
    return lp.detach(), torch.where(ok[:, None], g, 0.0).nan_to_num(0.0, 0.0, 0.0)


def _hessian(target: Target, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""``log p`` ``(n,)``, gradients ``(n, d)`` and Hessians ``(n, d, d)`` of a batch.

    Since :math:`\log \tilde p` of a batch is a sum of per-point terms, row ``j`` of every
    point's Hessian is the gradient of :math:`\sum_i \partial_j \log\tilde p(x_i)`: ``d``
    backward passes through the batch, batched over the rows by ``is_grads_batched`` (vmap)
    where the target's operations support it, one at a time otherwise. Any target that
    autograd can differentiate twice works, Pyro models included.
    """
    n, d = x.shape
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        lp = _log_prob(target, x)
        ok = torch.isfinite(lp)
        if not bool(ok.any()) or not lp.requires_grad:  # no graph: flat where finite (see _gradient)
            return lp.detach(), torch.zeros_like(x), x.new_zeros(n, d, d)
        (g,) = torch.autograd.grad(lp[ok].sum(), x, create_graph=True)
        eye = torch.eye(d, dtype=x.dtype, device=x.device)[:, None, :].expand(d, n, d)
        try:
            (rows,) = torch.autograd.grad(g, x, eye, retain_graph=True, is_grads_batched=True,
                                          allow_unused=True)
        except (RuntimeError, NotImplementedError):  # an op without a batching rule: row by row
            rows = torch.stack([_row(g, x, j) for j in range(d)])
        if rows is None:
            rows = x.new_zeros(d, n, d)
    H = rows.permute(1, 0, 2)
    g = g.detach()
    bad = ok & torch.isfinite(g).all(-1) & ~torch.isfinite(H).flatten(1).all(-1)
    if bool(bad.any()):
        H = H.clone()
        H[bad] = _difference_hessian(target, x.detach()[bad])
    H = 0.5 * (H + H.mT)  # symmetric up to rounding
    H = torch.where(ok[:, None, None], H, 0.0).nan_to_num(0.0, 0.0, 0.0)
    return lp.detach(), torch.where(ok[:, None], g, 0.0).nan_to_num(0.0, 0.0, 0.0), H


def _difference_hessian(target: Target, x: Tensor) -> Tensor:
    """Hessians ``(m, d, d)`` by central differences of the gradient, for points where the second
    derivatives of autograd are not finite although ``log p`` and its gradient are. Written by
    hand for torch's ``logaddexp``, whose double backward is NaN where its arguments differ by
    more than a few hundred (found 2026-11-28, torch 2.13: the mixture ``logaddexp(a, b)`` of a
    component of sd 0.1 and one of sd 1, 6 apart, had a NaN Hessian at the broad mode, which
    then counted as no strict maximum and kept ``fit`` from covering both modes); mixtures are
    commonly written with it. Step ``eps^(1/3) (1 + |x_j|)``: errors ~1e-10 in float64."""
    m, d = x.shape
    h = torch.finfo(x.dtype).eps ** (1 / 3) * (1 + x.abs())  # (m, d)
    step = torch.diag_embed(h)  # (m, d, d): row j moves coordinate j
    pts = torch.cat([x[:, None, :] + step, x[:, None, :] - step], 1).reshape(-1, d)
    _, grads = _gradient(target, pts)
    grads = grads.reshape(m, 2, d, d)  # (point, +/-, moved coordinate j, gradient component)
    return (grads[:, 0] - grads[:, 1]) / (2 * h[..., None])


def _row(g: Tensor, x: Tensor, j: int) -> Tensor:
    (r,) = torch.autograd.grad(g[:, j].sum(), x, retain_graph=True, allow_unused=True)
    return torch.zeros_like(x) if r is None else r


# =============================================================================================
# starts


def _is_model_potential(target) -> bool:
    mod = sys.modules.get("krflows.pyro")
    return mod is not None and isinstance(target, mod.ModelPotential)


def _prior_draws(potential, m: int) -> Tensor:
    """``m`` draws of a Pyro model's prior, mapped to the potential's flat unconstrained space.

    One plain run of the model per draw (observed sites stay observed; latent sites are
    sampled from their priors), each site's value mapped by ``biject_to(support).inv``.
    """
    from pyro import poutine
    from torch.distributions import biject_to

    rows = []
    get_trace = poutine.block(poutine.trace(potential.model).get_trace)
    with torch.no_grad():
        for _ in range(m):
            trace = get_trace(*potential.args, **potential.kwargs)
            parts = []
            for name in potential.site_names:
                site = trace.nodes[name]
                parts.append(biject_to(site["fn"].support).inv(site["value"]).reshape(-1))
            rows.append(torch.cat(parts).to(potential.dtype))
    return torch.stack(rows) if rows else torch.zeros(0, potential.dim, dtype=potential.dtype)


def _as_box(box, d: int, dtype, device) -> tuple[Tensor, Tensor]:
    lo, hi = (torch.as_tensor(b, dtype=dtype, device=device).expand(d).clone() for b in box)
    if not bool((hi > lo).all()):
        raise ValueError(f"box must be (lo, hi) with lo < hi in every coordinate, got {box}")
    return lo, hi


def _starts(target, flow, starts, n, box, prior, inflate, dtype, device
            ) -> tuple[Tensor, dict[str, int], Tensor | None]:
    """The start points ``(m, d)``, their count per source, and the flow's samples (if any)."""
    d = target.dim
    parts: dict[str, Tensor] = {}
    if starts is not None:
        s = torch.as_tensor(starts, dtype=dtype, device=device).reshape(-1, d)
        parts["given"] = s
    use_prior = _is_model_potential(target) if prior is None else bool(prior)
    if use_prior and not _is_model_potential(target):
        raise ValueError("prior=True needs a Pyro potential (krflows.pyro.potential_from_model)")
    sources = (["flow"] if flow is not None else []) + (["prior"] if use_prior else [])
    if box is not None or flow is not None or (starts is None and not use_prior):
        sources.append("box")
    counts = [n // len(sources) + (i < n % len(sources)) for i in range(len(sources))] if sources else []
    x_flow = None
    if flow is not None:
        with torch.no_grad():
            x_flow = flow.sample((max(n, 1024),)).to(dtype=dtype, device=device)
    for name, m in zip(sources, counts, strict=True):
        if name == "flow":
            x = x_flow[:m]
            centre = x_flow.mean(0)
            f = 1 + (inflate - 1) * torch.rand(m, 1, dtype=dtype, device=device)
            parts["flow"] = centre + f * (x - centre)
        elif name == "prior":
            parts["prior"] = _prior_draws(target, m).to(dtype=dtype, device=device)
            parts["prior"] = torch.cat([target.init.to(parts["prior"])[None], parts["prior"]])
        else:
            if box is not None:
                lo, hi = _as_box(box, d, dtype, device)
            elif x_flow is not None:
                mid = 0.5 * (x_flow.amin(0) + x_flow.amax(0))
                half = 0.5 * inflate * (x_flow.amax(0) - x_flow.amin(0)).clamp(min=1e-6)
                lo, hi = mid - half, mid + half
            else:
                lo, hi = _as_box((-10.0, 10.0), d, dtype, device)
            parts["box"] = lo + (hi - lo) * torch.rand(m, d, dtype=dtype, device=device)
    x = torch.cat(list(parts.values()))
    return x, {k: v.shape[0] for k, v in parts.items()}, x_flow


# =============================================================================================
# the search


def _adam(target, x, scale, steps, lr, counter) -> Tensor:
    """Batched Adam ascent of ``log p`` in the standardized coordinates ``x / scale``.

    Adam's step is about ``lr`` per coordinate whatever the gradient's size, so after
    standardization every point moves at the same pace; cosine decay to ``lr / 100``.
    A point whose ``log p`` turns non-finite is put back to its last finite position.
    """
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    prev = x.clone()
    b1, b2 = 0.9, 0.999
    for t in range(1, steps + 1):
        lp, g = _gradient(target, x)
        counter["evaluations"] += x.shape[0]
        counter["gradient_passes"] += 1
        bad = ~torch.isfinite(lp)
        x = torch.where(bad[:, None], prev, x)
        g = torch.where(bad[:, None], 0.0, g) * scale
        m = torch.where(bad[:, None], 0.0, b1 * m + (1 - b1) * g)
        v = b2 * v + (1 - b2) * g.square()
        rate = lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (t - 1) / steps)))
        step = rate * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + 1e-12)
        prev = x
        x = x + step * scale
    return x


def _eig(H: Tensor, floor: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eigenvalues ``lam`` of ``-H`` (ascending), eigenvectors, and ``max(|lam|, floor)``."""
    lam, V = torch.linalg.eigh(-H)
    return lam, V, lam.abs().clamp(min=floor[..., None] if floor.dim() else floor)


def _newton(target, x, steps, floor, tol, max_step, scale, counter) -> Tensor:
    r"""Batched saddle-free Newton ascent: step :math:`|{-H}|^{-1} g`, eigenvalues floored,
    length capped at ``max_step`` standardized units, the best of a few step sizes per
    point (all points' candidates in one batch); converged points drop out."""
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    ts = torch.tensor(_STEP_SIZES, dtype=x.dtype, device=x.device)
    for _ in range(steps):
        idx = active.nonzero()[:, 0]
        if idx.numel() == 0:
            break
        xa = x[idx]
        lp, g, H = _hessian(target, xa)
        counter["evaluations"] += xa.shape[0]
        counter["gradient_passes"] += 1 + x.shape[1]
        _, V, lam = _eig(H, floor)
        step = V @ ((V.mT @ g[..., None])[..., 0] / lam)[..., None]
        step = step[..., 0]
        decrement = (g * step).sum(-1)
        done = decrement < _tolerance(tol, lp)
        ratio = ((step / scale).abs().amax(-1) / max_step).clamp(min=1.0)
        step = step / ratio[:, None]
        cand = xa[:, None] + ts[None, :, None] * step[:, None]  # (na, T, d)
        lpc = _log_prob(target, cand.reshape(-1, x.shape[1])).detach().reshape(len(idx), -1)
        counter["evaluations"] += lpc.numel()
        best, arg = lpc.max(1)
        better = best > lp  # converged points take their (tiny, accurate) last step too
        x = x.clone()
        x[idx[better]] = cand[better, arg[better]]
        active[idx[done | ~better]] = False  # converged, or no step size helps: final check decides
    return x


def _tolerance(tol: float, lp: Tensor) -> Tensor:
    """The Newton decrement below which a point counts as converged: ``tol`` nats, or the
    rounding level of ``log p`` when that is larger."""
    return torch.clamp(1e3 * torch.finfo(lp.dtype).eps * (1 + lp.abs()), min=tol)


def _dedupe(x: Tensor, lp: Tensor, precision: Tensor, radius: float) -> Tensor:
    """Indices of the distinct modes: greedily, highest density first, a point is merged into
    a kept one when each lies within Mahalanobis ``radius`` of the other (each point's own
    Laplace precision)."""
    remaining = torch.argsort(lp, descending=True)
    keep = []
    while remaining.numel():
        i = remaining[0]
        keep.append(int(i))
        diff = x[remaining] - x[i]
        d_i = torch.einsum("nd,de,ne->n", diff, precision[i], diff)
        d_own = torch.einsum("nd,nde,ne->n", diff, precision[remaining], diff)
        same = torch.maximum(d_i, d_own) < radius**2
        same[0] = True
        remaining = remaining[~same]
    return torch.tensor(keep, dtype=torch.long, device=x.device)


def _infer_dim(target, flow, starts, box) -> int | None:
    for obj in (target, flow):
        d = getattr(obj, "dim", None)
        if isinstance(d, int) and not isinstance(d, bool):
            return d
    if starts is not None:
        return int(torch.as_tensor(starts).shape[-1])
    if box is not None:
        for b in box:
            if torch.as_tensor(b).dim():
                return int(torch.as_tensor(b).shape[-1])
    return None


def _flow_device(flow) -> torch.device | None:
    device = getattr(flow, "device", None)  # KRFlow's public door; other flows: their parameters
    if device is not None:
        return device
    params = list(flow.parameters()) if hasattr(flow, "parameters") else []
    return params[0].device if params else None


def _working_dtype(target: Target, dtype, device) -> torch.dtype:
    """float64 when the target accepts it (krflows targets, most callables), else its own."""
    if dtype is not None:
        return dtype
    if target._castable:
        return torch.float64
    try:
        out = target.log_prob(torch.zeros(1, target.dim, dtype=torch.float64, device=device))
        return torch.float64 if out.dtype == torch.float64 else target.dtype
    except (RuntimeError, TypeError, ValueError):
        return target.dtype


def find_modes(target, flow=None, *, starts: Tensor | None = None, n_starts: int = 256,
               box: tuple | None = None, prior: bool | None = None, inflate: float = 3.0,
               adam_steps: int = 25, newton_steps: int | None = None, lr: float = 0.05,
               merge_radius: float = 1.0, tol: float = 1e-8,
               eigenvalue_floor: float | None = None, dtype: torch.dtype | None = None,
               seed: int | None = None) -> ModeSet:
    r"""Distinct local maxima of :math:`\log\tilde p` from many overdispersed starts, no reference needed.

    **Starts** (``n_starts`` split evenly among the sources that apply, plus any ``starts``):

    * ``flow`` samples inflated about their mean, :math:`c + f (x - c)`, with :math:`f` uniform
      in ``[1, inflate]`` per point;
    * uniform draws in ``box = (lo, hi)`` (scalars or ``(d,)``). Without a ``box`` but with a
      flow, the box is the range of 1024 flow samples, inflated ``inflate`` times about its
      middle; with neither, and no other source, it is :math:`[-10, 10]^d`;
    * for a Pyro potential (:func:`krflows.pyro.potential_from_model`), draws of the model's
      prior mapped to the unconstrained space (one model run each) and the potential's ``init``
      (``prior=None``: automatic; ``False``: off);
    * ``starts``, points ``(m, d)`` of the user's. Given alone, only they are used.

    **Search**, all points in one batch (:math:`\log\tilde p` of a batch is a sum of
    independent terms, so the batch's gradient and Hessian rows are per point):
    ``adam_steps`` of Adam in coordinates standardized by the starts' spread (a step of
    about ``lr`` spreads per coordinate whatever the gradient's size, cosine-decayed): a short
    walk uphill; then up to ``newton_steps`` saddle-free Newton steps
    :math:`x \leftarrow x + t\, V |\Lambda|^{-1} V^\top g` (:math:`-H = V \Lambda V^\top`,
    :math:`|\Lambda|` floored, the step capped at one spread per coordinate), ``t`` the best
    of 7 step sizes in ``[1/256, 1]`` evaluated in one batch, until the Newton decrement
    :math:`g^\top |{-H}|^{-1} g` is below ``tol`` nats (or the rounding level of
    :math:`\log\tilde p`). Hessians by autograd: ``d`` backward passes of the batch, vmapped
    where possible (``is_grads_batched``), so any twice-differentiable target works.

    **Classification** at the end, from the eigenvalues :math:`\lambda` of :math:`-H`
    (:math:`\epsilon = \sqrt{\text{machine eps}} \cdot \max|\lambda|`):
    not converged (decrement above 10 times the tolerance, or :math:`\log\tilde p` not
    finite; e.g. a density unbounded at a funnel neck): dropped;
    a saddle (:math:`\lambda_{\min} < -\epsilon`: an ascent direction exists): dropped;
    :math:`\lambda_{\min} > \epsilon`: a strict maximum, ``negative_definite = True``;
    otherwise (flat ridge, funnel neck: :math:`|\lambda_{\min}| \le \epsilon`) kept with
    ``negative_definite = False``. The counts are in ``stats``.

    **Regularization.** Eigenvalues of :math:`-H` are floored at ``eigenvalue_floor``
    (default :math:`1/R^2`, ``R`` the largest coordinate range of the starts: no mode is
    taken to be wider than the region searched) before the covariance
    :math:`V \max(\Lambda, \text{floor})^{-1} V^\top` and the Laplace log mass are computed;
    this changes nothing for a strict maximum narrower than the searched region.

    **Deduplication**: highest density first, a point is merged into a kept mode when each
    lies within Mahalanobis distance ``merge_radius`` of the other under its own covariance.

    **Cost.** In passes over the batch of ``n`` starts (only the points still active count):
    ``adam_steps`` gradients; per Newton iteration one gradient, ``d`` Hessian rows and 7
    forward line-search evaluations; one final Hessian. At most
    ``adam_steps + (newton_steps + 1)(d + 1)`` backward passes, which the default
    ``newton_steps`` keeps near 330 for every ``d`` (333 for ``d = 10``), plus
    ``7 newton_steps`` forward passes; 500 training steps at batch ``n`` cost 500 target
    gradients *plus* 500 forward/backward passes of the flow. Measured (2 shared CPU cores,
    ``n_starts = 256``, median of 3; 500 steps of ``fit(KRFlow(d), ..., batch_size=256)``):

    =============================  ===========  ======  ===========  =============
    target (starts)                find_modes   modes   grad passes  500 steps
    =============================  ===========  ======  ===========  =============
    0.3/0.7 mixture, 2-D (flow)    0.07 s       2       37           21 s
    4-mode mixture, 10-D (flow)    0.11 s       4       69           20 s
    eight schools, Pyro (prior)    0.86 s       1       333          22 s
    ``Funnel(10)`` (box)           0.28 s       1       333          22 s
    =============================  ===========  ======  ===========  =============

    Adam alone (300 steps) left most starts unconverged on Banana and TwoMoons; Newton alone
    converged as well as Adam + Newton; the short Adam phase is kept as a cheap guard against
    starts where the Hessian is uninformative.

    Arguments:
        target: a krflows target or a callable ``log_prob(x) -> (n,)``.
        flow: optional fitted flow (``sample``), the source of starts and of the box.
        starts: optional user start points ``(m, d)``.
        n_starts: starts drawn from the automatic sources together.
        box: ``(lo, hi)``, scalars or ``(d,)`` each.
        prior: draw starts from a Pyro model's prior (default: when the target is a Pyro potential).
        inflate: the flow samples' and the derived box's inflation factor.
        adam_steps, lr: the Adam phase (``lr`` in units of the starts' spread).
        newton_steps: Newton iterations at most (default ``min(30, max(5, 300 // (d + 1)))``).
        merge_radius: the deduplication radius (Mahalanobis).
        tol: Newton decrement (nats) at convergence.
        eigenvalue_floor: floor of the eigenvalues of :math:`-H` (see above).
        dtype: working dtype (default float64 when the target accepts it).
        seed: seeds all draws (the global RNG state is restored afterwards).

    Returns:
        a :class:`ModeSet`, sorted by Laplace log mass (empty, with a warning, if no start
        converged).

    Example:
        >>> from krflows import targets
        >>> target = targets.Banana()  # one mode, at (0, -b s^2) = (0, -3)
        >>> modes = find_modes(target, box=(-20.0, 20.0), n_starts=32, seed=0)
        >>> (modes.locations.round(decimals=6) + 0.0).tolist(), bool(modes.negative_definite[0])
        ([[0.0, -3.0]], True)
        >>> round(float(modes.log_mass[0]), 4), round(target.log_z, 4)  # exact: Gaussian in x_0
        (4.1405, 4.1405)
    """
    t0 = time.perf_counter()
    dim = _infer_dim(target, flow, starts, box)
    if dim is None:
        raise ValueError("the dimension is unknown: pass a flow, starts (m, d) or a box of (d,) tensors")
    target = as_target(target, dim=dim)
    device = _flow_device(flow) or target.device
    dtype = _working_dtype(target, dtype, device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        x, sources, _ = _starts(target, flow, starts, n_starts, box, prior, inflate, dtype, device)
    counter = {"evaluations": x.shape[0], "gradient_passes": 0}
    with torch.no_grad():
        lp0 = _log_prob(target, x)
    x = x[torch.isfinite(lp0) & torch.isfinite(x).all(-1)]
    if x.shape[0] == 0:
        raise ValueError(f"no start has a finite log density (starts per source: {sources})")
    spread = x.std(0) if x.shape[0] > 1 else x.new_ones(dim)
    scale = torch.where(spread > 0, spread, x.new_ones(dim))
    extent = float((x.amax(0) - x.amin(0)).max()) if x.shape[0] > 1 else 1.0
    floor = torch.as_tensor(eigenvalue_floor if eigenvalue_floor is not None
                            else 1.0 / max(extent, 1e-12) ** 2, dtype=dtype, device=device)
    x = _adam(target, x, scale, adam_steps, lr, counter)
    if newton_steps is None:  # keeps the Hessians' backward passes near 300 for any d
        newton_steps = min(30, max(5, 300 // (dim + 1)))
    x = _newton(target, x, newton_steps, floor, tol, 1.0, scale, counter)
    result = _classify(target, x, floor, tol, merge_radius, counter)
    result.stats.update(starts=sources, seconds=time.perf_counter() - t0, **counter)
    if len(result) == 0:
        warnings.warn(f"find_modes: no start converged to a local maximum ({result.stats}); "
                      f"try more newton_steps (here {newton_steps} at d = {dim}: the default keeps the "
                      f"Hessians' cost near 300 backward passes) or adam_steps, or other starts; or log p "
                      f"has no local maximum "
                      f"(e.g. it is unbounded at a funnel neck)", RuntimeWarning,
                      stacklevel=2)
    return result


def _classify(target, x, floor, tol, merge_radius, counter) -> ModeSet:
    lp, g, H = _hessian(target, x)
    counter["evaluations"] += x.shape[0]
    counter["gradient_passes"] += 1 + x.shape[1]
    lam, V, lam_abs = _eig(H, floor)
    decrement = (g * (V @ ((V.mT @ g[..., None])[..., 0] / lam_abs)[..., None])[..., 0]).sum(-1)
    eps = math.sqrt(torch.finfo(x.dtype).eps) * lam.abs().amax(-1)
    finite = torch.isfinite(lp) & torch.isfinite(lam).all(-1)
    converged = finite & (decrement < 10 * _tolerance(tol, lp))
    saddle = converged & (lam[:, 0] < -eps)
    keep = converged & ~saddle
    stats = {"converged": int(converged.sum()), "saddles": int(saddle.sum()),
             "not_converged": int((~converged).sum())}
    x, lp, lam, V = x[keep], lp[keep], lam[keep], V[keep]
    nd = lam[:, 0] > eps[keep]
    lam_f = lam.clamp(min=floor)
    precision = V @ torch.diag_embed(lam_f) @ V.mT
    cov = V @ torch.diag_embed(1 / lam_f) @ V.mT
    log_mass = lp + 0.5 * x.shape[1] * _LOG_2PI - 0.5 * lam_f.log().sum(-1)
    idx = _dedupe(x, lp, precision, merge_radius) if x.shape[0] else x.new_zeros(0, dtype=torch.long)
    idx = idx[torch.argsort(log_mass[idx], descending=True)]
    cov = 0.5 * (cov + cov.mT)
    return ModeSet(x[idx], lp[idx], log_mass[idx], cov[idx], nd[idx], stats)
