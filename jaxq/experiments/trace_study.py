"""Real workloads: every policy on a production LLM trace, and what the paper's fitted model misses.

    jaxq reproduce trace --size quick      # the study: all policies, 64 replicas (~15 min on 2 cores)

The Azure conversation trace (one hour, 19,366 requests; shipped as jaxq/data/AzureLLMInferenceTrace_conv.csv,
CC-BY 4.0, attribution in jaxq/data/README.md) is fitted to K = 3 classes (k-means on log lengths,
:func:`jaxq.traces.fit.fit_trace`) with the qwen-8b timing and prices, B = 16, C = 256 and patience 0.1
/s, all as ``jaxq trace fit`` does by default. The cluster is the smallest n whose bundled LP serves the
whole load (``--n auto``: near capacity), and the same cluster is run a second time at 80% of that load:
the trace's arrival times stretched by 1/0.8 (every job, its class and its lengths kept; the fitted
rates scale by 0.8).

At each load every built-in policy runs on the four models of :mod:`jaxq.traces.simulate` (the trace
replayed job by job; its lengths shuffled within class; resampled Poisson-per-bin traffic with the
class's own length pairs; the fitted Markov model), the same engine keys, on the exact general-service
engine, and the fluid/LP plan gives its own prediction (R*, throughput, the share served, and by
Little's law on its queues the mean TTFT and the prefill abandonment). Written:

* ``trace.csv``: per load, policy, model and metric the mean, SE, 95% interval and replicas (metrics:
  revenue, arrival rate, throughput, mean TTFT, TPOT, end-to-end, abandonment, per class and overall,
  and the per-job p50/p90/p99 of TTFT, TPOT and end-to-end); model ``lp`` rows for the LP's numbers;
* ``gaps.csv``: per load, policy and metric each gap of :data:`jaxq.traces.simulate.GAPS` with its SE;
* figures: ``latency.png`` (mean and p99 TTFT and end-to-end per policy and model), ``revenue.png``
  (revenue / R* per policy and model), ``gap-decomposition.png`` (for GG-SP, Markov minus replay split
  into the chain's steps: lengths' order, arrivals within a bin, length law and rates);
* claims: GG-SP earns the most on the trace; the Markov model ranks the policies as the trace does;
  it predicts the trace's TTFT within 10%; the LP's R* bounds the trace's revenue.
"""

from __future__ import annotations

import dataclasses
import math
import time
from importlib import resources

import numpy as np

TITLE = "Real workloads: every policy on the Azure LLM trace vs the fitted Markov model and the LP"
TRACE = "AzureLLMInferenceTrace_conv.csv"
SIZES = {
    "smoke": {"classes": 3, "window_s": 300.0, "loads": [1.0, 0.8], "replicas": 2, "policies": ["gg-sp", "fi-wsp"],
              "bin_s": 60.0},
    "quick": {"classes": 3, "window_s": None, "loads": [1.0, 0.8], "replicas": 64, "policies": "all", "bin_s": 300.0},
    "paper": {"classes": 3, "window_s": None, "loads": [1.0, 0.8], "replicas": 256, "policies": "all", "bin_s": 300.0},
}
# the metrics of the figures and claims
HEADLINE = ("revenue_per_gpu_s", "ttft_s", "ttft_s_p90", "ttft_s_p99", "end_to_end_s", "end_to_end_s_p99",
            "abandon_prefill")
STEPS = (("order_gap", "lengths' order in time"), ("arrival_gap", "arrivals within a bin"),
         ("gap", "length law and constant rates"))
TTFT_TOLERANCE = 0.10


def trace_path(settings) -> str:
    """The trace file: settings["trace"] if given, else the copy shipped with jaxq."""
    if settings.get("trace"):
        return str(settings["trace"])
    return str(resources.files("jaxq") / "data" / TRACE)


def _window(trace, seconds):
    """The requests of the first ``seconds`` of the trace (all if None)."""
    if seconds is None:
        return trace
    keep = trace.arrival_s <= seconds
    if keep.sum() < 2:
        raise ValueError(f"invalid field 'window_s': the first {seconds:g} s hold fewer than two requests")
    pick = {f: getattr(trace, f)[keep] for f in ("arrival_s", "prompt_tokens", "output_tokens")}
    if trace.labels is not None:
        pick["labels"] = trace.labels[keep]
    return dataclasses.replace(trace, **pick)


def _check_load(load) -> float:
    if not (isinstance(load, (int, float)) and load > 0 and math.isfinite(load)):
        raise ValueError(f"invalid field 'loads': each must be a number > 0, got {load!r}")
    return float(load)


