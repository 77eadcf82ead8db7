"""Policies as pure functions behind one interface (see :mod:`jaxq.policies.base`)."""

from .base import AbstractPolicy, choice_from_uniform, fcfs_class, lexicographic_argmin, occupancy_gate, uniform_choice
from .rules import (
    FGSP,
    FIWSP,
    GFWSP,
    GIWSP,
    POLICIES,
    GateAndRoute,
    GateAndRouteHoldBack,
    PrioritizeAndRoute,
    SLIGateAndRoute,
    get_policy,
)

__all__ = [
    "AbstractPolicy", "FGSP", "FIWSP", "GFWSP", "GIWSP", "GateAndRoute", "GateAndRouteHoldBack", "POLICIES", "PrioritizeAndRoute",
    "SLIGateAndRoute", "choice_from_uniform", "fcfs_class", "get_policy", "lexicographic_argmin", "occupancy_gate", "uniform_choice",
]
