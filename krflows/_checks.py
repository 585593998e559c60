"""Input validation at the public boundary: clear errors naming what was expected."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor


def check_points(x: Tensor, dim: int, ref: Tensor | None = None, name: str = "x", finite: bool = True
                 ) -> Tensor:
    """Checks that ``x`` is a floating tensor of shape ``(*, dim)``, finite unless ``finite=False``.

    If ``ref`` is given, ``x`` must also have its dtype and device (no silent casts).
    Returns ``x`` unchanged.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (*, {dim}), "
                         f"got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"{name} must have shape (*, {dim}), got {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise ValueError(f"{name} must have a floating dtype (float32 or float64), got {x.dtype}")
    if ref is not None and x.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {x.dtype} but the flow is {ref.dtype}: "
                         f"convert one of them (e.g. flow.to({x.dtype}))")
    if ref is not None and x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but the flow is on {ref.device}")
    if finite and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(-1).sum())
        raise ValueError(f"{name} must be finite: {bad} of its points contain NaN or inf")
    return x


def check_gaussian(mean, cov, name: str = "", batched: bool = True, psd: bool = True
                   ) -> tuple[Tensor, Tensor]:
    """A Gaussian's mean ``(*, d)`` and covariance ``(*, d, d)`` as tensors of one floating dtype
    (array-likes accepted; integers become the default dtype) on the mean's device.

    Checks shapes (``(d,)`` and ``(d, d)`` when not ``batched``), finiteness, symmetry (up to
    rounding, which is removed) and, with ``psd``, positive semi-definiteness. ``name``
    prefixes the error messages.
    """
    where = f"{name}: " if name else ""
    mean, cov = torch.as_tensor(mean), torch.as_tensor(cov)
    dtype = torch.promote_types(mean.dtype, cov.dtype)
    dtype = dtype if dtype.is_floating_point else torch.get_default_dtype()
    mean, cov = mean.to(dtype), cov.to(device=mean.device, dtype=dtype)
    if mean.dim() < 1 or (not batched and mean.dim() != 1):
        raise ValueError(f"{where}mean must have shape {'(*, d)' if batched else '(d,)'}, "
                         f"got {tuple(mean.shape)}")
    d = mean.shape[-1]
    if cov.dim() < 2 or cov.shape[-2:] != (d, d) or (not batched and cov.dim() != 2):
        raise ValueError(f"{where}cov must have shape {'(*, ' if batched else '('}{d}, {d}), "
                         f"got {tuple(cov.shape)}")
    if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
        raise ValueError(f"{where}mean and cov must be finite")
    scale = cov.abs().amax((-2, -1), keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    tol = 1e3 * torch.finfo(dtype).eps
    if ((cov - cov.mT).abs() / scale).max() > tol:
        raise ValueError(f"{where}cov must be symmetric")
    cov = 0.5 * (cov + cov.mT)  # remove rounding asymmetry before factorizing
    if psd and (torch.linalg.eigvalsh(cov) / scale[..., 0]).min() < -tol:
        raise ValueError(f"{where}cov must be positive semi-definite")
    return mean, cov


def renamed_keyword(kwargs: dict, old: str, new: str, value: Any, default: Any, stacklevel: int = 3) -> Any:
    """The value of keyword ``new``, or of its deprecated name ``old`` popped from ``kwargs``.

    ``old`` warns with a ``DeprecationWarning``; giving both (``value`` not ``default``) is an error.
    """
    if old not in kwargs:
        return value
    if value is not default and value != default:
        raise ValueError(f"give {new}= only ({old}= is its deprecated name), not both")
    warnings.warn(f"the keyword {old}= is deprecated: use {new}=", DeprecationWarning, stacklevel=stacklevel)
    return kwargs.pop(old)
