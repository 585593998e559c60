r"""Sparse triangular maps ``z -> x`` for plated (hierarchical) structure: the math.

The coordinates are laid out as ``g`` **globals** first, then for each plate ``p`` its ``J_p``
**members**, member after member, each with ``m_p`` coordinates (a :class:`PlateLayout`):

.. math:: x = \big(x_G,\ x_{1,1}, \dots, x_{1,J_1},\ x_{2,1}, \dots\big), \qquad
          x_G \in \mathbb R^g,\ x_{p,j} \in \mathbb R^{m_p} .

A map is **plate-sparse** when the globals' block is an ordinary triangular map and the block of
member ``(p, j)`` depends on the globals and on that member alone:

.. math:: x_G = T_G(z_G), \qquad x_{p,j,k} = T_{p,k}\big(z_{p,j,k};\ z_G, z_{p,j,<k}, j\big) .

Its Jacobian is lower triangular with zero blocks between members, so the map is also lower
triangular in any order that keeps the globals first and each member's coordinates in order
(e.g. site after site, as Pyro flattens a plated site). This is the sparsity of the
Knothe–Rosenblatt map of a posterior whose members are conditionally independent given the
globals (Spantini, Bigoni & Marzouk, JMLR 2018). The inverse ``x -> z`` needs the globals'
``g`` sequential passes and then ``m_p`` passes per plate, each batched over all members.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from krflows.transforms.autoregressive import AutoregressiveTransform
from krflows.transforms.base import TriangularTransform
from krflows.transforms.monotone import MonotoneFamily

__all__ = ["PlateLayout", "SparseAutoregressiveTransform", "SparseAffineTransform"]

#: ``(y_G (*, g), y_p (*, J, m)) -> params (*, J, m, P)``, autoregressive within a member
PlateConditioner = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class PlateLayout:
    """``g`` globals, then plates of ``J`` members with ``m`` coordinates each (member-major).

    Example:
        >>> layout = PlateLayout(2, ((3, 1), (2, 2)))
        >>> layout.dim
        9
        >>> x_g, blocks = layout.split(torch.arange(9.0))
        >>> x_g.tolist(), [b.shape for b in blocks]
        ([0.0, 1.0], [torch.Size([3, 1]), torch.Size([2, 2])])
        >>> bool((layout.join(x_g, blocks) == torch.arange(9.0)).all())
        True
    """

    globals: int
    plates: tuple[tuple[int, int], ...]

    def __post_init__(self):
        plates = tuple((int(J), int(m)) for J, m in self.plates)
        object.__setattr__(self, "plates", plates)
        if self.globals < 0 or any(J < 1 or m < 1 for J, m in plates):
            raise ValueError(f"globals must be >= 0 and each plate (members, width) >= 1, "
                             f"got globals={self.globals}, plates={list(plates)}")
        if self.dim < 1:
            raise ValueError("the layout has no coordinates")

    @property
    def dim(self) -> int:
        return self.globals + sum(J * m for J, m in self.plates)

    def split(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``(*, d)`` -> globals ``(*, g)`` and one ``(*, J, m)`` block per plate."""
        sizes = [self.globals] + [J * m for J, m in self.plates]
        parts = x.split(sizes, -1)
        return parts[0], [b.unflatten(-1, (J, m)) for b, (J, m) in zip(parts[1:], self.plates, strict=True)]

    def join(self, x_g: Tensor, blocks: Sequence[Tensor]) -> Tensor:
        """The inverse of :meth:`split`."""
        return torch.cat([x_g, *(b.flatten(-2) for b in blocks)], -1)


