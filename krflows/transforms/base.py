r"""The protocol every krflows map speaks: a lower-triangular monotone bijection.

A :class:`TriangularTransform` is a :class:`torch.distributions.Transform` on
:math:`\mathbb{R}^d` (``event_dim = 1``) in the direction ``z -> x`` whose Jacobian
is lower triangular with a positive diagonal,

.. math:: x_k = T_k(z_1, \dots, z_k), \qquad \partial T_k / \partial z_k > 0 .

Because the Jacobian is triangular, its log-determinant is the sum of the log-diagonal,
and the log-diagonal of a composition of such maps (all in the same variable order)
is the sum of the parts' log-diagonals. krflows therefore passes the per-coordinate
log-diagonal ``(*, d)`` around rather than only its sum: it is what marginal and
conditional densities of the triangular structure need.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Transform, constraints

from krflows._checks import check_points

__all__ = ["TriangularTransform", "ComposeTriangular", "Permutation"]


def untracked(x: Tensor, *modules) -> bool:
    """Whether a computation on ``x`` by ``modules`` may run in chunks and write into buffers: no
    autograd graph is recorded (grad mode off, or neither ``x`` nor a parameter of the modules
    requires grad; anything but an ``nn.Module`` counts as one that does), and neither
    torch.compile nor a torch.func transform is tracing it."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if not torch.is_grad_enabled():
        return True
    return not x.requires_grad and not any(
        not isinstance(m, torch.nn.Module) or any(p.requires_grad for p in m.parameters()) for m in modules)


class TriangularTransform(Transform):
    r"""Base class of lower-triangular monotone bijections ``z -> x`` on ``R^d``.

    Subclasses implement :meth:`call_and_log_diag` and :meth:`inverse_and_log_diag`.
    ``log_diag`` is always the log-diagonal of the Jacobian of the *forward* map
    ``z -> x``, evaluated at the pair ``(z, x)``, with shape ``(*, d)``.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(self, cache_size: int = 0):
        super().__init__(cache_size=cache_size)

    def call_and_log_diag(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``x = T(z)`` and ``log dT_k/dz_k`` (shape ``(*, d)``)."""
        raise NotImplementedError

    def inverse_and_log_diag(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``z = T^{-1}(x)`` and ``log dT_k/dz_k`` at that ``z`` (shape ``(*, d)``)."""
        raise NotImplementedError

    def call_and_ladj(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``x = T(z)`` and ``log |det dT/dz|`` (shape ``(*,)``) in one pass."""
        x, log_diag = self.call_and_log_diag(z)
        return x, log_diag.sum(-1)

    def expected_input(self) -> tuple[int | None, Tensor | None]:
        """``(d, ref)``: the input width and a tensor of the parameters' dtype and device
        (``None`` where unknown). ``T(z)``, ``T.inv(x)`` and ``log_abs_det_jacobian`` check
        their input against them (shape, dtype, device: no data read, no sync)."""
        return None, None

    def _checked(self, v: Tensor, name: str) -> Tensor:
        dim, ref = self.expected_input()
        return check_points(v, dim, ref, name, finite=False, owner="the transform")

    def _call(self, z: Tensor) -> Tensor:
        return self.call_and_log_diag(self._checked(z, "z"))[0]

    def _inverse(self, x: Tensor) -> Tensor:
        return self.inverse_and_log_diag(self._checked(x, "x"))[0]

    def log_abs_det_jacobian(self, z: Tensor, x: Tensor) -> Tensor:
        return self.call_and_log_diag(self._checked(z, "z"))[1].sum(-1)


class ComposeTriangular(TriangularTransform):
    r"""Composition ``T = T_L o ... o T_1`` of triangular maps in one variable order.

    Applies ``parts[0]`` first (to ``z``). The composite is again lower triangular and
    monotone, and its log-diagonal is the sum of the parts' log-diagonals.
    """

    def __init__(self, parts: list[TriangularTransform]):
        super().__init__()
        for p in parts:
            assert isinstance(p, TriangularTransform), f"{type(p).__name__} is not triangular"
        self.parts = list(parts)

    def expected_input(self) -> tuple[int | None, Tensor | None]:
        dim = ref = None
        for part in self.parts:
            d, r = part.expected_input()
            dim, ref = d if dim is None else dim, r if ref is None else ref
        return dim, ref

    def call_and_log_diag(self, z: Tensor) -> tuple[Tensor, Tensor]:
        total = torch.zeros_like(z)
        for part in self.parts:
            z, log_diag = part.call_and_log_diag(z)
            total = total + log_diag
        return z, total

    def inverse_and_log_diag(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = torch.zeros_like(x)
        for part in reversed(self.parts):
            x, log_diag = part.inverse_and_log_diag(x)
            total = total + log_diag
        return x, total


class Permutation(Transform):
    r"""Places the triangular coordinates in the user's variable order, ``y -> x``.

    ``x[..., order] = y``: coordinate ``i`` of the triangular map is the user's
    coordinate ``order[i]``. Volume preserving (log-det 0).
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, order: Tensor):
        super().__init__()
        self.order = order
        self.inverse_order = torch.argsort(order)

    def __eq__(self, other):
        return isinstance(other, Permutation) and torch.equal(self.order, other.order)

    def _call(self, y: Tensor) -> Tensor:
        return check_points(y, len(self.order), None, "y", finite=False)[..., self.inverse_order]

    def _inverse(self, x: Tensor) -> Tensor:
        return check_points(x, len(self.order), None, "x", finite=False)[..., self.order]

    def log_abs_det_jacobian(self, y: Tensor, x: Tensor) -> Tensor:
        return y.new_zeros(y.shape[:-1])
