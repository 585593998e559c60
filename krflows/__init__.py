"""krflows: monotone triangular (Knothe-Rosenblatt) normalizing flows for Bayesian inference.

Direction convention: every map goes ``T: z -> x``, pushing the reference ``N(0, I)``
forward to the target; ``S = T^{-1}`` goes ``x -> z``.
"""

from krflows import exact, targets, transforms
from krflows.flows import KRFlow

__version__ = "0.1.0"

__all__ = ["KRFlow", "exact", "targets", "transforms", "__version__"]
