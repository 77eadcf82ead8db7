"""Batching and sharding of replicas: the one place that vmaps an engine over replicas, splits them
over devices, pads their number and sizes the waiting rooms.

Replicas are split over a one-axis device mesh (axis name ``"replica"``) with ``shard_map``: each
device runs its own loop over its share, with no communication inside (a plain ``jit`` of sharded
inputs would synchronise the devices on the loop condition every step). Each replica's result depends
only on its key, so it is the same on any number of devices; the replica count is padded up to a
multiple of the device count with extra keys whose results are dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ..model.scenario import Scenario
from ..policies.protocol import Policy
from .engines import SHAPED_BY_B, runner
from .state import SimParams, SimSpec

AXIS = "replica"


def default_room(scenario: Scenario, n: int) -> int:
    """Waiting-room cells per class: 1.25 x max_i n lam_i / theta_i + 64 (a queue nobody serves is
    Poisson(n lam / theta), so this holds it with room to spare), at most 2^14; under a rate schedule
    lam_i is the class's peak rate. A full room still never drops silently (``lost`` and a status bit)."""
    theta = np.maximum(np.asarray(scenario.classes.theta, float), 1e-3)
    return int(min(2**14, 1.25 * np.max(n * np.asarray(scenario.peak_lam, float) / theta) + 64))


def engine_spec(engine: str, scenario: Scenario, n: int, room: int | None = None, convention: str = "B",
                dtype: str = "float64") -> SimSpec:
    """The static spec an engine compiles for: ``max_batch`` is the scenario's B for the engines shaped
    by it (SHAPED_BY_B), None for the others (so a sweep over B does not recompile them)."""
    room = default_room(scenario, n) if room is None else room
    max_batch = int(scenario.cluster.B) if engine in SHAPED_BY_B else None
    return SimSpec(num_classes=scenario.num_classes, num_gpus=n, room=room, convention=convention, dtype=dtype,
                   max_batch=max_batch)


INT32_MAX = 2**31 - 1
# XLA keeps the loop carry, its next value and the step's temporaries: a few copies of the state
WORKING_COPIES = 4


def state_bytes(engine: str, spec: SimSpec, batch: int) -> int:
    """An estimate, from the sizes alone, of one replica's simulation state in bytes: per GPU its
    class counts and flags (int32), per decode slot of the general engine its remaining work and class,
    and the waiting rooms (entry times, float64: the prefill queue and up to two decode buffers)."""
    I, n = spec.num_classes, spec.num_gpus
    per_gpu = (I + 4) * 4 + (16 * batch if engine == "general" else 0)
    if engine == "population":  # rows are configurations, not GPUs: the count does not grow with n
        per_gpu = 0
    rooms = 3 * I * spec.room * 8
    return n * per_gpu + rooms + 4096


def machine_memory() -> int | None:
    """Bytes this process may fill: the first device's memory limit where JAX reports one (GPU), else
    the host's physical memory; None if neither is known."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
    except Exception:  # noqa: BLE001 - CPU backends report nothing
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _gib(b: float) -> str:
    return f"{b / 2**30:.3g} GiB"


def check_sizes(engine: str, spec: SimSpec, scenario: Scenario, replicas: int, horizon: float,
                dt: float | None = None, memory: int | None = None) -> None:
    """Refuse, before anything is traced, a run whose sizes cannot work: a GPU-slot index or a
    per-replica counter past int32, or a state that cannot fit this machine's memory (``memory``:
    bytes, default :func:`machine_memory`). Raises ValueError naming the field and the limit."""
    n, I = spec.num_gpus, spec.num_classes
    batch = int(scenario.cluster.B)
    if n * batch * I > INT32_MAX:
        raise ValueError(f"invalid field 'n': n = {n} GPUs x B = {batch} slots x {I} classes overflows a 32-bit "
                         f"index; at most n = {INT32_MAX // (batch * I)}")
    memory = machine_memory() if memory is None else memory
    need = WORKING_COPIES * replicas * state_bytes(engine, spec, batch)
    if memory is not None and need > 0.8 * memory:
        raise ValueError(f"invalid field 'n' / 'replicas': n = {n} GPUs x {replicas} replicas need about "
                         f"{_gib(need)} of memory, more than 80% of this machine's {_gib(memory)}; lower n or "
                         f"replicas (a sweep: max_batch)")
    arrivals = horizon * n * float(np.max(np.asarray(scenario.peak_lam, float)))
    if 1.2 * arrivals > INT32_MAX:  # per-class counters are int32 (with room for the noise)
        raise ValueError(f"invalid field 'horizon': about {arrivals:.3g} arrivals of one class per replica "
                         f"(n = {n}, horizon = {horizon:g} s) overflow the int32 counters; keep n x lam_i x "
                         f"horizon below {INT32_MAX / 1.2:.3g}")
    if engine == "stepped" and dt is not None and horizon / dt > INT32_MAX:
        raise ValueError(f"invalid field 'dt': horizon / dt = {horizon / dt:.3g} steps overflow the int32 step "
                         f"counter; at least dt = {horizon / INT32_MAX:.3g} s")


def mesh(devices) -> Mesh:
    return Mesh(np.array(list(devices)), (AXIS,))


def shard(local, devices, in_specs, out_specs):
    """``jax.jit`` of ``local`` (a function of batched replicas) with the axes named ``AXIS`` in
    ``in_specs``/``out_specs`` split over ``devices``: the one ``shard_map`` of the project. One device:
    plain ``jit``."""
    devices = tuple(devices)
    if len(devices) == 1:
        return jax.jit(local)
    # check_vma=False: the engines' loop carries start replica-invariant (zeros) and become per-replica;
    # the body has no collectives, so the varying-axis type check has nothing to protect here.
    return jax.jit(jax.shard_map(local, mesh=mesh(devices), in_specs=in_specs, out_specs=out_specs, check_vma=False))


def padded(num: int, num_devices: int) -> int:
    """The replica count rounded up to a multiple of the device count."""
    return -(-num // num_devices) * num_devices


def pad_rows(x, num_devices: int):
    """Per-replica data (R, ...) padded to a multiple of ``num_devices`` with copies of row 0 (the
    padding replicas' results are dropped)."""
    pad = padded(x.shape[0], num_devices) - x.shape[0]
    return x if not pad else jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad, *x.shape[1:]))])


