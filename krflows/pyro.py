r"""Pyro integration: model potentials, the ``AutoKRFlow`` autoguide, and debiasing.

* :func:`potential_from_model` turns a Pyro model into a krflows :class:`~krflows.targets.Target`
  on Pyro's unconstrained latent space: ``log_prob(x)`` is the log joint plus the
  ``log|det|`` of the bijections ``u -> biject_to(support)(u)``, vectorized over a batch.
* :class:`AutoKRFlow` is an :class:`~pyro.infer.autoguide.AutoContinuous` guide whose
  posterior over the flat unconstrained latent is a :class:`~krflows.KRFlow` (``z -> x``,
  lower triangular in the latent order of the model's sites). It works with ``SVI``,
  ``Predictive`` and :class:`~pyro.infer.reparam.NeuTraReparam` (NUTS in the reference space).
* :func:`neutra_nuts` runs NUTS in the flow's reference space.
* :func:`importance_resample`, :func:`self_normalized_expectation` and
  :func:`independence_mh` (re-exported from :mod:`krflows.correct`, which needs no Pyro)
  correct a fitted flow's bias with importance weights :math:`w = \tilde p / q`.

Note: this module is ``krflows.pyro``, but absolute imports are in force, so inside it
``import pyro`` is the top-level Pyro package, not this module.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import Transform, biject_to, constraints

from krflows._checks import renamed_keyword
from krflows.correct.resampling import (
    IMHResult,
    Resampled,
    importance_resample,
    independence_mh,
    self_normalized_expectation,
)
from krflows.flows import KRFlow
from krflows.sparse import SparseKRFlow
from krflows.targets import Target
from krflows.train import warm_up

__all__ = [
    "ModelPotential",
    "SubsampledPotentialWarning",
    "subsampled_plates",
    "potential_from_model",
    "AutoKRFlow",
    "importance_resample",
    "self_normalized_expectation",
    "independence_mh",
    "neutra_nuts",
    "Resampled",
    "IMHResult",
]


# =============================================================================================
# model potentials


class SubsampledPotentialWarning(UserWarning):
    """A model potential built from a model that subsamples a plate: a noisy estimate."""


class _Site(NamedTuple):
    name: str
    shape: torch.Size  # constrained value shape (plate dims included)
    unconstrained_shape: torch.Size
    event_dim: int  # event dims of the unconstrained value
    size: int
    bijection: Transform  # unconstrained -> constrained
    fn_event_dim: int


def subsampled_plates(trace) -> dict[str, tuple[int, int]]:
    """``{plate name: (subsample size, full size)}`` of the plates of a trace that subsample."""
    out = {}
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        for f in site["cond_indep_stack"]:
            if f.full_size is not None and f.size != f.full_size:
                out[f.name] = (int(f.size), int(f.full_size))
    return out


def _subsampled_latents(trace) -> dict[str, dict[str, tuple[int, int]]]:
    """``{latent site: {subsampled plate: (subsample size, full size)}}`` of a trace's latent sites
    that lie in a subsampled plate."""
    out = {}
    for name, site in trace.iter_stochastic_nodes():
        frames = {f.name: (int(f.size), int(f.full_size)) for f in site["cond_indep_stack"]
                  if f.full_size is not None and f.size != f.full_size}
        if frames and not site_is_subsample(site):
            out[name] = frames
    return out


def _latent_sites(trace, subsampled_ok: bool = False) -> tuple[list[_Site], int]:
    """The continuous latent sites of a trace, in trace order, and the max plate nesting."""
    latents = [(name, site) for name, site in trace.iter_stochastic_nodes() if not site_is_subsample(site)]
    local = sorted(_subsampled_latents(trace))
    if local and not subsampled_ok:
        raise ValueError(f"latent site(s) {local} lie in a subsampled plate: a potential is a density on "
                         f"one fixed-size joint latent, so local latents must be sampled in full (build it "
                         f"from the full-data model, subsample_size=None). For minibatch SVI, AutoKRFlow's "
                         f"sparse guide pushes only the members in the batch")
    discrete = [name for name, site in latents
                if getattr(site["fn"].support, "is_discrete", False)]
    if discrete:
        raise ValueError(f"krflows needs continuous latent sites, but the model has discrete latent "
                         f"site(s) {discrete}: sum them out by hand in the model (e.g. a mixture's "
                         f"assignments into its likelihood with logsumexp; Pyro's enumeration, "
                         f"infer={{'enumerate': ...}}, is not supported) or hide them with poutine.block")
    sites, nesting = [], 0
    for site in trace.nodes.values():
        if site["type"] == "sample":
            dims = [-f.dim for f in site["cond_indep_stack"] if f.vectorized]
            nesting = max([nesting, *dims])
    for name, site in latents:
        bijection = biject_to(site["fn"].support)
        value = site["value"].detach()
        u_shape = bijection.inv(value).shape
        event_dim = site["fn"].event_dim + len(u_shape) - value.dim()
        sites.append(_Site(name, value.shape, u_shape, event_dim, math.prod(u_shape), bijection,
                           site["fn"].event_dim))
    if not sites:
        raise ValueError("the model has no latent sample sites")
    return sites, nesting


class ModelPotential(Target):
    r"""A Pyro model's unnormalized log posterior on its flat unconstrained latent space.

    For ``x = (u_1, ..., u_S)`` the concatenation of the flattened unconstrained values of
    the latent sites (in the order the model samples them),

    .. math:: \log \tilde p(x) = \log p\big(y, \theta = b(x)\big) + \log |\det J_b(x)| ,

    with ``b`` the sitewise bijections ``biject_to(support)``: exactly the negative of
    Pyro's ``potential_fn`` from :func:`pyro.infer.mcmc.util.initialize_model`.

    The batch is evaluated in one model run: the model is conditioned on a batch of values
    and run inside a ``pyro.plate`` of size ``n`` left of its own plates, as
    ``Trace_ELBO(vectorize_particles=True)`` does. The model must therefore broadcast over
    that batch dimension. If it does not, pass ``vectorize=False``: one model run per point
    (``n`` times slower, but it works for any fixed-structure model).

    **Subsampling.** If the model subsamples a plate of observations
    (``pyro.plate(..., subsample_size=b)``), every evaluation runs the model again and so
    draws a fresh minibatch, scaled by ``N / b``: ``log_prob`` is then an unbiased but
    *noisy* estimate of the full-data log density (one minibatch shared by the points of a
    batch). That is fine for stochastic variational inference, and wrong for everything that
    needs the density itself (:func:`independence_mh`, :func:`importance_resample`,
    :func:`~krflows.diagnose`, NUTS): the constructor warns, and ``subsampled_plates``
    names the plates. Build the potential of the full-data model instead (e.g. with
    ``subsample_size=None``). Latent sites inside a subsampled plate raise ``ValueError``: the
    potential is a density on one fixed-size latent, and a minibatch holds other members at each
    run. (Minibatch SVI of such models needs no potential: :class:`AutoKRFlow` with its sparse
    flow pushes only the members in the batch, see **Minibatch SVI** there.)

    Arguments:
        model: a Pyro model with continuous latent sites and fixed structure.
        args, kwargs: the model's arguments (kept; every evaluation uses them).
        vectorize: evaluate a batch in one model run (default) or one point at a time.

    Attributes:
        subsampled_plates: ``{plate: (subsample size, full size)}``; empty for an exact potential.
        dim: the number of unconstrained coordinates.
        site_names: the latent sites, in the order of the coordinates.
        site_shapes: ``{name: constrained shape}``; ``unconstrained_shapes`` likewise.
        init: the prototype run's latent values, unconstrained, shape ``(dim,)``.

    Example:
        >>> def model():
        ...     s = pyro.sample("s", dist.HalfNormal(1.0))
        ...     pyro.sample("y", dist.Normal(0.0, s), obs=torch.tensor(0.5))
        >>> potential = potential_from_model(model)
        >>> potential(torch.zeros(4, 1)).shape
        torch.Size([4])
        >>> potential.unpack(torch.zeros(4, 1))["s"].shape
        torch.Size([4])
    """

    _castable = False  # the model's own tensors fix the dtype

    def __init__(self, model: Callable, *args, vectorize: bool = True, **kwargs):
        trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
        self._sites, self.max_plate_nesting = _latent_sites(trace)
        self.subsampled_plates = subsampled_plates(trace)
        if self.subsampled_plates:
            warnings.warn(f"the model subsamples plate(s) {self.subsampled_plates} ((subsample, full) "
                          f"sizes): this potential is a noisy minibatch estimate of the log density, "
                          f"fine for stochastic VI but not for IMH, importance resampling, diagnose or "
                          f"NUTS; build it from the full-data model (subsample_size=None) for those",
                          SubsampledPotentialWarning, stacklevel=3)
        values = [trace.nodes[s.name]["value"].detach() for s in self._sites]
        dtype = torch.promote_types(values[0].dtype, torch.get_default_dtype())
        super().__init__(sum(s.size for s in self._sites), dtype=dtype, device=values[0].device)
        self.model, self.args, self.kwargs, self.vectorize = model, args, kwargs, vectorize
        init = [s.bijection.inv(v).reshape(-1) for s, v in zip(self._sites, values, strict=True)]
        self.init = torch.cat(init).to(dtype)

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self._sites]

    @property
    def site_shapes(self) -> dict[str, torch.Size]:
        return {s.name: s.shape for s in self._sites}

    @property
    def unconstrained_shapes(self) -> dict[str, torch.Size]:
        return {s.name: s.unconstrained_shape for s in self._sites}

    def _split(self, x: Tensor, pad: int):
        """Yields ``(site, u)`` with ``u`` of shape ``(n, *[1] * k, *unconstrained_shape)``,
        ``k`` ones so that the batch dim lies ``pad`` dims left of the site's batch dims."""
        n, pos = x.shape[0], 0
        for s in self._sites:
            batch_dims = len(s.unconstrained_shape) - s.event_dim
            ones = (1,) * max(0, pad - batch_dims)
            yield s, x[:, pos:pos + s.size].reshape(n, *ones, *s.unconstrained_shape)
            pos += s.size

    def unpack(self, x: Tensor) -> dict[str, Tensor]:
        """Flat unconstrained points ``(*, dim)`` -> ``{name: constrained value (*, *shape)}``."""
        self._check(x)
        return _unpack(self._sites, x)

    def _log_prob(self, x: Tensor) -> Tensor:
        batch, flat = x.shape[:-1], x.reshape(-1, self.dim)
        if self.vectorize:
            try:
                out = self._log_prob_batch(flat)
            except (RuntimeError, ValueError) as err:  # typically a shape mismatch of .expand(...)
                if type(err) not in (RuntimeError, ValueError):
                    raise
                raise type(err)(f"{err}\n(krflows evaluates a Pyro model on a batch of points in one "
                                f"run: a model that does not broadcast over a leading batch dimension, "
                                f"e.g. latents made with .expand(...) instead of pyro.plate, needs "
                                f"potential_from_model(model, ..., vectorize=False), one run per point)"
                                ) from err
        else:  # one plain model run per point: n times the cost of the vectorized path
            out = torch.stack([self._log_prob_point(row) for row in flat]) if len(flat) else flat[:, 0]
        return out.reshape(batch)

    def _log_prob_point(self, x: Tensor) -> Tensor:
        """The log density at one point ``(dim,)``, by one run of the model as written."""
        values, log_det, pos = {}, {}, 0
        for s in self._sites:
            u = x[pos:pos + s.size].reshape(s.unconstrained_shape)
            pos += s.size
            values[s.name] = s.bijection(u)
            log_det[s.name] = s.bijection.log_abs_det_jacobian(u, values[s.name]).sum()
        model = poutine.condition(self.model, data=values)
        trace = poutine.block(poutine.trace(model).get_trace)(*self.args, **self.kwargs)
        return trace.log_prob_sum() + sum(d * trace.nodes[k]["scale"] for k, d in log_det.items())

    def _log_prob_batch(self, x: Tensor) -> Tensor:
        n, nesting = x.shape[0], self.max_plate_nesting
        values, log_dets = {}, {}
        for s, u in self._split(x, nesting):
            value = s.bijection(u)
            ladj = s.bijection.log_abs_det_jacobian(u, value)
            values[s.name] = value
            log_dets[s.name] = sum_rightmost(ladj, ladj.dim() - value.dim() + s.fn_event_dim)

        def run():
            with pyro.plate("_krflows_points", n, dim=-nesting - 1):
                return poutine.trace(poutine.condition(self.model, data=values)).get_trace(
                    *self.args, **self.kwargs)

        trace = poutine.block(run)()
        trace.compute_log_prob()
        out = x.new_zeros(n)
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and not site_is_subsample(site):
                out = out + _per_point(site["log_prob"], n, nesting, name)
            if name in log_dets:  # the Jacobian is scaled (subsampling) like the site's density
                out = out + _per_point(log_dets[name] * site["scale"], n, nesting, name)
        return out

    def __repr__(self) -> str:
        return f"ModelPotential(dim={self.dim}, sites={self.site_names})"


