r"""Conditioning of the map: its log-slopes (steep across valleys), the exact KR map's slopes
in 1-D, and the inverse's residual (:func:`conditioning`, the stage of :func:`~krflows.diagnose`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from krflows.exact import KR1D

__all__ = ["SLOPE_QUANTILES", "log_slope_summary", "Conditioning", "conditioning"]

SLOPE_QUANTILES = (0.01, 0.5, 0.99)


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


@dataclass
class Conditioning:
    """The map's slopes and inverse accuracy (the report's keys)."""

    log_slope_quantiles: dict[str, list[float]]
    log_slope_max: list[float]
    max_slope: float
    inverse_residual_max: float
    inverse_residual_median: float
    exact_log_slope_max: float | None = None
    exact_log_slope_q99: float | None = None


def conditioning(flow, target, x: Tensor, z: Tensor, log_diag: Tensor, y: Tensor | None,
                 n_inverse: int) -> Conditioning:
    """Log-slopes ``log_diag`` at reference points ``z`` (``x = T(z)``), the exact KR map's at
    the same ``z`` for a 1-D target with samples ``y``, and the inverse residual on ``n_inverse``
    of the points ``x``."""
    s = log_slope_summary(log_diag)
    res = flow.inverse_residual(x[:n_inverse]).double()
    out = Conditioning(s["quantiles"], s["max"], math.exp(min(s["max_overall"], 709.0)),
                       float(res.max()), float(res.median()))
    if flow.dim == 1 and y is not None:
        pts = torch.cat([x[:, 0], y[:, 0]]).double()
        lo, hi = float(pts.min()), float(pts.max())
        pad = 0.1 * (hi - lo) + 1e-6
        kr = KR1D.from_log_prob(lambda t: target.log_prob(t), lo - pad, hi + pad, n=8001)
        exact = kr.call_and_log_diag(z.double())[1][:, 0]
        out.exact_log_slope_max = float(exact.max())
        out.exact_log_slope_q99 = float(torch.quantile(exact, 0.99))
    return out
