"""The fluid fixed point as a differentiable function of the policy and model parameters
(docs/tuning.md §3-§4).

``steady_state`` finds the fixed point y*(theta) of the closed-loop fluid vector field f(y; theta)
(``jaxq.fluid.FluidVectorField``) in three stages:

1. integrate from a start state with diffrax (Tsit5, PID controller) until the steady-state event
   ``|f(y)|_rms <= event_atol`` fires (or ``t1``); no derivative is taken through this solve;
2. polish with ``newton_steps`` Newton iterations on f(y) = 0 (dense Jacobian, ``jax.jacfwd``). Each
   iterate is kept only if it lowers max|f| and stays finite and >= -1e-12, so a step that would
   leave the fixed point's regime (a boundary of the piecewise field) is refused. On the canonical
   instance one step takes max|f| from ~3e-7 to ~1e-16;
3. differentiate by the implicit function theorem: with y* fixed and J = df/dy at y*,
   y_out = y* + (d - stop_gradient(d)), d = -J^{-1} f(y*; theta). Its value is y*, its derivative
   -J^{-1} df/dtheta = dy*/dtheta. diffrax's ``ImplicitAdjoint`` computes the same quantity
   (checked in docs/tuning.md §4); doing it here lets the Newton polish come first.

The derivative of the fixed point exists wherever y* lies strictly inside one regime of the
piecewise field (a sliding mode on each boundary it sits on). The sliding modes' restoring terms
(kappa) make J invertible in the boundary-normal directions without changing y* or dy*/dtheta; the
tolerances eps, eps_tie only decide which regime a state belongs to. Where the regime itself changes
with theta (e.g. decode switching from under- to over-loaded at the LP's mixed fraction), the
objective has a kink and the derivative is one-sided.

``horizon_state`` is the literal alternative: y(T) from a fixed start, differentiated through
``diffrax.diffeqsolve`` with its default ``RecursiveCheckpointAdjoint`` (reverse mode through the
solver's steps); used only to cross-check the implicit derivative.
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, Int

from .._types import Scalar
from ..fluid.dynamics import (
    CONVENTIONS,
    FluidPolicyParams,
    FluidState,
    FluidVectorField,
    project_state,
)
from ..model.params import ModelParams

TUNABLE_KINDS = ("gate", "sli")
DEFAULT_EVENT_ATOL = 1e-7
DEFAULT_T1 = 4000.0
DEFAULT_NEWTON_STEPS = 2
# max|f| at which a fixed point counts as converged (per-GPU mass per second). After the Newton polish
# it is ~1e-15 off the regime boundaries and ~1e-9 exactly on one (the SLI router at the LP's own plan,
# both decode groups exactly full), where the polish cannot go further; ~1e-8 moves the value by ~1e-8.
RESIDUAL_TOL = 1e-8
_FLUSH = 1e-100


class SteadyState(eqx.Module):
    """A fluid fixed point. ``y`` carries the implicit derivative dy*/dtheta.

    residual        max_i |f_i(y*)| after the Newton polish
    residual_event  max_i |f_i| where the integration stopped (before the polish)
    t_end           time at which the integration stopped (the event time, or t1)
    num_steps       accepted solver steps
    result          diffrax's RESULTS code of the integration
    jacobian_ok     whether the implicit derivative was finite (df/dy invertible at y*)
    """

    y: FluidState
    residual: Scalar
    residual_event: Scalar
    t_end: Scalar
    num_steps: Int[Array, ""]
    result: diffrax.RESULTS
    jacobian_ok: Bool[Array, ""]

    @property
    def converged(self):
        """Integration succeeded, max|f| <= RESIDUAL_TOL after the polish, and df/dy was invertible
        (otherwise the value is still right but the derivative is set to 0)."""
        ok = (self.result == diffrax.RESULTS.successful) | (self.result == diffrax.RESULTS.event_occurred)
        return ok & (self.residual <= RESIDUAL_TOL) & self.jacobian_ok


def check_kind(kind: str, convention: str) -> None:
    if kind not in TUNABLE_KINDS:
        raise ValueError(f"invalid tune field 'kind': must be one of {', '.join(TUNABLE_KINDS)} (policies with "
                         f"a gate target and a mixed fraction), got {kind!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"invalid tune field 'convention': must be 'A' or 'B', got {convention!r}")


def _max_abs(v):
    return jnp.max(jnp.abs(v))


def steady_state(model: ModelParams, policy: FluidPolicyParams, y0: FluidState, *, kind: str,
                 convention: str = "B", event_atol: float = DEFAULT_EVENT_ATOL, t1: float = DEFAULT_T1,
                 rtol: float = 1e-8, atol: float = 1e-10, max_steps: int = 100_000,
                 newton_steps: int = DEFAULT_NEWTON_STEPS) -> SteadyState:
    """The fixed point reached from ``y0`` (projected at t = 0 as in ``jaxq.fluid.solve_fluid``), with
    implicit derivatives with respect to ``model`` and ``policy`` (none with respect to ``y0``).
    Traceable; call it inside ``jax.jit``/``eqx.filter_jit`` (see :func:`jaxq.tune.make_objective`)."""
    check_kind(kind, convention)
    field = FluidVectorField(kind, convention)
    model_c, policy_c, y0_c = jax.lax.stop_gradient((model, policy, y0))
    start = project_state(y0_c, model_c, policy_c, kind)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field), diffrax.Tsit5(), t0=0.0, t1=t1, dt0=None, y0=start, args=(model_c, policy_c),
        saveat=diffrax.SaveAt(t1=True), stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        event=diffrax.Event(diffrax.steady_state_event(rtol=0.0, atol=event_atol)),
        max_steps=max_steps, throw=False,
    )
    y_end = jax.tree_util.tree_map(lambda v: v[-1], sol.ys)
    flat, unravel = ravel_pytree(y_end)
    # Empty buffers decay exponentially and reach 1e-300 within a few hundred seconds; the fluid's FCFS
    # release q * min(accept, rate Q)/Q then has a derivative with Q^2 underflowing to 0 (inf/NaN in
    # df/dy). Such masses are zero for every purpose: flush them.
    flat = jnp.where(jnp.abs(flat) < _FLUSH, 0.0, flat)

    def F(v, mdl, pol):
        return ravel_pytree(field(0.0, unravel(v), (mdl, pol)))[0]

    def G(v):
        return F(v, model_c, policy_c)

    r_event = _max_abs(G(flat))
    r = r_event
    for _ in range(newton_steps):
        cand = flat - jnp.linalg.solve(jax.jacfwd(G)(flat), G(flat))
        cand = jnp.where(jnp.abs(cand) < _FLUSH, 0.0, cand)
        r_cand = _max_abs(G(cand))
        ok = jnp.all(jnp.isfinite(cand)) & (r_cand < r) & (jnp.min(cand) >= -1e-12)
        flat = jnp.where(ok, cand, flat)
        r = jnp.where(ok, r_cand, r)
    J = jax.jacfwd(G)(flat)
    d = -jnp.linalg.solve(J, F(flat, model, policy))  # carries d(fixed point)/d(model, policy)
    d_ok = jnp.all(jnp.isfinite(jax.lax.stop_gradient(d)))
    d = jnp.where(d_ok, d, 0.0)  # a singular Jacobian must not turn the value into NaN; flagged instead
    y = unravel(flat + d - jax.lax.stop_gradient(d))
    return SteadyState(y=y, residual=r, residual_event=r_event, t_end=sol.ts[-1],
                       num_steps=sol.stats["num_steps"], result=sol.result, jacobian_ok=d_ok)


def horizon_state(model: ModelParams, policy: FluidPolicyParams, y0: FluidState, horizon: Float[Array, ""] | float,
                  *, kind: str, convention: str = "B", rtol: float = 1e-8, atol: float = 1e-10,
                  max_steps: int = 16_384) -> FluidState:
    """y(horizon) from ``y0``, differentiable through diffrax (``RecursiveCheckpointAdjoint``, reverse
    mode through every solver step). The start is projected with the (stop-gradient) policy so that
    the only dependence on the parameters is through the dynamics, as for :func:`steady_state`.
    Reverse mode stores up to ``max_steps`` solver states (the adjoint's default checkpointing), so
    keep it near the number of steps the horizon needs (~9 per second on the canonical instance)."""
    check_kind(kind, convention)
    field = FluidVectorField(kind, convention)
    start = project_state(*jax.lax.stop_gradient((y0, model, policy)), kind)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field), diffrax.Tsit5(), t0=0.0, t1=horizon, dt0=None, y0=start, args=(model, policy),
        saveat=diffrax.SaveAt(t1=True), stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps, throw=False, adjoint=diffrax.RecursiveCheckpointAdjoint(),
    )
    return jax.tree_util.tree_map(lambda v: v[-1], sol.ys)


__all__ = [
    "DEFAULT_EVENT_ATOL",
    "DEFAULT_NEWTON_STEPS",
    "DEFAULT_T1",
    "RESIDUAL_TOL",
    "TUNABLE_KINDS",
    "SteadyState",
    "check_kind",
    "horizon_state",
    "steady_state",
]
