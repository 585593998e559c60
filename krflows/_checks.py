"""Input validation at the public boundary: clear errors naming what was expected."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


def check_points(x: Tensor, dim: int | None, ref: Tensor | None = None, name: str = "x", *,
                 finite: bool = True, owner: str = "the flow") -> Tensor:
    """Checks that ``x`` is a finite floating tensor of shape ``(*, dim)``.

    If ``ref`` is given, ``x`` must also have its dtype and device (no silent casts).
    ``dim=None`` skips the width check; ``finite=False`` the finiteness check (the only one
    that reads the data: the others are free). Returns ``x`` unchanged.
    """
    width = "d" if dim is None else dim
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (*, {width}), "
                         f"got {type(x).__name__}")
    if x.dim() < 1 or (dim is not None and x.shape[-1] != dim):
        raise ValueError(f"{name} must have shape (*, {width}), got {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise ValueError(f"{name} must have a floating dtype (float32 or float64), got {x.dtype}")
    if ref is not None and x.dtype != ref.dtype:
        hint = (f"e.g. flow.to({x.dtype})" if x.dtype in (torch.float32, torch.float64)
                else f"{name}.to({ref.dtype}): flows run in float32 or float64")
        raise ValueError(f"{name} has dtype {x.dtype} but {owner} is {ref.dtype}: "
                         f"convert one of them ({hint})")
    if ref is not None and x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {owner} is on {ref.device}")
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


# ---- constructor options ------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """``value`` must be an int ``>= low`` (and ``<= high``); returns it as a Python int."""
    if not _is_int(value) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {bounds}, got {value!r}")
    return int(value)


def check_real(name: str, value, low: float, high: float = math.inf, *, closed_low: bool = False) -> float:
    """``value`` must be a finite real number in ``(low, high)`` (``[low, high)`` if ``closed_low``)."""
    ok = _is_real(value) and math.isfinite(value) and value < high
    ok = ok and (value >= low if closed_low else value > low)
    if not ok:
        interval = f"{'>=' if closed_low else '>'} {low:g}" if high == math.inf else \
            f"in {'[' if closed_low else '('}{low:g}, {high:g})"
        raise ValueError(f"{name} must be a finite number {interval}, got {value!r}")
    return float(value)


def check_hidden(hidden) -> tuple[int, ...]:
    """Hidden widths: a sequence of positive ints (possibly empty: a linear conditioner)."""
    if isinstance(hidden, str | bytes) or not isinstance(hidden, Sequence | torch.Size):
        raise ValueError(f"hidden must be a sequence of positive ints (the widths of the hidden "
                         f"layers, e.g. (64, 64)), got {hidden!r}")
    if not all(_is_int(w) and w >= 1 for w in hidden):
        raise ValueError(f"hidden must be a sequence of positive ints (the widths of the hidden "
                         f"layers, e.g. (64, 64)), got {list(hidden)!r}")
    return tuple(int(w) for w in hidden)


def check_family_options(family: str, cls, options: dict) -> None:
    """Refuses option names that the named monotone family does not take (a :class:`ValueError`
    that lists the ones it does). The values are checked by the family's constructor."""
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} of the {family!r} family; "
                         f"it takes {', '.join(allowed) or 'no options'}")


def check_slope_floor(min_slope) -> float:
    """``min_slope`` in ``[0, 1)``: the floor is added to a softplus shifted to give 1 at zero."""
    return check_real("min_slope", min_slope, 0.0, 1.0, closed_low=True)
