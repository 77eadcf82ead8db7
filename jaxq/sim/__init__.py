"""Stochastic simulation of the prefill/decode cluster."""

from .engine import init_state, make_view, run_single, simulate
from .state import COUNTER_NAMES, INTEGRAL_NAMES, PolicyTargets, SimParams, SimSpec, SimState, View

__all__ = ["COUNTER_NAMES", "INTEGRAL_NAMES", "PolicyTargets", "SimParams", "SimSpec", "SimState", "View",
           "init_state", "make_view", "run_single", "simulate"]
