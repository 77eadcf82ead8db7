"""The engines by name, and the checks that refuse what an engine cannot run, before any tracing.

| name         | what it is                                                         | module |
|--------------|--------------------------------------------------------------------|--------|
| "exact"      | the CTMC event by event, one row per GPU                           | :mod:`jaxq.sim.exact` |
| "population" | the same CTMC with GPUs counted by configuration (cost free of n)  | :mod:`jaxq.sim.population` |
| "general"    | event by event with per-job work: any law of prompt/output lengths | :mod:`jaxq.sim.general` |
| "stepped"    | all GPUs advance together in steps of ``dt`` (approximate)         | :mod:`jaxq.sim.stepped` |

All four run the same policies through the same protocol (:mod:`jaxq.policies.protocol`).
"""

from __future__ import annotations

from ..policies.protocol import Policy
from .core import AbstractEngine, EventEngine
from .exact import PerGpu
from .general import LawArrays, PerJob, ServiceLaw
from .population import PerConfiguration
from .state import SimParams, SimSpec
from .stepped import DEFAULT_DT, SteppedEngine

ENGINES = ("exact", "population", "general", "stepped")
# engines whose arrays are shaped by the batch size B (their spec needs max_batch)
SHAPED_BY_B = ("general", "population")


def check(engine: str, spec: SimSpec, policy: Policy, dt: float | None = None, service=None):
    """Raise ValueError for what ``engine`` cannot run; return (dt, law) as the engine will use them
    (dt: the stepped engine's step, else None; law: the general engine's ServiceLaw, else None)."""
    if engine not in ENGINES:
        raise ValueError(f"invalid field 'engine': must be one of {', '.join(ENGINES)}, got {engine!r}")
    if not isinstance(policy, Policy):
        raise ValueError(f"invalid field 'policy': must be a jaxq.policies.Policy, got {policy!r}")
    if dt is not None and engine != "stepped":
        raise ValueError(f"invalid field 'dt': only the 'stepped' engine takes a step, got dt={dt!r}")
    law = None
    if engine == "general":
        law = service if isinstance(service, LawArrays) else ServiceLaw.of(service)
    elif service is not None and not ServiceLaw.of(service).is_exponential:
        raise ValueError(f"invalid field 'service': the {engine!r} engine simulates exponential prompt and "
                         f"output lengths only (use engine 'general'), got {service!r}")
    if engine in SHAPED_BY_B and spec.max_batch is None:
        raise ValueError(f"invalid SimSpec field 'max_batch': the {engine!r} engine is shaped by the batch size B; "
                         "build its spec with jaxq.sim.batch.engine_spec or pass max_batch=B")
    if engine == "population" and not policy.exchangeable:
        raise ValueError(f"invalid field 'policy': the population engine counts GPUs by configuration, which is exact "
                         f"only for a policy that treats GPUs of one configuration alike; policy {policy.name!r} has "
                         f"parts declared not exchangeable ({', '.join(policy.not_exchangeable())}): use engine "
                         "'exact'")
    if engine == "stepped":
        dt = float(DEFAULT_DT if dt is None else dt)
    return dt, law


def build(engine: str, spec: SimSpec, policy: Policy, params: SimParams, *, dt: float | None = None,
          law=None) -> AbstractEngine:
    """The engine object for one replica (inside a traced function: ``params`` may be traced). ``dt`` and
    ``law`` as :func:`check` returns them."""
    if engine == "exact":
        return EventEngine(spec, policy, PerGpu(spec))
    if engine == "population":
        return EventEngine(spec, policy, PerConfiguration(spec, policy.partition.kinds))
    if engine == "general":
        law = law.arrays() if isinstance(law, ServiceLaw) else law
        return EventEngine(spec, policy, PerJob(spec, params, law))
    return SteppedEngine(spec, policy, dt)


def runner(engine: str, spec: SimSpec, policy: Policy, *, dt: float | None = None, service=None):
    """The one-replica simulator ``fn(key, params, record_times=None, law=None) -> (final_state,
    trajectory)`` of an engine, checked now (:func:`check`). ``service`` is the general engine's law
    (a ServiceLaw or law name, compiled in; or pass ``law`` to ``fn`` as :class:`LawArrays`, data, to run
    every law with one program). Batch it with ``vmap``."""
    dt, default_law = check(engine, spec, policy, dt, service)

    def fn(key, params, record_times=None, law=None):
        return build(engine, spec, policy, params, dt=dt, law=default_law if law is None else law).run(
            key, params, record_times)

    return fn