def pad_keys(keys, num_devices: int):
    """``keys`` (R, ...) padded to a multiple of ``num_devices`` with extra keys derived from the first."""
    pad = padded(keys.shape[0], num_devices) - keys.shape[0]
    if not pad:
        return keys
    return jnp.concatenate([keys, jax.random.split(jax.random.fold_in(keys[0], 2**31 - 1), pad)])


@functools.cache
def _program(engine: str, spec: SimSpec, policy: Policy, dt, service, record_times, devices: tuple, replicas: int,
             law_as_data: bool = False, jobs_per_replica: bool = False):
    """One jitted program per (engine, shapes, policy, service law, devices, replicas): replicas vmapped,
    padded to a multiple of the device count and split over ``devices``; the padding is dropped inside
    the program (one op per leaf outside it would be one more dispatch each). ``law_as_data``: the
    program takes the general engine's law as a third argument (LawArrays) instead of compiling it in;
    ``jobs_per_replica``: and a fourth, a replay's job table per replica (R, I, J), split like the keys."""
    single = runner(engine, spec, policy, dt=dt, service=service)
    law_spec = (P(),) if law_as_data else ()  # the law, when passed: replicated like params
    if jobs_per_replica:
        law_spec += (P(AXIS),)

    def local(keys, params, *law):
        if jobs_per_replica:
            base, tables = law
            with_jobs = lambda jobs: dataclasses.replace(base, jobs=jobs)  # noqa: E731
            return jax.vmap(lambda k, jobs: single(k, params, record_times, with_jobs(jobs)))(keys, tables)
        return jax.vmap(lambda k: single(k, params, record_times, *law))(keys)

    sharded = shard(local, devices, (P(AXIS), P(), *law_spec), P(AXIS))
    if padded(replicas, len(devices)) == replicas:
        return sharded
    return jax.jit(lambda keys, *args: jax.tree_util.tree_map(lambda x: x[:replicas], sharded(keys, *args)))


def clear_programs() -> None:
    """Forget the jitted programs :func:`run_replicas` keeps (with ``jax.clear_caches()``, frees their
    compiled code)."""
    _program.cache_clear()


def run_replicas(keys, params: SimParams, spec: SimSpec, policy: Policy, *, engine: str = "exact",
                 dt: float | None = None, record_times=None, devices=None, service=None, replay=None):
    """Final states (and trajectories) of ``len(keys)`` replicas of one engine, sharded over ``devices``
    (default: all local devices; on a CPU, ``jaxq`` commands make one per core). ``service`` is the law
    of the "general" engine, ``replay`` its trace jobs to replay (a TraceJobs: data, like an empirical
    law's samples); a ``spec`` without ``max_batch`` gets it from ``params.model.B`` (outside
    jit) for the engines shaped by B."""
    devices = tuple(jax.local_devices() if devices is None else devices)
    record_times = None if record_times is None else tuple(float(t) for t in record_times)
    if engine in SHAPED_BY_B and spec.max_batch is None:
        spec = dataclasses.replace(spec, max_batch=int(params.model.B))
    if engine == "general":
        from .general import ServiceLaw, TraceJobs, stack_jobs

        service = ServiceLaw.of(service)
        if replay is not None and not isinstance(replay, TraceJobs):  # one trace per replica
            if len(replay) != keys.shape[0]:
                raise ValueError(f"invalid field 'replay': {len(replay)} traces for {keys.shape[0]} replicas "
                                 "(one TraceJobs for all, or one per replica)")
            fn = _program(engine, spec, policy, dt, None, record_times, devices, keys.shape[0], law_as_data=True,
                          jobs_per_replica=True)
            tables = jax.tree_util.tree_map(lambda a: pad_rows(a, len(devices)), stack_jobs(replay))
            return fn(pad_keys(keys, len(devices)), params, service.arrays(), tables)
        if service.samples is not None or replay is not None:  # a trace's samples and jobs are data
            fn = _program(engine, spec, policy, dt, None, record_times, devices, keys.shape[0], law_as_data=True)
            return fn(pad_keys(keys, len(devices)), params, service.arrays(jobs=replay))
    elif replay is not None:
        raise ValueError(f"invalid field 'replay': only the 'general' engine replays a trace, got engine {engine!r}")
    fn = _program(engine, spec, policy, dt, service, record_times, devices, keys.shape[0])
    return fn(pad_keys(keys, len(devices)), params)
