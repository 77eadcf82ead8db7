"""`jaxq simulate SCENARIO --policy P --n N --replicas R --horizon T`: a summary table with 95% CIs."""

from __future__ import annotations

import sys
import time

import numpy as np

from .._progress import ProgressLine, clock
from ..model.config import load_scenario
from ..policies import POLICIES
from ..sim.state import EVENT_ROWS
from .simulate import run as run_simulation

_ROWS = [
    ("revenue_bundled", "revenue, bundled (per GPU per s)"),
    ("revenue_separate", "revenue, separate (per GPU per s)"),
    ("throughput", "decode completions (per GPU per s)"),
    ("x", "X/n, prefill occupancy"),
    ("q_p", "Q_p/n, prefill queue"),
    ("q_d", "Q_d/n, decode buffer"),
    ("y_m", "Y_m/n, decodes beside a prefill"),
    ("y_s", "Y_s/n, decodes without prefill"),
    ("abandon_prefill_fraction", "abandoned in prefill queue"),
    ("abandon_decode_fraction", "abandoned in decode buffer"),
    ("wait_probability", "P(arrival waits)"),
    ("waiting_time", "mean prefill wait (s)"),
    ("time_to_first_token", "mean TTFT (s)"),
    ("time_per_output_token", "mean TPOT (s)"),
    ("end_to_end", "mean end-to-end (s)"),
]


def add_arguments(parser):
    parser.add_argument("scenario", help="scenario name or .toml path")
    parser.add_argument("--policy", default="gg-sp",
                        help=f"one of {', '.join(POLICIES)} (default gg-sp), or FILE.py:NAME / MODULE:NAME naming a "
                             "jaxq.policies.Policy of your own (docs/simulation.md, 'Writing your own policy')")
    parser.add_argument("--n", type=int, default=20, help="GPUs (default 20)")
    parser.add_argument("--replicas", type=int, default=32, help="independent replicas (default 32)")
    parser.add_argument("--horizon", type=float, default=1000.0, help="simulated seconds (default 1000)")
    parser.add_argument("--warmup", type=float, default=None, help="deleted warm-up in s (default 20%% of horizon)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--convention", choices=["A", "B"], default="B",
                        help="decode speed on mixed GPUs: B = mu_m only while a prefill runs (paper), A = always")
    parser.add_argument("--engine", choices=["exact", "stepped", "general", "population"], default="exact",
                        help="exact (event by event, default), stepped (time steps of --dt; docs/time-stepped.md), "
                             "general (event by event with per-job work; any --service) or population (exact, "
                             "GPUs counted by configuration: cost independent of n; docs/simulation.md)")
    parser.add_argument("--dt", type=float, default=None, help="step of the stepped engine in s (default 0.02)")
    parser.add_argument("--service", choices=["exponential", "deterministic", "lognormal"], default="exponential",
                        help="law of the prompt and output lengths, with the scenario's means (default exponential, "
                             "the paper's model); a non-exponential law runs the general engine")
    parser.add_argument("--service-cv", type=float, default=1.0,
                        help="coefficient of variation of lognormal lengths (default 1)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress line on stderr (a long run otherwise shows one, with its estimated total)")


def format_result(res) -> str:
    names = res.scenario.classes.names
    if res.engine == "stepped":
        engine = f"{res.engine}, dt = {res.dt:g} s"
    elif res.engine == "general":
        engine = f"{res.engine} ({res.service.label()} lengths)"
    else:
        engine = res.engine
    lines = [f"{res.scenario.name}: policy {res.policy}, n = {res.n} (M = {res.num_mixed} mixed), "
             f"{res.replicas} replicas, horizon {res.horizon:g} s, warm-up {res.warmup:g} s, {engine} engine",
             f"LP optimum R* = {res.lp_value:.4f}; values are means ± 95% CI half-width over replicas"]
    table = []
    num = len(names)
    for key, label in _ROWS:
        est = res.summary[key]
        cells = [f"{m:.5g} ± {h:.2g}" for m, h in zip(np.atleast_1d(est.mean), np.atleast_1d(est.hi - est.mean))]
        # a cluster-level number (revenue) goes under "all classes", not under the first class
        table.append((label, cells + [""] if np.ndim(est.mean) else [""] * num + cells))
    columns = list(names) + ["all classes"]
    width = 2 + max(max(len(c) for _, cells in table for c in cells), max(len(nm) for nm in columns))
    lines.append(f"  {'metric':<36}" + "".join(f"{nm:>{width}}" for nm in columns))
    for label, cells in table:
        lines.append(f"  {label:<36}" + "".join(f"{c:>{width}}" for c in cells))
    if res.status:
        lines.append("  WARNING replica status: " + ", ".join(f"{k}: {v}" for k, v in res.status.items()))
    return "\n".join(lines)


