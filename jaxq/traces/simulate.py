"""A trace's own traffic through the exact general-service engine, beside the fitted Markov model
(``jaxq trace simulate``; docs/traces.md, "Simulating the trace").

**The replay** is the trace itself (:class:`jaxq.sim.general.TraceJobs`): every job arrives at its own
time, in its fitted class, with its own prompt and output tokens. Its replicas are all the trace; they
differ only in the patience draws (exponential, the scenario's theta: the trace records no
abandonment) and the policy's own random choices, so its intervals are over those alone.

**The trace-driven resampled scenario** is the fitted scenario (:func:`jaxq.traces.fit.fitted_scenario`)
with two things taken from the trace instead of assumed:

* *rates*: an arrival schedule (:class:`jaxq.model.scenario.ArrivalSchedule`) with one piece per bin of
  ``bin_s`` seconds from the first request (the last bin ends at the last request and may be shorter;
  its factor also holds after it). Class i's factor in bin s is the class's count there over the count
  the scenario's constant rate gives in that bin, ``f_{i,s} = count_{i,s} / (n lam_i len_s)``: the
  schedule's expected count in every bin is the trace's count, exactly (``lam_i`` is the scenario's, as
  rounded in its file). Nothing is smoothed or tuned: the bin width is the only choice.
* *lengths*: the empirical law (:meth:`jaxq.sim.general.ServiceLaw.empirical`) of each class's own
  prompt and output lengths, with the scenario's P_i, D_i set to their means (``law.with_means``). A
  job's prompt and output lengths are drawn independently within its class (the trace's correlation of
  log prompt and log output is 0.09 on the Azure file).

Arrivals stay a (nonstationary) Poisson process and lengths are resampled, so every replica is a new
draw of traffic like the trace's, not a replay of it.

**The fitted Markov model** is the fitted scenario as written: constant rates, exponential lengths,
what the paper's model predicts. Both run through the general engine (``engine="general"``; with
exponential lengths it is the exact engine's CTMC in distribution) on the same replica keys, so their
arrival and length streams share the same uniforms (common random numbers). The gap, model minus
trace, has the standard error of independent samples, sqrt(se_model^2 + se_trace^2), which the common
numbers can only make conservative.

**Warm-up.** The engine starts empty; the first ``WARMUP_FRACTION`` of the horizon is left out of every
metric (the schedule still counts from t = 0, the first request's time).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from pathlib import Path

import numpy as np
from scipy import stats

from .fit import TraceFit
from .reader import Trace

DEFAULT_BIN_S = 300.0
DEFAULT_REPLICAS = 64
WARMUP_FRACTION = 0.1
MODELS = ("replay", "trace", "markov")
MODEL_TITLES = {"replay": "replay", "trace": "trace-driven", "markov": "Markov model"}


# ----------------------------------------------------------------------------------------------------
# the trace-driven scenario
# ----------------------------------------------------------------------------------------------------


def bin_edges(duration_s: float, bin_s: float) -> np.ndarray:
    """0, bin_s, 2 bin_s, ... and the duration as the last edge (the last bin may be shorter)."""
    if not (math.isfinite(bin_s) and bin_s > 0):
        raise ValueError(f"bin: must be a number of seconds > 0, got {bin_s!r}")
    if not duration_s > 0:
        raise ValueError(f"duration: the trace must span a positive time, got {duration_s!r}")
    inner = np.arange(1, math.ceil(duration_s / bin_s)) * bin_s
    return np.concatenate([[0.0], inner[inner < duration_s], [duration_s]])


def class_bin_counts(trace: Trace, fit: TraceFit, edges: np.ndarray) -> np.ndarray:
    """(K, S) requests of each class in each bin [e_s, e_{s+1}), the last bin closed."""
    s = np.searchsorted(edges[1:-1], trace.arrival_s, side="right")
    k = fit.num_classes
    return np.bincount(fit.labels * (len(edges) - 1) + s, minlength=k * (len(edges) - 1)).reshape(k, -1)


def rate_schedule(trace: Trace, fit: TraceFit, scenario, bin_s: float = DEFAULT_BIN_S):
    """The :class:`ArrivalSchedule` whose expected count of class i in bin s is the trace's
    (module docstring): ``f_{i,s} = count_{i,s} / (n lam_i len_s)`` with the scenario's n and lam."""
    from ..model.scenario import ArrivalSchedule

    edges = bin_edges(trace.duration_s, bin_s)
    counts = class_bin_counts(trace, fit, edges)
    base = scenario.cluster.n * np.asarray(scenario.classes.lam, dtype=np.float64)
    factors = counts / (base[:, None] * np.diff(edges)[None, :])
    return ArrivalSchedule(edges[:-1].tolist(), factors.tolist())