@contextmanager
def _outside_inference():
    """Runs the block as if no Pyro handler were active.

    The guide's first call happens inside SVI's handlers (a trace, the plate of vectorized
    particles at ``dim = -max_plate_nesting - 1``); its warm-up evaluates the model's potential,
    a separate computation whose own points plate takes that same dim, and Pyro refused it
    ("plates collide") whenever ``max_plate_nesting`` was given exactly. Pyro has no public way
    to step outside its handlers, so the handler stack and the plates' dim allocator are set
    aside and restored afterwards (pyro-ppl 1.9 internals; tests/test_pyro.py guards this).
    """
    from pyro.poutine import runtime

    stack, dims = runtime._PYRO_STACK[:], runtime._DIM_ALLOCATOR._stack[:]
    runtime._PYRO_STACK.clear()
    runtime._DIM_ALLOCATOR._stack.clear()
    try:
        yield
    finally:
        runtime._PYRO_STACK[:] = stack
        runtime._DIM_ALLOCATOR._stack[:] = dims


def _unpack(sites: Sequence[_Site], x: Tensor) -> dict[str, Tensor]:
    """Flat unconstrained points ``(*, Σ size)`` -> ``{name: constrained value (*, *shape)}``."""
    batch, pos, out = x.shape[:-1], 0, {}
    for s in sites:
        u = x[..., pos:pos + s.size].reshape(batch + s.unconstrained_shape)
        out[s.name] = s.bijection(u).reshape(batch + s.shape)
        pos += s.size
    return out


