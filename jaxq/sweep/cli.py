"""`jaxq sweep FILE [--out DIR] [--restart] [--quiet] [--max-batch N]`: run a grid file (docs/sweeps.md)."""

from __future__ import annotations

import time
from pathlib import Path

from .grid import load_grid
from .outputs import STATUS_COLUMNS
from .runner import DEFAULT_MAX_BATCH, run_sweep

# Columns of the closing table, beside the varied axes.
_SUMMARY = (("revenue_bundled", "revenue bundled"), ("revenue_separate", "revenue separate"))


def add_arguments(parser):
    parser.add_argument("file", help="sweep grid file (.toml)")
    parser.add_argument("--out", default=None,
                        help="output directory (default sweeps/<file name>); a partial run there is resumed")
    parser.add_argument("--restart", action="store_true", help="discard a previous run in --out and start over")
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                        help=f"most points x replicas simulated per call; bounds memory (default {DEFAULT_MAX_BATCH})")
    dist = parser.add_argument_group("several processes (jax.distributed; run the same command in each process)")
    dist.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first (cluster auto-detection: SLURM, MPI, TPU pods)")
    dist.add_argument("--coordinator", metavar="HOST:PORT", help="coordinator address (implies --distributed)")
    dist.add_argument("--num-processes", type=int, help="number of processes (implies --distributed)")
    dist.add_argument("--process-id", type=int, help="this process's id, 0 .. num-processes - 1")


def _fmt(row, metric) -> str:
    try:
        mean, hi = float(row[f"{metric}_mean"]), float(row[f"{metric}_ci_hi"])
    except (KeyError, ValueError):
        return "-"
    return f"{mean:.5g} ± {hi - mean:.2g}"


def format_table(grid, rows) -> str:
    axes = list(grid.varied) or ["policy"]
    by_hash = {p.hash: p for p in grid.points}
    table = [["point", *axes, *(label for _, label in _SUMMARY), "failed replicas"]]
    for row in rows:
        p = by_hash[row["hash"]]
        failed = int(row["replicas"]) - int(row[STATUS_COLUMNS[0]])
        table.append([row["point"], *(p.label([a]).split("=", 1)[1] for a in axes),
                      *(_fmt(row, m) for m, _ in _SUMMARY), str(failed) if failed else ""])
    widths = [max(len(r[k]) for r in table) for k in range(len(table[0]))]
    return "\n".join("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in table)


def run(args) -> int:
    if args.distributed or args.coordinator or args.num_processes is not None or args.process_id is not None:
        import jax

        # before anything touches a device: every process then sees the devices of all of them.
        # All three flags given: no cluster detection, which inside a SLURM or MPI job would also keep
        # one local device per process (the task's local id) and leave a one-task-per-host job's other
        # GPUs idle; JAX_LOCAL_DEVICE_IDS still picks devices explicitly.
        explicit = None not in (args.coordinator, args.num_processes, args.process_id)
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id,
                                   cluster_detection_method="deactivate" if explicit else None)
    grid = load_grid(args.file)
    out = Path(args.out) if args.out else Path("sweeps") / Path(args.file).stem
    t0 = time.perf_counter()
    res = run_sweep(grid, out, restart=args.restart, quiet=args.quiet, max_batch=args.max_batch)
    wall = time.perf_counter() - t0
    import jax

    if jax.process_index() != 0:  # process 0 wrote the files and reports
        return 0
    print(f"{grid.name}: {len(grid.points)} points ({res.computed} simulated now, "
          f"{len(grid.points) - res.computed} from a previous run) in {wall:.1f} s; "
          f"values are means ± 95% CI half-width")
    print(format_table(grid, res.rows))
    failed = sum(int(r["replicas"]) - int(r[STATUS_COLUMNS[0]]) for r in res.rows)
    if failed:
        print(f"  WARNING {failed} replicas raised a status bit: see the status_* columns of {out / 'results.csv'}")
    print(f"  wrote {out / 'results.csv'} and {out / 'manifest.json'}")
    return 0
