"""krflows: monotone triangular (Knothe-Rosenblatt) normalizing flows for Bayesian inference.

Direction convention: every map goes ``T: z -> x``, pushing the reference ``N(0, I)``
forward to the target; ``S = T^{-1}`` goes ``x -> z``.
"""

from krflows import diagnostics, exact, objectives, targets, transforms
from krflows.correct import debias, find_modes
from krflows.diagnostics import diagnose, summary, to_inference_data
from krflows.fit import fit
from krflows.flows import KRFlow
from krflows.io import load, save
from krflows.sparse import SparseKRFlow

__version__ = "0.1.0"

__all__ = ["KRFlow", "fit", "diagnose", "diagnostics", "exact", "objectives", "targets", "transforms",
           "__version__", "find_modes", "debias", "save", "load", "summary", "to_inference_data",
           "SparseKRFlow"]

# Submodules with heavy imports (Pyro, Lightning, POT) load on first access:
# ``krflows.pyro.AutoKRFlow`` works after a plain ``import krflows``.
_LAZY = ("pyro", "lightning", "callbacks", "cli", "ot", "plot", "distribution")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"krflows.{name}")
    raise AttributeError(f"module 'krflows' has no attribute {name!r}")
