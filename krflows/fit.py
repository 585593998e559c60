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
  ``β = 1`` warm-up and training follow, draw for draw the old default (the search ran on
  a forked random stream); the cost is the tempered warm-up, ``warmup`` more affine steps.
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
unchanged (0.940-0.995 and 0.934-0.948, bit-identical fits).

Samples where the target's log density is NaN/inf are dropped and counted; a batch with
no finite value raises :class:`~krflows.objectives.NonFiniteTargetError` before any
parameter changes; a step whose gradient is not finite is skipped (and counted), so the
parameters never become NaN.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from krflows.diagnostics import ess
from krflows.objectives import forward_kl, reverse_kl
from krflows.targets import as_target

__all__ = ["fit", "temperature", "warm_up", "warm_start", "ModeMixture", "defensive_kl",
           "defensive_weight", "adam"]


def temperature(step: int, steps: int, anneal: float, beta0: float) -> float:
    """``β`` at ``step``: linear from ``beta0`` to 1 over the first ``anneal * steps`` steps."""
    if anneal <= 0:
        return 1.0
    return min(1.0, beta0 + (1 - beta0) * step / max(1.0, anneal * steps))


def warm_up(flow, target, steps: int = 200, batch_size: int = 256, lr: float = 5e-2,
            beta: float = 1.0) -> list[float]:
    """Gaussian VI of the affine stage alone (reverse KL); returns the losses."""
    if flow.affine is None or steps <= 0:
        return []
    opt = adam(list(flow.affine.parameters()), lr=lr)
    losses = []
    for _ in range(steps):
        batch = reverse_kl(flow, target, batch_size, beta=beta)
        opt.zero_grad(set_to_none=True)
        batch.loss.backward()
        if _finite_grads(flow.affine.parameters()):
            torch.nn.utils.clip_grad_norm_(flow.affine.parameters(), 10.0)
            opt.step()
        losses.append(batch.loss.item())
    return losses


class ModeMixture:
    r"""The Laplace mixture of a target's modes, :math:`r = \sum_k w_k N(m_k, C_k)`.

    The proposal of the defensive forward-KL term (:func:`defensive_kl`): ``w_k`` are the
    modes' Laplace masses normalized, ``C_k = (-\nabla^2 \log p(m_k))^{-1}``. Only modes
    with a negative definite Hessian take part.
    """

    def __init__(self, locations: Tensor, covariances: Tensor, log_mass: Tensor):
        self.loc, self.cov = locations.detach(), covariances.detach()
        self.log_w = torch.log_softmax(log_mass.detach(), 0)
        self.scale_tril = torch.linalg.cholesky(self.cov)

    @classmethod
    def from_modes(cls, modes, like: Tensor, min_weight: float = 1e-3) -> ModeMixture | None:
        """From a :class:`~krflows.correct.ModeSet`; ``None`` unless two or more usable modes
        (negative definite Hessian, finite mass, weight at least ``min_weight``)."""
        keep = torch.as_tensor(modes.negative_definite, dtype=torch.bool).cpu()
        log_mass = torch.as_tensor(modes.log_mass).to(like).cpu()
        keep &= torch.isfinite(log_mass)
        if int(keep.sum()) < 2:
            return None
        keep &= torch.log_softmax(torch.where(keep, log_mass, -math.inf), 0) >= math.log(min_weight)
        if int(keep.sum()) < 2:
            return None
        idx = torch.nonzero(keep)[:, 0].to(like.device)
        cov = torch.as_tensor(modes.covariances).to(like)[idx]
        return cls(torch.as_tensor(modes.locations).to(like)[idx], 0.5 * (cov + cov.mT),
                   log_mass.to(like)[idx])

    @property
    def k(self) -> int:
        return self.loc.shape[0]

    def sample(self, n: int) -> Tensor:
        comp = torch.multinomial(self.log_w.exp(), n, replacement=True)
        z = torch.randn(n, self.loc.shape[1], dtype=self.loc.dtype, device=self.loc.device)
        return self.loc[comp] + (self.scale_tril[comp] @ z[..., None])[..., 0]

    def log_prob(self, x: Tensor) -> Tensor:
        diff = x[..., None, :] - self.loc
        w = torch.linalg.solve_triangular(self.scale_tril, diff[..., None], upper=False)[..., 0]
        log_det = self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        norm = log_det + 0.5 * self.loc.shape[1] * math.log(2 * math.pi)
        return torch.logsumexp(self.log_w - norm - 0.5 * (w**2).sum(-1), -1)

    def moments(self) -> tuple[Tensor, Tensor]:
        """The mixture's mean and covariance."""
        w = self.log_w.exp()
        mean = (w[:, None] * self.loc).sum(0)
        dm = self.loc - mean
        return mean, (w[:, None, None] * (self.cov + dm[:, :, None] * dm[:, None, :])).sum(0)

    def to(self, *args, **kwargs) -> ModeMixture:
        """A copy on another device or dtype (``Tensor.to``'s arguments)."""
        return ModeMixture.from_state_dict({k: v.to(*args, **kwargs) for k, v in self.state_dict().items()})

    def state_dict(self) -> dict[str, Tensor]:
        return {"loc": self.loc, "cov": self.cov, "log_w": self.log_w}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> ModeMixture:
        """Restores :meth:`state_dict`'s tensors bit for bit (a resumed run draws the same)."""
        mixture = cls(state["loc"], state["cov"], state["log_w"])
        mixture.log_w = state["log_w"]
        return mixture


