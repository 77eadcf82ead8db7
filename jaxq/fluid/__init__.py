"""Fluid model (MODEL.md §3) of the static-planning policies of MODEL.md §5, integrated with diffrax.

See docs/fluid.md for the derivation of each vector field as the n -> infinity limit of the policy's
drift, the boundary (sliding-mode) treatment and the documented convergence times.
"""

from .dynamics import (
    CONVENTIONS,
    KINDS,
    FluidPolicyParams,
    FluidState,
    FluidVectorField,
    capacities,
    decode_completions,
    gate_admissions,
    gate_and_route,
    mixed_decode_rate,
    prioritize_and_route,
    project_state,
    revenue_rate,
    sli_router,
)
from .solve import (
    DEFAULT_BUFFER_RATE,
    DEFAULT_EPS,
    DEFAULT_EPS_TIE,
    DEFAULT_KAPPA,
    FluidSolution,
    convergence_time,
    empty_state,
    fixed_point_error,
    integrate_scenario,
    lp_point,
    overloaded_state,
    policy_params,
    solve_fluid,
)

__all__ = [
    "CONVENTIONS", "DEFAULT_BUFFER_RATE", "DEFAULT_EPS", "DEFAULT_EPS_TIE", "DEFAULT_KAPPA", "KINDS",
    "FluidPolicyParams", "FluidSolution", "FluidState", "FluidVectorField", "capacities", "convergence_time", "decode_completions", "empty_state",
    "fixed_point_error", "gate_admissions", "gate_and_route", "integrate_scenario", "lp_point",
    "mixed_decode_rate", "overloaded_state", "policy_params", "prioritize_and_route", "project_state",
    "revenue_rate", "sli_router", "solve_fluid",
]