class SparseAutoregressiveTransform(TriangularTransform):
    r"""One plate-sparse monotone layer ``z -> x`` (see the module docstring).

    .. math:: x_G = f\big(z_G;\ \theta_G(z_{G,<})\big), \qquad
              x_{p,j,k} = f\big(z_{p,j,k};\ \theta_p(z_G, z_{p,j,<k}, j)_k\big),

    with ``f`` a monotone 1-D family, ``θ_G`` a masked autoregressive network over the globals
    and ``θ_p`` one network shared by all members of plate ``p`` (a member's identity enters
    through its embedding). Forward: one pass. Inverse: ``g`` passes for the globals (one
    coordinate each with :meth:`~krflows.nn.MaskedMLP.coordinate`), then ``m_p`` passes of
    ``θ_p`` per plate, each over all members at once.

    Arguments:
        layout: the :class:`PlateLayout`.
        family: the monotone family with ``P`` parameters per coordinate.
        global_conditioner: ``z_G (*, g) -> (*, g, P)``, strictly autoregressive (``None`` if ``g = 0``).
        plate_conditioners: per plate, ``(z_G (*, g), z_p (*, J, m)) -> (*, J, m, P)``;
            coordinate ``k`` of a member may read ``z_G`` and that member's ``z_{<k}`` only.
    """

    def __init__(self, layout: PlateLayout, family: MonotoneFamily,
                 global_conditioner: Callable[[Tensor], Tensor] | None,
                 plate_conditioners: Sequence[PlateConditioner]):
        super().__init__()
        if (global_conditioner is None) != (layout.globals == 0):
            raise ValueError("a global conditioner is needed exactly when the layout has globals")
        if len(plate_conditioners) != len(layout.plates):
            raise ValueError(f"{len(layout.plates)} plates need as many conditioners, "
                             f"got {len(plate_conditioners)}")
        self.layout, self.family = layout, family
        self.globals = None if global_conditioner is None else \
            AutoregressiveTransform(global_conditioner, family, layout.globals)
        self.plate_conditioners = list(plate_conditioners)

    def call_and_log_diag(self, z: Tensor) -> tuple[Tensor, Tensor]:
        z_g, blocks = self.layout.split(z)
        x_g, ld_g = (z_g, torch.zeros_like(z_g)) if self.globals is None else \
            self.globals.call_and_log_diag(z_g)
        xs, lds = [], []
        for net, z_p in zip(self.plate_conditioners, blocks, strict=True):
            x_p, ld_p = self.family.forward(z_p, net(z_g, z_p))
            xs.append(x_p)
            lds.append(ld_p)
        return self.layout.join(x_g, xs), self.layout.join(ld_g, lds)

    def inverse_and_log_diag(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_g, blocks = self.layout.split(x)
        z_g, ld_g = (x_g, torch.zeros_like(x_g)) if self.globals is None else \
            self.globals.inverse_and_log_diag(x_g)
        zs, lds = [], []
        for net, x_p in zip(self.plate_conditioners, blocks, strict=True):
            m = x_p.shape[-1]
            cols: list[Tensor] = []
            log_d: list[Tensor] = []
            for k in range(m):  # pass k: coordinate k of every member (its inputs z_{<k} are exact)
                pad = x_p.new_zeros(*x_p.shape[:-1], m - k)
                z_cur = torch.cat([*(c.unsqueeze(-1) for c in cols), pad], -1)
                z_k, ld_k = self.family.inverse(x_p[..., k], net(z_g, z_cur)[..., k, :])
                cols.append(z_k)
                log_d.append(ld_k)
            zs.append(torch.stack(cols, -1))
            lds.append(torch.stack(log_d, -1))
        return self.layout.join(z_g, zs), self.layout.join(ld_g, lds)


class SparseAffineTransform(TriangularTransform):
    r"""The plate-sparse lower-triangular affine map ``y -> x``:

    .. math:: x_G = m_G + L_G\, y_G, \qquad x_{p,j} = m_{p,j} + L_{p,j}\, y_{p,j} + C_{p,j}\, y_G ,

    ``L_G`` (``g x g``) and each ``L_{p,j}`` (``m x m``) lower triangular with positive diagonal,
    ``C_{p,j}`` (``m x g``) free. It is the exact KR map of every Gaussian whose members are
    conditionally independent given the globals: the lower Cholesky factor of such a
    covariance has exactly these blocks. Cost and parameters: ``O(g^2 + Σ_p J_p m_p (m_p + g))``.

    Arguments:
        layout: the :class:`PlateLayout`.
        shift_g, tril_g: ``m_G (g,)`` and ``L_G (g, g)`` (only its lower triangle is read).
        plates: per plate ``(shift (J, m), tril (J, m, m), cross (J, m, g))``.

    Example:
        >>> layout = PlateLayout(1, ((2, 1),))
        >>> T = SparseAffineTransform(layout, torch.zeros(1), torch.eye(1),
        ...                           [(torch.zeros(2, 1), 2 * torch.ones(2, 1, 1), torch.ones(2, 1, 1))])
        >>> T(torch.tensor([1.0, 1.0, -1.0])).tolist()
        [1.0, 3.0, -1.0]
    """

    def __init__(self, layout: PlateLayout, shift_g: Tensor, tril_g: Tensor,
                 plates: Sequence[tuple[Tensor, Tensor, Tensor]]):
        super().__init__()
        g = layout.globals
        if shift_g.shape != (g,) or tril_g.shape != (g, g):
            raise ValueError(f"shift_g and tril_g must have shapes ({g},) and ({g}, {g}), "
                             f"got {tuple(shift_g.shape)} and {tuple(tril_g.shape)}")
        for (J, m), (shift, tril, cross) in zip(layout.plates, plates, strict=True):
            if shift.shape != (J, m) or tril.shape != (J, m, m) or cross.shape != (J, m, g):
                raise ValueError(f"a plate of {J} members of width {m} needs shift ({J}, {m}), tril "
                                 f"({J}, {m}, {m}) and cross ({J}, {m}, {g}), got {tuple(shift.shape)}, "
                                 f"{tuple(tril.shape)} and {tuple(cross.shape)}")
        self.layout = layout
        self.shift_g, self.tril_g = shift_g, torch.tril(tril_g)
        self.plates = [(shift, torch.tril(tril), cross) for shift, tril, cross in plates]
        self.log_diag = layout.join(torch.log(torch.diagonal(self.tril_g)),
                                    [torch.log(torch.diagonal(t, 0, -2, -1)) for _, t, _ in self.plates])

    def call_and_log_diag(self, y: Tensor) -> tuple[Tensor, Tensor]:
        y_g, blocks = self.layout.split(y)
        x_g = self.shift_g + y_g @ self.tril_g.mT
        xs = [shift + _member_matvec(tril, y_p) + _cross(cross, y_g)
              for (shift, tril, cross), y_p in zip(self.plates, blocks, strict=True)]
        return self.layout.join(x_g, xs), self.log_diag.expand(y.shape)

    def inverse_and_log_diag(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_g, blocks = self.layout.split(x)
        y_g = torch.linalg.solve_triangular(self.tril_g, (x_g - self.shift_g).unsqueeze(-1),
                                            upper=False).squeeze(-1)
        ys = []
        for (shift, tril, cross), x_p in zip(self.plates, blocks, strict=True):
            r = x_p - shift - _cross(cross, y_g)
            # forward substitution over the m coordinates, every member and point at once: a
            # batched solve_triangular would loop over (points x members) tiny systems
            cols: list[Tensor] = []
            for k in range(r.shape[-1]):
                acc = r[..., k]
                for j, c in enumerate(cols):
                    acc = acc - tril[:, k, j] * c
                cols.append(acc / tril[:, k, k])
            ys.append(torch.stack(cols, -1))
        return self.layout.join(y_g, ys), self.log_diag.expand(x.shape)


def _member_matvec(tril: Tensor, y: Tensor) -> Tensor:
    """``L_j y_j`` for every member: ``(J, m, m)`` with ``(*, J, m)``."""
    if tril.shape[-1] == 1:
        return tril[..., 0] * y
    return (tril * y.unsqueeze(-2)).sum(-1)


def _cross(cross: Tensor, y_g: Tensor) -> Tensor:
    """``C_j y_G`` for every member: ``(J, m, g)`` with ``(*, g)`` -> ``(*, J, m)`` (one product)."""
    J, m, g = cross.shape
    return (y_g @ cross.reshape(J * m, g).mT).unflatten(-1, (J, m))
