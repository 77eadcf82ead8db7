"""`jaxq bench`: simulation speed of the engines and of peer simulators, measured in one run.

    jaxq bench [--quick] [--out FILE_OR_DIR]          (or: python benchmarks/run.py ...)

On whatever device JAX finds, one run measures

1. events per second of each engine ("exact"; "stepped" when :mod:`jaxq.sim.stepped` imports) on the
   canonical instance (policy GG-SP) at n = 500 for several replica counts, compile time (AOT
   ``lower().compile()``) apart from run time;
2. peers on the same machine: Ciw and a SimPy model on the M/M/c+M special case (c = 100, one class,
   patience) next to the engines on that same case, and the plain-Python reference simulator
   (:mod:`jaxq.testing.reference`) on the canonical instance;
3. scaling: cost against replicas, against n (fixed horizon) and against the horizon (fixed replicas),
   with the fitted growth exponent;
4. for the exact engine, time per event against a memory-bandwidth bound (bytes per event from XLA's
   cost analysis of one step, divided by the device's bandwidth);
5. for each engine, what one compiled step is: fused kernels and while loops in the HLO XLA emits,
   bytes and flops per replica-step;
6. the yardstick: the simplest exact JAX chain of M/M/c+M (:mod:`jaxq.benchmarks.chain`, checked
   against Erlang A in the same run), and each engine's M/M/c+M rate as a fraction of it.

Each timed call is sized (its simulated horizon calibrated by short pilot calls) to take about
``target_s`` seconds of wall time. Events are counted the same way for every engine: per replica,
arrivals + prefill completions + decode completions + abandonments (prefill queue and decode buffer),
from the final state's ``totals``. Speed is measured here, never asserted.

A table is printed and a JSON record is written (default
``benchmarks/results/bench-<platform>-<device>-<date>.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _datetime
import importlib
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxq

from ..lp import solve_bundled, solve_lp, static_plan
from ..policies import get_policy
from ..api import make_params
from ..sim.batch import engine_spec
from ..sim.engines import build, check, runner
from ..testing.scenarios import mmc_scenario
from ..sim.state import COUNTER_NAMES
from ..sim.state import EVENT_ROWS as STATE_EVENT_ROWS

# Rows of `totals` that are events (the engine-independent count).
EVENT_ROWS = tuple(COUNTER_NAMES[i] for i in STATE_EVENT_ROWS)  # jaxq.sim.state.EVENT_ROWS, by name
# The M/M/c+M events (arrivals and departures): what Ciw and SimPy simulate. The engine's extra
# prefill completion (the tiny prompt) has no counterpart there, so the ratios use these.
MMC_EVENT_ROWS = ("arrived", "decode_done", "abandon_prefill", "abandon_decode")

# Peak memory bandwidth (B/s) by a substring of jax's device_kind. CPU: measured in-run.
DEVICE_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 1.6e12}

SCHEMA = "jaxq-bench/1"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What one bench run measures. ``full``/``quick``/``tiny`` presets: :data:`PRESETS`."""

    mode: str = "full"
    engines: tuple[str, ...] = ("exact", "population", "stepped")
    stepped_dt: float | None = None  # None: the stepped engine's DEFAULT_DT
    policy: str = "gg-sp"
    n: int = 500
    replicas: tuple[int, ...] = (1, 64, 1024)
    target_s: float = 3.0  # wall seconds per timed call (horizon calibrated to it)
    min_call_s: float = 0.3  # a call shorter than this is repeated and the best kept
    repeats: int = 2  # every timing is the best of this many calls (the machine may be shared)
    # simulated seconds at least (exact engine; canonical, M/M/c+M): too short a horizon measures the
    # batch's stragglers (the loop runs until the slowest replica is done) and the empty-system start
    min_horizon: tuple[float, float] = (0.1, 1.0)
    scale_replicas: int = 64  # replicas of the n and horizon sweeps
    scale_n: tuple[int, ...] = (20, 100, 500)
    horizon_mults: tuple[float, ...] = (1.0, 2.0, 4.0)
    mmc_c: int = 100
    mmc_load: float = 0.95
    mmc_theta: float = 0.5
    mmc_replicas: tuple[int, ...] = (64, 1024, 8192)
    mmc_engines: tuple[str, ...] = ("exact", "population", "stepped")  # of those available
    peers: bool = True
    step_cost: bool = True  # compile one step for the bandwidth bound (else: the whole loop's cost / R)
    bandwidth_mb: int = 256  # numpy copy size for the CPU bandwidth measurement
    seed: int = 0
    # devices to split replicas over, as jaxq.run and the sweeps do (None: every local device; on a CPU
    # the jaxq command makes one per core); the engines at R = scale_replicas also run on one device
    devices: int | None = None


PRESETS = {
    "full": BenchConfig(),
    # a smoke run (about 1.5 minutes on the 2-core CPU): no n sweep (each n is one more compile), short timings
    "quick": BenchConfig(mode="quick", replicas=(1, 64), target_s=0.5, min_call_s=0.1, repeats=1,
                         min_horizon=(0.02, 0.2), mmc_engines=("exact", "population"), scale_n=(500,),
                         horizon_mults=(1.0, 2.0), mmc_replicas=(64,), step_cost=False, bandwidth_mb=64),
    # the test's mode (seconds, mostly compiling): exact engine only, every section exercised
    "tiny": BenchConfig(mode="tiny", engines=("exact",), n=8, replicas=(2,), target_s=0.03, min_call_s=0.0,
                        repeats=1, min_horizon=(0.0, 0.0),
                        scale_replicas=2, scale_n=(8,), horizon_mults=(1.0, 2.0), mmc_c=5, mmc_replicas=(2,),
                        step_cost=False, bandwidth_mb=8),
}


