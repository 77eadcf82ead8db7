"""Steady-state LPs (bundled, separate, SLI) and static planning, solved with scipy's HiGHS."""

from .planning import StaticPlan, static_plan
from .steady_state import (
    SLI,
    Bound,
    LPSolution,
    Penalty,
    build_lp,
    objective_coefficients,
    solve_bundled,
    solve_lp,
    solve_separate,
    solve_sli,
    tpot_ratio,
)

__all__ = [
    "SLI", "Bound", "LPSolution", "Penalty", "StaticPlan", "build_lp", "objective_coefficients",
    "solve_bundled", "solve_lp", "solve_separate", "solve_sli", "static_plan", "tpot_ratio",
]
