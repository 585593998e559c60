r"""Langevin particles (the Wasserstein gradient flow of KL) against a trained KR flow.

ULA and MALA (:func:`krflows.ot.ula`, :func:`krflows.ot.mala`) move a cloud of particles from a
broad start ``N(0, 2² I)`` towards the target; their law follows, up to the discretization,
the Fokker–Planck equation, i.e. the W2 gradient flow of ``KL(· ‖ p)``. A
:class:`krflows.KRFlow` is fitted to the same target by reverse KL (:func:`krflows.fit`).
Both are scored by the Sinkhorn divergence (:func:`krflows.ot.sinkhorn_divergence`) of their
samples to exact target samples, against the number of target-gradient evaluations (one per
particle per step for Langevin; one per batch sample per step for the flow, warm-up included)
and wall time. The floor is the divergence between two independent exact samples.

Targets with exact samplers: ``Banana(curvature=0.4, scale=2)`` (unimodal, curved; ULA's
step-size bias is visible in its moments) and ``Bimodal2D(separation=8, weights=(0.25, 0.75))``
(particles started in one basin rarely cross the valley, a barrier of about 8 nats: the mode
weights stay near the start's basin split for a long time, however small the step).

Run ``python experiments/ot_langevin.py`` (full, about 4 minutes on 1 thread) or with
``--smoke --out DIR``. Writes ``ot_langevin.{md,png,json}``.
"""

from __future__ import annotations

import time

import _common
import torch

import krflows
from krflows.ot import mala, sinkhorn_divergence, ula

F64 = torch.float64
EPS = 0.5  # of the Sinkhorn divergence, in x² units (the targets' scales are 1-2.5)
SEPARATION = 8.0  # of the bimodal target: a barrier of about 8 nats between the modes
TARGETS = {"banana": lambda dtype=F64: krflows.targets.Banana(curvature=0.4, scale=2.0, dtype=dtype),
           "bimodal": lambda dtype=F64: krflows.targets.Bimodal2D(SEPARATION, (0.25, 0.75), dtype=dtype)}
STEP = {"banana": 0.05, "bimodal": 0.3}  # MALA's step and ULA's large step; ULA's small step is 1/5
START = 2.0  # the particles start from N(0, START² I)
TOL = 1e-6  # Sinkhorn's marginal tolerance for the divergence (a convergence measure, not an oracle)
FULL = {"bias_steps": (0.02, 0.1, 0.3), "bias_particles": 20000, "bias_iters": 600,
        "particles": 5000, "records": (0, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 4000), "n_div": 600,
        "fit_steps": 1500, "batch_size": 256, "lr": 3e-3, "fit_records": (25, 50, 100, 200, 400, 800, 1500)}
SMOKE = {"bias_steps": (0.1, 0.3), "bias_particles": 2000, "bias_iters": 50,
         "particles": 200, "records": (0, 5, 20, 50), "n_div": 100, "fit_steps": 40, "batch_size": 64,
         "lr": 3e-3, "fit_records": (25, 40)}


def moments(x: torch.Tensor) -> dict:
    """Means and variances with their standard errors (the variance's from the spread of (x - x̄)²)."""
    x = x.double()
    sq = (x - x.mean(0)) ** 2
    n = x.shape[0]
    return {"mean": x.mean(0).tolist(), "mean_se": (x.std(0) / n**0.5).tolist(),
            "var": x.var(0).tolist(), "var_se": (sq.std(0) / n**0.5).tolist()}


def true_stats(target, x: torch.Tensor, name: str) -> dict:
    out = moments(x)
    if name == "bimodal":
        out["w0"] = float((target.assign(x) == 0).double().mean())
    return out


def score(x: torch.Tensor, exact: torch.Tensor, n: int, gen: torch.Generator) -> float:
    idx = torch.randperm(x.shape[0], generator=gen)[:n]
    return float(sinkhorn_divergence(x[idx].double(), exact, EPS, tol=TOL))


