r"""Two philosophies: MCMC (NUTS) versus a trained transport map (KR flow), and their hybrids.

Problems: eight schools in its centred and non-centred forms (the same posterior over
``(mu, tau, theta)``, reported in that common parametrisation), Neal's funnel (``d = 10``, a
Pyro model), and a two-component 1-D Gaussian mixture with unknown means ``mu1, mu2`` under the
same prior, whose posterior is exactly symmetric under label switching (two modes of weight 1/2,
``P(mu1 < mu2) = 1/2``).

Methods: NUTS on the model; the flow alone (:class:`~krflows.pyro.AutoKRFlow`, its flow trained
by :func:`krflows.fit` on the model's potential); the flow + sampling-importance-resampling
(SIR); the flow as the proposal of independence Metropolis–Hastings (IMH); NeuTra-NUTS (NUTS in
the flow's reference space). Every MCMC method runs two chains, one after the other.

Measured: wall time (flow training included in every flow method), evaluations of ``log p``
(with gradient: NUTS leapfrog steps = model executions, counted; flow training = steps ×
batch; without gradient: SIR/IMH weights), bulk ESS (Pyro's ``effective_sample_size``), tail
ESS (the smaller ESS of ``I(x <= q05)`` and ``I(x >= q95)``, Vehtari et al. 2021), split R̂
(Pyro's ``split_gelman_rubin``), the bias of posterior means and standard deviations against a
reference (eight schools: a long NUTS run, cached in the JSON; funnel: exact; mixture: exact
2-D quadrature), and ``krflows.diagnose`` of each trained flow.

Run ``python experiments/two_philosophies.py`` (full: about 10 minutes on one thread) or with
``--smoke --out DIR`` (seconds). Writes ``two_philosophies.{md,png,json}``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import _common
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

import krflows
from krflows.pyro import AutoKRFlow, importance_resample, independence_mh, neutra_nuts

METHODS = ("NUTS", "flow", "flow+SIR", "flow-IMH", "NeuTra-NUTS")
FULL = {"nuts_warmup": 300, "nuts_samples": 500, "neutra_warmup": 100, "neutra_samples": 300, "grid": 801,
        "chains": 2, "tree_depth": 10, "fit_steps": 1000, "fit_batch": 128, "lr": 3e-3, "anneal": 0.3,
        "guide_warmup": 100, "guide_warmup_batch": 64, "layers": 2, "hidden": (32, 32),
        "n_flow": 2000, "sir_m": 20000, "imh_steps": 2000, "n_diag": 4000,
        "ref_chains": 4, "ref_warmup": 500, "ref_samples": 1500, "ref_keep": 1000}
SMOKE = {"nuts_warmup": 15, "nuts_samples": 20, "neutra_warmup": 8, "neutra_samples": 12, "grid": 201,
         "chains": 2, "tree_depth": 3, "fit_steps": 20, "fit_batch": 32, "lr": 3e-3, "anneal": 0.3,
         "guide_warmup": 10, "guide_warmup_batch": 16, "layers": 1, "hidden": (8,),
         "n_flow": 100, "sir_m": 500, "imh_steps": 100, "n_diag": 300,
         "ref_chains": 2, "ref_warmup": 15, "ref_samples": 30, "ref_keep": 60}

CALLS = [0]  # model executions: one per log-density (and gradient) evaluation under NUTS

# ---- the models -------------------------------------------------------------------------------

Y8 = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
S8 = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def schools_centred(y, sigma):
    CALLS[0] += 1
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", y.shape[-1]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def schools_noncentred(y, sigma):
    CALLS[0] += 1
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", y.shape[-1]):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * theta_tilde, sigma), obs=y)


FUNNEL_DIM, FUNNEL_SCALE = 10, 3.0


def funnel():
    """Neal's funnel, as :class:`krflows.targets.Funnel`: ``v ~ N(0, 3²)``, ``x_i | v ~ N(0, e^v)``."""
    CALLS[0] += 1
    v = pyro.sample("v", dist.Normal(0.0, FUNNEL_SCALE))
    pyro.sample("x", dist.Normal(torch.zeros(FUNNEL_DIM - 1), torch.exp(0.5 * v)[..., None]).to_event(1))


MIX_PRIOR_SD, MIX_SIGMA = 3.0, 1.0


def mixture(y):
    """``y_i ~ ½ N(mu1, 1) + ½ N(mu2, 1)``, ``mu_k ~ N(0, 3²)``: exchangeable labels."""
    CALLS[0] += 1
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), MIX_PRIOR_SD).to_event(1))
    mix = dist.MixtureSameFamily(dist.Categorical(torch.full((2,), 0.5)), dist.Normal(mu, MIX_SIGMA))
    with pyro.plate("data", y.shape[-1]):
        pyro.sample("y", mix, obs=y)


