"""jaxq: LLM inference on GPU clusters as a many-server queue, in JAX.

    import jaxq
    res = jaxq.run("canonical", "gg-sp", n=20, replicas=32, horizon=1000.0)
    print(res.summary["revenue_bundled"])

The names below are the public surface; each lives in a subpackage (``jaxq.model``, ``jaxq.lp``,
``jaxq.fluid``, ``jaxq.policies``, ``jaxq.sim``, ``jaxq.metrics``, ``jaxq.api``, ``jaxq.sweep``) and is
imported on first use, so ``import jaxq`` stays light.

Importing jaxq enables JAX's float64 mode: the LPs, the fluid model and simulated time need it
(float32 resolves only ~1 ms at t = 1e4 s). Simulator state may still choose float32 explicitly.
"""

import importlib
import os
import sys
from importlib.metadata import PackageNotFoundError, version

# float64 on, without importing JAX here (that alone takes ~1 s, which every `jaxq --help` would pay):
# JAX reads JAX_ENABLE_X64 when it is first imported; if it already was, its config is updated instead
if "jax" in sys.modules:
    sys.modules["jax"].config.update("jax_enable_x64", True)
else:
    os.environ["JAX_ENABLE_X64"] = "1"

try:
    __version__ = version("jaxq")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_EXPORTS = {
    # scenarios and the model
    "Scenario": "jaxq.model", "JobClasses": "jaxq.model", "Cluster": "jaxq.model", "IterationTime": "jaxq.model",
    "Pricing": "jaxq.model", "ModelParams": "jaxq.model", "Spec": "jaxq.model", "load_scenario": "jaxq.model",
    "list_scenarios": "jaxq.model", "ArrivalSchedule": "jaxq.model",
    # steady-state LPs and static planning
    "solve_lp": "jaxq.lp", "solve_bundled": "jaxq.lp", "solve_separate": "jaxq.lp", "solve_sli": "jaxq.lp",
    "static_plan": "jaxq.lp",
    # the fluid model
    "integrate_scenario": "jaxq.fluid",
    # policies
    "Policy": "jaxq.policies", "POLICIES": "jaxq.policies", "get_policy": "jaxq.policies",
    "load_policy": "jaxq.policies", "per_job": "jaxq.policies",
    # engines, batching and the run API
    "ENGINES": "jaxq.sim", "SimSpec": "jaxq.sim", "SimParams": "jaxq.sim", "ServiceLaw": "jaxq.sim",
    "engine_spec": "jaxq.sim", "run_replicas": "jaxq.sim", "runner": "jaxq.sim",
    "run": "jaxq.api", "make_params": "jaxq.api", "SimulationResult": "jaxq.api",
    # metrics
    "estimate": "jaxq.metrics", "replica_metrics": "jaxq.metrics", "summarize": "jaxq.metrics",
    # sweeps
    "load_grid": "jaxq.sweep", "run_sweep": "jaxq.sweep",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    raise AttributeError(f"module 'jaxq' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