def _per_point(t: Tensor, n: int, nesting: int, name: str) -> Tensor:
    """Sums a batch-shaped tensor over everything but the point dim ``-nesting - 1``."""
    t = torch.as_tensor(t)
    if t.dim() > nesting + 1 or (t.dim() == nesting + 1 and t.shape[0] not in (1, n)):
        raise ValueError(f"site {name!r} has batch shape {tuple(t.shape)} for {n} points and "
                         f"{nesting} plate dims: the model does not broadcast over a batch dim left "
                         f"of its plates (index event dims as x[..., i]), or pass vectorize=False")
    t = t.reshape(*t.shape[:t.dim() - nesting], -1).sum(-1) if t.dim() > nesting else t.sum()
    return torch.broadcast_to(t.reshape(-1) if t.dim() else t, (n,))


def potential_from_model(model: Callable, *args, vectorize: bool = True, **kwargs) -> ModelPotential:
    """The unnormalized log posterior of ``model(*args, **kwargs)`` on the unconstrained
    latent space, as a krflows target (see :class:`ModelPotential`)."""
    return ModelPotential(model, *args, vectorize=vectorize, **kwargs)


# =============================================================================================
# the autoguide


class _OnePassTransform(Transform):
    """Wraps a triangular ``z -> x`` so that ``x`` and ``log|det|`` come from one pass.

    ``cache_size=1`` lets ``TransformedDistribution.log_prob`` of a just-drawn sample find
    its ``z`` without the (sequential) inverse.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(self, inner, order: Tensor | None = None):
        super().__init__(cache_size=1)
        self.inner, self.order = inner, order  # x[..., order] is the triangular map's output
        self._last: tuple[Tensor, Tensor, Tensor] | None = None

    def _call(self, z: Tensor) -> Tensor:
        x, ladj = self.inner.call_and_ladj(z)
        if self.order is not None:
            x = x[..., torch.argsort(self.order)]
        self._last = (z, x, ladj)
        return x

    def _inverse(self, x: Tensor) -> Tensor:
        return self.inner.inv(x if self.order is None else x[..., self.order])

    def log_abs_det_jacobian(self, z: Tensor, x: Tensor) -> Tensor:
        if self._last is not None and self._last[0] is z and self._last[1] is x:
            return self._last[2]
        return self.inner.log_abs_det_jacobian(z, x if self.order is None else x[..., self.order])


def _split_members(y: Tensor, g: int, shapes: Sequence[torch.Size]) -> tuple[Tensor, list[Tensor]]:
    """``(n, g + Σ b m)`` -> the globals ``(n, g)`` and each plate's members ``(n, b, m)``."""
    out, pos = [], g
    for b, m in shapes:
        out.append(y[:, pos:pos + b * m].reshape(-1, b, m))
        pos += b * m
    return y[:, :g], out


