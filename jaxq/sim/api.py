"""One-call simulation of a scenario under a policy: LP, static planning, batched replicas, summary."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ..lp import solve_lp, static_plan
from ..metrics.summary import Estimate, replica_metrics, status_report, summarize
from ..model.scenario import Scenario
from ..policies import AbstractPolicy, get_policy
from . import engine as _exact
from .state import PolicyTargets, SimParams, SimSpec

# Which LP plans each policy: prioritize-and-route is the separate-charging policy (MODEL.md §5.2).
_PLANNING_OBJECTIVE = {"priority": "separate"}


ENGINES = ("exact", "stepped", "general", "population")
# engines whose arrays are shaped by the batch size B (their spec is a GeneralSpec with max_batch = B)
SHAPED_BY_B = ("general", "population")


def engine_spec(engine: str, scenario: Scenario, n: int, room: int, policy: AbstractPolicy,
                convention: str = "B", dtype: str = "float64") -> SimSpec:
    """The static spec an engine compiles for: a :class:`SimSpec`, or for the engines shaped by B
    (SHAPED_BY_B) a ``GeneralSpec`` with ``max_batch`` the scenario's B."""
    spec = SimSpec(num_classes=scenario.num_classes, num_gpus=n, room=room, num_buffers=policy.num_buffers,
                   convention=convention, dtype=dtype)
    if engine in SHAPED_BY_B:
        from .general import GeneralSpec

        spec = GeneralSpec.from_spec(spec, int(scenario.cluster.B))
    return spec


def single_runner(engine: str = "exact", dt: float | None = None, service=None):
    """The one-replica simulator of an engine: ``fn(key, params, spec, policy, record_times=None) ->
    (final_state, trajectory)``. "exact" is the event-by-event CTMC; "stepped" the time-stepped
    approximation with step ``dt`` (None: its documented default); "population" the exact CTMC with
    GPUs counted by configuration (:mod:`jaxq.sim.population`); "general" the event-by-event engine
    with prompt and output lengths of law ``service`` (a :class:`jaxq.sim.general.ServiceLaw` or a law
    name; see :mod:`jaxq.sim.general`; its spec should be a ``GeneralSpec``). "exact" and "stepped"
    take only exponential service. Batch it with ``vmap``."""
    if engine not in ENGINES:
        raise ValueError(f"invalid field 'engine': must be one of {', '.join(ENGINES)}, got {engine!r}")
    if dt is not None and engine != "stepped":
        raise ValueError(f"invalid field 'dt': only the 'stepped' engine takes a step, got dt={dt!r}")
    if engine == "general":
        from . import general

        return functools.partial(general.run_single, law=general.ServiceLaw.of(service))
    if service is not None:
        from .general import ServiceLaw

        if not ServiceLaw.of(service).is_exponential:
            raise ValueError(f"invalid field 'service': the {engine!r} engine simulates exponential prompt and "
                             f"output lengths only (use engine 'general'), got {service!r}")
    if engine == "exact":
        return _exact.run_single
    if engine == "population":
        from . import population

        return population.run_single
    from . import stepped

    return functools.partial(stepped.run_single, dt=stepped.DEFAULT_DT if dt is None else float(dt))


@functools.cache
def _sharded(engine: str, dt: float | None, spec: SimSpec, policy: AbstractPolicy, record_times, devices: tuple,
             service=None):
    """One jitted program per (engine, shapes, devices, service law): replicas split over a one-axis mesh
    with ``shard_map``, each device running its own loop over its share (no communication inside: a plain
    jit of sharded inputs would synchronise the devices on the loop condition every step)."""
    single = single_runner(engine, dt, service)

    def local(keys, params):
        return jax.vmap(lambda k: single(k, params, spec, policy, record_times))(keys)

    if len(devices) == 1:
        return jax.jit(local)
    mesh = Mesh(np.array(devices), ("replica",))
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("replica"), P()), out_specs=P("replica"),
                                 check_vma=False))


def run_replicas(keys, params: SimParams, spec: SimSpec, policy: AbstractPolicy, *, engine: str = "exact",
                 dt: float | None = None, record_times=None, devices=None, service=None):
    """Final states (and trajectories) of ``len(keys)`` replicas, sharded over ``devices`` (default: all
    local devices; on a CPU, ``jaxq`` commands make one per core). The replica count is padded up to a
    multiple of the device count with extra keys whose results are dropped; each replica's result
    depends only on its key, so it is the same on any number of devices. ``service`` is the law of the
    "general" engine (a plain ``spec`` gets its ``max_batch`` from ``params.model.B``)."""
    devices = tuple(jax.local_devices() if devices is None else devices)
    record_times = None if record_times is None else tuple(float(t) for t in record_times)
    if engine in SHAPED_BY_B:
        from .general import ServiceLaw, as_general_spec

        spec = as_general_spec(spec, params)
        service = ServiceLaw.of(service) if engine == "general" else None
    fn = _sharded(engine, dt, spec, policy, record_times, devices, service)
    R = keys.shape[0]
    pad = -R % len(devices)
    if pad:
        keys = jnp.concatenate([keys, jax.random.split(jax.random.fold_in(keys[0], 2**31 - 1), pad)])
    state, traj = fn(keys, params)
    if pad:
        state, traj = jax.tree_util.tree_map(lambda x: x[:R], (state, traj))
    return state, traj