def at_load(trace, load: float):
    """The trace at ``load`` times its rate: every arrival time divided by ``load`` (jobs, classes and
    lengths unchanged)."""
    load = _check_load(load)
    return trace if load == 1.0 else dataclasses.replace(trace, arrival_s=trace.arrival_s / load)


def default_choices():
    """`jaxq trace fit`'s defaults: qwen-8b timing and prices, B = 16, C = 256, patience 0.1 /s."""
    from ..traces.cli import DEFAULT_CALIBRATION, _prices, _timing
    from ..traces.fit import ScenarioChoices

    law, source = _timing(DEFAULT_CALIBRATION)
    c_p, c_d, scheme, _ = _prices(None)
    return ScenarioChoices(n=1, B=16, C=256, alpha=law.alpha, beta=law.beta, gamma=law.gamma, timing_source=source,
                           patience=0.1, c_p=c_p, c_d=c_d, scheme=scheme)


def _lp_rows(prefix, scenario, trace, fit):
    """The bundled LP's R*, throughput and share served at the fitted rates (the hour's means), and its
    R* at the rates of the window the simulations measure (after the warm-up): the bound on what they
    can earn there (the trace's rate in the window is not the hour's)."""
    from ..lp import solve_bundled
    from ..sim.general import phase_speeds
    from ..traces.simulate import WARMUP_FRACTION

    sol = solve_bundled(scenario)
    thr = np.asarray(sol.throughput, float)
    lam = np.asarray(scenario.classes.lam, float)
    warmup = WARMUP_FRACTION * trace.duration_s
    inside = trace.arrival_s >= warmup
    lam_w = np.bincount(fit.labels[inside], minlength=fit.num_classes) / (
        scenario.cluster.n * (trace.duration_s - warmup))
    window = float(solve_bundled(scenario.replace(**{"classes.lam": lam_w.tolist()})).value)
    # the fluid plan's latency and abandonment, by Little's law on its queues: a job waits q_p,i / lam_i
    # on average, then prefills for P_i / (C / tau); theta_i q_p,i of lam_i abandon while waiting
    prefill_speed = float(phase_speeds(scenario.params())[0])
    q_p, theta = np.asarray(sol.q_p, float), np.asarray(scenario.classes.theta, float)
    ttft = q_p / lam + np.asarray(scenario.classes.P, float) / prefill_speed
    abandon = theta * q_p / lam
    rows = [{**prefix, "model": "lp", "metric": m, "mean": v, "se": 0.0, "lo": v, "hi": v, "replicas": ""}
            for m, v in (("revenue_per_gpu_s", float(sol.value)), ("throughput", float(thr.sum())),
                         ("served_fraction", float(thr.sum() / lam.sum())), ("revenue_per_gpu_s_window", window),
                         ("ttft_s", float(np.sum(lam * ttft) / lam.sum())),
                         ("abandon_prefill", float(np.sum(lam * abandon) / lam.sum())))]
    return rows, {"hour": float(sol.value), "window": window}


