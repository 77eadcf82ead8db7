"""`jaxq trace summary FILE`, `jaxq trace fit FILE` and `jaxq trace simulate FILE`: read an LLM request
trace, summarise and plot it, fit the model's job classes to it and write a scenario file, and simulate
the trace's own rates and lengths beside the fitted model (docs/traces.md).

Only argparse is imported here; the reader, the statistics and (for ``fit``) the scenario and LP modules
are imported when a subcommand runs."""

from __future__ import annotations

from pathlib import Path

DEFAULT_CALIBRATION = "qwen-8b"
PRICE_SCENARIO = "qwen-8b-v1.toml"  # bundled scenario whose prices are the default


def add_arguments(parser):
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = sub.add_parser("summary", help="requests, rates, length statistics, and plots",
                       description="print a trace's rates and length statistics and save plots")
    s.add_argument("file", help="trace CSV: Azure (TIMESTAMP,ContextTokens,GeneratedTokens) or generic "
                                "(arrival_s,prompt_tokens,output_tokens[,class]); docs/traces.md")
    s.add_argument("--out", metavar="DIR", help="folder for the plots (default: results/trace-<file stem>/)")
    s.add_argument("--bin", type=float, default=60.0, metavar="SECONDS", help="rate bin width (default 60 s)")
    s.add_argument("--drop-bad", action="store_true", help="drop and count bad rows instead of stopping at the first")
    s.set_defaults(_action=run_summary)

    f = sub.add_parser("fit", help="fit job classes (P, D, lam per GPU) and write a scenario TOML",
                       description="group the requests into classes, estimate each class's rate and mean "
                                   "lengths with standard errors, and write a scenario file")
    f.add_argument("file", help="trace CSV (as for `jaxq trace summary`)")
    f.add_argument("--classes", required=True, metavar="K|auto|labels",
                   help="number of classes for k-means on log lengths, 'auto' (K in 1..6 of lowest BIC), or "
                        "'labels' (the generic schema's class column)")
    f.add_argument("--n", required=True, metavar="N|auto",
                   help="GPUs the trace's load is spread over (lam = rate / n), or 'auto': the smallest n whose "
                        "bundled LP serves all of it (the fluid capacity, no headroom)")
    f.add_argument("--out", metavar="FILE.toml",
                   help="scenario file to write (default: results/trace-<file stem>/scenario-k<K>.toml)")
    _add_fit_options(f)
    f.set_defaults(_action=run_fit)

    m = sub.add_parser("simulate", help="the trace replayed, and its rates and lengths resampled, through the general engine, beside the "
                                        "fitted Markov model",
                       description="fit classes as `fit` does, then simulate the trace itself (a replay: each "
                                   "job at its own time with its own tokens), the trace with its lengths shuffled "
                                   "within each class, resampled traffic (per-class Poisson counts per bin as the "
                                   "trace's, the class's own length pairs) and the fitted Markov model (constant "
                                   "rates, exponential lengths) on the same keys, and print their metrics (means "
                                   "and per-job p50/p90/p99), gaps and the LP's R*")
    m.add_argument("file", help="trace CSV (as for `jaxq trace summary`)")
    m.add_argument("--classes", required=True, metavar="K|auto|labels", help="as for `jaxq trace fit`")
    m.add_argument("--n", required=True, metavar="N|auto", help="as for `jaxq trace fit`")
    m.add_argument("--policy", default="gg-sp", metavar="NAME|all",
                   help="a built-in policy, or 'all' for every built-in (default gg-sp)")
    m.add_argument("--replicas", type=int, default=None, metavar="R", help="replicas per model (default 64)")
    m.add_argument("--horizon", type=float, default=None, metavar="SECONDS",
                   help="simulated time (default: the trace's duration)")
    m.add_argument("--warmup", type=float, default=None, metavar="SECONDS",
                   help="left out of the metrics (default: 10%% of the horizon; the engine starts empty)")
    m.add_argument("--bin", type=float, default=None, metavar="SECONDS",
                   help="width of the rate schedule's pieces (default 300 s)")
    m.add_argument("--seed", type=int, default=0, help="replica keys' seed, the same for both models (default 0)")
    m.add_argument("--out", metavar="DIR", help="folder for the CSV and the scenario (default: "
                                                 "results/trace-<file stem>/simulate/)")
    _add_fit_options(m)
    m.set_defaults(_action=run_simulate)


def _add_fit_options(p):
    """The options `fit` and `simulate` share: what the trace does not say."""
    p.add_argument("--calibration", default=DEFAULT_CALIBRATION, metavar="SCENARIO|FILE.csv",
                   help="timing law (alpha, beta, gamma): a scenario's (name or .toml path), or fitted from a "
                        f"measurement CSV as `jaxq calibrate` does (default: {DEFAULT_CALIBRATION})")
    p.add_argument("--B", type=int, default=16, help="concurrent slots per GPU (default 16)")
    p.add_argument("--C", type=int, default=256, help="prefill chunk, tokens per iteration (default 256)")
    p.add_argument("--patience", type=float, default=0.1, metavar="THETA",
                   help="patience rate of every class, 1/s (default 0.1); the trace records no abandonment")
    p.add_argument("--prices", metavar="C_P,C_D", help=f"prices per prefill and decode token (default: those of "
                                                          f"{PRICE_SCENARIO})")
    p.add_argument("--name", help="scenario name (default: trace-<file stem>)")
    p.add_argument("--drop-bad", action="store_true", help="drop and count bad rows instead of stopping at the first")


