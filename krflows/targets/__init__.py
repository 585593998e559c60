r"""Unnormalized posteriors with known truths: exact samplers, normalizing constants, modes.

A :class:`Target` is a density :math:`\tilde p(x) = \exp(\text{log\_prob}(x))` on
:math:`\mathbb{R}^d`, known up to the constant :math:`Z = \int \tilde p(x)\,dx`. Where the
truth is known a target also exposes

* ``log_z``, the float :math:`\log Z` (exact, or by quadrature where the docstring says so),
* ``sample(shape, generator=None)``, an exact sampler returning ``(*shape, d)``,
* for multimodal targets ``weights`` (the probability of each mode or component),
  ``modes`` (their locations) and ``assign(x)``, which maps points to mode indices.

Conventions. ``log_prob`` takes ``(*, d)`` and returns ``(*,)``; it is vectorised and
differentiable in ``x``. Unnormalized means *constants dropped*: every ``log_z`` below is
nonzero on purpose, so code that estimates :math:`\log Z` is tested against a nontrivial value.
Mixtures drop the :math:`(2\pi)^{d/2}` of their Gaussian components, so for them
:math:`\log Z = \tfrac d2 \log 2\pi`. Parameters live in ``target.dtype`` (default
:func:`torch.get_default_dtype`, i.e. float32) on ``target.device``; ``target.to(device, dtype)``
moves them. ``log_prob`` accepts any floating ``x``: if its dtype or device differ from the
target's, a converted copy of the target's constants is used (cached), and the result has the
dtype of ``x``. Build a target with ``dtype=torch.float64`` when its constants must be exact in
double precision.

Modules, by kind (a new target goes into the module of its kind and into :data:`TARGETS`):
:mod:`~krflows.targets.base` (the :class:`Target` class, wrappers, :func:`as_target`),
:mod:`~krflows.targets.gaussian` (unimodal), :mod:`~krflows.targets.mixtures` (multimodal),
:mod:`~krflows.targets.energies` (classic energies).

``fit`` and ``diagnose`` accept plain callables ``log_prob(x) -> (n,)`` through
:func:`as_target`. The command line looks targets up by name through :func:`get_target`.
"""

from __future__ import annotations

from krflows.targets.base import CallableTarget, DistributionTarget, Target, as_target
from krflows.targets.energies import ManyWell, TwoMoons
from krflows.targets.gaussian import Banana, Funnel, Gaussian
from krflows.targets.mixtures import Bimodal1D, Bimodal2D, GappedMixture1D, GaussianMixture, Mixture40, Ring

__all__ = [
    "Target",
    "CallableTarget",
    "DistributionTarget",
    "Gaussian",
    "Banana",
    "Funnel",
    "GaussianMixture",
    "Bimodal1D",
    "Bimodal2D",
    "Ring",
    "Mixture40",
    "GappedMixture1D",
    "TwoMoons",
    "ManyWell",
    "TARGETS",
    "as_target",
    "get_target",
]


TARGETS: dict[str, type[Target]] = {
    "gaussian": Gaussian,
    "banana": Banana,
    "funnel": Funnel,
    "mixture": GaussianMixture,
    "bimodal1d": Bimodal1D,
    "bimodal2d": Bimodal2D,
    "ring": Ring,
    "mixture40": Mixture40,
    "gapped1d": GappedMixture1D,
    "twomoons": TwoMoons,
    "manywell": ManyWell,
}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def get_target(name: str, **kwargs) -> Target:
    """Builds the target registered under ``name`` with keyword arguments ``kwargs``.

    Names are matched ignoring case, ``-`` and ``_``; class names work too
    (``"two-moons"``, ``"TwoMoons"``, ``"gappedmixture1d"``).

    Arguments:
        name: A key of :data:`TARGETS` or a target class name.
        kwargs: passed to the constructor.

    Example:
        >>> get_target("many_well", dim=8).dim
        8
    """
    lookup = {_key(k): cls for k, cls in TARGETS.items()}
    lookup.update({_key(cls.__name__): cls for cls in TARGETS.values()})
    cls = lookup.get(_key(name))
    if cls is None:
        raise ValueError(f"unknown target {name!r}; choose one of {sorted(TARGETS)}")
    return cls(**kwargs)
