r"""The training policies shared by :func:`krflows.fit` and the Lightning module: one home each.

* :func:`default_warmup`: how many steps the affine stage is warmed up by default;
* :func:`warm_up`: that warm-up, Gaussian VI of the affine stage alone (reverse KL);
* :func:`temperature`: the annealing schedule of ``β``;
* :func:`adam_cosine`: Adam with a cosine learning-rate schedule down to ``lr / 20``;
* :func:`finite_grads`: whether a step's gradient is finite (a step with a non-finite
  gradient is skipped, so the parameters never become NaN);
* :func:`warn_dropped`: the warning when many samples fall where the target density is zero.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from krflows.objectives import Batch, reverse_kl

__all__ = ["default_warmup", "warm_up", "temperature", "adam", "adam_cosine", "finite_grads", "warn_dropped"]


def default_warmup(steps: int) -> int:
    """Affine warm-up steps when none are given: ``min(200, steps // 5)``."""
    return min(200, steps // 5)


def temperature(step: int, steps: int, anneal: float, beta0: float) -> float:
    """``β`` at ``step``: linear from ``beta0`` to 1 over the first ``anneal * steps`` steps."""
    if anneal <= 0:
        return 1.0
    return min(1.0, beta0 + (1 - beta0) * step / max(1.0, anneal * steps))


def adam(params: list[Tensor], fused: bool = True, **kwargs) -> torch.optim.Adam:
    """Adam, fused into one kernel per step where torch supports it (CPU and CUDA floats)."""
    fused = fused and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, fused=fused, **kwargs)


def adam_cosine(params: list[Tensor], lr: float, steps: int, weight_decay: float = 0.0, fused: bool = True
              ) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """Adam and its cosine schedule from ``lr`` to ``lr / 20`` over ``steps`` steps."""
    opt = adam(params, fused=fused, lr=lr, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1), eta_min=lr / 20)


def finite_grads(params) -> bool:
    """Whether every gradient of ``params`` is finite (``None`` counts as finite)."""
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


def warm_up(flow, target, steps: int = 200, batch_size: int = 256, lr: float = 5e-2,
            beta: float = 1.0, nan: str = "error") -> list[float]:
    """Gaussian VI of the affine stage alone (reverse KL); returns the losses."""
    if flow.affine is None or steps <= 0:
        return []
    opt = adam(list(flow.affine.parameters()), lr=lr)
    losses = []
    for _ in range(steps):
        batch = reverse_kl(flow, target, batch_size, beta=beta, nan=nan)
        opt.zero_grad(set_to_none=True)
        batch.loss.backward()
        if finite_grads(flow.affine.parameters()):
            torch.nn.utils.clip_grad_norm_(flow.affine.parameters(), 10.0)
            opt.step()
        losses.append(batch.loss.item())
    return losses


def warn_dropped(batch: Batch, step: int, warned: bool) -> bool:
    """Warns once (``warned`` says whether it already did) when more than 5% of a batch was
    dropped for a non-finite target density; returns whether it has warned by now."""
    if warned or batch.dropped <= 0.05 * batch.n:
        return warned
    warnings.warn(
        f"{batch.dropped} of {batch.n} flow samples at step {step} had a non-finite target "
        "log density and were dropped. Where that means zero density (log p = -inf), "
        "dropping rewards the flow for leaking mass there (the kept samples' loss "
        "decreases); prefer a steep but finite log density (a barrier).", stacklevel=3)
    return True
