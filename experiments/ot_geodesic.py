r"""Displacement interpolation: the Brenier path is the W2 geodesic, the KR path is not.

For a map ``T: z -> x`` from ``μ_0 = N(0, I)``, ``T_t = (1 - t) Id + t T`` gives the path
``μ_t = (T_t)_# μ_0``. For the Brenier map it is McCann's displacement interpolation, the
constant-speed W2 geodesic: ``W_2(μ_0, μ_t) = t W_2(μ_0, μ_1)``. For the KR map of the same
target the path has the same end points but is not a geodesic. For Gaussians every ``μ_t`` is
Gaussian, so both claims are checked with the closed-form ``W_2`` of the ``t``-Gaussians.

A trained :class:`krflows.KRFlow` gives the same kind of path through ``flow.interpolate(t)``,
with an exact density (``log_prob`` inverts ``T_t`` by root finding): the script draws its
contours on a banana and on a bimodal target — intermediate distributions, e.g. for annealing
— and checks that they integrate to 1 on the plotting grid, and how far the path is from a
geodesic (exact-OT ``W_2`` between samples, ``ot.emd2``).

Run ``python experiments/ot_geodesic.py`` (full, 25-70 s on 1 thread) or with
``--smoke --out DIR``. Writes ``ot_geodesic.{md,png,json}``.
"""

from __future__ import annotations

import math
import time

import _common
import torch

import krflows
from krflows.exact import gaussian_brenier_map, gaussian_kr_map
from krflows.ot import affine_transport_cost, interpolate_affine, wasserstein2_gaussian

F64 = torch.float64
TIMES = (0.0, 0.25, 0.5, 0.75, 1.0)
MEAN, SCALES, RHO = (1.0, -0.5), (1.0, 2.0), 0.8
TARGETS = {"banana": lambda: krflows.targets.Banana(curvature=0.4, scale=2.0),
           "bimodal": lambda: krflows.targets.Bimodal2D(separation=5.0)}
FULL = {"steps": 800, "batch_size": 256, "lr": 3e-3, "layers": 2, "hidden": (32, 32), "grid": 90,
        "n_emd": 1500, "fine_t": 101}
SMOKE = {"steps": 30, "batch_size": 64, "lr": 3e-3, "layers": 1, "hidden": (8,), "grid": 30,
         "n_emd": 200, "fine_t": 11}
BOX = {"banana": ((-6.5, 6.5), (-4.5, 8.0)), "bimodal": ((-6.0, 6.0), (-4.5, 4.5))}


def gaussian_paths(fine_t: int) -> dict:
    """Closed-form W2 along the Brenier and KR interpolations of N(0, I) -> N(m, Σ)."""
    s0, s1 = SCALES
    mean = torch.tensor(MEAN, dtype=F64)
    cov = torch.tensor([[s0**2, RHO * s0 * s1], [RHO * s0 * s1, s1**2]], dtype=F64)
    zero, eye = torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64)
    w2_total = float(wasserstein2_gaussian(zero, eye, mean, cov))
    out = {"mean": mean.tolist(), "cov": cov.tolist(), "w2": w2_total, "rows": [], "path_length": {}}
    for name, T in (("brenier", gaussian_brenier_map(mean, cov)), ("kr", gaussian_kr_map(mean, cov))):
        def law(t, T=T, name=name):
            Tt = interpolate_affine(T, t)
            B = Tt.tril if name == "kr" else Tt.matrix
            return Tt.shift, B @ B.T
        for t in TIMES:
            m_t, S_t = law(t)
            Tt = interpolate_affine(T, t)
            w2_t = float(wasserstein2_gaussian(zero, eye, m_t, S_t))
            w2_to_1 = float(wasserstein2_gaussian(m_t, S_t, mean, cov))
            out["rows"].append({"map": name, "t": t, "w2_0t": w2_t, "t_w2": t * w2_total,
                                "defect": w2_t - t * w2_total, "w2_t1": w2_to_1,
                                "defect_t1": w2_to_1 - (1 - t) * w2_total,
                                "cost_sqrt": math.sqrt(float(affine_transport_cost(Tt, zero, eye)))})
        ts = torch.linspace(0, 1, fine_t, dtype=F64)
        laws = [law(float(t)) for t in ts]
        out["path_length"][name] = sum(float(wasserstein2_gaussian(*laws[i], *laws[i + 1]))
                                       for i in range(len(laws) - 1))
    return out


