"""A trace's own traffic through the exact general-service engine, beside the fitted Markov model
(``jaxq trace simulate``; docs/traces.md, "Simulating the trace").

**Four models**, each one step further from the trace; every one is run as a replay of jobs (each with
its arrival time, class and prompt and output tokens) on the general engine, so that every model has
per-job latencies (:func:`job_latencies`), and each step of the chain changes one thing:

* **replay**: the trace itself (:func:`trace_jobs`), the same in every replica: replicas differ only in
  the patience draws (exponential, the scenario's theta: the trace records no abandonment) and the
  policy's own random choices, so its intervals are over those alone.
* **shuffled**: the trace's arrival times and classes, with each class's (prompt, output) pairs randomly
  permuted per replica (:func:`shuffled_jobs`): what is lost is which job came when (a burst of long
  prompts stays a burst of arrivals, not of long ones).
* **resampled** (key ``trace``): per class a Poisson process whose expected count in each bin of
  ``bin_s`` seconds is the trace's count there, times uniform within the bin, and each job's pair drawn
  with replacement from the class's own pairs (:func:`resampled_jobs`): the rate pattern over bins and
  the joint length law are kept, the arrivals' structure within a bin is not.
* **Markov**: the fitted scenario as written (:func:`markov_jobs`): constant rates n lam_i, exponential
  lengths with the class means: what the paper's model predicts. (With exponential lengths the general
  engine is the exact engine's CTMC in distribution.)

The models' gaps (GAPS) are differences of independent samples, standard error sqrt(se_a^2 + se_b^2).
The library keeps the engine-side forms of the resampled model too (:func:`trace_scenario`: a
:class:`jaxq.model.scenario.ArrivalSchedule` and an empirical :class:`ServiceLaw`, lengths drawn
independently), usable without a trace's job list; the schedule's factor in bin s is
``f_{i,s} = count_{i,s} / (n lam_i len_s)``, so its expected count is the trace's, as here.

**Warm-up.** The engine starts empty; the first ``WARMUP_FRACTION`` of the horizon is left out of every
metric (arrivals count from t = 0, the first request's time).
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
MODELS = ("replay", "shuffled", "trace", "markov")
MODEL_TITLES = {"replay": "replay", "shuffled": "shuffled lengths", "trace": "resampled", "markov": "Markov model"}
# the CSV's gap rows: (name, model, against), each model minus against. The chain replay -> shuffled ->
# resampled -> Markov changes one thing at a time (module docstring, "Four models").
GAPS = (("gap", "markov", "trace"), ("gap_replay", "markov", "replay"), ("resampling_gap", "trace", "replay"),
        ("order_gap", "shuffled", "replay"), ("arrival_gap", "trace", "shuffled"))


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


def _replica_rngs(seed: int, model: str, replicas: int):
    """One NumPy generator per replica for a model's generated traces (independent of the engine's keys)."""
    tag = MODELS.index(model)
    return [np.random.default_rng([seed, tag, r]) for r in range(replicas)]


def _class_jobs(trace: Trace, fit: TraceFit, j: int):
    mine = fit.labels == j
    return trace.arrival_s[mine], trace.prompt_tokens[mine].astype(np.float64), trace.output_tokens[mine].astype(np.float64)


def _per_replica(model: str, replicas: int, seed: int, num_classes: int, draw):
    """``replicas`` TraceJobs, replica r's class j jobs ``draw(rng_r, j)`` = (arrival, prompt, output)."""
    from ..sim.general import TraceJobs

    out = []
    for rng in _replica_rngs(seed, model, replicas):
        parts = []
        for j in range(num_classes):
            t, p, d = draw(rng, j)
            parts.append((t, p, d, np.full(len(t), j, np.int64)))
        out.append(TraceJobs.of(*(np.concatenate(x) for x in zip(*parts)), num_classes))
    return out


def shuffled_jobs(trace: Trace, fit: TraceFit, replicas: int, seed: int = 0):
    """Per replica, the trace with each class's (prompt, output) pairs randomly permuted among that
    class's arrival times: the arrival times, the classes and the length pairs are the trace's, only
    which job comes when is lost (the lengths' order in time)."""
    classes = [_class_jobs(trace, fit, j) for j in range(fit.num_classes)]

    def draw(rng, j):
        t, p, d = classes[j]
        o = rng.permutation(len(t))
        return t, p[o], d[o]

    return _per_replica("shuffled", replicas, seed, fit.num_classes, draw)


