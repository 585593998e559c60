r"""Safeguarded root finding for elementwise monotone functions, with implicit gradients.

Solves :math:`f(z) = y` elementwise for a strictly increasing :math:`f`, by bracketing
and safeguarded Newton iteration ("rtsafe"): a Newton step is taken when it stays inside
the current bracket and is under half the step before last, a bisection step otherwise, and
the bracket shrinks every iteration.
Convergence is therefore guaranteed (bisection) and usually quadratic (Newton).

Gradients never flow through the iterations. The converged root ``z*`` is detached and
one differentiable Newton step ``z = z* - (f(z*) - y) / f'(z*)`` is taken, which at the
root has exactly the implicit-function-theorem derivatives
:math:`\partial z/\partial y = 1/f'` and :math:`\partial z/\partial\theta = -(\partial f/\partial\theta)/f'`.

torch has no batched bracketed root finder (``torch.optimize`` does not exist and
nflows bisects a fixed 25 steps without gradients), hence this module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["solve_monotone", "default_tolerance"]

#: ``f(z, params) -> (f(z), log f'(z))``, elementwise over ``z`` with parameters ``(*, P)``.
ValueAndLogDeriv = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def default_tolerance(dtype: torch.dtype) -> float:
    """The stated tolerance on the root: iteration stops once a step is below
    ``tol * (1 + |z|)``; ``1e-12`` in float64 and ``1e-5`` in float32 (a few ulps above
    machine precision, which the bracket cannot go below)."""
    return 1e-12 if dtype == torch.float64 else 1e-5


def solve_monotone(
    f: ValueAndLogDeriv,
    y: Tensor,
    params: Tensor,
    lo: float,
    hi: float,
    guess: Tensor | None = None,
    tol: float | None = None,
    max_iter: int = 100,
) -> tuple[Tensor, Tensor]:
    r"""Solves ``f(z, params) = y`` for ``z``, with ``f`` strictly increasing in ``z``.

    Arguments:
        f: returns ``(f(z), log f'(z))`` elementwise; differentiable in ``params``.
        y: the targets, shape ``(*)``.
        params: parameters, shape ``(*, P)``; gradients reach them implicitly.
        lo, hi: an initial bracket. It is widened (by its width, repeatedly) until
            ``f(lo) <= y <= f(hi)`` everywhere.
        guess: an optional starting point ``(*)`` (e.g. the previous pass's solution);
            otherwise the secant between the bracket's ends.
        tol: step tolerance relative to ``1 + |z|`` (default :func:`default_tolerance`).
        max_iter: iteration cap; only the points not yet converged are evaluated.

    Returns:
        ``(z, residual)``: the root, differentiable by the implicit function theorem, and
        ``|f(z*) - y|`` at the converged (detached) root, both of shape ``(*)``.

    Example:
        >>> f = lambda z, p: (z**3 + p[..., 0] * z, torch.log(3 * z**2 + p[..., 0]))
        >>> y = torch.tensor([0.5, 30.0], dtype=torch.float64)
        >>> p = torch.ones(2, 1, dtype=torch.float64)
        >>> z, res = solve_monotone(f, y, p, -1.0, 1.0)
        >>> bool(torch.allclose(z**3 + z, y)) and bool((res < 1e-9).all())
        True
    """
    tol = default_tolerance(y.dtype) if tol is None else tol
    with torch.no_grad():
        yf, pf = y.detach().reshape(-1), params.detach().reshape(-1, params.shape[-1])
        lo_t, hi_t, f_lo, f_hi = _bracket(f, yf, pf, lo, hi)
        if guess is not None:
            g = guess.detach().reshape(-1)
            z = torch.where((g > lo_t) & (g < hi_t), g, 0.5 * (lo_t + hi_t))
        else:
            frac = ((yf - f_lo) / (f_hi - f_lo)).nan_to_num(0.5).clamp(0, 1)
            z = lo_t + frac * (hi_t - lo_t)
        active = torch.arange(yf.numel(), device=y.device)
        # the last two steps' sizes (rtsafe's dx, dxold), the bracket's width to start with
        dx, dx_old = hi_t - lo_t, hi_t - lo_t
        for _ in range(max_iter):
            za, ya, la, ha = z[active], yf[active], lo_t[active], hi_t[active]
            fz, log_df = f(za, pf[active])
            r = fz - ya
            la = torch.where(r < 0, za, la)
            ha = torch.where(r > 0, za, ha)
            newton = za - r * torch.exp(-log_df)
            inside = (newton > la) & (newton < ha)  # False for NaN as well
            # a Newton step that is not under half the step before last bisects instead (rtsafe's
            # progress test): steps that stay inside the bracket without shrinking it can cycle
            # (a probe: a 2-cycle between z = -0.45 and -2.54 for 100 iterations, z off by 1.7)
            fast = (newton - za).abs() * 2 <= dx_old[active].abs()
            z_new = torch.where(inside & fast, newton, 0.5 * (la + ha))
            z_new = torch.where(r == 0, za, z_new)  # an exact root stays
            done = (z_new - za).abs() <= tol * (1 + z_new.abs())
            z[active], lo_t[active], hi_t[active] = z_new, la, ha
            dx_old[active], dx[active] = dx[active], z_new - za
            active = active[~done]
            if active.numel() == 0:
                break
        z = z.reshape(y.shape)
    # One differentiable Newton step from the detached root: implicit gradients.
    fz, log_df = f(z, params)
    residual = (fz - y).abs().detach()
    return z - (fz - y) * torch.exp(-log_df), residual


def _bracket(f: ValueAndLogDeriv, y: Tensor, params: Tensor, lo: float, hi: float):
    """Widens ``[lo, hi]`` until it brackets every root; returns the ends and ``f`` there."""
    lo_t, hi_t = torch.full_like(y, lo), torch.full_like(y, hi)
    f_lo, f_hi = f(lo_t, params)[0], f(hi_t, params)[0]
    for _ in range(64):
        below, above = f_lo > y, f_hi < y
        if not bool((below | above).any()):
            return lo_t, hi_t, f_lo, f_hi
        # only the failing points are re-evaluated
        for mask, end, val, step in ((below, lo_t, f_lo, -1.0), (above, hi_t, f_hi, 1.0)):
            idx = mask.nonzero().squeeze(-1)
            if idx.numel():
                width = hi_t[idx] - lo_t[idx]
                end[idx] = end[idx] + step * width
                val[idx] = f(end[idx], params[idx])[0]
    raise RuntimeError("could not bracket the root: is the map increasing and unbounded?")