def flow_path(name: str, cfg: dict, seed: int) -> dict:
    """Trains a flow, then the interpolated densities on a grid and sample W2 along the path."""
    import ot

    torch.manual_seed(seed)
    target = TARGETS[name]()
    flow = krflows.KRFlow(2, family="spline", layers=cfg["layers"], hidden=cfg["hidden"])
    start = time.perf_counter()
    krflows.fit(flow, target, steps=cfg["steps"], batch_size=cfg["batch_size"], lr=cfg["lr"],
                anneal=0.5 if name == "bimodal" else 0.0, log_every=max(cfg["steps"] // 10, 1))
    fit_seconds = time.perf_counter() - start
    flow = flow.double()
    (x0lo, x0hi), (x1lo, x1hi) = BOX[name]
    g0 = torch.linspace(x0lo, x0hi, cfg["grid"], dtype=F64)
    g1 = torch.linspace(x1lo, x1hi, cfg["grid"], dtype=F64)
    X = torch.cartesian_prod(g0, g1)
    area = float((g0[1] - g0[0]) * (g1[1] - g1[0]))
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(cfg["n_emd"], 2, generator=gen, dtype=F64)
    z_other = torch.randn(cfg["n_emd"], 2, generator=gen, dtype=F64)
    a = torch.full((cfg["n_emd"],), 1.0 / cfg["n_emd"], dtype=F64)
    rows, densities = [], []
    with torch.no_grad():
        x1 = flow(z)
        w2_1 = math.sqrt(float(ot.emd2(a, a, ot.dist(z, x1))))
        for t in TIMES:
            law = flow.interpolate(t)
            t0 = time.perf_counter()
            log_q = law.log_prob(X)
            density_seconds = time.perf_counter() - t0
            dens = log_q.exp().reshape(len(g0), len(g1))
            densities.append(dens.T.tolist())
            Tt = torch.distributions.ComposeTransform(law.transforms)
            xt = Tt(z)
            residual = float((Tt.inv(xt) - z).abs().max())
            # common random numbers: the same z for μ₀ and μ_t (0 at t = 0, less noise than independent draws)
            w2_t = math.sqrt(float(ot.emd2(a, a, ot.dist(z, xt))))
            cost = float(((xt - z) ** 2).sum(-1).mean())
            rows.append({"target": name, "t": t, "grid_mass": float(dens.sum()) * area,
                         "density_seconds": density_seconds, "roundtrip_max": residual, "w2_0t_emd": w2_t,
                         "t_w2_emd": t * w2_1, "cost_sqrt": math.sqrt(cost)})
    # the emd floor: W2 between two independent samples of N(0, I) of this size
    floor = math.sqrt(float(ot.emd2(a, a, ot.dist(z, z_other))))
    return {"target": name, "rows": rows, "densities": densities, "grid": [g0.tolist(), g1.tolist()],
            "fit_seconds": fit_seconds, "emd_floor": floor}


def write_markdown(path, cfg, gauss, flows, smoke, seconds) -> None:
    grows = [[r["map"], r["t"], r["w2_0t"], r["t_w2"], r["defect"], r["w2_t1"], r["defect_t1"],
              r["cost_sqrt"]] for r in gauss["rows"]]
    frows = [[r["target"], r["t"], r["grid_mass"], r["roundtrip_max"], r["density_seconds"],
              r["w2_0t_emd"], r["t_w2_emd"], r["cost_sqrt"]] for f in flows for r in f["rows"]]
    parts = [
        "# Displacement interpolation: geodesic (Brenier) or not (KR)\n",
        _common.environment(smoke, seconds), "",
        "## Gaussian: closed form\n",
        f"μ₀ = N(0, I), μ₁ = N(m, Σ), m = {list(MEAN)}, scales {list(SCALES)}, correlation {RHO}. "
        f"W₂(μ₀, μ₁) = {gauss['w2']:.6f}. μ_t = (T_t)_# μ₀ with T_t = (1 − t) Id + t T is the Gaussian "
        "N(t m, B_t B_tᵀ), B_t = (1 − t) I + t A (A = Σ^½ for Brenier, L for KR); every W₂ below is "
        "`wasserstein2_gaussian` of these Gaussians. `defect` = W₂(μ₀, μ_t) − t W₂(μ₀, μ₁); "
        "`defect to 1` = W₂(μ_t, μ₁) − (1 − t) W₂(μ₀, μ₁); `√cost` = (E|T_t(z) − z|²)^½ "
        "(`affine_transport_cost`), the length the map itself pays (= W₂(μ₀, μ_t) only when T_t is "
        "optimal).\n",
        _common.md_table(["map", "t", "W₂(μ₀, μ_t)", "t W₂(μ₀, μ₁)", "defect", "W₂(μ_t, μ₁)", "defect to 1",
                          "√cost of T_t"], grows),
        f"Path length Σ W₂(μ_{{t_i}}, μ_{{t_{{i+1}}}}) over {cfg['fine_t']} equally spaced t: Brenier "
        f"{gauss['path_length']['brenier']:.6f}, KR {gauss['path_length']['kr']:.6f}, against "
        f"W₂(μ₀, μ₁) = {gauss['w2']:.6f} (a geodesic's length; any other path is longer).\n",
        "## Trained flows: `flow.interpolate(t)`\n",
        f"`KRFlow(2, 'spline', layers={cfg['layers']}, hidden={cfg['hidden']})`, reverse KL, "
        f"{cfg['steps']} steps, batch {cfg['batch_size']} (bimodal: `anneal=0.5`), fit "
        + ", ".join(f"{f['target']} {f['fit_seconds']:.0f} s" for f in flows)
        + f". Targets: banana = `Banana(curvature=0.4, scale=2)`, bimodal = `Bimodal2D(separation=5)`. "
        f"`grid mass` = Σ exp(log_prob) ΔA over the {cfg['grid']}² plotting grid (1 up to the mass "
        "outside the box and the grid's quadrature error: a check of the exact interpolated "
        "density); `round trip` = max |T_t⁻¹(T_t(z)) − z| over the sample; `W₂(μ₀, μ_t)` = exact "
        f"OT (`ot.emd2`) between the empirical measures of {cfg['n_emd']} draws z of N(0, I) and of "
        "their images T_t(z) (common random numbers; the empirical W₂ still carries a sampling error: "
        "W₂ between two independent N(0, I) samples of this size is "
        + ", ".join(f"{f['emd_floor']:.3f}" for f in flows)
        + "); `√cost` = (E|T_t(z) − z|²)^½ = t √cost(T), the flow's own path length to μ_t.\n",
        _common.md_table(["target", "t", "grid mass", "round trip", "log_prob s", "W₂(μ₀, μ_t) (emd)",
                          "t W₂(μ₀, μ₁) (emd)", "√cost of T_t"], frows),
        "`Bimodal2D`'s coordinates are independent, so its KR map acts coordinatewise: it is the gradient "
        "of a convex function, i.e. also the Brenier map, and the fitted flow's path is (up to the fit) "
        "a geodesic — emd W₂ = t W₂ = √cost. The banana's KR map is not optimal: W₂(μ₀, μ_t) falls "
        "below t W₂(μ₀, μ₁) in between, as for the correlated Gaussian's KR path, and √cost (the flow's "
        "own transport) exceeds W₂.\n",
    ]
    path.write_text("\n".join(parts))


def plot(path, gauss, flows) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(3, 6, figsize=(22, 10.5))
    mean, cov = torch.tensor(gauss["mean"], dtype=F64), torch.tensor(gauss["cov"], dtype=F64)
    theta = torch.linspace(0, 2 * math.pi, 200, dtype=F64)
    circle = torch.stack([theta.cos(), theta.sin()], -1)
    marks = torch.tensor([[1.5, 0.0], [0.0, 1.5], [-1.5, 0.0], [0.0, -1.5]], dtype=F64)
    maps = {"brenier": gaussian_brenier_map(mean, cov), "kr": gaussian_kr_map(mean, cov)}
    style = {"brenier": ("C0", "-", "o"), "kr": ("C3", "--", "s")}
    for j, t in enumerate(TIMES):
        a = ax[0, j]
        for name, T in maps.items():
            Tt = interpolate_affine(T, t)
            color, ls, marker = style[name]
            for k in (1.0, 2.0):
                e = Tt(k * circle)
                a.plot(e[:, 0], e[:, 1], color=color, ls=ls, lw=1.2, label=name if k == 1.0 else None)
            p = Tt(marks)
            a.plot(p[:, 0], p[:, 1], marker, color=color, ms=5, ls="none")
        w = {r["map"]: r for r in gauss["rows"] if r["t"] == t}
        a.set_title(f"t = {t}: W₂(μ₀, μ_t) Brenier {w['brenier']['w2_0t']:.3f}, "
                    f"KR {w['kr']['w2_0t']:.3f}", fontsize=8)
        a.set_xlim(-4, 6)
        a.set_ylim(-5.5, 4.5)
        a.set_aspect("equal")
        a.grid(alpha=0.2)
    ax[0, 0].legend(fontsize=8, loc="upper left")
    a = ax[0, 5]
    for name in ("brenier", "kr"):
        rows = [r for r in gauss["rows"] if r["map"] == name]
        a.plot([r["t"] for r in rows], [r["w2_0t"] for r in rows], style[name][2] + style[name][1],
               color=style[name][0], label=f"{name}: W₂(μ₀, μ_t)")
    a.plot([0, 1], [0, gauss["w2"]], "k:", label="t W₂(μ₀, μ₁) (geodesic)")
    for f, c in zip(flows, ("C2", "C4"), strict=False):
        a.plot([r["t"] for r in f["rows"]], [r["w2_0t_emd"] for r in f["rows"]], "^-", color=c, ms=4,
               label=f"flow {f['target']}: emd W₂")
        a.plot([r["t"] for r in f["rows"]], [r["t_w2_emd"] for r in f["rows"]], ":", color=c)
    a.set_xlabel("t")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    a.set_title("distance from μ₀ along the path", fontsize=9)
    for i, f in enumerate(flows, start=1):
        g0, g1 = (torch.tensor(v) for v in f["grid"])
        for j, t in enumerate(TIMES):
            a = ax[i, j]
            dens = torch.tensor(f["densities"][j])
            a.contourf(g0, g1, dens, levels=12, cmap="viridis")
            r = f["rows"][j]
            a.set_title(f"{f['target']}, t = {t}: exact density (grid mass {r['grid_mass']:.3f})",
                        fontsize=8)
            a.set_aspect("equal")
        target = TARGETS[f["target"]]()
        x = target.sample((1500,), generator=torch.Generator().manual_seed(0))
        a = ax[i, 5]
        a.plot(x[:, 0], x[:, 1], ".", ms=1.5, color="0.4")
        a.contour(g0, g1, torch.tensor(f["densities"][-1]), levels=6, colors="C1", linewidths=0.8)
        a.set_xlim(float(g0[0]), float(g0[-1]))
        a.set_ylim(float(g1[0]), float(g1[-1]))
        a.set_aspect("equal")
        a.set_title(f"{f['target']}: exact samples vs flow (t = 1) contours", fontsize=8)
    fig.suptitle("Top: Gaussian N(m, Σ), Brenier path (blue, geodesic) vs KR path (red), ellipses 1σ/2σ "
                 "and images of four z. Rows 2–3: flow.interpolate(t) of trained KRFlows", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    _common.save_figure(fig, path)


def main() -> None:
    _common.setup()
    args = _common.parse_args(__doc__.splitlines()[0])
    cfg = SMOKE if args.smoke else FULL
    start = time.perf_counter()
    gauss = gaussian_paths(cfg["fine_t"])
    for r in gauss["rows"]:
        print(f"{r['map']:<8} t={r['t']:.2f} W2(0,t) {r['w2_0t']:.6f} t*W2 {r['t_w2']:.6f} "
              f"defect {r['defect']:.2e}", flush=True)
    flows = []
    for name in TARGETS:
        flows.append(flow_path(name, cfg, args.seed))
        for r in flows[-1]["rows"]:
            print(f"{name} t={r['t']:.2f} mass {r['grid_mass']:.4f} emd W2 {r['w2_0t_emd']:.3f} "
                  f"t*W2 {r['t_w2_emd']:.3f} ({r['density_seconds']:.1f}s)", flush=True)
    seconds = time.perf_counter() - start
    _common.save_json({"config": cfg, "gaussian": gauss,
                       "flows": [{k: v for k, v in f.items() if k not in ("densities", "grid")}
                                 for f in flows],
                       "seconds": seconds}, args.out / "ot_geodesic.json")
    write_markdown(args.out / "ot_geodesic.md", cfg, gauss, flows, args.smoke, seconds)
    plot(args.out / "ot_geodesic.png", gauss, flows)
    print(f"wrote {args.out / 'ot_geodesic.md'} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
