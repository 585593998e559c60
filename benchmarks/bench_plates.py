r"""Plated models: ``AutoKRFlow`` (sparse by default) against Pyro's autoguides and the dense flow.

The model is the non-centred hierarchical normal model with ``J`` groups,

.. math:: \mu \sim N(0, 5^2),\quad \tau \sim \text{HalfCauchy}(5),\quad \eta_j \sim N(0, 1),\quad
          y_j \sim N(\mu + \tau \eta_j, \sigma_j^2), \qquad \theta_j = \mu + \tau \eta_j ,

with data drawn from it (``μ = 1``, ``τ = 1``, ``σ_j ~ U(0.5, 1.5)``, seed 0). Exact posterior
oracle: ``y_j | μ, τ ~ N(μ, σ_j^2 + τ^2)``, so the posterior of ``(μ, log τ)`` is computed on a
grid (a coarse grid locates the mass, then a 301 x 301 grid over it), and given ``(μ, τ)`` each
``θ_j`` is Gaussian with precision ``1/σ_j^2 + 1/τ^2``: the thetas' posterior means and sds are
grid-weighted mixtures of those Gaussians' moments.

Each guide is fitted by plain Pyro SVI (``Trace_ELBO(num_particles, vectorize_particles=True)``,
``ClippedAdam`` with its learning-rate decay) for the same number of steps; 4000 draws
(``Predictive(..., parallel=True)``) give the reported errors: ``μ`` and ``τ`` mean errors in
posterior sds and sd ratios, the thetas' median ``|mean error| / sd`` and median
``|sd ratio - 1|``. A second table times one SVI step and ``log_prob`` of the flow at 1024
fresh points against ``d``.

Usage::

    python benchmarks/bench_plates.py                       # J = 1000, writes benchmarks/RESULTS_plates.md
    python benchmarks/bench_plates.py --J 100 --steps 1000
    python benchmarks/bench_plates.py --smoke --out /tmp/plates.md   # seconds: every code path, no meaning
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

import krflows
import krflows.pyro
from krflows.pyro import AutoKRFlow

GUIDES = ("krflows-sparse", "krflows-dense", "AutoMultivariateNormal", "AutoNormal", "AutoLowRank")


def model(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("groups", y.shape[-1]):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * eta, sigma), obs=y)


def make_data(J: int, seed: int = 0, mu: float = 1.0, tau: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    sigma = 0.5 + torch.rand(J, generator=g)
    theta = mu + tau * torch.randn(J, generator=g)
    return theta + sigma * torch.randn(J, generator=g), sigma


# ---- the exact posterior --------------------------------------------------------------------

def _log_post(mu, log_tau, y, sigma):
    """``log p(μ, log τ | y)`` up to a constant on a grid (float64), ``η`` integrated out."""
    tau = log_tau.exp()
    var = sigma**2 + tau[..., None] ** 2
    ll = -0.5 * ((y - mu[..., None]) ** 2 / var + var.log()).sum(-1)
    prior = -0.5 * (mu / 5.0) ** 2 + dist.HalfCauchy(5.0).log_prob(tau) + log_tau
    return ll + prior


def oracle(y, sigma, n: int = 301) -> dict:
    """Posterior means and sds of ``μ``, ``τ`` and every ``θ_j`` (grid quadrature)."""
    y, sigma = y.double(), sigma.double()
    lo, hi = torch.tensor([-20.0, -8.0], dtype=torch.float64), torch.tensor([20.0, 5.0], dtype=torch.float64)
    for _ in range(3):  # zoom onto the region holding the mass
        mu_g, lt_g = (torch.linspace(float(lo[i]), float(hi[i]), n, dtype=torch.float64) for i in range(2))
        M, LT = torch.meshgrid(mu_g, lt_g, indexing="ij")
        lp = torch.cat([_log_post(M[i:i + 20], LT[i:i + 20], y, sigma) for i in range(0, n, 20)])
        keep = lp > lp.max() - 30
        new_lo = torch.stack([M[keep].min(), LT[keep].min()])
        new_hi = torch.stack([M[keep].max(), LT[keep].max()])
        step = (hi - lo) / (n - 1)
        lo, hi = new_lo - 2 * step, new_hi + 2 * step
    w = torch.softmax(lp.reshape(-1), 0).reshape(lp.shape)
    tau = LT.exp()
    out = {}
    for name, v in (("mu", M), ("tau", tau)):
        m = (w * v).sum()
        out[name] = (float(m), float(((w * (v - m) ** 2).sum()).sqrt()))
    # thetas: mixtures over the grid of N(m_j, v_j); chunked over grid rows
    e1 = torch.zeros_like(y)
    e2 = torch.zeros_like(y)
    for i in range(0, n, 20):
        t2 = tau[i:i + 20, :, None] ** 2
        v = 1 / (1 / sigma**2 + 1 / t2)
        m = v * (y / sigma**2 + M[i:i + 20, :, None] / t2)
        ww = w[i:i + 20, :, None]
        e1 += (ww * m).sum((0, 1))
        e2 += (ww * (v + m * m)).sum((0, 1))
    out["theta"] = (e1, (e2 - e1**2).clamp_min(0).sqrt())
    out["grid_box"] = (lo.tolist(), hi.tolist())
    return out


def errors(draws: dict, truth: dict) -> dict:
    """The benchmark's error measures of 4000 draws against the oracle."""
    mu, tau = draws["mu"].reshape(-1).double(), draws["tau"].reshape(-1).double()
    theta = (draws["mu"].reshape(-1, 1) + draws["tau"].reshape(-1, 1) *
             draws["eta"].reshape(mu.shape[0], -1)).double()
    out = {}
    for name, v in (("mu", mu), ("tau", tau)):
        m, s = truth[name]
        out[f"{name}_mean_err_sd"] = (float(v.mean()) - m) / s
        out[f"{name}_sd_ratio"] = float(v.std()) / s
    m, s = truth["theta"]
    out["theta_med_abs_mean_err_sd"] = float(((theta.mean(0) - m).abs() / s).median())
    out["theta_med_abs_sd_ratio_m1"] = float((theta.std(0) / s - 1).abs().median())
    return out


