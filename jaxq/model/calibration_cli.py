"""`jaxq calibrate`: fit the iteration-time law from measurements (docs/calibration.md).

    jaxq calibrate FILE.csv [--chunk C] [--toml-out timing.toml]   # your engine's measurements
    jaxq calibrate --example                                       # the shipped synthetic example
    jaxq calibrate --vidur FILE --layers 32                        # Vidur mlp.csv: token-linear part only
    jaxq calibrate --vidur --example --layers 32                   # the shipped Vidur sample
"""

from __future__ import annotations

import math
from pathlib import Path

from . import calibration as cal


def add_arguments(parser):
    parser.add_argument("file", nargs="?", metavar="FILE.csv",
                        help="measurement CSV (format: docs/calibration.md), or a Vidur mlp.csv with --vidur")
    parser.add_argument("--example", action="store_true",
                        help="use the file shipped with jaxq: the synthetic example measurements, or with "
                             "--vidur the Meta-Llama-3-8B/A100 sample")
    parser.add_argument("--chunk", type=float, default=256, metavar="C",
                        help="chunk size at which to report tau_mix(C) (default 256, the canonical scenario)")
    parser.add_argument("--no-average", action="store_true",
                        help="fit every mixed row as its own point instead of the per-chunk means (the "
                             "paper's method, default)")
    parser.add_argument("--toml-out", metavar="PATH",
                        help="write a [timing] table for a scenario file to PATH ('-' for stdout)")
    vidur = parser.add_argument_group("Vidur operator profiles (token-linear part only)")
    vidur.add_argument("--vidur", action="store_true", help="FILE is a Vidur mlp.csv")
    vidur.add_argument("--layers", type=int, metavar="L",
                       help="number of transformer layers (required with --vidur)")
    vidur.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    vidur.add_argument("--stat", default="mean", choices=("mean", "median", "min", "max"),
                       help="which per-operator statistic to sum (default mean)")
    vidur.add_argument("--min-tokens", type=int, default=256, help="lower end of the linear fit (default 256)")
    vidur.add_argument("--max-tokens", type=int, default=8192,
                       help="upper end of the linear fit (default 8192; 0 = every row)")


def _pm(value: float, se: float, fmt: str) -> tuple[str, str]:
    return format(value, fmt), ("n/a" if not math.isfinite(se) else format(se, ".2g"))


def _table(rows: list[tuple[str, str, str]]) -> str:
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"  {a:<{w0}}  {b:>{w1}}  {c}".rstrip() for a, b, c in rows)


def _resolve_file(args) -> Path:
    if args.file and args.example:
        raise ValueError("give either FILE or --example, not both")
    if args.example:
        return cal.VIDUR_SAMPLE if args.vidur else cal.EXAMPLE_MEASUREMENTS
    if not args.file:
        raise ValueError("missing FILE: give a measurement CSV, or --example to try the shipped one")
    return Path(args.file)


def _run_measurements(args, path: Path) -> int:
    res = cal.calibrate_from_csv(path, average_repeats=not args.no_average)
    m, s, C = res.mixed, res.solo, args.chunk
    how = (f"{m.n_points} chunk sizes (means of {res.n_mixed_rows} rows)" if res.averaged_repeats
           else f"{m.n_points} rows")
    print(f"calibration from {res.source}")
    print(f"mixed iterations: tau_mix(C) = alpha + beta*C, OLS on {how}, C in [{m.chunk_min:g}, {m.chunk_max:g}]")
    print(f"solo decode: gamma = mean per-stream speed over {s.n_points} rows")
    rows = [("quantity", "estimate", "std. error"),
            ("alpha (s)", *_pm(m.alpha, m.alpha_se, ".6g")),
            ("beta (s/token)", *_pm(m.beta, m.beta_se, ".6g")),
            ("R^2", format(m.r2, ".6f"), ""),
            ("residual std (s)", "n/a" if not math.isfinite(m.residual_std) else format(m.residual_std, ".3g"), ""),
            ("gamma (tokens/s)", *_pm(s.gamma, s.gamma_se, ".6g")),
            ("1/gamma (s)", format(1.0 / s.gamma, ".6g"), ""),
            (f"tau_mix({C:g}) (s)", *_pm(res.tau_mix(C), m.tau_se(C), ".6g")),
            (f"gamma*tau_mix({C:g})", format(s.gamma * res.tau_mix(C), ".4g"),
             "solo decode speed / mixed decode speed")]
    print(_table(rows))
    if not m.chunk_min <= C <= m.chunk_max:
        print(f"note: C = {C:g} is outside the measured range; tau_mix there is an extrapolation")
    if args.toml_out:
        text = res.to_toml()
        if args.toml_out == "-":
            print()
            print(text, end="")
        else:
            Path(args.toml_out).write_text(text, encoding="utf-8")
            print(f"wrote [timing] table to {args.toml_out}")
    return 0


def _run_vidur(args, path: Path) -> int:
    if args.layers is None:
        raise ValueError("--layers: required with --vidur (the profile is per layer; Llama-3-8B has 32)")
    if args.toml_out:
        raise ValueError("--toml-out: not available with --vidur; these profiles give beta only, not alpha "
                         "or gamma (see the limitations it prints)")
    fit = cal.fit_vidur_token_linear(path, args.layers, tensor_parallel=args.tp, stat=args.stat,
                                     min_tokens=args.min_tokens, max_tokens=args.max_tokens or None)
    lin = fit.linear
    model = ", ".join(f"{k}={v}" for k, v in fit.model.items())
    print(f"Vidur operator profile {fit.source}")
    print(f"model: {model or '(no shape columns)'}; {fit.num_layers} layers, TP {fit.tensor_parallel}, "
          f"stat {fit.stat}")
    layer_ops = ", ".join(o for o in fit.ops if o != "emb")
    print(f"total_s = {fit.num_layers} x (sum of per-layer ops) + emb; ops: {layer_ops}")
    print(f"linear fit total_s = intercept + beta*num_tokens, OLS on {lin.n_points} rows, "
          f"num_tokens in [{lin.chunk_min:g}, {lin.chunk_max:g}]")
    rows = [("quantity", "estimate", "std. error"),
            ("beta (s/token)", *_pm(lin.beta, lin.beta_se, ".4g")),
            ("intercept (s)", *_pm(lin.alpha, lin.alpha_se, ".4g")),
            ("R^2", format(lin.r2, ".6f"), "")]
    pw = fit.piecewise
    if pw is not None:
        where = f"tau = c + a*max(0, b'-b0), num_tokens in [{pw.tokens_min}, {pw.tokens_max}], R^2 {pw.r2:.4f}"
        rows += [("piecewise c (s)", format(pw.c, ".4g"), where),
                 ("piecewise a (s/token)", format(pw.a, ".4g"), ""),
                 ("piecewise b0 (tokens)", format(pw.b0, ".4g"), ""),
                 ("1/c (tokens/s)", format(1.0 / pw.c, ".4g"), "an upper bound on gamma")]
    print(_table(rows))
    at = int(fit.num_tokens.max())
    totals = ", ".join(format(t, ".4g") for t in fit.total_at(at))
    print(f"stacked time at num_tokens = {at}: {totals} s ({totals.count(',') + 1} profile row(s))")
    print()
    print("limitations:")
    print(fit.limitations, end="")
    return 0


def run(args) -> int:
    path = _resolve_file(args)
    return _run_vidur(args, path) if args.vidur else _run_measurements(args, path)
