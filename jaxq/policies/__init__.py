"""Policies as pure functions behind one protocol (:mod:`jaxq.policies.protocol`): a :class:`Policy`
is an admission (gate), a router and a partition; every engine runs every policy."""

from .choice import choice_from_uniform, fcfs_class, lexicographic_argmin, uniform_choice, weighted_search
from .loading import load_policy
from .protocol import (
    DECODE_FIRST,
    PREFILL_FIRST,
    AbstractAdmission,
    AbstractPartition,
    AbstractPerJobAdmission,
    AbstractPerJobRouter,
    AbstractRouter,
    Bulk,
    PerJobAdmission,
    PerJobRouter,
    Policy,
    SharedGpus,
    StaticPartition,
    per_job,
)
from .rules import (
    FG_SP,
    FI_WSP,
    GF_WSP,
    GG_SP,
    GG_SP_HB,
    GI_WSP,
    POLICIES,
    PRIORITY,
    SLI,
    AbstractUniformAdmission,
    AnyFreeRouter,
    CoupledRouter,
    FCFSGate,
    GreedyRouter,
    HoldBackGate,
    OccupancyGate,
    PriorityGate,
    SplitRouter,
    any_free_route,
    get_policy,
    greedy_route,
    occupancy_gate,
)
from .view import ANY, MIXED, SOLO, PolicyTargets, View

__all__ = [
    "ANY", "DECODE_FIRST", "FG_SP", "FI_WSP", "GF_WSP", "GG_SP", "GG_SP_HB", "GI_WSP", "MIXED", "POLICIES",
    "PREFILL_FIRST", "PRIORITY", "SLI", "SOLO", "AbstractAdmission", "AbstractPartition", "AbstractPerJobAdmission",
    "AbstractPerJobRouter", "AbstractRouter", "AbstractUniformAdmission", "AnyFreeRouter", "Bulk", "CoupledRouter",
    "FCFSGate", "GreedyRouter", "HoldBackGate", "OccupancyGate", "PerJobAdmission", "PerJobRouter", "Policy",
    "PolicyTargets", "PriorityGate", "SharedGpus", "SplitRouter", "StaticPartition", "View", "any_free_route",
    "choice_from_uniform", "fcfs_class", "get_policy", "greedy_route", "lexicographic_argmin", "load_policy",
    "occupancy_gate", "per_job", "uniform_choice", "weighted_search",
]
