r"""Mode-covering defaults: which warm-up/training default of ``fit`` keeps separated modes?

The old default of :func:`krflows.fit` (Gaussian-VI warm-up of the affine stage at ``β = 1``,
then reverse KL) locks onto one mode of a multimodal target and never finds the others.
This script fits ``KRFlow(d)`` with ``fit``'s defaults otherwise (4 spline layers, hidden
(64, 64), 2000 steps at B = 256, lr 1e-3) to a plain callable ``log p`` under these designs:

* ``old``: the old default, ``fit(..., modes=None)``;
* ``anneal``: tempering alone, ``fit(..., modes=None, anneal=0.5)`` (``β`` 0.1 → 1 over half
  the run, the warm-up on ``p^0.1``);
* ``search-init``: a start from the mode search, then reverse KL alone: tempered warm-up,
  :func:`krflows.correct.find_modes`, affine stage at the modes' Laplace mixture's moments,
  200 steps of pre-training of the whole flow by importance-weighted forward KL from that
  mixture (:func:`krflows.train.defensive_kl`), then plain reverse KL (the defensive term's
  weight patched to 0);
* ``default``: the new default, ``fit(...)``: tempered warm-up, mode search, affine stage at
  the mixture's moments, no pre-training; the joint phase adds the defensive forward-KL term
  with a weight decaying linearly from 1 to 0;
* ``default-3000``: ``default`` with 3000 joint steps instead of 2000 (the goal allows either);
* ``pretrain+defensive``: both: the 200 pre-training steps and the decaying defensive term;
* ``defensive-B/4``: as ``default`` with the defensive term on a quarter of the batch (64
  draws of the mixture per step): its ``log q`` needs the flow's inverse, which makes a
  ``default`` step about 2.7 times as long as a reverse-KL step (interleaved timing, 2-D).

Targets (all handed to ``fit`` as plain callables, so no target knowledge leaks in):

* ``two-mode``: ``Bimodal2D(separation=8, weights=[0.3, 0.7])``, modes (±4, 0), unit sd;
* ``four-mode``: unit-sd Gaussians at the corners of a square of side 9 (neighbours 9 sd
  apart): (−4.5, −4.5), (4.5, −4.5), (−4.5, 4.5), (4.5, 4.5) with weights 0.1, 0.2, 0.3, 0.4;
* ``four-line``: the same four unit-sd components on a line, 9 sd apart: x_0 = −13.5, −4.5,
  4.5, 13.5 (x_1 = 0), weights 0.1, 0.2, 0.3, 0.4 (all the splitting in the first coordinate);
* ``banana``: ``Banana()`` (2-D); ``funnel-10``: ``Funnel(dim=10)``: unimodal, ESS/N only;
* ``cli-bimodal``: the ``krflows fit`` default job (``Bimodal2D`` 7 sd apart, 0.3/0.7, the
  CLI's flow 2 × (32, 32), lr 3e-3, ``anneal=0.5``) through :class:`KRFlowModule` and a
  Lightning ``Trainer(max_steps=2000)``: ``old`` is ``modes=None`` (the CLI before this
  change), ``default`` the module's new default.

Mode weights: flow samples (20000) assigned to the mixture component of highest
responsibility; TV = ½ Σ |w − w_true|. ESS/N: normalized importance ESS of 20000 fresh flow
samples (blind to missing modes). Seconds: wall time of the whole fit (warm-up, mode search,
pre-training, joint phase) on 2 CPU cores shared with other jobs (inflated by contention).

Each (design, target, seed) cell is stored in ``mode_covering_defaults.json`` as it finishes,
so runs can be split (``--designs``, ``--targets``) and resumed; the .md is rebuilt from all
stored cells. Run ``python experiments/mode_covering_defaults.py`` (full, about an hour of
CPU) or ``--smoke --out DIR``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import time
from pathlib import Path

import _common
import torch

import krflows
from krflows.diagnostics import ess
from krflows.targets import Banana, Bimodal2D, Funnel, GaussianMixture

NAME = "mode_covering_defaults"
DESIGNS = ("old", "anneal", "search-init", "default", "default-3000", "pretrain+defensive", "defensive-B/4")
TARGETS = ("two-mode", "four-mode", "four-line", "banana", "funnel-10", "cli-bimodal")
GRID = {  # target -> designs run on it (the unimodal ones only need old vs new)
    "two-mode": DESIGNS, "four-mode": DESIGNS, "four-line": ("old", "anneal", "search-init",
                                                                 "default", "default-3000", "defensive-B/4"),
    "banana": ("old", "default"),
    "funnel-10": ("old", "default"), "cli-bimodal": ("old", "default")}
FULL = {"steps": 2000, "batch_size": 256, "n_eval": 20000, "seeds": (0, 1, 2)}
SMOKE = {"steps": 30, "batch_size": 64, "n_eval": 2000, "seeds": (0,)}
kfit = importlib.import_module("krflows.fit")  # the module (``krflows.fit`` is the function)
PRETRAIN = 200  # forward-KL pre-training steps of the "search-init" and "pretrain+defensive" designs
NOTES = (
    "Provenance: the recorded run was split into parts (`--designs`/`--targets`) under changing "
    "load. The `default` cells of two-mode, four-mode and cli-bimodal ran at commit 10aff54, "
    "before the mode search moved to a forked random stream (the same algorithm, other random "
    "draws); every other cell ran at the committed code. With one mode the default is the old "
    "fit draw for draw (banana and funnel-10 rows: identical ESS). Cost, interleaved (2-D, "
    "B = 256, 25-step blocks, median of 6): a reverse-KL step 53 ms, a step with the defensive "
    "term 141 ms (2.7x); find_modes 0.1-0.3 s; the tempered warm-up `min(200, steps // 5)` "
    "affine steps.")
SQUARE = [[-4.5, -4.5], [4.5, -4.5], [-4.5, 4.5], [4.5, 4.5]]
LINE = [[-13.5, 0.0], [-4.5, 0.0], [4.5, 0.0], [13.5, 0.0]]


def make_target(name: str):
    if name == "two-mode":
        return Bimodal2D(separation=8.0, weights=[0.3, 0.7])
    if name == "four-mode":
        return GaussianMixture(SQUARE, weights=[0.1, 0.2, 0.3, 0.4])
    if name == "four-line":
        return GaussianMixture(LINE, weights=[0.1, 0.2, 0.3, 0.4])
    if name == "banana":
        return Banana()
    if name == "funnel-10":
        return Funnel(dim=10)
    if name == "cli-bimodal":
        return Bimodal2D(separation=7.0, weights=[0.3, 0.7])
    raise ValueError(name)


def fit_design(design: str, flow, log_p, steps: int, batch_size: int) -> dict:
    """Runs ``fit`` under ``design``; returns the history."""
    if design == "default-3000":
        steps = steps * 3 // 2
    # lr pinned at 1e-3, the rate of every design in these results (since then fit's default
    # is 3e-3 when the start finds one mode: krflows.fit.DEFAULT_LR)
    kw: dict = {"steps": steps, "batch_size": batch_size, "lr": 1e-3, "log_every": max(1, steps // 10)}
    if design == "old":
        return krflows.fit(flow, log_p, modes=None, **kw)
    if design == "anneal":
        return krflows.fit(flow, log_p, modes=None, anneal=0.5, **kw)
    saved = kfit.defensive_weight, kfit.warm_start, kfit.defensive_kl
    if design == "defensive-B/4":
        kfit.defensive_kl = lambda flow, target, mixture, n, nan="error": saved[2](
            flow, target, mixture, max(1, n // 4), nan)
    if design == "search-init":
        kfit.defensive_weight = lambda step, steps: 0.0
    if design in ("search-init", "pretrain+defensive"):
        kfit.warm_start = functools.partial(saved[1], pretrain=PRETRAIN)
    try:
        return krflows.fit(flow, log_p, **kw)
    finally:
        kfit.defensive_weight, kfit.warm_start, kfit.defensive_kl = saved


def fit_cli(design: str, seed: int, steps: int, batch_size: int):
    """The ``krflows fit`` default job (its DEFAULTS) through KRFlowModule and a Trainer."""
    import lightning as L

    from krflows.cli import DEFAULTS
    from krflows.lightning import KRFlowModule

    model = {k.split(".", 1)[1]: v for k, v in DEFAULTS.items() if k.startswith("model.")}
    model.update(seed=seed, batch_size=batch_size)
    if design == "old":
        model["modes"] = None
    module = KRFlowModule(**model)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=10.0, accelerator="cpu", devices=1)
    trainer.fit(module)
    return module


def run_cell(design: str, name: str, seed: int, cfg: dict) -> dict:
    target = make_target(name)
    torch.manual_seed(seed)
    start = time.perf_counter()
    modes = None
    if name == "cli-bimodal":
        module = fit_cli(design, seed, cfg["steps"], cfg["batch_size"])
        flow, modes = module.flow, (0 if module.mixture is None else module.mixture.k)
    else:
        flow = krflows.KRFlow(target.dim)

        def log_p(x):  # a plain callable: fit sees no dim, modes or weights
            return target.log_prob(x)

        history = fit_design(design, flow, log_p, cfg["steps"], cfg["batch_size"])
        modes = history.get("modes", [None])[0]
    seconds = time.perf_counter() - start
    torch.manual_seed(10_000 + seed)
    with torch.no_grad():
        x, log_q = flow.rsample_and_log_prob((cfg["n_eval"],))
        log_w = target.log_prob(x) - log_q
    log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))
    row = {"design": design, "target": name, "seed": seed, "seconds": seconds,
           "ess": float(ess(log_w)), "modes_used": modes}
    if isinstance(target, GaussianMixture):
        w = torch.bincount(target.assign(x), minlength=target.n_components).double() / x.shape[0]
        row["weights"] = w.tolist()
        row["true_weights"] = target.weights.tolist()
        row["tv"] = 0.5 * float((w - target.weights).abs().sum())
    return row


def key(row: dict) -> str:
    return f"{row['design']}|{row['target']}|{row['seed']}"


def _tv(v):
    return None if v is None else f"{v:.4f}"


def write_md(cells: dict, out: Path, smoke: bool, seconds: float | None) -> None:
    rows = sorted(cells.values(), key=lambda r: (TARGETS.index(r["target"]), DESIGNS.index(r["design"]),
                                                 r["seed"]))
    table = [[r["target"], r["design"], r["seed"],
              _common.fmt(r.get("weights")) if "weights" in r else "–",
              _tv(r.get("tv")), r["ess"], r.get("modes_used"), r["seconds"]] for r in rows]
    summary = []
    for t in TARGETS:
        for d in DESIGNS:
            rs = [r for r in rows if r["target"] == t and r["design"] == d]
            if not rs:
                continue
            tvs = [r["tv"] for r in rs if "tv" in r]
            summary.append([t, d, len(rs), _tv(max(tvs)) if tvs else None, min(r["ess"] for r in rs),
                            sum(r["seconds"] for r in rs) / len(rs)])
    text = ["# Mode-covering defaults of `krflows.fit`\n", _common.environment(smoke, seconds), "",
            "Designs and targets: see the script's docstring (`experiments/mode_covering_defaults.py`). "
            f"Budget: {'SMOKE' if smoke else '2000'} joint steps at B = 256, `KRFlow(d)` defaults; "
            "seconds are wall times of the whole fit under CPU contention (2 cores shared by several jobs).",
            "Goals (default path): two-mode weights within 0.1 of 0.3/0.7 (TV ≤ 0.1), four-mode TV ≤ 0.1, "
            "banana ESS/N ≥ 0.9, funnel-10 ESS/N ≥ 0.8.", "", NOTES, "",
            "## Summary (worst seed)\n",
            _common.md_table(["target", "design", "seeds", "max TV", "min ESS/N", "mean seconds"], summary),
            "## Every seed\n",
            "`modes` is the number of modes the defensive term covers (0: one or none found, plain path).\n",
            _common.md_table(["target", "design", "seed", "mode weights", "TV", "ESS/N", "modes", "seconds"],
                             table)]
    (out / f"{NAME}.md").write_text("\n".join(text))


def plot(cells: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, t in zip(axes, ("two-mode", "four-mode", "four-line"), strict=True):
        for i, d in enumerate(DESIGNS):
            tvs = [r["tv"] for r in cells.values() if r["target"] == t and r["design"] == d]
            ax.scatter([i] * len(tvs), tvs, color="C0")
        ax.axhline(0.1, color="k", ls=":", lw=1)
        ax.set_xticks(range(len(DESIGNS)), DESIGNS, rotation=30, fontsize=8)
        ax.set_title(f"{t}: TV of mode weights (each seed)", fontsize=9)
        ax.set_ylim(-0.02, 0.75)
    fig.tight_layout()
    _common.save_figure(fig, out / f"{NAME}.png")


def main() -> None:
    _common.setup()
    parser_args = _parse()
    cfg = SMOKE if parser_args.smoke else FULL
    path = parser_args.out / f"{NAME}.json"
    cells = {} if not path.exists() else {key(r): r for r in _common.load_json(path)["cells"]}
    start = time.perf_counter()
    if not parser_args.replot:
        for name in parser_args.targets:
            for design in GRID[name]:
                if design not in parser_args.designs:
                    continue
                for seed in cfg["seeds"]:
                    k = f"{design}|{name}|{seed + parser_args.seed}"
                    if k in cells and not parser_args.fresh:
                        continue
                    row = run_cell(design, name, seed + parser_args.seed, cfg)
                    cells[key(row)] = row
                    print(f"{name:12s} {design:16s} seed {row['seed']}  tv {_common.fmt(row.get('tv'))}  "
                          f"w {_common.fmt(row.get('weights'))}  ess {row['ess']:.3f}  "
                          f"modes {row['modes_used']}  {row['seconds']:.0f}s", flush=True)
                    _common.save_json({"config": cfg, "cells": list(cells.values())}, path)
    write_md(cells, parser_args.out, parser_args.smoke,
             None if parser_args.replot else time.perf_counter() - start)
    plot(cells, parser_args.out)
    print(f"wrote {parser_args.out / NAME}.md")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny budget (seconds)")
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    parser.add_argument("--seed", type=int, default=0, help="offset added to the seeds 0, 1, 2")
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--fresh", action="store_true", help="recompute the selected cells even if stored")
    parser.add_argument("--replot", action="store_true", help="no fitting: rebuild .md/.png from .json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    return args


if __name__ == "__main__":
    main()
