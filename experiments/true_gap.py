r"""A true gap: the exact KR map jumps, a flow is continuous and leaks mass into the gap.

:class:`~krflows.targets.GappedMixture1D` has zero density on ``(a, b)``. Its exact KR map
``z -> x = F^{-1}(Φ(z))`` is monotone and exact but jumps from ``a`` to ``b`` at
``z = Φ^{-1}(w_0)``; a flow is a continuous bijection of ``R``, so it must map some interval of
``z`` into the gap: the *leak* ``ℓ = Φ(S(b)) - Φ(S(a))`` (``S = T^{-1}``), computed here
exactly from the flow's inverse, not by sampling.

Samples in the gap have ``log p = -inf``; ``fit`` drops them (``history["dropped"]``). The
loss on the kept samples is :math:`E_q[\log q - \log p \mid x \notin \text{gap}]
= \mathrm{KL}(q_{out} \| p) + \log(1 - ℓ)`: it gets no gradient *against* gap mass, and its
``log(1 - ℓ)`` term even rewards a leak (the training "ELBO" can exceed ``log Z``). As a
remedy the script also fits a *barrier* surrogate whose log-density falls linearly into the
gap (finite, so every sample gives a gradient), and diagnoses both against the true target.

Run ``python experiments/true_gap.py`` (full, about two minutes on 2 CPU cores) or with
``--smoke --out DIR``. Writes ``true_gap.{md,png,json}``.
"""

from __future__ import annotations

import math
import time

import _common
import torch

import krflows
from krflows.exact import KR1D
from krflows.objectives import NonFiniteTargetError
from krflows.targets import GappedMixture1D

CAPACITIES = {  # name -> KRFlow(layers, hidden, bins)
    "small": {"layers": 1, "hidden": (8,), "bins": 4},
    "medium": {"layers": 2, "hidden": (32, 32), "bins": 8},
    "large": {"layers": 3, "hidden": (64, 64), "bins": 16},
    "xlarge": {"layers": 4, "hidden": (128, 128), "bins": 32},
}
WEIGHTS = (0.3, 0.7)
SEPARATION = 4.0
BARRIER = 20.0  # log-density drop per σ into the gap of the barrier surrogate
FULL = {"gaps": ((-0.5, 0.5), (-1.5, 1.5)), "capacities": tuple(CAPACITIES),
        "objectives": ("drop", "barrier", "barrier+anneal"), "steps": 800, "batch_size": 256, "lr": 3e-3,
        "n_diag": 10000, "log_every": 40}
SMOKE = {"gaps": ((-1.0, 1.0),), "capacities": ("small",), "objectives": ("drop", "barrier+anneal"),
         "steps": 20, "batch_size": 64, "lr": 3e-3, "n_diag": 500, "log_every": 10}
Z = torch.linspace(-3.0, 3.0, 6001, dtype=torch.float64)
HATCH = {"drop": "", "barrier": "//", "barrier+anneal": ".."}


def barrier(target: GappedMixture1D, slope: float = BARRIER):
    """``log p̃`` outside the gap; inside, the nearer edge's value minus ``slope`` per ``σ``."""
    a, b = target.gap
    edges = target.log_prob(torch.tensor([[a], [b]], dtype=target.dtype))
    lpa, lpb = float(edges[0]), float(edges[1])

    def log_prob(x: torch.Tensor) -> torch.Tensor:
        t = x[..., 0]
        da, db = (t - a) / target.scale, (b - t) / target.scale
        inside = torch.where(da < db, lpa - slope * da, lpb - slope * db)
        return torch.where((t > a) & (t < b), inside, target.log_prob(x))

    return log_prob


def leak(flow, gap: tuple[float, float]) -> float:
    """The flow's exact mass in the gap: ``Φ(S(b)) - Φ(S(a))``."""
    with torch.no_grad():
        z = flow.inverse(torch.tensor([[gap[0]], [gap[1]]])).double()[:, 0]
    phi = torch.special.ndtr(z)
    return float(phi[1] - phi[0])


