r"""Hierarchical logistic regression: sparse ``AutoKRFlow`` against NUTS and Pyro's autoguides.

The model is non-centred, with ``p = 3`` coefficients (an intercept and two covariates),

.. math:: \mu \sim N(0, 2^2 I_p),\quad \tau \sim \text{HalfNormal}(1)^{\otimes p},\quad
          \eta_j \sim N(0, I_p),\quad \beta_j = \mu + \tau \odot \eta_j,\quad
          y_{ij} \sim \text{Bernoulli}(\sigma(x_{ij} \cdot \beta_j)),

for groups ``j = 1..J`` (``pyro.plate("groups", J)``) with ``n_j`` uniform in 5..20 observations
each (padded to 20 and masked), data simulated from the model with fixed ``μ = (-0.5, 1, -0.7)``,
``τ = (0.8, 0.5, 0.3)`` and seed 0; ``d = 2p + pJ``. The model broadcasts over a leading
particle dimension (``Trace_ELBO(vectorize_particles=True)``).

* **Small J** (50, ``d = 156``): a NUTS reference (Pyro, two chains one after the other; split
  R̂ and bulk ESS from ``pyro.ops.stats``), then five guides fitted by plain Pyro SVI at one
  budget (``ClippedAdam`` lr 1e-2 decayed to 1e-3, ``Trace_ELBO(4, vectorize_particles=True)``,
  2000 steps, as ``benchmarks/bench_plates.py``): ``AutoKRFlow`` (sparse, the default),
  ``AutoKRFlow(sparse=False)``, ``AutoNormal``, ``AutoMultivariateNormal``,
  ``AutoLowRankMultivariateNormal`` (rank 10). Per guide: wall time, the globals' (μ, τ)
  mean errors in reference posterior sds and sd ratios, the group coefficients ``β_j``' median
  ``|mean error| / sd`` and median ``|sd ratio − 1|``, and from importance weights
  ``log p(y, θ) − log q(θ)`` at guide draws (Pyro's ``vectorized_importance_weights``): the
  ELBO, the normalized ESS and PSIS ``k̂`` (``krflows.diagnostics.weights``).
* **Large J** (1000, ``d = 3006``): ``AutoKRFlow`` (sparse), ``AutoNormal`` and
  ``AutoLowRankMultivariateNormal`` at the same budget (the dense flow and
  ``AutoMultivariateNormal`` hold ``d² ≈ 9·10⁶`` parameters and are left out). References, none
  of them exact: (1) the ELBO of every guide by the same estimator (``ELBO = log Z − KL(q‖p)``,
  so ELBO differences are KL differences and need no reference); (2) a *short* single-chain
  NUTS run, whose Monte Carlo error is reported (its ESS); (3) the coverage of the
  data-generating ``β_j`` by each guide's central 90 % intervals (close to 0.9 for a calibrated
  posterior when ``J`` is large).

Run ``python experiments/hier_logistic.py`` (full: about 15 minutes on one thread) or
``--smoke --out DIR`` (seconds). Writes ``hier_logistic.{md,png,json}``; ``--replot`` rebuilds
the .md from the .json.
"""

from __future__ import annotations

import time

import _common
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoMultivariateNormal, AutoNormal
from pyro.infer.importance import vectorized_importance_weights
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

from krflows.diagnostics.weights import elbo, ess, pareto_k
from krflows.pyro import AutoKRFlow

P, N_MAX = 3, 20
TRUE_MU, TRUE_TAU = (-0.5, 1.0, -0.7), (0.8, 0.5, 0.3)
GLOBALS = [f"mu[{i}]" for i in range(P)] + [f"tau[{i}]" for i in range(P)]
SMALL_GUIDES = ("krflows-sparse", "krflows-dense", "AutoNormal", "AutoMultivariateNormal", "AutoLowRank")
LARGE_GUIDES = ("krflows-sparse", "AutoNormal", "AutoLowRank")
FULL = {"J_small": 50, "J_large": 1000, "steps": 2000, "particles": 4, "lr": 1e-2, "lr_final": 1e-3,
        "nuts_chains": 2, "nuts_warmup": 500, "nuts_samples": 1000,
        "large_nuts_warmup": 300, "large_nuts_samples": 700, "draws": 2000, "draws_large": 1000,
        "chunk": 250, "rank": 10}