def langevin(name: str, sampler: str, h: float, cfg: dict, exact: torch.Tensor, seed: int) -> dict:
    target = TARGETS[name]()
    gen = torch.Generator().manual_seed(seed)
    x = START * torch.randn(cfg["particles"], 2, generator=gen, dtype=F64)
    curve, done, seconds, accepted = [], 0, 0.0, []
    for k in cfg["records"]:
        if k > done:
            t0 = time.perf_counter()
            run = ula if sampler == "ULA" else mala
            out = run(target, x, h, k - done, generator=gen)
            seconds += time.perf_counter() - t0
            accepted.append((k - done, out.acceptance))
            x, done = out.x, k
        rec = {"step": k, "grad_evals": k * cfg["particles"], "seconds": seconds,
               "divergence": score(x, exact, cfg["n_div"], gen)}
        if name == "bimodal":
            rec["w0"] = float((target.assign(x) == 0).double().mean())
        curve.append(rec)
    acc = sum(n * a for n, a in accepted) / max(sum(n for n, _ in accepted), 1)
    return {"target": name, "method": f"{sampler} h={h:g}", "curve": curve, "acceptance": acc,
            "final": true_stats(target, x, name), "x": x[:500].tolist()}


def flow_run(name: str, cfg: dict, exact: torch.Tensor, seed: int) -> dict:
    torch.manual_seed(seed)
    target = TARGETS[name]()
    flow = krflows.KRFlow(2, family="spline", layers=2, hidden=(32, 32))
    warmup = min(200, cfg["fit_steps"] // 5)
    curve, spent = [], [0.0]
    start = time.perf_counter()

    def record(step: int, _):
        if step in cfg["fit_records"]:
            t0 = time.perf_counter()
            elapsed = t0 - start - spent[0]
            with torch.no_grad():
                x = flow.sample((cfg["n_div"],)).double()
            div = float(sinkhorn_divergence(x, exact, EPS, tol=TOL))
            rec = {"step": step, "grad_evals": (warmup + step) * cfg["batch_size"],
                   "seconds": elapsed, "divergence": div}
            if name == "bimodal":
                rec["w0"] = float((target.assign(x) == 0).double().mean())
            curve.append(rec)
            spent[0] += time.perf_counter() - t0

    krflows.fit(flow, TARGETS[name](torch.float32), steps=cfg["fit_steps"],
                batch_size=cfg["batch_size"], lr=cfg["lr"], anneal=0.5 if name == "bimodal" else 0.0,
                log_every=25, callback=record)
    with torch.no_grad():
        x = flow.sample((20_000,)).double()
    return {"target": name, "method": "KRFlow (reverse KL)", "curve": curve, "acceptance": None,
            "final": true_stats(target, x, name), "x": x[:500].tolist()}


def gaussian_bias(cfg: dict, seed: int) -> list[dict]:
    """ULA's stationary covariance on N(m, Σ) against its closed form; MALA's against Σ."""
    mean = torch.tensor([1.0, -0.5], dtype=F64)
    cov = torch.tensor([[1.0, 1.6], [1.6, 4.0]], dtype=F64)
    target = krflows.targets.Gaussian(mean, cov, dtype=F64)
    gen = torch.Generator().manual_seed(seed)
    eye, prec = torch.eye(2, dtype=F64), torch.linalg.inv(cov)
    out = []
    for h in cfg["bias_steps"]:
        # exact start: what is left after n_bias steps is the stationary law, not the transient
        chol = torch.linalg.cholesky(cov)
        x0 = mean + torch.randn(cfg["bias_particles"], 2, generator=gen, dtype=F64) @ chol.T
        predicted = cov @ torch.linalg.inv(eye - 0.5 * h * prec)  # ULA's stationary covariance
        for sampler, run in (("ULA", ula), ("MALA", mala)):
            res = run(target, x0, h, cfg["bias_iters"], generator=gen)
            c = torch.cov(res.x.T)
            n = cfg["bias_particles"]
            se = float((2.0 / (n - 1)) ** 0.5 * torch.diagonal(predicted).max())  # of a variance
            out.append({"method": sampler, "h": h, "acceptance": res.acceptance,
                        "cov": c.tolist(), "err_vs_sigma": float((c - cov).abs().max()),
                        "err_vs_ula_closed_form": float((c - predicted).abs().max()),
                        "closed_form_bias": float((predicted - cov).abs().max()), "se": se})
    return out


def truth(name: str) -> dict:
    target = TARGETS[name]()
    if name == "banana":
        b, s = target.curvature, target.scale
        return {"mean": [0.0, 0.0], "var": [s**2, 1 + 2 * b**2 * s**4]}
    half = 0.5 * SEPARATION
    w0 = 0.25
    mean0 = -half * w0 + half * (1 - w0)
    return {"mean": [mean0, 0.0], "var": [1 + half**2 - mean0**2, 1.0], "w0": w0}


def write_markdown(path, cfg, runs, floors, bias, smoke, seconds) -> None:
    parts = ["# Langevin particles versus a trained flow\n", _common.environment(smoke, seconds), "",
             f"{cfg['particles']} particles from N(0, 2² I); `S_ε` = `sinkhorn_divergence` (ε = {EPS}) "
             f"between {cfg['n_div']} particles (or flow draws) and {cfg['n_div']} exact target draws; "
             "floor = the same "
             "between two independent exact samples. `grad evals` = target log-density gradients spent "
             f"(Langevin: particles × steps; flow: batch {cfg['batch_size']} × (steps + warm-up)). "
             "`seconds` = sampler / training wall time (divergence evaluations excluded). Flow: "
             f"`KRFlow(2, 'spline', layers=2, hidden=(32, 32))`, {cfg['fit_steps']} steps, lr {cfg['lr']} "
             "(bimodal: `anneal=0.5`).\n"]
    for name in TARGETS:
        t = truth(name)
        parts.append(f"## {name}\n")
        parts.append(f"Noise floor of S_ε (mean of 3 pairs of exact samples): {floors[name]:.4f}. "
                     f"True mean {[round(v, 3) for v in t['mean']]}, "
                     f"variances {[round(v, 3) for v in t['var']]}"
                     + (f", weight of the left mode {t['w0']}" if "w0" in t else "") + ".\n")
        rows = []
        for r in runs:
            if r["target"] != name:
                continue
            for c in r["curve"]:
                rows.append([r["method"], c["step"], c["grad_evals"], c["seconds"], c["divergence"]]
                            + ([c["w0"]] if name == "bimodal" else []))
        parts.append(_common.md_table(["method", "step", "grad evals", "seconds", "S_ε"]
                                      + (["left-mode weight"] if name == "bimodal" else []), rows))
        final = [[r["method"], r["acceptance"], r["curve"][-1]["divergence"],
                  " ".join(f"{m:.3f}±{e:.3f}" for m, e in zip(r["final"]["mean"], r["final"]["mean_se"],
                                                               strict=True)),
                  " ".join(f"{m:.3f}±{e:.3f}" for m, e in zip(r["final"]["var"], r["final"]["var_se"],
                                                               strict=True))]
                 + ([r["final"]["w0"]] if name == "bimodal" else []) for r in runs if r["target"] == name]
        parts.append(f"Final state (moments ± standard error of all {cfg['particles']} particles; the flow: "
                     "20000 draws):\n")
        parts.append(_common.md_table(["method", "MALA acceptance", "final S_ε", "mean", "variances"]
                                      + (["left-mode weight"] if name == "bimodal" else []), final))
    parts += ["## ULA's step-size bias on a Gaussian (closed form)\n",
              f"Target N(m, Σ), m = [1, −0.5], Σ = [[1, 1.6], [1.6, 4]]; {cfg['bias_particles']} particles "
              f"started from the target itself, {cfg['bias_iters']} steps of step h. ULA's stationary law is "
              "N(m, Σ (I − h/2 Σ⁻¹)⁻¹) exactly; MALA's is N(m, Σ). Max abs error of the particles' "
              "covariance against Σ and against ULA's closed form; `bias` = the closed form's distance "
              "to Σ; `se` ≈ the standard error of a variance estimate at this n.\n",
              _common.md_table(["method", "h", "acceptance", "max abs(cov − Σ)", "max abs(cov − ULA form)",
                                "closed-form bias", "se"],
                               [[b["method"], b["h"], b["acceptance"], b["err_vs_sigma"],
                                 b["err_vs_ula_closed_form"], b["closed_form_bias"], b["se"]] for b in bias])]
    path.write_text("\n".join(parts))


def plot(path, runs, floors) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(17, 9))
    colors = {}
    for i, name in enumerate(TARGETS):
        target = TARGETS[name]()
        exact = target.sample((1500,), generator=torch.Generator().manual_seed(5))
        a = ax[i, 0]
        for r in runs:
            if r["target"] != name:
                continue
            c = colors.setdefault(r["method"], f"C{len(colors) % 4}")
            g = [max(p["grad_evals"], 1) for p in r["curve"]]
            a.loglog(g, [max(p["divergence"], 1e-5) for p in r["curve"]], "-o", ms=3, color=c,
                     label=r["method"])
            ax[i, 1].semilogx([max(p["seconds"], 1e-3) for p in r["curve"]],
                              [max(p["divergence"], 1e-5) for p in r["curve"]], "-o", ms=3, color=c,
                              label=r["method"])
        for a in ax[i, :2]:
            a.axhline(floors[name], color="k", ls=":", label="floor (exact vs exact)")
            a.set_yscale("log")
            a.grid(alpha=0.3)
            a.set_ylabel(f"S_ε to exact samples (ε = {EPS})")
        ax[i, 0].set_xlabel("target gradient evaluations")
        ax[i, 1].set_xlabel("wall seconds (sampler / training)")
        ax[i, 0].legend(fontsize=7)
        ax[i, 0].set_title(f"{name}: convergence per gradient evaluation", fontsize=9)
        ax[i, 1].set_title(f"{name}: convergence per second", fontsize=9)
        a = ax[i, 2]
        a.plot(exact[:, 0], exact[:, 1], ".", ms=2, color="0.6", label="exact")
        for r in runs:
            if r["target"] == name and (r["method"].startswith("MALA") or r["method"].startswith("KRFlow")):
                x = torch.tensor(r["x"])
                a.plot(x[:, 0], x[:, 1], ".", ms=2, label=f"{r['method']} (final)")
        a.legend(fontsize=7, markerscale=4)
        a.set_title(f"{name}: final samples", fontsize=9)
        a.set_aspect("equal")
    fig.suptitle("Langevin (W2 gradient flow of KL, discretized) vs a reverse-KL KRFlow: Sinkhorn divergence "
                 "to exact samples", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    _common.save_figure(fig, path)


def main() -> None:
    _common.setup()
    args = _common.parse_args(__doc__.splitlines()[0])
    cfg = SMOKE if args.smoke else FULL
    start = time.perf_counter()
    runs, floors = [], {}
    for name in TARGETS:
        target = TARGETS[name]()
        gen = torch.Generator().manual_seed(args.seed + 100)
        exact = target.sample((cfg["n_div"],), generator=gen)
        # the floor: S_ε between independent exact samples of this size, averaged over 3 pairs
        pairs = [target.sample((cfg["n_div"],), generator=gen) for _ in range(3)]
        floors[name] = sum(float(sinkhorn_divergence(p, exact, EPS, tol=TOL)) for p in pairs) / 3
        h = STEP[name]
        for sampler, step in (("ULA", h), ("ULA", h / 5), ("MALA", h)):
            runs.append(langevin(name, sampler, step, cfg, exact, args.seed))
            r = runs[-1]
            print(f"{name} {r['method']}: S {r['curve'][-1]['divergence']:.4f} (floor {floors[name]:.4f}) "
                  f"var {r['final']['var']} acc {r['acceptance']:.3f}", flush=True)
        runs.append(flow_run(name, cfg, exact, args.seed))
        r = runs[-1]
        print(f"{name} flow: S {r['curve'][-1]['divergence']:.4f} var {r['final']['var']}", flush=True)
    bias = gaussian_bias(cfg, args.seed)
    for b in bias:
        print(f"Gaussian {b['method']} h={b['h']}: |cov-Σ| {b['err_vs_sigma']:.4f} |cov-ULA closed form| "
              f"{b['err_vs_ula_closed_form']:.4f} (bias {b['closed_form_bias']:.4f}, se {b['se']:.4f})",
              flush=True)
    seconds = time.perf_counter() - start
    _common.save_json({"config": cfg, "eps": EPS, "floors": floors, "truth": {n: truth(n) for n in TARGETS},
                       "gaussian_bias": bias,
                       "runs": [{k: v for k, v in r.items() if k != "x"} for r in runs], "seconds": seconds},
                      args.out / "ot_langevin.json")
    write_markdown(args.out / "ot_langevin.md", cfg, runs, floors, bias, args.smoke, seconds)
    plot(args.out / "ot_langevin.png", runs, floors)
    print(f"wrote {args.out / 'ot_langevin.md'} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