def run(args) -> int:
    return args._action(args)


def _read(args):
    from .reader import read_trace

    trace = read_trace(args.file, drop_bad=args.drop_bad)
    if trace.dropped:
        why = ", ".join(f"{n:,} {reason}" for reason, n in trace.drop_reasons.items())
        print(f"dropped {trace.dropped:,} bad rows of {trace.num_requests + trace.dropped:,} ({why})")
    return trace


def _default_dir(path: str) -> Path:
    return Path("results") / f"trace-{Path(path).stem}"


def run_summary(args) -> int:
    from .summary import plot_summary, summarize

    trace = _read(args)
    summary = summarize(trace, bin_s=args.bin)
    print(summary.format())
    out = Path(args.out) if args.out else _default_dir(args.file)
    paths = plot_summary(trace, out, bin_s=args.bin)
    print(f"plots: {', '.join(p.name for p in paths)} in {out}/")
    return 0


def _int_or(text: str, field: str, words: tuple[str, ...]):
    """An integer >= 1 or one of ``words``, from option ``field``'s text."""
    if text in words:
        return text
    allowed = "an integer >= 1" + "".join(f" or '{w}'" for w in words)
    try:
        k = int(text)
    except ValueError:
        raise ValueError(f"{field}: must be {allowed}, got {text!r}") from None
    if k < 1:
        raise ValueError(f"{field}: must be {allowed}, got {text!r}")
    return k


def _parse_classes(text: str):
    return _int_or(text, "--classes", ("auto", "labels"))


def _parse_n(text: str):
    return _int_or(text, "--n", ("auto",))


def _timing(spec: str):
    """(alpha, beta, gamma, where from) of --calibration."""
    if spec.endswith(".csv"):
        from ..model.calibration import calibrate_from_csv

        law = calibrate_from_csv(spec).timing
        return law, f"the calibration fitted from {Path(spec).name}"
    from ..model.config import load_scenario

    sc = load_scenario(spec)
    return sc.timing, f"the {sc.name} calibration (scenario {spec})"


def _prices(text: str | None):
    from ..model.config import BUNDLED, load_scenario

    default = load_scenario(BUNDLED / PRICE_SCENARIO).pricing
    if text is None:
        return default.c_p, default.c_d, default.scheme, f"{PRICE_SCENARIO}'s"
    parts = text.split(",")
    try:
        c_p, c_d = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"--prices: must be two numbers C_P,C_D (e.g. 0.1,0.2), got {text!r}") from None
    return c_p, c_d, default.scheme, "given"


def _fit(args, check=None):
    """(trace, fit, choices, n, timing law, its source, price source) of `fit`'s options; ``check`` runs
    after the options are parsed and before the trace is read."""
    import dataclasses

    from .fit import ScenarioChoices, fit_trace, smallest_n

    classes, n = _parse_classes(args.classes), _parse_n(args.n)
    if not args.patience >= 0:
        raise ValueError(f"--patience: must be a rate >= 0 (1/s), got {args.patience!r}")
    if check is not None:
        check()
    law, timing_source = _timing(args.calibration)
    c_p, c_d, scheme, price_source = _prices(args.prices)
    trace = _read(args)
    fit = fit_trace(trace, classes)
    choices = ScenarioChoices(n=1, B=args.B, C=args.C, alpha=law.alpha, beta=law.beta, gamma=law.gamma,
                              timing_source=timing_source, patience=args.patience, c_p=c_p, c_d=c_d,
                              scheme=scheme)
    if n == "auto":
        n = smallest_n(fit, choices)
        choices = dataclasses.replace(choices, n=n, n_source="--n auto: the smallest n whose bundled LP serves "
                                                           "the whole load")
    else:
        choices = dataclasses.replace(choices, n=n)
    return trace, fit, choices, n, law, timing_source, price_source


