"""What removes bias: mode search (:func:`find_modes`) and the defensive mixture correction
(:func:`debias`). No Pyro needed (Pyro potentials are accepted)."""

from krflows.correct.mixture import DebiasResult, debias
from krflows.correct.modes import ModeSet, find_modes

__all__ = ["ModeSet", "find_modes", "DebiasResult", "debias"]