class _MinibatchLayout:
    """Where the latent sites of a model with subsampled member plates lie in the sparse flow.

    The flow covers the *full* latent: the prototype's sites (trace order) with each subsampled
    member plate's axis at its full size ``J`` (its "user order", as ``median``/``quantiles``
    unpack it); ``order`` puts the globals first and then each plate's members, as
    :class:`~krflows.plates.PlateStructure` does. ``unpack`` places a minibatch push (the
    globals and ``b`` members per plate) into the sites of the current subsample.
    """

    def __init__(self, trace, found, subsampled: dict[str, dict[str, tuple[int, int]]]):
        local_of = {site: p.name for p in found.plates for site in p.sites}
        self.subsampled: dict[str, tuple[int, int]] = {}
        for site, frames in subsampled.items():
            for plate, sizes in frames.items():
                if local_of.get(site) != plate:
                    why = found.refused.get(plate) or found.refused.get("*") or \
                        f"the site belongs to member plate {local_of.get(site)!r}"
                    raise ValueError(f"latent site {site!r} lies in subsampled plate {plate!r}, which cannot "
                                     f"be a member plate of the sparse flow ({why}): the sparse guide "
                                     f"subsamples only member plates (drop subsample_size for {plate!r})")
                self.subsampled[plate] = sizes
        self.globals = found.globals.numel()
        self.plate_names = [p.name for p in found.plates]
        self.layout = [(self.subsampled.get(p.name, (0, p.members))[1], p.width) for p in found.plates]
        self.sites: list[dict] = []
        self.full_sites: list[_Site] = []
        g_pos, cols = 0, [0] * len(found.plates)
        global_index: list[Tensor] = []
        member_index: list[list[Tensor]] = [[] for _ in found.plates]
        offset = 0
        for name, site in trace.iter_stochastic_nodes():
            if site_is_subsample(site):
                continue
            bijection, value = biject_to(site["fn"].support), site["value"].detach()
            u_shape = bijection.inv(value).shape
            fn_event_dim = site["fn"].event_dim
            event_dim = fn_event_dim + len(u_shape) - value.dim()
            shape, u_full, axis, plate = list(value.shape), list(u_shape), None, None
            if name in local_of:
                plate = self.plate_names.index(local_of[name])
                frame = next(f for f in site["cond_indep_stack"] if f.name == local_of[name])
                axis = len(u_shape) - event_dim + frame.dim
                u_full[axis] = shape[value.dim() - fn_event_dim + frame.dim] = self.layout[plate][0]
            size = math.prod(u_full)
            index = offset + torch.arange(size).reshape(u_full)
            offset += size
            if plate is None:
                span, g_pos = (g_pos, g_pos + size), g_pos + size
                global_index.append(index.reshape(-1))
            else:
                m = size // self.layout[plate][0]
                span, cols[plate] = (cols[plate], cols[plate] + m), cols[plate] + m
                member_index[plate].append(index.movedim(axis, 0).reshape(self.layout[plate][0], m))
            self.sites.append({"name": name, "bijection": bijection, "fn_event_dim": fn_event_dim,
                               "u_shape": u_shape, "event_dim": event_dim, "plate": plate, "axis": axis,
                               "span": span})
            self.full_sites.append(_Site(name, torch.Size(shape), torch.Size(u_full), event_dim, size,
                                         bijection, fn_event_dim))
        assert g_pos == self.globals and cols == [m for _, m in self.layout], "layout differs from the plates"
        order = torch.cat([*global_index, *(torch.cat(ix, 1).reshape(-1) for ix in member_index)])
        self.order = None if bool((order == torch.arange(offset)).all()) else order.tolist()

    def full_init(self, loc: Tensor) -> Tensor:
        """The prototype's flat initial latent -> the full one (user order): a member outside the
        prototype's subsample gets the mean of the subsample's initial values (exchangeable priors)."""
        parts, pos = [], 0
        for s, full in zip(self.sites, self.full_sites, strict=True):
            size = math.prod(s["u_shape"])
            u = loc[pos:pos + size].reshape(s["u_shape"])
            pos += size
            if s["plate"] is not None:
                u = u.mean(s["axis"], keepdim=True).expand(full.unconstrained_shape)
            parts.append(u.reshape(-1))
        return torch.cat(parts)

    def unpack(self, y_g: Tensor, y_members: Sequence[Tensor], lead: torch.Size):
        """Yields ``(site, unconstrained value)`` shaped as ``AutoContinuous`` unpacks a latent with
        batch shape ``lead``, from the globals ``(n, g)`` and the members ``(n, b, m)`` pushed."""
        n = y_g.shape[0]
        for s in self.sites:
            a, b = s["span"]
            u_shape = list(s["u_shape"])
            if s["plate"] is None:
                flat = y_g[:, a:b]
            else:
                y_p = y_members[s["plate"]]
                u_shape[s["axis"]] = y_p.shape[1]
                rest = u_shape[:s["axis"]] + u_shape[s["axis"] + 1:]
                flat = y_p[..., a:b].reshape(n, y_p.shape[1], *rest).movedim(1, 1 + s["axis"]).reshape(n, -1)
            shape = torch.broadcast_shapes(tuple(u_shape), tuple(lead) + (1,) * s["event_dim"])
            yield s, flat.reshape(*lead, -1).reshape(shape)


def _elementwise_sign(bijection: Transform) -> Tensor | None:
    """``+1``/``-1`` (a number or per element) for an elementwise monotone bijection, else ``None``."""
    if bijection.domain.event_dim != 0 or bijection.codomain.event_dim != 0:
        return None
    try:
        return torch.as_tensor(bijection.sign)
    except NotImplementedError:
        return None