SMOKE = {"J_small": 6, "J_large": 12, "steps": 15, "particles": 2, "lr": 1e-2, "lr_final": 1e-3,
         "nuts_chains": 2, "nuts_warmup": 15, "nuts_samples": 25,
         "large_nuts_warmup": 10, "large_nuts_samples": 20, "draws": 200, "draws_large": 100,
         "chunk": 100, "rank": 2}
COLORS = {"NUTS": "k", "krflows-sparse": "C3", "krflows-dense": "C1", "AutoNormal": "C0",
          "AutoMultivariateNormal": "C2", "AutoLowRank": "C4"}


# ---- model and data -------------------------------------------------------------------------

def model(x, y, mask):
    """``x (J, N_MAX, p)``, ``y (J, N_MAX)`` and ``mask (J, N_MAX)``; broadcasts over particles."""
    p = x.shape[-1]
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0).expand([p]).to_event(1))
    tau = pyro.sample("tau", dist.HalfNormal(1.0).expand([p]).to_event(1))
    with pyro.plate("groups", x.shape[0], dim=-2):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0).expand([p]).to_event(1))  # (..., J, 1, p)
        beta = mu + tau * eta
        with pyro.plate("obs", x.shape[1], dim=-1):
            pyro.sample("y", dist.Bernoulli(logits=(x * beta).sum(-1)).mask(mask), obs=y)


def make_data(J: int, seed: int = 0) -> dict:
    """Simulated groups: ``x, y, mask`` (padded to ``N_MAX``) and the true ``beta (J, p)``."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(5, N_MAX + 1, (J,), generator=g)
    mask = torch.arange(N_MAX) < n[:, None]
    x = torch.cat([torch.ones(J, N_MAX, 1), torch.randn(J, N_MAX, P - 1, generator=g)], -1)
    x = x * mask[..., None]
    beta = torch.tensor(TRUE_MU) + torch.tensor(TRUE_TAU) * torch.randn(J, P, generator=g)
    y = torch.bernoulli(torch.sigmoid((x * beta[:, None]).sum(-1)), generator=g) * mask
    return {"x": x, "y": y, "mask": mask, "beta": beta, "n_obs": int(n.sum())}


def _args(data: dict) -> tuple:
    return data["x"], data["y"], data["mask"]


def quantities(mu, tau, eta) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws ``(*S, 2p)`` of the globals ``(μ, τ)`` and ``(*S, J, p)`` of the ``β_j``."""
    eta = eta.squeeze(-2)
    glob = torch.cat([mu.reshape(*eta.shape[:-2], P), tau.reshape(*eta.shape[:-2], P)], -1)
    beta = glob[..., None, :P] + glob[..., None, P:] * eta
    return glob.double(), beta.double()


# ---- NUTS -----------------------------------------------------------------------------------

def run_nuts(data: dict, chains: int, warmup: int, samples: int, seed: int) -> dict:
    """NUTS, ``chains`` chains one after the other: draws ``(C, S, ...)``, R̂, ESS, seconds."""
    start = time.perf_counter()
    runs = []
    for c in range(chains):
        pyro.set_rng_seed(seed + 100 * c)
        kernel = NUTS(model, jit_compile=True, ignore_jit_warnings=True)
        mcmc = MCMC(kernel, num_samples=samples, warmup_steps=warmup, disable_progbar=True)
        mcmc.run(*_args(data))
        runs.append(mcmc.get_samples())
    seconds = time.perf_counter() - start
    glob, beta = quantities(*(torch.stack([r[k] for r in runs]) for k in ("mu", "tau", "eta")))
    flat = torch.cat([glob, beta.flatten(-2)], -1)  # (C, S, 2p + Jp)
    ess_all = effective_sample_size(flat, chain_dim=0, sample_dim=1)
    out = {"seconds": seconds, "chains": chains, "warmup": warmup, "samples": samples,
           "glob": glob.flatten(0, 1), "beta": beta.flatten(0, 1),
           "ess_globals": ess_all[: 2 * P].tolist(), "ess_beta_min": float(ess_all[2 * P:].min()),
           "ess_min": float(ess_all.min())}
    if chains > 1:
        rhat = split_gelman_rubin(flat, chain_dim=0, sample_dim=1)
        out["rhat_globals"] = rhat[: 2 * P].tolist()
        out["rhat_max"] = float(rhat.max())
    return out


