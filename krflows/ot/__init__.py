r"""Optimal-transport toolbox: Gaussian W2, displacement interpolation, entropic plans, Langevin.

* :mod:`krflows.ot.gaussian`: :func:`wasserstein2_gaussian`, the closed-form 2-Wasserstein
  distance between Gaussians (the Bures metric); :func:`gaussian_ot_map`, the Brenier map
  attaining it; :func:`affine_transport_cost`; :func:`entropic_ot_gaussian`, the entropic
  cost in closed form (the oracle of the tests).
* :func:`interpolate` (:meth:`krflows.KRFlow.interpolate`), :class:`~krflows.transforms.Interpolated`
  and :func:`interpolate_affine` (they live in :mod:`krflows.transforms.interpolate`): the maps
  :math:`T_t = (1-t)\,\mathrm{Id} + t\,T` (``z -> x``). They stay lower triangular and
  monotone. *They are a W2 geodesic only when* ``T`` *is the Brenier map*, which a KR map is
  not (unless the target's coordinates are independent); for a KR map
  :math:`(T_t)_\# \mu_0` is a path of triangular pushforwards, not a geodesic.
* :mod:`krflows.ot.sinkhorn`: :func:`sinkhorn_plan` and :func:`barycentric_map`, entropic OT
  between sample sets (POT) and the conditional mean :math:`E_\gamma[y \mid x]` of its plan;
  :func:`sinkhorn_divergence`, the debiased entropic OT cost between sample sets
  (``krflows.diagnostics`` has :func:`~krflows.diagnostics.sharp_sinkhorn_divergence`, built
  on the plan's transport cost alone and clipped, and ``sliced_w2``).
* :mod:`krflows.ot.langevin`: :func:`ula` and :func:`mala`, Langevin samplers, the particle
  discretization of the Wasserstein gradient flow of :math:`\mathrm{KL}(\cdot \,\|\, p)` (a
  baseline, and the dynamics a flow's bias can be corrected with).

Costs are the squared Euclidean :math:`\lVert x - y \rVert^2` throughout (POT's convention;
the background text's :math:`\tfrac12 \lVert x - y \rVert^2` halves every cost and every
:math:`\varepsilon`).
"""


from __future__ import annotations

from torch.distributions import TransformedDistribution

from krflows.ot.gaussian import (
    affine_transport_cost,
    entropic_ot_gaussian,
    gaussian_ot_map,
    wasserstein2_gaussian,
)
from krflows.ot.langevin import LangevinResult, mala, ula
from krflows.ot.sinkhorn import barycentric_map, pot_points, sinkhorn_divergence, sinkhorn_plan
from krflows.transforms.interpolate import Interpolated, interpolate_affine

__all__ = [
    "wasserstein2_gaussian", "gaussian_ot_map", "affine_transport_cost", "Interpolated",
    "interpolate", "interpolate_affine", "sinkhorn_plan", "barycentric_map", "sinkhorn_divergence",
    "entropic_ot_gaussian", "pot_points", "LangevinResult", "ula", "mala",
]


def interpolate(flow, t: float) -> TransformedDistribution:
    r"""The law :math:`(T_t)_\# N(0, I)` of the interpolated flow ``z -> x``, ``T_t = (1-t) Id + t T``:
    ``flow.interpolate(t)`` (see :meth:`krflows.KRFlow.interpolate`).

    Arguments:
        flow: a :class:`krflows.KRFlow`.
        t: the time, in ``[0, 1]``.
    """
    return flow.interpolate(t)