class AutoKRFlow(AutoContinuous):
    r"""An autoguide whose posterior over the flat unconstrained latent is a :class:`~krflows.KRFlow`.

    The guide draws ``z ~ N(0, I)``, maps it through the flow's triangular map ``T: z -> x``
    (lower triangular in the order the model samples its sites, and coordinate by coordinate
    within a site), then each site's block of ``x`` through ``biject_to(support)``.

    Scale: on the first call the flow's affine stage is set to ``N(init_loc, init_scale^2 I)``
    (``init_loc`` from ``init_loc_fn``) and then fitted by ``warmup`` steps of Gaussian
    variational inference on the model's potential (:func:`krflows.fit.warm_up`), so the
    spline boxes start in standardized units around the posterior.

    Arguments:
        model: a Pyro model with continuous latent sites and fixed structure.
        family, layers, hidden, flow_options: passed to :class:`~krflows.KRFlow`
            (``transform=`` is the deprecated name of ``family``).
        init_scale: the affine stage's initial scale.
        init_loc_fn: per-site initialization (Pyro's ``init_to_*``).
        warmup: Gaussian-VI steps of the affine stage on the first call (0: off).
        warmup_batch: samples per warm-up step.
        sparse: ``None`` (default): a :class:`~krflows.SparseKRFlow` over the model's plates
            where that is valid, else the dense flow; ``False``: always dense; ``True``: sparse
            or ``ValueError`` (see **Plates** below).
        embedding: the sparse flow's learned member embedding size.
        member_features: feed each member's observed values to its conditioner.

    Attributes (after the first call):
        flow: the :class:`~krflows.KRFlow` (a :class:`~krflows.SparseKRFlow` for plated models);
        ``potential``: the :class:`ModelPotential` of the first call's arguments (for
        :func:`independence_mh` and friends); ``plate_structure``: the
        :class:`~krflows.plates.PlateStructure` found (``None`` with ``sparse=False``).

    **Plates.** With ``sparse=None`` (default) the guide reads the model's plates
    (:func:`krflows.plates.detect_plates`): when the model factorizes over a plate (its local
    latents are conditionally independent across members given the other latents), the flow is
    a :class:`~krflows.SparseKRFlow` whose map for member ``j`` depends only on the globals and
    member ``j``: cost and parameters linear in the plate size instead of ``d^2``. The member
    conditioner sees a learned embedding of size ``embedding`` and, with ``member_features``,
    the member's observed values. Nested plates fold into the outer member's block; a plate
    that some site outside it reads as a whole (``y ~ N(sum(eta), 1)``), or that is crossed with
    the chosen one, contributes globals instead (:attr:`plate_structure` says which and why;
    if no plate qualifies the flow is the dense ``KRFlow``, with a warning when plates were
    refused). ``sparse=False``: always dense; ``sparse=True``: raises if no plate qualifies.

    Minibatch SVI: the guide trains under ``pyro.plate(..., subsample_size=b)`` over
    observations (the warm-up then uses the minibatch estimate of the log density, which
    is unbiased, as VI needs). But the first call's potential would be a noisy minibatch
    estimate, so ``potential`` raises ``ValueError`` for such a model: build the full-data
    potential with :func:`potential_from_model` for IMH, SIR, ``diagnose`` and the like.
    Latent sites inside a subsampled plate are not supported (``ValueError``): the guide is one
    joint flow over all members, so every member is pushed at every step.

    Summaries: :meth:`median` and :meth:`quantiles` are computed from the flow and are the
    same on every call (exact for the leading latent coordinate, fixed quasi-random draws for
    the others). Saving: ``pyro.get_param_store().save(path)``; a guide built with the same
    options then takes the flow back from a loaded store (on its first call, or on the next
    call or summary if the store is loaded later), and refuses a store whose flow does not fit.
    """

    #: fixed quasi-random draws behind :meth:`quantiles` and :meth:`median` (a power of 2)
    quantile_draws: int = 2**15

    def __init__(self, model: Callable, family: str = "spline", layers: int = 2,
                 hidden: Sequence[int] = (32, 32), init_scale: float = 0.1,
                 init_loc_fn: Callable = init_to_median, warmup: int = 100, warmup_batch: int = 64,
                 sparse: bool | None = None, embedding: int = 8, member_features: bool = True,
                 create_plates: Callable | None = None, **flow_options):
        if init_scale <= 0:
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        family = renamed_keyword(flow_options, "transform", "family", family, "spline")
        super().__init__(model, init_loc_fn=init_loc_fn)
        self.create_plates = create_plates  # Pyro's AutoGuide option (AutoContinuous drops it)
        self._raw_model = (model,)  # a tuple: not registered as a submodule
        self._flow_args = dict(family=family, layers=layers, hidden=tuple(hidden), **flow_options)
        self._init_scale, self._warmup, self._warmup_batch = init_scale, warmup, warmup_batch
        self._sparse, self._embedding, self._member_features = sparse, embedding, member_features
        self.flow = None
        self.plate_structure = None  # krflows.plates.PlateStructure after the first call (not sparse=False)
        self._potential = None
        self._minibatch: _MinibatchLayout | None = None  # latents in subsampled plates

    @property
    def potential(self) -> ModelPotential | None:
        """The model's potential for the first call's arguments (``None`` before it)."""
        if self._minibatch is not None:
            raise ValueError(f"the model's latent sites lie in subsampled plate(s) "
                             f"{self._minibatch.subsampled} ((subsample, full) sizes): a potential needs "
                             f"every member, so build it from the full-data model with "
                             f"potential_from_model(model, *full_data_args) (subsample_size=None)")
        if self._potential is not None and self._potential.subsampled_plates:
            raise ValueError(f"the model subsamples plate(s) {self._potential.subsampled_plates} "
                             f"((subsample, full) sizes), so the guide's potential would be a noisy "
                             f"minibatch estimate of log p: build the full-data one with "
                             f"potential_from_model(model, *full_data_args) (subsample_size=None)")
        return self._potential

    def _setup_prototype(self, *args, **kwargs):
        with torch.random.fork_rng(devices=[]):  # leaves the caller's random stream as it was
            trace = poutine.block(poutine.trace(self._raw_model[0]).get_trace)(*args, **kwargs)
        _latent_sites(trace, subsampled_ok=True)  # names discrete sites
        subsampled = _subsampled_latents(trace)
        if subsampled:
            return self._setup_minibatch(subsampled, *args, **kwargs)
        declared = self._declared_subsampling(trace, *args, **kwargs)
        if declared:  # a full-data first call of a guide built for minibatches
            try:
                return self._setup_minibatch(declared, *args, **kwargs)
            except ValueError:  # those plates cannot be member plates: the full-data guide, as before
                self.prototype_trace, self._minibatch = None, None
        with warnings.catch_warnings():  # a minibatch potential is fine for the warm-up (VI)
            warnings.simplefilter("ignore", SubsampledPotentialWarning)
            potential = ModelPotential(self._raw_model[0], *args, **kwargs)  # names discrete sites
        super()._setup_prototype(*args, **kwargs)
        names = [name for name, _ in self.prototype_trace.iter_stochastic_nodes()]
        assert names == potential.site_names, f"site order differs: {names} vs {potential.site_names}"
        flow = self._build_flow(*args, **kwargs).to(potential.dtype)
        restored = self._sync_param_store(flow)  # a loaded param store wins (or fails loudly)
        if flow.affine is not None and not restored:
            loc = self._init_loc().to(potential.dtype)
            # variances alone: no d x d matrix for the sparse stage
            flow.initialize_gaussian(loc, torch.full_like(loc, self._init_scale ** 2))
            if self._warmup > 0:
                with _outside_inference():  # e.g. inside SVI's vectorized-particles plate
                    warm_up(flow, potential, steps=self._warmup, batch_size=self._warmup_batch)
        self._potential = potential
        self.flow = flow  # registered with the param store (pyro.module) on first access

    def _build_flow(self, *args, **kwargs) -> KRFlow:
        """A :class:`~krflows.SparseKRFlow` over the model's plates where valid, else a ``KRFlow``."""
        if self._sparse is False:
            return KRFlow(self.latent_dim, **self._flow_args)
        from krflows.plates import detect_plates

        found = detect_plates(self._raw_model[0], *args, trace=self.prototype_trace,
                              features=self._member_features, **kwargs)
        self.plate_structure = found
        if not found.plates:
            why = found.refused or "no latent site lies in a vectorized pyro.plate"
            if self._sparse:
                raise ValueError(f"sparse=True, but no plate of the model can make the map sparse: {why}")
            if found.refused:
                warnings.warn(f"AutoKRFlow: no plate makes the map sparse ({why}); using the dense "
                              f"KRFlow (cost d^2 at d = {self.latent_dim})", stacklevel=3)
            return KRFlow(self.latent_dim, **self._flow_args)
        order = found.order
        identity = bool((order == torch.arange(order.numel())).all())
        return SparseKRFlow(found.globals.numel(), found.layout, order=None if identity else order.tolist(),
                            embedding=self._embedding, features=[p.features for p in found.plates],
                            **self._flow_args)

    def _declared_subsampling(self, trace, *args, **kwargs) -> dict[str, dict[str, tuple[int, int]]]:
        """The latent sites of ``trace`` in plates that ``create_plates`` makes (those the model
        subsamples in minibatch calls), as :func:`_subsampled_latents` would list them in such a
        call (here at full size). A guide with ``create_plates`` then has the minibatch guide's
        flow whatever its first call: a probe's guide restored from a minibatch-trained param
        store and first called on the full data (``Predictive``) built the full-data flow, whose
        member features did not fit the stored weights; one first called on the full data could
        not then train on minibatches."""
        if self.create_plates is None or self._sparse is False:
            return {}
        with torch.random.fork_rng(devices=[]), poutine.block():  # a plate's subsample is a site
            made = self.create_plates(*args, **kwargs)
        names = {p.name for p in ([made] if isinstance(made, pyro.plate) else made)}
        out = {}
        for name, site in trace.iter_stochastic_nodes():
            frames = {f.name: (int(f.size), int(f.size)) for f in site["cond_indep_stack"]
                      if f.vectorized and f.name in names}
            if frames and not site_is_subsample(site):
                out[name] = frames
        return out

    def _setup_minibatch(self, subsampled: dict, *args, **kwargs):
        """Setup for latents in subsampled plates (``subsampled``, as :func:`_subsampled_latents`
        lists them): a sparse flow over every member, pushed per minibatch."""
        from krflows.plates import detect_plates

        super()._setup_prototype(*args, **kwargs)
        if self._sparse is False:
            raise ValueError(f"latent site(s) {sorted(subsampled)} lie in a subsampled plate: only the "
                             f"sparse flow can push a minibatch of members (sparse=None or True); the dense "
                             f"flow is one joint map of every member (drop subsample_size for their plate)")
        found = detect_plates(self._raw_model[0], *args, trace=self.prototype_trace,
                              features=self._member_features, **kwargs)
        self.plate_structure = found
        self._minibatch = layout = _MinibatchLayout(self.prototype_trace, found, subsampled)
        features = [None if p.name in layout.subsampled else p.features for p in found.plates]
        flow = SparseKRFlow(found.globals.numel(), layout.layout, order=layout.order,
                            embedding=self._embedding, features=features, **self._flow_args)
        loc = self._init_loc()
        flow = flow.to(torch.promote_types(loc.dtype, torch.get_default_dtype()))
        if flow.affine is not None and not self._sync_param_store(flow):
            loc = layout.full_init(loc.to(flow.dtype))
            flow.initialize_gaussian(loc, torch.full_like(loc, self._init_scale ** 2))
        self.latent_dim = flow.dim
        self.flow = flow

    def forward(self, *args, **kwargs):
        """The guide: draws every latent site (:class:`~pyro.infer.autoguide.AutoContinuous`'s
        ``forward``, or with latents in subsampled plates, the globals and the batch's members)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if self._minibatch is None:
            return super().forward(*args, **kwargs)
        return self._forward_minibatch(*args, **kwargs)

    def _forward_minibatch(self, *args, **kwargs) -> dict[str, Tensor]:
        r"""Pushes the globals and the members of the current subsample only, scored by factor.

        Auxiliary sites: ``z_G ~ N(0, I)`` and, inside each member plate, ``z_j ~ N(0, I_m)``;
        then ``y = T(z)`` on those coordinates (:meth:`~krflows.SparseKRFlow.push_factors`) and
        ``Delta`` sites carrying ``-log|∂T/∂z|``: outside the plate the globals' term, inside it
        member ``j``'s. So the guide's ``log q`` is ``log q_G(y_G) + Σ_j log q_j(y_j | y_G)``
        with each member's term scaled ``J/b`` by Pyro, like the model's local terms.
        """
        self._sync_param_store(self._modules["flow"])
        flow, layout = self.flow, self._minibatch
        plates = self._create_plates(*args, **kwargs)
        aux = {"is_auxiliary": True}
        name = self._pyro_name
        zeros = torch.zeros(layout.globals, dtype=flow.dtype, device=flow.device)
        z_g = pyro.sample(f"_{name}_z_globals", dist.Normal(zeros, 1.0).to_event(1), infer=aux)
        lead = z_g.shape[:-1]
        n = math.prod(lead)
        members, z_members = [], []
        for p, (J, m) in zip(layout.plate_names, layout.layout, strict=True):
            plate = plates[p]
            with plate as idx:
                if plate.size != J:
                    raise ValueError(f"plate {p!r} has size {plate.size} in this call, but the guide was "
                                     f"built for {J} members")
                shape = (len(idx),) + (1,) * (-plate.dim - 1) + (m,)
                zeros = torch.zeros(shape, dtype=flow.dtype, device=flow.device)
                z_p = pyro.sample(f"_{name}_z_{p}", dist.Normal(zeros, 1.0).to_event(1), infer=aux)
            members.append(idx)
            z_members.append((z_p, plate.dim - 1))
        flat = [z.movedim(axis, -2) for z, axis in z_members]  # (*lead, b, m)
        z = torch.cat([z_g.reshape(n, -1), *(f.reshape(n, -1) for f in flat)], -1)
        y, log_g, log_members = flow.push_factors(z, members)
        y_g, y_members = _split_members(y, layout.globals, [f.shape[-2:] for f in flat])
        ref = dist.Normal(torch.zeros((), dtype=flow.dtype, device=flow.device), 1.0)
        jac = log_g - ref.log_prob(z_g.reshape(n, -1)).sum(-1)  # -log|dT/dz| of the globals
        pyro.sample(f"_{name}_x_globals", dist.Delta(y_g.reshape(z_g.shape), jac.reshape(lead), event_dim=1),
                    infer=aux)
        for p, f, (_, axis), y_p, log_p in zip(layout.plate_names, flat, z_members, y_members, log_members,
                                               strict=True):
            jac = (log_p - ref.log_prob(f.reshape(n, *f.shape[-2:])).sum(-1)).reshape(f.shape[:-1])
            with plates[p]:
                pyro.sample(f"_{name}_x_{p}", dist.Delta(y_p.reshape(f.shape).movedim(-2, axis),
                                                         jac.movedim(-1, axis + 1), event_dim=1), infer=aux)
        result = {}
        for site, u in layout.unpack(y_g, y_members, lead):
            value = site["bijection"](u)
            if poutine.get_mask() is False:
                log_density = 0.0
            else:
                log_density = site["bijection"].inv.log_abs_det_jacobian(value, u)
                log_density = sum_rightmost(log_density,
                                            log_density.dim() - value.dim() + site["fn_event_dim"])
            with ExitStack() as stack:
                for frame in self._cond_indep_stacks[site["name"]]:
                    stack.enter_context(plates[frame.name])
                result[site["name"]] = pyro.sample(
                    site["name"], dist.Delta(value, log_density=log_density, event_dim=site["fn_event_dim"]))
        return result

    def get_base_dist(self):
        zeros = torch.zeros(self.flow.dim, device=self.flow.device, dtype=self.flow.dtype)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def get_transform(self, *args, **kwargs) -> Transform:
        """The flow's map ``z -> x`` onto the flat unconstrained latent."""
        self._sync_param_store(self._modules["flow"])  # (not self.flow: that registers it first)
        return _OnePassTransform(self.flow.triangular, self.flow.order)

    def get_posterior(self, *args, **kwargs):
        if self.flow is None:
            raise RuntimeError("AutoKRFlow has no flow yet: call the guide once (e.g. one SVI step)")
        transform = self.get_transform()  # first: it takes in a param store loaded meanwhile
        return dist.TransformedDistribution(self.get_base_dist(), [transform])

    def _sync_param_store(self, flow: KRFlow) -> bool:
        """Makes the flow use what Pyro's param store holds under its name; ``True`` if it
        copied values in (a store loaded from a file, or set, after or before the guide).

        ``pyro.module`` alone keeps the module's own tensors when the store already has the
        names, so a loaded store would be silently ignored (and SVI would then optimize
        tensors the flow does not use). Here the store's values go into the flow's parameters
        and the store then holds those parameters again. Entries that do not fit the flow
        (other names or shapes: a guide built with other options) raise ``ValueError``.
        """
        from pyro.params.param_store import param_with_module_name

        store, name = pyro.get_param_store(), self._pyro_get_fullname("flow")
        prefix = param_with_module_name(name, "")
        stored = {key[len(prefix):]: key for key in store.keys() if key.startswith(prefix)}
        if not stored:
            return False  # nothing stored yet: pyro.module registers the flow on first access
        params = dict(flow.named_parameters())
        unexpected = sorted(set(stored) - set(params))
        shapes = [f"{n}: {tuple(store[key].shape)} stored vs {tuple(params[n].shape)}"
                  for n, key in stored.items() if n in params and store[key].shape != params[n].shape]
        foreign = [n for n, key in stored.items() if n in params and store[key] is not params[n]]
        # trainable parameters not stored yet are fine while the store holds the flow's own ones
        missing = sorted(n for n, p in params.items() if foreign and p.requires_grad and n not in stored)
        if missing or unexpected or shapes:
            raise ValueError(f"Pyro's param store holds a flow under {name!r} that does not fit this "
                             f"guide's flow (missing {missing[:3]}, unexpected {unexpected[:3]}, shapes "
                             f"{shapes[:3]}): build the guide with the options it was trained with "
                             f"(transform, layers, hidden, flow options) and the same model, or "
                             f"pyro.clear_param_store()")
        with torch.no_grad():
            for n in foreign:
                key, p = stored[n], params[n]
                p.copy_(store[key])
                del store[key]
                store[key] = p  # the store holds the flow's own parameter again
        return bool(foreign)

    @torch.no_grad()
    def quantiles(self, quantiles: Sequence[float] | Tensor, *args, **kwargs) -> dict[str, Tensor]:
        r"""Posterior quantiles of every latent site, ``{name: (Q, *site shape)}``, deterministic.

        Computed from the flow on the unconstrained latent (:func:`krflows.distribution.marginal_quantiles`):

        * the **leading** latent coordinate (the first coordinate of the first site) is
          exact, :math:`T_1(\Phi^{-1}(q))`, since ``T_1`` depends on ``z_1`` alone;
        * every other coordinate is the quantile of :attr:`quantile_draws` fixed
          quasi-random draws of the flow (scrambled Sobol, seed 0): the same on every call,
          with a quasi-Monte Carlo error.

        A site whose bijection ``biject_to(support)`` acts elementwise and monotonically
        (positive, interval, ``less_than``, ...) gets the image of the latent quantiles,
        exact for monotone maps (level ``1 - q`` where the map decreases, which Pyro's
        :class:`~pyro.infer.autoguide.AutoContinuous` misses). Other sites (simplex, ordered,
        correlation matrices, ...) get the per-element quantiles of the same fixed draws
        mapped to the site, not the image of a latent quantile vector (which would not be
        the site's quantiles). ``args``/``kwargs`` are the model's and unused.

        Arguments:
            quantiles: levels in ``(0, 1)``, e.g. ``[0.05, 0.5, 0.95]``.

        Returns:
            ``{site name: tensor of shape (Q, *site shape)}`` (constrained values).

        Example:
            >>> def model():
            ...     pyro.sample("s", dist.LogNormal(0.0, 1.0))
            ...     pyro.sample("m", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            >>> pyro.clear_param_store()
            >>> guide = AutoKRFlow(model, layers=1, hidden=(8,), warmup=0)
            >>> _ = guide()  # builds the flow (then train it, e.g. with SVI)
            >>> q = guide.quantiles([0.05, 0.5, 0.95])
            >>> q["s"].shape, q["m"].shape, bool(torch.equal(q["m"], guide.quantiles([0.05, 0.5, 0.95])["m"]))
            (torch.Size([3]), torch.Size([3, 2]), True)
        """
        from krflows.distribution import check_levels, marginal_quantiles, quasi_reference, sample_quantiles

        flow = self._trained_flow()
        levels = check_levels(quantiles, flow.dtype, flow.device)
        draws = flow(quasi_reference(self.quantile_draws, flow.dim, 0, flow.dtype, flow.device))
        Q = levels.shape[0]
        latent = marginal_quantiles(flow, torch.cat([levels, 1 - levels]), samples=draws)
        images = self._unpack(latent)  # each site's map of the latent quantiles
        values = self._unpack(draws)
        result = {}
        for name, image in images.items():
            sign = _elementwise_sign(biject_to(self.prototype_trace.nodes[name]["fn"].support))
            if sign is not None and self._minibatch is not None and sign.numel() > 1:
                sign = None  # per-element signs of the prototype's subsample: not the full site's
            if sign is None:
                result[name] = sample_quantiles(values[name], levels)
            else:
                result[name] = torch.where(sign.to(image.device) > 0, image[:Q], image[Q:])
        return result

    def _unpack(self, x: Tensor) -> dict[str, Tensor]:
        """Flat unconstrained latents (the flow's user order) -> ``{site: constrained value}``."""
        if self._minibatch is not None:
            return _unpack(self._minibatch.full_sites, x)
        return self._potential.unpack(x)

    def median(self, *args, **kwargs) -> dict[str, Tensor]:
        """Posterior medians of the latent sites, ``{name: (*site shape)}``: :meth:`quantiles` at 0.5
        (deterministic; exact for the leading latent coordinate)."""
        return {name: q[0] for name, q in self.quantiles([0.5], *args, **kwargs).items()}

    def _trained_flow(self) -> KRFlow:
        if self.flow is None:
            raise RuntimeError("AutoKRFlow has no flow yet: call the guide once (e.g. one SVI step)")
        self._sync_param_store(self.flow)
        return self.flow

    @torch.no_grad()
    def _loc_scale(self, *args, **kwargs):
        from krflows.distribution import quasi_reference

        flow = self._trained_flow()  # moments of the fixed quasi-random draws
        x = flow(quasi_reference(self.quantile_draws, flow.dim, 0, flow.dtype, flow.device))
        return x.mean(0), x.std(0)

    def debias(self, *args, n: int = 20000, modes="search", seed: int | None = None, **kwargs):
        """:func:`krflows.debias` of this guide's flow: weighted draws that recover the modes
        the flow missed. ``args``/``kwargs`` are the model's (default: the first call's
        :attr:`potential`). Sites: ``res.unpack()`` (weighted by ``res.log_weights``) or
        ``res.unpack(res.resample(m))``."""
        from krflows.correct import debias

        if self.flow is None:
            raise RuntimeError("AutoKRFlow has no flow yet: call the guide once (e.g. one SVI step)")
        target = potential_from_model(self._raw_model[0], *args, **kwargs) if args or kwargs \
            else self.potential
        return debias(self.flow, target, n, modes=modes, seed=seed)


