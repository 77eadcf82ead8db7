"""Integrate the fluid model with diffrax; build policy data from static planning; start states.

The whole solve (t = 0 projection, integration, revenue along the trajectory) is one
``eqx.filter_jit`` function: the policy kind, the mode convention, tolerances and max_steps are
static; model and policy numbers, the initial state and the save times are arrays, so a new
parameter set of the same shape reuses the compiled solve and a batch is a ``jax.vmap``.
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ..model.params import ModelParams
from ..model.scenario import Scenario
from .dynamics import (
    CONVENTIONS,
    KINDS,
    FluidPolicyParams,
    FluidState,
    FluidVectorField,
    capacities,
    project_state,
    revenue_rate,
)

DEFAULT_EPS = 1e-7
DEFAULT_KAPPA = 10.0
DEFAULT_EPS_TIE = 1e-5
DEFAULT_BUFFER_RATE = 20.0
# The LP each policy plans against (MODEL.md §5): the SLI router uses the bundled (or an SLI) LP.
LP_OF_KIND = {"gate": "bundled", "priority": "separate", "sli": "bundled"}
SCHEME_OF_KIND = {"gate": "bundled", "priority": "separate", "sli": "bundled"}


class FluidSolution(eqx.Module):
    """A saved fluid trajectory. ``ys`` fields have shape (T, I); revenue rates shape (T,).
    ``result`` is diffrax's RESULTS code (failures are data: check :attr:`ok`)."""

    ts: Float[Array, " T"]
    ys: FluidState
    revenue_bundled: Float[Array, " T"]
    revenue_separate: Float[Array, " T"]
    result: diffrax.RESULTS
    num_steps: Int[Array, ""]
    num_rejected_steps: Int[Array, ""]

    @property
    def ok(self):
        return self.result == diffrax.RESULTS.successful


# -- policy data from static planning ------------------------------------------------------------

def policy_params(kind: str, scenario: Scenario, solution=None, *, n: int | None = None,
                  eps: float = DEFAULT_EPS, eps_tie: float = DEFAULT_EPS_TIE,
                  kappa: float = DEFAULT_KAPPA, buffer_rate: float = DEFAULT_BUFFER_RATE) -> FluidPolicyParams:
    """Policy arrays for ``kind`` from an LP solution (default: the kind's LP of MODEL.md §5).

    ``n=None`` uses the fluid mixed fraction m = sum_i x_i*; an integer n uses M/n with
    M = ceil(n sum x*) (the finite-n plan). p_solo follows MODEL.md §5.3 (1 where the LP routes no
    class-i decode); the priority key is -D_i/P_i (largest D/P admitted first)."""
    from ..lp import solve_bundled, solve_separate, static_plan  # host-side LPs (scipy)

    _check_kind(kind)
    if solution is None:
        solution = {"bundled": solve_bundled, "separate": solve_separate}[LP_OF_KIND[kind]](scenario)
    plan = static_plan(solution, scenario, n)
    m = plan.fluid_mixed_fraction if n is None else plan.mixed_fraction
    xt = np.asarray(plan.x_target, dtype=np.float64)
    admissible = np.ones_like(xt, dtype=bool) if kind == "priority" else xt > 0
    f = lambda v: jnp.asarray(v, dtype=jnp.float64)  # noqa: E731
    return FluidPolicyParams(
        mixed_fraction=f(m), x_target=f(xt), p_solo=f(plan.p_solo), priority_key=f(-np.asarray(plan.priority)),
        admissible=jnp.asarray(admissible), eps=f(eps), eps_tie=f(eps_tie),
        kappa=f(kappa), buffer_rate=f(buffer_rate),
    )


def _check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"invalid fluid field 'kind': must be one of {', '.join(KINDS)}, got {kind!r}")


# -- start states --------------------------------------------------------------------------------

def empty_state(num_classes: int) -> FluidState:
    """The empty system."""
    z = jnp.zeros((num_classes,), dtype=jnp.float64)
    return FluidState(q_p=z, x=z, y_mix=z, y_solo=z, q_d=z, q_d_mix=z)


def overloaded_state(model: ModelParams, policy: FluidPolicyParams, *, queue_factor: float = 2.0,
                     buffer_factor: float = 1.0, patience_floor: float = 0.1) -> FluidState:
    """An overloaded start: prefill queues queue_factor * lam/theta, the prefill pool saturated with
    an equal split over admissible classes (far from x*), both decode pools full with an equal class
    split, and decode buffers buffer_factor * lam/theta (split p_s / 1-p_s between the SLI router's
    two buffers; the greedy router merges them). theta is floored at ``patience_floor`` in these
    sizes. Traceable: build it inside a vmap over parameters."""
    num = model.lam.shape[0]
    m, K_m, K_s = capacities(model, policy)
    per_patience = model.lam / jnp.maximum(model.theta, patience_floor)
    adm = policy.admissible.astype(jnp.float64)
    x = m * adm / jnp.maximum(jnp.sum(adm), 1.0)
    buf = buffer_factor * per_patience
    return FluidState(
        q_p=queue_factor * per_patience,
        x=x,
        y_mix=jnp.full((num,), 1.0 / num) * K_m,
        y_solo=jnp.full((num,), 1.0 / num) * K_s,
        q_d=buf * policy.p_solo,
        q_d_mix=buf * (1.0 - policy.p_solo),
    )