def mixture_data(n: int = 30, means=(-1.5, 1.5), seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    return torch.tensor(means)[labels] + MIX_SIGMA * torch.randn(n, generator=g)


# ---- problems: the model, its reported quantities, the reference ------------------------------

def _flat(v: torch.Tensor, n: int) -> torch.Tensor:
    return v.reshape(n, -1)


def schools_quantities(values: dict) -> torch.Tensor:
    """``{site: draws}`` of either form -> ``(n, 10)``: ``mu, tau, theta_1..8``."""
    mu = values["mu"].reshape(-1)
    n = mu.shape[0]
    tau = values["tau"].reshape(n)
    theta = _flat(values["theta"], n) if "theta" in values else \
        mu[:, None] + tau[:, None] * _flat(values["theta_tilde"], n)
    return torch.cat([mu[:, None], tau[:, None], theta], 1)


def funnel_quantities(values: dict) -> torch.Tensor:
    v = values["v"].reshape(-1)
    return torch.cat([v[:, None], _flat(values["x"], v.shape[0])[:, :1]], 1)


def mixture_quantities(values: dict) -> torch.Tensor:
    return values["mu"].reshape(-1, 2)


@dataclass
class Problem:
    name: str
    model: object
    args: tuple
    quantities: object  # {site: draws} -> (n, k)
    names: list[str]
    key_name: str  # a headline statistic
    key_fn: object  # (n, k) -> (n,) whose mean is the statistic
    bias_sd_idx: list[int]  # quantities whose sd bias is reported (heavy tails excluded)
    to_unconstrained: object  # reference quantities (n, k) -> the potential's flat coordinates
    reference: dict = field(default_factory=dict)


def _schools_to_u(centred: bool):
    def f(q):
        mu, tau, theta = q[:, :1], q[:, 1:2], q[:, 2:]
        third = theta if centred else (theta - mu) / tau
        return torch.cat([mu, tau.log(), third], 1)
    return f


def problems() -> list[Problem]:
    names8 = ["mu", "tau"] + [f"theta[{i}]" for i in range(8)]
    y_mix = mixture_data()
    return [
        Problem("eight schools, non-centred", schools_noncentred, (Y8, S8), schools_quantities, names8,
                "E[tau]", lambda q: q[:, 1], list(range(10)), _schools_to_u(False)),
        Problem("eight schools, centred", schools_centred, (Y8, S8), schools_quantities, names8,
                "E[tau]", lambda q: q[:, 1], list(range(10)), _schools_to_u(True)),
        Problem("funnel d=10", funnel, (), funnel_quantities, ["v", "x[0]"],
                "P(v<-3)", lambda q: (q[:, 0] < -3).double(), [0], lambda q: q),
        Problem("mixture (label switching)", mixture, (y_mix,), mixture_quantities, ["mu1", "mu2"],
                "P(mu1<mu2)", lambda q: (q[:, 0] < q[:, 1]).double(), [0, 1], lambda q: q),
    ]


def moments(q: torch.Tensor, key: torch.Tensor) -> dict:
    q = q.double()
    return {"mean": q.mean(0).tolist(), "sd": q.std(0).tolist(), "key": float(key.double().mean())}


def schools_reference(problem: Problem, cfg: dict, seed: int) -> dict:
    """A long NUTS run of the non-centred form: ``ref_chains`` chains, one after the other."""
    start, draws = time.perf_counter(), []
    for c in range(cfg["ref_chains"]):
        pyro.set_rng_seed(10_000 + seed * 100 + c)
        kernel = NUTS(schools_noncentred, max_tree_depth=cfg["tree_depth"])
        mcmc = MCMC(kernel, num_samples=cfg["ref_samples"], warmup_steps=cfg["ref_warmup"],
                    disable_progbar=True)
        mcmc.run(*problem.args)
        draws.append(schools_quantities(mcmc.get_samples()))
    q = torch.stack(draws)  # (chains, n, 10)
    flat = q.reshape(-1, q.shape[-1])
    perm = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(seed))
    keep = flat[perm[:cfg["ref_keep"]]]
    out = moments(flat, problem.key_fn(flat))
    out.update(source=f"NUTS, non-centred, {cfg['ref_chains']} chains × ({cfg['ref_warmup']} warm-up + "
               f"{cfg['ref_samples']}) draws", seconds=time.perf_counter() - start,
               rhat_max=float(split_gelman_rubin(q, 0, 1).max()),
               ess_min=float(effective_sample_size(q.double(), 0, 1).min()),
               draws=[[round(v, 4) for v in row] for row in keep.tolist()], config=_ref_config(cfg))
    return out