# =============================================================================================
# NeuTra


def neutra_nuts(model: Callable, guide: AutoKRFlow, num_samples: int, warmup_steps: int, *args,
                num_chains: int = 1, max_tree_depth: int = 10, **kwargs) -> dict[str, Tensor]:
    r"""NUTS in the trained guide's reference space (NeuTra, Hoffman et al. 2019).

    The model is reparametrized by :class:`~pyro.infer.reparam.NeuTraReparam` so that NUTS
    samples ``z``; ``x = T(z)`` is then mapped to each site. The guide's parameters are
    frozen during sampling. ``args`` and ``kwargs`` are the model's; ``max_tree_depth`` is
    NUTS's.

    Returns:
        ``{site name: constrained samples (num_samples * num_chains, *shape)}``, with ``shape``
        the site's shape in the guide's prototype trace (plate dims included).
    """
    from pyro.infer import MCMC, NUTS
    from pyro.infer.reparam import NeuTraReparam

    if guide.flow is None:
        raise RuntimeError("train the guide (or call it once) before neutra_nuts")
    if guide._minibatch is not None:
        raise ValueError("neutra_nuts needs the guide of the full-data model: this guide's model "
                         f"subsamples the plate(s) of its latent sites {guide._minibatch.subsampled}, and "
                         "NUTS needs every member (subsample_size=None)")
    guide.requires_grad_(False)
    try:
        neutra = NeuTraReparam(guide)
        kernel = NUTS(poutine.reparam(model, config=lambda _: neutra), max_tree_depth=max_tree_depth)
        mcmc = MCMC(kernel, num_samples=num_samples,
                    warmup_steps=warmup_steps, num_chains=num_chains, disable_progbar=True)
        mcmc.run(*args, **kwargs)
        z = [v for k, v in mcmc.get_samples().items() if k.endswith("_shared_latent")]
        assert len(z) == 1, "expected one shared latent site"
        with torch.no_grad():  # NeuTraReparam.transform_sample fails on batches of plated sites
            x = guide.get_transform()(z[0].reshape(-1, guide.latent_dim))
            return guide._potential.unpack(x)
    finally:
        guide.requires_grad_(True)
