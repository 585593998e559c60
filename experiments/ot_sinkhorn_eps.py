r"""Entropic OT between sample sets: what ε trades, and a plan splitting mass where a map cannot.

Reference draws ``x ~ N(0, I)`` (with one point placed at the origin) are coupled to exact target
draws ``y`` by :func:`krflows.ot.sinkhorn_plan` (POT) for ε from 10⁻³ to 10² times the mean
squared distance. Per ε: the solver's time and marginal violation, the plan's sharpness (the
effective number of targets per reference point, ``exp`` of the row entropy: 1 for a map, ``M``
for the independent coupling), the Sinkhorn divergence :func:`krflows.ot.sinkhorn_divergence`,
and the barycentric map :func:`krflows.ot.barycentric_map` — its error against the exact
Brenier map (Gaussian target), its variance over resampled targets, and its collapse onto the
target mean as ε grows. On a bimodal target the plan row of the origin (the valley of the
reference's image) splits between the two modes, which no map can do; the exact (ε = 0) plan
of ``ot.emd`` sends it to a single point.

Run ``python experiments/ot_sinkhorn_eps.py`` (full, about 30 s on 1 thread) or with
``--smoke --out DIR``. Writes ``ot_sinkhorn_eps.{md,png,json}``.
"""

from __future__ import annotations

import time
import warnings

import _common
import torch

import krflows
from krflows.exact import gaussian_brenier_map
from krflows.ot import barycentric_map, sinkhorn_divergence, sinkhorn_plan

F64 = torch.float64
MEAN, SCALES, RHO = (1.0, -0.5), (1.0, 2.0), 0.8
SEPARATION = 5.0
FULL = {"n": 400, "eps_rel": (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0), "resamples": 5,
        "shown": (1e-2, 1e-1, 10.0)}
SMOKE = {"n": 120, "eps_rel": (1e-2, 1.0, 100.0), "resamples": 2, "shown": (1e-2, 1.0, 100.0)}


def gaussian_target() -> krflows.targets.Gaussian:
    s0, s1 = SCALES
    cov = torch.tensor([[s0**2, RHO * s0 * s1], [RHO * s0 * s1, s1**2]], dtype=F64)
    return krflows.targets.Gaussian(torch.tensor(MEAN, dtype=F64), cov, dtype=F64)


def row_support(plan: torch.Tensor) -> torch.Tensor:
    """``exp`` of the entropy of each row's conditional law: the effective number of targets."""
    p = plan / plan.sum(1, keepdim=True)
    h = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(1)
    return h.exp()