# ---- guides ---------------------------------------------------------------------------------

def make_guide(name: str, rank: int):
    if name == "krflows-sparse":
        return AutoKRFlow(model)
    if name == "krflows-dense":
        return AutoKRFlow(model, sparse=False)
    if name == "AutoNormal":
        return AutoNormal(model)
    if name == "AutoMultivariateNormal":
        return AutoMultivariateNormal(model)
    if name == "AutoLowRank":
        return AutoLowRankMultivariateNormal(model, rank=rank)
    raise ValueError(f"unknown guide {name!r}; one of {SMALL_GUIDES}")


def fit_guide(name: str, data: dict, cfg: dict, seed: int) -> tuple[dict, object]:
    """Plain Pyro SVI: ClippedAdam with its lr decay, vectorized particles; wall time split
    into the first step (for AutoKRFlow: plate detection and the warm-up) and the rest."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = make_guide(name, cfg["rank"])
    steps = cfg["steps"]
    optim = pyro.optim.ClippedAdam({"lr": cfg["lr"], "lrd": (cfg["lr_final"] / cfg["lr"]) ** (1 / steps)})
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=cfg["particles"], vectorize_particles=True))
    start = time.perf_counter()
    losses = [svi.step(*_args(data))]
    first = time.perf_counter() - start
    losses += [svi.step(*_args(data)) for _ in range(steps - 1)]
    seconds = time.perf_counter() - start
    tail = losses[-max(1, steps // 40):]
    out = {"guide": name, "seconds": seconds, "first_step_seconds": first,
           "final_loss": sum(tail) / len(tail),
           "parameters": sum(v.numel() for v in pyro.get_param_store().values())}
    if isinstance(guide, AutoKRFlow):
        out["flow"] = type(guide.flow).__name__
        if guide.plate_structure is not None:
            out["plates"] = [[p.name, p.members, p.width] for p in guide.plate_structure.plates]
    return out, guide


@torch.no_grad()
def guide_draws(guide, data: dict, n: int, chunk: int) -> dict:
    """``n`` guide draws (globals, ``β_j``) and their log importance weights ``log p − log q``."""
    globs, betas, log_w = [], [], []
    for m in [chunk] * (n // chunk) + ([n % chunk] if n % chunk else []):
        lw, _, gtr = vectorized_importance_weights(model, guide, *_args(data), num_samples=m,
                                                   max_plate_nesting=2)
        glob, beta = quantities(*(gtr.nodes[k]["value"].reshape(m, -1, 1, P) for k in ("mu", "tau", "eta")))
        globs.append(glob.reshape(m, 2 * P))
        betas.append(beta.reshape(m, -1, P))
        log_w.append(lw.reshape(m).double())
    return {"glob": torch.cat(globs), "beta": torch.cat(betas), "log_w": torch.cat(log_w)}


# ---- comparisons ----------------------------------------------------------------------------

def weights_summary(log_w: torch.Tensor) -> dict:
    value, se = elbo(log_w)
    return {"elbo": float(value), "elbo_se": float(se), "ess": float(ess(log_w)), "pareto_k": pareto_k(log_w)}


def against(draws: dict, ref: dict) -> dict:
    """Errors of ``draws`` against reference draws: globals per coordinate, ``β_j`` medians."""
    rm, rs = ref["glob"].mean(0), ref["glob"].std(0)
    gm, gs = draws["glob"].mean(0), draws["glob"].std(0)
    bm, bs = ref["beta"].mean(0), ref["beta"].std(0)
    beta_err = (draws["beta"].mean(0) - bm).abs() / bs
    beta_ratio = (draws["beta"].std(0) / bs - 1).abs()
    return {"glob_mean_err_sd": ((gm - rm) / rs).tolist(), "glob_sd_ratio": (gs / rs).tolist(),
            "glob_max_abs_mean_err_sd": float(((gm - rm) / rs).abs().max()),
            "glob_max_abs_sd_ratio_m1": float((gs / rs - 1).abs().max()),
            "beta_med_abs_mean_err_sd": float(beta_err.median()),
            "beta_med_abs_sd_ratio_m1": float(beta_ratio.median())}


def truth_checks(draws: dict, data: dict) -> dict:
    """Data-generating values: the globals' z-scores and the 90 % coverage of the true ``β_j``."""
    true = torch.tensor(TRUE_MU + TRUE_TAU, dtype=torch.float64)
    z = (draws["glob"].mean(0) - true) / draws["glob"].std(0)
    lo, hi = torch.quantile(draws["beta"], torch.tensor([0.05, 0.95], dtype=torch.float64), dim=0)
    beta = data["beta"].double()
    return {"truth_z": z.tolist(), "beta_coverage90": float(((beta >= lo) & (beta <= hi)).double().mean())}


