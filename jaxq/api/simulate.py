"""One-call simulation of a scenario under a policy: LP, static planning, batched replicas, summary."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from ..lp import solve_lp, static_plan
from ..metrics.summary import Estimate, replica_metrics, status_report, summarize
from ..model.config import load_scenario
from ..model.scenario import Scenario
from ..policies import Policy, PolicyTargets, load_policy
from ..sim.batch import check_sizes, engine_spec, run_replicas
from ..sim.engines import ENGINES, check
from ..sim.state import SimParams


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


def make_params(scenario: Scenario, policy: Policy | str, n: int, horizon: float, warmup: float,
                max_steps: int = 2**31 - 1, lp_solution=None):
    """SimParams for ``n`` GPUs, planned by the policy's LP (``policy.planning``: bundled or separate)."""
    policy = load_policy(policy)
    scenario = scenario.replace(**{"cluster.n": n})
    if lp_solution is None:
        lp_solution = solve_lp(scenario, policy.planning)
    plan = static_plan(lp_solution, scenario, n)
    params = SimParams(model=scenario.params(), targets=PolicyTargets.from_plan(plan),
                       horizon=jnp.float64(horizon), warmup=jnp.float64(warmup), max_steps=jnp.int32(max_steps))
    return params, lp_solution, plan


def run(scenario: Scenario | str | os.PathLike, policy: str | Policy = "gg-sp", *, n: int | None = None, replicas: int = 16,
        horizon: float = 1000.0, warmup: float | None = None, seed: int = 0, room: int | None = None,
        convention: str = "B", dtype: str = "float64", record_times=None, engine: str = "exact",
        dt: float | None = None, lp_solution=None, service="exponential", replay=None) -> SimulationResult:
    """Simulate ``replicas`` independent copies from an empty cluster and summarise them.

    ``scenario`` is a :class:`~jaxq.model.Scenario`, a bundled scenario's name ("canonical") or a
    ``.toml`` path; ``policy`` a built-in's name, a :class:`~jaxq.policies.Policy`, or ``FILE.py:NAME``
    / ``MODULE:NAME`` (:func:`jaxq.policies.load_policy`).

    ``warmup`` defaults to 20% of the horizon. ``room`` (waiting-room cells per class) defaults to
    :func:`jaxq.sim.batch.default_room`; a full room never drops silently (``lost`` and a status bit).
    ``engine`` is "exact" (event by event), "population" (the same CTMC with GPUs counted by
    configuration: its cost per event does not grow with n; see :mod:`jaxq.sim.population`) or
    "stepped" (time steps of ``dt``; see :mod:`jaxq.sim.stepped` and docs/time-stepped.md for its
    measured bias). ``lp_solution`` plans the
    policy from a given LP solution (for example an SLI-constrained one from :func:`jaxq.lp.solve_sli`)
    instead of the policy's own LP. ``service`` is the law of the prompt and output lengths (a
    :class:`jaxq.sim.general.ServiceLaw` or "exponential", "deterministic", "lognormal"): a
    non-exponential law runs the "general" engine (:mod:`jaxq.sim.general`; engine "exact" switches to
    it, "stepped" refuses); engine "general" may also be asked for by name. An empirical law
    (``ServiceLaw.empirical(prompt_samples, output_samples)``) needs the scenario's P_i, D_i to be its
    sample means (``law.with_means(scenario)``; checked to 0.1%). A scenario's arrival schedule
    (``scenario.arrivals``) drives every engine; the LP plans for the constant ``classes.lam``.

    ``replay`` (a :class:`jaxq.sim.general.TraceJobs`) replays a trace's own jobs on the general engine:
    each job arrives at its time with its own prompt and output tokens, in every replica (which then
    differ only in abandonments and the policy's random choices); ``service`` should then be the
    trace's empirical law (:func:`jaxq.traces.simulate.empirical_law`), whose means the LP plans with.
    A list of ``replicas`` TraceJobs replays one trace per replica (traces generated per replica, as
    :func:`jaxq.traces.simulate.resampled_jobs` does). A replay's state counts each job's TTFT, TPOT and
    end-to-end latency (``state.gpus.latency_counts``; percentiles: :func:`jaxq.traces.simulate.job_latencies`).
    """
    from ..sim.general import ServiceLaw

    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario)
    law = ServiceLaw.of(service)
    if replay is not None:
        from ..sim.general import TraceJobs

        traces = [replay] if isinstance(replay, TraceJobs) else replay
        if not isinstance(traces, (list, tuple)) or not all(isinstance(t, TraceJobs) for t in traces):
            raise ValueError("invalid field 'replay': must be a jaxq.sim.general.TraceJobs or a list of them (one "
                             f"per replica), got {type(replay).__name__}")
        for t in traces:
            if t.num_classes != scenario.num_classes:
                raise ValueError(f"invalid field 'replay': the trace's jobs are in {t.num_classes} classes, the "
                                 f"scenario has {scenario.num_classes}")
        if engine not in ("exact", "general"):
            raise ValueError(f"invalid field 'engine': a replay runs on the 'general' engine (per-job work), got {engine!r}")
        engine = "general"
    if engine not in ENGINES:
        raise ValueError(f"invalid field 'engine': must be one of {', '.join(ENGINES)}, got {engine!r}")
    if not law.is_exponential:
        if engine in ("stepped", "population"):
            raise ValueError(f"invalid field 'service': the {engine} engine simulates exponential lengths only "
                             f"(use engine 'exact' or 'general'), got {law.label()!r}")
        engine = "general"
    law.check_means(scenario.classes.P, scenario.classes.D)  # an empirical law's samples define the means
    pol = load_policy(policy)
    n = scenario.cluster.n if n is None else n
    warmup = 0.2 * horizon if warmup is None else warmup
    for name, v, ok in (("replicas", replicas, replicas >= 1), ("horizon", horizon, horizon > 0),
                        ("warmup", warmup, 0 <= warmup < horizon)):
        if not ok:
            raise ValueError(f"invalid field '{name}': got {v!r} (need replicas >= 1, horizon > 0, 0 <= warmup < horizon)")
    if not (isinstance(n, (int, np.integer)) and n >= 1):
        raise ValueError(f"invalid field 'n': must be an integer >= 1, got {n!r}")
    spec = engine_spec(engine, scenario, n, room, convention, dtype)
    dt, _ = check(engine, spec, pol, dt, law if engine == "general" else None)
    check_sizes(engine, spec, scenario, replicas, horizon, dt)
    params, lp, plan = make_params(scenario, pol, n, horizon, warmup, lp_solution=lp_solution)
    keys = jax.random.split(jax.random.key(seed), replicas)
    if engine == "stepped":
        from ..sim.stepped import check_dt

        check_dt(params.model, dt)
    state, traj = run_replicas(keys, params, spec, pol, engine=engine, dt=dt, record_times=record_times,
                               service=law if engine == "general" else None, replay=replay)
    metrics = replica_metrics(state, scenario, n, horizon, warmup)
    return SimulationResult(
        scenario=scenario, policy=pol.name, engine=engine, dt=dt, n=n, horizon=horizon, warmup=warmup, replicas=replicas,
        lp_value=lp.value, num_mixed=plan.num_mixed, metrics=metrics, summary=summarize(metrics),
        status=status_report(state.status), state=state, trajectory=traj,
        service=law if engine == "general" else None,
    )