def _ref_config(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("ref_chains", "ref_warmup", "ref_samples", "ref_keep", "tree_depth")}


def funnel_reference(problem: Problem, cfg: dict, seed: int) -> dict:
    """Exact: ``v ~ N(0, 9)``, ``x_i ~`` sd ``e^{9/4}``; draws from the exact sampler."""
    sd_x = math.exp(FUNNEL_SCALE**2 / 4)
    target = krflows.targets.Funnel(FUNNEL_DIM, FUNNEL_SCALE)
    draws = target.sample((cfg["ref_keep"],), generator=torch.Generator().manual_seed(seed))
    key = float(torch.special.ndtr(torch.tensor(-1.0)))
    return {"mean": [0.0, 0.0], "sd": [FUNNEL_SCALE, sd_x], "key": key,
            "source": "exact (closed form; exact sampler for the diagnostics)", "seconds": 0.0,
            "draws_u": draws.tolist()}


def mixture_reference(problem: Problem, cfg: dict, seed: int) -> dict:
    """Exact moments by quadrature on a 2-D grid of ``(mu1, mu2)``; draws from the grid."""
    from krflows.pyro import potential_from_model

    start = time.perf_counter()
    potential = potential_from_model(mixture, *problem.args)
    g = torch.linspace(-8.0, 8.0, cfg["grid"], dtype=torch.float64)
    grid = torch.cartesian_prod(g, g)
    with torch.no_grad():
        lp = torch.cat([potential(c.float()).double() for c in grid.split(40_000)])
    w = torch.softmax(lp, 0)
    mean = (w[:, None] * grid).sum(0)
    sd = ((w[:, None] * (grid - mean) ** 2).sum(0)).sqrt()
    key = float((w * (grid[:, 0] < grid[:, 1]).double()).sum() + 0.5 * (w * (grid[:, 0] == grid[:, 1])).sum())
    gen = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(w, cfg["ref_keep"], replacement=True, generator=gen)
    h = float(g[1] - g[0])
    draws = grid[idx] + h * (torch.rand(cfg["ref_keep"], 2, generator=gen, dtype=torch.float64) - 0.5)
    return {"mean": mean.tolist(), "sd": sd.tolist(), "key": key, "seconds": time.perf_counter() - start,
            "source": f"exact quadrature on a {cfg['grid']}² grid over [-8, 8]²", "draws_u": draws.tolist()}


# ---- statistics of a set of chains ------------------------------------------------------------

def chain_stats(q: torch.Tensor, problem: Problem) -> dict:
    """``q``: (chains, n, k) draws of the reported quantities."""
    q = q.double()
    flat = q.reshape(-1, q.shape[-1])
    bulk = effective_sample_size(q, chain_dim=0, sample_dim=1)
    lo, hi = torch.quantile(flat, 0.05, dim=0), torch.quantile(flat, 0.95, dim=0)
    tail = torch.minimum(effective_sample_size((q <= lo).double(), 0, 1),
                         effective_sample_size((q >= hi).double(), 0, 1))
    rhat = split_gelman_rubin(q, 0, 1)
    ref = problem.reference
    ref_mean, ref_sd = torch.tensor(ref["mean"]).double(), torch.tensor(ref["sd"]).double()
    z_mean = ((flat.mean(0) - ref_mean) / ref_sd).abs()
    z_sd = ((flat.std(0) - ref_sd) / ref_sd).abs()
    key_draws = problem.key_fn(flat)
    key_chains = problem.key_fn(q.reshape(-1, q.shape[-1])).reshape(q.shape[0], -1).double().mean(1)

    def clean(t):
        return [float(v) if torch.isfinite(v) else math.nan for v in t]

    return {"n_draws": int(flat.shape[0]), "chains": int(q.shape[0]),
            "ess_bulk": clean(bulk), "ess_tail": clean(tail), "rhat": clean(rhat),
            "ess_bulk_min": float(torch.nan_to_num(bulk, nan=0.0).min()),
            "ess_tail_min": float(torch.nan_to_num(tail, nan=0.0).min()),
            "rhat_max": float(torch.nan_to_num(rhat, nan=math.inf).max()),
            "mean": flat.mean(0).tolist(), "sd": flat.std(0).tolist(),
            "bias_mean_z": z_mean.tolist(), "bias_sd_z": z_sd.tolist(),
            "bias_mean_z_max": float(z_mean.max()), "bias_sd_z_max": float(z_sd[problem.bias_sd_idx].max()),
            "key": float(key_draws.double().mean()), "key_per_chain": key_chains.tolist()}


