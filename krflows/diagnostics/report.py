r"""The bias report: its layout (declared once, in :data:`LAYOUT`), the verdict, and :class:`Report`.

Every view of the report reads :data:`LAYOUT`: the order of the entries, the text and Markdown
tables (:meth:`Report.to_text`, :meth:`Report.to_markdown`), the TensorBoard scalars
(:meth:`Report.scalars`), the headline lines of ``krflows fit`` (:meth:`Report.headline`) and
the list of entries in :func:`~krflows.diagnose`'s documentation (:func:`entries_doc`). A new
entry is one row of :data:`LAYOUT` and a field of the stage that computes it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Entry", "LAYOUT", "SECTIONS", "Report", "problems", "verdict", "entries_doc",
           "PARETO_GOOD", "PARETO_UNRELIABLE", "ESS_LOW", "FORWARD_ESS_LOW", "MODE_TV_HIGH",
           "MODE_RATIO_LOW", "DISTANCE_RATIO", "JEFFREYS_HIGH"]

# Thresholds of the verdict (documented in :func:`~krflows.diagnose`).
PARETO_GOOD, PARETO_UNRELIABLE = 0.5, 0.7
ESS_LOW = 0.05
FORWARD_ESS_LOW = 0.5
MODE_TV_HIGH = 0.05
MODE_RATIO_LOW = 0.5  # a mode given less than half its share is misweighted, whatever the TV
DISTANCE_RATIO = 3.0
JEFFREYS_HIGH = 10.0  # nats of EUBO - ELBO, beyond three standard errors


@dataclass(frozen=True)
class Entry:
    """One entry of the report.

    ``section`` is the title of the table it is a row of (``None``: not a row, e.g. counts shown
    in the header); ``se`` the key of its standard error; ``unit`` its unit (``""``: none);
    ``note`` the table's note column; ``doc`` what :func:`~krflows.diagnose`'s documentation
    says of it; ``headline`` its short label where ``krflows fit`` prints it (``""``: not printed).
    """

    key: str
    label: str
    section: str | None = None
    se: str | None = None
    unit: str = ""
    note: str = ""
    doc: str = ""
    headline: str = ""


_EVIDENCE = "evidence (ELBO ≤ log Z ≤ EUBO)"
_WEIGHTS = "importance weights"
_MODES = "modes"
_DISTANCES = "sample distances (flow vs target subsamples; floor = two target sets)"
_MAP = "map conditioning (log dT_k/dz_k at reference samples, flow order)"
_EXPECT = "expectations (importance-corrected ± se)"
SECTIONS = (_EVIDENCE, _WEIGHTS, _MODES, _DISTANCES, _MAP, _EXPECT)

LAYOUT: tuple[Entry, ...] = (
    # counts (the header)
    Entry("n", "flow samples", doc="flow samples used"),
    Entry("n_dropped", "dropped flow samples",
          doc="flow samples with +inf log p~ or non-finite x / log q, dropped"),
    Entry("frac_zero_density", "fraction with p~ = 0", unit="fraction",
          doc="fraction of flow samples where p~ = 0 (kept as zero weights; they make the ELBO -inf)"),
    Entry("n_exact", "target samples", doc="target samples used (exact or ``reference``)"),
    Entry("n_dropped_exact", "dropped target samples", doc="target samples dropped (non-finite)"),
    Entry("reference_source", "target samples from", doc="``'target.sample'`` or ``'reference'``"),
    # evidence
    Entry("elbo", "ELBO", _EVIDENCE, "elbo_se", "nats", "E_q[log p~ - log q]", "evidence lower bound",
          headline="ELBO"),
    Entry("elbo_se", "ELBO s.e.", unit="nats", doc="its standard error"),
    Entry("log_z", "log Z, importance sampling", _EVIDENCE, "log_z_se", "nats", "log mean w",
          "importance-sampling log Z (:func:`log_z_estimate`)", headline="log Z (IS)"),
    Entry("log_z_se", "log Z s.e.", unit="nats", doc="its standard error"),
    Entry("true_log_z", "log Z, exact", _EVIDENCE, None, "nats", "from the target",
          "the target's log Z, where known", headline="log Z, exact"),
    Entry("eubo", "EUBO", _EVIDENCE, "eubo_se", "nats", "E_p[log p~ - log q], needs the inverse",
          "evidence upper bound, from target samples"),
    Entry("eubo_se", "EUBO s.e.", unit="nats", doc="its standard error"),
    Entry("kl_reverse", "KL(q || p)", _EVIDENCE, None, "nats", "log Z - ELBO",
          "log Z - ELBO (targets with log Z)"),
    Entry("kl_forward", "KL(p || q)", _EVIDENCE, None, "nats", "EUBO - log Z",
          "EUBO - log Z (with log Z and target samples)"),
    Entry("jeffreys", "KL(q || p) + KL(p || q)", _EVIDENCE, None, "nats", "EUBO - ELBO",
          "EUBO - ELBO, the symmetric (Jeffreys) divergence (with target samples)"),
    # importance weights
    Entry("ess", "ESS / N (reverse)", _WEIGHTS, None, "fraction",
          "samples of q; 1 = perfect; blind to missing modes", ":func:`ess` of the flow's weights",
          headline="ESS/N"),
    Entry("forward_ess", "ESS / N (forward)", _WEIGHTS, None, "fraction",
          "weights q/p at samples of p; = covered mass", ":func:`forward_ess`, with target samples"),
    Entry("pareto_k", "Pareto k-hat", _WEIGHTS, None, "", "< 0.5 good, 0.5-0.7 usable, > 0.7 unreliable",
          ":func:`pareto_k` (``-inf`` when the weights are constant: a bounded tail)", headline="Pareto k̂"),
    Entry("forward_pareto_k", "Pareto k-hat of q/p at p", _WEIGHTS, None, "",
          "reliability of the forward ESS",
          ":func:`pareto_k` of the forward weights q/p~: above 0.7 the forward ESS is unreliable"),
    Entry("forward_starved", "target draws starved by q", _WEIGHTS, None, "",
          "log p~ - log q - log Z > 50 nats at samples of p",
          "target draws where the flow's density is below e^-50 of the target's (with target samples)"),
    Entry("forward_starved_max", "worst starved draw", _WEIGHTS, None, "nats",
          "max of log p~ - log q - log Z", "the largest such excess, where any"),
    Entry("tail_rays", "rays read in the tails", _WEIGHTS, None, "",
          "log p~ at 8-64 flow spreads from the centre", ":func:`~krflows.diagnostics.weights.tails`: "
          "rays along which log p~ decays at every step"),
    Entry("tail_rays_power", "rays with power-law tails", _WEIGHTS, None, "",
          "> 0: weights unbounded (flow tails are Gaussian)",
          "of them, those where log p~ decays like a power of the distance"),
    Entry("tail_decay_ratio", "smallest tail decay ratio", _WEIGHTS, None, "",
          "4 Gaussian, 2 exponential, 1 power",
          "the smallest ratio of successive decrements of log p~ along those rays"),
    # modes
    Entry("mode_weights", "mode weights, flow", _MODES, None, "", "from flow samples via target.assign",
          "flow mass per mode (targets with ``weights`` and ``assign``)", headline="mode weights, flow"),
    Entry("true_mode_weights", "mode weights, target", _MODES, None, "", "target.weights",
          "the target's weights", headline="mode weights, target"),
    Entry("mode_tv", "total variation", _MODES, None, "", "1/2 sum |flow - target|",
          "TV distance of the mode weights"),
    Entry("missing_modes", "missing modes", _MODES, None, "", "flow weight < 0.1 x true weight",
          ":func:`missing_modes`"),
    Entry("missing_mass", "missing mass", _MODES, None, "fraction", "target mass of the missing modes",
          "their target mass"),
    Entry("n_modes_found", "modes found by search", _MODES, None, "", "find_modes from the flow",
          "distinct local maxima of p~ found by :func:`~krflows.find_modes` (``modes='search'``)"),
    Entry("n_missed_modes", "modes the flow misses", _MODES, None, "",
          "Laplace mass >= 1%, flow share < 0.1 x, density > 10x too low",
          "found modes the flow gives (almost) no mass (:func:`~krflows.diagnostics.modes.missed_modes`)",
          headline="missed modes"),
    Entry("missed_mass", "missed mass (Laplace)", _MODES, None, "fraction",
          "of the target, by the modes' Laplace masses", "the target's mass in the missed modes"),
    Entry("log_z_missed_bias", "log Z underestimated by", _MODES, None, "nats",
          "log(1 - s + sum M_missed / Z_IS), s = the share of Z_IS from draws near missed modes; "
          "negative: Z_IS overestimates", "the implied bias of the flow's log Z"),
    Entry("missed_modes", "missed modes", doc="one dict per missed mode: ``location``, ``log_density``, "
          "``log_mass``, ``expected_mass``, ``flow_mass``, ``log_density_ratio``, ``negative_definite``"),
    Entry("found_mode_weights", "found modes' weights, flow", _MODES, None, "",
          "share of the flow's draws per found mode", "with several found modes: the flow's share of "
          "its draws per mode (:meth:`~krflows.correct.ModeSet.assign`)"),
    Entry("found_mode_weights_reweighted", "found modes' weights, reweighted", _MODES,
          "found_mode_weights_se", "", "self-normalized importance estimate of the target's",
          "the same shares importance-reweighted: an estimate of the target's weights (with s.e.)"),
    Entry("found_mode_tv", "total variation, flow vs reweighted", _MODES, None, "",
          "1/2 sum |flow - reweighted|", "how misweighted the covered modes are"),
    Entry("mode_search_seconds", "mode search seconds", unit="s", doc="wall time of the mode search"),
    Entry("valley_definition", "valley", doc="what the valley is: the gap of a 1-D target with a "
          "``gap``, else :func:`valley_mask` with ``level = valley_level`` (``modes``, 2 <= K <= max_modes)"),
    Entry("valley_mass", "valley mass, flow", _MODES, "valley_mass_se", "fraction",
          doc="flow mass in the valley"),
    Entry("valley_mass_se", "valley mass s.e.", unit="fraction", doc="its standard error"),
    Entry("true_valley_mass", "valley mass, target", _MODES, "true_valley_mass_se", "fraction",
          doc="target mass in the valley (with target samples or a gap)"),
    Entry("true_valley_mass_se", "target valley mass s.e.", unit="fraction", doc="its standard error"),
    # sample distances
    Entry("sinkhorn", "Sinkhorn divergence", _DISTANCES, None, "x^2",
          doc=":func:`sharp_sinkhorn_divergence` of ``n_sub`` flow and target points"),
    Entry("sinkhorn_floor", "  noise floor", _DISTANCES, None, "x^2", doc="the same between two target sets"),
    Entry("sinkhorn_reg", "Sinkhorn regularization", unit="x^2", doc="its regularization"),
    Entry("sliced_w2", "sliced W2", _DISTANCES, None, "x", doc=":func:`sliced_w2`"),
    Entry("sliced_w2_floor", "  noise floor", _DISTANCES, None, "x", doc="the same between two target sets"),
    Entry("distance_n", "points per set", doc="points of each set (:func:`sample_distances`)"),
    # map conditioning
    Entry("log_slope_quantiles", "quantiles of the log slope", doc="``{q: per coordinate}``, "
          "q in 0.01, 0.5, 0.99 (:func:`log_slope_summary`)"),
    Entry("log_slope_max", "max log slope per coordinate", _MAP, doc="per coordinate (flow order)"),
    Entry("max_slope", "largest slope met", _MAP, None, "", "exp(max log slope)", "exp of its maximum"),
    Entry("exact_log_slope_max", "exact KR map: max log slope", _MAP, None, "", "KR1D on a grid, same z",
          "d = 1 with target samples: the exact KR map's (:class:`~krflows.exact.KR1D`) at the same z"),
    Entry("exact_log_slope_q99", "exact KR map: q0.99", _MAP, doc="its 0.99 quantile"),
    Entry("inverse_residual_max", "inverse residual, max", _MAP, None, "x", "max_k |T(S(x))_k - x_k|",
          "on ``n_inverse`` flow samples"),
    Entry("inverse_residual_median", "inverse residual, median", _MAP, None, "x", doc="its median"),
    # the rest
    Entry("expectations", "expectations", doc="with ``functions``: ``{name: {is, is_se, flow, flow_se"
          "[, exact, exact_se]}}`` (:func:`self_normalized` vs the flow average vs the target samples')"),
    Entry("seconds", "seconds", unit="s", doc="wall time"),
    Entry("problems", "problems", doc="the findings, most serious first"),
    Entry("verdict", "verdict", doc="the findings joined, or \"no problems detected (...)\"",
          headline="verdict"),
)
_BY_KEY = {e.key: e for e in LAYOUT}


def entries_doc(indent: str = "    ") -> str:
    """The report's entries as a reST bullet list (for :func:`~krflows.diagnose`'s docstring)."""
    lines = []
    for e in LAYOUT:
        unit = f" [{e.unit}]" if e.unit else ""
        lines.append(f"{indent}* ``{e.key}``{unit}: {e.doc or e.label}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        items = [_fmt(t) for t in v[:16]]
        return "[" + ", ".join(items) + (f", … ({len(v)} in all)" if len(v) > 16 else "") + "]"
    return str(v)


def problems(e: Mapping, scale: float) -> list[str]:
    """The verdict's findings, most serious first (thresholds at the top of the module)."""
    out = []
    if e.get("n_dropped"):
        out.append(f"{e['n_dropped']} of {e['n'] + e['n_dropped']} flow samples had a NaN/+inf "
                   f"log-density and were dropped")
    if e.get("frac_zero_density", 0) > 0:
        out.append(f"{100 * e['frac_zero_density']:.3g}% of the flow's samples fall where the "
                   f"target density is zero (ELBO = -inf)")
    if e.get("missed_modes") and not e.get("missing_modes"):
        out.append(_missed_message(e))
    if e.get("missing_modes"):
        idx = e["missing_modes"]
        which = f"mode {idx[0]}" if len(idx) == 1 else f"modes {_fmt(idx)}"
        if len(idx) > 5:
            which = f"{len(idx)} modes, e.g. {_fmt(idx[:5])[:-1]}, …]"
        msg = f"{100 * e['missing_mass']:.0f}% of the target's mass ({which}) is missing"
        if e["ess"] > 0.5:
            msg += f" (the reverse ESS {e['ess']:.2f} cannot see this)"
        out.append(msg)
    elif e.get("mode_tv", 0) > MODE_TV_HIGH or _starved_known(e):
        out.append(f"mode weights are off: TV {e['mode_tv']:.2f} (flow {_fmt(e['mode_weights'])} "
                   f"vs target {_fmt(e['true_mode_weights'])})" + _starved_note(
                       _starved_known(e), e["mode_weights"], e["true_mode_weights"], "the target's"))
    elif "mode_tv" not in e and not e.get("missed_modes") and _misweighted(e):
        out.append(f"the flow misweights the modes it covers: it gives the {len(e['found_mode_weights'])} "
                   f"found modes {_fmt(e['found_mode_weights'])} but its importance weights say "
                   f"{_fmt(e['found_mode_weights_reweighted'])} (TV {e['found_mode_tv']:.2f})"
                   + _starved_note(_starved(e), e["found_mode_weights"], e["found_mode_weights_reweighted"],
                                   "its reweighted")
                   + "; importance-weighted estimates and krflows.debias correct this")
    in_gap = e.get("valley_definition", "").startswith("mass in the gap")
    if "true_valley_mass" in e and not (in_gap and e.get("frac_zero_density", 0) > 0):
        v, t = e["valley_mass"], e["true_valley_mass"]
        noise = 3 * math.hypot(e["valley_mass_se"], e["true_valley_mass_se"])
        if v > 2 * t + max(0.005, noise):
            out.append(f"the flow puts {100 * v:.1f}% of its mass in the valley between modes "
                       f"(target: {100 * t:.1f}%)")
    if e.get("forward_ess", 1.0) < FORWARD_ESS_LOW and not e.get("missing_modes"):
        msg = f"forward ESS {e['forward_ess']:.2f}: the flow misses or misweights part of the target"
        if "missing_modes" not in e:  # modes unknown: say what a dropped mode would look like
            msg += f" (about {100 * (1 - e['forward_ess']):.0f}% of its mass if whole modes are missing)"
        if e.get("forward_pareto_k", -math.inf) > PARETO_UNRELIABLE:
            msg += (f", or is too wide in places (the forward weights' k̂ = "
                    f"{e['forward_pareto_k']:.2f} makes this ESS unreliable)")
        out.append(msg)
    if e.get("jeffreys", 0.0) - 3 * e.get("eubo_se", 0.0) > JEFFREYS_HIGH:
        out.append(f"EUBO - ELBO = {e['jeffreys']:.3g} nats: the flow gives almost zero density to "
                   f"some of the target's draws (its tails are too light there), so tail "
                   f"probabilities and the forward ESS are not to be trusted")
    elif e.get("forward_starved", 0) > 0:
        out.append(f"{e['forward_starved']} of the {e['n_exact']} target draws get a flow density below "
                   f"e^-50 of the target's (worst: e^-{e['forward_starved_max']:.3g}): the flow's tails are "
                   f"far too light there, so tail probabilities from the flow, and importance weights' "
                   f"standard errors, understate them")
    if e.get("tail_rays_power", 0) > 0:
        out.append(f"the target's log density decays like a power of the distance along "
                   f"{e['tail_rays_power']} of {e['tail_rays']} rays from the flow's centre (Student-t-like "
                   f"tails) while the flow's tails are Gaussian: the importance weights are unbounded, "
                   f"so log Z and tail probabilities are biased low and their standard errors too small "
                   f"whatever k̂ says; read tail estimates as lower bounds, or reparametrize (e.g. the "
                   f"t's latent scale as a parameter)")
    k = e.get("pareto_k", math.nan)
    if k > PARETO_UNRELIABLE:
        out.append(f"k̂ = {k:.2f} > 0.7: importance-weighted estimates (log Z, expectations) are "
                   f"unreliable")
    elif k > PARETO_GOOD:
        out.append(f"k̂ = {k:.2f}: importance weighting is usable but converges slowly")
    if e.get("ess", 1.0) < ESS_LOW:
        out.append(f"ESS {e['ess']:.3f}: only about {100 * e['ess']:.1f}% of the samples carry weight")
    floor_s, floor_w = e.get("sinkhorn_floor"), e.get("sliced_w2_floor")
    if floor_s is not None and e["sinkhorn"] > DISTANCE_RATIO * floor_s + 1e-12 \
            and e["sliced_w2"] > DISTANCE_RATIO * floor_w:
        out.append(f"the samples differ from the target's beyond sampling noise (Sinkhorn "
                   f"{e['sinkhorn']:.3g} vs floor {floor_s:.3g}, sliced W2 {e['sliced_w2']:.3g} "
                   f"vs {floor_w:.3g})")
    if e.get("inverse_residual_max", 0.0) > 1e-3 * (1 + scale):
        out.append(f"inverse residual {e['inverse_residual_max']:.2g}: log q at given points "
                   f"(EUBO, forward ESS) is inexact")
    return out


