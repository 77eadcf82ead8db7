"""The files a sweep writes, and its progress line.

* ``results.csv``: one row per finished point, sorted by point index: the point's settings and scenario
  fields, the LP value, then mean, se, ci_lo, ci_hi of every metric of
  :func:`jaxq.metrics.replica_metrics` (per-class metrics as ``metric[class]_stat``), the status counts,
  simulated events and wall time. Floats are written with ``repr``, so reading them back is exact.
* ``manifest.json``: the grid file, the resolved base scenario, versions, devices, seeds, git commit,
  times, and ``complete`` (false until the last point's row is in the CSV).

Both are rewritten whole and atomically (temp file + ``os.replace``) after every chunk: a killed run
leaves the previous consistent pair, never a half-written row.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from .._progress import ProgressLine, clock
from ..metrics.summary import replica_metrics
from ..sim.state import NUM_COUNTERS, STATUS_NAMES
from .grid import MODEL_FIELDS, PER_CLASS, RUN_FIELDS, Grid, Point, scenario_dict

CSV_NAME = "results.csv"
MANIFEST_NAME = "manifest.json"
FORMAT = "jaxq-sweep/1"
STATS = ("mean", "se", "ci_lo", "ci_hi")
# Short column names for the status bits of jaxq.sim.state.STATUS_NAMES.
_STATUS_SHORT = {1: "overflow", 2: "decisions_incomplete", 4: "max_steps", 8: "nonfinite", 16: "capacity_violated"}
STATUS_COLUMNS = ("status_ok", *(f"status_{_STATUS_SHORT.get(b, f'bit{b}')}" for b in STATUS_NAMES))
KEY_SCHEME = ("replica r of a point uses fold_in(fold_in(fold_in(key(sweep seed), point seed), stream), r), "
              "stream = a hash of the point's scenario numbers: points differing only in policy, engine, dt, "
              "horizon, warmup, room, convention, dtype or replicas share keys (common random numbers)")


# -- columns and rows ----------------------------------------------------------------------------------

def metric_layout(scenario) -> dict[str, bool]:
    """metric name -> whether it is per class, read off replica_metrics on an empty state."""
    num = scenario.num_classes

    class _Empty:
        counts = np.zeros((2, NUM_COUNTERS, num))
        integrals = np.zeros((2, 6, num))

    out = replica_metrics(_Empty, scenario, scenario.cluster.n, 1.0, 0.0)
    return {k: np.ndim(v) == 2 for k, v in out.items()}


def _model_value(scenario, name):
    head, leaf = name.split(".")
    return getattr(getattr(scenario, "pricing" if head == "prices" else head), leaf)


def _model_columns(grid: Grid) -> list[str]:
    cols: list[str] = []
    for name in (a for a in grid.axes if a in MODEL_FIELDS):
        if name in PER_CLASS:
            for p in grid.points:
                cols += [f"{name}[{c}]" for c in p.scenario.classes.names if f"{name}[{c}]" not in cols]
        else:
            cols.append(name)
    return cols


def csv_columns(grid: Grid) -> list[str]:
    cols = ["point", "hash", *RUN_FIELDS, *_model_columns(grid), "lp_value", "num_mixed"]
    seen = set(cols)
    for p in grid.points:
        for metric, per_class in metric_layout(p.scenario).items():
            names = [f"{metric}[{c}]" for c in p.scenario.classes.names] if per_class else [metric]
            for name in names:
                for stat in STATS:
                    col = f"{name}_{stat}"
                    if col not in seen:
                        seen.add(col)
                        cols.append(col)
    return cols + [*STATUS_COLUMNS, "events", "wall_s"]


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return str(v)


def result_row(result, grid: Grid) -> dict[str, str]:
    """One CSV row (all cells as strings) for a :class:`jaxq.sweep.runner.PointResult`."""
    p: Point = result.point
    row = {"point": p.index, "hash": p.hash, **p.settings, "lp_value": result.lp_value,
           "num_mixed": result.num_mixed}
    names = p.scenario.classes.names
    for name in (a for a in grid.axes if a in MODEL_FIELDS):
        v = _model_value(p.scenario, name)
        if name in PER_CLASS:
            row.update({f"{name}[{c}]": float(x) for c, x in zip(names, v)})
        else:
            row[name] = v
    for metric, est in result.summary.items():
        values = dict(zip(STATS, (est.mean, est.se, est.lo, est.hi)))
        for stat, v in values.items():
            if np.ndim(v) == 0:
                row[f"{metric}_{stat}"] = float(v)
            else:
                row.update({f"{metric}[{c}]_{stat}": float(x) for c, x in zip(names, v)})
    status = np.asarray(result.status)
    row["status_ok"] = int(np.sum(status == 0))
    for bit, col in zip(STATUS_NAMES, STATUS_COLUMNS[1:]):
        row[col] = int(np.sum((status & bit) != 0))
    row["events"] = result.events
    row["wall_s"] = result.wall_s
    return {k: _cell(v) for k, v in row.items()}


# -- files ---------------------------------------------------------------------------------------------

def atomic_write(path: Path, text: str) -> None:
    """Write beside the target, then rename over it: readers see the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_csv(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, buf.getvalue())


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def existing_rows(out: Path, grid: Grid, columns: list[str]) -> dict[str, dict[str, str]]:
    """Finished rows of a previous run in ``out`` by point hash; raises if they do not belong to this grid."""
    path = out / CSV_NAME
    if not path.exists():
        return {}
    header, rows = read_csv(path)
    hint = f"(use --restart to discard {path} and start over)"
    if header != columns:
        extra = sorted(set(header) ^ set(columns))
        what = f"column '{extra[0]}' differs" if extra else "the column order differs"
        raise ValueError(f"sweep output {path} does not match this grid file: {what} {hint}")
    known = {p.hash: p for p in grid.points}
    out_rows = {}
    for row in rows:
        h = row.get("hash", "")
        if h not in known:
            raise ValueError(f"sweep output {path} holds point {row.get('point')} (hash {h}) that this grid file no "
                             f"longer defines: the grid or its base scenario changed {hint}")
        row["point"] = str(known[h].index)  # a compatible edit may have renumbered the points
        out_rows[h] = row
    return out_rows