# -- the solve -----------------------------------------------------------------------------------

def _solve(model: ModelParams, policy: FluidPolicyParams, y0: FluidState, ts, *, kind: str,
           convention: str = "B", rtol: float = 1e-8, atol: float = 1e-10, max_steps: int = 100_000,
           project: bool = True) -> FluidSolution:
    field = FluidVectorField(kind, convention)
    if project:
        y0 = project_state(y0, model, policy, kind)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field), diffrax.Tsit5(), t0=ts[0], t1=ts[-1], dt0=None, y0=y0,
        args=(model, policy), saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps, throw=False,
    )
    ys = sol.ys
    rev = lambda scheme: jax.vmap(lambda y: revenue_rate(model, policy, y, convention, scheme))(ys)  # noqa: E731
    return FluidSolution(
        ts=sol.ts, ys=ys, revenue_bundled=rev("bundled"), revenue_separate=rev("separate"),
        result=sol.result, num_steps=sol.stats["num_steps"], num_rejected_steps=sol.stats["num_rejected_steps"],
    )


_solve_jit = eqx.filter_jit(_solve)


def solve_fluid(model: ModelParams, policy: FluidPolicyParams, y0: FluidState, ts, *, kind: str,
                convention: str = "B", rtol: float = 1e-8, atol: float = 1e-10, max_steps: int = 100_000,
                project: bool = True) -> FluidSolution:
    """Integrate the fluid model of policy ``kind`` from ``y0`` (projected onto the boundary-consistent
    set at t = 0 unless ``project=False``), saving at ``ts`` (float64, increasing; ts[0] is the start).

    Tsit5 with a PID step-size controller; ``throw=False`` so a failure (e.g. max_steps reached) is
    reported in ``result`` and batched solves never raise. Jitted: kind, convention, rtol, atol,
    max_steps and project are static; everything else is traced."""
    _check_kind(kind)
    if convention not in CONVENTIONS:
        raise ValueError(f"invalid fluid field 'convention': must be 'A' or 'B', got {convention!r}")
    ts = jnp.asarray(ts, dtype=jnp.float64)
    return _solve_jit(model, policy, y0, ts, kind=kind, convention=convention, rtol=rtol, atol=atol,
                      max_steps=max_steps, project=project)


# -- analysis helpers (host side) ----------------------------------------------------------------

def fixed_point_error(sol: FluidSolution, x_target, q_p_target) -> np.ndarray:
    """max_i max(|x_i(t) - x_i*|, |q_p,i(t) - q_p,i*|) at each saved time (NumPy, shape (T,))."""
    x = np.asarray(sol.ys.x)
    q = np.asarray(sol.ys.q_p)
    err = np.maximum(np.abs(x - np.asarray(x_target)[None, :]), np.abs(q - np.asarray(q_p_target)[None, :]))
    return err.max(axis=1)


def convergence_time(ts, err, tol: float = 1e-3) -> float:
    """First saved time after which ``err`` stays <= tol up to the end of the trajectory (inf if the
    last point is outside). Resolution: the save grid."""
    ts, err = np.asarray(ts), np.asarray(err)
    outside = np.nonzero(~(err <= tol))[0]
    if outside.size == 0:
        return float(ts[0])
    if outside[-1] == len(ts) - 1:
        return float("inf")
    return float(ts[outside[-1] + 1])


def lp_point(kind: str, scenario: Scenario, solution=None):
    """The LP solution a policy is planned against (and converges to in x, q_p)."""
    from ..lp import solve_bundled, solve_separate

    _check_kind(kind)
    if solution is not None:
        return solution
    return {"bundled": solve_bundled, "separate": solve_separate}[LP_OF_KIND[kind]](scenario)


def integrate_scenario(scenario: Scenario, kind: str, start: str = "empty", horizon: float = 600.0,
                       num_points: int = 1201, *, n: int | None = None, convention: str = "B", **solve_kw):
    """Convenience: LP, plan, start state, and the solve, for one scenario. Returns
    (solution, lp_solution, policy_params, model_params)."""
    lp = lp_point(kind, scenario)
    policy = policy_params(kind, scenario, lp, n=n)
    model = scenario.params()
    if start == "empty":
        y0 = empty_state(scenario.num_classes)
    elif start == "overloaded":
        y0 = overloaded_state(model, policy)
    else:
        raise ValueError(f"invalid fluid field 'start': must be 'empty' or 'overloaded', got {start!r}")
    if not (horizon > 0):
        raise ValueError(f"invalid fluid field 'horizon': must be > 0, got {horizon!r}")
    ts = jnp.linspace(0.0, float(horizon), int(num_points))
    return solve_fluid(model, policy, y0, ts, kind=kind, convention=convention, **solve_kw), lp, policy, model


__all__ = [
    "DEFAULT_BUFFER_RATE", "DEFAULT_EPS", "DEFAULT_EPS_TIE", "DEFAULT_KAPPA", "FluidSolution", "convergence_time",
    "empty_state", "fixed_point_error", "integrate_scenario", "lp_point", "overloaded_state", "policy_params", "solve_fluid",
]