def _se(se) -> str:
    return _fmt([float(f"{v:.2g}") for v in se]) if isinstance(se, list | tuple) else f"{se:.2g}"


def _misweighted(e: Mapping) -> bool:
    """Covered modes with the wrong weights, from the mode search's reweighted shares, where the
    weights are reliable: the TV is above MODE_TV_HIGH and some mode's gap beyond 3 standard
    errors, or some mode gets less than MODE_RATIO_LOW of its share (:func:`_starved`). The
    ratio rule is for small modes: a probe's 5% mode given 2.3% of the flow's draws (d = 5) is a
    TV of 0.03, which the TV rule passed as "no problems detected"."""
    if e.get("found_mode_tv") is None or e.get("pareto_k", math.inf) > PARETO_UNRELIABLE:
        return False
    if _starved(e):
        return True
    if e["found_mode_tv"] <= MODE_TV_HIGH:
        return False
    gaps = zip(e["found_mode_weights"], e["found_mode_weights_reweighted"], e["found_mode_weights_se"],
               strict=True)
    return any(abs(f - r) > 3 * se for f, r, se in gaps)


def _starved(e: Mapping) -> list[int]:
    """The found modes whose share of the flow's draws is below MODE_RATIO_LOW times their
    reweighted share, by more than 3 standard errors of the latter (and not missed: those have
    a finding of their own)."""
    if e.get("found_mode_tv") is None:
        return []
    rows = zip(e["found_mode_weights"], e["found_mode_weights_reweighted"], e["found_mode_weights_se"],
               strict=True)
    return [i for i, (f, r, se) in enumerate(rows) if f < MODE_RATIO_LOW * r and r - f > 3 * se]