# ---- guides ---------------------------------------------------------------------------------

def make_guide(name: str):
    if name == "krflows-sparse":
        return AutoKRFlow(model)
    if name == "krflows-dense":
        return AutoKRFlow(model, sparse=False)
    if name == "AutoMultivariateNormal":
        return AutoMultivariateNormal(model)
    if name == "AutoNormal":
        return AutoNormal(model)
    if name == "AutoLowRank":
        return AutoLowRankMultivariateNormal(model, rank=10)
    raise ValueError(f"unknown guide {name!r}; one of {GUIDES}")


def fit_guide(name: str, y, sigma, steps: int, particles: int, lr: float, lr_final: float, seed: int) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = make_guide(name)
    # Pyro's Adam with its per-step decay: lr -> lr_final over the run
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": (lr_final / lr) ** (1 / max(steps, 1))})
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=particles, vectorize_particles=True))
    start = time.perf_counter()
    losses = [svi.step(y, sigma) for _ in range(steps)]
    seconds = time.perf_counter() - start
    with torch.no_grad():
        draws = Predictive(model, guide=guide, num_samples=4000, parallel=True,
                           return_sites=["mu", "tau", "eta"])(y, sigma)
    extra = {}
    if isinstance(guide, AutoKRFlow):
        extra["flow"] = type(guide.flow).__name__
        extra["parameters"] = sum(p.numel() for p in guide.flow.parameters())
    return {"guide": name, "seconds": seconds, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "draws": draws, **extra}


# ---- cost against d -------------------------------------------------------------------------

#: the flows of the cost table; each times a 4-particle training step on the model and
#: ``log_prob`` at fresh points (see ``_variant``)
VARIANTS = ("krflows-sparse", "krflows-dense", "zuko-NSF", "AutoIAFNormal")