# ---- the methods ------------------------------------------------------------------------------

def run_nuts(problem: Problem, cfg: dict, seed: int) -> tuple[dict, torch.Tensor]:
    start, calls0, draws, divergences, accept = time.perf_counter(), CALLS[0], [], 0, []
    for c in range(cfg["chains"]):
        pyro.set_rng_seed(seed * 1000 + c)
        kernel = NUTS(problem.model, max_tree_depth=cfg["tree_depth"])
        mcmc = MCMC(kernel, num_samples=cfg["nuts_samples"], warmup_steps=cfg["nuts_warmup"],
                    disable_progbar=True)
        mcmc.run(*problem.args)
        draws.append(problem.quantities(mcmc.get_samples()))
        diag = mcmc.diagnostics()
        divergences += sum(len(v) for v in diag.get("divergences", {}).values())
        accept += [float(v) for v in diag.get("acceptance rate", {}).values()]
    q = torch.stack(draws)
    out = {"seconds": time.perf_counter() - start, "grad_evals": CALLS[0] - calls0, "plain_evals": 0,
           "divergences": divergences, "acceptance": sum(accept) / len(accept) if accept else math.nan}
    return out, q


@dataclass
class Trained:
    guide: AutoKRFlow
    seconds: float
    grad_evals: int
    history: dict