def _starved_known(e: Mapping) -> list[int]:
    """:func:`_starved` against a target's known mode weights: the flow's share (a binomial
    proportion of ``n`` draws) below MODE_RATIO_LOW times the true weight, by more than 3 of its
    standard errors."""
    if "mode_tv" not in e or not e.get("n"):
        return []
    n = e["n"]
    return [i for i, (f, t) in enumerate(zip(e["mode_weights"], e["true_mode_weights"], strict=True))
            if f < MODE_RATIO_LOW * t and t - f > 3 * math.sqrt(max(t * (1 - t), 1e-12) / n)]


def _starved_note(idx: list[int], flow: list[float], ref: list[float], whose: str) -> str:
    if not idx:
        return ""
    which = ", ".join(f"mode {i} gets {flow[i]:.3g} against {ref[i]:.3g}" for i in idx[:3])
    return f" ({which}: under half {whose} share)"


def _missed_message(e: Mapping) -> str:
    rows = e["missed_modes"]
    where = "; ".join(f"at {_fmt([round(v, 3) for v in r['location']])} (≈{100 * r['expected_mass']:.0f}% "
                      f"of the mass, flow {100 * r['flow_mass']:.1f}%)" for r in rows[:3])
    more = f" and {len(rows) - 3} more" if len(rows) > 3 else ""
    msg = (f"the flow misses {len(rows)} mode{'s' if len(rows) > 1 else ''} found by a mode search: "
           f"{where}{more}; ≈{100 * e['missed_mass']:.0f}% of the target's mass is missing and "
           + (f"log Z is underestimated by ≈{e['log_z_missed_bias']:.2g} nats" if e["log_z_missed_bias"] >= 0
              else f"log Z is overestimated by ≈{-e['log_z_missed_bias']:.2g} nats (the few draws "
                   f"in the missed mode carry huge weights)"))
    if e.get("ess", 0.0) > 0.5:
        msg += f" (the reverse ESS {e['ess']:.2f} cannot see this)"
    return msg + "; krflows.debias(flow, target) restores them"


