"""The run API: one call simulates a scenario under a policy on any engine and summarises the
replicas with confidence intervals (``jaxq.run``); ``jaxq simulate`` is its command line."""

from .simulate import SimulationResult, make_params, run

__all__ = ["SimulationResult", "make_params", "run"]