def run_size(J: int, guides: tuple[str, ...], cfg: dict, nuts: dict, n_draws: int, seed: int) -> dict:
    data = make_data(J, seed)
    print(f"J = {J}: d = {2 * P + P * J}, {data['n_obs']} observations; NUTS {nuts}", flush=True)
    ref = run_nuts(data, nuts["chains"], nuts["warmup"], nuts["samples"], seed)
    print(f"  NUTS {ref['seconds']:.0f} s, R̂ max {ref.get('rhat_max', float('nan')):.3f}, "
          f"ESS min {ref['ess_min']:.0f}", flush=True)
    nuts_row = {"guide": "NUTS", "seconds": ref["seconds"], **truth_checks(ref, data),
                **{k: v for k, v in ref.items() if k not in ("glob", "beta")}}
    rows, samples = [], {"NUTS": ref["glob"]}
    for i, name in enumerate(guides):
        fit, guide = fit_guide(name, data, cfg, seed + i)
        draws = guide_draws(guide, data, n_draws, cfg["chunk"])
        row = {**fit, **weights_summary(draws["log_w"]), **against(draws, ref), **truth_checks(draws, data)}
        rows.append(row)
        samples[name] = draws["glob"]
        print(f"  {name:24s} {row['seconds']:6.0f} s  ELBO {row['elbo']:9.1f}  globals max|err| "
              f"{row['glob_max_abs_mean_err_sd']:.2f} sd, max|ratio-1| "
              f"{row['glob_max_abs_sd_ratio_m1']:.2f}; beta {row['beta_med_abs_mean_err_sd']:.3f} / "
              f"{row['beta_med_abs_sd_ratio_m1']:.3f}", flush=True)
    return {"J": J, "d": 2 * P + P * J, "n_obs": data["n_obs"], "nuts": nuts_row, "guides": rows,
            "_samples": samples}


# ---- report ---------------------------------------------------------------------------------

def _table(res: dict) -> str:
    headers = ["guide", "seconds (1st step)", "ELBO ± se", "ESS", "k̂", "μ mean err (sd)", "τ mean err (sd)",
               "μ sd ratio", "τ sd ratio", "β med abs err (sd)", "β med abs(sd ratio − 1)", "β cover 90%"]
    rows = []
    for r in res["guides"]:
        e, s = r["glob_mean_err_sd"], r["glob_sd_ratio"]
        rows.append([r["guide"], f"{r['seconds']:.0f} ({r['first_step_seconds']:.0f})",
                     f"{r['elbo']:.1f} ± {r['elbo_se']:.2f}", r["ess"], r["pareto_k"],
                     [round(v, 2) for v in e[:P]], [round(v, 2) for v in e[P:]],
                     [round(v, 2) for v in s[:P]], [round(v, 2) for v in s[P:]],
                     r["beta_med_abs_mean_err_sd"], r["beta_med_abs_sd_ratio_m1"], r["beta_coverage90"]])
    n = res["nuts"]
    rows.append(["NUTS (reference)", f"{n['seconds']:.0f}", "–", "–", "–", "0", "0", "1", "1", "0", "0",
                 n["beta_coverage90"]])
    return _common.md_table(headers, rows)


