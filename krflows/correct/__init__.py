r"""Corrections of a fitted flow's bias: what turns its samples into (asymptotically) exact ones.

* :mod:`~krflows.correct.resampling`: importance resampling (SIR), independence
  Metropolis–Hastings and self-normalized expectations, with the importance weights
  :math:`w = \tilde p / q` of the flow's samples.
* :mod:`~krflows.correct.modes`: :func:`find_modes`, the target's distinct local maxima with
  Laplace masses, found without reference samples.
* :mod:`~krflows.correct.mixture`: :func:`debias`, importance sampling from a defensive
  mixture of the flow and heavy-tailed components at the found modes, which recovers modes
  the flow never sampled.

A new correction goes into its own module here and is exported below. No Pyro needed.
"""

from krflows.correct.mixture import DebiasResult, debias
from krflows.correct.modes import ModeSet, find_modes
from krflows.correct.resampling import (
    IMHResult,
    Resampled,
    importance_resample,
    independence_mh,
    self_normalized_expectation,
)

__all__ = ["Resampled", "importance_resample", "self_normalized_expectation", "IMHResult", "independence_mh",
           "ModeSet", "find_modes", "DebiasResult", "debias"]