# -- machine -------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str):
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001 - absent or versionless
        return None


def _git_commit():
    """HEAD's commit read from .git (no git process), or None outside a checkout."""
    root = Path(__file__).resolve().parents[2] / ".git"  # jaxq/benchmarks/bench.py -> <repo>/.git
    try:
        if root.is_file():  # a worktree: "gitdir: PATH"
            root = Path(root.read_text().split(":", 1)[1].strip())
        head = (root / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        for base in (root, Path(str(root).split("/worktrees/")[0]) if "/worktrees/" in str(root) else root):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
            packed = base / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
    except OSError:
        pass
    return None


def machine_info() -> dict:
    dev = jax.devices()[0]
    cores = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    return {
        "platform": dev.platform, "device_kind": dev.device_kind, "num_devices": jax.device_count(),
        "cpu_model": _cpu_model(), "cpu_cores": cores, "cpu_cores_usable": usable,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "jax": jax.__version__, "jaxlib": _version("jaxlib"),
        "numpy": np.__version__, "jaxq": jaxq.__version__, "ciw": _version("ciw"), "simpy": _version("simpy"),
        "commit": _git_commit(),
    }


def numpy_copy_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Host memory bandwidth (B/s): best of ``repeats`` numpy copies of ``mb`` MiB (read + write)."""
    a = np.ones(mb * 2**20 // 8)
    b = np.empty_like(a)
    np.copyto(b, a)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best


def device_copy_bandwidth(mb: int = 1024, repeats: int = 5) -> float:
    """Device memory bandwidth (B/s) of a jitted elementwise copy (read + write), for unknown devices."""
    x = jnp.ones(mb * 2**20 // 4, jnp.float32)
    f = jax.jit(lambda v: v * 1.0001)
    jax.block_until_ready(f(x))
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        best = min(best, time.perf_counter() - t0)
    return 2 * x.nbytes / best


def memory_bandwidth(cfg: BenchConfig) -> tuple[float, str]:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return numpy_copy_bandwidth(cfg.bandwidth_mb), f"measured: numpy copy of {cfg.bandwidth_mb} MiB"
    for key, bw in DEVICE_BANDWIDTH.items():
        if key.lower() in dev.device_kind.lower():
            return bw, f"peak of {key} (table)"
    return device_copy_bandwidth(), "measured: jitted device copy of 1 GiB (device not in the table)"


# -- timing helpers ------------------------------------------------------------------------------
def _timed(call, min_total_s: float = 0.0, max_reps: int = 20, min_reps: int = 1):
    """Wall time of ``call()`` (best of ``min_reps`` calls, more while the total is under
    ``min_total_s``), its result and the number of calls."""
    t0 = time.perf_counter()
    out = call()
    best = time.perf_counter() - t0
    total, reps = best, 1
    while (total < min_total_s or reps < min_reps) and reps < max_reps:
        t0 = time.perf_counter()
        call()
        s = time.perf_counter() - t0
        best, total, reps = min(best, s), total + s, reps + 1
    return best, out, reps


def _calibrated(time_at, h0: float, target_s: float, h_max: float = 1e6, h_min: float = 0.0):
    """The horizon whose call takes about ``target_s``, and ``(horizon, seconds, result)`` of that call.
    ``time_at(h) -> (seconds, result)``. A first call at ``h0`` warms up (untimed), a second measures
    the fixed cost of a call; the horizon then grows until the part above that fixed cost is >= target/8
    and is extrapolated linearly (re-extrapolated once if the call came out under target/3), never
    below ``h_min``."""
    time_at(h0)
    base, _ = time_at(h0)
    h, s = h0, base
    for _ in range(40):
        if s - base >= target_s / 8 or h >= h_max:
            break
        h = min(h_max, h * float(np.clip(target_s / 8 / max(s - base, 1e-9), 2.0, 16.0)))
        s, _ = time_at(h)

    def extrapolate(h, s):
        return float(min(h_max, max(h, h_min, h * max(target_s - base, target_s / 2) / max(s - base, 1e-9))))

    for _ in range(2):
        h = extrapolate(h, s)
        s, out = time_at(h)
        if s >= target_s / 3 or h >= h_max:
            break
    return h, s, out


def _fmt(x, spec=".3g"):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def growth_exponent(xs, ys):
    """Least-squares slope of log y on log x (None with fewer than two distinct x)."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    if len(set(xs.tolist())) < 2 or np.any(ys <= 0):
        return None
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def verdict(k, tol=0.15):
    if k is None:
        return "n/a"
    return "linear" if abs(k - 1) <= tol else ("sublinear" if k < 1 else "superlinear")


# -- the engines ---------------------------------------------------------------------------------
def available_engines(requested) -> tuple[list[str], dict]:
    """The requested engines that import, and a note per engine."""
    ok, notes = [], {}
    for name in requested:
        if name == "stepped":
            try:
                importlib.import_module("jaxq.sim.stepped")
            except Exception as err:  # noqa: BLE001 - being written elsewhere: skip it, say why
                notes[name] = f"skipped: jaxq.sim.stepped does not import ({type(err).__name__}: {err})"
                continue
        elif name not in ("exact", "population"):
            notes[name] = "skipped: unknown engine"
            continue
        ok.append(name)
        notes[name] = "available"
    return ok, notes


def split_devices(num: int | None, replicas: int) -> tuple:
    """The local devices a batch of ``replicas`` is split over: the first ``num`` (None: all), fewer
    where they do not divide the replicas (the largest count that does; 1 replica: one device)."""
    devices = jax.local_devices()
    if num is not None:
        if not (isinstance(num, int) and 1 <= num <= len(devices)):
            raise ValueError(f"invalid field 'devices': must be an integer in 1..{len(devices)}, got {num!r}")
        devices = devices[:num]
    d = len(devices)
    while replicas % d:
        d -= 1
    return tuple(devices[:d])


def sharded_jit(fn, devices):
    """``jax.jit`` of ``fn`` (keys (R, ...), shared arguments...) with the replicas split over
    ``devices`` (:func:`jaxq.sim.batch.shard`, as the library's own runs do)."""
    from jax.sharding import PartitionSpec as P

    from ..sim.batch import AXIS, shard

    return shard(fn, devices, (P(AXIS), P()), P(AXIS))


def count_events(state, rows=EVENT_ROWS) -> float:
    totals = np.asarray(state.totals)  # (R, C, I)
    idx = [COUNTER_NAMES.index(r) for r in rows]
    return float(totals[:, idx].sum())


class EngineCase:
    """One compiled batched simulator: engine x scenario x n x replicas (x room, policy)."""

    def __init__(self, engine, scenario, policy_name, n, replicas, room, seed=0, dt=None, lp=None, repeats=1,
                 devices=None):
        self.engine, self.scenario, self.n, self.replicas = engine, scenario, n, replicas
        self.devices = split_devices(devices, replicas)
        self.repeats = repeats  # each timing is the best of this many calls
        self.policy = get_policy(policy_name)
        self.spec = engine_spec(engine, scenario, n, room)
        self.keys = jax.random.split(jax.random.key(seed), replicas)
        sc_n = scenario.replace(**{"cluster.n": n})
        self.lp = lp if lp is not None else solve_lp(sc_n, self.policy.planning)
        self.dt, self.note = None, None
        if engine == "stepped":
            stepped = importlib.import_module("jaxq.sim.stepped")
            self.dt = float(stepped.DEFAULT_DT if dt is None else dt)
            model = self.params(1.0).model
            if dt is None:  # the default step, shrunk where a phase is faster than 1/dt (rate x dt <= 1)
                worst = max(float(np.max(np.asarray(v))) for v in (model.mu_p, model.mu_m, model.mu_s, model.theta))
                if worst * self.dt > 1.0:
                    self.dt = 0.999 / worst
                    self.note = f"dt shrunk to {self.dt:.3g} s (fastest phase {worst:.4g}/s; default {stepped.DEFAULT_DT})"
            if hasattr(stepped, "check_dt"):
                stepped.check_dt(model, self.dt)
        single = runner(engine, self.spec, self.policy, dt=self.dt)
        self.fn = sharded_jit(lambda keys, params: jax.vmap(lambda k: single(k, params)[0])(keys), self.devices)
        params = self.params(1e-3)
        t0 = time.perf_counter()
        lowered = self.fn.lower(self.keys, params)
        t1 = time.perf_counter()
        self.compiled = lowered.compile()
        t2 = time.perf_counter()
        self.lower_s, self.compile_s = t1 - t0, t2 - t1
        self.bytes_whole = _bytes_accessed(self.compiled)

    def params(self, horizon):
        return make_params(self.scenario, self.policy, self.n, horizon=horizon, warmup=0.0, lp_solution=self.lp)[0]

    def call(self, horizon):
        params = self.params(horizon)

        def go():
            return jax.block_until_ready(self.compiled(self.keys, params))

        return go

    def measure(self, horizon, min_call_s=0.0, label=None) -> dict:
        s, state, reps = _timed(self.call(horizon), min_call_s, min_reps=self.repeats)
        return self.row(horizon, s, state, reps, label)

    def row(self, horizon, run_s, state, reps=1, label=None) -> dict:
        events = count_events(state)
        row = {"engine": self.engine, "case": label or self.scenario.name, "n": self.n, "replicas": self.replicas,
               "devices": len(self.devices), "horizon_s": horizon, "events": events, "lower_s": self.lower_s, "compile_s": self.compile_s,
               "run_s": run_s, "reps": reps, "events_per_s": events / run_s,
               "us_per_event": 1e6 * run_s / events if events else None,
               "status_bad": int(np.sum(np.asarray(state.status) != 0))}
        if self.engine in ("exact", "population"):  # one event per step (plus each replica's last, stopping, step)
            steps = np.asarray(state.step)
            row["steps"] = float(np.sum(steps))
            # the batched loop runs max(step) iterations for every replica: the rest is idle work
            row["loop_iterations"] = int(np.max(steps))
            row["loop_efficiency"] = row["steps"] / (self.replicas * row["loop_iterations"])
            row["us_per_replica_step"] = 1e6 * run_s / (self.replicas * row["loop_iterations"])
        else:  # time steps of the stepped engine, summed over replicas
            row["time_steps"] = float(np.sum(np.asarray(state.step)))
        if self.dt is not None:
            row["dt"] = self.dt
        if self.note:
            row["note"] = self.note
        if label == "mmc":
            row["mmc_events"] = count_events(state, MMC_EVENT_ROWS)
            row["mmc_events_per_s"] = row["mmc_events"] / run_s
        return row

    def calibrated(self, target_s, h0, min_call_s=0.0, label=None, h_min=0.0) -> dict:
        def time_at(h):
            s, st, _ = _timed(self.call(h))
            return s, st

        # the floor on the horizon is for the exact engine's stragglers; the stepped engine has none
        h, s, state = _calibrated(time_at, h0, target_s, h_min=0.0 if self.engine == "stepped" else h_min)
        reps = 1
        if s < min_call_s or self.repeats > 1:
            s2, _, more = _timed(self.call(h), min_call_s, min_reps=self.repeats - 1)
            s, reps = min(s, s2), 1 + more
        return self.row(h, s, state, reps, label)


def _bytes_accessed(compiled):
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca["bytes accessed"])
    except Exception:  # noqa: BLE001 - cost analysis is best effort
        return None