def resampled_jobs(trace: Trace, fit: TraceFit, replicas: int, seed: int = 0, bin_s: float = DEFAULT_BIN_S,
                   horizon: float | None = None):
    """Per replica, new traffic like the trace's: class i's arrivals a Poisson process with the trace's
    count in each bin of ``bin_s`` s as its expected count there (uniform times within the bin; after
    the trace's end, up to ``horizon``, the last bin's rate), each job's (prompt, output) pair drawn
    with replacement from the class's own pairs (jointly: their correlation kept)."""
    horizon = float(trace.duration_s if horizon is None else horizon)
    edges = bin_edges(trace.duration_s, bin_s)
    counts = class_bin_counts(trace, fit, edges).astype(np.float64)
    if horizon > edges[-1]:  # the last bin's rate continues
        last = counts[:, -1] / (edges[-1] - edges[-2])
        counts = np.concatenate([counts, (last * (horizon - edges[-1]))[:, None]], axis=1)
        edges = np.append(edges, horizon)
    classes = [_class_jobs(trace, fit, j) for j in range(fit.num_classes)]

    def draw(rng, j):
        _, p, d = classes[j]
        m = rng.poisson(counts[j])
        t = np.concatenate([rng.uniform(lo, hi, c) for lo, hi, c in zip(edges[:-1], edges[1:], m)])
        pick = rng.integers(0, len(p), len(t))
        return t, p[pick], d[pick]

    return _per_replica("trace", replicas, seed, fit.num_classes, draw)


def markov_jobs(scenario, replicas: int, horizon: float, seed: int = 0):
    """Per replica, traffic of the fitted Markov model: class i's arrivals Poisson at n lam_i, its prompt
    and output lengths exponential with means P_i, D_i (continuous, as the engine's exponential law)."""
    n = scenario.cluster.n
    lam, P, D = (np.asarray(x, np.float64) for x in (scenario.classes.lam, scenario.classes.P, scenario.classes.D))
    tiny = np.nextafter(0.0, 1.0)

    def draw(rng, j):
        m = rng.poisson(n * lam[j] * horizon)
        t = np.sort(rng.uniform(0.0, horizon, m))
        return t, np.maximum(rng.exponential(P[j], m), tiny), np.maximum(rng.exponential(D[j], m), tiny)

    return _per_replica("markov", replicas, seed, len(lam), draw)


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
LATENCIES = ("ttft_s", "tpot_s", "end_to_end_s")  # as jaxq.sim.general.LATENCIES


def job_latencies(state) -> dict[str, np.ndarray]:
    """Per replica, the percentiles (PERCENTILES) over a replay's jobs of their own latencies, from the
    engine's counts of them (``state.gpus.latency_counts``, log bins of 4.1%, interpolated: see
    :func:`jaxq.sim.general.latency_percentiles`): TTFT = first token - arrival, end-to-end = last
    token - arrival, TPOT = (last token - first token) / the job's output tokens (the wait in a decode
    buffer included: what the user sees between tokens). Over the jobs that arrived after the warm-up
    and reached that point by the horizon (abandoned and unfinished jobs have no latency; their share
    is the abandonment rows'), all classes together. Keys ``ttft_s_p50`` ..., values (R,)."""
    from ..sim.general import latency_percentiles

    pooled = np.asarray(state.gpus.latency_counts).sum(2)  # (R, latency, bin)
    values = latency_percentiles(pooled, PERCENTILES)
    return {f"{m}_p{q}": values[:, i, k] for i, m in enumerate(LATENCIES) for k, q in enumerate(PERCENTILES)}


LABELS = {"revenue_per_gpu_s": "revenue / GPU / s", "arrival_rate": "arrivals / GPU / s",
          "throughput": "throughput / GPU / s", "ttft_s": "TTFT (s)", "tpot_s": "TPOT (s)",
          "end_to_end_s": "end-to-end (s)", "abandon_prefill": "abandon prefill", "abandon_decode": "abandon decode"}


def _label(key: str) -> str:
    base, _, cls = key.partition("[")
    for q in PERCENTILES:
        if base.endswith(f"_p{q}"):
            return f"{LABELS[base[:-len(f'_p{q}')]]} p{q}"
    return LABELS[base] + (f" [{cls}" if cls else "")


def _stat(samples: np.ndarray):
    """The replicas' :class:`jaxq.metrics.summary.Estimate` (mean, se, 95% interval lo..hi), as floats."""
    from ..metrics.summary import Estimate, estimate

    e = estimate(samples)
    return Estimate(mean=float(e.mean), se=float(e.se), lo=float(e.lo), hi=float(e.hi), replicas=e.replicas)


def _ci(e) -> float:
    """The 95% interval's half-width."""
    return e.hi - e.mean


