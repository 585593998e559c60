r"""The training policies shared by :func:`krflows.fit` and the Lightning module: one home each.

* :func:`default_warmup`: how many steps the affine stage is warmed up by default;
* :func:`warm_up`: that warm-up, Gaussian VI of the affine stage alone (reverse KL);
* :func:`temperature`: the annealing schedule of ``β``;
* :func:`adam_cosine`: Adam with a cosine learning-rate schedule down to ``lr / 20``;
* :func:`finite_grads`: whether a step's gradient is finite, and :func:`clipped_step`: the
  clipped optimizer step, skipped when the gradient is not finite (so the parameters never
  become NaN);
* :func:`warn_dropped`: the warning when many samples fall where the target density is zero;
* :func:`warm_start`: the default, mode-covering start (a tempered warm-up and a mode search;
  with several modes a :class:`ModeMixture` start and the decaying :func:`defensive_kl` term,
  weighted by :func:`defensive_weight`). Why and what it measured: :mod:`krflows.fit`;
* :func:`keep_freed_memory`: the C allocator keeps what a step frees for the next step (glibc).
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import warnings

import torch
from torch import Tensor

from krflows.importance import evaluate_target
from krflows.objectives import Batch, _remember_as, reverse_kl

__all__ = ["default_warmup", "warm_up", "temperature", "adam", "adam_cosine", "finite_grads", "clipped_step",
           "warn_dropped", "warm_start", "ModeMixture", "defensive_kl", "defensive_weight",
           "keep_freed_memory"]


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
    """Whether every gradient of ``params`` is finite (``None`` counts as finite). One
    host-device synchronization, not one per tensor (the Lightning module calls this every step)."""
    flags = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    return not flags or bool(torch.stack(flags).all())


def clipped_step(opt: torch.optim.Optimizer, params: list[Tensor], clip: float) -> float:
    """Clips the gradient norm of ``params`` to ``clip`` and steps ``opt``, unless that norm is
    not finite because a gradient is (then the step is skipped, so the parameters never become
    NaN). Returns the norm before clipping, NaN for a skipped step. One norm serves the check
    and the clip (a finiteness check per tensor first cost ~3% of a small step); only a norm
    that is not finite is looked at per tensor: finite gradients whose norm overflowed
    (a flow blown up by too high a learning rate) are clipped to zero and the step is taken,
    so that Adam's momentum carries on and the divergence is reported, not frozen."""
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    if not math.isfinite(norm) and not finite_grads(params):
        return math.nan
    opt.step()
    return norm