def sweep(name: str, cfg: dict, seed: int) -> dict:
    import ot

    if name == "gaussian":
        target = gaussian_target()
    else:
        target = krflows.targets.Bimodal2D(SEPARATION, dtype=F64)
    gen = torch.Generator().manual_seed(seed)
    n = cfg["n"]
    x = torch.randn(n, 2, generator=gen, dtype=F64)
    x[0] = 0.0  # the middle point
    ys = [target.sample((n,), generator=gen).to(F64) for _ in range(cfg["resamples"])]
    y = ys[0]
    true_mean = target.sample((200_000,), generator=gen).mean(0) if name != "gaussian" else target.mean
    spread = float(((y - y.mean(0)) ** 2).sum(-1).mean().sqrt())
    scale = float(ot.dist(x.numpy(), y.numpy()).mean())
    exact_map = gaussian_brenier_map(target.mean, target.cov)(x) if name == "gaussian" else None
    uniform = torch.full((n,), 1 / n, dtype=F64).numpy()
    emd_plan = torch.from_numpy(ot.emd(uniform, uniform, ot.dist(x.numpy(), y.numpy())))
    emd_row = emd_plan[0] / emd_plan[0].sum()
    emd_rmse = None if exact_map is None else \
        float(((barycentric_map(x, y, emd_plan) - exact_map) ** 2).sum(-1).mean().sqrt())
    rows, shown = [], {}
    for rel in cfg["eps_rel"]:
        eps = rel * scale
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            plan = sinkhorn_plan(x, y, eps)
            plan_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            div = float(sinkhorn_divergence(x, y, eps))
            div_seconds = time.perf_counter() - t0
            images = [barycentric_map(x, y, plan)]
            images += [barycentric_map(x, yr, sinkhorn_plan(x, yr, eps)) for yr in ys[1:]]
        violation = max(float((plan.sum(1) - 1 / n).norm()), float((plan.sum(0) - 1 / n).norm()))
        T = images[0]
        stack = torch.stack(images)
        row0 = plan[0] / plan[0].sum()
        r = {"eps_rel": rel, "eps": eps, "plan_seconds": plan_seconds, "divergence_seconds": div_seconds,
             "violation": violation, "warnings": len(caught),
             "row_support_mean": float(row_support(plan).mean()),
             "sinkhorn_divergence": div,
             "resample_var": float(stack.var(0).sum(-1).mean()),
             "collapse": float(((T - true_mean) ** 2).sum(-1).mean().sqrt()) / spread,
             "middle_left": float(row0[y[:, 0] < 0].sum()), "middle_right": float(row0[y[:, 0] >= 0].sum()),
             "middle_image": T[0].tolist()}
        if exact_map is not None:
            r["map_rmse"] = float(((T - exact_map) ** 2).sum(-1).mean().sqrt())
        rows.append(r)
        if rel in cfg["shown"]:
            shown[rel] = {"image": T.tolist(), "row0": row0.tolist()}
        print(f"{name} eps {rel:g}×{scale:.2f}: plan {plan_seconds:.2f}s S {div:.4f} support "
              f"{r['row_support_mean']:.1f} collapse {r['collapse']:.3f} split "
              f"{r['middle_left']:.2f}/{r['middle_right']:.2f}", flush=True)
    return {"target": name, "scale": scale, "spread": spread, "rows": rows, "shown": shown, "x": x.tolist(),
            "y": y.tolist(), "true_mean": true_mean.tolist(),
            "emd_middle_left": float(emd_row[y[:, 0] < 0].sum()),
            "emd_row_support": float(row_support(emd_plan[:1])[0]), "map_rmse_emd": emd_rmse}


def write_markdown(path, cfg, results, smoke, seconds) -> None:
    parts = ["# Entropic OT: the ε trade-off and mass splitting\n", _common.environment(smoke, seconds), "",
             f"x: {cfg['n']} draws of N(0, I) with x₀ = (0, 0); y: {cfg['n']} exact draws of the target "
             f"(Gaussian: N(m, Σ), m = {list(MEAN)}, scales {list(SCALES)}, correlation {RHO}; bimodal: "
             f"`Bimodal2D(separation={SEPARATION:g})`). ε = ε_rel × (mean squared distance between x "
             "and y). Columns: `plan s` = `sinkhorn_plan` wall time; `violation` = marginal error (POT's "
             "norm; tol 1e-8); `support` = mean over rows of exp(row entropy), the effective number of "
             f"targets per x (1 = a map, {cfg['n']} = independent); `S_ε` = `sinkhorn_divergence(x, y, ε)` "
             "(its wall time: three solves); `map RMSE` = RMS |T̂(x) − T_Brenier(x)| of the barycentric "
             f"map (Gaussian only); `resample var` = E_i tr Var(T̂(x_i)) over {cfg['resamples']} "
             "independent target samples; `collapse` = RMS |T̂(x) − E[y]| / RMS |y − ȳ| (≈ 1 for a map "
             "onto the target, 0 when every point is sent to the mean); `x₀ → left/right` = the mass "
             "of the origin's plan row on each side of x₀ = 0, and `T̂(x₀)` its barycentric image.\n"]
    for res in results:
        gauss = res["target"] == "gaussian"
        headers = ["ε_rel", "ε", "plan s", "violation", "support", "S_ε", "S_ε s"] \
            + (["map RMSE"] if gauss else []) \
            + ["resample var", "collapse", "x₀ → left", "x₀ → right", "T̂(x₀)"]
        table = [[r["eps_rel"], r["eps"], r["plan_seconds"], r["violation"], r["row_support_mean"],
                  r["sinkhorn_divergence"], r["divergence_seconds"]] + ([r["map_rmse"]] if gauss else [])
                 + [r["resample_var"], r["collapse"], r["middle_left"], r["middle_right"],
                    [round(v, 2) for v in r["middle_image"]]] for r in res["rows"]]
        parts += [f"## {res['target']} target (cost scale {res['scale']:.3f})\n",
                  _common.md_table(headers, table)]
        extra = (f"Exact OT (`ot.emd`, ε = 0): the origin's row has effective support "
                 f"{res['emd_row_support']:.2f} and sends {res['emd_middle_left']:.2f} of its mass to the "
                 "left (a permutation: one target point).")
        if gauss:
            extra += (f" Its barycentric map (= the discrete OT assignment) has RMSE "
                      f"{res['map_rmse_emd']:.3f} against the Brenier map: the sample-level error floor "
                      "at this n.")
        parts.append(extra + "\n")
    path.write_text("\n".join(parts))