def write_markdown(path, cfg: dict, results: list[dict], smoke: bool, seconds: float) -> None:
    small, large = results
    ns, nl = small["nuts"], large["nuts"]
    lines = [
        "# Hierarchical logistic regression: sparse AutoKRFlow, NUTS and Pyro's autoguides"
        + (" (SMOKE: numbers mean nothing)" if smoke else ""), "",
        _common.environment(smoke, seconds),
        "- every wall time is contended (a shared 2-core CPU, 1 torch thread, other jobs running)", "",
        f"Model: non-centred hierarchical logistic regression, p = {P} coefficients (intercept + 2 "
        f"covariates), μ ~ N(0, 2²), τ ~ HalfNormal(1), β_j = μ + τ ⊙ η_j, 5–20 observations per group; "
        f"data simulated with μ = {TRUE_MU}, τ = {TRUE_TAU} (seed 0). SVI for every guide: "
        f"{cfg['steps']} steps, ClippedAdam lr {cfg['lr']} decayed to {cfg['lr_final']}, "
        f"Trace_ELBO({cfg['particles']} particles, vectorized); guides at their defaults "
        f"(AutoLowRank rank {cfg['rank']}). ELBO, ESS (normalized, in [1/N, 1]) and PSIS k̂ from "
        f"log p(y, θ) − log q(θ) at {cfg['draws']} (J = {small['J']}) / {cfg['draws_large']} "
        f"(J = {large['J']}) guide draws, which also give every error below. μ, τ columns: the "
        f"{P} coordinates each; seconds: the whole SVI run, in brackets its first step (AutoKRFlow: "
        f"plate detection and the Gaussian warm-up).", "",
        f"## J = {small['J']} (d = {small['d']}, {small['n_obs']} observations): NUTS reference", "",
        f"Reference: NUTS, {ns['chains']} chains one after the other, {ns['warmup']} warm-up + "
        f"{ns['samples']} draws each, {ns['seconds']:.0f} s; split R̂ max "
        f"{ns.get('rhat_max', float('nan')):.3f} "
        f"(globals {_common.fmt(ns.get('rhat_globals'))}), bulk ESS of the globals "
        f"{_common.fmt(ns['ess_globals'], 2)}, smallest over the β_j {ns['ess_beta_min']:.0f}. Errors are in "
        f"reference posterior sds; the reference's own Monte Carlo error is about 1/√ESS of an sd.", "",
        _table(small),
        f"## J = {large['J']} (d = {large['d']}, {large['n_obs']} observations): no exact reference", "",
        f"Reference here: a *short* single-chain NUTS run ({nl['warmup']} warm-up + {nl['samples']} draws, "
        f"{nl['seconds']:.0f} s; bulk ESS of the globals {_common.fmt(nl['ess_globals'], 2)}, smallest over "
        f"the β_j {nl['ess_beta_min']:.0f}): its Monte Carlo error on a mean is about 1/√ESS of an sd, and "
        f"more on an sd, so errors below ~0.1–0.2 sd are within its noise. The ELBO needs no reference: "
        f"ELBO = log Z − KL(q‖p), so a guide with a higher ELBO is closer to the posterior in KL by exactly "
        f"the difference. 'β cover 90%' is the fraction of the data-generating β_j inside each guide's "
        f"central 90 % intervals (about 0.9 for a calibrated posterior at large J).", "",
        _table(large),
        "Truth z-scores of the globals (posterior mean − data-generating value, in posterior sds; μ then τ):",
        "",
    ]
    for res in results:
        for r in [res["nuts"], *res["guides"]]:
            z = _common.fmt([round(v, 2) for v in r["truth_z"]])
            lines.append(f"- J = {res['J']}, {r['guide']}: {z}")
    path.write_text("\n".join(lines) + "\n")