# glibc's mallopt parameters (malloc.h) and the values keep_freed_memory sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 << 20  # the most glibc's mallopt accepts (HEAP_MAX_SIZE / 2 on 64-bit)
_TRIM_THRESHOLD = 1 << 30
_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Lets the C allocator keep the memory a training step frees for the next step, instead of
    returning it to the system and taking it back, one page fault per 4 KiB, at the next step.
    Called by :func:`krflows.fit` and the Lightning module's ``on_fit_start`` (so ``krflows
    fit`` too); call it yourself before a training loop of your own (e.g. Pyro's SVI). Returns
    whether the setting is in effect.

    Why: torch has no caching allocator on the CPU; every tensor of a step comes from ``malloc``
    and goes back to it. glibc serves blocks above a threshold (128 KiB at first, raised to the
    largest block freed so far, at most 32 MiB) by ``mmap`` and trims the top of its heap when
    more than twice that threshold is free there, so a step whose working set is larger than
    what the process happened to free before gets its memory from the kernel again at every
    step, each page zeroed on its first write. Measured on a 2-core VM, ``fit`` with and without
    this setting (system CPU time, the kernel's side of a fault, which wall time on a shared host
    hides in its noise): ``KRFlow(300)`` at B = 256 5300 page faults and 10.9 ms of system time
    per step (of a ~70 ms step) against 3 and 0.25 ms; ``KRFlow(100)`` 1800 and 6.0 ms against 1
    and 0.2 ms; ``KRFlow(10)`` at B = 4096 2500 and 5.5 ms against 36 and 0.5 ms.

    What it does: on Linux with glibc, ``mallopt(M_MMAP_THRESHOLD, 32 MiB)`` (blocks up to
    32 MiB come from the heap) and ``mallopt(M_TRIM_THRESHOLD, 1 GiB)`` (up to 1 GiB free at the
    heap's top stays in the process: a process keeps at most the peak it already reached). The
    settings are the process's and stay after training. Nothing happens elsewhere (another OS or
    C library), with another allocator preloaded (``LD_PRELOAD`` naming jemalloc, tcmalloc or
    mimalloc), where ``GLIBC_TUNABLES`` already sets a ``glibc.malloc`` parameter, or with
    ``KRFLOWS_MALLOC=system`` in the environment (glibc's own policy).
    """
    global _kept
    if _kept is None:
        _kept = False
        preload = os.environ.get("LD_PRELOAD", "")
        if (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
                and os.environ.get("KRFLOWS_MALLOC", "") != "system"
                and "glibc.malloc" not in os.environ.get("GLIBC_TUNABLES", "")
                and not any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc"))):
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            _kept = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
                         and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _kept


def warm_up(flow, target, steps: int = 200, batch_size: int = 256, lr: float = 5e-2,
            beta: float = 1.0, nan: str = "error") -> list[float]:
    """Gaussian VI of the affine stage alone (reverse KL); returns the losses."""
    if flow.affine is None or steps <= 0:
        return []
    stage = list(flow.affine.parameters())
    opt = adam(stage, lr=lr)
    losses = []
    # While every layer is the identity (a fresh flow), the flow is its affine stage: the
    # warm-up then skips the layers' passes (the same map; a step at d = 2 costs ~1 ms
    # instead of ~4 ms).
    draws = _AffineOnly(flow) if getattr(flow, "_layers_are_identity", lambda: False)() else flow
    # The affine stage is the last map (x = m + L y), so its gradient needs no graph through the
    # layers before it: with their parameters frozen for the warm-up, autograd records only the
    # affine stage and the target (the same numbers, bit for bit; a warm-up step then costs about
    # a third of a training step instead of about one).
    frozen = [p for p in flow.parameters() if p.requires_grad
              and all(p is not q for q in flow.affine.parameters())]
    try:
        for p in frozen:
            p.requires_grad_(False)
        for _ in range(steps):
            batch = reverse_kl(draws, target, batch_size, beta=beta, nan=nan)
            opt.zero_grad(set_to_none=True)
            batch.loss.backward()
            clipped_step(opt, stage, 10.0)
            losses.append(batch.loss.item())
        if draws is not flow:  # where the target was finite on this flow's samples
            _remember_as(flow, draws)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return losses


class _AffineOnly:
    """A flow whose layers are all the identity, sampled through its affine stage alone (what
    :func:`warm_up` trains; ``reverse_kl`` needs only these methods)."""

    def __init__(self, flow):
        self.flow = flow

    def rsample_and_log_prob(self, shape) -> tuple[Tensor, Tensor]:
        z = self.flow.base.rsample(torch.Size(shape))
        y, log_q, _ = self.flow._affine_push(z)
        return self.flow._to_user_order(y), log_q

    def log_prob(self, x: Tensor) -> Tensor:
        y = self.flow._to_flow_order(x)
        z, log_diag = self.flow.affine.as_transform().inverse_and_log_diag(y)
        return self.flow.base.log_prob(z) - log_diag.sum(-1)

    def parameters(self):
        return self.flow.parameters()


def warn_dropped(batch: Batch, step: int, warned: bool) -> bool:
    """Warns once (``warned`` says whether it already did) when more than 5% of a batch was
    dropped for a non-finite target density; returns whether it has warned by now."""
    if warned or batch.dropped <= 0.05 * batch.n:
        return warned
    warnings.warn(
        f"{batch.dropped} of {batch.n} flow samples at step {step} had a non-finite target "
        "log density (zero density) and were dropped: they get weight 0, and the loss is that of "
        "the flow restricted to the target's support (reverse_kl). A flow maps onto all of R^d, so "
        "with a bounded support some of its samples always fall outside: fit the posterior in "
        "unconstrained coordinates (log, logit: Pyro models are), or give it a steep but finite "
        "log density outside (a barrier).", stacklevel=3)
    return True


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


def defensive_kl(flow, target, mixture: ModeMixture, n: int, nan: str = "error") -> Tensor:
    r"""Forward KL by self-normalized importance sampling from the mode mixture ``r``:
    :math:`-\sum_i \bar w_i \log q(x_i)`, ``x_i ~ r``, ``w_i ∝ p(x_i) / r(x_i)`` truncated at
    ``sqrt(n)`` times their mean (Ionides 2008). Mass covering: it keeps every mode in the flow
    with its weight while reverse KL sharpens the shapes. Costs one ``log_prob`` (inverse) of
    ``n`` points."""
    with torch.no_grad():
        x = mixture.sample(n)
        log_w = evaluate_target(target, x, nan)[0] - mixture.log_prob(x)
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
               pretrain: int = 0, nan: str = "error") -> tuple[ModeMixture | None, list[float]]:
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
        return None, warm_up(flow, target, steps, batch_size, beta=beta, nan=nan)
    if isinstance(modes, str):
        if modes != "search":
            raise ValueError(f"modes must be 'search', None or a ModeSet, got {modes!r}")
        from krflows.correct import find_modes

        initial = {k: v.clone() for k, v in flow.affine.state_dict().items()}
        device = flow.affine.shift.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                warnings.catch_warnings():  # "no start converged" (a funnel): the plain path follows
            warnings.simplefilter("ignore", RuntimeWarning)
            warm_up(flow, target, steps, batch_size, beta=beta0, nan=nan)
            modes = find_modes(target, flow, n_starts=n_starts)
        flow.affine.load_state_dict(initial)  # the plain path starts where it always did
    mixture = ModeMixture.from_modes(modes, like=flow.affine.shift)
    if mixture is None:
        return None, warm_up(flow, target, steps, batch_size, beta=beta, nan=nan)
    flow.initialize_gaussian(*mixture.moments())  # the mixture lives in the user's coordinates
    params = [p for p in flow.parameters() if p.requires_grad]
    opt = adam(params, lr=3 * lr)
    losses = []
    for _ in range(pretrain):
        loss = defensive_kl(flow, target, mixture, batch_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clipped_step(opt, params, 10.0)
        losses.append(loss.item())
    flow.zero_grad(set_to_none=True)
    return mixture, losses