def train_flow(problem: Problem, cfg: dict, seed: int) -> Trained:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    guide = AutoKRFlow(problem.model, layers=cfg["layers"], hidden=cfg["hidden"],
                       warmup=cfg["guide_warmup"], warmup_batch=cfg["guide_warmup_batch"])
    guide(*problem.args)  # builds the flow and potential, Gaussian VI of the affine stage
    history = krflows.fit(guide.flow, guide.potential, steps=cfg["fit_steps"], batch_size=cfg["fit_batch"],
                          lr=cfg["lr"], anneal=cfg["anneal"], warmup=0,
                          log_every=max(1, cfg["fit_steps"] // 20))
    grads = cfg["guide_warmup"] * cfg["guide_warmup_batch"] + cfg["fit_steps"] * cfg["fit_batch"]
    return Trained(guide, time.perf_counter() - start, grads, history)


def _as_chains(x: torch.Tensor, problem: Problem, potential, chains: int) -> torch.Tensor:
    """Flat unconstrained draws (chains * n, d), in chain order -> (chains, n, k) quantities."""
    with torch.no_grad():
        q = problem.quantities(potential.unpack(x))
    return q.reshape(chains, -1, q.shape[-1])


def run_flow(problem: Problem, cfg: dict, trained: Trained) -> tuple[dict, torch.Tensor]:
    start = time.perf_counter()
    with torch.no_grad():
        x = trained.guide.flow.sample((cfg["n_flow"],))
    q = _as_chains(x, problem, trained.guide.potential, cfg["chains"])
    return {"seconds": trained.seconds + time.perf_counter() - start, "grad_evals": trained.grad_evals,
            "plain_evals": 0, "acceptance": math.nan}, q


def run_sir(problem: Problem, cfg: dict, trained: Trained) -> tuple[dict, torch.Tensor]:
    start = time.perf_counter()
    res = importance_resample(trained.guide.flow, trained.guide.potential, n=cfg["n_flow"], m=cfg["sir_m"])
    q = _as_chains(res.samples, problem, trained.guide.potential, cfg["chains"])
    return {"seconds": trained.seconds + time.perf_counter() - start, "grad_evals": trained.grad_evals,
            "plain_evals": cfg["sir_m"], "acceptance": math.nan, "is_ess": res.ess * cfg["sir_m"],
            "is_ess_fraction": res.ess}, q


def run_imh(problem: Problem, cfg: dict, trained: Trained) -> tuple[dict, torch.Tensor]:
    start, chains, rates = time.perf_counter(), [], []
    for _ in range(cfg["chains"]):
        res = independence_mh(trained.guide.flow, trained.guide.potential, n_steps=cfg["imh_steps"])
        chains.append(res.samples)
        rates.append(res.acceptance_rate)
    q = _as_chains(torch.cat(chains), problem, trained.guide.potential, cfg["chains"])
    return {"seconds": trained.seconds + time.perf_counter() - start, "grad_evals": trained.grad_evals,
            "plain_evals": cfg["chains"] * (cfg["imh_steps"] + 1), "acceptance": sum(rates) / len(rates)}, q


def run_neutra(problem: Problem, cfg: dict, trained: Trained, seed: int) -> tuple[dict, torch.Tensor]:
    start, calls0, draws = time.perf_counter(), CALLS[0], []
    for c in range(cfg["chains"]):
        pyro.set_rng_seed(seed * 1000 + 500 + c)
        draws.append(problem.quantities(neutra_nuts(problem.model, trained.guide, cfg["neutra_samples"],
                                                    cfg["neutra_warmup"], *problem.args,
                                                    max_tree_depth=cfg["tree_depth"])))
    q = torch.stack(draws)
    return {"seconds": trained.seconds + time.perf_counter() - start,
            "grad_evals": trained.grad_evals + CALLS[0] - calls0, "plain_evals": 0,
            "acceptance": math.nan}, q


def diagnose_flow(problem: Problem, cfg: dict, trained: Trained, seed: int) -> dict:
    ref = problem.reference
    draws_u = torch.tensor(ref["draws_u"]) if "draws_u" in ref else \
        problem.to_unconstrained(torch.tensor(ref["draws"], dtype=torch.float64)).float()
    report = krflows.diagnose(trained.guide.flow, trained.guide.potential, n=cfg["n_diag"], seed=seed,
                              reference=draws_u.to(trained.guide.potential.dtype), n_sub=300, n_inverse=200)
    keep = ("ess", "pareto_k", "forward_ess", "forward_pareto_k", "elbo", "eubo", "jeffreys", "log_z",
            "sliced_w2", "sliced_w2_floor", "max_slope")
    out = {k: report[k] for k in keep if k in report}
    out["verdict"] = report["verdict"]
    return out


# ---- driver -----------------------------------------------------------------------------------

def run_problem(problem: Problem, cfg: dict, seed: int) -> dict:
    rows = {}
    out, q = run_nuts(problem, cfg, seed)
    rows["NUTS"] = (out, q)
    trained = train_flow(problem, cfg, seed)
    rows["flow"] = run_flow(problem, cfg, trained)
    torch.manual_seed(seed + 1)
    rows["flow+SIR"] = run_sir(problem, cfg, trained)
    torch.manual_seed(seed + 2)
    rows["flow-IMH"] = run_imh(problem, cfg, trained)
    rows["NeuTra-NUTS"] = run_neutra(problem, cfg, trained, seed)
    results, samples = {}, {}
    for method, (out, q) in rows.items():
        out.update(chain_stats(q, problem))
        total = out["grad_evals"] + out["plain_evals"]
        if method == "flow+SIR":  # resampled draws repeat: the weights' ESS bounds the draws' ESS
            out["ess_bulk_min"] = min(out["ess_bulk_min"], out["is_ess"])
            out["ess_tail_min"] = min(out["ess_tail_min"], out["is_ess"])
        out["ess_bulk_per_s"] = out["ess_bulk_min"] / out["seconds"]
        out["ess_tail_per_s"] = out["ess_tail_min"] / out["seconds"]
        out["ess_bulk_per_eval"] = out["ess_bulk_min"] / max(total, 1)
        out["ess_tail_per_eval"] = out["ess_tail_min"] / max(total, 1)
        results[method] = out
        samples[method] = q.reshape(-1, q.shape[-1])
        print(f"  {method:<12} {out['seconds']:7.1f} s  evals {total:>8}  "
              f"ESS bulk {out['ess_bulk_min']:7.1f} "
              f"tail {out['ess_tail_min']:7.1f}  R̂ {out['rhat_max']:.3f}  |bias mean|/sd "
              f"{out['bias_mean_z_max']:.3f}  {problem.key_name} {out['key']:.3f}", flush=True)
    flow_report = diagnose_flow(problem, cfg, trained, seed)
    flow_report["train_seconds"] = trained.seconds
    flow_report["train_grad_evals"] = trained.grad_evals
    flow_report["final_elbo"] = trained.history["elbo"][-1]
    print(f"  flow diagnose: ESS {flow_report['ess']:.3f} k̂ {flow_report['pareto_k']:.2f} "
          f"forward ESS {flow_report.get('forward_ess', math.nan):.3f}  {flow_report['verdict']}", flush=True)
    return {"problem": problem.name, "quantities": problem.names, "key_name": problem.key_name,
            "reference": {k: v for k, v in problem.reference.items() if k not in ("draws", "draws_u")},
            "methods": results, "flow_report": flow_report, "_samples": samples}


def get_references(probs: list[Problem], cfg: dict, args, smoke: bool) -> None:
    cached = None
    path = args.out / "two_philosophies.json"
    if path.is_file():
        try:
            old = _common.load_json(path)
            ref = old.get("schools_reference")
            if ref and ref.get("config") == _ref_config(cfg):
                cached = ref
        except (ValueError, KeyError):
            cached = None
    schools = cached
    if schools is None:
        print("computing the eight-schools NUTS reference ...", flush=True)
        schools = schools_reference(probs[0], cfg, args.seed)
        print(f"  done in {schools['seconds']:.0f} s: mu {schools['mean'][0]:.2f} ± {schools['sd'][0]:.2f}, "
              f"tau {schools['mean'][1]:.2f} ± {schools['sd'][1]:.2f}", flush=True)
    else:
        print("eight-schools reference: cached in the JSON", flush=True)
    schools["cached"] = cached is not None
    for p in probs:
        if p.name.startswith("eight"):
            p.reference = schools
        elif p.name.startswith("funnel"):
            p.reference = funnel_reference(p, cfg, args.seed)
        else:
            p.reference = mixture_reference(p, cfg, args.seed)


# ---- report -----------------------------------------------------------------------------------

def write_markdown(path, cfg, results, smoke, seconds, schools_ref) -> None:
    rows = []
    for r in results:
        for method in METHODS:
            m = r["methods"][method]
            rows.append([r["problem"], method, m["seconds"], m["grad_evals"], m["plain_evals"],
                         m["ess_bulk_min"], m["ess_tail_min"], m["ess_bulk_per_s"], m["ess_tail_per_s"],
                         1000 * m["ess_bulk_per_eval"], f"{m['rhat_max']:.3f}", m["bias_mean_z_max"],
                         m["bias_sd_z_max"],
                         f"{_common.fmt(m['key'])} (ref {_common.fmt(r['reference']['key'])})",
                         m["acceptance"], m.get("divergences", "–")])
    diag_rows = [[r["problem"], r["flow_report"]["train_seconds"], r["flow_report"]["train_grad_evals"],
                  r["flow_report"]["final_elbo"], r["flow_report"]["ess"], r["flow_report"]["pareto_k"],
                  r["flow_report"].get("forward_ess"), r["flow_report"].get("forward_pareto_k"),
                  r["flow_report"].get("jeffreys"), r["flow_report"]["verdict"]] for r in results]
    moment_rows = []
    for r in results:
        ref = r["reference"]
        for i, name in enumerate(r["quantities"][:4]):
            cells = [(ref["mean"][i], ref["sd"][i])]
            cells += [(r["methods"][m]["mean"][i], r["methods"][m]["sd"][i]) for m in METHODS]
            moment_rows.append([r["problem"], name]
                               + [f"{_common.fmt(a)} ± {_common.fmt(b)}" for a, b in cells])
    parts = [
        "# Two philosophies: NUTS versus a trained KR flow, and their hybrids\n",
        _common.environment(smoke, seconds), "",
        f"Budgets (one seed, {cfg['chains']} chains for every MCMC method, run one after the other): "
        f"NUTS {cfg['nuts_warmup']} warm-up + {cfg['nuts_samples']} draws per chain; flow = `AutoKRFlow` "
        f"(spline, {cfg['layers']} layers, hidden {cfg['hidden']}; affine stage from Gaussian VI, "
        f"{cfg['guide_warmup']} × {cfg['guide_warmup_batch']}) then `krflows.fit` {cfg['fit_steps']} steps × "
        f"batch {cfg['fit_batch']}, lr {cfg['lr']}, tempering over the first {cfg['anneal']:.0%} of the "
        "steps; "
        f"flow alone: {cfg['n_flow']} i.i.d. draws; SIR: {cfg['n_flow']} draws resampled from {cfg['sir_m']} "
        f"weighted proposals; IMH: {cfg['chains']} × {cfg['imh_steps']} steps; NeuTra-NUTS: "
        f"{cfg['neutra_warmup']} warm-up + {cfg['neutra_samples']} draws per chain, in the trained flow's "
        f"reference space. The full run is sized for about 10 minutes on one thread (the wall time above; "
        "the machine is shared with other jobs, so every time here is inflated by their load).\n",
        "References: eight schools — " + schools_ref["source"]
        + f" (computed once, in {schools_ref['seconds']:.0f} s, and cached in the JSON; not counted in the "
        f"wall times), split R̂ max {schools_ref['rhat_max']:.3f}, "
        f"min ESS {_common.fmt(schools_ref['ess_min'])}; "
        f"mu = {_common.fmt(schools_ref['mean'][0])} ± {_common.fmt(schools_ref['sd'][0])}, tau = "
        f"{_common.fmt(schools_ref['mean'][1])} ± {_common.fmt(schools_ref['sd'][1])} "
        "(literature: 4.4 ± 3.3, "
        "3.6 ± 3.2); funnel — exact (v ~ N(0, 9), sd of x_i = e^{9/4} ≈ 9.49, P(v < −3) = Φ(−1) = 0.159); "
        f"mixture — exact quadrature on a grid of {cfg.get('grid', 801)}² points (P(mu1 < mu2) = 1/2 by "
        "symmetry).\n",
        "## Methods × problems\n",
        "Columns: `wall s` includes the flow's training for every flow method (the same trained flow "
        "serves flow, SIR, IMH and NeuTra); `∇ evals` = evaluations of log p with gradient (NUTS: model "
        "executions = leapfrog steps + initialisation; flow: warm-up + training steps × batch; NeuTra: "
        "training + its NUTS steps); `plain evals` = log p without gradient (importance weights). "
        "ESS = the smallest over the reported quantities (eight schools: mu, tau, theta₁..₈; funnel: "
        "v, x₁; mixture: mu1, mu2) of Pyro's `effective_sample_size` over the chains (bulk), and of "
        "the indicators I(x ≤ q05), I(x ≥ q95) (tail). Flow and SIR draws are split into "
        f"{cfg['chains']} pseudo-chains; SIR's ESS is capped by the Kish ESS of its {cfg['sir_m']} "
        "weights (its draws repeat). `ESS/1k evals` divides by ∇ + plain evals. `max Δmean/sd`, "
        "`max Δsd/sd` = largest absolute bias of the posterior mean and sd, in reference sds (the "
        "funnel's sd column uses v only: x₁'s sample sd is too heavy-tailed to compare). R̂ = largest "
        "split R̂ (Pyro's `split_gelman_rubin`). `accept` = IMH acceptance rate or NUTS mean acceptance "
        "probability; `div` = NUTS divergences.\n",
        _common.md_table(["problem", "method", "wall s", "∇ evals", "plain evals", "ESS bulk", "ESS tail",
                          "bulk ESS/s", "tail ESS/s", "bulk ESS/1k evals", "R̂ max", "max Δmean/sd",
                          "max Δsd/sd", "key statistic", "accept", "div"], rows),
        "Key statistics: eight schools E[tau]; funnel P(v < −3) (the neck); mixture P(mu1 < mu2) "
        "(the label-switching symmetry: truth 1/2). Noise floor: a mean estimated from an ESS of N is off by "
        "about 1/√N sd (0.045 sd at N = 500), and the columns take the largest of up to 10 quantities, so "
        "bias values up to about 0.1 are Monte-Carlo error, not bias. The flow's draws cost almost nothing "
        "once it is trained (2000 draws take well under a second), so its ESS/s grows with the number of "
        "draws taken; the table's ESS/s is for the draws listed above, training included.\n",
        "## The trained flows: `krflows.diagnose`\n",
        "On the flow's own (unconstrained) coordinates, with the reference draws for the forward "
        f"(mass-covering) measures; {cfg['n_diag']} flow samples. `ELBO` = the last logged training batch.\n",
        _common.md_table(["problem", "train s", "train ∇ evals", "ELBO", "ESS", "k̂", "forward ESS",
                          "forward k̂", "EUBO − ELBO", "verdict"], diag_rows),
        "## Posterior moments (mean ± sd), first quantities\n",
        _common.md_table(["problem", "quantity", "reference", *METHODS], moment_rows),
    ]
    path.write_text("\n".join(parts))


COLORS = {"NUTS": "C0", "flow": "C1", "flow+SIR": "C2", "flow-IMH": "C3", "NeuTra-NUTS": "C4"}


def plot(path, results, probs) -> None:
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(3, len(results), figsize=(4.2 * len(results), 10.5))
    for j, (r, p) in enumerate(zip(results, probs, strict=True)):
        ms = [r["methods"][m] for m in METHODS]
        xs = range(len(METHODS))
        a = ax[0, j]
        a.bar([x - 0.2 for x in xs], [max(m["ess_bulk_per_s"], 1e-3) for m in ms], 0.4, label="bulk",
              color=[COLORS[m] for m in METHODS])
        a.bar([x + 0.2 for x in xs], [max(m["ess_tail_per_s"], 1e-3) for m in ms], 0.4, label="tail",
              color=[COLORS[m] for m in METHODS], alpha=0.45, hatch="//")
        a.set_yscale("log")
        a.set_xticks(list(xs), METHODS, rotation=30, fontsize=7, ha="right")
        a.set_title(f"{r['problem']}\nmin ESS per second (solid bulk, hatched tail)", fontsize=8)
        a.grid(alpha=0.3, axis="y")
        a = ax[1, j]
        for m in METHODS:
            v = r["methods"][m]
            a.scatter(v["seconds"], max(v["bias_mean_z_max"], 1e-3), color=COLORS[m], marker="o",
                      label=m)
            a.scatter(v["seconds"], max(v["bias_sd_z_max"], 1e-3), color=COLORS[m], marker="x")
        a.set_xscale("log")
        a.set_yscale("log")
        for axis in (a.xaxis, a.yaxis):
            axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            axis.set_minor_formatter(ticker.NullFormatter())
        a.axhline(0.1, color="grey", ls=":", lw=1)
        a.set_xlabel("wall time, s (training included)", fontsize=8)
        a.set_title("largest |bias| / reference sd (o mean, x sd)", fontsize=8)
        a.grid(alpha=0.3)
        if j == 0:
            a.legend(fontsize=6)
        a = ax[2, j]
        samples = r["_samples"]
        idx = 1 if p.name.startswith("eight") else 0
        transform = (lambda t: t.log()) if idx == 1 else (lambda t: t)
        label = "log tau" if idx == 1 else p.names[idx]
        ref = p.reference
        ref_draws = torch.tensor(ref["draws"] if "draws" in ref else ref["draws_u"])[:, idx]
        probs = torch.tensor([0.001, 0.999], dtype=torch.float64)
        lo, hi = torch.quantile(transform(ref_draws.double()), probs)
        pad = 0.3 * float(hi - lo)
        bins = torch.linspace(float(lo) - pad, float(hi) + pad, 50).tolist()
        if p.name.startswith("funnel"):
            grid = torch.linspace(bins[0], bins[-1], 400)
            density = torch.exp(-0.5 * (grid / FUNNEL_SCALE) ** 2) / (FUNNEL_SCALE * math.sqrt(2 * math.pi))
            a.plot(grid, density, "k-", lw=2, label="exact")
        else:
            a.hist(transform(ref_draws.double()).numpy(), bins=bins, density=True, color="k", alpha=0.25,
                   label="reference")
        for m in METHODS:
            a.hist(transform(samples[m][:, idx].double()).clamp(bins[0], bins[-1]).numpy(), bins=bins,
                   density=True, histtype="step", color=COLORS[m], lw=1.2, label=m)
        a.set_xlabel(label, fontsize=8)
        a.set_title(f"marginal of {label}", fontsize=8)
        if j == len(results) - 1:
            a.legend(fontsize=6)
    fig.suptitle("NUTS vs KR flow (alone, +SIR, IMH, NeuTra): throughput, bias, marginals", fontsize=10)
    fig.tight_layout()
    _common.save_figure(fig, path)


def replot(args) -> None:
    """Rebuilds the .md (not the .png: it needs the draws) from the JSON of an earlier run."""
    data = _common.load_json(args.out / "two_philosophies.json")
    cfg = dict(data["config"], hidden=tuple(data["config"]["hidden"]))
    write_markdown(args.out / "two_philosophies.md", cfg, data["problems"], data["smoke"], data["seconds"],
                   data["schools_reference"])
    print(f"rewrote {args.out / 'two_philosophies.md'} from the JSON")


def main() -> None:
    _common.setup()
    args = _common.parse_args(__doc__.splitlines()[0], replot=True)
    if args.replot:
        return replot(args)
    cfg = SMOKE if args.smoke else FULL
    start = time.perf_counter()
    probs = problems()
    get_references(probs, cfg, args, args.smoke)
    results = []
    for i, p in enumerate(probs):
        print(f"{p.name}", flush=True)
        results.append(run_problem(p, cfg, args.seed + i))
    seconds = time.perf_counter() - start
    schools_ref = probs[0].reference
    plot(args.out / "two_philosophies.png", results, probs)
    _common.save_json({"config": cfg, "seconds": seconds, "smoke": args.smoke,
                       "schools_reference": {k: v for k, v in schools_ref.items() if k != "cached"},
                       "problems": [{k: v for k, v in r.items() if k != "_samples"} for r in results]},
                      args.out / "two_philosophies.json")
    write_markdown(args.out / "two_philosophies.md", cfg, results, args.smoke, seconds, schools_ref)
    print(f"wrote {args.out / 'two_philosophies.md'} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
