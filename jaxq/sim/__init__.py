"""Stochastic simulation of the prefill/decode cluster: four engines behind one core
(:mod:`jaxq.sim.core`), named in :mod:`jaxq.sim.engines`, batched and sharded by :mod:`jaxq.sim.batch`."""

from .batch import default_room, engine_spec, run_replicas
from .core import AbstractCluster, AbstractEngine, EventEngine, EventState
from .engines import ENGINES, SHAPED_BY_B, build, check, runner
from .general import LawArrays, ServiceLaw
from .state import COUNTER_NAMES, EVENT_ROWS, INTEGRAL_NAMES, STATUS_NAMES, SimParams, SimSpec
from .stepped import DEFAULT_DT, SteppedEngine, SteppedState

__all__ = ["COUNTER_NAMES", "DEFAULT_DT", "ENGINES", "EVENT_ROWS", "INTEGRAL_NAMES", "SHAPED_BY_B", "STATUS_NAMES",
           "AbstractCluster", "AbstractEngine", "EventEngine", "EventState", "LawArrays", "ServiceLaw", "SimParams",
           "SimSpec", "SteppedEngine", "SteppedState", "build", "check", "default_room", "engine_spec", "run_replicas",
           "runner"]