def defensive_kl(flow, target, mixture: ModeMixture, n: int) -> Tensor:
    r"""Forward KL by self-normalized importance sampling from the mode mixture ``r``:
    :math:`-\sum_i \bar w_i \log q(x_i)`, ``x_i ~ r``, ``w_i ∝ p(x_i) / r(x_i)`` truncated at
    ``sqrt(n)`` times their mean (Ionides 2008). Mass covering: it keeps every mode in the flow
    with its weight while reverse KL sharpens the shapes. Costs one ``log_prob`` (inverse) of
    ``n`` points."""
    with torch.no_grad():
        x = mixture.sample(n)
        log_w = target(x) - mixture.log_prob(x)
        log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))
        w = torch.softmax(log_w, 0)
        w = torch.minimum(w, w.new_tensor(math.sqrt(n) / n))
        w = w / w.sum()
    return -(w * flow.log_prob(x)).sum()


def defensive_weight(step: int, steps: int) -> float:
    """The defensive term's weight at ``step`` of the joint phase: linear from 1 to 0."""
    return max(0.0, 1.0 - step / max(1, steps))


def warm_start(flow, target, steps: int = 200, batch_size: int = 256, *, modes="search",
               beta: float = 1.0, beta0: float = 0.1, lr: float = 1e-3, n_starts: int = 256,
               pretrain: int = 0) -> tuple[ModeMixture | None, list[float]]:
    """The warm-up of :func:`fit` (and of ``KRFlowModule``): returns the mode mixture (or
    ``None``) and the losses of the last warm-up phase.

    ``modes=None``: :func:`warm_up` at ``beta`` (the old default). ``modes="search"`` (or a
    :class:`~krflows.correct.ModeSet`): :func:`warm_up` on ``p^beta0``, then
    :func:`~krflows.correct.find_modes` from the flow's samples, on a forked random stream.
    With at most one usable mode the affine stage is reset and the ``beta`` warm-up follows:
    training is then the old default draw for draw (the tempered stage was a poor start on
    ``Funnel(10)``: ESS/N 0.03-0.08 instead of 0.93-0.95). With several, the affine stage is set
    to the :class:`ModeMixture`'s mean and covariance (and, if ``pretrain > 0``, the whole
    flow is pre-trained for that many steps by :func:`defensive_kl`, Adam at ``3 * lr``; off
    by default: measured no better than the decaying defensive term alone).
    """
    if flow.affine is None or steps <= 0 or modes is None:
        return None, warm_up(flow, target, steps, batch_size, beta=beta)
    if isinstance(modes, str):
        if modes != "search":
            raise ValueError(f"modes must be 'search', None or a ModeSet, got {modes!r}")
        from krflows.correct import find_modes

        initial = {k: v.clone() for k, v in flow.affine.state_dict().items()}
        device = flow.affine.shift.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                warnings.catch_warnings():  # "no start converged" (a funnel): the plain path follows
            warnings.simplefilter("ignore", RuntimeWarning)
            warm_up(flow, target, steps, batch_size, beta=beta0)
            modes = find_modes(target, flow, n_starts=n_starts)
        flow.affine.load_state_dict(initial)  # the plain path starts where it always did
    mixture = ModeMixture.from_modes(modes, like=flow.affine.shift)
    if mixture is None:
        return None, warm_up(flow, target, steps, batch_size, beta=beta)
    flow.affine.initialize(*mixture.moments())
    params = [p for p in flow.parameters() if p.requires_grad]
    opt = adam(params, lr=3 * lr)
    losses = []
    for _ in range(pretrain):
        loss = defensive_kl(flow, target, mixture, batch_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if _finite_grads(params):
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
        losses.append(loss.item())
    flow.zero_grad(set_to_none=True)
    return mixture, losses


def fit(
    flow,
    target,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
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
) -> dict[str, list[float]]:
    r"""Fits ``flow`` to an unnormalized target; returns the history.

    Arguments:
        flow: a :class:`~krflows.KRFlow`.
        target: a krflows target or any callable ``log_prob(x) -> (n,)``.
        steps: optimizer steps of the joint phase.
        batch_size: samples per step.
        lr: Adam learning rate (cosine-decayed to ``lr / 20``).
        objective: ``"reverse_kl"`` (from flow samples) or ``"forward_kl"`` (from ``samples``).
        samples: target samples ``(N, d)`` for ``"forward_kl"``.
        path_gradient: the sticking-the-landing reverse-KL estimator.
        anneal: fraction of the steps over which ``β`` rises from ``beta0`` to 1 (0: off).
        warmup: affine-stage warm-up steps (default ``min(200, steps // 5)``; 0: off). With
            ``"forward_kl"`` the stage is instead set from the samples' mean and covariance.
        modes: ``"search"`` (default): cover separated modes (:func:`warm_start`: tempered warm-up,
            mode search, and with several modes a Laplace-mixture start and a decaying
            defensive forward-KL term); a :class:`~krflows.correct.ModeSet` to skip the
            search; ``None``: the plain Gaussian-VI warm-up, reverse KL only.
        clip: gradient-norm clipping threshold.
        log_every: record the history every this many steps.
        callback: called as ``callback(step, record)`` at each record.
        progress: print a progress line at each record.

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
    target = as_target(target, dim=flow.dim)
    if target.dim != flow.dim:
        raise ValueError(f"the target has dim {target.dim} but the flow has dim {flow.dim}")
    history: dict[str, list[float]] = {k: [] for k in (
        "step", "loss", "elbo", "ess", "grad_norm", "lr", "beta", "dropped", "seconds")}
    warmup = min(200, steps // 5) if warmup is None else warmup
    mixture = None
    if objective == "reverse_kl":
        mixture, history["warmup_loss"] = warm_start(flow, target, warmup, batch_size, modes=modes, lr=lr,
                                                beta=temperature(0, steps, anneal, beta0), beta0=beta0)
        history["modes"] = [0 if mixture is None else mixture.k]
    elif flow.affine is not None and warmup > 0:
        # forward KL: the affine stage starts at the samples' moments (exact for a Gaussian)
        flow.affine.initialize(samples.mean(0), torch.cov(samples.T).reshape(flow.dim, flow.dim))
    params = [p for p in flow.parameters() if p.requires_grad]
    opt = adam(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1), eta_min=lr / 20)
    start, dropped, skipped, warned = time.perf_counter(), 0, 0, False
    for step in range(1, steps + 1):
        beta = temperature(step, steps, anneal, beta0)
        if objective == "reverse_kl":
            batch = reverse_kl(flow, target, batch_size, beta=beta, path_gradient=path_gradient)
            loss, log_w, dropped = batch.loss, batch.log_w, dropped + batch.dropped
            if mixture is not None and defensive_weight(step, steps) > 0:
                loss = loss + defensive_weight(step, steps) * defensive_kl(flow, target, mixture, batch_size)
            if batch.dropped > 0.05 * batch.n and not warned:
                warned = True
                warnings.warn(
                    f"{batch.dropped} of {batch.n} flow samples at step {step} had a non-finite target "
                    "log density and were dropped. Where that means zero density (log p = -inf), "
                    "dropping rewards the flow for leaking mass there (the kept samples' loss "
                    "decreases); prefer a steep but finite log density (a barrier).", stacklevel=2)
        else:
            idx = torch.randint(0, samples.shape[0], (batch_size,), device=samples.device)
            loss, log_w = forward_kl(flow, samples[idx]), None
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if _finite_grads(params):
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            opt.step()
        else:
            grad_norm, skipped = math.nan, skipped + 1
        sched.step()
        if step % log_every == 0 or step == steps:
            if log_w is None:
                with torch.no_grad():
                    x, log_q = flow.rsample_and_log_prob((batch_size,))
                    log_w = (target(x) - log_q)
                    log_w = log_w[torch.isfinite(log_w)]
            record = {
                "step": step, "loss": loss.item(), "elbo": float(log_w.mean()),
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


def adam(params: list[Tensor], **kwargs) -> torch.optim.Adam:
    """Adam, fused into one kernel per step where torch supports it (CPU and CUDA floats)."""
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, fused=fused, **kwargs)


def _finite_grads(params) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
