r"""The plain training loop: ``fit(flow, target, ...)`` (no Lightning needed).

Two phases:

1. **Warm-up** (``warmup`` steps): only the flow's affine stage ``x = m + L y`` is trained,
   by reverse KL: Gaussian variational inference, which moves the reference onto the
   target's location and scale so that the layers' boxes ``[-B, B]`` cover it.
2. **Joint training** of all parameters by reverse KL (or forward KL from samples), with
   Adam, a cosine learning-rate schedule, gradient-norm clipping, and optional annealing
   of the target :math:`p^{\beta}`, ``β`` rising linearly from ``beta0`` to 1 over the
   first ``anneal`` fraction of the steps (mode coverage).

**Mode covering by default** (``modes="search"``, :func:`warm_start`). Gaussian VI at ``β = 1``
locks the affine stage onto one mode of a multimodal target and reverse KL never finds the
others (0.3/0.7 modes 8 sd apart: 0.000/1.000 on 3 of 3 seeds). So the warm-up first runs
on the tempered target ``p^beta0`` (wide: it spans the modes) and
:func:`krflows.correct.find_modes` searches its inflated samples for local maxima (0.1-0.3 s).

* One mode or none (banana, funnel, Gaussians): the affine stage is reset and the plain
  ``β = 1`` warm-up and training follow (the search ran on a forked random stream), at the
  learning rate 3e-3 (:data:`DEFAULT_LR`); the cost is the tempered warm-up, ``warmup``
  more affine steps, each of which skips the layers while they are the identity.
* Several modes: the affine stage starts at the mean and covariance of their Laplace
  mixture ``r`` (weights from the Laplace masses), and each joint step adds a *defensive*
  forward-KL term, ``-Σ w_i log q(x_i)`` on ``batch_size`` draws of ``r`` with truncated
  self-normalized weights ``p / r`` (:func:`defensive_kl`), its weight decaying linearly
  from 1 to 0. It keeps every mode at its weight while reverse KL sharpens the shapes; it
  needs ``log q`` at the draws (the inverse), so such a step costs about 2.7 reverse-KL steps.

Measured (``experiments/results/mode_covering_defaults.md``; ``KRFlow(2)``, 2000 steps,
B = 256, a plain callable, 3 seeds): 0.3/0.7 modes 8 sd apart, mode-weight TV 0.003-0.011
(old default 0.300, ``anneal=0.5`` 0.015-0.030); four modes 0.1/0.2/0.3/0.4 on a square of
side 9 sd, TV 0.034-0.062 (``anneal=0.5`` 0.033-0.073); the same four on a line 9 sd apart,
TV 0.076-0.0996 (``anneal=0.5`` 0.163-0.193; the mixture start with 200 forward-KL
pre-training steps and reverse KL alone after them: up to 0.139); banana and funnel-10 ESS/N
unchanged by the search (0.940-0.995 and 0.934-0.948, bit-identical fits, at the learning rate
1e-3 of the time; since then one-mode fits run at 3e-3: :data:`DEFAULT_LR`).

Samples where the target's log density is ``-inf`` (zero density) are dropped and counted;
a NaN is an error unless ``nan="zero"`` reads it as zero density (:mod:`krflows.importance`);
a batch with no finite value raises :class:`~krflows.objectives.NonFiniteTargetError` before
any parameter changes; a step whose gradient is not finite is skipped (and counted), so the
parameters never become NaN. The warm-up, optimizer, schedule and gradient policy are those
of :mod:`krflows.train`, shared with the Lightning module.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from krflows._checks import check_int, check_points
from krflows.diagnostics.weights import ess
from krflows.importance import check_nan_policy, log_weights
from krflows.objectives import forward_kl, reverse_kl, support_elbo
from krflows.targets import as_target
from krflows.train import (
    adam,
    adam_cosine,
    clipped_step,
    default_warmup,
    defensive_kl,
    defensive_weight,
    keep_freed_memory,
    temperature,
    warm_start,
    warm_up,
    warn_dropped,
)

__all__ = ["fit", "temperature", "warm_up", "warm_start", "adam", "DEFAULT_LR"]

#: ``fit``'s learning rate when ``lr=None`` (the default), by what the start found. Measured
#: (``KRFlow(d)`` defaults, 2000 steps, B = 256, ESS/N of 20 000 fresh draws, seeds 0/1/2, 1
#: thread; benchmarks/RESULTS.md): with one mode 3e-3 against 1e-3, funnel-10 ESS/N
#: 0.921/0.969/0.881 against 0.849/0.951/0.619, banana 0.983/0.994/0.992 against
#: 0.908/0.988/0.955, and the ESS/N 0.8 mark reached sooner (benchmarks/RESULTS_ttq.md);
#: with several modes 3e-3 lost a mode's share on one of three seeds (four modes: total
#: variation 0.196 against 0.052-0.065 at 1e-3), so the mode-covering path keeps 1e-3.
#: Forward KL (from samples) keeps the old 1e-3 (not measured).
DEFAULT_LR = {"one mode": 3e-3, "modes": 1e-3, "forward_kl": 1e-3}


def fit(
    flow,
    target,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float | None = None,
    *,
    objective: str = "reverse_kl",
    samples: Tensor | None = None,
    path_gradient: bool = False,
    anneal: float = 0.0,
    beta0: float = 0.1,
    warmup: int | None = None,
    modes="search",
    clip: float = 10.0,
    weight_decay: float = 0.0,
    log_every: int = 10,
    callback: Callable[[int, dict], None] | None = None,
    progress: bool = False,
    nan: str = "error",
) -> dict[str, list[float]]:
    r"""Fits ``flow`` to an unnormalized target; returns the history.

    Arguments:
        flow: a :class:`~krflows.KRFlow`.
        target: a krflows target or any callable ``log_prob(x) -> (n,)``.
        steps: optimizer steps of the joint phase.
        batch_size: samples per step.
        lr: Adam learning rate (cosine-decayed to ``lr / 20``). Default: ``3e-3`` for reverse
            KL after a start that found at most one mode; ``1e-3`` when it found several (the
            defensive term's schedule is tuned at that rate) and for forward KL. See
            :data:`DEFAULT_LR` for what was measured.
        objective: ``"reverse_kl"`` (from flow samples) or ``"forward_kl"`` (from ``samples``).
        samples: target samples ``(N, d)`` for ``"forward_kl"``.
        path_gradient: the sticking-the-landing reverse-KL estimator.
        anneal: fraction of the steps over which ``β`` rises from ``beta0`` to 1 (0: off).
        warmup: affine-stage warm-up steps (default ``min(200, steps // 5)``; 0: off). With
            ``"forward_kl"`` the stage is instead set from the samples' mean and covariance.
        modes: ``"search"`` (default): cover separated modes (:func:`~krflows.train.warm_start`:
            tempered warm-up, mode search, and with several modes a Laplace-mixture start and
            a decaying defensive forward-KL term); a :class:`~krflows.correct.ModeSet` to skip
            the search; ``None``: the plain Gaussian-VI warm-up, reverse KL only.
        clip: gradient-norm clipping threshold.
        log_every: record the history every this many steps.
        callback: called as ``callback(step, record)`` at each record.
        progress: print a progress line at each record.
        nan: what a NaN log density of the target means: ``"error"`` (default) raises
            :class:`~krflows.objectives.NonFiniteTargetError`; ``"zero"`` reads it as zero
            density (``-inf``: the sample is dropped and counted, like any ``-inf``).

    Returns:
        a dict of lists: ``step, loss, elbo, ess, grad_norm, lr, beta, dropped, seconds``
        (``elbo`` and ``ess`` are of the untempered target, on the step's batch),
        ``warmup_loss`` and ``modes`` (``[k]``: the modes covered by the defensive term, 0 when
        one or none was found).

    Example:
        >>> import krflows
        >>> flow = krflows.KRFlow(2, layers=1, hidden=(16,))
        >>> target = krflows.targets.Gaussian(torch.zeros(2), torch.eye(2))
        >>> history = fit(flow, target, steps=20, batch_size=64, log_every=10)
        >>> history["step"]
        [10, 20]
    """
    if objective not in ("reverse_kl", "forward_kl"):
        raise ValueError(f"objective must be 'reverse_kl' or 'forward_kl', got {objective!r}")
    if objective == "forward_kl" and samples is None:
        raise ValueError("objective='forward_kl' needs target samples: fit(..., samples=x)")
    counts = (("steps", steps, 0), ("batch_size", batch_size, 1), ("log_every", log_every, 1),
              ("warmup", 0 if warmup is None else warmup, 0))
    for name, value, least in counts:
        check_int(name, value, least)
    if not 0.0 <= anneal <= 1.0:
        raise ValueError(f"anneal must be in [0, 1] (the fraction of the steps over which beta rises "
                         f"from beta0 to 1), got {anneal!r}")
    if not 0.0 < beta0 <= 1.0:
        raise ValueError(f"beta0 must be in (0, 1], got {beta0!r}")
    if not any(p.requires_grad for p in flow.parameters()):
        raise ValueError("the flow has no trainable parameter (every one has requires_grad=False)")
    if samples is not None:
        samples = check_points(samples, flow.dim, getattr(flow, "_ref", None), "samples")
        if samples.dim() != 2 or samples.shape[0] <= flow.dim:
            raise ValueError(f"samples must have shape (n, {flow.dim}) with n > {flow.dim} (their "
                             f"covariance starts the flow), got {tuple(samples.shape)}")
    check_nan_policy(nan)
    keep_freed_memory()
    target = as_target(target, dim=flow.dim)
    if target.dim != flow.dim:
        raise ValueError(f"the target has dim {target.dim} but the flow has dim {flow.dim}")
    history: dict[str, list[float]] = {k: [] for k in (
        "step", "loss", "elbo", "ess", "grad_norm", "lr", "beta", "dropped", "seconds")}
    warmup = default_warmup(steps) if warmup is None else warmup
    mixture = None
    if objective == "reverse_kl":
        mixture, history["warmup_loss"] = warm_start(
            flow, target, warmup, batch_size, modes=modes, lr=DEFAULT_LR["modes"] if lr is None else lr,
            beta=temperature(0, steps, anneal, beta0), beta0=beta0, nan=nan)
        history["modes"] = [0 if mixture is None else mixture.k]
    elif flow.affine is not None and warmup > 0:
        # forward KL: the affine stage starts at the samples' moments (exact for a Gaussian)
        flow.initialize_gaussian(samples.mean(0), torch.cov(samples.T).reshape(flow.dim, flow.dim))
    if lr is None:
        path = objective if objective == "forward_kl" else "one mode" if mixture is None else "modes"
        lr = DEFAULT_LR[path]
    params = [p for p in flow.parameters() if p.requires_grad]
    opt, sched = adam_cosine(params, lr, steps, weight_decay)
    start, dropped, skipped, warned = time.perf_counter(), 0, 0, False
    for step in range(1, steps + 1):
        beta = temperature(step, steps, anneal, beta0)
        if objective == "reverse_kl":
            batch = reverse_kl(flow, target, batch_size, beta=beta, path_gradient=path_gradient, nan=nan)
            loss, log_w, dropped = batch.loss, batch.log_w, dropped + batch.dropped  # log_w: -inf dropped
            warned = warn_dropped(batch, step, warned)
            weight = defensive_weight(step, steps)
            if mixture is not None and weight > 0:
                loss = loss + weight * defensive_kl(flow, target, mixture, batch_size, nan)
        else:
            idx = torch.randint(0, samples.shape[0], (batch_size,), device=samples.device)
            loss, log_w = forward_kl(flow, samples[idx]), None
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clipped_step(opt, params, clip)
        skipped += math.isnan(grad_norm)
        sched.step()
        if step % log_every == 0 or step == steps:
            if log_w is None:
                with torch.no_grad():
                    weights = log_weights(target, *flow.rsample_and_log_prob((batch_size,)), nan=nan)
                    log_w = weights.log_w[weights.valid]  # -inf where the target's density is zero
            record = {
                "step": step, "loss": loss.item(), "elbo": float(support_elbo(log_w)),
                "ess": float(ess(log_w)), "grad_norm": grad_norm,
                "lr": opt.param_groups[0]["lr"], "beta": beta, "dropped": dropped,
                "seconds": time.perf_counter() - start,
            }
            for k, v in record.items():
                history[k].append(v)
            if callback is not None:
                callback(step, record)
            if progress:
                print(f"step {step:>6}/{steps}  loss {record['loss']:10.4f}  "
                      f"elbo {record['elbo']:10.4f}  ess {record['ess']:.3f}  beta {beta:.2f}"
                      + (f"  dropped {dropped}" if dropped else ""), flush=True)
    history["skipped_steps"] = [skipped]
    return history

