"""Input validation at the public boundary: clear errors naming what was expected."""

from __future__ import annotations

import torch
from torch import Tensor


def check_points(x: Tensor, dim: int, ref: Tensor | None = None, name: str = "x") -> Tensor:
    """Checks that ``x`` is a finite floating tensor of shape ``(*, dim)``.

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
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(-1).sum())
        raise ValueError(f"{name} must be finite: {bad} of its points contain NaN or inf")
    return x