def step_profile(case: EngineCase) -> dict | None:
    """What one compiled step of ``case``'s engine costs, batched over its replicas, read from the
    optimized HLO XLA emits: the fused kernels (``fusion`` instructions, in loop bodies too), the
    ``while`` loops, and XLA's cost analysis (bytes accessed and flops) per replica. One step is one
    event of an event engine, one time step of the stepped engine. None if the engine has no single
    step to compile (an internal change the bench has not followed: reported, not hidden)."""
    try:
        params = case.params(1.0)
        dt, law = check(case.engine, case.spec, case.policy, case.dt)
        sim = build(case.engine, case.spec, case.policy, params, dt=dt, law=law)
        keys, states = jax.vmap(lambda k: sim.init(k, params))(case.keys)
        until = dt if case.engine == "stepped" else params.horizon  # the stepped step takes its length
        f = jax.jit(lambda keys, params, states: jax.vmap(lambda k, s: sim.step(k, params, s, until))(keys, states))
        compiled = f.lower(keys, params, states).compile()
    except Exception as err:  # noqa: BLE001 - recorded in the output
        return {"engine": case.engine, "error": f"{type(err).__name__}: {err}"}
    text = compiled.as_text()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    R = case.replicas
    return {"engine": case.engine, "n": case.n, "replicas": R,
            "fused_kernels": len(re.findall(r"\sfusion\(", text)),
            "while_loops": len(re.findall(r"\swhile\(", text)),
            "hlo_instructions": sum(1 for line in text.splitlines() if " = " in line),
            "bytes_per_replica_step": float(cost["bytes accessed"]) / R if "bytes accessed" in cost else None,
            "flops_per_replica_step": float(cost["flops"]) / R if "flops" in cost else None}