def run_fit(args) -> int:
    from .fit import write_scenario

    trace, fit, choices, n, law, timing_source, price_source = _fit(args)
    c_p, c_d, scheme = choices.c_p, choices.c_d, choices.scheme
    print(f"trace {Path(trace.source).name}: {trace.num_requests:,} requests over {trace.duration_s:,.1f} s "
          f"({trace.num_requests / trace.duration_s:.4g} requests/s)")
    if fit.selection is not None:
        print("choosing K by BIC (a diagonal Gaussian per class on the log lengths, at the k-means partition):")
        print(fit.selection.format())
    print(f"classes: {fit.describe_method()}")
    if fit.num_classes > 1:
        print(f"  the classes explain {100 * fit.explained:.1f}% of the variance of (log prompt, log output)")
    print(fit.format_table(n))
    out = Path(args.out) if args.out else _default_dir(args.file) / f"scenario-k{fit.num_classes}.toml"
    scenario = write_scenario(out, fit, choices, name=args.name)
    print(f"assumed, not in the trace: patience theta = {args.patience:g} /s for every class (the trace records "
          f"no abandonment); timing from {timing_source}: alpha = {law.alpha:g}, beta = {law.beta:g}, "
          f"gamma = {law.gamma:g}; B = {args.B}, C = {args.C}; prices c_p = {c_p:g}, c_d = {c_d:g} "
          f"({price_source}, {scheme}); exponential lengths within a class")
    print(_lp_line(scenario, n, choices.n_source))
    print(f"wrote {out} (scenario {scenario.name!r}: `jaxq lp {out}`)")
    return 0


def _lp_line(scenario, n: int, n_source: str) -> str:
    from ..lp import solve_bundled

    sol = solve_bundled(scenario)
    if not sol.ok:
        return f"bundled LP at n = {n} ({n_source}): {sol.status}: {sol.message}"
    served = sol.throughput / scenario.classes.lam
    return (f"bundled LP at n = {n} ({n_source}): serves "
            + ", ".join(f"{nm} {100 * s:.1f}%" for nm, s in zip(scenario.classes.names, served))
            + f" of the arrivals; prefill occupancy sum x = {sol.x.sum():.3f} of 1")


def run_simulate(args) -> int:
    import time

    from . import simulate as ts
    from .fit import write_scenario

    replicas = ts.DEFAULT_REPLICAS if args.replicas is None else args.replicas
    bin_s = ts.DEFAULT_BIN_S if args.bin is None else args.bin

    def check():
        from ..policies import POLICIES

        if args.policy != "all" and args.policy not in POLICIES:
            raise ValueError(f"--policy: must be one of {', '.join(POLICIES)} or 'all', got {args.policy!r}")
        if replicas < 2:
            raise ValueError(f"--replicas: must be an integer >= 2 (a standard error needs two), got {replicas}")
        for name, v in (("--horizon", args.horizon), ("--bin", bin_s)):
            if v is not None and not (v > 0 and v < float("inf")):
                raise ValueError(f"{name}: must be a number of seconds > 0, got {v!r}")

    trace, fit, choices, n, law, timing_source, price_source = _fit(args, check)
    horizon = trace.duration_s if args.horizon is None else args.horizon
    warmup = ts.WARMUP_FRACTION * horizon if args.warmup is None else args.warmup
    if not 0 <= warmup < horizon:
        raise ValueError(f"--warmup: must be in [0, horizon = {horizon:g}) s, got {warmup!r}")
    out = Path(args.out) if args.out else _default_dir(args.file) / "simulate"
    scenario = write_scenario(out / f"scenario-k{fit.num_classes}.toml", fit, choices, name=args.name)
    print(f"trace {Path(trace.source).name}: {trace.num_requests:,} requests over {trace.duration_s:,.1f} s; "
          f"classes: {fit.describe_method()}")
    print(fit.format_table(n))
    print(f"replay: the trace's own jobs (each arrival time, class and token counts as in the file; replicas "
          f"differ only in patience draws and the policy's choices); shuffled lengths: the trace's arrival times "
          f"and classes, each class's (prompt, output) pairs permuted per replica; resampled: per class a Poisson "
          f"process with the trace's count in each {bin_s:g} s bin as its mean, (prompt, output) pairs drawn from "
          f"the class's own; Markov model: the fitted scenario (constant rates, exponential lengths). All four: "
          f"general engine, n = {n}, {replicas} replicas on the same keys (seed {args.seed}), horizon {horizon:g} s, "
          f"warm-up {warmup:g} s left out; timing {timing_source}, patience {choices.patience:g} /s assumed; "
          f"per-job latency percentiles from log bins of 4.1%, interpolated")
    from ..policies import POLICIES

    policies = list(POLICIES) if args.policy == "all" else [args.policy]
    traffic = ts.model_traffic(trace, fit, scenario, replicas=replicas, horizon=horizon, bin_s=bin_s, seed=args.seed)
    comparisons = []
    for policy in policies:
        start = time.perf_counter()
        c = ts.compare(trace, fit, scenario, policy, replicas=replicas, horizon=horizon, warmup=warmup,
                       bin_s=bin_s, seed=args.seed, traffic=traffic)
        comparisons.append(c)
        print()
        print(c.format())
        print(f"  (mean ± 95% CI over replicas; gap: Markov model - replay, ± 95% CI from the two SEs as "
              f"independent samples, z = gap / SE; the replay's CI leaves out the traffic's own randomness: "
              f"there is one trace; {time.perf_counter() - start:.0f} s)")
    path = ts.write_csv(out / "simulate.csv", comparisons)
    print(f"\nwrote {path} and {out / f'scenario-k{fit.num_classes}.toml'} (the fitted scenario, {scenario.name!r})")
    return 0