def _median_time(fn, repeats: int, slow: float = 5.0) -> float:
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    if first > slow:  # the dense flow's log_prob at d = 1000 takes a minute: once is enough
        return first
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _variant(name: str, J: int, batch: int, particles: int = 4):
    """``(step, log_prob, parameters)`` of one flow on the ``J``-group model: ``step()`` runs one
    training step with ``particles`` draws, ``log_prob()`` evaluates the flow at ``batch`` fresh points.

    * krflows-sparse / -dense, AutoIAFNormal: a plain Pyro SVI step (``Trace_ELBO``, vectorized
      particles) and the guide's posterior density at draws of it (``AutoIAFNormal``: Pyro's
      ``AffineAutoregressive``, one transform, hidden ``3d + 1``; its inverse takes ``d`` passes);
    * zuko-NSF: ``zuko.flows.NSF(d, transforms=2, hidden_features=(32, 32))`` (a masked
      autoregressive rational-quadratic spline flow, 8 bins, one MADE pass for ``log_prob``,
      ``d`` passes to sample); its step is reverse KL on the model's potential
      (``krflows.pyro.potential_from_model``) with Adam.
    """
    y, sigma = make_data(J)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    if name == "zuko-NSF":
        import zuko

        potential = krflows.pyro.potential_from_model(model, y, sigma)
        flow = zuko.flows.NSF(J + 2, transforms=2, hidden_features=(32, 32))
        opt = torch.optim.Adam(flow.parameters(), lr=1e-3)

        def step():
            x, log_q = flow().rsample_and_log_prob((particles,))
            loss = (log_q - potential(x)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        with torch.no_grad():
            x = flow().sample((batch,))
        return step, lambda: flow().log_prob(x), sum(p.numel() for p in flow.parameters())
    if name == "AutoIAFNormal":
        guide = AutoIAFNormal(model)
    elif name in ("krflows-sparse", "krflows-dense"):
        guide = AutoKRFlow(model, sparse=name == "krflows-sparse", warmup=0)
    else:
        raise ValueError(f"unknown variant {name!r}; one of {VARIANTS}")
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO(particles, vectorize_particles=True))
    svi.step(y, sigma)  # builds the guide
    with torch.no_grad():
        if isinstance(guide, AutoKRFlow):
            x = guide.flow.sample((batch,))
            log_prob = lambda: guide.flow.log_prob(x)  # noqa: E731
        else:  # a fresh copy of the points at each call: Pyro's transforms cache their last
            posterior = guide.get_posterior()  # (input, output) pair and would skip the inverse
            x = posterior.sample((batch,))
            log_prob = lambda: posterior.log_prob(x.clone())  # noqa: E731
    return (lambda: svi.step(y, sigma)), log_prob, sum(p.numel() for p in guide.parameters())


def _parameters_estimate(name: str, d: int) -> int:
    """Parameters of a variant at dimension ``d`` without building it (for the memory check)."""
    if name == "AutoIAFNormal":  # MADE d -> 3d + 1 -> 2d, plus the base's loc and scale
        h = 3 * d + 1
        return d * h + h + h * 2 * d + 2 * d + 2 * d
    if name == "krflows-dense":  # the d x d affine stage dominates
        return d * d
    return 0  # linear in d: never the memory bottleneck here


def _estimate(history: list[tuple[int, float]], d: int) -> tuple[float, str] | None:
    """Seconds at ``d`` extrapolated from the largest two sizes measured (log-log slope,
    clamped to [1, 3]), and how; ``None`` before two sizes."""
    if len(history) < 2:
        return None
    (d1, t1), (d2, t2) = history[-2:]
    k = min(3.0, max(1.0, math.log(max(t2, 1e-6) / max(t1, 1e-6)) / math.log(d2 / d1)))
    return t2 * (d / d2) ** k, f"{t2:.3g} s at d = {d2} times (d/{d2})^{k:.2f}"


