r"""``SparseKRFlow``: a :class:`~krflows.KRFlow` whose triangular map has a declared plate sparsity.

For a posterior over ``g`` global coordinates and plates of ``J`` members with ``m``
coordinates each, in which members are conditionally independent given the globals (a
hierarchical model that factorizes over its plate), the Knothe–Rosenblatt map with the
globals first is *sparse*: member ``j``'s block depends on ``(z_G, z_j)`` only (Spantini,
Bigoni & Marzouk, JMLR 2018). ``SparseKRFlow`` parametrizes exactly such maps
(:mod:`krflows.transforms.sparse` holds the math), with

* the globals: masked autoregressive layers (:class:`~krflows.nn.MaskedMLP`), as in ``KRFlow``;
* each plate: **one** conditioner shared by its members (:class:`PlateConditioner`), fed
  with the globals, the member's own earlier coordinates and a per-member embedding
  (learned, and/or fixed member features such as the member's data);
* a sparse affine stage (:class:`SparseAffine`): dense ``g x g`` for the globals, and per
  member its own location, ``m x m`` scale and linear coupling to the globals.

Parameters and the cost of a pass grow linearly in ``J`` (``KRFlow`` costs ``d^2``); ``log_prob``
at fresh points needs ``g`` sequential passes for the globals and ``m`` batched passes per plate
(``KRFlow``: ``d``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from krflows._checks import check_points, renamed_keyword
from krflows.flows import KRFlow
from krflows.nn import MaskedLinear, MaskedMLP, SoftClamp
from krflows.transforms.base import ComposeTriangular, TriangularTransform
from krflows.transforms.monotone import MonotoneFamily
from krflows.transforms.sparse import PlateLayout, SparseAffineTransform, SparseAutoregressiveTransform

__all__ = ["SparseKRFlow", "PlateConditioner", "SparseAffine"]


class PlateConditioner(nn.Module):
    r"""One conditioner for all members of a plate: ``(y_G, y_j, j) -> θ_j``, ``(*, J, m, P)``.

    Coordinate ``k`` of member ``j`` reads the globals ``y_G``, the member's own ``y_{j,<k}``
    (MADE masks over ``m`` inputs) and the member's context ``c_j`` (a learned embedding
    ``e_j`` and/or fixed features ``f_j``, standardized):

    .. math:: h^{(1)}_j = \sigma\big(W_G\, y_G + W_c\, c_j + (M \odot W_y)\, y_j + b\big), \quad
              \theta_j = b_\theta \tanh\big((M' \odot W')\, h^{(L)}_j / b_\theta\big) .

    The first layer's global and member terms are computed once per sample and once per
    member and broadcast, so a pass costs ``O(B (g + J m) h + J e h + B J h^2)``. The output
    layer starts at zero (every member's map starts at the identity).

    Arguments:
        globals: ``g``; members: ``J``; width: ``m``; n_params: ``P``.
        hidden: hidden widths (at least one layer).
        embedding: learned embedding size ``e`` (0: none).
        features: fixed member features ``(J, f)`` (e.g. the member's observations), or ``None``.
        activation, bound: as :class:`~krflows.nn.MaskedMLP`.

    Example:
        >>> net = PlateConditioner(2, 5, 1, n_params=3, hidden=(8,))
        >>> net(torch.randn(4, 2), torch.randn(4, 5, 1)).shape
        torch.Size([4, 5, 1, 3])
    """

    def __init__(self, globals: int, members: int, width: int, n_params: int,
                 hidden: Sequence[int] = (32, 32), embedding: int = 8, features: Tensor | None = None,
                 activation: type[nn.Module] = nn.SiLU, bound: float = 8.0):
        super().__init__()
        if not hidden:
            raise ValueError("a PlateConditioner needs at least one hidden layer")
        if features is not None and (features.dim() != 2 or features.shape[0] != members):
            raise ValueError(f"features must have shape ({members}, f), got {tuple(features.shape)}")
        self.members, self.width, self.n_params, self.bound = members, width, n_params, bound
        degrees = [torch.sort(torch.arange(w) % width).values for w in hidden]  # 0..m-1
        own = torch.arange(1, width + 1)
        self.own = MaskedLinear((degrees[0][:, None] >= own[None, :]).float(), bias=False)
        self.glob = nn.Linear(globals, hidden[0], bias=False) if globals else None
        self.embedding = nn.Embedding(members, embedding) if embedding else None
        if features is not None:
            features = torch.as_tensor(features, dtype=torch.get_default_dtype())
            features = (features - features.mean(0)) / features.std(0).clamp_min(1e-8) \
                if members > 1 else features
        self.register_buffer("features", features)
        n_context = embedding + (0 if features is None else features.shape[1])
        self.context = nn.Linear(n_context, hidden[0]) if n_context else None
        self.bias = None if n_context else nn.Parameter(torch.zeros(hidden[0]))
        layers: list[nn.Module] = [activation()]
        for prev, deg in zip(degrees, degrees[1:], strict=False):
            layers += [MaskedLinear((deg[:, None] >= prev[None, :]).float()), activation()]
        self.hidden = nn.Sequential(*layers)
        out_deg = own.repeat_interleave(n_params)
        self.out = MaskedLinear((out_deg[:, None] > degrees[-1][None, :]).float())
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def member_context(self, members: Tensor | None = None) -> Tensor:
        """``W_c c_j + b`` for every member ``(J, h)``, or for the members ``members`` ``(b, h)``."""
        if self.context is None:
            return self.bias.expand(self.members if members is None else members.shape[0], -1)
        emb = None if self.embedding is None else \
            self.embedding.weight if members is None else self.embedding(members)
        feats = self.features if self.features is None or members is None else self.features[members]
        parts = [t for t in (emb, feats) if t is not None]
        return self.context(torch.cat([p.to(self.context.weight) for p in parts], -1))

    def forward(self, y_g: Tensor, y: Tensor, members: Tensor | None = None) -> Tensor:
        """Parameters ``(*, J, m, P)`` of every member, or ``(*, b, m, P)`` of the members
        ``members`` (indices ``(b,)``; ``y`` then holds those members' coordinates ``(*, b, m)``)."""
        h = self.own(y) + self.member_context(members)
        if self.glob is not None:
            h = h + self.glob(y_g).unsqueeze(-2)
        out = self.out(self.hidden(h))
        return SoftClamp.apply(out, self.bound).unflatten(-1, (self.width, self.n_params))


class SparseAffine(nn.Module):
    r"""Learnable plate-sparse affine stage (:class:`~krflows.transforms.sparse.SparseAffineTransform`).

    Starts at the identity; diagonals are log-parametrized (``exp(ρ) > 0``). Like
    :class:`~krflows.flows.LowerAffine`, :meth:`transform` reads the parameters at each call,
    and :meth:`initialize` sets the stage to a Gaussian's (sparse) KR map.
    """

    def __init__(self, layout: PlateLayout):
        super().__init__()
        g = layout.globals
        self.layout = layout
        self.shift = nn.Parameter(torch.zeros(g))
        self.log_diag = nn.Parameter(torch.zeros(g))
        self.lower = nn.Parameter(torch.zeros(g, g))
        self.register_buffer("strict", torch.tril(torch.ones(g, g), -1))
        self.plate_shift = nn.ParameterList(nn.Parameter(torch.zeros(J, m)) for J, m in layout.plates)
        self.plate_log_diag = nn.ParameterList(nn.Parameter(torch.zeros(J, m)) for J, m in layout.plates)
        self.plate_lower = nn.ParameterList(nn.Parameter(torch.zeros(J, m, m)) for J, m in layout.plates)
        self.plate_cross = nn.ParameterList(nn.Parameter(torch.zeros(J, m, g)) for J, m in layout.plates)

    def _tril(self, lower: Tensor, log_diag: Tensor) -> Tensor:
        m = log_diag.shape[-1]
        return torch.tril(lower, -1) + torch.diag_embed(torch.exp(log_diag)) if m > 1 else \
            torch.exp(log_diag).unsqueeze(-1)

    def build(self, members: Sequence[Tensor | None] | None = None) -> SparseAffineTransform:
        """The stage's transform with the parameters' current values; with ``members`` (per
        plate, member indices or ``None`` for all), restricted to the globals and those members."""
        members = [None] * len(self.layout.plates) if members is None else members
        plates = [tuple(t if idx is None else t[idx] for t in (s, self._tril(low, ld), c))
                  for s, ld, low, c, idx in zip(self.plate_shift, self.plate_log_diag, self.plate_lower,
                                                self.plate_cross, members, strict=True)]
        layout = _sub_layout(self.layout, members)
        return SparseAffineTransform(layout, self.shift, self._tril(self.lower, self.log_diag)
                                     if self.layout.globals else self.lower, plates)

    def as_transform(self, members: Sequence[Tensor | None] | None = None) -> TriangularTransform:
        """The map ``y -> x`` (of the globals and ``members``, as :meth:`build`), reading the
        parameters when called (holds no tensor itself)."""
        return _Deferred(lambda: self.build(members))

    @torch.no_grad()
    def initialize(self, mean: Tensor, cov: Tensor) -> None:
        r"""Sets the stage to the sparse KR map of ``N(mean, cov)`` (flow order).

        ``cov`` is ``(d, d)`` or the variances ``(d,)`` (a diagonal covariance, no ``d^2`` memory).
        With a full ``cov``: ``L_G = chol(Σ_GG)``, ``C_j = Σ_jG L_G^{-T}`` and
        ``L_j = chol(Σ_jj - C_j C_j^T)``: exact when members are conditionally independent
        given the globals; otherwise the covariances between members are dropped.
        """
        lay = self.layout
        mean = torch.as_tensor(mean).to(self.shift)
        cov = torch.as_tensor(cov).to(self.shift)
        d, g = lay.dim, lay.globals
        if mean.shape != (d,) or cov.shape not in ((d,), (d, d)):
            raise ValueError(f"mean must be ({d},) and cov ({d},) or ({d}, {d}), "
                             f"got {tuple(mean.shape)} and {tuple(cov.shape)}")
        m_g, m_plates = lay.split(mean)
        if cov.dim() == 1:
            L_g = torch.diag(cov[:g].sqrt())
        else:
            L_g = torch.linalg.cholesky(cov[:g, :g]) if g else cov[:0, :0]
        self.shift.copy_(m_g)
        self.log_diag.copy_(torch.log(torch.diagonal(L_g)))
        self.lower.copy_(torch.tril(L_g, -1))
        start = g
        for p, ((J, m), m_p) in enumerate(zip(lay.plates, m_plates, strict=True)):
            idx = torch.arange(start, start + J * m, device=cov.device).reshape(J, m)
            start += J * m
            if cov.dim() == 1:
                cross = cov.new_zeros(J, m, g)
                L = torch.diag_embed(cov[idx].sqrt())
            else:
                s_jg = cov[idx][..., :g]  # (J, m, g)
                cross = torch.linalg.solve_triangular(L_g, s_jg.mT, upper=False).mT if g else s_jg
                L = torch.linalg.cholesky(cov[idx[:, :, None], idx[:, None, :]] - cross @ cross.mT)
            self.plate_shift[p].copy_(m_p)
            self.plate_log_diag[p].copy_(torch.log(torch.diagonal(L, 0, -2, -1)))
            self.plate_lower[p].copy_(torch.tril(L, -1))
            self.plate_cross[p].copy_(cross)


def _sub_layout(layout: PlateLayout, members: Sequence[Tensor | None]) -> PlateLayout:
    """The layout of the globals and the given members of each plate (``None``: all)."""
    return PlateLayout(layout.globals, tuple((J if idx is None else int(idx.shape[0]), m)
                                             for (J, m), idx in zip(layout.plates, members, strict=True)))


def _factors(layout: PlateLayout, z: Tensor, log_diag: Tensor) -> tuple[Tensor, list[Tensor]]:
    """``log q_G`` ``(*)`` and the members' ``log q_{p,j}`` ``(*, b_p)`` from ``z`` and the log-slopes."""
    terms = -0.5 * z * z - 0.5 * math.log(2 * math.pi) - log_diag
    t_g, t_p = layout.split(terms)
    return t_g.sum(-1), [t.sum(-1) for t in t_p]


class _Deferred(TriangularTransform):
    """A triangular map built afresh at each call (from the parameters' current values)."""

    def __init__(self, build: Callable[[], TriangularTransform]):
        super().__init__()
        self.build = build

    def call_and_log_diag(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.build().call_and_log_diag(z)

    def inverse_and_log_diag(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.build().inverse_and_log_diag(x)

    def expected_input(self) -> tuple[int | None, Tensor | None]:
        return self.build().expected_input()


class _SparseLayer(nn.Module):
    """The conditioners of one plate-sparse layer: the globals' and one per plate."""

    def __init__(self, layout: PlateLayout, n_params: int, hidden: Sequence[int], embedding: int,
                 features: Sequence[Tensor | None], param_major: bool = False):
        super().__init__()
        g = layout.globals
        self.glob = MaskedMLP(g, n_params, hidden, param_major=param_major) if g else None
        self.plates = nn.ModuleList(
            PlateConditioner(g, J, m, n_params, hidden, embedding, f)
            for (J, m), f in zip(layout.plates, features, strict=True))


class SparseKRFlow(KRFlow):
    r"""A monotone triangular flow ``x = T(z)``, ``z ~ N(0, I_d)``, with plate sparsity.

    Coordinates (flow order): ``g`` globals, then for each plate its members one after the
    other, ``m`` coordinates each. ``T`` is a composition of plate-sparse layers
    (:class:`~krflows.transforms.sparse.SparseAutoregressiveTransform`) and a sparse affine
    stage, all in that one order:

    .. math:: x_G = T_G(z_G), \qquad x_{p,j} = T_{p}\big(z_{p,j};\ z_G, \text{member } j\big),

    lower triangular with a positive diagonal and zero blocks between members.

    **Why a subclass of** :class:`~krflows.KRFlow`: every public method of ``KRFlow``
    (``sample``, ``rsample_and_log_prob``, ``log_prob``, ``transform``, ``base``, ``inverse``,
    marginals and conditionals, ``compile``) is written in terms of :attr:`triangular`, ``dim``,
    ``order`` and the reference, so overriding :attr:`triangular` is enough, and
    ``isinstance(flow, KRFlow)`` holds for every user of the API (``krflows.fit``, ``diagnose``,
    ``debias``, Pyro). ``flow.affine`` is a :class:`SparseAffine` (``parameters()`` and
    ``initialize(mean, cov)``, as the warm-up needs); ``flow.conditioners`` holds one
    ``_SparseLayer`` per layer instead of a ``MaskedMLP``.

    **Minibatches of members**: :meth:`member_map`, :meth:`push_factors` and
    :meth:`log_prob_factors` push or evaluate the globals and a subset of each plate's members,
    with ``log q`` split into the globals' marginal and each member's conditional (what
    :class:`~krflows.pyro.AutoKRFlow` uses for subsampled plates). They run eagerly;
    :meth:`~krflows.KRFlow.compile` compiles the full flow's push and pull.

    Arguments:
        globals: ``g``, the number of global coordinates (may be 0).
        plates: ``[(J, m), ...]``: members and coordinates per member of each plate.
        family, layers, hidden, affine_stage, compile, family_options: as :class:`~krflows.KRFlow`
            (``transform=`` and ``affine=`` are accepted there, deprecated).
        order: the triangular coordinate ``i`` is the user's coordinate ``order[i]`` (applied
            once, outside the map), e.g. to gather Pyro's site-major latent into member blocks.
        embedding: size of each plate's learned member embedding (0: none).
        features: per plate, fixed member features ``(J, f)`` or ``None``.

    Example:
        >>> flow = SparseKRFlow(2, [(100, 1)], layers=2, hidden=(16,))
        >>> x, log_q = flow.rsample_and_log_prob((5,))
        >>> x.shape
        torch.Size([5, 102])
        >>> bool(torch.allclose(flow.log_prob(x), log_q, atol=1e-4))
        True
    """

    def __init__(self, globals: int, plates: Sequence[tuple[int, int]],
                 family: str | MonotoneFamily = "spline", layers: int = 4,
                 hidden: Sequence[int] = (64, 64), order: Sequence[int] | None = None,
                 affine_stage: bool = True, embedding: int = 8,
                 features: Sequence[Tensor | None] | None = None, compile: bool = False,
                 **family_options):
        family = renamed_keyword(family_options, "transform", "family", family, "spline")
        affine_stage = renamed_keyword(family_options, "affine", "affine_stage", affine_stage, True)
        layout = PlateLayout(globals, tuple(plates))
        super().__init__(layout.dim, family=family, layers=0, hidden=hidden, order=order,
                         affine_stage=False, compile=False, **family_options)
        features = [None] * len(layout.plates) if features is None else list(features)
        if len(features) != len(layout.plates):
            raise ValueError(f"features: one entry per plate ({len(layout.plates)}), got {len(features)}")
        self.layout = layout
        self.conditioners = nn.ModuleList(
            _SparseLayer(layout, self.family.n_params, hidden, embedding, features, self.family.param_major)
            for _ in range(layers))
        self.affine = SparseAffine(layout) if affine_stage else None
        if compile:
            self.compile()

    def _conditioner_nets(self) -> list[nn.Module]:
        return [net for layer in self.conditioners for net in (layer.glob, *layer.plates) if net is not None]

    @property
    def triangular(self) -> TriangularTransform:
        """The plate-sparse lower-triangular map ``z -> y`` in the flow's variable order."""
        return self.member_map()

    # ---- minibatches of members -----------------------------------------------------------

    def member_map(self, members: Sequence[Tensor | None] | None = None) -> TriangularTransform:
        r"""The map ``z -> y`` (flow order) restricted to the globals and some members of each plate.

        Member ``j``'s block of ``T`` depends on ``z_G`` and ``z_j`` only, so the map of the
        globals and a subset ``B_p`` of each plate's members is a triangular map on
        ``g + Σ_p |B_p| m_p`` coordinates (layout: globals, then the chosen members in the
        order given), equal to ``T`` restricted to those coordinates. ``members=None``: every
        member (:attr:`triangular`).

        Arguments:
            members: per plate, member indices ``(b_p,)`` (long, in ``[0, J_p)``), or ``None`` for all.
        """
        members = self._check_members(members)
        layout = _sub_layout(self.layout, members)
        parts: list[TriangularTransform] = [
            SparseAutoregressiveTransform(layout, self.family, layer.glob, [
                net if idx is None else functools.partial(net, members=idx)
                for net, idx in zip(layer.plates, members, strict=True)])
            for layer in self.conditioners]
        if self.affine is not None:
            parts.append(self.affine.as_transform(members))
        return ComposeTriangular(parts)

    def push_factors(self, z: Tensor, members: Sequence[Tensor | None] | None = None
                     ) -> tuple[Tensor, Tensor, list[Tensor]]:
        r"""Pushes ``z -> y`` (flow order) for the globals and ``members``, with ``log q`` by factor.

        The plate sparsity factorizes the flow's density exactly (the globals come first and
        member ``j``'s block reads only ``z_G`` and ``z_j``):

        .. math:: \log q(y) = \log q_G(y_G) + \sum_p \sum_{j} \log q_{p,j}(y_{p,j} \mid y_G), \qquad
                  \log q_{p,j} = \sum_{k \in (p,j)} \big[\log \mathcal N(z_k) - \log \partial_k T_k\big],

        ``q_G`` the globals' marginal and ``q_{p,j}`` member ``j``'s conditional given the
        globals. On a minibatch ``B_p`` of members, ``log q_G + Σ_p (J_p/|B_p|) Σ_{j∈B_p} log q_{p,j}``
        is an unbiased estimate of ``log q`` (what Pyro's subsampled plates compute).

        Arguments:
            z: reference points ``(*, g + Σ_p b_p m_p)`` in the layout of :meth:`member_map`.
            members: as :meth:`member_map` (``None``: every member, ``z`` of shape ``(*, d)``).

        Returns:
            ``y`` (same shape as ``z``), ``log q_G`` ``(*)`` and per plate ``log q_{p,j}`` ``(*, b_p)``.

        Example:
            >>> flow = SparseKRFlow(2, [(10, 1)], layers=1, hidden=(8,))
            >>> z = torch.randn(5, 2 + 3)
            >>> y, log_g, (log_m,) = flow.push_factors(z, [torch.tensor([0, 4, 7])])
            >>> y.shape, log_g.shape, log_m.shape
            (torch.Size([5, 5]), torch.Size([5]), torch.Size([5, 3]))
        """
        members = self._check_members(members)
        layout = _sub_layout(self.layout, members)
        z = check_points(z, layout.dim, self._ref, "z")
        y, log_diag = self._chunked(self.member_map(members).call_and_log_diag, z, "push")
        return (y, *_factors(layout, z, log_diag))

    def log_prob_factors(self, y: Tensor, members: Sequence[Tensor | None] | None = None
                         ) -> tuple[Tensor, list[Tensor]]:
        r"""``log q_G(y_G)`` ``(*)`` and per plate ``log q_{p,j}(y_{p,j} | y_G)`` ``(*, b_p)``
        at points ``y`` in the flow order of :meth:`member_map` (see :meth:`push_factors`),
        through the inverse map."""
        members = self._check_members(members)
        layout = _sub_layout(self.layout, members)
        y = check_points(y, layout.dim, self._ref, "y")
        z, log_diag = self._chunked(self.member_map(members).inverse_and_log_diag, y, "pull")
        return _factors(layout, z, log_diag)

    def _check_members(self, members: Sequence[Tensor | None] | None) -> list[Tensor | None]:
        if members is None:
            return [None] * len(self.layout.plates)
        members = list(members)
        if len(members) != len(self.layout.plates):
            raise ValueError(f"members: one entry per plate ({len(self.layout.plates)}), got {len(members)}")
        out: list[Tensor | None] = []
        for (J, _), idx in zip(self.layout.plates, members, strict=True):
            if idx is not None:
                idx = torch.as_tensor(idx, device=self.device)
                if idx.dim() != 1 or idx.numel() == 0 or idx.dtype.is_floating_point or \
                        idx.dtype == torch.bool or int(idx.min()) < 0 or int(idx.max()) >= J:
                    raise ValueError(f"members of a plate of {J} must be a non-empty 1-D integer tensor of "
                                     f"indices in [0, {J}), got {idx.dtype} of shape {tuple(idx.shape)}")
                idx = idx.long()
            out.append(idx)
        return out

    def extra_repr(self) -> str:
        return f"globals={self.layout.globals}, plates={list(self.layout.plates)}, " + super().extra_repr()
