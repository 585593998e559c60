r"""Optimal transport between Gaussians in closed form: W2 (Bures), the Brenier map, the
entropic cost, and the transport cost of an affine map. Costs are squared Euclidean."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Transform

from krflows._checks import check_gaussian
from krflows.transforms.linear import AffineMatrixTransform, affine_parts

__all__ = ["wasserstein2_gaussian", "gaussian_ot_map", "affine_transport_cost", "entropic_ot_gaussian",
           "sqrtm_psd"]


def sqrtm_psd(S: Tensor) -> Tensor:
    """The symmetric square root of a symmetric PSD matrix (negative rounding clamped to 0)."""
    val, vec = torch.linalg.eigh(S)
    root = (vec * val.clamp_min(0).sqrt().unsqueeze(-2)) @ vec.mT
    return 0.5 * (root + root.mT)



def wasserstein2_gaussian(m1, S1, m2, S2, squared: bool = False) -> Tensor:
    r"""The 2-Wasserstein distance between ``N(m1, S1)`` and ``N(m2, S2)``, in closed form.

    .. math:: W_2^2 = \lVert m_1 - m_2 \rVert^2 + \operatorname{tr} S_1 + \operatorname{tr} S_2
        - 2 \operatorname{tr} \big(S_1^{1/2} S_2 S_1^{1/2}\big)^{1/2}

    (the last three terms are the squared Bures metric). Exact for semi-definite covariances
    too; rounding makes :math:`W_2` itself accurate to about :math:`\sqrt{\text{eps}\,
    \operatorname{tr} S}` when the two laws are close (``W_2^2`` is clipped at 0).

    Arguments:
        m1, m2: means, shape ``(*, d)`` (tensors or array-likes; leading dims broadcast).
        S1, S2: covariances, shape ``(*, d, d)``, symmetric positive semi-definite.
        squared: return :math:`W_2^2` instead of :math:`W_2`.

    Returns:
        :math:`W_2` (or :math:`W_2^2`), shape ``(*)``.

    Example:
        >>> wasserstein2_gaussian([0.0, 0.0], torch.eye(2), [3.0, 4.0], 4 * torch.eye(2))
        tensor(5.1962)
    """
    m1, S1 = check_gaussian(m1, S1, "N(m1, S1)")
    m2, S2 = check_gaussian(m2, S2, "N(m2, S2)")
    if m1.shape[-1] != m2.shape[-1]:
        raise ValueError(f"the two Gaussians must have one dimension, got {m1.shape[-1]} and {m2.shape[-1]}")
    r1 = sqrtm_psd(S1)
    cross = sqrtm_psd(r1 @ S2 @ r1)
    trace = lambda A: torch.diagonal(A, dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    w2 = ((m1 - m2) ** 2).sum(-1) + trace(S1) + trace(S2) - 2 * trace(cross)
    w2 = w2.clamp_min(0)
    return w2 if squared else w2.sqrt()



def gaussian_ot_map(m1, S1, m2, S2) -> AffineMatrixTransform:
    r"""The Brenier (optimal) map ``x -> y`` from ``N(m1, S1)`` to ``N(m2, S2)``, ``S1`` definite.

    .. math:: T(x) = m_2 + A (x - m_1), \qquad
        A = S_1^{-1/2} \big(S_1^{1/2} S_2 S_1^{1/2}\big)^{1/2} S_1^{-1/2},

    symmetric positive semi-definite, with :math:`A S_1 A = S_2`; its transport cost
    :math:`E\lVert x - T(x) \rVert^2` is :math:`W_2^2`. For ``N(0, I)`` it is
    :func:`krflows.exact.gaussian_brenier_map`.

    Arguments:
        m1, m2: means ``(d,)``; S1, S2: covariances ``(d, d)`` (``S1`` positive definite).

    Example:
        >>> T = gaussian_ot_map([0.0], [[4.0]], [1.0], [[9.0]])
        >>> T(torch.tensor([2.0]))
        tensor([4.])
    """
    m1, S1 = check_gaussian(m1, S1, "N(m1, S1)")
    m2, S2 = check_gaussian(m2, S2, "N(m2, S2)")
    if m1.dim() != 1 or m2.shape != m1.shape:
        raise ValueError(f"means must have one shape (d,), got {tuple(m1.shape)} and {tuple(m2.shape)}")
    val, vec = torch.linalg.eigh(S1)
    if val.min() <= 0:
        raise ValueError("S1 must be positive definite (it has an eigenvalue <= 0)")
    r1 = (vec * val.sqrt()) @ vec.mT
    r1_inv = (vec * val.rsqrt()) @ vec.mT
    A = r1_inv @ sqrtm_psd(r1 @ S2 @ r1) @ r1_inv
    A = 0.5 * (A + A.mT)
    return AffineMatrixTransform(m2 - m1 @ A.mT, A)



def affine_transport_cost(T: Transform, mean, cov) -> Tensor:
    r"""The exact cost :math:`E \lVert x - T(x) \rVert^2` of an affine ``T: x -> b + A x``,
    :math:`x \sim N(m, S)`.

    .. math:: E \lVert x - T(x) \rVert^2 = \lVert (I - A) m - b \rVert^2
        + \operatorname{tr}\big((I - A) S (I - A)^\top\big) .

    Equal to :math:`W_2^2(N(m, S), T_\# N(m, S))` exactly when ``T`` is the Brenier map
    (``A`` symmetric PSD); larger for any other map with the same pushforward, e.g. the
    triangular KR map of a correlated Gaussian.

    Arguments:
        T: a :class:`~krflows.transforms.LowerAffineTransform` or
            :class:`~krflows.transforms.AffineMatrixTransform` in ``d`` dimensions.
        mean: ``m``, shape ``(d,)``; cov: ``S``, shape ``(d, d)``.

    Example:
        >>> T = AffineMatrixTransform(torch.tensor([1.0]), torch.tensor([[2.0]]))
        >>> affine_transport_cost(T, [0.0], [[1.0]])  # 1^2 + (1 - 2)^2 * 1
        tensor(2.)
    """
    b, A = affine_parts(T)
    m, S = check_gaussian(mean, cov, "N(mean, cov)")
    m, S = m.to(A), S.to(A)
    if A.shape != S.shape:
        raise ValueError(f"cov must have the map's shape {tuple(A.shape)}, got {tuple(S.shape)}")
    B = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device) - A
    return ((m @ B.mT - b) ** 2).sum() + torch.trace(B @ S @ B.mT)



def entropic_ot_gaussian(m1, S1, m2, S2, eps: float, debiased: bool = False) -> Tensor:
    r"""The entropic OT cost between ``N(m1, S1)`` and ``N(m2, S2)`` in closed form (Janati et al. 2020).

    With :math:`\sigma^2 = \varepsilon / 2` and the cost and regularization of
    :func:`sinkhorn_divergence`,

    .. math:: \mathrm{OT}_\varepsilon = \lVert m_1 - m_2 \rVert^2 + \operatorname{tr} S_1
        + \operatorname{tr} S_2 - \operatorname{tr} D + d \sigma^2 (1 - \log 2\sigma^2)
        + \sigma^2 \log\det(D + \sigma^2 I), \qquad
        D = \big(4 S_1^{1/2} S_2 S_1^{1/2} + \sigma^4 I\big)^{1/2} .

    It tends to :math:`W_2^2` as :math:`\varepsilon \to 0` and to
    :math:`\lVert m_1 - m_2 \rVert^2 + \operatorname{tr} S_1 + \operatorname{tr} S_2` (the
    independent coupling) as :math:`\varepsilon \to \infty`. ``debiased=True`` returns the
    Sinkhorn divergence :math:`S_\varepsilon` of the two Gaussians, the limit of
    :func:`sinkhorn_divergence` between large samples.

    Arguments:
        m1, m2: means ``(*, d)``; S1, S2: covariances ``(*, d, d)`` (symmetric PSD).
        eps: :math:`\varepsilon > 0`.
        debiased: subtract the two self-terms.

    Example:
        >>> z = torch.zeros(1)
        >>> entropic_ot_gaussian(z, torch.eye(1), z + 3, torch.eye(1), eps=0.5, debiased=True)
        tensor(9.)
    """
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    m1, S1 = check_gaussian(m1, S1, "N(m1, S1)")
    m2, S2 = check_gaussian(m2, S2, "N(m2, S2)")
    if m1.shape[-1] != m2.shape[-1]:
        raise ValueError(f"the two Gaussians must have one dimension, got {m1.shape[-1]} and {m2.shape[-1]}")

    def cost(ma: Tensor, Sa: Tensor, mb: Tensor, Sb: Tensor) -> Tensor:
        d, s2 = Sa.shape[-1], 0.5 * eps
        eye = torch.eye(d, dtype=Sa.dtype, device=Sa.device)
        ra = sqrtm_psd(Sa)
        D = sqrtm_psd(4 * ra @ Sb @ ra + s2**2 * eye)
        trace = lambda A: torch.diagonal(A, dim1=-2, dim2=-1).sum(-1)  # noqa: E731
        return (((ma - mb) ** 2).sum(-1) + trace(Sa) + trace(Sb) - trace(D)
                + d * s2 * (1 - math.log(2 * s2)) + s2 * torch.logdet(D + s2 * eye))

    value = cost(m1, S1, m2, S2)
    if debiased:
        value = value - 0.5 * (cost(m1, S1, m1, S1) + cost(m2, S2, m2, S2))
    return value

