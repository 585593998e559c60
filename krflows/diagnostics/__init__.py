r"""Diagnostics of bias: pure functions of tensors, and :func:`diagnose`, which assembles them.

Where things live (a new diagnostic goes into the module of its topic, as a pure function
plus, if the report should show it, a field of that module's stage and a row of
:data:`~krflows.diagnostics.report.LAYOUT`):

* :mod:`~krflows.diagnostics.weights`: importance weights and estimators (ESS, Pareto
  :math:`\hat k`, log Z, ELBO, EUBO, forward ESS, self-normalized expectations);
* :mod:`~krflows.diagnostics.modes`: mode weights, missing modes, valley mass;
* :mod:`~krflows.diagnostics.distances`: sample distances (Sinkhorn, sliced W2) with noise floors;
* :mod:`~krflows.diagnostics.conditioning`: the map's slopes and the inverse's residual;
* :mod:`~krflows.diagnostics.report`: the report's layout (declared once), the verdict, :class:`Report`;
* :mod:`~krflows.diagnostics.pipeline`: :func:`diagnose`, the stages in order;
* :mod:`~krflows.diagnostics.summaries`: :func:`summary` (mean, sd, quantiles, ESS of draws,
  weighted or not, per site for Pyro) and :func:`to_inference_data` (ArviZ).

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

from krflows.diagnostics.conditioning import log_slope_summary
from krflows.diagnostics.distances import (
    sample_distances,
    sharp_sinkhorn_divergence,
    sinkhorn_divergence,
    sliced_w2,
)
from krflows.diagnostics.modes import missing_modes, mode_weights, proportion, total_variation, valley_mask
from krflows.diagnostics.pipeline import diagnose
from krflows.diagnostics.report import LAYOUT, Report
from krflows.diagnostics.summaries import Summary, summary, to_inference_data
from krflows.diagnostics.weights import (
    elbo,
    ess,
    eubo,
    forward_ess,
    log_z_estimate,
    pareto_k,
    psis_smooth,
    self_normalized,
)

__all__ = [
    "ess",
    "log_z_estimate",
    "pareto_k",
    "psis_smooth",
    "elbo",
    "eubo",
    "forward_ess",
    "self_normalized",
    "mode_weights",
    "total_variation",
    "missing_modes",
    "valley_mask",
    "proportion",
    "sharp_sinkhorn_divergence",
    "sinkhorn_divergence",
    "sliced_w2",
    "sample_distances",
    "log_slope_summary",
    "LAYOUT",
    "Report",
    "diagnose",
    "Summary",
    "summary",
    "to_inference_data",
]