# -- peers ---------------------------------------------------------------------------------------
def chain_run(c, lam, mu, theta, replicas, target_s, seed=0, devices=None) -> dict:
    """The simplest exact JAX chain (:mod:`jaxq.benchmarks.chain`) on M/M/c+M, its number of steps sized
    by a pilot call to take about ``target_s`` seconds; replicas split over ``devices`` like the engines'."""
    from .chain import simplest_chain

    devices = split_devices(devices, replicas)
    pilot = simplest_chain(c, lam, mu, theta, replicas, 2_000, seed, devices=devices)
    steps = int(min(max(2_000, 2_000 * target_s / max(pilot.run_s, 1e-6)), 5e8 / replicas))
    r = simplest_chain(c, lam, mu, theta, replicas, steps, seed, devices=devices)
    return {**dataclasses.asdict(r), "z_queue": r.z_queue, "z_abandon": r.z_abandon, "devices": len(devices)}


def ciw_run(c, lam, mu, theta, horizon, seed=0) -> dict:
    import ciw

    net = ciw.create_network(arrival_distributions=[ciw.dists.Exponential(rate=lam)],
                             service_distributions=[ciw.dists.Exponential(rate=mu)], number_of_servers=[c],
                             reneging_time_distributions=[ciw.dists.Exponential(rate=theta)])
    ciw.seed(seed)
    sim = ciw.Simulation(net)
    t0 = time.perf_counter()
    sim.simulate_until_max_time(horizon)
    secs = time.perf_counter() - t0
    arrivals = len(sim.get_all_individuals())  # everyone who entered (still inside or gone)
    departures = len(sim.get_all_records())  # services and reneges
    return {"c": c, "horizon_s": horizon, "events": arrivals + departures, "arrivals": arrivals,
            "departures": departures, "run_s": secs, "version": ciw.__version__}


def simpy_run(c, lam, mu, theta, horizon, seed=0) -> dict:
    """A plain SimPy M/M/c+M: a Resource of c servers, each customer reneges when its patience
    runs out first (``yield req | env.timeout(patience)``)."""
    import random

    import simpy

    rng = random.Random(seed)
    env = simpy.Environment()
    servers = simpy.Resource(env, capacity=c)
    counts = {"arrivals": 0, "served": 0, "reneged": 0}

    def customer():
        counts["arrivals"] += 1
        with servers.request() as req:
            got = yield req | env.timeout(rng.expovariate(theta))
            if req in got:
                yield env.timeout(rng.expovariate(mu))
                counts["served"] += 1
            else:
                counts["reneged"] += 1

    def source():
        while True:
            yield env.timeout(rng.expovariate(lam))
            env.process(customer())

    env.process(source())
    t0 = time.perf_counter()
    env.run(until=horizon)
    secs = time.perf_counter() - t0
    events = counts["arrivals"] + counts["served"] + counts["reneged"]
    return {"c": c, "horizon_s": horizon, "events": events, **counts, "run_s": secs, "version": simpy.__version__}


def _peer(run_fn, h0, target_s, repeats=1) -> dict:
    def time_at(h):
        r = run_fn(h)
        return r["run_s"], r

    h, _, out = _calibrated(time_at, h0, target_s)
    for _ in range(repeats - 1):  # same seed, same events: keep the fastest
        out["run_s"] = min(out["run_s"], run_fn(h)["run_s"])
    out["reps"] = repeats
    out["events_per_s"] = out["events"] / out["run_s"]
    return out


def reference_run(cfg: BenchConfig) -> dict:
    from ..testing.reference import PolicyTargets as RefTargets
    from ..testing.reference import benchmark_reference

    sc = jaxq.load_scenario("canonical").replace(**{"cluster.n": cfg.n})
    lp = solve_bundled(sc)
    plan = static_plan(lp, sc, cfg.n)
    targets = RefTargets(num_mixed=plan.num_mixed, x_star=plan.x_target, q_p_star=lp.q_p, p_solo=plan.p_solo)

    def run_at(h):
        r = benchmark_reference(sc, cfg.policy, targets, horizon=h, seed=cfg.seed)
        return {"n": cfg.n, "policy": cfg.policy, "horizon_s": h, "events": r["events"], "run_s": r["seconds"]}

    return _peer(run_at, 0.2, cfg.target_s, cfg.repeats)