def empirical_law(trace: Trace, fit: TraceFit):
    """Each class's own prompt and output lengths as an empirical law (drawn independently)."""
    from ..sim.general import ServiceLaw

    k = fit.num_classes
    prompts = [trace.prompt_tokens[fit.labels == j].astype(np.float64) for j in range(k)]
    outputs = [trace.output_tokens[fit.labels == j].astype(np.float64) for j in range(k)]
    return ServiceLaw.empirical(prompts, outputs)


def trace_jobs(trace: Trace, fit: TraceFit):
    """The trace's own jobs, in its fitted classes, to replay (:class:`jaxq.sim.general.TraceJobs`)."""
    from ..sim.general import TraceJobs

    return TraceJobs.of(trace.arrival_s, trace.prompt_tokens, trace.output_tokens, fit.labels, fit.num_classes)


def trace_scenario(trace: Trace, fit: TraceFit, scenario, bin_s: float = DEFAULT_BIN_S):
    """(the trace-driven scenario, its empirical law): ``scenario`` with the trace's rate schedule and
    its P_i, D_i set to the samples' means."""
    law = empirical_law(trace, fit)
    return law.with_means(scenario.replace(arrivals=rate_schedule(trace, fit, scenario, bin_s))), law


# ----------------------------------------------------------------------------------------------------
# simulation and comparison
# ----------------------------------------------------------------------------------------------------


