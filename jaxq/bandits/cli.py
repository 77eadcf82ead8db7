"""`jaxq bandit`: run offline-to-online bandit experiments (BANDITS.md §5.2) from TOML configs.

    jaxq bandit configs/bandits/e1.toml --out results/ --size full
    jaxq bandit configs/bandits/e*.toml --out results/ --size quick

Writes ``<out>/<config name>.json`` (regret mean and SE at the checkpoints, ratios to the baseline with
paired SEs, pooled-branch usage, interval-violation frequencies, full curves) and ``<out>/<config
name>.png``, and prints a table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .experiment import SIZES, load_config, run_config


def add_arguments(parser):
    parser.add_argument("configs", nargs="+", metavar="CONFIG", help="experiment config (TOML), one or more")
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--size", choices=SIZES, default="full",
                        help="run size from the config: 'full' is the protocol, 'quick' a smoke size")
    parser.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    parser.add_argument("--T", type=int, default=None, help="override the horizon (a multiple of record_every)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def format_table(summary: dict) -> str:
    lines = [f"{summary['name']} (v{summary['version']}, {summary['size']}): {summary['seeds']} seeds, "
             f"T = {summary['T']}; regret mean ± SE | ratio to {summary['baseline']} ± SE | pooled fraction"]
    cps = summary["checkpoints"]
    for case, data in summary["cases"].items():
        lines.append(f"  case {case}: checkpoints {cps}")
        for name, a in data["algorithms"].items():
            reg = "  ".join(f"{m:8.2f}±{se:5.2f}" for m, se in zip(a["regret_mean"], a["regret_se"]))
            rat = " ".join(f"{r:.3f}±{se:.3f}" for r, se in zip(a["ratio"], a["ratio_se"]))
            lines.append(f"    {name:22s} {reg} | {rat} | {a['pooled_fraction'][-1]:.3f}")
    return "\n".join(lines)


def run(args) -> int:
    if args.seeds is not None and args.seeds < 2:
        raise ValueError(f"invalid option '--seeds': must be >= 2 (standard errors), got {args.seeds}")
    configs = [load_config(path) for path in args.configs]  # validate all before running any
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    start = time.perf_counter()
    for cfg in configs:
        if args.T is not None and (args.T < 1 or args.T % cfg.record_every):
            raise ValueError(f"invalid option '--T': must be a positive multiple of run.record_every = "
                             f"{cfg.record_every}, got {args.T}")
        summary, _, seconds = run_config(cfg, args.size, seeds=args.seeds, T=args.T)
        timings[cfg.name] = seconds
        (out / f"{cfg.name}.json").write_text(json.dumps(summary, indent=1))
        if not args.no_plots:
            from .plots import plot_summary

            plot_summary(summary, out / f"{cfg.name}.png")
        print(format_table(summary))
        print(f"  [{seconds:.1f} s, compilation included]\n", flush=True)
    total = time.perf_counter() - start
    # Merge with earlier runs into the same directory, so running configs one at a time keeps every timing.
    timing_file = out / "timing.json"
    previous = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    seconds = {**previous.get("seconds", {}), **timings} if previous.get("size") == args.size else timings
    timing_file.write_text(json.dumps({"size": args.size, "seconds": seconds, "last_command_total": total}, indent=1))
    print(f"total {total:.1f} s for {len(configs)} config(s)")
    return 0