def verdict(e: Mapping, findings: list[str]) -> str:
    """The findings joined, or "no problems detected" with the headline numbers."""
    if findings:
        return "; ".join(findings)
    parts = [f"ESS {e['ess']:.2f}"]
    if "forward_ess" in e:
        parts.append(f"forward ESS {e['forward_ess']:.2f}")
    parts.append(f"k̂ {e['pareto_k']:.2f}")
    return f"no problems detected ({', '.join(parts)})"


class Report(Mapping):
    r"""The result of :func:`diagnose`: a read-only mapping of named entries, plus renderers.

    Entries are floats, ints, strings, lists and (for ``"log_slope_quantiles"`` and
    ``"expectations"``) dicts; see :func:`diagnose` for the keys. Render with
    :meth:`to_text` (also ``str(report)``), :meth:`to_markdown`, :meth:`to_json`; log the
    numbers with :meth:`scalars`.
    """

    def __init__(self, entries: dict[str, Any], title: str = "krflows diagnostics"):
        ordered = {key: entries[key] for key in _BY_KEY if key in entries}  # in LAYOUT order
        self._entries = {**ordered, **entries}
        self.title = title

    def __getitem__(self, key: str) -> Any:
        return self._entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Report({self.get('verdict', '')!r}, {len(self)} entries)"

    def __str__(self) -> str:
        return self.to_text()

    # ---- numbers ---------------------------------------------------------------------------

    def scalars(self) -> dict[str, float]:
        r"""Flat ``{name: float}`` for loggers (TensorBoard). Keys, where their entry exists:

        * every number of :data:`LAYOUT` under its own key (counts, evidence, weights, masses,
          distances, slopes, residuals, ``seconds``);
        * ``n_missing_modes``; ``mode_weight/{k}`` and ``true_mode_weight/{k}`` when ``K <= 16``;
        * ``log_slope_max/{k}`` and ``log_slope_q{q}/{k}`` (``q`` in ``0.01, 0.5, 0.99``) when
          ``d <= 16``, and always ``log_slope_max`` (over all coordinates);
        * ``expect/{name}/{is, is_se, flow, flow_se, exact, exact_se}``.

        Values may be ``inf`` or ``nan`` (e.g. ``elbo = -inf`` when the flow puts mass where the
        target density is zero).
        """
        e, out = self._entries, {}
        for key in _BY_KEY:
            v = e.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[key] = float(v)
        if "missing_modes" in e:
            out["n_missing_modes"] = float(len(e["missing_modes"]))
        for key, name in (("mode_weights", "mode_weight"), ("true_mode_weights", "true_mode_weight")):
            if key in e and len(e[key]) <= 16:
                out.update({f"{name}/{k}": float(v) for k, v in enumerate(e[key])})
        if "log_slope_max" in e:
            per = e["log_slope_max"]
            out["log_slope_max"] = float(max(per))
            if len(per) <= 16:
                out.update({f"log_slope_max/{k}": float(v) for k, v in enumerate(per)})
                for q, row in e["log_slope_quantiles"].items():
                    out.update({f"log_slope_q{q}/{k}": float(v) for k, v in enumerate(row)})
        for name, x in e.get("expectations", {}).items():
            out.update({f"expect/{name}/{k}": float(v) for k, v in x.items()})
        return out

    def headline(self) -> list[str]:
        """The verdict and the headline entries of :data:`LAYOUT`, one ``label  value`` per line."""
        e = self._entries
        lines = [f"{'verdict':<20} {e.get('verdict', '')}"]
        for entry in LAYOUT:
            value = e.get(entry.key)
            if not entry.headline or entry.key == "verdict" or value is None:
                continue
            if isinstance(value, list) and len(value) > 16:
                continue
            value = _fmt(value) + (f" ± {e[entry.se]:.2g}" if entry.se and entry.se in e else "")
            lines.append(f"{entry.headline:<20} {value}")
        return lines

    # ---- rendering -------------------------------------------------------------------------

    def _rows(self) -> list[tuple[str, list[tuple[str, str, str]]]]:
        e = self._entries
        rows: dict[str, list[tuple[str, str, str]]] = {title: [] for title in SECTIONS}
        for entry in LAYOUT:
            if entry.section is None or entry.key not in e:
                continue
            value = _fmt(e[entry.key]) + (" ± " + _se(e[entry.se]) if entry.se and entry.se in e else "")
            note = e.get("valley_definition", "") if entry.key.endswith("valley_mass") else entry.note
            rows[entry.section].append((entry.label, value, note))
        if rows[_MAP] and "log_slope_quantiles" in e:
            rows[_MAP][1:1] = [(f"  quantile {q}", _fmt(v), "per coordinate")
                               for q, v in e["log_slope_quantiles"].items()]
        for r in e.get("missed_modes", [])[:8]:
            rows[_MODES].append((f"  missed at {_fmt([round(v, 3) for v in r['location']])}",
                                 f"{r['expected_mass']:.3g}", f"flow {r['flow_mass']:.3g}; density "
                                 f"{math.exp(min(r['log_density_ratio'], 700)):.3g}x too low"))
        for name, x in e.get("expectations", {}).items():
            note = f"flow average {x['flow']:.4g} ± {x['flow_se']:.2g}"
            if "exact" in x:
                note += f"; exact samples {x['exact']:.4g} ± {x['exact_se']:.2g}"
            rows[_EXPECT].append((name, f"{x['is']:.4g} ± {x['is_se']:.2g}", note))
        return [(title, r) for title, r in rows.items() if r]

    def _header(self) -> list[str]:
        e = self._entries
        lines = [f"n = {e.get('n')} flow samples ({e.get('n_dropped', 0)} dropped: a NaN or +inf log "
                 f"density, or a non-finite sample; zero density (-inf) is kept, with weight 0)"]
        if "n_exact" in e:
            lines.append(f"{e['n_exact']} target samples from {e.get('reference_source')} "
                         f"({e.get('n_dropped_exact', 0)} dropped)")
        if e.get("frac_zero_density"):
            lines.append(f"{100 * e['frac_zero_density']:.2f}% of flow samples where p~ = 0")
        return lines

    def to_text(self) -> str:
        """A plain-text report: verdict first, then one section per topic."""
        lines = [self.title, f"verdict: {self.get('verdict', '')}", *self._header()]
        for title, rows in self._rows():
            lines += ["", title]
            lines += [f"  {label:<30} {value:<26} {note}".rstrip() for label, value, note in rows]
        return "\n".join(lines) + "\n"

    def to_markdown(self) -> str:
        """A Markdown report: the verdict in bold, then one table per section."""
        lines = [f"### {self.title}", "", f"**Verdict:** {self.get('verdict', '')}", ""]
        lines += [f"- {h}" for h in self._header()]
        for title, rows in self._rows():
            lines += ["", f"**{title}**", "", "| quantity | value | note |", "|---|---|---|"]
            lines += [f"| {_md(label.strip())} | {_md(value)} | {_md(note)} |" for label, value, note in rows]
        return "\n".join(lines) + "\n"

    def to_json(self, **kwargs) -> str:
        """Strict JSON of all entries; non-finite floats become the strings ``"inf"``,
        ``"-inf"``, ``"nan"``. ``kwargs`` go to :func:`json.dumps` (e.g. ``indent=2``)."""
        return json.dumps(_jsonable(self._entries), allow_nan=False, **kwargs)


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