def _weighted(values, weights):
    """Per replica, sum_i w_i v_i / sum_i w_i over the classes with w_i > 0 (NaN where none)."""
    v, w = np.asarray(values, float), np.asarray(weights, float)
    use = (w > 0) & np.isfinite(v)
    num = np.where(use, w * np.where(use, v, 0.0), 0.0).sum(-1)
    den = np.where(use, w, 0.0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def table_metrics(metrics: dict, scenario) -> dict[str, np.ndarray]:
    """The compared metrics per replica (R,): overall, then per class (``name[class]``). Overall means
    are per arriving job (TTFT, end-to-end, abandonment: weights = arrivals of each class) or per
    output token (TPOT: weights = throughput x D_i)."""
    arr, thr = metrics["arrival_rate"], metrics["throughput"]
    D = np.asarray(scenario.classes.D, dtype=np.float64)
    out = {
        "revenue_per_gpu_s": metrics["revenue_bundled"],
        "arrival_rate": arr.sum(-1),
        "throughput": thr.sum(-1),
        "ttft_s": _weighted(metrics["time_to_first_token"], arr),
        "tpot_s": _weighted(metrics["time_per_output_token"], thr * D),
        "end_to_end_s": _weighted(metrics["end_to_end"], arr),
        "abandon_prefill": _weighted(metrics["abandon_prefill_fraction"], arr),
        "abandon_decode": _weighted(metrics["abandon_decode_fraction"], arr),
    }
    per_class = {"throughput": thr, "ttft_s": metrics["time_to_first_token"],
                 "tpot_s": metrics["time_per_output_token"], "end_to_end_s": metrics["end_to_end"],
                 "abandon_prefill": metrics["abandon_prefill_fraction"],
                 "abandon_decode": metrics["abandon_decode_fraction"]}
    for name, v in per_class.items():
        for i, cls in enumerate(scenario.classes.names):
            out[f"{name}[{cls}]"] = v[:, i]
    return out


PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft_s", "tpot_s", "end_to_end_s")


def job_latencies(state, jobs, warmup: float, horizon: float) -> dict[str, np.ndarray]:
    """Per replica, the percentiles (PERCENTILES) over the replay's jobs of their own latencies, from
    the engine's per-job record (``state.gpus.first_token``, ``.finished``): TTFT = first token -
    arrival, end-to-end = last token - arrival, TPOT = (last token - first token) / the job's output
    tokens (the wait in a decode buffer included: what the user sees between tokens). Over the jobs that
    arrived in [warmup, horizon] and finished by the horizon (abandoned and unfinished jobs have no
    latency; their share is the abandonment rows'). Keys ``ttft_s_p50`` ..., values (R,)."""
    table = jobs.arrays()
    arrival, output = np.asarray(table.arrival), np.asarray(table.output)
    first, done = np.asarray(state.gpus.first_token), np.asarray(state.gpus.finished)
    window = (arrival >= warmup) & (arrival <= horizon)
    out = {f"{m}_p{q}": np.full(first.shape[0], np.nan) for m in LATENCIES for q in PERCENTILES}
    for r in range(first.shape[0]):
        ok = window & np.isfinite(done[r])
        with np.errstate(invalid="ignore"):  # unrecorded (+inf) minus the padding's +inf arrival
            values = {"ttft_s": (first[r] - arrival)[window & np.isfinite(first[r])],
                      "tpot_s": ((done[r] - first[r]) / output)[ok], "end_to_end_s": (done[r] - arrival)[ok]}
        for m, v in values.items():
            if v.size:
                for q, x in zip(PERCENTILES, np.percentile(v, PERCENTILES)):
                    out[f"{m}_p{q}"][r] = x
    return out


LABELS = {"revenue_per_gpu_s": "revenue / GPU / s", "arrival_rate": "arrivals / GPU / s",
          "throughput": "throughput / GPU / s", "ttft_s": "TTFT (s)", "tpot_s": "TPOT (s)",
          "end_to_end_s": "end-to-end (s)", "abandon_prefill": "abandon prefill", "abandon_decode": "abandon decode"}


def _label(key: str) -> str:
    base, _, cls = key.partition("[")
    for q in PERCENTILES:
        if base.endswith(f"_p{q}"):
            return f"{LABELS[base[:-len(f'_p{q}')]]} p{q}"
    return LABELS[base] + (f" [{cls}" if cls else "")


@dataclasses.dataclass(frozen=True)
class Stat:
    mean: float
    se: float
    ci: float  # half-width of the 95% interval
    replicas: int


def _stat(samples: np.ndarray) -> Stat:
    from ..metrics.summary import estimate

    e = estimate(samples)
    return Stat(float(e.mean), float(e.se), float(e.hi - e.mean), e.replicas)


@dataclasses.dataclass(frozen=True)
class PolicyComparison:
    """One policy: per metric, the replay's, the trace-driven and the Markov model's estimates, and the
    LP's R*."""

    policy: str
    lp_value: float
    stats: dict[str, dict[str, Stat]]  # model -> metric -> Stat
    status: dict[str, dict[str, int]]  # model -> status bits raised (replicas)

    def gap(self, metric: str, model: str = "markov", against: str = "trace") -> tuple[float, float, float]:
        """(model - against, its standard error, 95% half-width): independent samples."""
        a, b = self.stats[model][metric], self.stats[against][metric]
        se = math.hypot(a.se, b.se)
        df = max(a.replicas + b.replicas - 2, 1)
        return a.mean - b.mean, se, float(stats.t.ppf(0.975, df)) * se

    def format(self) -> str:
        w = max(len(_label(m)) for m in self.stats["trace"]) + 2
        lines = [f"policy {self.policy}: bundled LP R* = {self.lp_value:.6g} per GPU per s",
                 f"  {'metric':<{w}}{'replay':>22}{'trace-driven':>22}{'Markov model':>22}"
                 f"{'gap (model - replay)':>24}{'z':>7}"]
        for m in self.stats["trace"]:
            r, t, k = (self.stats[x][m] for x in MODELS)
            g, se, ci = self.gap(m, "markov", "replay")
            z = g / se if se > 0 else float("nan")
            lines.append(f"  {_label(m):<{w}}{_fmt(r.mean, r.ci):>22}{_fmt(t.mean, t.ci):>22}{_fmt(k.mean, k.ci):>22}"
                         f"{_fmt(g, ci):>24}{z:>7.1f}")
        extra = [m for m in self.stats["replay"] if m not in self.stats["trace"]]
        if extra:
            lines.append("  replay, per-job latency percentiles (over the jobs after the warm-up that finished; mean "
                         "over replicas ± 95% CI):")
            lines += [f"  {_label(m):<{w}}{_fmt(self.stats['replay'][m].mean, self.stats['replay'][m].ci):>22}"
                      for m in extra]
        for model, bits in self.status.items():
            if bits:
                lines.append(f"  {MODEL_TITLES[model]}: status " + ", ".join(f"{b} on {r} replicas" for b, r in bits.items()))
        return "\n".join(lines)


def _fmt(v: float, ci: float) -> str:
    if not math.isfinite(v):
        return "n/a"
    return f"{v:.4g} ± {ci:.2g}" if math.isfinite(ci) else f"{v:.4g} ± n/a"


def compare(trace: Trace, fit: TraceFit, scenario, policy: str, *, replicas: int = DEFAULT_REPLICAS,
            horizon: float | None = None, warmup: float | None = None, bin_s: float = DEFAULT_BIN_S,
            seed: int = 0) -> PolicyComparison:
    """Run ``policy`` on the replay of the trace, on the trace-driven scenario and on ``scenario`` (the
    fitted Markov model), the same ``replicas`` keys (from ``seed``), ``horizon`` (default: the trace's
    duration) and ``warmup`` (default ``WARMUP_FRACTION`` of it); the general engine for all three."""
    import jaxq
    from ..lp import solve_bundled

    horizon = float(trace.duration_s if horizon is None else horizon)
    warmup = WARMUP_FRACTION * horizon if warmup is None else float(warmup)
    driven, law = trace_scenario(trace, fit, scenario, bin_s)
    out, status = {}, {}
    runs = {"replay": (driven, law, trace_jobs(trace, fit)), "trace": (driven, law, None),
            "markov": (scenario, "exponential", None)}
    for model, (sc, service, replay) in runs.items():
        res = jaxq.run(sc, policy, replicas=replicas, horizon=horizon, warmup=warmup, seed=seed,
                       engine="general", service=service, replay=replay)
        out[model] = {m: _stat(v) for m, v in table_metrics(res.metrics, sc).items()}
        if replay is not None:
            out[model] |= {m: _stat(v) for m, v in job_latencies(res.state, replay, warmup, horizon).items()}
        status[model] = res.status
    # the bundled LP's value whatever LP the policy plans with (res.lp_value is the policy's own)
    return PolicyComparison(policy=policy, lp_value=float(solve_bundled(scenario).value), stats=out, status=status)


def write_csv(path: str | os.PathLike, comparisons) -> Path:
    """One row per policy x model x metric (mean, se, 95% half-width ci, replicas), then the gap rows
    (model ``gap``: Markov minus trace-driven; ``gap_replay``: Markov minus replay; ``resampling_gap``:
    trace-driven minus replay) and the LP's R* (model ``lp``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["policy", "model", "metric", "mean", "se", "ci", "replicas"])
        for c in comparisons:
            for model in MODELS:
                for m, s in c.stats[model].items():
                    wr.writerow([c.policy, model, m, repr(s.mean), repr(s.se), repr(s.ci), s.replicas])
            for name, model, against in (("gap", "markov", "trace"), ("gap_replay", "markov", "replay"),
                                         ("resampling_gap", "trace", "replay")):
                for m in c.stats["trace"]:
                    g, se, ci = c.gap(m, model, against)
                    wr.writerow([c.policy, name, m, repr(g), repr(se), repr(ci), ""])
            wr.writerow([c.policy, "lp", "revenue_per_gpu_s", repr(c.lp_value), "", "", ""])
    return path
