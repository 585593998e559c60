r"""Time to quality: wall seconds of training until ESS/N >= 0.8, each library at its defaults.

What a user feels is not the step time but how long training takes until the flow is good.
Here "good" is a normalized importance effective sample size of at least 0.8: ESS/N
(:func:`krflows.diagnostics.ess`, :math:`(\sum w)^2 / (N \sum w^2)`, :math:`w = \tilde p / q`)
of ``N`` fresh samples of the flow, in the target's (unconstrained) coordinates. Each library
is run the way its documentation shows a new user (see ``LIBRARIES`` and
``benchmarks/README.md``), on banana (``krflows.targets.Banana()``), funnel-10
(``krflows.targets.Funnel(10)``) and eight schools (the non-centred Pyro model, on its
unconstrained latent space, d = 10).

The clock runs only while a library trains: it stops while the flow is evaluated and restarts
after. Evaluations come every tenth of the training time so far (``RESOLUTION``), at least
``MIN_INTERVAL`` and at most ``interval`` seconds apart: a reported time is at most ~10% (and
0.1 s) above the step where the flow crossed, so that fast targets are resolved (with a fixed
0.4 s, banana's ~1 s runs all read 1.2 or 1.6 s). A crossing of 0.8 is confirmed
on a second, independent draw of ``4 N`` samples before it counts (ESS/N of a finite sample
overestimates the truth when the weights are heavy tailed). Each run stops at the crossing
or after ``--budget`` seconds of training, whichever comes first; a run that does not get
there is reported as "not reached in X s" with its best ESS/N.

Writes ``benchmarks/RESULTS_ttq.md`` (table, machine, threads, load average, versions,
command) and ``benchmarks/time_to_quality.png`` (ESS/N against training seconds).

Usage::

    python benchmarks/bench_time_to_quality.py               # full run: 3 targets x 4 libraries, < 10 min
    python benchmarks/bench_time_to_quality.py --smoke --out /tmp/ttq     # seconds; the CI test
    python benchmarks/bench_time_to_quality.py --targets banana --libs krflows,zuko --budget 20
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

import krflows
from krflows.diagnostics import ess

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import machine_info, versions  # noqa: E402 - the sibling script's report helpers

THRESHOLD = 0.8
RESOLUTION = 0.1  # evaluations every tenth of the training time so far ...
MIN_INTERVAL = 0.1  # ... at least this many training seconds apart
EVAL_SEED = 1_000_003  # the evaluations' own random stream (see Tracker.ess)
LIBRARIES = ("krflows", "zuko", "nflows", "pyro")
TARGETS = ("banana", "funnel-10", "eight-schools")
BATCH = 256  # krflows.fit's default batch, and zuko's reverse-KL tutorial's

# What each library's run is: shown in the report (the defaults a new user starts from)
RECIPES = {
    "krflows": "`krflows.fit(KRFlow(d), target)`: every default (2000 steps, batch 256, lr 3e-3 "
               "(1e-3 with several modes) cosine-decayed, affine warm-up and mode search, gradient clipping)",
    "zuko": "`NSF(d)` (3 transforms, hidden (64, 64), 8 bins), inverted as in zuko's reverse-KL "
            "tutorial (`Flow(flow.transform.inv, flow.base)`, one pass to sample), Adam lr 1e-3, batch 256, "
            "loss `log q(x).mean() - log p(x).mean()`",
    "nflows": "3 x [`MaskedPiecewiseRationalQuadraticAutoregressiveTransform(d, 64, tails='linear', "
              "tail_bound=5)` (its defaults: 10 bins, 2 residual blocks) + `ReversePermutation`], the whole "
              "transform inverted to sample in one pass, `StandardNormal` base, `torch.optim.Adam` default "
              "lr 1e-3, batch 256",
    "pyro": "`AutoIAFNormal(model)` (its defaults: one IAF, hidden 3d + 10) under "
            "`SVI(model, guide, Adam({'lr': 1e-2}), Trace_ELBO())` (one particle; lr 0.01 as in Pyro's "
            "NeuTra example); banana and funnel as a model of `ImproperUniform` + `pyro.factor`",
}


# ============================================================================ targets
Y8 = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
S8 = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(y: Tensor, sigma: Tensor) -> None:
    """The non-centred eight-schools model (Rubin 1981; Gelman et al., BDA)."""
    import pyro
    import pyro.distributions as dist

    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", y.shape[-1]):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * theta_tilde, sigma), obs=y)


@dataclass
class Problem:
    """A target as every library sees it: ``log_prob`` on ``(n, d)`` points of the space the
    flows live in, and a Pyro model (with its arguments) whose flat unconstrained latent is
    that same space, in the same order."""

    name: str
    dim: int
    log_prob: Callable[[Tensor], Tensor]
    model: Callable[..., None]
    model_args: tuple = ()


def density_model(log_prob: Callable[[Tensor], Tensor], dim: int) -> Callable[[], None]:
    """A Pyro model with the unnormalized density ``log_prob`` on ``R^dim``: one site ``x`` with
    a standard normal "prior" and a ``pyro.factor`` of ``log_prob(x) - log N(x; 0, I)``, so the
    joint density is exactly ``log_prob``. (An ``ImproperUniform`` site would need a non-default
    ``init_loc_fn``: AutoIAFNormal's default initialisation samples the prior.)"""
    import pyro
    import pyro.distributions as dist

    def model() -> None:
        prior = dist.Normal(torch.zeros(dim), 1.0).to_event(1)
        x = pyro.sample("x", prior)
        pyro.factor("log_p", log_prob(x) - prior.log_prob(x))

    return model


def make_problem(name: str) -> Problem:
    if name == "banana":
        target = krflows.targets.Banana()
    elif name == "funnel-10":
        target = krflows.targets.Funnel(10)
    elif name == "eight-schools":
        potential = krflows.pyro.potential_from_model(eight_schools, Y8, S8)
        return Problem(name, potential.dim, potential, eight_schools, (Y8, S8))
    else:
        raise ValueError(f"target must be one of {TARGETS}, got {name!r}")
    return Problem(name, target.dim, target, density_model(target.log_prob, target.dim))


# ============================================================================ the clock
class Clock:
    """Training seconds: a stopwatch that is paused while the flow is evaluated."""

    def __init__(self):
        self.total, self.since = 0.0, None

    def start(self) -> None:
        self.since = time.perf_counter()

    def stop(self) -> None:
        self.total += time.perf_counter() - self.since
        self.since = None

    def seconds(self) -> float:
        return self.total + (0.0 if self.since is None else time.perf_counter() - self.since)


@dataclass
class Run:
    library: str
    target: str
    budget: float
    seconds: float = math.nan  # training seconds at the confirmed crossing (nan: not reached)
    steps: int = 0  # optimizer steps at the crossing, else in all
    trained: float = 0.0  # training seconds in all
    evaluation: float = 0.0  # wall seconds spent evaluating (not on the clock)
    curve: list[tuple[float, int, float]] = field(default_factory=list)  # (seconds, steps, ESS/N)
    confirmed: float = math.nan  # ESS/N of the confirmation draw at the crossing
    note: str = ""

    @property
    def reached(self) -> bool:
        return math.isfinite(self.seconds)

    @property
    def best(self) -> float:
        values = [e for _, _, e in self.curve if math.isfinite(e)]
        return max(values) if values else math.nan


class Stop(Exception):
    """Ends a run from inside a library's training loop (krflows.fit's callback)."""


class Tracker:
    """Evaluates ESS/N every ``interval`` training seconds, with the clock stopped, and decides
    when a run ends: a confirmed crossing, the budget, or a flow with no finite weight."""

    def __init__(self, run: Run, problem: Problem, n: int, interval: float):
        self.run, self.problem, self.n, self.interval = run, problem, n, interval
        self.clock, self.next = Clock(), min(interval, MIN_INTERVAL)
        self.sample: Callable[[int], tuple[Tensor, Tensor]] | None = None  # set by the library's runner

    @torch.no_grad()
    def ess(self, n: int) -> float:
        # on a random stream of its own: drawn from the training's, the evaluations (which come
        # at clock-dependent steps) would change the training's later draws, and so the result
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(EVAL_SEED + len(self.run.curve))
            x, log_q = self.sample(n)
            log_w = self.problem.log_prob(x) - log_q
        log_w = torch.where(torch.isfinite(log_w), log_w, -math.inf)  # NaN / inf: weight 0
        return float(ess(log_w)) if bool(torch.isfinite(log_w).any()) else math.nan

    def check(self, steps: int) -> bool:
        """After a training step: evaluates when due; True when the run is over."""
        now = self.clock.seconds()
        over = now >= self.run.budget
        if now < self.next and not over:
            return False
        self.clock.stop()
        started = time.perf_counter()
        self.next = now + min(self.interval, max(MIN_INTERVAL, RESOLUTION * now))
        value = self.ess(self.n)
        self.run.curve.append((now, steps, value))
        done = over
        if math.isnan(value):
            self.run.note, done = "no finite importance weight (diverged)", True
        elif value >= THRESHOLD:
            confirmed = self.ess(4 * self.n)
            if confirmed >= THRESHOLD:
                self.run.seconds, self.run.confirmed, done = now, confirmed, True
        self.run.steps, self.run.trained = steps, now
        self.run.evaluation += time.perf_counter() - started
        if not done:
            self.clock.start()
        return done


# ============================================================================ the libraries
def run_krflows(problem: Problem, tracker: Tracker, steps: int | None = None) -> None:
    """``krflows.fit(KRFlow(d), target)`` with every default (``steps``: only for ``--smoke``)."""
    flow = krflows.KRFlow(problem.dim)
    tracker.sample = lambda n: flow.rsample_and_log_prob((n,))
    tracker.clock.start()

    def callback(step: int, record: dict) -> None:
        if tracker.check(step):
            raise Stop

    try:
        if steps is None:
            krflows.fit(flow, problem.log_prob, callback=callback)
        else:
            krflows.fit(flow, problem.log_prob, steps=steps, callback=callback)
    except Stop:
        return
    tracker.clock.stop()
    tracker.run.trained = tracker.clock.seconds()
    tracker.run.note = tracker.run.note or f"fit() ended its {steps or 2000} steps"


def _loop(tracker: Tracker, step: Callable[[], None]) -> None:
    tracker.clock.start()
    steps = 0
    while True:
        step()
        steps += 1
        if tracker.check(steps):
            return


def _adam_loop(tracker: Tracker, problem: Problem, params, rsample_and_log_prob, lr: float = 1e-3) -> None:
    opt = torch.optim.Adam(params, lr=lr)

    def step() -> None:
        x, log_q = rsample_and_log_prob(BATCH)
        loss = log_q.mean() - problem.log_prob(x).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    _loop(tracker, step)


def run_zuko(problem: Problem, tracker: Tracker) -> None:
    import zuko

    nsf = zuko.flows.NSF(problem.dim)
    flow = zuko.flows.Flow(nsf.transform.inv, nsf.base)  # as zuko's reverse-KL tutorial

    def sample(n: int) -> tuple[Tensor, Tensor]:
        return flow().rsample_and_log_prob((n,))

    tracker.sample = sample
    _adam_loop(tracker, problem, flow.parameters(), sample)


def run_nflows(problem: Problem, tracker: Tracker) -> None:
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.transforms import CompositeTransform, InverseTransform, ReversePermutation
    from nflows.transforms.autoregressive import (
        MaskedPiecewiseRationalQuadraticAutoregressiveTransform as MaskedRQS,
    )

    layers = []
    for _ in range(3):
        layers += [MaskedRQS(problem.dim, 64, tails="linear", tail_bound=5.0),
                   ReversePermutation(problem.dim)]
    # nflows samples through `inverse` (d passes of each MADE): inverting the whole transform
    # makes sampling one MADE pass per layer, as zuko's tutorial does for reverse KL
    flow = Flow(InverseTransform(CompositeTransform(layers)), StandardNormal([problem.dim]))

    def sample(n: int) -> tuple[Tensor, Tensor]:
        return flow.sample_and_log_prob(n)

    tracker.sample = sample
    _adam_loop(tracker, problem, flow.parameters(), sample)


def run_pyro(problem: Problem, tracker: Tracker) -> None:
    import pyro
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoIAFNormal

    pyro.clear_param_store()
    guide = AutoIAFNormal(problem.model)
    svi = SVI(problem.model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    svi.step(*problem.model_args)  # builds the guide (its parameters come into being)
    latents = list(guide._unconstrained_shapes)
    expected = getattr(problem.log_prob, "site_names", ["x"])
    if latents != list(expected):
        raise RuntimeError(f"the guide's latent order {latents} is not the potential's {expected}")

    def sample(n: int) -> tuple[Tensor, Tensor]:
        posterior = guide.get_posterior()
        u = posterior.sample((n,))
        return u, posterior.log_prob(u)  # served from the IAF's cache: one pass

    tracker.sample = sample
    _loop(tracker, lambda: svi.step(*problem.model_args))


RUNNERS = {"krflows": run_krflows, "zuko": run_zuko, "nflows": run_nflows, "pyro": run_pyro}


def run_one(library: str, problem: Problem, args: argparse.Namespace) -> Run:
    import pyro

    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    run = Run(library, problem.name, args.budget)
    tracker = Tracker(run, problem, args.eval_samples, args.interval)
    try:
        if library == "krflows":
            run_krflows(problem, tracker, steps=50 if args.smoke else None)
        else:
            RUNNERS[library](problem, tracker)
    except Exception as exc:  # noqa: BLE001 - one library failing must not end the benchmark
        run.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return run


# ============================================================================ report
def cell(run: Run) -> str:
    if run.note.startswith("error"):
        return run.note
    if run.reached:
        return f"**{run.seconds:.1f} s** ({run.steps} steps)"
    why = f"; {run.note}" if run.note else ""
    return f"not reached in {run.trained:.1f} s (best ESS/N {run.best:.2f}{why})"


def tables(runs: dict[tuple[str, str], Run], libs: list[str], targets: list[str]) -> tuple[str, str]:
    head = ["target", *libs]
    main = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for t in targets:
        main.append("| " + " | ".join([t, *(cell(runs[lib, t]) for lib in libs)]) + " |")
    detail = ["| target | library | reached | training s | steps | steps/s | best ESS/N | confirmation ESS/N "
              "| evaluations (s, off the clock) | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in targets:
        for lib in libs:
            r = runs[lib, t]
            rate = r.steps / r.trained if r.trained > 0 else math.nan
            detail.append(f"| {t} | {lib} | {'yes' if r.reached else 'no'} | {r.trained:.2f} | {r.steps} "
                          f"| {rate:.0f} | {r.best:.3f} | {r.confirmed:.3f} | {len(r.curve)} "
                          f"({r.evaluation:.1f}) | {r.note} |")
    return "\n".join(main), "\n".join(detail)


def plot(runs: dict[tuple[str, str], Run], libs: list[str], targets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.4), squeeze=False)
    for ax, t in zip(axes[0], targets, strict=True):
        for lib in libs:
            r = runs[lib, t]
            if not r.curve:
                continue
            secs = [c[0] for c in r.curve]
            values = [max(c[2], 1e-4) if math.isfinite(c[2]) else math.nan for c in r.curve]
            (line,) = ax.plot(secs, values, ".-", label=lib, lw=1.2, ms=3)
            if r.reached:
                ax.plot([r.seconds], [values[-1]], "*", ms=11, color=line.get_color())
        ax.axhline(THRESHOLD, color="k", ls="--", lw=0.8)
        ax.set(title=t, xlabel="training seconds (evaluation excluded)", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ESS/N of fresh samples")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Time to ESS/N >= {THRESHOLD} (stars: confirmed crossings)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ============================================================================ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny budgets for a CI test (1 s per run, 256 evaluation samples, krflows.fit with "
                        "steps=50): the numbers mean nothing")
    p.add_argument("--budget", type=float, help="training seconds per run before giving up (default 40; "
                                                "1 with --smoke)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run")
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS), help="default: all")
    p.add_argument("--libs", default=",".join(LIBRARIES),
                   help=f"comma-separated subset of {','.join(LIBRARIES)} (default: all)")
    p.add_argument("--eval-samples", type=int,
                   help="N, fresh samples per ESS/N evaluation (default 4096; 256 with --smoke); a crossing "
                        "is confirmed on 4N more")
    p.add_argument("--interval", type=float,
                   help="the most training seconds between evaluations (default budget / 100, at least "
                        "0.25 s); early in a run they come every tenth of the training time so far")
    p.add_argument("--out", type=Path, default=here,
                   help="directory for RESULTS_ttq.md and time_to_quality.png (default benchmarks/)")
    args = p.parse_args(argv)
    libs = [n.strip() for n in args.libs.split(",") if n.strip()]
    unknown = sorted(set(libs) - set(LIBRARIES))
    if unknown or not libs:
        p.error(f"--libs must name some of {LIBRARIES}, got {args.libs!r}")
    args.libs = libs
    args.budget = args.budget if args.budget is not None else (1.0 if args.smoke else 40.0)
    args.eval_samples = args.eval_samples or (256 if args.smoke else 4096)
    args.interval = args.interval or max(0.25, args.budget / 100)  # at most ~100 evaluations a run
    if args.budget <= 0 or args.interval <= 0 or args.eval_samples < 2:
        p.error("--budget and --interval must be positive and --eval-samples at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    info, vers = machine_info(args.threads), versions()
    started = time.perf_counter()
    # A one-time process cost off every clock: the first torch.optim.Adam imports torch._dynamo
    # (~1.4 s here). krflows.fit builds its optimizer on the clock, the other runners before it
    # starts, so without this the first krflows run paid it alone.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    runs: dict[tuple[str, str], Run] = {}
    for t in args.targets:
        problem = make_problem(t)
        for lib in args.libs:
            run = runs[lib, t] = run_one(lib, problem, args)
            print(f"{t:14s} {lib:8s} {cell(run)}  [{len(run.curve)} evaluations, "
                  f"{run.evaluation:.1f} s off the clock]", file=sys.stderr, flush=True)
    main_table, detail = tables(runs, args.libs, args.targets)
    print(main_table)
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "time_to_quality.png"
    plot(runs, args.libs, args.targets, png)
    command = "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# Time to quality: training seconds until ESS/N >= 0.8", "",
             f"Written by `benchmarks/bench_time_to_quality.py` on {now} in "
             f"{time.perf_counter() - started:.0f} s.", "", f"Command: `{command}`", ""]
    if args.smoke:
        lines += ["**SMOKE run (`--smoke`): tiny budgets, the numbers mean nothing.**", ""]
    lines += [
        "## Results", "",
        f"Training seconds until ESS/N of {args.eval_samples} fresh samples reaches {THRESHOLD}, confirmed "
        f"on {4 * args.eval_samples} more (the clock stops while evaluating, every tenth of the training "
        f"time so far, at least {MIN_INTERVAL:g} and at most {args.interval:g} s apart), with a budget of "
        f"{args.budget:g} training seconds per run; bold: reached.", "",
        main_table, "", f"![ESS/N against training seconds]({png.name})", "",
        "## Details", "", detail, "",
        "## What each library runs (its defaults, as its documentation shows a new user)", "",
        *(f"- **{lib}**: {RECIPES[lib]}" for lib in args.libs), "",
        "Targets: `banana` = `krflows.targets.Banana()` (d = 2), `funnel-10` = `krflows.targets.Funnel(10)`, "
        "`eight-schools` = the non-centred eight-schools Pyro model on its unconstrained latent space "
        "(mu, log tau, 8 theta_tilde; d = 10), for krflows, zuko and nflows through "
        "`krflows.pyro.potential_from_model` (krflows: `krflows.fit` on that potential), for Pyro the model "
        "itself under SVI. ESS/N is `krflows.diagnostics.ess` of the log weights `log p(x) - log q(x)` at "
        "fresh samples of each flow (a non-finite weight counts as 0).", "",
        "## Machine", "", *(f"- {k}: {v}" for k, v in info.items()), "",
        "## Versions", "", *(f"- {k}: {v}" for k, v in vers.items()), ""]
    (args.out / "RESULTS_ttq.md").write_text("\n".join(lines))
    print(f"wrote {args.out / 'RESULTS_ttq.md'} and {png} ({time.perf_counter() - started:.0f} s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
