"""jaxq: LLM inference on GPU clusters as a many-server queue, in JAX.

Importing jaxq enables JAX's float64 mode: the LPs, the fluid model and simulated time need it
(float32 resolves only ~1 ms at t = 1e4 s). Simulator state may still choose float32 explicitly.
"""

from importlib.metadata import PackageNotFoundError, version

import jax

jax.config.update("jax_enable_x64", True)

from .model import (  # noqa: E402
    Cluster,
    IterationTime,
    JobClasses,
    ModelParams,
    Pricing,
    Scenario,
    Spec,
    list_scenarios,
    load_scenario,
)

try:
    __version__ = version("jaxq")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = [
    "Cluster", "IterationTime", "JobClasses", "ModelParams", "Pricing", "Scenario", "Spec",
    "list_scenarios", "load_scenario", "__version__",
]