# -- the run -------------------------------------------------------------------------------------
def _room(n):
    return max(64, int(1.6 * n))


def _print_row(r, what, compiled=True):
    extra = (f", {r['steps']:.3g} steps (loop efficiency {r['loop_efficiency']:.2f})" if "steps" in r
             else f", {r['time_steps']:.3g} time steps" if "time_steps" in r else "")
    bad = f", {r['status_bad']} replicas flagged" if r.get("status_bad") else ""
    comp = f"compile {r['compile_s'] + r['lower_s']:5.1f} s, " if compiled else " " * 17
    if r.get("note"):
        print(f"  ({r['note']})")
    print(f"  {what:<28} {comp}run {r['run_s']:7.3f} s "
          f"(horizon {r['horizon_s']:.3g} s{', best of ' + str(r['reps']) if r['reps'] > 1 else ''}): "
          f"{r['events']:.3g} events{extra} -> {r['events_per_s']:.3g} events/s{bad}", flush=True)


def run_bench(cfg: BenchConfig = PRESETS["full"], out: str | Path | None = None, verbose: bool = True) -> dict:
    """Run every measurement of ``cfg``; write the JSON record to ``out`` (a folder, a .json file, or
    None for no file) and return it."""
    t_start = time.perf_counter()
    log = print if verbose else (lambda *a, **k: None)
    info = machine_info()
    engines, notes = available_engines(cfg.engines)
    record = {"schema": SCHEMA, "date": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
              "mode": cfg.mode, "config": dataclasses.asdict(cfg), "machine": info, "engines": notes,
              "canonical": [], "canonical_one_device": [], "scaling": {"replicas": {}, "n": {}, "horizon": {}}, "peers": {},
              "mmc_engine": [], "chain": [], "ratios": [], "bandwidth": [], "step_profile": [],
              "errors": {}}
    log(f"jaxq bench ({cfg.mode}) on {info['platform']}:{info['device_kind']} x{info['num_devices']}, "
        f"CPU {info['cpu_model']} ({info['cpu_cores']} cores), jax {info['jax']}, load {info['loadavg_start']}")
    for name, note in notes.items():
        if note != "available":
            log(f"  engine {name}: {note}")
    canonical = jaxq.load_scenario("canonical")
    lp_cache = {}

    def case(engine, scenario, n, R, room, policy=cfg.policy, devices=cfg.devices):
        key = (scenario.name, n, policy)
        if key not in lp_cache:
            pol = get_policy(policy)
            lp_cache[key] = solve_lp(scenario.replace(**{"cluster.n": n}), pol.planning)
        return EngineCase(engine, scenario, policy, n, R, room, cfg.seed, cfg.stepped_dt, lp_cache[key], cfg.repeats,
                          devices)

    h0 = 1e-3 if cfg.mode != "tiny" else 0.05
    for engine in engines:
        try:
            _engine_sections(cfg, engine, canonical, case, record, h0, log)
        except Exception as err:
            if engine == "exact":
                raise
            record["errors"][engine] = f"{type(err).__name__}: {err}"
            log(f"  engine {engine} FAILED: {record['errors'][engine]}")

    if cfg.peers:
        _peer_sections(cfg, engines, case, record, h0, log)

    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    record["total_s"] = time.perf_counter() - t_start
    if verbose:
        print(format_summary(record))
    if out is not None:
        path = output_path(record, out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2, default=float))
        record["path"] = str(path)
        log(f"\nwrote {path} ({record['total_s']:.0f} s in all)")
    return record