def reproduce(out, settings, log):
    from ..policies import POLICIES
    from ..traces import simulate as ts
    from ..traces.fit import fit_trace, fitted_scenario, smallest_n
    from ..traces.reader import read_trace

    policies = list(POLICIES) if settings["policies"] == "all" else list(settings["policies"])
    for p in policies:
        if p not in POLICIES:
            raise ValueError(f"invalid field 'policies': each must be one of {', '.join(POLICIES)}, got {p!r}")
    loads = [_check_load(x) for x in settings["loads"]]  # before reading anything
    R, K, bin_s = int(settings["replicas"]), int(settings["classes"]), float(settings["bin_s"])
    seed = int(settings.get("seed", 0))

    base = _window(read_trace(trace_path(settings)), settings.get("window_s"))
    choices = default_choices()
    n = smallest_n(fit_trace(base, K), choices)
    choices = dataclasses.replace(choices, n=n, n_source="the smallest n whose bundled LP serves the whole load")
    log(f"trace {TRACE}: {base.num_requests:,} requests over {base.duration_s:,.0f} s; K = {K} classes; n = {n} "
        f"GPUs (the smallest whose LP serves the load); loads {loads}; {len(policies)} policies x "
        f"{len(ts.MODELS)} models x {R} replicas")
    out.number("n", n)
    out.number("requests", base.num_requests)

    rows, gap_rows, cost, results, lp_value = [], [], [], {}, {}
    todo = [(load, p) for load in loads for p in policies]
    prepared = {}
    for load, policy in log.track(todo, weight=lambda item: 1.0 / item[0]):
        if load not in prepared:
            trace = at_load(base, load)
            fit = fit_trace(trace, K)
            scenario = fitted_scenario(fit, choices, name=f"trace-azure-conv-load{load:g}")
            traffic = ts.model_traffic(trace, fit, scenario, replicas=R, bin_s=bin_s, seed=seed)
            prepared[load] = (trace, fit, scenario, traffic)
            lp, lp_value[load] = _lp_rows({"load": load, "policy": "", "n": n}, scenario, trace, fit)
            rows += lp
        trace, fit, scenario, traffic = prepared[load]
        t0 = time.perf_counter()
        c = ts.compare(trace, fit, scenario, policy, replicas=R, bin_s=bin_s, seed=seed, traffic=traffic)
        wall = time.perf_counter() - t0
        results[(load, policy)] = c
        prefix = {"load": load, "policy": policy, "n": n}
        for model in ts.MODELS:
            for m, e in c.stats[model].items():
                rows.append({**prefix, "model": model, "metric": m, "mean": e.mean, "se": e.se, "lo": e.lo,
                             "hi": e.hi, "replicas": e.replicas})
        for name, model, against in ts.GAPS:
            for m in c.stats["trace"]:
                g, se, ci = c.gap(m, model, against)
                gap_rows.append({**prefix, "gap": name, "model": model, "against": against, "metric": m,
                                 "value": g, "se": se, "lo": g - ci, "hi": g + ci})
        flagged = {model: bits for model, bits in c.status.items() if bits}
        cost.append({"load": load, "policy": policy, "models": len(ts.MODELS), "replicas": R, "wall_s": wall,
                     "flagged": str(flagged) if flagged else ""})
        log(f"load {load:g}, {policy}: replay revenue {c.stats['replay']['revenue_per_gpu_s'].mean:.4g}, TTFT "
            f"{c.stats['replay']['ttft_s'].mean:.3g} s (Markov {c.stats['markov']['ttft_s'].mean:.3g} s); {wall:.0f} s"
            + (f"; status {flagged}" if flagged else ""))
    out.number("lp_value", lp_value)
    out.table("trace", rows)
    out.table("gaps", gap_rows)
    out.table("cost", cost)
    out.number("wall_s_per_policy", {f"{c['load']:g}/{c['policy']}": round(c["wall_s"], 1) for c in cost})
    _numbers_and_claims(out, results, lp_value, loads, policies)
    _figures(out, results, lp_value, loads, policies)


def _mean(c, model, metric):
    return c.stats[model][metric].mean


def _numbers_and_claims(out, results, lp_value, loads, policies):
    from ..traces import simulate as ts

    for load in loads:
        for p in policies:
            c = results[(load, p)]
            out.number(f"load{load:g}/{p}", {model: {m: round(_mean(c, model, m), 6) for m in HEADLINE}
                                            for model in ts.MODELS})
    top = loads[0]
    rev = {model: {p: results[(top, p)].stats[model]["revenue_per_gpu_s"] for p in policies} for model in ts.MODELS}
    if "gg-sp" in policies and len(policies) > 1:
        best = max(policies, key=lambda p: rev["replay"][p].mean)
        g = rev["replay"]["gg-sp"]
        others = [p for p in policies if p != "gg-sp"]
        beaten = [p for p in others if rev["replay"][p].mean > g.mean + 2 * math.hypot(g.se, rev["replay"][p].se)]
        out.claim("gg-sp-best-on-trace", "GG-SP (the LP's gate-and-route policy) earns at least as much as the "
                  "baselines (Sec 6.3), here on the replayed trace", not beaten,
                  f"load {top:g}: GG-SP {g.mean:.4g} ± {1.96 * g.se:.2g} per GPU-s; highest {best} "
                  f"{rev['replay'][best].mean:.4g}; policies above GG-SP by > 2 SE: {beaten or 'none'}")
    if len(policies) > 1:
        order = {model: sorted(policies, key=lambda p: -rev[model][p].mean) for model in ts.MODELS}
        same = order["markov"][0] == order["replay"][0]
        out.claim("markov-ranks-like-trace", "the fitted Markov model picks the policy that earns most on the trace",
                  same, f"load {top:g}, by revenue: replay {' > '.join(order['replay'])}; Markov "
                  f"{' > '.join(order['markov'])}")
    for load in loads:
        c = results[(load, policies[0])]
        r, m = _mean(c, "replay", "ttft_s"), _mean(c, "markov", "ttft_s")
        out.claim(f"markov-ttft-load{load:g}", f"the fitted Markov model predicts the trace's mean TTFT within "
                  f"{100 * TTFT_TOLERANCE:.0f}% ({policies[0]}, load {load:g})",
                  abs(m - r) <= TTFT_TOLERANCE * r,
                  f"replay {r:.3g} s, shuffled {_mean(c, 'shuffled', 'ttft_s'):.3g}, resampled "
                  f"{_mean(c, 'trace', 'ttft_s'):.3g}, Markov {m:.3g} ({100 * (m - r) / r:+.0f}%); p99 replay "
                  f"{_mean(c, 'replay', 'ttft_s_p99'):.3g} s vs Markov {_mean(c, 'markov', 'ttft_s_p99'):.3g}")
        best = max(policies, key=lambda p: results[(load, p)].stats["replay"]["revenue_per_gpu_s"].mean)
        e = results[(load, best)].stats["replay"]["revenue_per_gpu_s"]
        bound = lp_value[load]["window"]
        out.claim(f"lp-bounds-trace-load{load:g}", "the fluid LP's R* bounds the revenue per GPU (Thm 1), on the "
                  f"replayed trace at load {load:g} (R* at the measured window's rates)", e.mean <= bound + 2 * e.se,
                  f"best replay revenue {e.mean:.4g} ({best}) vs R* {bound:.4g} at the window's rates "
                  f"({100 * e.mean / bound:.1f}%; R* at the hour's mean rates {lp_value[load]['hour']:.4g})")


