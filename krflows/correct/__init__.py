"""Corrections of a fitted flow's bias: what turns its samples into (asymptotically) exact ones.

* :mod:`~krflows.correct.resampling`: importance resampling (SIR), independence
  Metropolis–Hastings and self-normalized expectations, with the importance weights
  :math:`w = \tilde p / q` of the flow's samples.

A new correction goes into its own module here and is exported below. No Pyro needed.
"""

from krflows.correct.resampling import (
    IMHResult,
    Resampled,
    importance_resample,
    independence_mh,
    self_normalized_expectation,
)

__all__ = ["Resampled", "importance_resample", "self_normalized_expectation", "IMHResult", "independence_mh"]