def exact_map(target: GappedMixture1D) -> dict:
    """The exact KR map on ``Z`` (closed form and ``KR1D``) and its jump."""
    a, b = target.gap
    closed = target.icdf(torch.special.ndtr(Z))[:, 0]
    kr = KR1D.from_log_prob(target.log_prob, a - 9.0, b + 9.0, n=40001)
    numeric, log_slope = kr.call_and_log_diag(Z[:, None])
    z_jump = float(torch.special.ndtri(torch.tensor(WEIGHTS[0], dtype=torch.float64)))
    around = kr(torch.tensor([[z_jump - 1e-9], [z_jump + 1e-9]], dtype=torch.float64))[:, 0]
    return {"x": closed.tolist(), "x_kr1d": numeric[:, 0].tolist(), "log_slope": log_slope[:, 0].tolist(),
            "z_jump": z_jump, "x_left_of_jump": float(around[0]), "x_right_of_jump": float(around[1]),
            "jump": float(around[1] - around[0]),
            "kr1d_vs_closed_form_max_abs": float((numeric[:, 0] - closed).abs().max()),
            "exact_log_slope_max": float(log_slope.max())}


def run_one(gap, capacity: str, objective: str, cfg: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    target = GappedMixture1D(SEPARATION, gap, WEIGHTS)
    flow = krflows.KRFlow(1, family="spline", **CAPACITIES[capacity])
    curve = []

    def record(step, _):
        curve.append((step, leak(flow, gap)))

    fit_target = target if objective == "drop" else barrier(target)
    start = time.perf_counter()
    status, history = "ok", None
    try:
        history = krflows.fit(flow, fit_target, steps=cfg["steps"], batch_size=cfg["batch_size"],
                              lr=cfg["lr"], anneal=0.5 if objective.endswith("anneal") else 0.0,
                              log_every=cfg["log_every"], callback=record)
    except NonFiniteTargetError:
        last = curve[-1][0] if curve else 0
        status = f"collapsed: a whole batch fell in the gap (after step {last})"
    seconds = time.perf_counter() - start
    nan = math.nan
    try:
        r = krflows.diagnose(flow, target, n=cfg["n_diag"], seed=seed, n_sub=0, n_inverse=200)
    except ValueError:  # no flow sample outside the gap
        r = {"valley_mass": nan, "valley_mass_se": nan, "frac_zero_density": 1.0, "mode_weights": [nan, nan],
             "mode_tv": nan}
    with torch.no_grad():
        x, log_diag = flow.triangular.call_and_log_diag(Z.float()[:, None])
    total = cfg["steps"] * cfg["batch_size"]
    dropped = history["dropped"][-1] if history else nan
    return {
        "gap": list(gap), "capacity": capacity, "objective": objective, "status": status,
        "leak": leak(flow, gap), "valley_mass": r["valley_mass"], "valley_mass_se": r["valley_mass_se"],
        "frac_zero_density": r["frac_zero_density"], "dropped_total": dropped,
        "dropped_fraction": dropped / total, "train_elbo_last": history["elbo"][-1] if history else nan,
        "true_log_z": target.log_z, "mode_weights": r["mode_weights"], "mode_tv": r["mode_tv"],
        "forward_ess": r.get("forward_ess", nan), "kl_forward": r.get("kl_forward", nan),
        "kl_reverse": r.get("kl_reverse", nan), "learned_log_slope_max": float(log_diag.max()),
        "curve": curve, "map": x[:, 0].tolist(), "fit_seconds": seconds,
    }


def write_markdown(path, cfg, exact, rows, smoke, seconds) -> None:
    parts = [
        "# True gap: the exact KR map jumps; continuous flows leak into the gap\n",
        _common.environment(smoke, seconds), "",
        f"Target: `GappedMixture1D(separation={SEPARATION}, gap, weights={WEIGHTS})` (zero density on "
        f"the gap). Budget per fit: {cfg['steps']} Adam steps + default warm-up, batch "
        f"{cfg['batch_size']}, lr {cfg['lr']}, spline flows, no tempering; capacities (layers × "
        f"hidden × bins): " + ", ".join(f"{k} = {v['layers']} × {v['hidden']} × {v['bins']}"
                                         for k, v in CAPACITIES.items() if k in cfg["capacities"])
        + f". Objectives: `drop` = the true target (gap samples get log p = −inf and are dropped "
        f"by `fit`); `barrier` = a surrogate whose log-density falls by {BARRIER:g} per σ into the "
        f"gap (finite everywhere), diagnosed against the true target; `barrier+anneal` = the same "
        f"with `anneal=0.5` (tempering is useless for `drop`: (−inf)·β = −inf). One seed per "
        f"cell.\n",
        "## The exact KR map jumps\n",
        _common.md_table(
            ["gap", "z of the jump = Φ⁻¹(w₀)", "T(z⁻)", "T(z⁺)", "jump", "gap width",
             "max abs(KR1D − closed form), z∈[−3,3]", "KR1D max log T' off the jump"],
            [[g, e["z_jump"], e["x_left_of_jump"], e["x_right_of_jump"], e["jump"], g[1] - g[0],
              e["kr1d_vs_closed_form_max_abs"], e["exact_log_slope_max"]]
             for g, e in zip(cfg["gaps"], exact, strict=True)]),
        "(`KR1D` interpolates the density linearly on a 40001-node grid, so next to the jump it is "
        "off by up to one grid cell. Its slope φ(z)/p(T(z)) is finite on both sides of the jump: "
        "the exact map is not steep there, it is discontinuous — no finite slope bridges the gap. "
        "Only its inverse S floors the log-slope, at about 708, on the gap.)\n",
        "## Leak versus capacity\n",
        "`leak` = Φ(S(b)) − Φ(S(a)), the flow's exact mass in the gap; `in gap (samples)` = "
        "`diagnose`'s valley mass ± se; `dropped` = fraction of all training samples that fell in "
        "the gap and were dropped by `fit`; `train ELBO` = the last logged batch's ELBO over the kept "
        "samples (true log Z = 0.919; above it = the dropped-sample objective rewarding the leak); "
        "KL(p‖q) = EUBO − log Z (finite: exact samples never fall in the gap; KL(q‖p) is +∞ "
        "whenever the leak is > 0; a leak ℓ alone contributes −log(1 − ℓ)). The forward ESS is "
        "blind to the leak: it does not depend on q's normalization, so a flow with 99% of its mass "
        "in the gap and the rest shaped like p scores 1. `flow w₀` counts gap samples too (left of "
        "the gap's midpoint = mode 0). `status`: `collapsed` = every sample of one batch fell in "
        "the gap, so `fit` raised `NonFiniteTargetError` (between the logged step shown and the "
        "next); the row describes the flow as it was then.\n",
        _common.md_table(
            ["gap", "capacity", "objective", "leak", "in gap (samples)", "dropped", "train ELBO",
             "flow w₀", "mode TV", "fwd ESS", "KL(p‖q)", "learned max log T'", "fit s", "status"],
            [[r["gap"], r["capacity"], r["objective"], r["leak"],
              f"{_common.fmt(r['valley_mass'])} ± {_common.fmt(r['valley_mass_se'], 2)}",
              r["dropped_fraction"], r["train_elbo_last"], r["mode_weights"][0], r["mode_tv"],
              r["forward_ess"], r["kl_forward"], r["learned_log_slope_max"], r["fit_seconds"],
              r["status"]] for r in rows]),
    ]
    path.write_text("\n".join(parts))


def plot(path, cfg, exact, rows) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(15, 8))
    gap0, ex0 = cfg["gaps"][0], exact[0]
    colors = {c: f"C{i}" for i, c in enumerate(CAPACITIES)}
    z = Z.numpy()
    for a in ax[0, :2]:
        a.plot(z, ex0["x"], "k-", lw=3, label="exact KR  F⁻¹∘Φ (jumps)")
        a.plot(z, ex0["x_kr1d"], color="0.6", ls="--", lw=1.5, label="KR1D (grid)")
    for r in rows:
        if r["gap"] == list(gap0) and r["objective"] == "drop":
            for a in ax[0, :2]:
                a.plot(z, r["map"], color=colors[r["capacity"]], lw=1.2, label=f"flow, {r['capacity']}")
    best = [r for r in rows if r["gap"] == list(gap0) and r["objective"] == "barrier+anneal"]
    if best:
        for a in ax[0, :2]:
            a.plot(z, best[-1]["map"], color="m", ls="--", lw=1.2,
                   label=f"flow, {best[-1]['capacity']}, barrier+anneal")
    for a in ax[0, :2]:
        a.axhspan(*gap0, color="red", alpha=0.12, label="gap (p = 0)")
        a.set_xlabel("z")
        a.set_ylabel("x = T(z)")
        a.grid(alpha=0.3)
    ax[0, 0].set_title(f"maps z → x, gap {tuple(gap0)} (solid: objective drop)", fontsize=9)
    ax[0, 0].legend(fontsize=7)
    zj = ex0["z_jump"]
    ax[0, 1].set_xlim(zj - 0.4, zj + 0.4)
    ax[0, 1].set_ylim(gap0[0] - 0.8, gap0[1] + 0.8)
    ax[0, 1].set_title("zoom on the jump", fontsize=9)
    ax[0, 2].plot(z, ex0["log_slope"], "k-", lw=2, label="exact (finite off the jump)")
    ax[0, 2].axvline(ex0["z_jump"], color="red", ls=":", label="exact map jumps here (slope ∞)")
    for r in rows:
        if r["gap"] == list(gap0) and r["objective"] == "drop":
            xs = torch.tensor(r["map"])
            slope = torch.gradient(xs, spacing=(Z.float(),))[0].clamp_min(1e-12).log()
            ax[0, 2].plot(z, slope, color=colors[r["capacity"]], lw=1.2, label=f"flow, {r['capacity']}")
    ax[0, 2].set_ylim(-4, 12)
    ax[0, 2].set_title("log T'(z): exact spike vs learned", fontsize=9)
    ax[0, 2].set_xlabel("z")
    ax[0, 2].legend(fontsize=7)
    ax[0, 2].grid(alpha=0.3)
    caps = [c for c in CAPACITIES if c in cfg["capacities"]]
    width = 0.8 / (len(cfg["gaps"]) * len(cfg["objectives"]))
    k = 0
    for g in cfg["gaps"]:
        for obj in cfg["objectives"]:
            vals = [next(r["leak"] for r in rows if r["gap"] == list(g) and r["capacity"] == c
                         and r["objective"] == obj) for c in caps]
            ax[1, 0].bar([i + k * width for i in range(len(caps))], [max(v, 1e-6) for v in vals], width,
                         label=f"gap {tuple(g)}, {obj}", hatch=HATCH[obj])
            k += 1
    ax[1, 0].set_xticks([i + 0.4 - width / 2 for i in range(len(caps))], caps)
    ax[1, 0].set_yscale("log")
    ax[1, 0].set_title("leak = flow mass in the gap (exact, via S)", fontsize=9)
    ax[1, 0].legend(fontsize=7)
    ax[1, 0].grid(alpha=0.3, axis="y")
    for r in rows:
        if r["gap"] == list(gap0):
            steps, leaks = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
            ax[1, 1].plot(steps, leaks, color=colors[r["capacity"]],
                          ls={"drop": "-", "barrier": ":", "barrier+anneal": "--"}[r["objective"]],
                          label=f"{r['capacity']}, {r['objective']}")
    ax[1, 1].set_yscale("log")
    ax[1, 1].set_xlabel("training step")
    ax[1, 1].set_title(f"leak during training, gap {tuple(gap0)}", fontsize=9)
    ax[1, 1].legend(fontsize=6, ncol=2)
    ax[1, 1].grid(alpha=0.3)
    target = GappedMixture1D(SEPARATION, gap0, WEIGHTS, dtype=torch.float64)
    xs = torch.linspace(gap0[0] - 4, gap0[1] + 4, 2001, dtype=torch.float64)
    ax[1, 2].plot(xs, (target.log_prob(xs[:, None]) - target.log_z).exp(), "k-", lw=2, label="target")
    for r in rows:
        if r["gap"] == list(gap0) and r["objective"] == "drop":
            xm = torch.tensor(r["map"], dtype=torch.float64)
            dens = torch.exp(-0.5 * Z**2) / math.sqrt(2 * math.pi) / torch.gradient(xm, spacing=(Z,))[0]
            ax[1, 2].plot(xm, dens, color=colors[r["capacity"]], lw=1.2, label=f"flow, {r['capacity']}")
    if best:
        xm = torch.tensor(best[-1]["map"], dtype=torch.float64)
        dens = torch.exp(-0.5 * Z**2) / math.sqrt(2 * math.pi) / torch.gradient(xm, spacing=(Z,))[0]
        ax[1, 2].plot(xm, dens, color="m", ls="--", lw=1.2,
                      label=f"flow, {best[-1]['capacity']}, barrier+anneal")
    top = 1.6 * float((target.log_prob(xs[:, None]) - target.log_z).exp().max())
    ax[1, 2].set_ylim(0, top)
    ax[1, 2].axvspan(*gap0, color="red", alpha=0.12)
    ax[1, 2].set_xlim(float(xs[0]), float(xs[-1]))
    ax[1, 2].set_title("densities (solid: objective drop; clipped: spikes in the gap go higher)",
                       fontsize=9)
    ax[1, 2].legend(fontsize=7)
    ax[1, 2].grid(alpha=0.3)
    fig.suptitle(f"GappedMixture1D(separation {SEPARATION:g}, weights {WEIGHTS}): "
                 "the exact monotone map jumps; a continuous flow must leak", fontsize=10)
    fig.tight_layout()
    _common.save_figure(fig, path)