def _engine_sections(cfg, engine, canonical, case, record, h0, log):
    n = cfg.n
    log(f"\n[{engine}] canonical instance, n = {n}, {cfg.policy}, room {_room(n)} per class")
    by_R = {}
    for R in cfg.replicas:
        c = case(engine, canonical, n, R, _room(n))
        row = c.calibrated(cfg.target_s, h0, cfg.min_call_s, h_min=cfg.min_horizon[0])
        by_R[R] = (c, row)
        record["canonical"].append(row)
        _print_row(row, f"R = {R}")

    # the same engine on one device, beside the split run (like for like with a one-device machine)
    Rf = cfg.scale_replicas
    if Rf in by_R and by_R[Rf][1]["devices"] > 1:
        row = case(engine, canonical, n, Rf, _room(n), devices=1).calibrated(cfg.target_s, h0, cfg.min_call_s,
                                                                          h_min=cfg.min_horizon[0])
        record["canonical_one_device"].append(row)
        _print_row(row, f"R = {Rf}, one device")

    # the compiled step itself: kernels, loops, bytes per replica-step (so a change's effect is measured)
    R_prof = cfg.scale_replicas if cfg.scale_replicas in by_R else max(by_R)
    prof = step_profile(by_R[R_prof][0])
    record["step_profile"].append(prof)
    if "error" in prof:
        log(f"[{engine}] step profile FAILED: {prof['error']}")
    else:
        log(f"[{engine}] one compiled step (R = {R_prof}): {prof['fused_kernels']} fused kernels, "
            f"{prof['while_loops']} while loops, {prof['hlo_instructions']} HLO instructions; "
            f"{_fmt(prof['bytes_per_replica_step'])} B and {_fmt(prof['flops_per_replica_step'])} flops per replica-step")

    # scaling with replicas: wall time per unit of per-replica work ~ R^k (k = 1: no gain from batching)
    Rs = sorted(by_R)
    k_R = growth_exponent(Rs, [R * by_R[R][1]["us_per_event"] for R in Rs]) if len(Rs) > 1 else None
    record["scaling"]["replicas"][engine] = {
        "replicas": Rs, "events_per_s": [by_R[R][1]["events_per_s"] for R in Rs],
        "us_per_event": [by_R[R][1]["us_per_event"] for R in Rs], "exponent": k_R, "verdict": verdict(k_R)}

    # scaling with n at a fixed horizon and replica count (recompiles per n)
    Rf = cfg.scale_replicas
    if Rf in by_R:
        base_case, base_row = by_R[Rf]
    else:
        base_case = case(engine, canonical, n, Rf, _room(n))
        base_row = base_case.calibrated(cfg.target_s, h0, cfg.min_call_s, h_min=cfg.min_horizon[0])
    H = base_row["horizon_s"]
    log(f"[{engine}] scaling with n (R = {Rf}, horizon {H:.3g} s)")
    n_rows = []
    for m in cfg.scale_n:
        if m == n:
            row = dict(base_row)
        else:
            row = case(engine, canonical, m, Rf, _room(m)).measure(H, cfg.min_call_s)
        n_rows.append(row)
        _print_row(row, f"n = {m}", compiled=m != n)
    ns = [r["n"] for r in n_rows]
    k_n = growth_exponent(ns, [r["run_s"] for r in n_rows])
    k_n_ev = growth_exponent(ns, [r["us_per_event"] for r in n_rows])
    record["scaling"]["n"][engine] = {"replicas": Rf, "horizon_s": H, "rows": n_rows, "exponent": k_n,
                                      "verdict": verdict(k_n), "exponent_us_per_event": k_n_ev}

    # scaling with the horizon (same compiled code)
    T = H / max(cfg.horizon_mults)
    log(f"[{engine}] scaling with the horizon (R = {Rf}, n = {n})")
    h_rows = []
    for mult in cfg.horizon_mults:
        row = base_case.measure(mult * T, cfg.min_call_s)
        h_rows.append(row)
        _print_row(row, f"horizon {mult:g} T", compiled=False)
    k_h = growth_exponent([r["horizon_s"] for r in h_rows], [r["run_s"] for r in h_rows])
    k_he = growth_exponent([r["events"] for r in h_rows], [r["run_s"] for r in h_rows])
    record["scaling"]["horizon"][engine] = {"replicas": Rf, "n": n, "T": T, "rows": h_rows, "exponent": k_h,
                                            "verdict": verdict(k_h), "exponent_vs_events": k_he}
    log(f"[{engine}] growth exponents: replicas {_fmt(k_R, '.2f')} ({verdict(k_R)}), n {_fmt(k_n, '.2f')} "
        f"({verdict(k_n)}; per event {_fmt(k_n_ev, '.2f')}), horizon {_fmt(k_h, '.2f')} ({verdict(k_h)}; "
        f"against events {_fmt(k_he, '.2f')})")

    # bandwidth bound (exact engine, the large replica counts): one step of one replica moves
    # bytes_per_event through memory, so an event cannot take less than bytes_per_event / bandwidth
    if engine == "exact":
        bw, source = memory_bandwidth(cfg)
        for R in [R for R in Rs if R >= 64] or [max(Rs)]:
            c, row = by_R[R]
            prof = step_profile(c) if cfg.step_cost else None
            b_step = None if prof is None else prof.get("bytes_per_replica_step")
            method = "one step (vmapped), per replica"
            if b_step is None:
                b_step = None if c.bytes_whole is None else c.bytes_whole / R
                method = "whole compiled loop (body counted once), per replica"
            bound_us = None if b_step is None else 1e6 * b_step / bw
            bwrow = {"engine": engine, "replicas": R, "n": n, "bytes_per_event": b_step, "bytes_method": method,
                     "bandwidth_Bps": bw, "bandwidth_source": source, "bound_us_per_event": bound_us,
                     "measured_us_per_event": row["us_per_event"],
                     "ratio_measured_to_bound": None if not bound_us else row["us_per_event"] / bound_us,
                     # the same per replica-step the batched loop ran (idle stragglers' steps included)
                     "measured_us_per_replica_step": row["us_per_replica_step"],
                     "ratio_step_to_bound": None if not bound_us else row["us_per_replica_step"] / bound_us}
            record["bandwidth"].append(bwrow)
            log(f"[exact] bandwidth bound at R = {R}: {_fmt(b_step)} B/event ({method}) / {bw:.3g} B/s ({source}) "
                f"= {_fmt(bound_us)} us/event; measured {_fmt(row['us_per_event'])} us/event "
                f"-> {_fmt(bwrow['ratio_measured_to_bound'], '.2f')}x the bound "
                f"({_fmt(bwrow['ratio_step_to_bound'], '.2f')}x per replica-step run)")


