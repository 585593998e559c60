"""Builds ``notebooks/01_quickstart.ipynb`` (executed, with outputs) from the cells below.

Run ``python experiments/build_notebook_01.py`` (``--no-execute``: without outputs); CI re-executes it, e.g.
``KRFLOWS_NOTEBOOK_STEPS=150 python -m pytest tests/test_notebooks.py -q -k 01``.
"""

from __future__ import annotations

from pathlib import Path

import _common

PATH = Path(__file__).resolve().parent.parent / "notebooks" / "01_quickstart.ipynb"

CELLS: list[tuple[str, str]] = [
    ("md", r"""# krflows quick start

A **KR flow** is a monotone lower-triangular map `T: z -> x` that pushes the standard Gaussian
reference `N(0, I)` onto your posterior. You give an unnormalized log density; krflows fits `T` by
reverse KL, then gives you independent samples, exact flow densities, and a report of how biased
the flow still is.

This notebook fits a banana-shaped posterior and a log density written by hand, samples them,
reads the diagnostics, corrects the remaining bias, saves the flow, and shows where TensorBoard
finds the training curves. It runs in about a minute on two CPU cores (600 steps per fit; CI
runs it with fewer, `KRFLOWS_NOTEBOOK_STEPS`); use the default 2000 steps of `fit` for real work."""),
    ("code", r"""%matplotlib inline
import os
import tempfile
import warnings

import matplotlib.pyplot as plt
import torch

import krflows

torch.set_num_threads(1)
torch.manual_seed(0)
warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm, imported by Pyro
STEPS = int(os.environ.get("KRFLOWS_NOTEBOOK_STEPS", 600))"""),
    ("md", r"""## 1. A built-in target: the banana

`x0 ~ N(0, 10²)`, `x1 | x0 ~ N(0.03 (x0² − 100), 1)`. Its scale (10) is far from the reference's
(1): `fit` first adapts the flow's affine stage to it (a short tempered warm-up, with a search
for separated modes: here it finds one), then trains all layers. `progress=True` prints a line
every `log_every` steps."""),
    ("code", r"""target = krflows.targets.Banana()
flow = krflows.KRFlow(target.dim, family="spline")   # spline layers, all in one variable order
history = krflows.fit(flow, target, steps=STEPS, batch_size=256, log_every=100, progress=True)
print(f"final ELBO {history['elbo'][-1]:.3f}, ESS/N on the last batch {history['ess'][-1]:.3f}")"""),
    ("md", r"""`krflows.plot.corner` draws samples over the target's log-density contours (in 2-D; a pair
plot in more dimensions). It is the figure TensorBoard shows during training too."""),
    ("code", r"""fig = krflows.plot.corner(flow.sample((4000,)), target, names=["x0", "x1"])
fig"""),
    ("md", r"""The flow has an exact density everywhere (`log_prob` inverts the triangular map, one coordinate
at a time), and because `T` is triangular, the marginal of `x0` and the conditional of `x1` given
`x0` are available exactly too:"""),
    ("code", r"""pts = torch.tensor([[0.0, -3.0], [10.0, 0.0]])
with torch.no_grad():
    print("log q(x)       ", flow.log_prob(pts))
    print("log q(x0)      ", flow.marginal_log_prob(pts[:, :1]))
    cond = flow.sample_conditional(torch.tensor([10.0]), (2000,))
print(f"E[x1 | x0 = 10] {cond[:, 1].mean():.3f} (exact: 0.03 * (100 - 100) = 0)")"""),
    ("md", r"""## 2. How wrong is the flow? `krflows.diagnose`

The bias report: importance weights `p̃/q` at flow samples give an estimate of `log Z`, the
effective sample size and the Pareto k̂ of the weights' tail (k̂ < 0.5: reliable); a mode search
looks for modes the flow misses; the banana also has an exact sampler and a known `log Z`, so the
report adds the forward measures (`KL(p‖q)`, forward ESS, sample distances). The verdict on top
lists what is wrong, most serious first."""),
    ("code", r"""report = krflows.diagnose(flow, target, n=10000, seed=0, n_sub=300)
print(report.to_text())"""),
    ("md", r"""Read it from the top. At this short budget the ELBO is already within a few hundredths of a nat
of `log Z`, yet the verdict may still flag k̂ > 0.7 and a large `KL(p‖q)`: a few target samples
in the banana's thin tips get much less flow density than they should, and the reverse ESS of
the flow's own samples cannot see that. Train longer (the default 2000 steps) or correct the
weights (section 3) before trusting importance-weighted estimates.

## 3. Your own log density

Any function `log_prob(x) -> (n,)` of a tensor `x` of shape `(n, d)` works, no target class
needed. Here: a Bayesian logistic regression posterior with a Gaussian prior on 3 coefficients."""),
    ("code", r"""g = torch.Generator().manual_seed(1)
features = torch.randn(200, 3, generator=g)
labels = torch.bernoulli(torch.sigmoid(features @ torch.tensor([1.5, -2.0, 0.5])), generator=g)


def log_posterior(beta):                      # beta: (n, 3)
    logits = beta @ features.T                # (n, 200)
    log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(
        logits, labels.expand_as(logits), reduction="none").sum(-1)
    return log_lik - 0.5 * (beta ** 2).sum(-1) / 5.0 ** 2


flow = krflows.KRFlow(3, family="spline")
history = krflows.fit(flow, log_posterior, steps=STEPS // 2, batch_size=256, log_every=50,
                      progress=True)
names = ["beta0", "beta1", "beta2"]
print(krflows.summary(flow.sample((10000,)), names=names).to_text())"""),
    ("code", r"""fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(history["step"], history["elbo"])
ax.set_xlabel("step")
ax.set_ylabel("ELBO")
ax.set_title("training curve")
plt.show()
krflows.plot.corner(flow.sample((4000,)), names=names)"""),
    ("md", r"""**Removing what bias remains.** `krflows.debias` draws from a defensive mixture of the flow
and heavy-tailed components at the modes it finds, and returns importance-weighted draws with
`log Z`, the ESS and k̂; `krflows.summary` reads them (Pareto-smoothed weights):"""),
    ("code", r"""result = krflows.debias(flow, log_posterior, n=10000, seed=0)
print(f"log Z {result.log_z:.4f} ± {result.log_z_se:.4f}, ESS/N {result.ess:.3f}, "
      f"k-hat {result.pareto_k:.2f}")
print(krflows.summary(result, names=names).to_text())"""),
    ("md", r"""## 4. The flow as a distribution, saved and loaded

`flow()` is a `torch.distributions.Distribution` (event shape `(d,)`, `sample`, `rsample`,
`log_prob`): it goes into `pyro.sample`, mixtures or `kl_divergence`. `krflows.save` writes the
configuration and the weights to one file, and `krflows.load` reads it back safely
(`weights_only=True`), no constructor arguments to retype."""),
    ("code", r"""posterior = flow()
print(posterior, "event shape", tuple(posterior.event_shape), "batch shape", tuple(posterior.batch_shape))
path = os.path.join(tempfile.mkdtemp(), "logistic_posterior.pt")
krflows.save(flow, path)
same = krflows.load(path)
x = posterior.sample((5,))
with torch.no_grad():
    print("same density after loading:", bool(torch.allclose(same().log_prob(x), posterior.log_prob(x))))"""),
    ("md", r"""## 5. TensorBoard

`krflows fit` (the command line) and `krflows.lightning.KRFlowModule` train with Lightning and log
loss, ELBO, ESS/N, k̂, log Z, gradient norm and learning rate, sample images and log-weight
histograms to TensorBoard; your own log density goes in as `path/to/file.py:function`:

```bash
krflows fit --model.target banana --trainer.max_steps 2000 --name banana
krflows fit --model.target my_model.py:log_posterior --model.dim 3 --trainer.max_steps 2000
tensorboard --logdir runs
```"""),
]


if __name__ == "__main__":
    _common.write_notebook(CELLS, PATH)