def main() -> None:
    _common.setup()
    args = _common.parse_args(__doc__.splitlines()[0])
    cfg = SMOKE if args.smoke else FULL
    start = time.perf_counter()
    exact = [exact_map(GappedMixture1D(SEPARATION, g, WEIGHTS, dtype=torch.float64)) for g in cfg["gaps"]]
    rows = []
    for g in cfg["gaps"]:
        for cap in cfg["capacities"]:
            for obj in cfg["objectives"]:
                rows.append(run_one(g, cap, obj, cfg, args.seed))
                r = rows[-1]
                print(f"gap {g} {cap:<6} {obj:<7} leak {r['leak']:.4f} dropped {r['dropped_fraction']:.4f} "
                      f"train ELBO {r['train_elbo_last']:.3f} w0 {r['mode_weights'][0]:.3f} "
                      f"fwdESS {r['forward_ess']:.3f} ({r['fit_seconds']:.1f}s)", flush=True)
    seconds = time.perf_counter() - start
    _common.save_json({"config": cfg, "capacities": CAPACITIES,
                       "exact": [{k: v for k, v in e.items() if not isinstance(v, list)} for e in exact],
                       "runs": [{k: v for k, v in r.items() if k != "map"} for r in rows],
                       "seconds": seconds}, args.out / "true_gap.json")
    write_markdown(args.out / "true_gap.md", cfg, exact, rows, args.smoke, seconds)
    plot(args.out / "true_gap.png", cfg, exact, rows)
    print(f"wrote {args.out / 'true_gap.md'} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
