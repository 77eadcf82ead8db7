"""Run sweep points in batches: one compile per shape group, replicas sharded over devices.

:func:`run_points` groups points by :meth:`Point.static_key` (engine, dt, policy, classes, n, room,
convention, dtype, replicas; the horizon too for the stepped engine). Each group runs through ONE
jitted function ``vmap(points) o vmap(replicas)`` of the engine's single-replica simulator, over
stacked :class:`SimParams`; the group is cut into equal chunks of at most ``max_batch`` points x
replicas (the last chunk padded with copies of its last point, so every call has the same shape and
nothing recompiles), which bounds memory.

One axis of a chunk is split over devices by :func:`jaxq.sim.batch.shard` (each device runs its own
while-loop over its share with no communication): the replicas, padded up to a multiple of the device
count (the padding replicas are extra keys of the same point, computed and dropped), or the points,
padded the same way with copies of the chunk's last point, whichever computes fewer padding replicas
(:func:`plan_chunks`; 10 points of 5 replicas on 2 devices: 50 replica runs by points, 60 by replicas).

Keys are a function of the point alone (see :attr:`Point.stream`), so a point's numbers do not depend
on its chunk, on resumption, or on the number of devices.

:func:`run_sweep` drives a grid into an output directory (CSV + manifest, resumable).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ..metrics.summary import Estimate, replica_metrics, summarize
from ..policies import get_policy
from ..api import make_params
from ..sim.batch import AXIS, check_sizes, engine_spec, mesh, padded, shard
from ..sim.engines import runner
from ..sim.state import EVENT_ROWS, SimSpec
from . import outputs
from .grid import Grid, Point, _digest, scenario_dict

# Times the batched simulator was traced (Python side effect at trace time: once per compile). Tests read it.
TRACE_COUNT = 0
_FIELDS = ("counts", "integrals", "totals", "status", "t")
DEFAULT_MAX_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class PointResult:
    """Outcome of one point: final-state accumulators per replica (leading axis R), metrics, summary."""

    point: Point
    lp_value: float
    num_mixed: int
    counts: np.ndarray  # (R, C, I) int32
    integrals: np.ndarray  # (R, 6, I) float64
    totals: np.ndarray  # (R, C, I)
    status: np.ndarray  # (R,)
    t: np.ndarray  # (R,)
    metrics: dict[str, np.ndarray]
    summary: dict[str, Estimate]
    events: int
    wall_s: float  # the chunk's wall time (compilation included) shared equally by its points


@functools.partial(jax.jit, static_argnums=3)
def _key_data(sweep_seed, seed, stream, num):
    """Raw replica keys (P, num, ...) of points given by their (sweep seed, seed, stream) triples."""
    def one(a, b, c):
        k = jax.random.fold_in(jax.random.fold_in(jax.random.key(a), b), c)
        return jax.random.key_data(jax.vmap(lambda r: jax.random.fold_in(k, r))(jnp.arange(num, dtype=jnp.uint32)))
    return jax.vmap(one)(sweep_seed, seed, stream)


def replica_keys(points: Sequence[Point], num: int) -> np.ndarray:
    """Raw key data of replicas 0..num-1 of each point: depends on the point only (not on its batch)."""
    col = lambda f: np.asarray([f(p) for p in points], dtype=np.uint32)
    return np.asarray(_key_data(col(lambda p: p.sweep_seed), col(lambda p: p.settings["seed"]),
                                col(lambda p: p.stream), num))


@functools.cache
def _batched(engine: str, dt: float | None, spec: SimSpec, policy_name: str, devices: tuple, by_points: bool = False):
    """The jitted group function: (key data (P, R, ...), stacked params (P, ...)) -> final-state fields
    (P, R, ...). Replicas (``by_points``: points) split over the devices; each device vmaps its points
    and replicas."""
    single = runner(engine, spec, get_policy(policy_name), dt=dt)

    def one(key_data, params):
        state, _ = single(jax.random.wrap_key_data(key_data), params)
        return {f: getattr(state, f) for f in _FIELDS}

    def local(key_data, params):
        global TRACE_COUNT
        TRACE_COUNT += 1  # trace-time side effect: counts compiles, not calls
        return jax.vmap(jax.vmap(one, in_axes=(0, None)))(key_data, params)

    if by_points:
        return shard(local, devices, (P(AXIS), P(AXIS)), P(AXIS))
    return shard(local, devices, (P(None, AXIS), P()), P(None, AXIS))


def _put(x: np.ndarray, sharding) -> jax.Array:
    # make_array_from_callback works when the mesh spans several processes (each places its own shards)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _fetch(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _groups(points: Sequence[Point]) -> list[list[Point]]:
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        groups.setdefault(p.static_key(), []).append(p)
    return list(groups.values())


def _cut(num: int, per_call: int, multiple: int) -> tuple[int, int]:
    """(number of chunks, padded chunk size) for ``num`` points at most ``per_call`` per chunk (a
    multiple of ``multiple``): equal chunks, the least padding."""
    num_chunks = -(-num // per_call)
    return num_chunks, padded(-(-num // num_chunks), multiple)


def plan_chunks(points: Sequence[Point], max_batch: int,
                num_devices: int) -> list[tuple[list[Point], int, int, bool]]:
    """[(chunk points, padded chunk size, padded replicas, split by points)]: groups cut into equal
    chunks with at most ``max_batch`` points x padded replicas each (at least one point per chunk).

    A chunk's replicas are split over the devices (replicas padded to a multiple of the device count),
    unless splitting its points computes fewer replica runs in all (points padded to a multiple of it
    with copies of the last point) within the same ``max_batch``. Either way a point's numbers are the
    same: its keys depend on the point alone and each replica is computed alone."""
    if not (isinstance(max_batch, int) and max_batch >= 1):
        raise ValueError(f"invalid field 'max_batch': must be an integer >= 1, got {max_batch!r}")
    out = []
    for members in _groups(points):
        replicas = members[0].settings["replicas"]
        r_pad = padded(replicas, num_devices)
        num_chunks, size = _cut(len(members), max(1, max_batch // r_pad), 1)
        by_points = False
        per_call = max_batch // replicas // num_devices * num_devices
        if num_devices > 1 and per_call >= num_devices:
            chunks_p, size_p = _cut(len(members), per_call, num_devices)
            if chunks_p * size_p * replicas < num_chunks * size * r_pad:
                num_chunks, size, r_pad, by_points = chunks_p, size_p, replicas, True
        step = -(-len(members) // num_chunks)
        for c in range(num_chunks):
            out.append((members[c * step:(c + 1) * step], size, r_pad, by_points))
    return out


def _spec(point: Point) -> SimSpec:
    s = point.settings
    return engine_spec(s["engine"], point.scenario, s["n"], s["room"], s["convention"], s["dtype"])


def preflight(points: Sequence[Point], max_batch: int = DEFAULT_MAX_BATCH) -> None:
    """Check and trace (abstractly: no compile, ~0.1-0.4 s) the single-replica simulator of every shape
    group, so a combination an engine refuses (say, a policy the population engine cannot run exactly)
    or a chunk too large for memory fails before the first group runs, naming a point."""
    for members in _groups(points):
        p = members[0]
        s = p.settings
        policy = get_policy(s["policy"])
        # memory is held one chunk at a time (plan_chunks): at most max_batch // replicas points of it
        chunk_replicas = min(len(members), max(1, max_batch // s["replicas"])) * s["replicas"]
        try:
            check_sizes(s["engine"], _spec(p), p.scenario, chunk_replicas, s["horizon"], s["dt"])
        except ValueError as err:
            raise ValueError(f"sweep point {p.index}: {err}") from None
        params, _, _ = make_params(p.scenario, policy, s["n"], s["horizon"], s["warmup"], max_steps=s["max_steps"])
        try:
            single = runner(s["engine"], _spec(p), policy, dt=s["dt"])
            jax.eval_shape(lambda k, pr: single(k, pr)[0], jax.random.key(0), params)  # noqa: B023
        except ValueError as err:
            label = p.label()
            raise ValueError(f"sweep point {p.index}" + (f" ({label})" if label else "") + f": {err}") from None


def run_points(points: Sequence[Point], *, max_batch: int = DEFAULT_MAX_BATCH, devices=None,
               on_chunk: Callable[[list[PointResult]], None] | None = None,
               on_start: Callable[[int, int, int], None] | None = None) -> list[PointResult]:
    """Simulate every point (all replicas) and return their results in the order given.

    devices: the devices to split replicas over (default ``jax.devices()``: every device of every
        process; under ``jax.distributed`` all processes must call this with the same points).
    on_chunk: called with each chunk's results as soon as they are on the host (write them, report
        progress); an exception from it stops the run.
    on_start: called as ``on_start(chunk index, number of chunks, points in the chunk)`` before each chunk.
    """
    preflight(points, max_batch)
    devices = list(jax.devices() if devices is None else devices)
    grid_mesh = mesh(devices)
    lp_cache: dict[tuple, object] = {}
    results: dict[int, PointResult] = {}  # by id(point): any list of points, even from several grids
    chunks = plan_chunks(points, max_batch, len(devices))
    for index, (chunk, size, r_pad, by_points) in enumerate(chunks):
        if on_start is not None:
            on_start(index, len(chunks), len(chunk))
        t0 = time.perf_counter()
        s = chunk[0].settings
        policy = get_policy(s["policy"])
        fn = _batched(s["engine"], s["dt"], _spec(chunk[0]), s["policy"], tuple(devices), by_points)
        key_sharding = NamedSharding(grid_mesh, P(AXIS) if by_points else P(None, AXIS))
        param_sharding = NamedSharding(grid_mesh, P(AXIS) if by_points else P())
        built = []
        for p in chunk:
            # the LP depends on the scenario and the policy's objective only: share it across horizons, seeds
            lp_key = (_digest(scenario_dict(p.scenario)), p.settings["policy"])
            params, lp, plan = make_params(p.scenario, policy, p.settings["n"], p.settings["horizon"],
                                           p.settings["warmup"], max_steps=p.settings["max_steps"],
                                           lp_solution=lp_cache.get(lp_key))
            lp_cache[lp_key] = lp
            built.append((params, lp, plan))
        pad = list(range(len(chunk))) + [len(chunk) - 1] * (size - len(chunk))
        keys = replica_keys([chunk[j] for j in pad], r_pad)
        stacked = jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                         *[built[j][0] for j in pad])
        out = fn(_put(keys, key_sharding), jax.tree_util.tree_map(lambda x: _put(x, param_sharding), stacked))
        out = {k: _fetch(v) for k, v in out.items()}
        wall = (time.perf_counter() - t0) / len(chunk)
        chunk_results = []
        for j, p in enumerate(chunk):
            R = p.settings["replicas"]
            f = {k: v[j, :R] for k, v in out.items()}
            metrics = replica_metrics(_State(f["counts"], f["integrals"]), p.scenario, p.settings["n"],
                                      p.settings["horizon"], p.settings["warmup"])
            _, lp, plan = built[j]
            res = PointResult(point=p, lp_value=float(lp.value), num_mixed=int(plan.num_mixed), counts=f["counts"],
                              integrals=f["integrals"], totals=f["totals"], status=f["status"], t=f["t"],
                              metrics=metrics, summary=summarize(metrics),
                              events=int(f["totals"][:, list(EVENT_ROWS)].sum()), wall_s=wall)
            results[id(p)] = res
            chunk_results.append(res)
        if on_chunk is not None:
            on_chunk(chunk_results)
    return [results[id(p)] for p in points]


@dataclasses.dataclass(frozen=True)
class _State:
    counts: np.ndarray
    integrals: np.ndarray


@dataclasses.dataclass(frozen=True)
class SweepOutcome:
    out: Path
    rows: list[dict[str, str]]  # every finished point's CSV row, by point index
    computed: int  # points simulated by this call (the rest came from a previous run)
    complete: bool


def run_sweep(grid: Grid, out: str | Path, *, restart: bool = False, quiet: bool = True,
              max_batch: int = DEFAULT_MAX_BATCH, devices=None, stream=None,
              on_chunk: Callable[[list[PointResult]], None] | None = None) -> SweepOutcome:
    """Run a grid into ``out`` (``results.csv``, ``manifest.json``), skipping the points a previous run
    there finished. Only process 0 writes; all processes compute (under ``jax.distributed``).

    restart: discard a previous run in ``out`` instead of resuming it (needed when the grid changed
        incompatibly: a finished point the grid no longer defines, or other columns).
    on_chunk: called after each chunk's rows are written (tests use it to stop a run part-way).
    """
    out = Path(out)
    devices = list(jax.devices() if devices is None else devices)
    writer = jax.process_index() == 0
    columns = outputs.csv_columns(grid)
    csv_path, manifest_path = out / outputs.CSV_NAME, out / outputs.MANIFEST_NAME
    rows: dict[str, dict[str, str]] = {}
    error = None
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        if restart:
            for path in (csv_path, manifest_path):
                path.unlink(missing_ok=True)
        try:
            rows = outputs.existing_rows(out, grid, columns)
        except ValueError as err:
            error = err
    done = np.array([error is not None] + [p.hash in rows for p in grid.points])
    if jax.process_count() > 1:  # every process must run the same chunks, and stop together on an error
        from jax.experimental import multihost_utils

        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    if done[0]:
        raise error if error is not None else ValueError("sweep: process 0 refused the output directory")
    todo = [p for p, d in zip(grid.points, done[1:]) if not d]

    manifest = None
    if writer:
        old = _read_manifest(manifest_path) if rows else None
        manifest = outputs.new_manifest(grid, columns, devices, max_batch)
        if old is not None:  # a resumed run keeps its first start time and history
            manifest["started_at"] = old.get("started_at", manifest["started_at"])
            manifest["sessions"] = old.get("sessions", [])
        manifest["points_done"] = len(rows)
        manifest["sessions"].append({"started_at": outputs.now(), "finished_at": None, "points_computed": 0,
                                     "devices": len(devices), "max_batch": max_batch})
        if todo or not csv_path.exists():
            outputs.write_csv(csv_path, columns, _ordered(rows))
        manifest["complete"] = not todo
        if not todo:
            manifest["finished_at"] = (old or {}).get("finished_at") or outputs.now()
            manifest["sessions"][-1]["finished_at"] = outputs.now()
        outputs.write_manifest(manifest_path, manifest)

    progress = outputs.Progress(len(grid.points), len(grid.points) - len(todo), stream=stream,
                                enabled=not quiet and writer)

    def handle(chunk_results):
        if writer:
            for res in chunk_results:
                rows[res.point.hash] = outputs.result_row(res, grid)
            outputs.write_csv(csv_path, columns, _ordered(rows))  # rows first, then the manifest that counts them
            manifest["points_done"] = len(rows)
            manifest["sessions"][-1]["points_computed"] += len(chunk_results)
            outputs.write_manifest(manifest_path, manifest)
        progress.update(len(chunk_results), sum(r.events for r in chunk_results))
        if on_chunk is not None:
            on_chunk(chunk_results)

    try:
        run_points(todo, max_batch=max_batch, devices=devices, on_chunk=handle, on_start=progress.start_chunk)
    finally:
        progress.close()
    if writer and todo:
        manifest["complete"] = len(rows) == len(grid.points)
        manifest["finished_at"] = manifest["sessions"][-1]["finished_at"] = outputs.now()
        outputs.write_manifest(manifest_path, manifest)
    # only process 0 holds the rows; the others report what they computed
    return SweepOutcome(out=out, rows=_ordered(rows), computed=len(todo),
                        complete=len(rows) == len(grid.points) if writer else True)


def _ordered(rows: dict[str, dict[str, str]]) -> list[dict[str, str]]:
    return sorted(rows.values(), key=lambda r: int(r["point"]))


def _read_manifest(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