def plot(path, cfg, results) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 4, figsize=(20, 9.5))
    for i, res in enumerate(results):
        y = torch.tensor(res["y"])
        for j, rel in enumerate(cfg["shown"]):
            a = ax[i, j]
            s = res["shown"][rel]
            T = torch.tensor(s["image"])
            row = torch.tensor(s["row0"])
            a.scatter(y[:, 0], y[:, 1], s=4, color="0.7", label="target samples y")
            a.scatter(T[:, 0], T[:, 1], s=5, color="C0", label="barycentric images T̂(x)", zorder=3)
            # circle area ∝ the row's mass relative to uniform (a uniform row draws every circle at 8)
            a.scatter(y[:, 0], y[:, 1], s=(8 * row * len(row)).clamp(max=400), facecolors="none",
                      edgecolors="C3", lw=0.8, label="plan row of x₀ = (0, 0)")
            a.plot(float(T[0, 0]), float(T[0, 1]), "*", color="C3", ms=14, mec="k", label="T̂(x₀)")
            r = next(r for r in res["rows"] if r["eps_rel"] == rel)
            a.set_title(f"{res['target']}, ε = {rel:g} × scale: support {r['row_support_mean']:.1f}, "
                        f"x₀ split {r['middle_left']:.2f}/{r['middle_right']:.2f}", fontsize=9)
            a.set_aspect("equal")
            a.grid(alpha=0.2)
        ax[i, 0].legend(fontsize=7, loc="upper left")
        a = ax[i, 3]
        rel = [r["eps_rel"] for r in res["rows"]]
        if res["target"] == "gaussian":
            a.loglog(rel, [r["map_rmse"] for r in res["rows"]], "C0-o", label="map RMSE vs Brenier")
        a.loglog(rel, [r["collapse"] for r in res["rows"]], "C1-s", label="collapse (1: spread, 0: mean)")
        a.loglog(rel, [r["resample_var"] for r in res["rows"]], "C2-^", label="resample variance of T̂")
        a.loglog(rel, [r["plan_seconds"] for r in res["rows"]], "k--", label="sinkhorn_plan seconds")
        a.loglog(rel, [max(r["sinkhorn_divergence"], 1e-6) for r in res["rows"]], "C4-d", label="S_ε")
        a.loglog(rel, [min(r["middle_left"], r["middle_right"]) + 1e-6 for r in res["rows"]], "C3:",
                 label="x₀'s minority-side mass")
        a.set_xlabel("ε / cost scale")
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
        a.set_title(f"{res['target']}: the ε trade-off", fontsize=9)
    fig.suptitle("Sinkhorn plans between N(0, I) draws and target draws: small ε = sharp, slow, noisy; "
                 "large ε = blurred, everything sent to the mean. Red circles: the plan row of x₀",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    _common.save_figure(fig, path)


def main() -> None:
    _common.setup()
    args = _common.parse_args(__doc__.splitlines()[0])
    cfg = SMOKE if args.smoke else FULL
    start = time.perf_counter()
    results = [sweep(name, cfg, args.seed) for name in ("gaussian", "bimodal")]
    seconds = time.perf_counter() - start
    keep = [{k: v for k, v in r.items() if k not in ("shown", "x", "y")} for r in results]
    _common.save_json({"config": cfg, "results": keep, "seconds": seconds},
                      args.out / "ot_sinkhorn_eps.json")
    write_markdown(args.out / "ot_sinkhorn_eps.md", cfg, results, args.smoke, seconds)
    plot(args.out / "ot_sinkhorn_eps.png", cfg, results)
    print(f"wrote {args.out / 'ot_sinkhorn_eps.md'} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
