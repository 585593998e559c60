r"""Posterior summaries a modeller reads: :func:`summary` and its table, :class:`Summary`.

Per coordinate (or per element of a Pyro model's site): mean, standard deviation, quantiles
and the effective sample size, from unweighted draws (a flow's independent samples) or from
importance-weighted ones (:class:`~krflows.correct.DebiasResult`, or ``(samples, log_weights)``).
Weighted estimates use Pareto-smoothed weights (:func:`~krflows.diagnostics.weights.psis_smooth`)
and weighted quantiles (midpoints of the weighted CDF's steps).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from krflows.diagnostics.weights import ess as _ess
from krflows.diagnostics.weights import psis_smooth

__all__ = ["Summary", "summary", "weighted_draws", "to_inference_data"]


@dataclass
class Summary:
    r"""A table of posterior summaries, one row per coordinate (see :func:`summary`).

    Attributes:
        names: the row names, ``"x[0]"``, ... or a Pyro site's ``"tau"``, ``"theta[1]"``.
        mean, sd: ``(k,)`` float64.
        quantiles: ``(k, len(probs))`` float64, at ``probs``.
        probs: the quantile levels, e.g. ``(0.05, 0.5, 0.95)``.
        ess: ``(k,)`` effective sample size of each row (a count, not a fraction).
        n: the number of draws.
        weighted: whether the draws carry importance weights.
        pareto_k: :math:`\hat k` of the weights (``None`` when unweighted).
        note: how the ESS and the weights were computed.
        sites: ``{site: shape}`` of a Pyro model's sites (empty otherwise); rows are in site order.
    """

    names: list[str]
    mean: Tensor
    sd: Tensor
    quantiles: Tensor
    probs: tuple[float, ...]
    ess: Tensor
    n: int
    weighted: bool = False
    pareto_k: float | None = None
    note: str = ""
    sites: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        """The column names: ``mean``, ``sd``, one per quantile (``"5%"``), ``ess``."""
        return ["mean", "sd", *(_label(p) for p in self.probs), "ess"]

    def row(self, i: int) -> dict[str, float]:
        values = [self.mean[i], self.sd[i], *self.quantiles[i], self.ess[i]]
        return {c: float(v) for c, v in zip(self.columns, values, strict=True)}

    def __getitem__(self, name: str) -> dict[str, float]:
        """The row called ``name`` as ``{column: value}``."""
        try:
            return self.row(self.names.index(name))
        except ValueError:
            raise KeyError(f"no row {name!r}; rows: {self.names}") from None

    def __len__(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict[str, dict[str, float]]:
        """``{row name: {column: value}}`` of plain floats (what ``pandas.DataFrame.from_dict(...,
        orient="index")`` takes, without pandas)."""
        return {name: self.row(i) for i, name in enumerate(self.names)}

    def to_json(self, **kwargs) -> str:
        """The rows (:meth:`to_dict`) with ``n``, ``weighted``, ``pareto_k`` and ``note``, as JSON."""
        head = {"n": self.n, "weighted": self.weighted, "pareto_k": self.pareto_k, "note": self.note}
        return json.dumps({**head, "rows": self.to_dict()}, **kwargs)

    def _cells(self) -> list[list[str]]:
        return [[name, *(f"{v:.4g}" for v in self.row(i).values())] for i, name in enumerate(self.names)]

    def _caption(self) -> str:
        k = "" if self.pareto_k is None else f", Pareto k̂ {self.pareto_k:.2f}"
        return f"{self.n} {'weighted ' if self.weighted else ''}draws{k}. {self.note}".strip()

    def to_text(self) -> str:
        """A fixed-width table with a caption line."""
        rows = [["", *self.columns], *self._cells()]
        widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths,
                                                                                                  strict=True)))
                 .rstrip() for r in rows]
        return "\n".join([*lines, "", self._caption()]) + "\n"

    def to_markdown(self) -> str:
        """A Markdown table with a caption line."""
        lines = ["| | " + " | ".join(self.columns) + " |", "|---" * (len(self.columns) + 1) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self._cells()]
        return "\n".join([*lines, "", self._caption()]) + "\n"

    def __str__(self) -> str:
        return self.to_text()


def _label(p: float) -> str:
    return f"{100 * p:g}%"


def weighted_draws(x, log_weights: Tensor | None = None, target=None) -> tuple[Tensor, Tensor | None, object]:
    """``(samples, log_weights or None, target)`` from what :func:`summary` accepts: a tensor,
    a ``(samples, log_weights)`` pair or an object with ``.samples`` and ``.log_weights``
    (a :class:`~krflows.correct.DebiasResult`, whose ``.target`` is used when ``target`` is None)."""
    if hasattr(x, "samples") and hasattr(x, "log_weights"):
        target = target if target is not None else getattr(x, "target", None)
        x, log_weights = x.samples, x.log_weights
    elif isinstance(x, tuple | list) and len(x) == 2 and isinstance(x[1], Tensor):
        x, log_weights = x
    if not isinstance(x, Tensor | Mapping):
        raise TypeError(f"expected samples (n, d), (samples, log_weights) or a weighted result with "
                        f".samples and .log_weights, got {type(x).__name__}")
    n = next(iter(x.values())).shape[0] if isinstance(x, Mapping) else x.shape[0]
    if log_weights is not None and tuple(log_weights.shape) != (n,):
        raise ValueError(f"log_weights must have shape ({n},), got {tuple(log_weights.shape)}")
    return x, log_weights, target


def _columns(x: Tensor, target, names: Sequence[str] | None) -> tuple[Tensor, list[str], dict]:
    """The draws as ``(n, k)`` float64 columns with their names (per site for a Pyro potential)."""
    if isinstance(x, Mapping):
        sites = dict(x)
    elif target is not None and callable(getattr(target, "unpack", None)) and names is None:
        if x.dim() != 2:
            raise ValueError(f"samples must have shape (n, {target.dim}), got {tuple(x.shape)}")
        with torch.no_grad():
            sites = target.unpack(x)
    else:
        if x.dim() == 1:
            x = x[:, None]
        if x.dim() != 2:
            raise ValueError(f"samples must have shape (n, d), got {tuple(x.shape)}")
        if names is not None and len(names) != x.shape[1]:
            raise ValueError(f"names must have {x.shape[1]} entries, got {len(names)}")
        names = list(names) if names is not None else [f"x[{i}]" for i in range(x.shape[1])]
        return x.detach().double().cpu(), names, {}
    cols, out, shapes = [], [], {}
    for site, v in sites.items():
        v = v.detach().double().cpu()
        shape = tuple(v.shape[1:])
        shapes[site] = shape
        cols.append(v.reshape(v.shape[0], -1))
        idx = [()] if not shape else [tuple(int(i) for i in t) for t in torch.cartesian_prod(
            *[torch.arange(s) for s in shape]).reshape(-1, len(shape))]
        out += [site if not i else f"{site}[{','.join(map(str, i))}]" for i in idx]
    return torch.cat(cols, 1), out, shapes


def summary(x, log_weights: Tensor | None = None, *, target=None, probs: Sequence[float] = (0.05, 0.5, 0.95),
            names: Sequence[str] | None = None, smooth: bool = True) -> Summary:
    r"""Mean, sd, quantiles and ESS of each coordinate of posterior draws.

    * **Unweighted** draws ``(n, d)`` (e.g. ``flow.sample((n,))``): plain moments and
      ``torch.quantile``-style linear quantiles. A flow's draws are independent, so the ESS of
      every coordinate is ``n`` (for MCMC chains, which are autocorrelated, it would be less;
      use ArviZ on :func:`~krflows.to_inference_data` for those).
    * **Weighted** draws, a :class:`~krflows.correct.DebiasResult` or ``(samples, log_weights)``:
      self-normalized estimates with Pareto-smoothed weights :math:`\bar w`
      (:func:`~krflows.diagnostics.weights.psis_smooth`; ``smooth=False``: raw weights),
      weighted quantiles (``pyro.ops.stats.weighed_quantile``) and Kish's ESS
      :math:`(\sum w)^2/\sum w^2`, the same for every coordinate. Trust them when the
      reported :math:`\hat k` is below 0.7.
    * **Per site** for a Pyro model: with ``target`` a :class:`~krflows.pyro.ModelPotential`
      (or a ``DebiasResult`` of one), the flat unconstrained draws are mapped by its ``unpack``
      to the model's constrained sites; a site of shape ``(3,)`` gives rows ``theta[0]``,
      ``theta[1]``, ``theta[2]``. A mapping ``{site: (n, *shape)}`` is summarized the same way.

    Arguments:
        x: draws ``(n, d)``, ``{site: (n, *shape)}``, ``(samples, log_weights)`` or a result
            with ``.samples`` and ``.log_weights``.
        log_weights: log importance weights ``(n,)`` of ``x`` (any offset), or ``None``.
        target: a target with ``unpack`` (a Pyro potential): rows per site.
        probs: quantile levels in ``[0, 1]``.
        names: row names of plain draws (default ``x[0]``, ``x[1]``, ...).
        smooth: Pareto-smooth the weights.

    Returns:
        a :class:`Summary` (``.to_text()``, ``.to_markdown()``, ``.to_dict()``, ``s["x[0]"]``).

    Example:
        >>> s = summary(torch.randn(4000, 2), names=["a", "b"])
        >>> s.columns
        ['mean', 'sd', '5%', '50%', '95%', 'ess']
        >>> abs(s["a"]["sd"] - 1) < 0.1, s["a"]["ess"]
        (True, 4000.0)
    """
    x, log_weights, target = weighted_draws(x, log_weights, target)
    cols, rows, sites = _columns(x, target, names)
    n = cols.shape[0]
    probs = tuple(float(p) for p in probs)
    if not all(0.0 <= p <= 1.0 for p in probs):
        raise ValueError(f"probs must lie in [0, 1], got {probs}")
    p = torch.tensor(probs, dtype=torch.float64)
    if log_weights is None:
        mean, sd = cols.mean(0), cols.std(0)
        quantiles = torch.quantile(cols, p, dim=0).T if probs else cols.new_zeros(cols.shape[1], 0)
        ess = torch.full((cols.shape[1],), float(n), dtype=torch.float64)
        return Summary(rows, mean, sd, quantiles, probs, ess, n, sites=sites,
                       note="ESS = n: a flow's draws are independent.")
    lw = log_weights.detach().double().cpu()
    keep = ~torch.isnan(lw) & torch.isfinite(cols).all(1)
    cols, lw = cols[keep], lw[keep]
    k = None
    if smooth:
        lw, k = psis_smooth(lw)
    else:
        from krflows.diagnostics.weights import pareto_k_or_bounded

        k = pareto_k_or_bounded(lw, 1e-12 * (1 + float(lw[lw > -math.inf].abs().max())) if bool(
            (lw > -math.inf).any()) else 0.0)  # -inf (a bounded tail) for equal weights, not NaN
    w = torch.softmax(lw, 0)[:, None]
    mean = (w * cols).sum(0)
    sd = (w * (cols - mean) ** 2).sum(0).sqrt()
    quantiles = _weighted_quantiles(cols, p, lw) if probs else cols.new_zeros(cols.shape[1], 0)
    kish = float(_ess(lw)) * lw.numel()
    ess = torch.full((cols.shape[1],), kish, dtype=torch.float64)
    how = "Pareto-smoothed (PSIS)" if smooth else "raw"
    note = (f"{how} importance weights; ESS = Kish's (sum w)^2 / sum w^2, the same for every row"
            + ("" if k is None or not math.isfinite(k) or k <= 0.7 else "; k̂ > 0.7: unreliable"))
    return Summary(rows, mean, sd, quantiles, probs, ess, int(keep.sum()), weighted=True, pareto_k=k,
                   note=note + ".", sites=sites)


def _weighted_quantiles(cols: Tensor, probs: Tensor, log_w: Tensor) -> Tensor:
    """Quantiles ``(c, p)`` of weighted draws ``cols`` ``(n, c)``: each draw's mass sits at the
    midpoint of its step of the weighted CDF, linear in between, the extreme draws of positive
    weight beyond (equal weights: Hazen's quantiles). Written by hand because Pyro's
    ``weighed_quantile`` puts the smallest draw's CDF at 0, dropping its weight (a probe: with
    weights 0.7/0.1/0.1/0.1 at 0/1/2/3 its median was 1.5; importance-weighted medians came
    out 0.28 sd too high)."""
    keep = log_w > -math.inf
    cols, w = cols[keep], torch.softmax(log_w[keep], 0)
    values, order = cols.sort(0)
    mass = w[order]  # (n, c): each column's weights in its sorted order
    mid = (mass.cumsum(0) - 0.5 * mass).T.contiguous()  # (c, n)
    q = probs.to(cols).expand(mid.shape[0], -1).contiguous()  # (c, p)
    hi = torch.searchsorted(mid, q).clamp(1, mid.shape[1] - 1) if mid.shape[1] > 1 else \
        torch.zeros_like(q, dtype=torch.long)
    lo = (hi - 1).clamp(min=0)
    v = values.T
    m_lo, m_hi = mid.gather(1, lo), mid.gather(1, hi)
    t = ((q - m_lo) / (m_hi - m_lo).clamp(min=1e-300)).clamp(0, 1)
    return v.gather(1, lo) + t * (v.gather(1, hi) - v.gather(1, lo))


def to_inference_data(x, log_weights: Tensor | None = None, *, target=None,
                      names: Sequence[str] | None = None, resample: int | None = None,
                      generator: torch.Generator | None = None):
    r"""An ArviZ ``InferenceData`` of posterior draws (needs the ``arviz`` extra).

    The ``posterior`` group holds one chain of draws: per site for a Pyro potential
    (``target`` or a result's ``.target``; variables named as the sites, constrained values),
    else one variable per name in ``names``, else a variable ``x`` of shape ``(d,)``. Weighted
    draws (a :class:`~krflows.correct.DebiasResult` or ``(samples, log_weights)``) are first
    importance-resampled with Pareto-smoothed weights (:func:`~krflows.diagnostics.weights.psis_smooth`;
    ``resample`` draws, default ``n``, multinomial), because ArviZ has no weights: its
    summaries of that chain are those of the weighted draws up to resampling noise, and its
    ESS is not theirs (see :func:`summary` for the weighted numbers). The posterior's
    ``attrs`` record the krflows version, and for weighted draws their number
    (``n_weighted``), the Kish ESS (``ess_kish``) and :math:`\hat k` (``pareto_k``).

    Arguments:
        x, log_weights, target: as in :func:`summary`.
        names: variable names of plain draws, one per coordinate.
        resample: the number of resampled draws of weighted input (default: ``n``).
        generator: the resampling's random generator.

    Raises:
        ImportError: ArviZ is not installed (``pip install krflows[arviz]``, which pins
            ``arviz<1``: ArviZ 1 replaces ``InferenceData`` by ``xarray.DataTree``).

    Example:
        >>> idata = to_inference_data(torch.randn(100, 2), names=["a", "b"])  # doctest: +SKIP
        >>> idata.posterior["a"].shape  # doctest: +SKIP
        (1, 100)
    """
    try:
        import arviz
    except ImportError as err:
        raise ImportError("to_inference_data needs ArviZ, an optional dependency of krflows: "
                          "pip install 'krflows[arviz]' (or pip install arviz)") from err
    import krflows

    x, log_weights, target = weighted_draws(x, log_weights, target)
    attrs = {"inference_library": "krflows", "inference_library_version": krflows.__version__}
    if log_weights is not None:
        lw, k = psis_smooth(log_weights.double().cpu().nan_to_num(nan=-math.inf))
        m = int(resample or lw.numel())
        idx = torch.multinomial(torch.softmax(lw, 0), m, replacement=True, generator=generator)
        x = {s: v[idx] for s, v in x.items()} if isinstance(x, Mapping) else x[idx.to(x.device)]
        attrs.update(n_weighted=int(lw.numel()), ess_kish=float(_ess(lw)) * lw.numel(), pareto_k=float(k),
                     resampled="multinomial, Pareto-smoothed importance weights")
    if isinstance(x, Mapping):
        sites = dict(x)
    elif target is not None and callable(getattr(target, "unpack", None)) and names is None:
        with torch.no_grad():
            sites = target.unpack(x)
    elif names is not None:
        if len(names) != x.shape[-1]:
            raise ValueError(f"names must have {x.shape[-1]} entries, got {len(names)}")
        sites = {name: x[:, i] for i, name in enumerate(names)}
    else:
        sites = {"x": x}
    posterior = {k: v.detach().cpu().numpy()[None] for k, v in sites.items()}
    idata = arviz.from_dict(posterior=posterior, attrs=attrs)
    idata.posterior.attrs.update(attrs)  # where ArviZ's own converters put them
    return idata