@dataclasses.dataclass(frozen=True)
class PolicyComparison:
    """One policy: per metric, the replay's, the trace-driven and the Markov model's estimates, and the
    LP's R*."""

    policy: str
    lp_value: float
    stats: dict[str, dict]  # model -> metric -> jaxq.metrics.summary.Estimate
    status: dict[str, dict[str, int]]  # model -> status bits raised (replicas)

    def gap(self, metric: str, model: str = "markov", against: str = "trace") -> tuple[float, float, float]:
        """(model - against, its standard error, 95% half-width): independent samples."""
        a, b = self.stats[model][metric], self.stats[against][metric]
        se = math.hypot(a.se, b.se)
        df = max(a.replicas + b.replicas - 2, 1)
        return a.mean - b.mean, se, float(stats.t.ppf(0.975, df)) * se

    def format(self) -> str:
        w = max(len(_label(m)) for m in self.stats["trace"]) + 2
        col = 18
        lines = [f"policy {self.policy}: bundled LP R* = {self.lp_value:.6g} per GPU per s",
                 f"  {'metric':<{w}}" + "".join(f"{MODEL_TITLES[x]:>{col}}" for x in MODELS)
                 + f"{'Markov - replay':>{col + 2}}{'z':>6}"]
        for m in self.stats["trace"]:
            g, se, ci = self.gap(m, "markov", "replay")
            z = g / se if se > 0 else float("nan")
            lines.append(f"  {_label(m):<{w}}" + "".join(f"{_fmt(self.stats[x][m].mean, _ci(self.stats[x][m])):>{col}}"
                                                         for x in MODELS) + f"{_fmt(g, ci):>{col + 2}}{z:>6.1f}")
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
            seed: int = 0, traffic: dict | None = None) -> PolicyComparison:
    """Run ``policy`` on the four models (MODELS: the replay of the trace, its shuffled lengths, the
    resampled traffic and the fitted Markov model ``scenario``), the same ``replicas`` engine keys (from
    ``seed``), ``horizon`` (default: the trace's duration) and ``warmup`` (default ``WARMUP_FRACTION``
    of it); the general engine for all. ``traffic``: the models' jobs from :func:`model_traffic` (built
    here if None; pass it to reuse it across policies)."""
    import jaxq
    from ..lp import solve_bundled

    horizon = float(trace.duration_s if horizon is None else horizon)
    warmup = WARMUP_FRACTION * horizon if warmup is None else float(warmup)
    if traffic is None:
        traffic = model_traffic(trace, fit, scenario, replicas=replicas, horizon=horizon, bin_s=bin_s, seed=seed)
    driven, law = trace_scenario(trace, fit, scenario, bin_s)
    from ..sim.batch import default_room

    n = scenario.cluster.n
    room = max(default_room(driven, n), default_room(scenario, n))  # one room size: one program
    out, status = {}, {}
    for model in MODELS:
        # every model is a list of per-replica traces, and the law (unused: each job brings its own
        # tokens) is the trace's for all, so the four share one compiled program
        # (arrivals come from the jobs: the rate schedule is left out, as its pytree would be a second program)
        sc = scenario if model == "markov" else driven.replace(arrivals=None)
        res = jaxq.run(sc, policy, replicas=replicas, horizon=horizon, warmup=warmup, seed=seed,
                       engine="general", service=law, replay=traffic[model], room=room)
        out[model] = {m: _stat(v) for m, v in table_metrics(res.metrics, sc).items()}
        out[model] |= {m: _stat(v) for m, v in job_latencies(res.state).items()}
        status[model] = res.status
    # the bundled LP's value whatever LP the policy plans with (res.lp_value is the policy's own)
    return PolicyComparison(policy=policy, lp_value=float(solve_bundled(scenario).value), stats=out, status=status)


def model_traffic(trace: Trace, fit: TraceFit, scenario, *, replicas: int = DEFAULT_REPLICAS,
                  horizon: float | None = None, bin_s: float = DEFAULT_BIN_S, seed: int = 0) -> dict:
    """Each model's jobs, one TraceJobs per replica: the trace itself in every replica for the replay
    (a list, so that the four models share one compiled program), one generated trace per replica for
    the others (:func:`shuffled_jobs`, :func:`resampled_jobs`, :func:`markov_jobs`)."""
    horizon = float(trace.duration_s if horizon is None else horizon)
    return {"replay": [trace_jobs(trace, fit)] * replicas, "shuffled": shuffled_jobs(trace, fit, replicas, seed),
            "trace": resampled_jobs(trace, fit, replicas, seed, bin_s, horizon),
            "markov": markov_jobs(scenario, replicas, horizon, seed)}


def write_csv(path: str | os.PathLike, comparisons) -> Path:
    """One row per policy x model x metric (mean, se, 95% half-width ci, replicas), then the gap rows
    (GAPS: ``gap``: Markov minus resampled; ``gap_replay``: Markov minus replay; ``resampling_gap``:
    resampled minus replay; ``order_gap``: shuffled minus replay; ``arrival_gap``: resampled minus
    shuffled) and the LP's R* (model ``lp``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["policy", "model", "metric", "mean", "se", "ci", "replicas"])
        for c in comparisons:
            for model in MODELS:
                for m, s in c.stats[model].items():
                    wr.writerow([c.policy, model, m, repr(s.mean), repr(s.se), repr(_ci(s)), s.replicas])
            for name, model, against in GAPS:
                for m in c.stats["trace"]:
                    g, se, ci = c.gap(m, model, against)
                    wr.writerow([c.policy, name, m, repr(g), repr(se), repr(ci), ""])
            wr.writerow([c.policy, "lp", "revenue_per_gpu_s", repr(c.lp_value), "", "", ""])
    return path