def _peer_sections(cfg, engines, case, record, h0, log):
    c, lam, theta = cfg.mmc_c, cfg.mmc_load * cfg.mmc_c, cfg.mmc_theta
    log(f"\n[peers] M/M/c+M, c = {c}, load {cfg.mmc_load}, theta = {theta} (engine: fi-wsp, B = 1, P = 1 token)")
    peers = record["peers"]
    for name, fn in (("ciw", ciw_run), ("simpy", simpy_run)):
        try:
            importlib.import_module(name)
        except ImportError:
            peers[name] = {"skipped": f"{name} is not installed (pip install 'jaxq[bench]')"}
            log(f"  {name}: skipped, not installed")
            continue
        r = _peer(lambda h, fn=fn: fn(c, lam, 1.0, theta, h, cfg.seed), 2.0, cfg.target_s, cfg.repeats)
        peers[name] = r
        log(f"  {name} {r['version']}: {r['events']} events in {r['run_s']:.2f} s (horizon {r['horizon_s']:.3g} s) "
            f"-> {r['events_per_s']:.3g} events/s")
    for R in cfg.mmc_replicas:
        r = chain_run(c, lam, 1.0, theta, R, cfg.target_s, cfg.seed, cfg.devices)
        record["chain"].append(r)
        log(f"  simplest JAX chain R = {R}: compile {r['compile_s']:.2f} s, run {r['run_s']:.3f} s, "
            f"{r['events']:.3g} events -> {r['events_per_s']:.3g} events/s; Erlang A check: queue "
            f"{r['mean_queue']:.4g} ± {r['mean_queue_se']:.2g} vs {r['erlang_a_queue']:.4g} (z = {r['z_queue']:+.1f}), "
            f"P(abandon) {r['p_abandon']:.4g} vs {r['erlang_a_abandon']:.4g} (z = {r['z_abandon']:+.1f})")
    chain_at = {r["replicas"]: r["events_per_s"] for r in record["chain"]}
    mmc = mmc_scenario(c, lam, theta)
    for engine in engines:
        if engine in record["errors"] or engine not in cfg.mmc_engines:
            continue
        for R in cfg.mmc_replicas:
            try:
                ec = case(engine, mmc, c, R, max(64, int(5.12 * c)), policy="fi-wsp")
                row = ec.calibrated(cfg.target_s, h0, cfg.min_call_s, label="mmc", h_min=cfg.min_horizon[1])
            except Exception as err:
                if engine == "exact":
                    raise
                record["errors"][f"{engine}-mmc"] = f"{type(err).__name__}: {err}"
                log(f"  engine {engine} on M/M/c+M FAILED: {err}")
                break
            record["mmc_engine"].append(row)
            ratio = {"engine": engine, "replicas": R, "engine_mmc_events_per_s": row["mmc_events_per_s"]}
            for peer in ("ciw", "simpy"):
                if "events_per_s" in peers.get(peer, {}):
                    ratio[f"vs_{peer}"] = row["mmc_events_per_s"] / peers[peer]["events_per_s"]
            if R in chain_at:  # the same replica count: the chain is the ceiling, so this is <= 1
                ratio["vs_chain"] = row["mmc_events_per_s"] / chain_at[R]
            record["ratios"].append(ratio)
            _print_row(row, f"{engine} R = {R}")
            log(f"    M/M/c+M events (arrivals + departures) {row['mmc_events_per_s']:.3g}/s: "
                + ", ".join(f"{ratio[k]:.3g}x {k[3:]}" for k in ratio if k.startswith("vs_")))
    log(f"\n[peers] reference simulator (plain Python), canonical, n = {cfg.n}, {cfg.policy}")
    r = reference_run(cfg)
    peers["reference"] = r
    log(f"  {r['events']} events in {r['run_s']:.2f} s (horizon {r['horizon_s']:.3g} s) -> {r['events_per_s']:.3g} events/s")


# -- output --------------------------------------------------------------------------------------
def output_path(record, out) -> Path:
    out = Path(out)
    if out.suffix == ".json":
        return out
    m = record["machine"]
    dev = re.sub(r"[^A-Za-z0-9.]+", "_", m["device_kind"]).strip("_") or "device"
    suffix = "" if record["mode"] == "full" else f"-{record['mode']}"
    return out / f"bench-{m['platform']}-{dev}-{record['date'][:10]}{suffix}.json"


def default_out() -> Path:
    repo = Path(__file__).resolve().parents[2] / "benchmarks"  # jaxq/benchmarks/bench.py -> <repo>/benchmarks
    return (repo if repo.is_dir() else Path.cwd() / "benchmarks") / "results"


