"""Fluid vector fields of the closed-loop policies under static planning (MODEL.md §3 and §5).

Every quantity is per GPU (the n -> infinity, 1/n-scaled limit). The state, per class i:

    q_p      prefill queue
    x        in prefill (on the mixed group G_mix)
    y_mix    decodes on G_mix GPUs             (capacity K_m = (B-1) m)
    y_solo   decodes on G_solo GPUs            (capacity K_s = B (1-m))
    q_d      decode buffer: the one shared buffer (greedy router) or the solo-bound buffer (SLI router)
    q_d_mix  the mixed-bound buffer of the SLI router (identically zero for the greedy router)

with m the mixed fraction (M/n -> sum_i x_i*). MODEL.md's y_m / y_s are by GPU *mode*; here y_mix /
y_solo are by GPU *group*. Under convention A they coincide; under convention B (default) the
mode-split is y_m = y_mix x/m, y_s = y_solo + y_mix (1 - x/m).

The vector fields have diffrax's signature ``f(t, y, args)`` with ``y`` a :class:`FluidState` and
``args = (ModelParams, FluidPolicyParams)``. Policy kinds (static, one compile each):

    "gate"      gate-and-route (GG-SP, MODEL.md §5.1): occupancy-deviation gate + greedy router
    "priority"  prioritize-and-route (§5.2): static priority gate (largest D/P first) + greedy router
    "sli"       SLI-aware gate-and-route (§5.3): the GG-SP gate + the randomized two-buffer router

The capacity constraints make the fields piecewise. Boundaries are treated as sliding modes: on a
boundary (pool full, prefill pool saturated, buffer empty, tied gate keys) the field uses the rate
that keeps the state on it, plus a restoring term kappa * (distance to the boundary) that is zero on
exact trajectories and only removes integration error. A state is "on" a boundary when it is within
``eps`` (relative to the capacity) of it. docs/fluid.md derives every rule from the policy's drift.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool

from .._types import ClassVector, Scalar
from ..model.params import ModelParams

KINDS = ("gate", "priority", "sli")
CONVENTIONS = ("A", "B")

# Stand-in for an unbounded admission/acceptance cap (a class with waiting mass takes any flow).
_BIG = 1e30


class FluidState(eqx.Module):
    """Fluid state per GPU; every field has shape (I,) (or (T, I) along a saved trajectory)."""

    q_p: ClassVector
    x: ClassVector
    y_mix: ClassVector
    y_solo: ClassVector
    q_d: ClassVector
    q_d_mix: ClassVector


class FluidPolicyParams(eqx.Module):
    """Static-planning data of a policy, as arrays (vmappable; new numbers never recompile).

    mixed_fraction  m: fraction of GPUs in G_mix (sum x* in the fluid limit, or M/n)
    x_target        x_i*: the gate's occupancy targets (GG-SP key (x_i - x_i*)/x_i*)
    p_solo          p_s,i: the SLI router's probability of sending class i to G_solo
    priority_key    the priority gate admits the lowest key first (-D_i/P_i for prioritize-and-route)
    admissible      classes the gate may admit (x_i* > 0 for GG-SP; all for the priority gate)
    eps             relative tolerance for "on a boundary" (pool full, prefill saturated, queue empty)
    eps_tie         width of the GG-SP tie band in key units (two keys closer than this are tied)
    kappa           restoring rate (1/s) toward the boundary of a sliding mode
    buffer_rate     cap (1/s) on a decode buffer's relative release rate: FCFS with the buffer's class
                    mix holds exactly for waiting times above 1/buffer_rate (docs/fluid.md §4.4)
    """

    mixed_fraction: Scalar
    x_target: ClassVector
    p_solo: ClassVector
    priority_key: ClassVector
    admissible: Bool[Array, " I"]
    eps: Scalar
    eps_tie: Scalar
    kappa: Scalar
    buffer_rate: Scalar


# -- small allocation primitives -------------------------------------------------------------------

def _safe_div(num, den):
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def waterfill(b: ClassVector, s: ClassVector, cap: ClassVector, total: Scalar, mask) -> ClassVector:
    """u_i = clip(b_i + c s_i, 0, cap_i) on ``mask`` (0 elsewhere) with the level c chosen so that
    sum u = total; u = cap when the caps cannot absorb ``total``. Exact: sum_i clip(...) is piecewise
    linear and nondecreasing in c, so c is found on the segment between two breakpoints."""
    s = jnp.where(mask, jnp.maximum(s, 1e-300), 1.0)
    total = jnp.maximum(total, 0.0)
    lo = jnp.where(mask, -b / s, _BIG)  # u_i leaves 0
    hi = jnp.where(mask, (cap - b) / s, _BIG)  # u_i reaches cap_i
    pts = jnp.concatenate([lo, hi])

    def g(c):
        return jnp.sum(jnp.where(mask, jnp.clip(b + c * s, 0.0, cap), 0.0))

    gp = jax.vmap(g)(pts)
    c_k = jnp.max(jnp.where(gp <= total, pts, -_BIG))
    slope = jnp.sum(jnp.where(mask & (lo <= c_k) & (c_k < hi), s, 0.0))
    c = jnp.where(slope > 0, c_k + (total - g(c_k)) / jnp.where(slope > 0, slope, 1.0), c_k)
    return jnp.where(mask, jnp.clip(b + c * s, 0.0, cap), 0.0)


def priority_fill(cap: ClassVector, total: Scalar, key: ClassVector, mask) -> ClassVector:
    """Serve ``total`` in increasing ``key`` order (ties by class index), each class up to cap_i."""
    num = key.shape[0]
    idx = jnp.arange(num)
    before = (key[None, :] < key[:, None]) | ((key[None, :] == key[:, None]) & (idx[None, :] < idx[:, None]))
    before = before & mask[None, :]
    used = jnp.sum(jnp.where(before, jnp.broadcast_to(cap[None, :], (num, num)), 0.0), axis=1)
    return jnp.where(mask, jnp.clip(jnp.maximum(total, 0.0) - used, 0.0, cap), 0.0)


# -- capacities, rates, revenue ------------------------------------------------------------------

def capacities(model: ModelParams, policy: FluidPolicyParams):
    """(m, K_m, K_s): prefill slots, mixed decode slots (B-1) m, solo decode slots B (1-m)."""
    m = policy.mixed_fraction
    return m, (model.B - 1.0) * m, model.B * (1.0 - m)


def prefill_busy_fraction(x_total: Scalar, m: Scalar) -> Scalar:
    """x/m: the fraction of G_mix GPUs running a prefill (0 when there is no mixed group)."""
    return jnp.clip(_safe_div(x_total, m), 0.0, 1.0)


def mixed_decode_rate(model: ModelParams, policy: FluidPolicyParams, x: ClassVector, convention: str) -> ClassVector:
    """Per-decode completion rate on G_mix. Convention A: mu_m. Convention B (the paper's): mu_m on
    the x/m of G_mix GPUs that are prefilling and mu_s on the others (mean-field closure, exact when
    x = m)."""
    if convention == "A":
        return model.mu_m
    phi = prefill_busy_fraction(jnp.sum(x), policy.mixed_fraction)
    return model.mu_m * phi + model.mu_s * (1.0 - phi)


def decode_completions(model: ModelParams, policy: FluidPolicyParams, y: FluidState, convention: str):
    """Decode completion flows per class: (mixed group, solo group)."""
    return mixed_decode_rate(model, policy, y.x, convention) * y.y_mix, model.mu_s * y.y_solo


def revenue_rate(model: ModelParams, policy: FluidPolicyParams, y: FluidState, convention: str = "B",
                 scheme: str = "bundled") -> Scalar:
    """Instantaneous revenue per GPU per second (MODEL.md §3 eqs. 38/39) at one state.
    bundled: sum_i w_i (decode completions); separate: sum_i c_p P_i mu_p,i x_i + c_d D_i (decode
    completions)."""
    dm, ds = decode_completions(model, policy, y, convention)
    done = dm + ds
    if scheme == "bundled":
        return jnp.sum(model.w * done)
    if scheme == "separate":
        return jnp.sum(model.c_p * model.P * model.mu_p * y.x + model.c_d * model.D * done)
    raise ValueError(f"invalid revenue field 'scheme': must be 'bundled' or 'separate', got {scheme!r}")


# -- the prefill gate ------------------------------------------------------------------------------

def _admission_caps(model, policy, q_p, eps_q):
    """What a class can absorb per unit time: unbounded with waiting mass; lam_i (+ the restoring
    drain kappa*q of a residual below eps) when its queue is empty; 0 if not admissible."""
    empty = q_p <= eps_q
    cap = jnp.where(empty, model.lam + policy.kappa * q_p, _BIG)
    return jnp.where(policy.admissible, cap, 0.0)


def gate_admissions(model: ModelParams, policy: FluidPolicyParams, y: FluidState, kind: str) -> ClassVector:
    """Admission flow u_i into prefill (the fluid limit of the gate's admission rate)."""
    m = policy.mixed_fraction
    eps_x = policy.eps * jnp.maximum(m, 1e-12)
    eps_q = policy.eps
    x_total = jnp.sum(y.x)
    cap = _admission_caps(model, policy, y.q_p, eps_q)
    saturated = x_total >= m - eps_x
    # Saturated: every freed slot is refilled at once; plus the restoring flow kappa*(m - x).
    flow = jnp.maximum(jnp.sum(model.mu_p * y.x) + policy.kappa * (m - x_total), 0.0)
    adm = policy.admissible
    if kind == "priority":
        u_sat = priority_fill(cap, flow, policy.priority_key, adm)
    else:
        u_sat = _gg_sp_split(model, policy, y, cap, flow)
    return jnp.where(saturated, u_sat, cap)


def _gg_sp_split(model, policy, y, cap, flow):
    """Water-fill the admission flow in order of the GG-SP key xi_i = (x_i - x_i*)/x_i*: classes
    strictly below the water line L absorb their cap (they are empty), classes at L share the rest by
    the sliding-mode split that keeps their keys equal, u_i = mu_p,i x_i + c x_i*, classes above get
    nothing. L is the lowest key whose cumulative demand reaches the flow."""
    adm = policy.admissible
    xt = policy.x_target
    key = jnp.where(adm, (y.x - xt) / jnp.where(adm, xt, 1.0), _BIG)
    eps_k = policy.eps_tie
    at_or_below = key[None, :] <= key[:, None] + eps_k  # [level i, class j]
    cum = jnp.sum(jnp.where(at_or_below & adm[None, :], jnp.broadcast_to(cap[None, :], at_or_below.shape), 0.0),
                  axis=1)
    candidate = adm & (cum >= flow)
    any_level = jnp.any(candidate)
    level = jnp.min(jnp.where(candidate, key, _BIG))
    below = adm & (key < level - eps_k)
    tied = adm & (jnp.abs(key - level) <= eps_k) & any_level
    rest = flow - jnp.sum(jnp.where(below, cap, 0.0))
    # Restoring term: pull tied keys to their x*-weighted mean (sums to zero over the tied set).
    xt_tied = jnp.sum(jnp.where(tied, xt, 0.0))
    mean_key = _safe_div(jnp.sum(jnp.where(tied, y.x - xt, 0.0)), xt_tied)
    b = model.mu_p * y.x + policy.kappa * (xt * mean_key - (y.x - xt))
    u_tied = waterfill(b, xt, cap, rest, tied)
    u = jnp.where(below, cap, jnp.where(tied, u_tied, 0.0))
    return jnp.where(any_level, u, cap)


# -- decode routers --------------------------------------------------------------------------------

def _accept(done, occupancy, capacity, eps, kappa):
    """What a pool accepts per unit time. Not full: anything (it has free slots). Full (within eps
    of its capacity): its completion flow, the sliding rate that keeps it full, plus the restoring
    flow kappa * (capacity - occupancy)."""
    full = occupancy >= capacity - eps * jnp.maximum(capacity, 1e-12)
    cap = jnp.maximum(jnp.sum(done) + kappa * (capacity - occupancy), 0.0)
    return jnp.where(full, cap, _BIG)


def _offer(flow, accept):
    """The part of a per-class ``flow`` that a pool accepting ``accept`` per unit time takes (the
    flow's own class mix)."""
    total = jnp.sum(flow)
    return flow * jnp.where(total > accept, _safe_div(accept, total), 1.0)


def _release(q, accept, buffer_rate):
    """Flow out of an FCFS buffer into pools that accept ``accept``: min(accept, buffer_rate * Q),
    with the buffer's class mix q/Q (the fluid form of FCFS across classes). The cap buffer_rate * Q
    only binds for a buffer whose waiting time Q/accept is below 1/buffer_rate; then the rest of the
    accepted flow comes straight from new decodes (a short buffer is treated as nearly empty)."""
    Q = jnp.sum(q)
    total = jnp.minimum(accept, buffer_rate * Q)
    return q * _safe_div(total, Q), total


def route_greedy(a, q, y_solo, y_mix, K_s, K_m, done_s, done_m, eps, kappa, buffer_rate):
    """Greedy decode-first router: a new decode goes to a free solo slot, else to a free mixed slot,
    else to the shared FCFS buffer; a freed slot takes the buffer's head.

    Returns (inflow_solo, inflow_mix, dq) per class; dq excludes abandonment."""
    acc_s = _accept(done_s, jnp.sum(y_solo), K_s, eps, kappa)
    acc_m = _accept(done_m, jnp.sum(y_mix), K_m, eps, kappa)
    out, out_total = _release(q, acc_s + acc_m, buffer_rate)
    # the buffer's release fills the solo group first, then the mixed group
    to_s = jnp.minimum(out_total, acc_s)
    frac_s = _safe_div(to_s, out_total)
    buf_s, buf_m = out * frac_s, out * (1.0 - frac_s)
    # new decodes take what is left, solo first; the rest queues
    new_s = _offer(a, acc_s - to_s)
    new_m = _offer(a - new_s, acc_m - (out_total - to_s))
    return buf_s + new_s, buf_m + new_m, a - new_s - new_m - out


def route_pool(a, q, y, K, done, eps, kappa, buffer_rate):
    """One pool with its own FCFS buffer (each half of the SLI router). Returns (inflow, dq)."""
    acc = _accept(done, jnp.sum(y), K, eps, kappa)
    out, out_total = _release(q, acc, buffer_rate)
    new = _offer(a, acc - out_total)
    return out + new, a - new - out


# -- the vector field -----------------------------------------------------------------------------

class FluidVectorField(eqx.Module):
    """diffrax vector field ``f(t, y, args)`` of one policy; ``args = (ModelParams, FluidPolicyParams)``."""

    kind: str = eqx.field(static=True)
    convention: str = eqx.field(static=True, default="B")

    def __check_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"invalid fluid field 'kind': must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.convention not in CONVENTIONS:
            raise ValueError(f"invalid fluid field 'convention': must be 'A' or 'B', got {self.convention!r}")

    def __call__(self, t, y: FluidState, args) -> FluidState:
        del t
        model, policy = args
        _, K_m, K_s = capacities(model, policy)
        u = gate_admissions(model, policy, y, self.kind)
        a = model.mu_p * y.x  # prefill completions = new decodes
        done_m, done_s = decode_completions(model, policy, y, self.convention)
        eps, kappa, rate = policy.eps, policy.kappa, policy.buffer_rate
        if self.kind == "sli":
            a_s = policy.p_solo * a
            in_s, dq_s = route_pool(a_s, y.q_d, y.y_solo, K_s, done_s, eps, kappa, rate)
            in_m, dq_m = route_pool(a - a_s, y.q_d_mix, y.y_mix, K_m, done_m, eps, kappa, rate)
            dq_d_mix = dq_m - model.theta * y.q_d_mix
        else:
            in_s, in_m, dq_s = route_greedy(a, y.q_d, y.y_solo, y.y_mix, K_s, K_m, done_s, done_m, eps, kappa,
                                            rate)
            dq_d_mix = -kappa * y.q_d_mix  # unused by the greedy router; stays at zero
        drift = FluidState(
            q_p=model.lam - u - model.theta * y.q_p,
            x=u - a,
            y_mix=in_m - done_m,
            y_solo=in_s - done_s,
            q_d=dq_s - model.theta * y.q_d,
            q_d_mix=dq_d_mix,
        )
        # Restoring term for the boundary "mass >= 0": zero on exact trajectories, it only removes
        # integration error that crossed below zero.
        return jax.tree_util.tree_map(lambda d, v: d + kappa * jnp.maximum(-v, 0.0), drift, y)


gate_and_route = FluidVectorField("gate")
prioritize_and_route = FluidVectorField("priority")
sli_router = FluidVectorField("sli")


# -- the t = 0 jumps -------------------------------------------------------------------------------

def _move_to_pool(q, y, K):
    """Instant admission of buffer mass into a pool's free slots, FCFS (class composition q/Q)."""
    Q = jnp.sum(q)
    moved = jnp.minimum(jnp.maximum(K - jnp.sum(y), 0.0), Q)
    share = q * _safe_div(moved, Q)
    return q - share, y + share


def _trim_pool(y, K):
    """Mass above the capacity goes back to the buffer (proportionally): an infeasible start."""
    Y = jnp.sum(y)
    keep = jnp.where(Y > K, _safe_div(K, Y), 1.0)
    return y * keep, y * (1.0 - keep)


def project_state(y: FluidState, model: ModelParams, policy: FluidPolicyParams, kind: str) -> FluidState:
    """The jumps a fluid trajectory makes at t = 0 (instant admissions into idle capacity), so the
    integrated state starts on the feasible, boundary-consistent set:

    * negatives are clipped to 0; mass above a capacity returns to its queue/buffer (infeasible start);
    * idle prefill slots m - x admit waiting mass at once, in gate order: GG-SP raises the lowest
      keys xi_i = (x_i - x_i*)/x_i* to a common level (water-filling); the priority gate serves in
      key order;
    * free decode slots admit buffer mass at once (solo first for the greedy router; each pool from
      its own buffer for the SLI router).
    """
    z = jax.tree_util.tree_map(lambda v: jnp.maximum(v, 0.0), y)
    m, K_m, K_s = capacities(model, policy)
    # prefill: trim, then admit
    x_total = jnp.sum(z.x)
    keep = jnp.where(x_total > m, _safe_div(m, x_total), 1.0)
    x, q_p = z.x * keep, z.q_p + z.x * (1.0 - keep)
    room = jnp.maximum(m - jnp.sum(x), 0.0)
    adm = policy.admissible
    if kind == "priority":
        add = priority_fill(q_p, room, policy.priority_key, adm)
    else:
        xt = policy.x_target
        add = waterfill(xt - x, xt, q_p, room, adm & (xt > 0))
    x, q_p = x + add, q_p - add
    # decode: trim, then admit
    y_solo, over_s = _trim_pool(z.y_solo, K_s)
    y_mix, over_m = _trim_pool(z.y_mix, K_m)
    if kind == "sli":
        q_d, y_solo = _move_to_pool(z.q_d + over_s, y_solo, K_s)
        q_d_mix, y_mix = _move_to_pool(z.q_d_mix + over_m, y_mix, K_m)
    else:
        q_d, y_solo = _move_to_pool(z.q_d + z.q_d_mix + over_s + over_m, y_solo, K_s)
        q_d, y_mix = _move_to_pool(q_d, y_mix, K_m)
        q_d_mix = jnp.zeros_like(q_d)
    return FluidState(q_p=q_p, x=x, y_mix=y_mix, y_solo=y_solo, q_d=q_d, q_d_mix=q_d_mix)
