"""Test helpers shipped with jaxq: a slow, obviously-correct reference simulator of the cluster CTMC
(:mod:`jaxq.testing.reference`) and closed forms for many-server queues
(:mod:`jaxq.testing.closed_forms`). Plain Python and NumPy; nothing here uses JAX."""

from .closed_forms import QueueMetrics, erlang_a, erlang_c, stationary_distribution
from .reference import (
    POLICIES,
    PolicyTargets,
    ReferenceResult,
    ReplicatedReference,
    benchmark_reference,
    replicate_reference,
    simulate_reference,
)

__all__ = [
    "POLICIES", "PolicyTargets", "QueueMetrics", "ReferenceResult", "ReplicatedReference",
    "benchmark_reference", "erlang_a", "erlang_c", "replicate_reference", "simulate_reference",
    "stationary_distribution",
]
