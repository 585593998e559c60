"""Builds ``notebooks/03_optimal_transport.ipynb`` (executed, with outputs) from the cells below.

Run ``python experiments/build_notebook_03.py`` (``--no-execute``: without outputs); CI re-executes it, e.g.
``KRFLOWS_NOTEBOOK_STEPS=150 python -m pytest tests/test_notebooks.py -q -k 03``.
"""

from __future__ import annotations

from pathlib import Path

import _common

PATH = Path(__file__).resolve().parent.parent / "notebooks" / "03_optimal_transport.ipynb"

CELLS: list[tuple[str, str]] = [
    ("md", r"""# Optimal transport around a KR flow

A KR flow is one transport map `T: z -> x` from `N(0, I)` to the target: the monotone
*triangular* one. Optimal transport offers others, and tools around them. This notebook tours
`krflows.ot`:

1. the closed-form `W₂` between Gaussians, and the **Brenier** map that attains it, against the
   **KR** map (same pushforward, higher cost, triangular instead of symmetric Jacobian);
2. **displacement interpolation** `T_t = (1 − t) Id + t T` and `flow.interpolate(t)`: a W₂
   geodesic for Brenier, not for KR; exact densities along the way;
3. **entropic OT** between sample sets (POT): the Sinkhorn plan, the Sinkhorn divergence, the
   barycentric map, and a plan that splits mass where no map can;
4. **Langevin** particles (ULA, MALA), the discretized W₂ gradient flow of KL, next to a trained flow.

Costs are the squared Euclidean distance (the background text's `½|x − y|²` halves every cost
and ε). The experiments `experiments/ot_*.py` do each part at full size, with tables."""),
    ("code", r"""%matplotlib inline
import os
import warnings

import matplotlib.pyplot as plt
import torch

import krflows
from krflows.exact import gaussian_brenier_map, gaussian_kr_map
from krflows.ot import (
    affine_transport_cost,
    barycentric_map,
    entropic_ot_gaussian,
    interpolate_affine,
    mala,
    sinkhorn_divergence,
    sinkhorn_plan,
    ula,
    wasserstein2_gaussian,
)

torch.set_num_threads(1)
torch.manual_seed(0)
STEPS = int(os.environ.get("KRFLOWS_NOTEBOOK_STEPS", "400"))  # CI runs this with fewer
# warnings as one line, without the source path (Sinkhorn reports its unconverged small-eps runs)
warnings.formatwarning = lambda message, category, *args, **kwargs: f"{category.__name__}: {message}\n"
F64 = torch.float64"""),
    ("md", r"""## 1. KR versus Brenier on a correlated Gaussian

Target `N(m, Σ)` with correlation 0.8 and scales 1 and 2. The KR map is `m + L z` (Cholesky),
the Brenier map `m + Σ^½ z`. Both push `N(0, I)` onto the target; only Brenier's transport cost
`E|T(z) − z|²` equals `W₂²`."""),
    ("code", r"""m = torch.tensor([1.0, -0.5], dtype=F64)
S = torch.tensor([[1.0, 1.6], [1.6, 4.0]], dtype=F64)
zero, eye = torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64)
kr, brenier = gaussian_kr_map(m, S), gaussian_brenier_map(m, S)
w2sq = wasserstein2_gaussian(zero, eye, m, S, squared=True)
print(f"W2^2 closed form       {w2sq:.6f}")
print(f"Brenier cost (exact)   {affine_transport_cost(brenier, zero, eye):.6f}")
print(f"KR cost (exact)        {affine_transport_cost(kr, zero, eye):.6f}")
z = torch.randn(200_000, 2, dtype=F64)
for name, T in (("KR", kr), ("Brenier", brenier)):
    x = T(z)
    c = ((x - z) ** 2).sum(-1)
    print(f"{name:8s} MC cost {c.mean():.4f} ± {c.std() / len(c) ** 0.5:.4f}, "
          f"cov error {(torch.cov(x.T) - S).abs().max():.4f}")
print("Jacobians:", kr.tril.tolist(), brenier.matrix.tolist())"""),
    ("code", r"""fig, ax = plt.subplots(1, 2, figsize=(10, 4.5))
u = torch.linspace(-2, 2, 9, dtype=F64)
fine = torch.linspace(-2, 2, 101, dtype=F64)
marks = torch.tensor([[1.5, 0.0], [0.0, 1.5], [-1.5, 0.0], [0.0, -1.5]], dtype=F64)
for a, (name, T) in zip(ax, (("KR (triangular)", kr), ("Brenier (symmetric)", brenier)), strict=True):
    for v in u:
        c = v.expand_as(fine)
        for line in (torch.stack([fine, c], -1), torch.stack([c, fine], -1)):
            xy = T(line)
            a.plot(xy[:, 0], xy[:, 1], color="0.6", lw=0.7)
    p = T(marks)
    a.scatter(p[:, 0], p[:, 1], c=["C3", "C2", "C1", "C4"], zorder=3)
    a.set_title(name)
    a.set_aspect("equal")
plt.show()"""),
    ("md", r"""A KR flow trained by reverse KL finds the **KR** map pointwise (the monotone triangular map
is unique), not Brenier:"""),
    ("code", r"""flow = krflows.KRFlow(2, family="spline", layers=2, hidden=(32, 32))
target = krflows.targets.Gaussian(m.float(), S.float())
krflows.fit(flow, target, steps=STEPS, batch_size=256, lr=3e-3, log_every=max(STEPS // 4, 1), progress=True)
with torch.no_grad():
    zf = torch.randn(5000, 2)
    xf = flow(zf).double()
rms = lambda a, b: float(((a - b) ** 2).sum(-1).mean().sqrt())  # noqa: E731
print(f"RMS |T_flow - T_KR|      = {rms(xf, kr(zf.double())):.4f}")
print(f"RMS |T_flow - T_Brenier| = {rms(xf, brenier(zf.double())):.4f}")"""),
    ("md", r"""## 2. Displacement interpolation

`T_t = (1 − t) Id + t T` pushes `N(0, I)` to `μ_t`. For Gaussians `μ_t` is Gaussian, so
`W₂(μ₀, μ_t)` is exact: for Brenier it equals `t W₂(μ₀, μ₁)` (a geodesic), for KR it does not."""),
    ("code", r"""w2 = wasserstein2_gaussian(zero, eye, m, S)
for t in (0.25, 0.5, 0.75):
    out = []
    for T in (brenier, kr):
        Tt = interpolate_affine(T, t)
        B = Tt.matrix if hasattr(Tt, "matrix") else Tt.tril
        out.append(float(wasserstein2_gaussian(zero, eye, Tt.shift, B @ B.T)))
    print(f"t = {t}: t*W2 = {t * w2:.6f}, Brenier path {out[0]:.6f}, KR path {out[1]:.6f}")"""),
    ("md", r"""`flow.interpolate(t)` is the same construction for a trained flow, with an exact `log_prob`
(the inverse of `T_t` is found by root finding). On a banana target its intermediate laws are a
path from the reference to the posterior — e.g. for annealing."""),
    ("code", r"""banana = krflows.targets.Banana(curvature=0.4, scale=2.0)
bflow = krflows.KRFlow(2, family="spline", layers=2, hidden=(32, 32))
krflows.fit(bflow, banana, steps=STEPS, batch_size=256, lr=3e-3, log_every=max(STEPS // 4, 1), progress=True)
g0, g1 = torch.linspace(-6.5, 6.5, 70), torch.linspace(-4.5, 8, 70)
X = torch.cartesian_prod(g0, g1)
area = float((g0[1] - g0[0]) * (g1[1] - g1[0]))
fig, ax = plt.subplots(1, 5, figsize=(18, 3.8))
with torch.no_grad():
    for a, t in zip(ax, (0.0, 0.25, 0.5, 0.75, 1.0), strict=True):
        dens = bflow.interpolate(t).log_prob(X).exp().reshape(70, 70)
        a.contourf(g0, g1, dens.T, levels=12)
        a.set_title(f"t = {t}, mass on grid {dens.sum() * area:.3f}")
        a.set_aspect("equal")
plt.show()"""),
    ("md", r"""## 3. Entropic OT between samples

`sinkhorn_plan` couples reference draws to exact target draws with entropy ε (POT). Small ε: a
sharp plan close to a map (slow, noisy); large ε: the independent coupling, and the
barycentric map `E[y | x]` collapses to the target mean. The Sinkhorn divergence
`S_ε = OT_ε(x, y) − ½ OT_ε(x, x) − ½ OT_ε(y, y)` between Gaussian samples is compared with its
closed form `entropic_ot_gaussian(..., debiased=True)` and with `W₂²`."""),
    ("code", r"""x = torch.randn(300, 2, dtype=F64)
x[0] = 0.0
y = kr(torch.randn(300, 2, dtype=F64))
exact_map = brenier(x)
print(f"W2^2 = {w2sq:.4f}")
for eps in (0.1, 1.0, 10.0, 100.0):
    P = sinkhorn_plan(x, y, eps)
    T_hat = barycentric_map(x, y, P)
    print(f"eps {eps:6g}: S_eps {sinkhorn_divergence(x, y, eps):.4f} "
          f"(closed form {entropic_ot_gaussian(zero, eye, m, S, eps, debiased=True):.4f}), "
          f"barycentric map RMSE vs Brenier {rms(T_hat, exact_map):.3f}, "
          f"distance to the mean {rms(T_hat, m.expand_as(T_hat)):.3f}")"""),
    ("md", r"""On a bimodal target, the reference point at the origin sits between the modes: its plan row
splits its mass between both, which no map can do (a map sends it to one point), and the
barycentric map sends it into the valley, where the target has no mass."""),
    ("code", r"""bimodal = krflows.targets.Bimodal2D(separation=5.0, dtype=F64)
yb = bimodal.sample((300,))
fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
for a, eps in zip(ax, (0.3, 3.0, 30.0), strict=True):
    P = sinkhorn_plan(x, yb, eps)
    row = P[0] / P[0].sum()
    T_hat = barycentric_map(x, yb, P)
    a.scatter(yb[:, 0], yb[:, 1], s=4, color="0.7")
    a.scatter(T_hat[:, 0], T_hat[:, 1], s=5, color="C0")
    a.scatter(yb[:, 0], yb[:, 1], s=300 * row / row.max(), facecolors="none", edgecolors="C3")
    a.plot(*T_hat[0].tolist(), "*", color="C3", ms=14, mec="k")
    left = float(row[yb[:, 0] < 0].sum())
    a.set_title(f"eps = {eps}: x0 sends {left:.2f} left, {1 - left:.2f} right")
    a.set_aspect("equal")
plt.show()"""),
    ("md", r"""## 4. Langevin particles versus the flow

ULA `x ← x + h ∇log p + √(2h) ξ` discretizes the Langevin diffusion, whose law follows the W₂
gradient flow of `KL(· ‖ p)`; MALA adds a Metropolis correction. Both run on a cloud of
particles; the Sinkhorn divergence to exact samples tracks their convergence, next to the flow
trained above on the same banana."""),
    ("code", r"""exact = banana.sample((400,)).double()
xs = {"ULA h=0.05": 2 * torch.randn(1000, 2, dtype=F64), "MALA h=0.05": 2 * torch.randn(1000, 2, dtype=F64)}
target64 = krflows.targets.Banana(curvature=0.4, scale=2.0, dtype=F64)
checkpoints = [0, 10, 50, max(STEPS // 2, 60)]
for name in xs:
    done, line = 0, []
    for k in checkpoints:
        run = ula if name.startswith("ULA") else mala
        if k > done:
            out = run(target64, xs[name], 0.05, k - done)
            xs[name], done = out.x, k
        line.append(f"{k}: {sinkhorn_divergence(xs[name][:400], exact, 0.5, tol=1e-6):.3f}")
    print(name, " | ".join(line), f"(acceptance {out.acceptance:.2f})")
with torch.no_grad():
    xf = bflow.sample((400,)).double()
other = banana.sample((400,)).double()
print(f"flow after {STEPS} steps: {sinkhorn_divergence(xf, exact, 0.5, tol=1e-6):.3f}; "
      f"floor (exact vs exact) {sinkhorn_divergence(other, exact, 0.5, tol=1e-6):.3f}")
print("variances: true [4, 6.12]; ULA", torch.var(xs["ULA h=0.05"], 0).tolist(),
      "MALA", torch.var(xs["MALA h=0.05"], 0).tolist())"""),
    ("md", r"""## Summary

* `wasserstein2_gaussian` and `gaussian_brenier_map`: the Brenier map attains `W₂²`; the KR map
  has the same pushforward and a higher cost, and a trained KR flow converges to the KR map.
* `interpolate_affine` / `flow.interpolate(t)`: a geodesic for Brenier, a (non-geodesic) path
  of triangular pushforwards for KR, with exact densities.
* `sinkhorn_plan`, `sinkhorn_divergence`, `barycentric_map`, `entropic_ot_gaussian`: ε trades
  sharpness and noise against blur; a plan can split mass between modes, a map cannot.
* `ula`, `mala`: particle dynamics converging to the target (ULA with an `O(h)` bias), slow to
  move mass between separated modes.

Full-size versions with tables: `experiments/ot_kr_vs_brenier.py`, `ot_geodesic.py`,
`ot_sinkhorn_eps.py`, `ot_langevin.py`."""),
]


if __name__ == "__main__":
    _common.write_notebook(CELLS, PATH)
