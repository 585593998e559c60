r"""Affine maps ``z -> x = m + A z``: lower-triangular (KR) and general (e.g. Brenier)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Transform, constraints

from krflows.transforms.base import TriangularTransform

__all__ = ["LowerAffineTransform", "AffineMatrixTransform", "affine_parts"]


class LowerAffineTransform(TriangularTransform):
    r"""The lower-triangular affine map ``z -> x = m + L z`` with ``diag(L) > 0``.

    For ``L`` the lower Cholesky factor of ``Σ`` this is the unique KR map from
    ``N(0, I)`` to ``N(m, Σ)``.

    Arguments:
        shift: ``m``, shape ``(d,)``.
        tril: ``L``, shape ``(d, d)``; only its lower triangle is read.
    """

    def __init__(self, shift: Tensor, tril: Tensor):
        super().__init__()
        d = shift.shape[-1]
        if tril.shape != (d, d):
            raise ValueError(f"tril must have shape ({d}, {d}), got {tuple(tril.shape)}")
        self.shift = shift
        self.tril = torch.tril(tril)
        self.log_diag = torch.log(torch.diagonal(self.tril))

    def call_and_log_diag(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x = self.shift + z @ self.tril.mT
        return x, self.log_diag.expand(z.shape)

    def inverse_and_log_diag(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r = (x - self.shift).unsqueeze(-1)
        z = torch.linalg.solve_triangular(self.tril, r, upper=False).squeeze(-1)
        return z, self.log_diag.expand(x.shape)


class AffineMatrixTransform(Transform):
    r"""A general invertible affine map ``z -> x = m + A z`` (not triangular in general).

    Used for the Brenier map ``A = Σ^{1/2}`` (symmetric Jacobian).
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, shift: Tensor, matrix: Tensor):
        super().__init__()
        self.shift = shift
        self.matrix = matrix
        self._logdet = torch.linalg.slogdet(matrix)[1]

    def _call(self, z: Tensor) -> Tensor:
        return self.shift + z @ self.matrix.mT

    def _inverse(self, x: Tensor) -> Tensor:
        return torch.linalg.solve(self.matrix, (x - self.shift).unsqueeze(-1)).squeeze(-1)

    def log_abs_det_jacobian(self, z: Tensor, x: Tensor) -> Tensor:
        return self._logdet.expand(z.shape[:-1])


def affine_parts(T: Transform) -> tuple[Tensor, Tensor]:
    """``(b, A)`` of an affine map ``z -> b + A z`` (:class:`LowerAffineTransform` or
    :class:`AffineMatrixTransform`)."""
    if isinstance(T, LowerAffineTransform):
        return T.shift, T.tril
    if isinstance(T, AffineMatrixTransform):
        return T.shift, T.matrix
    raise ValueError(f"T must be a LowerAffineTransform or AffineMatrixTransform, got {type(T).__name__}")