def scaling(Js: list[int], repeats: int, batch: int = 1024, cap: float = 120.0, max_gb: float = 8.0,
            variants=VARIANTS) -> list[dict]:
    """Seconds per training step (4 particles) and per ``log_prob`` at ``batch`` fresh points.

    A measurement whose time, extrapolated from the two largest sizes already measured,
    exceeds ``cap`` seconds (one call), or a variant whose parameters and Adam state would exceed
    ``max_gb``, is skipped: the row says why, with the estimate.
    """
    rows = []
    history: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for J in Js:
        d = J + 2
        for name in variants:
            row = {"guide": name, "J": J, "d": d}
            gb = 4 * 4 * _parameters_estimate(name, d) / 1e9  # float32 parameters, grads, 2 Adam moments
            if gb > max_gb:
                row["skipped"] = f"memory: ~{gb:.0f} GB of parameters and Adam state > {max_gb:g} GB"
                rows.append(row)
                print(f"  {name:16s} d={d:6d} skipped ({row['skipped']})", flush=True)
                continue
            est = {k: _estimate(history.get((name, k), []), d) for k in ("step", "log_prob")}
            if est["step"] is not None and est["step"][0] > cap:
                row["skipped"] = f"time: step ~{est['step'][0]:.0f} s > cap {cap:g} s ({est['step'][1]})"
                rows.append(row)
                print(f"  {name:16s} d={d:6d} skipped ({row['skipped']})", flush=True)
                continue
            step, log_prob, n_params = _variant(name, J, batch)
            row["parameters"] = n_params
            row["step_ms"] = 1e3 * _median_time(step, repeats)
            history.setdefault((name, "step"), []).append((d, row["step_ms"] / 1e3))
            if est["log_prob"] is not None and est["log_prob"][0] > cap:
                row["log_prob_skipped"] = (f"time: ~{est['log_prob'][0]:.0f} s > cap {cap:g} s "
                                           f"({est['log_prob'][1]})")
            else:
                with torch.no_grad():
                    row["log_prob_ms"] = 1e3 * _median_time(log_prob, max(1, repeats // 3))
                history.setdefault((name, "log_prob"), []).append((d, row["log_prob_ms"] / 1e3))
            rows.append(row)
            lp = f"{row['log_prob_ms']:9.1f} ms" if "log_prob_ms" in row else "skipped"
            print(f"  {name:16s} d={d:6d} step {row['step_ms']:8.1f} ms  log_prob {lp}", flush=True)
            del step, log_prob
    return rows


# ---- report ---------------------------------------------------------------------------------

GOALS = ("goal (J = 1000): ≤ 300 s; μ, τ |mean err| < 0.15 sd, |sd ratio − 1| ≤ 0.2; "
         "thetas median |mean err| < 0.1 sd, median |sd ratio − 1| < 0.1")


def _meets(r: dict) -> bool:
    return (r["seconds"] <= 300 and abs(r["mu_mean_err_sd"]) < 0.15 and abs(r["tau_mean_err_sd"]) < 0.15
            and abs(r["mu_sd_ratio"] - 1) <= 0.2 and abs(r["tau_sd_ratio"] - 1) <= 0.2
            and r["theta_med_abs_mean_err_sd"] < 0.1 and r["theta_med_abs_sd_ratio_m1"] < 0.1)


def report(args, results: list[dict], rows: list[dict], truth: dict, started: str) -> str:
    versions = {p: importlib.metadata.version(p) for p in ("torch", "pyro-ppl")}
    lines = [
        "# Plated models: sparse AutoKRFlow against Pyro's autoguides" + (" (SMOKE: numbers mean nothing)"
                                                                          if args.smoke else ""),
        "",
        f"Run {started}; `{' '.join(shlex.quote(a) for a in sys.argv)}`.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}, load average at start "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())} (a shared machine: wall times are inflated by "
        f"other jobs). Python {platform.python_version()}, torch {versions['torch']}, "
        f"pyro-ppl {versions['pyro-ppl']}, krflows {krflows.__version__}.",
        "",
        f"Model: non-centred hierarchical normal, J = {args.J} groups (d = {args.J + 2}), "
        f"data seed {args.seed}. "
        f"SVI: {args.steps} steps, ClippedAdam lr {args.lr} decayed to {args.lr_final}, "
        f"{args.particles} particles (vectorized). "
        f"Guides at their defaults (AutoLowRank: rank 10). Exact posterior: μ = {truth['mu'][0]:.3f} ± "
        f"{truth['mu'][1]:.3f}, τ = {truth['tau'][0]:.3f} ± {truth['tau'][1]:.3f}.",
        "",
        GOALS + ".",
        "",
        "| guide | seconds | μ mean err (sd) | μ sd ratio | τ mean err (sd) | τ sd ratio | "
        "θ median abs mean err (sd) | θ median abs(sd ratio − 1) | meets goal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['guide']} | {r['seconds']:.0f} | {r['mu_mean_err_sd']:+.3f} | "
                     f"{r['mu_sd_ratio']:.3f} | "
                     f"{r['tau_mean_err_sd']:+.3f} | {r['tau_sd_ratio']:.3f} | "
                     f"{r['theta_med_abs_mean_err_sd']:.3f} | {r['theta_med_abs_sd_ratio_m1']:.3f} | "
                     f"{'yes' if _meets(r) else 'no'} |")
    if rows:
        lines += ["", f"Cost against d (median of repeats; a 4-particle training step; `log_prob` at "
                  f"{args.batch} fresh points; a measurement estimated above {args.cap:g} s per call, or "
                  f"above {args.max_gb:g} GB of parameters and Adam state, is skipped; see `_variant` for "
                  f"what each flow runs):", "",
                  "| flow | d | parameters | step (ms) | log_prob (ms) |", "|---|---|---|---|---|"]
        for r in rows:
            if "skipped" in r:
                lines.append(f"| {r['guide']} | {r['d']} | | skipped: {r['skipped']} | |")
                continue
            lp = f"{r['log_prob_ms']:.1f}" if "log_prob_ms" in r else f"skipped: {r['log_prob_skipped']}"
            lines.append(f"| {r['guide']} | {r['d']} | {r['parameters']:,} | {r['step_ms']:.1f} | {lp} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--J", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--lr-final", type=float, default=1e-3, help="ClippedAdam decays lr to this")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guides", default=",".join(GUIDES))
    parser.add_argument("--scaling", default="8,48,98,198,498,998,4998,9998",
                        help="plate sizes J of the cost table ('' : none)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="flows of the cost table")
    parser.add_argument("--cap", type=float, default=120.0,
                        help="cost table: skip a measurement estimated above this many seconds per call")
    parser.add_argument("--max-gb", type=float, default=8.0,
                        help="cost table: skip a flow whose parameters and Adam state exceed this")
    parser.add_argument("--batch", type=int, default=1024, help="cost table: points of a log_prob call")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="tiny settings (seconds); numbers mean nothing")
    parser.add_argument("--out", default=str(Path(__file__).parent / "RESULTS_plates.md"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.J, args.steps, args.scaling, args.repeats, args.threads = 8, 3, "8,18,38", 1, 1
        args.batch, args.cap = 64, 1e-4  # the third size exercises the skip
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    y, sigma = make_data(args.J, args.seed)
    truth = oracle(y, sigma)
    results = []
    for name in [g for g in args.guides.split(",") if g]:
        r = fit_guide(name, y, sigma, args.steps, args.particles, args.lr, args.lr_final, args.seed)
        r.update(errors(r.pop("draws"), truth))
        results.append(r)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    Js = [int(j) for j in args.scaling.split(",") if j]
    rows = scaling(Js, args.repeats, args.batch, args.cap, args.max_gb,
                   args.variants.split(",")) if Js else []
    text = report(args, results, rows, truth, started)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"results": results, "scaling": rows, "truth": {"mu": truth["mu"], "tau": truth["tau"]}}, indent=1))
    print(text)
    return {"results": results, "scaling": rows}


if __name__ == "__main__":
    main()