def _figures(out, results, lp_value, loads, policies):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..traces import simulate as ts

    colors = {"replay": "black", "shuffled": "tab:orange", "trace": "tab:blue", "markov": "tab:red"}
    width = 0.8 / len(ts.MODELS)
    x = np.arange(len(policies))

    def bars(ax, load, metric, scale=1.0):
        for k, model in enumerate(ts.MODELS):
            es = [results[(load, p)].stats[model][metric] for p in policies]
            ax.bar(x + (k - 1.5) * width, [e.mean / scale for e in es], width,
                   yerr=[(e.hi - e.mean) / scale if math.isfinite(e.hi) else 0 for e in es],
                   color=colors[model], label=ts.MODEL_TITLES[model], capsize=2)
        ax.set_xticks(x, policies, rotation=30, ha="right", fontsize=8)

    metrics = (("ttft_s", "mean TTFT (s)"), ("ttft_s_p99", "p99 TTFT (s)"), ("end_to_end_s", "mean end-to-end (s)"),
               ("end_to_end_s_p99", "p99 end-to-end (s)"))
    fig, axes = plt.subplots(len(loads), len(metrics), figsize=(4 * len(metrics), 3.2 * len(loads)), squeeze=False)
    for i, load in enumerate(loads):
        for j, (m, label) in enumerate(metrics):
            bars(axes[i, j], load, m)
            axes[i, j].set_title(f"{label}, load {load:g}", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Azure conversation trace: latency per policy, trace vs models (95% CI over replicas)")
    fig.tight_layout()
    out.figure("latency", fig)

    fig, axes = plt.subplots(1, len(loads), figsize=(6 * len(loads), 3.4), squeeze=False)
    for i, load in enumerate(loads):
        ax = axes[0, i]
        bound = lp_value[load]["window"]
        bars(ax, load, "revenue_per_gpu_s", bound)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        lo = min(results[(load, p)].stats[m]["revenue_per_gpu_s"].mean for p in policies for m in ts.MODELS)
        ax.set_ylim(max(0.0, lo / bound - 0.1), 1.05)
        ax.set_title(f"revenue / LP R* at the window's rates, load {load:g} (R* = {bound:.4g})", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    out.figure("revenue", fig)

    policy = "gg-sp" if "gg-sp" in policies else policies[0]
    shown = ("ttft_s", "ttft_s_p90", "ttft_s_p99", "end_to_end_s_p50", "end_to_end_s_p99", "abandon_prefill",
             "revenue_per_gpu_s")
    fig, axes = plt.subplots(1, len(loads), figsize=(6 * len(loads), 3.6), squeeze=False)
    for i, load in enumerate(loads):
        c, ax = results[(load, policy)], axes[0, i]
        bottom_pos, bottom_neg = np.zeros(len(shown)), np.zeros(len(shown))
        for name, label in STEPS:
            model, against = next((m, a) for g, m, a in ts.GAPS if g == name)
            v = np.array([100 * c.gap(m, model, against)[0] / c.stats["replay"][m].mean for m in shown])
            base = np.where(v >= 0, bottom_pos, bottom_neg)
            ax.bar(np.arange(len(shown)), v, 0.6, bottom=base, label=label)
            bottom_pos += np.maximum(v, 0)
            bottom_neg += np.minimum(v, 0)
        total = [100 * c.gap(m, "markov", "replay")[0] / c.stats["replay"][m].mean for m in shown]
        ax.plot(np.arange(len(shown)), total, "k_", ms=18, mew=2, label="Markov - replay")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(np.arange(len(shown)), shown, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("% of the replay's value")
        ax.set_title(f"{policy}, load {load:g}: what the Markov model misses, step by step", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    out.figure("gap-decomposition", fig)