def plot(path, results: list[dict]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(17, 4.2))
    for col, res in enumerate(results):
        a = ax[2 * col]
        for k, r in enumerate(res["guides"]):
            xs = [i + 0.12 * (k - 2) for i in range(2 * P)]
            a.scatter(xs, r["glob_mean_err_sd"], color=COLORS[r["guide"]], marker="o", label=r["guide"])
            a.scatter(xs, [v - 1 for v in r["glob_sd_ratio"]], color=COLORS[r["guide"]], marker="x")
        a.axhline(0, color="k", lw=0.8)
        for h in (-0.2, 0.2):
            a.axhline(h, color="grey", ls=":", lw=1)
        a.set_xticks(range(2 * P), GLOBALS, fontsize=8)
        a.set_title(f"J = {res['J']}: globals vs NUTS{' (short run)' if col else ''}\n"
                    "o: mean error (ref. sd), x: sd ratio − 1", fontsize=9)
        a.grid(alpha=0.3)
        if col == 0:
            a.legend(fontsize=7)
        a = ax[2 * col + 1]
        samples = res["_samples"]
        ref = samples["NUTS"][:, P].double().log()  # log tau[0]
        lo, hi = torch.quantile(ref, torch.tensor([0.005, 0.995], dtype=torch.float64)).tolist()
        pad = 0.25 * (hi - lo)
        bins = torch.linspace(lo - pad, hi + pad, 40).tolist()
        a.hist(ref.numpy(), bins=bins, density=True, color="k", alpha=0.25, label="NUTS")
        for r in res["guides"]:
            v = samples[r["guide"]][:, P].double().log().clamp(bins[0], bins[-1])
            a.hist(v.numpy(), bins=bins, density=True, histtype="step", color=COLORS[r["guide"]], lw=1.3,
                   label=f"{r['guide']} (ELBO {r['elbo']:.0f})")
        a.set_xlabel("log tau[0] (intercept scale)", fontsize=8)
        a.set_title(f"J = {res['J']}: marginal of log tau[0]", fontsize=9)
        a.legend(fontsize=6)
    fig.suptitle("Hierarchical logistic regression: guides against NUTS", fontsize=10)
    fig.tight_layout()
    _common.save_figure(fig, path)


def replot(args) -> None:
    """Rebuilds the .md (not the .png: it needs the draws) from the JSON of an earlier run."""
    data = _common.load_json(args.out / "hier_logistic.json")
    write_markdown(args.out / "hier_logistic.md", data["config"], data["results"], data["smoke"],
                   data["seconds"])
    print(f"rewrote {args.out / 'hier_logistic.md'} from the JSON")


def main() -> None:
    _common.setup()
    args = _common.parse_args(__doc__.splitlines()[0], replot=True)
    if args.replot:
        return replot(args)
    cfg = SMOKE if args.smoke else FULL
    start = time.perf_counter()
    small_nuts = {"chains": cfg["nuts_chains"], "warmup": cfg["nuts_warmup"], "samples": cfg["nuts_samples"]}
    large_nuts = {"chains": 1, "warmup": cfg["large_nuts_warmup"], "samples": cfg["large_nuts_samples"]}
    small = run_size(cfg["J_small"], SMALL_GUIDES, cfg, small_nuts, cfg["draws"], args.seed)
    large = run_size(cfg["J_large"], LARGE_GUIDES, cfg, large_nuts, cfg["draws_large"], args.seed)
    seconds = time.perf_counter() - start
    results = [small, large]
    plot(args.out / "hier_logistic.png", results)
    clean = [{k: v for k, v in r.items() if k != "_samples"} for r in results]
    _common.save_json({"config": cfg, "seconds": seconds, "smoke": args.smoke, "results": clean},
                      args.out / "hier_logistic.json")
    write_markdown(args.out / "hier_logistic.md", cfg, clean, args.smoke, seconds)
    print(f"wrote {args.out / 'hier_logistic.md'} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