@dataclasses.dataclass(frozen=True)
class SimulationResult:
    scenario: Scenario
    policy: str
    engine: str
    dt: float | None
    n: int
    horizon: float
    warmup: float
    replicas: int
    lp_value: float
    num_mixed: int
    metrics: dict[str, np.ndarray]  # per replica
    summary: dict[str, Estimate]
    status: dict[str, int]
    state: object  # batched final SimState
    trajectory: object | None
    service: object = None  # the ServiceLaw of the "general" engine (None for the exponential engines)


def make_params(scenario: Scenario, policy: AbstractPolicy | str, n: int, horizon: float, warmup: float,
                max_steps: int = 2**31 - 1, lp_solution=None):
    """SimParams for ``n`` GPUs, planned by the policy's LP (bundled unless the policy says otherwise)."""
    name = policy if isinstance(policy, str) else policy.name
    scenario = scenario.replace(**{"cluster.n": n})
    if lp_solution is None:
        lp_solution = solve_lp(scenario, _PLANNING_OBJECTIVE.get(name, "bundled"))
    plan = static_plan(lp_solution, scenario, n)
    params = SimParams(model=scenario.params(), targets=PolicyTargets.from_plan(plan),
                       horizon=jnp.float64(horizon), warmup=jnp.float64(warmup), max_steps=jnp.int32(max_steps))
    return params, lp_solution, plan


def run(scenario: Scenario, policy: str | AbstractPolicy = "gg-sp", *, n: int | None = None, replicas: int = 16,
        horizon: float = 1000.0, warmup: float | None = None, seed: int = 0, room: int | None = None,
        convention: str = "B", dtype: str = "float64", record_times=None, engine: str = "exact",
        dt: float | None = None, lp_solution=None, service="exponential") -> SimulationResult:
    """Simulate ``replicas`` independent copies from an empty cluster and summarise them.

    ``warmup`` defaults to 20% of the horizon. ``room`` (waiting-room cells per class) defaults to
    1.25 x max_i n lam_i / theta_i + 64: a queue nobody serves is Poisson(n lam / theta), so this
    holds it with room to spare; a full room still never drops silently (``lost`` and a status bit).
    ``engine`` is "exact" (event by event), "population" (the same CTMC with GPUs counted by
    configuration: its cost per event does not grow with n; see :mod:`jaxq.sim.population`) or
    "stepped" (time steps of ``dt``; see :mod:`jaxq.sim.stepped` and docs/time-stepped.md for its
    measured bias). ``lp_solution`` plans the
    policy from a given LP solution (for example an SLI-constrained one from :func:`jaxq.lp.solve_sli`)
    instead of the policy's own LP. ``service`` is the law of the prompt and output lengths (a
    :class:`jaxq.sim.general.ServiceLaw` or "exponential", "deterministic", "lognormal"): a
    non-exponential law runs the "general" engine (:mod:`jaxq.sim.general`; engine "exact" switches to
    it, "stepped" refuses); engine "general" may also be asked for by name.
    """
    from .general import ServiceLaw

    law = ServiceLaw.of(service)
    if engine not in ENGINES:
        raise ValueError(f"invalid field 'engine': must be one of {', '.join(ENGINES)}, got {engine!r}")
    if not law.is_exponential:
        if engine in ("stepped", "population"):
            raise ValueError(f"invalid field 'service': the {engine} engine simulates exponential lengths only "
                             f"(use engine 'exact' or 'general'), got {law.label()!r}")
        engine = "general"
    pol = get_policy(policy) if isinstance(policy, str) else policy
    n = scenario.cluster.n if n is None else n
    warmup = 0.2 * horizon if warmup is None else warmup
    for name, v, ok in (("replicas", replicas, replicas >= 1), ("horizon", horizon, horizon > 0),
                        ("warmup", warmup, 0 <= warmup < horizon)):
        if not ok:
            raise ValueError(f"invalid field '{name}': got {v!r} (need replicas >= 1, horizon > 0, 0 <= warmup < horizon)")
    if room is None:
        theta = np.maximum(scenario.classes.theta, 1e-3)
        room = int(min(2**14, 1.25 * np.max(n * scenario.classes.lam / theta) + 64))
    params, lp, plan = make_params(scenario, pol, n, horizon, warmup, lp_solution=lp_solution)
    spec = engine_spec(engine, scenario, n, room, pol, convention, dtype)
    keys = jax.random.split(jax.random.key(seed), replicas)
    if engine == "stepped":
        from . import stepped

        dt = float(stepped.DEFAULT_DT if dt is None else dt)
        stepped.check_dt(params.model, dt)
    state, traj = run_replicas(keys, params, spec, pol, engine=engine, dt=dt, record_times=record_times,
                               service=law if engine == "general" else None)
    metrics = replica_metrics(state, scenario, n, horizon, warmup)
    return SimulationResult(
        scenario=scenario, policy=pol.name, engine=engine, dt=dt, n=n, horizon=horizon, warmup=warmup, replicas=replicas,
        lp_value=lp.value, num_mixed=plan.num_mixed, metrics=metrics, summary=summarize(metrics),
        status=status_report(state.status), state=state, trajectory=traj,
        service=law if engine == "general" else None,
    )
