"""Objectives on the fluid fixed point (docs/tuning.md §3): the bundled revenue rate minus weighted
penalties, and its jitted value-and-gradient in the tunable parameters.

Every objective is ``revenue(y*) - weights . penalties(y*)`` with y* = y*(theta) the fluid fixed
point under the policy theta and four penalties (MODEL.md §6 and one of ours):

    prefill_fairness  max_{i,j} (x_i - x_j)                                   (eq. 44)
    decode_fairness   max_{i,j} (y_s,i - y_s,j), y_s by GPU mode               (eq. 46)
    tpot              [tau (B-1) X + (B/gamma)(1-X)] / [(B-1) X + B (1-X)], X = sum x   (eq. 48)
    latency           sum_i lam_i W_i^2, W_i = (q_p,i + q_d,i + q_d_mix,i) / lam_i  (not an LP)

The weights are an array, so one compile (per policy kind and convention) serves every objective and
every weight. ``latency`` is the rate-weighted square of each class's mean waiting time by Little's
law (time in the prefill queue plus the decode buffers, over all arrivals, abandoning ones included):
convex in the queues and quadratic, hence outside what the steady-state LP can express.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._types import Scalar
from ..fluid.dynamics import (
    FluidPolicyParams,
    FluidState,
    prefill_busy_fraction,
    revenue_rate,
)
from ..model.params import ModelParams
from .params import TunableParams
from .steady import (
    DEFAULT_EVENT_ATOL,
    DEFAULT_NEWTON_STEPS,
    DEFAULT_T1,
    check_kind,
    steady_state,
)

OBJECTIVES = ("revenue", "prefill-fairness", "decode-fairness", "tpot", "latency")
PENALTIES = ("prefill_fairness", "decode_fairness", "tpot", "latency")
# The LP of MODEL.md §6 each objective is compared with (None: no LP expresses it).
LP_PENALTY = {"prefill-fairness": "prefill_fairness", "decode-fairness": "decode_fairness", "tpot": "tpot"}
# The policy kind that can represent the objective's LP optimum: decode fairness needs the randomized
# router (the greedy router's y split is fixed by the token mix, docs/fluid.md §4).
DEFAULT_KIND = {"revenue": "gate", "prefill-fairness": "gate", "decode-fairness": "sli", "tpot": "gate",
                "latency": "gate"}
DEFAULT_WEIGHT = {"revenue": 0.0, "prefill-fairness": 100.0, "decode-fairness": 1.0, "tpot": 1000.0,
                  "latency": 100.0}


@dataclasses.dataclass(frozen=True)
class Objective:
    """A named objective and its penalty weight (``weight`` is ignored-and-must-be-0 for revenue)."""

    name: str = "revenue"
    weight: float | None = None

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ValueError(f"invalid tune field 'objective': must be one of {', '.join(OBJECTIVES)}, "
                             f"got {self.name!r}")
        w = self.weight
        if w is None:
            object.__setattr__(self, "weight", DEFAULT_WEIGHT[self.name])
            return
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"invalid tune field 'weight': must be a finite number >= 0, got {w!r}")
        if self.name == "revenue" and w != 0:
            raise ValueError(f"invalid tune field 'weight': the revenue objective has no penalty, so its weight "
                             f"must be 0 or unset, got {w!r}")
        object.__setattr__(self, "weight", float(w))

    @property
    def penalty(self) -> str | None:
        return None if self.name == "revenue" else self.name.replace("-", "_")

    def weights(self) -> Float[Array, " 4"]:
        """The weight vector over :data:`PENALTIES`."""
        w = [0.0] * len(PENALTIES)
        if self.penalty is not None:
            w[PENALTIES.index(self.penalty)] = self.weight
        return jnp.asarray(w, dtype=jnp.float64)


def tpot_ratio(model: ModelParams, X: Scalar) -> Scalar:
    """Average TPOT of eq. 47 (seconds per token) at total prefill occupancy X."""
    B = model.B
    return (model.tau * (B - 1.0) * X + (B / model.gamma) * (1.0 - X)) / ((B - 1.0) * X + B * (1.0 - X))


def solo_mode_decodes(policy: FluidPolicyParams, y: FluidState, convention: str) -> Float[Array, " I"]:
    """MODEL.md's y_s (decodes on GPUs not running a prefill): y_solo under convention A; under B
    also the G_mix decodes on the 1 - x/m of G_mix GPUs that are not prefilling."""
    if convention == "A":
        return y.y_solo
    phi = prefill_busy_fraction(jnp.sum(y.x), policy.mixed_fraction)
    return y.y_solo + y.y_mix * (1.0 - phi)


def _spread(v):
    return jnp.max(v) - jnp.min(v)


def penalty_vector(model: ModelParams, policy: FluidPolicyParams, y: FluidState, convention: str = "B"
                   ) -> Float[Array, " 4"]:
    """The four penalties of :data:`PENALTIES` at state ``y`` (unweighted)."""
    waiting = y.q_p + y.q_d + y.q_d_mix
    lam_ok = model.lam > 0
    latency = jnp.sum(jnp.where(lam_ok, waiting**2 / jnp.where(lam_ok, model.lam, 1.0), 0.0))
    return jnp.stack([
        _spread(y.x),
        _spread(solo_mode_decodes(policy, y, convention)),
        tpot_ratio(model, jnp.sum(y.x)),
        latency,
    ])


class Evaluation(eqx.Module):
    """One objective evaluation at a fluid fixed point (all arrays; no derivative attached)."""

    value: Scalar
    revenue: Scalar
    penalties: Float[Array, " 4"]
    y: FluidState
    residual: Scalar
    residual_event: Scalar
    t_end: Scalar
    num_steps: Array
    converged: Array


def _objective(raw: TunableParams, weights, model, base, y_start, *, kind, convention, event_atol, t1, newton_steps):
    policy = raw.apply(base, model)
    ss = steady_state(model, policy, y_start, kind=kind, convention=convention, event_atol=event_atol, t1=t1,
                      newton_steps=newton_steps)
    revenue = revenue_rate(model, policy, ss.y, convention, "bundled")
    pens = penalty_vector(model, policy, ss.y, convention)
    value = revenue - jnp.sum(weights * pens)
    info = Evaluation(value=value, revenue=revenue, penalties=pens, y=ss.y, residual=ss.residual,
                      residual_event=ss.residual_event, t_end=ss.t_end, num_steps=ss.num_steps,
                      converged=ss.converged)
    return value, jax.lax.stop_gradient(info)


def _value_and_grad(raw: TunableParams, weights, model: ModelParams, base: FluidPolicyParams, y_start: FluidState, *,
                    kind: str = "gate", convention: str = "B", event_atol: float = DEFAULT_EVENT_ATOL,
                    t1: float = DEFAULT_T1, newton_steps: int = DEFAULT_NEWTON_STEPS):
    """The traceable body of :func:`value_and_grad`."""
    fn = functools.partial(_objective, kind=kind, convention=convention, event_atol=event_atol, t1=t1,
                           newton_steps=newton_steps)
    (_, info), grad = jax.value_and_grad(fn, has_aux=True)(raw, weights, model, base, y_start)
    return info, grad


_value_and_grad_jit = eqx.filter_jit(_value_and_grad)


def value_and_grad(raw: TunableParams, weights, model: ModelParams, base: FluidPolicyParams, y_start: FluidState, *,
                   kind: str = "gate", convention: str = "B", event_atol: float = DEFAULT_EVENT_ATOL,
                   t1: float = DEFAULT_T1, newton_steps: int = DEFAULT_NEWTON_STEPS):
    """(Evaluation, d value / d raw) of ``revenue - weights . penalties`` at the fluid fixed point
    reached from ``y_start`` under ``raw.apply(base, model)``. One compile per (kind, convention,
    shapes, solver settings): the parameters, the weights, the model numbers and the start are all
    traced. (Every setting is passed on explicitly: equinox keys its cache on the keywords given, so
    an omitted default would compile a second copy.)"""
    check_kind(kind, convention)
    return _value_and_grad_jit(raw, weights, model, base, y_start, kind=kind, convention=convention,
                               event_atol=float(event_atol), t1=float(t1), newton_steps=int(newton_steps))