def _service(args):
    from ..sim.general import ServiceLaw

    return ServiceLaw.of(args.service, args.service_cv)


# A run expected to simulate more events than this (over all replicas) gets a progress line: about
# 10 s or more at the engines' measured rates on a 2-core CPU (docs/simulation.md)
PROGRESS_EVENTS = 2e6
PILOT_FRACTION = 0.02  # of the horizon, timed to estimate the whole run


def expected_events(scenario, n: int, replicas: int, horizon: float) -> float:
    """Arrivals, prefill and decode completions and abandonments: about three events per arrival."""
    return 3.0 * n * float(np.sum(scenario.mean_lam(horizon))) * horizon * replicas  # time-average rates


def run(args) -> int:
    scenario = load_scenario(args.scenario)
    kw = dict(n=args.n, replicas=args.replicas, seed=args.seed, convention=args.convention, engine=args.engine,
              dt=args.dt, service=_service(args))
    t0 = time.perf_counter()
    progress = None
    n = scenario.cluster.n if args.n is None else args.n
    if not args.quiet and expected_events(scenario, n, args.replicas, args.horizon) > PROGRESS_EVENTS:
        progress, finish = _with_estimate(scenario, args, kw)
    try:
        res = run_simulation(scenario, args.policy, horizon=args.horizon, warmup=args.warmup, **kw)
        if progress is not None:
            finish()
    finally:
        if progress is not None:
            progress.close()
    elapsed = time.perf_counter() - t0
    print(format_result(res))
    totals = np.asarray(res.state.totals)  # arrivals, completions, abandonments: the same count for both engines
    events = float(totals[:, list(EVENT_ROWS)].sum())
    print(f"  {events:.3g} events in {elapsed:.1f} s wall (including compilation)")
    return 1 if res.status else 0


def _with_estimate(scenario, args, kw):
    """The progress line of a long run. One batched call cannot report as it goes, so the run's length is
    estimated first: a short call compiles the program (the run reuses it: the horizon is data) and
    checks every setting, then
    pilots of PILOT_FRACTION / 2 and PILOT_FRACTION of the horizon are timed. Both start from an empty
    cluster, whose first seconds are cheap, so the run is extrapolated from the difference between them
    (the cost of simulated time once the cluster has filled), never below the plain scaling of the
    longer pilot. Neither call changes the run's numbers (they are separate calls)."""
    h = args.horizon
    # the compiling call first, silent: an invalid setting fails here with its one-line error, and
    # nothing is drawn on stderr before it
    run_simulation(scenario, args.policy, horizon=1e-3 * h, warmup=0.0, **kw)
    status = ProgressLine(lambda e: f"simulate: timing two short pilot runs | elapsed {clock(e)}")
    try:
        walls = []
        for frac in (PILOT_FRACTION / 2, PILOT_FRACTION):
            t = time.perf_counter()
            run_simulation(scenario, args.policy, horizon=frac * h, warmup=0.0, **kw)
            walls.append(time.perf_counter() - t)
        w1, w2 = walls
        total = max(w2 / PILOT_FRACTION, w2 + (1.0 - PILOT_FRACTION) * (w2 - w1) / (PILOT_FRACTION / 2))
    finally:
        status.close()
    head = f"simulate {args.replicas} replicas x {args.horizon:g} s"
    basis = f"from pilots of {PILOT_FRACTION / 2:.0%} and {PILOT_FRACTION:.0%} of the horizon"
    finished = []  # set when the run has returned: the last redraw says so

    def text(e):
        if finished:
            return f"{head} | done in {clock(e)} (estimated {clock(total)}, {basis})"
        return f"{head} | elapsed {clock(e)} | estimated total {clock(total)} ({basis})"

    return ProgressLine(text, stream=sys.stderr), lambda: finished.append(True)