def git_commit() -> str | None:
    """HEAD of the source checkout jaxq runs from, or None (not a checkout, or git missing)."""
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else None


def _versions() -> dict[str, str | None]:
    out = {}
    for pkg in ("jax", "jaxlib", "equinox", "numpy", "jaxq"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_manifest(grid: Grid, columns: list[str], devices, max_batch: int) -> dict:
    import jax

    return {
        "format": FORMAT,
        "complete": False,
        "name": grid.name,
        "description": grid.description,
        "grid_file": grid.path,
        "grid_text": grid.text,
        "grid_hash": grid.hash,
        "base_scenario": scenario_dict(grid.base),
        "points_total": len(grid.points),
        "points_done": 0,
        "points": [{"point": p.index, "hash": p.hash, "values": p.values} for p in grid.points],
        "seeds": {"sweep": grid.seed, "points": sorted({p.settings["seed"] for p in grid.points}),
                  "scheme": KEY_SCHEME},
        "versions": _versions(),
        "devices": {"kind": devices[0].device_kind, "platform": devices[0].platform, "count": len(devices),
                    "process_count": jax.process_count()},
        "git_commit": git_commit(),
        "max_batch": max_batch,
        "csv": CSV_NAME,
        "columns": columns,
        "started_at": now(),
        "finished_at": None,
        "sessions": [],
    }


def write_manifest(path: Path, manifest: dict) -> None:
    atomic_write(path, json.dumps(manifest, indent=2, default=_json_default) + "\n")


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


# -- progress ------------------------------------------------------------------------------------------

class Progress(ProgressLine):
    """The sweep's progress line: points done of all, the chunk running, events/s, elapsed, time left.

    Points are counted when their chunk finishes, and a chunk can run for minutes (at paper size, one
    policy's points), so the line also names the chunk running, and it is redrawn every ``tick``
    seconds (:class:`jaxq._progress.ProgressLine`)."""

    def __init__(self, total: int, done: int = 0, stream=None, enabled: bool = True, tick: float | None = None):
        self.total, self.done, self.start_done = total, done, done
        self.events = 0
        self.running = ""
        super().__init__(self.line, stream=stream, enabled=enabled, tick=tick)

    def start_chunk(self, index: int, count: int, points: int) -> None:
        """Chunk ``index`` (0-based) of ``count``, with ``points`` points, starts now."""
        self.running = f"running {points} (chunk {index + 1}/{count})"
        self.draw()

    def update(self, points: int, events: int) -> None:
        self.done += points
        self.events += events
        self.running = ""
        self.draw()

    def line(self, elapsed: float | None = None) -> str:
        elapsed = self.elapsed if elapsed is None else elapsed
        computed = self.done - self.start_done
        rate = self.events / elapsed if elapsed > 0 else 0.0
        left = elapsed / computed * (self.total - self.done) if computed else float("nan")
        if self.done >= self.total:
            left = 0.0
        running = f" | {self.running}" if self.running else ""
        return (f"sweep {self.done}/{self.total} points{running} | {rate:.3g} events/s | elapsed {clock(elapsed)} | "
                f"left {clock(left)}")
