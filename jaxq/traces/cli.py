"""`jaxq trace summary FILE` and `jaxq trace fit FILE`: read an LLM request trace, summarise and plot it,
fit the model's job classes to it and write a scenario file (docs/traces.md).

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
    f.add_argument("--calibration", default=DEFAULT_CALIBRATION, metavar="SCENARIO|FILE.csv",
                   help="timing law (alpha, beta, gamma): a scenario's (name or .toml path), or fitted from a "
                        f"measurement CSV as `jaxq calibrate` does (default: {DEFAULT_CALIBRATION})")
    f.add_argument("--B", type=int, default=16, help="concurrent slots per GPU (default 16)")
    f.add_argument("--C", type=int, default=256, help="prefill chunk, tokens per iteration (default 256)")
    f.add_argument("--patience", type=float, default=0.1, metavar="THETA",
                   help="patience rate of every class, 1/s (default 0.1); the trace records no abandonment")
    f.add_argument("--prices", metavar="C_P,C_D", help=f"prices per prefill and decode token (default: those of "
                                                          f"{PRICE_SCENARIO})")
    f.add_argument("--name", help="scenario name (default: trace-<file stem>)")
    f.add_argument("--drop-bad", action="store_true", help="drop and count bad rows instead of stopping at the first")
    f.set_defaults(_action=run_fit)


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


def _parse_classes(text: str):
    if text in ("auto", "labels"):
        return text
    try:
        k = int(text)
    except ValueError:
        raise ValueError(f"--classes: must be an integer >= 1, 'auto' or 'labels', got {text!r}") from None
    if k < 1:
        raise ValueError(f"--classes: must be an integer >= 1, 'auto' or 'labels', got {text!r}")
    return k


def _parse_n(text: str):
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"--n: must be an integer >= 1 or 'auto', got {text!r}") from None
    if n < 1:
        raise ValueError(f"--n: must be an integer >= 1 or 'auto', got {text!r}")
    return n


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


def run_fit(args) -> int:
    import dataclasses

    from .fit import ScenarioChoices, fit_trace, smallest_n, write_scenario

    classes, n = _parse_classes(args.classes), _parse_n(args.n)
    if not args.patience >= 0:
        raise ValueError(f"--patience: must be a rate >= 0 (1/s), got {args.patience!r}")
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
