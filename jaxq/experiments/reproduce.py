"""``jaxq reproduce EXPERIMENT``: the paper's numerical study (MODEL.md §7), one command per experiment.

    jaxq reproduce --list
    jaxq reproduce convergence --size quick --out results
    jaxq reproduce all --size smoke

Every experiment module exposes

* ``SIZES``: ``{"smoke": {...}, "quick": {...}, "paper": {...}}``, the settings of each size. "smoke"
  is what the tests run (seconds), "quick" runs in under 10 minutes on a 2-core CPU, "paper" is the
  paper's size (a GPU in minutes, or a CPU in hours);
* ``TITLE``: one line naming the paper's section and figures;
* ``reproduce(out: Output, settings: dict, log) -> None``: runs the experiment, writes its tables and
  figures through ``out`` and records each of the paper's claims it can check with ``out.claim``.

Everything lands in ``<out>/<experiment>-<size>/``: CSV tables (tidy: one row per point and metric,
with mean, standard error and 95% interval for every simulated number), PNG figures and
``manifest.json`` (experiment, size, settings, versions, device, git commit, wall time, the files
written and the claims with their evidence). The manifest says ``"complete": false`` until the
experiment has finished, so a killed run never looks complete.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import io
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

# name -> module. Imported lazily: each pulls in what it needs (matplotlib, the engines, the LPs).
EXPERIMENTS: dict[str, str] = {
    "convergence": "jaxq.experiments.convergence",
    "finite-n": "jaxq.experiments.finite_n",
    "baselines": "jaxq.experiments.baselines",
    "sli-cost": "jaxq.experiments.sli_cost",
    "sensitivity": "jaxq.experiments.sensitivity",
    "dolly": "jaxq.experiments.dolly",
    "service-laws": "jaxq.experiments.service_laws",
    "stepped-bias": "jaxq.experiments.stepped_bias",
    "tune-finite-n": "jaxq.experiments.tune_finite_n",
    "trace": "jaxq.experiments.trace_study",
}
SIZES = ("smoke", "quick", "paper")


def experiment_module(name: str):
    if name not in EXPERIMENTS:
        raise ValueError(f"invalid field 'experiment': must be one of {', '.join(EXPERIMENTS)} or 'all', got {name!r}")
    return importlib.import_module(EXPERIMENTS[name])


@dataclasses.dataclass(frozen=True)
class Claim:
    """One of the paper's claims and what our run says about it. ``holds`` is None when the run is too
    small to decide (the evidence then says what size would)."""

    name: str
    paper: str
    holds: bool | None
    evidence: str


def _jsonable(v):
    import numpy as np

    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    if dataclasses.is_dataclass(v):
        return dataclasses.asdict(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)


class Output:
    """Where one experiment writes: tables, figures, claims, and a manifest kept up to date."""

    def __init__(self, experiment: str, size: str, root: str | Path, settings: dict):
        self.experiment, self.size, self.settings = experiment, size, dict(settings)
        self.dir = Path(root) / f"{experiment}-{size}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.files: list[str] = []
        self.claims: list[Claim] = []
        self.numbers: dict[str, object] = {}
        self.t0 = time.perf_counter()
        self.started = _now()
        self._static = _run_facts()  # versions, device, commit: fixed for the run, read once
        self._write_manifest(complete=False)

    # -- writing ----------------------------------------------------------------------------------
    def table(self, name: str, rows: list[dict], columns: list[str] | None = None) -> Path:
        """Write ``rows`` as ``<name>.csv`` (columns: ``columns`` or the union of the rows' keys, in
        first-seen order). Floats are written with full precision."""
        if columns is None:
            columns = []
            for r in rows:
                columns += [k for k in r if k not in columns]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, extrasaction="raise", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(r.get(k, "")) for k in columns})
        path = self.dir / f"{name}.csv"
        _atomic_write(path, buf.getvalue().encode())
        self._add(path)
        return path

    def figure(self, name: str, fig) -> Path:
        """Save a matplotlib figure as ``<name>.png`` and close it."""
        import matplotlib.pyplot as plt

        path = self.dir / f"{name}.png"
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
        plt.close(fig)
        _atomic_write(path, buf.getvalue())
        self._add(path)
        return path

    def claim(self, name: str, paper: str, holds: bool | None, evidence: str) -> Claim:
        c = Claim(name, paper, None if holds is None else bool(holds), evidence)
        self.claims.append(c)
        self._write_manifest(complete=False)
        return c

    def number(self, name: str, value) -> None:
        """A headline number (kept in the manifest, quoted in docs/reproduction.md)."""
        self.numbers[name] = value

    def finish(self) -> Path:
        return self._write_manifest(complete=True)

    # -- internals ----------------------------------------------------------------------------------
    def _add(self, path: Path) -> None:
        if path.name not in self.files:
            self.files.append(path.name)
        self._write_manifest(complete=False)

    def _write_manifest(self, complete: bool) -> Path:
        manifest = {
            "experiment": self.experiment,
            "size": self.size,
            "complete": complete,
            "settings": self.settings,
            "files": self.files,
            "numbers": self.numbers,
            "claims": [dataclasses.asdict(c) for c in self.claims],
            **self._static,
            "started_at": self.started,
            "finished_at": _now() if complete else None,
            "wall_s": round(time.perf_counter() - self.t0, 2),
        }
        path = self.dir / "manifest.json"
        _atomic_write(path, (json.dumps(manifest, indent=2, default=_jsonable) + "\n").encode())
        return path


def _run_facts() -> dict:
    import jax

    from ..sweep.outputs import _versions, git_commit

    dev = jax.devices()
    return {"versions": _versions(), "device": {"kind": dev[0].device_kind, "platform": dev[0].platform,
                                                "count": len(dev)}, "git_commit": git_commit()}


def _cell(v):
    import numpy as np

    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    if isinstance(v, np.integer):
        return int(v)
    return v


def _now() -> str:
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def estimate_row(prefix: dict, metric: str, est, cls: int | str = "") -> dict:
    """A tidy row for one simulated estimate (``jaxq.metrics.summary.Estimate`` or a component of it)."""
    return {**prefix, "metric": metric, "class": cls, "mean": float(est.mean), "se": float(est.se),
            "lo": float(est.lo), "hi": float(est.hi)}


def estimate_rows(prefix: dict, summary: dict, metrics) -> list[dict]:
    """Tidy rows of several metrics of a simulation summary; per-class metrics get one row per class."""
    import numpy as np

    rows = []
    for m in metrics:
        est = summary[m]
        mean, se, lo, hi = (np.atleast_1d(np.asarray(v, float)) for v in (est.mean, est.se, est.lo, est.hi))
        per_class = np.ndim(est.mean) > 0
        for k in range(mean.shape[0]):
            rows.append({**prefix, "metric": m, "class": k if per_class else "", "mean": mean[k], "se": se[k],
                         "lo": lo[k], "hi": hi[k]})
    return rows


class Log:
    """What an experiment reports while it runs: messages, ``log("...")``, and a progress line with an
    estimate of the time left around its simulation loops, ``for item in log.track(items, weight=...)``.

    ``weight`` gives each item's share of the work (the expected events of a run, e.g. replicas x
    horizon x n), so that the estimate is elapsed / done-weight x remaining-weight. Messages printed
    during a loop go above the progress line. ``Log()`` with no stream is silent, ``Log(write)`` sends
    messages to a function and draws no line."""

    def __init__(self, write: Callable[[str], None] | None = None, stream=None, tick: float | None = None):
        self.stream, self.tick = stream, tick
        self._write = write
        self._line = None

    def __call__(self, msg: str) -> None:
        if self._line is not None:
            self._line.message(f"  {msg}")
        elif self._write is not None:
            self._write(msg)
        elif self.stream is not None:
            print(f"  {msg}", file=self.stream, flush=True)

    def track(self, items, weight: Callable[[object], float] | None = None, what: str = "runs"):
        from .._progress import ProgressLine, clock

        items = list(items)
        weights = [float(weight(x)) if weight is not None else 1.0 for x in items]
        total = sum(weights) or 1.0
        done = {"count": 0, "work": 0.0}

        def line(elapsed: float) -> str:
            frac = done["work"] / total
            left = elapsed / frac * (1.0 - frac) if frac > 0 else math.inf
            return (f"  [{done['count']}/{len(items)} {what}, {100 * frac:.0f}% of the work] "
                    f"elapsed {clock(elapsed)}, left ~{clock(left)}")

        if self.stream is None or self._line is not None:  # silent, or a loop inside a tracked loop
            yield from items
            return
        self._line = ProgressLine(line, self.stream, tick=self.tick)
        try:
            for x, w in zip(items, weights):
                yield x
                done["count"] += 1
                done["work"] += w
                self._line.draw()
        finally:
            self._line.close()
            self._line = None


def reproduce(name: str, size: str = "quick", out: str | Path = "results", *,
              log: Log | Callable[[str], None] | None = None,
              overrides: dict | None = None) -> Output:
    """Run one experiment at one size and return its :class:`Output` (files, claims, numbers)."""
    if size not in SIZES:
        raise ValueError(f"invalid field 'size': must be one of {', '.join(SIZES)}, got {size!r}")
    mod = experiment_module(name)
    settings = {**mod.SIZES[size], **(overrides or {})}
    if not isinstance(log, Log):
        log = Log(log)
    output = Output(name, size, out, settings)
    mod.reproduce(output, settings, log)
    output.finish()
    return output


# -- command line ---------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("experiment", nargs="?", help=f"one of {', '.join(EXPERIMENTS)}, or 'all'")
    parser.add_argument("--size", default="quick", choices=SIZES,
                        help="smoke: seconds (what the tests run); quick: < 10 min on a 2-core CPU; paper: the "
                             "paper's sizes (default: quick)")
    parser.add_argument("--out", default="results", help="results folder (default: results/)")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")


def run(args) -> int:
    if args.list or not args.experiment:
        for name in EXPERIMENTS:
            print(f"{name:14s} {experiment_module(name).TITLE}")
        return 0
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    for name in names:
        experiment_module(name)  # validate every name before running anything
    log = Log() if args.quiet else Log(stream=sys.stderr)
    for name in names:
        print(f"== {name} ({args.size}): {experiment_module(name).TITLE}", flush=True)
        output = reproduce(name, args.size, args.out, log=log)
        for c in output.claims:
            verdict = {True: "agrees", False: "DISAGREES", None: "undecided"}[c.holds]
            print(f"  [{verdict}] {c.name}: {c.evidence}")
        print(f"  -> {output.dir} ({len(output.files)} files, {time.perf_counter() - output.t0:.0f} s)", flush=True)
    return 0