def format_summary(record) -> str:
    m = record["machine"]
    lines = [(f"\n== jaxq bench summary: {m['platform']}:{m['device_kind']}, CPU {m['cpu_model']} "
              f"({m['cpu_cores']} cores), jax {m['jax']}, mode {record['mode']} =="),
             f"{'what':<48}{'events/s':>10}{'us/event':>10}{'compile s':>10}{'run s':>8}{'horizon s':>10}"]

    def _eng_label(r):
        return f"{r['engine']} dt={r['dt']:.2g}" if r.get("dt") else r["engine"]

    def line(what, eps, us=None, comp=None, run=None, hor=None):
        lines.append(f"{what:<48}{_fmt(eps):>10}{_fmt(us):>10}{_fmt(comp, '.1f'):>10}{_fmt(run, '.2f'):>8}"
                     f"{_fmt(hor):>10}")

    def _on(r):
        return f", {r['devices']} dev" if r.get("devices", 1) > 1 or r in one else ""

    one = record.get("canonical_one_device", [])
    for r in record["canonical"] + one:
        line(f"{_eng_label(r)}, canonical n={r['n']}, R={r['replicas']}{_on(r)}", r["events_per_s"],
             r["us_per_event"], r["lower_s"] + r["compile_s"], r["run_s"], r["horizon_s"])
    for eng, s in record["scaling"]["n"].items():
        for r in s["rows"]:
            if r["n"] != record["config"]["n"]:
                line(f"{eng}, canonical n={r['n']}, R={r['replicas']}", r["events_per_s"], r["us_per_event"],
                     r["lower_s"] + r["compile_s"], r["run_s"], r["horizon_s"])
    for eng, s in record["scaling"]["horizon"].items():
        for r in s["rows"]:
            line(f"{eng}, canonical n={r['n']}, R={r['replicas']}, T x{r['horizon_s'] / s['T']:.0f}",
                 r["events_per_s"], r["us_per_event"], None, r["run_s"], r["horizon_s"])
    peers = record["peers"]
    if "reference" in peers:
        r = peers["reference"]
        line(f"reference (Python), canonical n={r['n']}", r["events_per_s"], 1e6 / r["events_per_s"], None,
             r["run_s"], r["horizon_s"])
    c = record["config"]["mmc_c"]
    for name in ("ciw", "simpy"):
        r = peers.get(name, {})
        if "events_per_s" in r:
            line(f"{name} {r['version']}, M/M/{c}+M", r["events_per_s"], 1e6 / r["events_per_s"], None, r["run_s"],
                 r["horizon_s"])
        elif r:
            lines.append(f"{name}: {r.get('skipped')}")
    for r in record.get("chain", []):
        line(f"simplest JAX chain, M/M/{c}+M, R={r['replicas']}{_on(r)}", r["events_per_s"], 1e6 / r["events_per_s"],
             r["compile_s"], r["run_s"], None)
    for r in record["mmc_engine"]:
        line(f"{_eng_label(r)}, M/M/{c}+M, R={r['replicas']}{_on(r)}, arr+dep", r["mmc_events_per_s"],
             1e6 / r["mmc_events_per_s"], r["lower_s"] + r["compile_s"], r["run_s"], r["horizon_s"])
    with_ratios = [q for q in record["ratios"] if any(k.startswith("vs_") for k in q)]
    if with_ratios:  # none without the peers and the chain: no empty line
        lines.append("ratios on M/M/c+M (events/s, arrivals + departures): " + "; ".join(
            f"{q['engine']} R={q['replicas']}: " + ", ".join(f"{q[k]:.3g}x {k[3:]}" for k in q if k.startswith("vs_"))
            for q in with_ratios))
    for eng in record["scaling"]["replicas"]:
        sr, sn, sh = (record["scaling"][d][eng] for d in ("replicas", "n", "horizon"))
        lines.append(f"growth ({eng}): time ~ R^{_fmt(sr['exponent'], '.2f')} per replica-work ({sr['verdict']}), "
                     f"~ n^{_fmt(sn['exponent'], '.2f')} at fixed horizon ({sn['verdict']}; per event "
                     f"n^{_fmt(sn['exponent_us_per_event'], '.2f')}), ~ T^{_fmt(sh['exponent'], '.2f')} "
                     f"({sh['verdict']}; ~ events^{_fmt(sh['exponent_vs_events'], '.2f')})")
    for p in record.get("step_profile", []):
        if "error" in p:
            lines.append(f"step profile ({p['engine']}): FAILED {p['error']}")
        else:
            lines.append(f"step profile ({p['engine']}, n={p['n']}, R={p['replicas']}): {p['fused_kernels']} fused "
                         f"kernels, {p['while_loops']} while loops, {_fmt(p['bytes_per_replica_step'])} B per replica-step")
    for b in record["bandwidth"]:
        lines.append(f"bandwidth bound (exact, R={b['replicas']}): {_fmt(b['bytes_per_event'])} B/event / "
                     f"{b['bandwidth_Bps']:.3g} B/s = {_fmt(b['bound_us_per_event'])} us/event; measured "
                     f"{_fmt(b['measured_us_per_event'])} us/event = {_fmt(b['ratio_measured_to_bound'], '.2f')}x bound "
                     f"({_fmt(b['ratio_step_to_bound'], '.2f')}x per replica-step run)")
    for eng, note in record["engines"].items():
        if note != "available":
            lines.append(f"{eng}: {note}")
    for k, v in record["errors"].items():
        lines.append(f"{k}: FAILED {v}")
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------
def _ints(s):
    return tuple(int(v) for v in s.split(","))


def _floats(s):
    return tuple(float(v) for v in s.split(","))


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run (about 1.5 minutes on a 2-core CPU): R in 1,64, short timings")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None,
                        help="output folder or .json file (default benchmarks/results/bench-<platform>-<device>-<date>.json)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    parser.add_argument("--engines", default=None,
                        help="comma list of exact,population,stepped (default all three, where available)")
    parser.add_argument("--dt", type=float, default=None, help="step of the stepped engine (default its DEFAULT_DT)")
    parser.add_argument("--replicas", type=_ints, default=None, help="comma list of replica counts (default 1,64,1024)")
    parser.add_argument("--n-list", type=_ints, default=None, help="n of the n-scaling sweep (default 20,100,500)")
    parser.add_argument("--horizon-mults", type=_floats, default=None, help="horizon multiples (default 1,2,4)")
    parser.add_argument("--target-s", type=float, default=None, help="wall seconds per timed call (default 3)")
    parser.add_argument("--no-peers", action="store_true", help="skip Ciw, SimPy and the reference simulator")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", type=int, default=None,
                        help="split replicas over this many local devices (default all; the jaxq command makes one per CPU core)")


def config_from_args(args) -> BenchConfig:
    cfg = PRESETS["tiny" if args.tiny else "quick" if args.quick else "full"]
    changes = {"seed": args.seed, "stepped_dt": args.dt, "devices": args.devices}
    for field, value in (("engines", args.engines and tuple(args.engines.split(","))), ("replicas", args.replicas),
                         ("scale_n", args.n_list), ("horizon_mults", args.horizon_mults),
                         ("target_s", args.target_s)):
        if value:
            changes[field] = value
    if args.no_peers:
        changes["peers"] = False
    if args.replicas and cfg.scale_replicas not in args.replicas:
        changes["scale_replicas"] = args.replicas[len(args.replicas) // 2]
    for field in ("replicas", "scale_n"):
        if any(v < 1 for v in changes.get(field, (1,))):
            raise ValueError(f"invalid field '{field}': must be positive integers")
    return dataclasses.replace(cfg, **changes)


def run(args) -> int:
    cfg = config_from_args(args)
    run_bench(cfg, out=None if args.no_write else (args.out or default_out()))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jaxq bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except ValueError as err:
        print(f"jaxq bench: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
