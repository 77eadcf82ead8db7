"""The exact event-by-event simulator of the prefill/decode CTMC (MODEL.md §2.2).

One replica is written here; batching is a ``vmap`` from outside (:func:`simulate`), which turns the
per-replica ``while_loop`` into one loop whose carry is the whole replica vector (the time-major layout
of STYLE.md), with the randomness drawn per step from ``fold_in(key, step)``.

Exactness. Every transition rate is exponential, so each step draws the time to the next
state-dependent event from the total rate and picks the event by its share (Gillespie). Arrivals run
on their own stream (each class's next arrival time is drawn from ``fold_in(arrival_key, class,
index)``): the superposition is the same CTMC, and two policies on one key see the same arrivals
(common random numbers). Stopping at the horizon (or at a recording time) and redrawing afterwards is
exact by memorylessness. Simulated time is float64.

After each event the policy's decisions are applied at once, as often as capacity and queues allow:
a finished prefill's job is routed, buffer heads take freed decode slots, idle prefill slots admit.
One event frees at most one slot of each kind, so ``ROUNDS = 2`` rounds always suffice; a replica for
which an action is still possible afterwards is flagged ``DECISIONS_INCOMPLETE`` rather than trusted.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..policies.base import AbstractPolicy, uniform_choice
from .state import (
    ADMITTED,
    ANY,
    ARRIVED,
    ABANDON_DECODE,
    ABANDON_PREFILL,
    DECISIONS_INCOMPLETE,
    DECODE_DONE,
    DECODE_STARTED,
    INT_QD,
    INT_QP,
    INT_X,
    INT_Y_MIXGROUP,
    INT_YM,
    INT_YS,
    CAPACITY_VIOLATED,
    LOST,
    MAX_STEPS,
    NUM_COUNTERS,
    WAITED,
    MIXED,
    NONFINITE,
    OVERFLOW,
    PREFILL_DONE,
    SOLO,
    PolicyTargets,
    SimParams,
    SimSpec,
    SimState,
    View,
)

ROUNDS = 2
_I32 = jnp.int32


def make_view(spec: SimSpec, params: SimParams, state: SimState, policy: AbstractPolicy) -> View:
    n, num = spec.num_gpus, spec.num_classes
    B = params.model.B.astype(_I32)
    if policy.partitioned:
        group = jnp.where(jnp.arange(n) < params.targets.num_mixed, MIXED, SOLO).astype(_I32)
    else:
        group = jnp.full((n,), ANY, _I32)
    has_prefill = state.prefill_class >= 0
    ndec = jnp.sum(state.decodes, axis=1)
    cap = jnp.where(group == MIXED, B - 1, jnp.where(group == SOLO, B, B - has_prefill.astype(_I32)))
    idle = jnp.where(group == MIXED, ~has_prefill, (group == ANY) & ~has_prefill & (ndec < B))
    onehot = state.prefill_class[:, None] == jnp.arange(num)[None, :]
    return View(
        n=n, B=params.model.B, group=group, prefill_class=state.prefill_class, decodes=state.decodes,
        free_decode=cap - ndec, idle_prefill=idle, X=jnp.sum(onehot, axis=0, dtype=_I32),
        q_p=state.q_p, queue_head=state.queue[:, 0], q_d=state.q_d, buffer_head=state.buffers[:, :, 0],
    )


def _mixed_mode(spec: SimSpec, view: View):
    """Whether each GPU's decodes run at mu_m (else mu_s)."""
    has_prefill = view.prefill_class >= 0
    if spec.convention == "A":
        return (view.group == MIXED) | ((view.group == ANY) & has_prefill)
    return has_prefill


def event_rates(spec: SimSpec, params: SimParams, view: View):
    """Rates of the state-dependent events, flattened: prefill-queue abandonment (I), decode-buffer
    abandonment (NB*I), prefill completion per GPU (n), decode completion per GPU and class (n*I)."""
    m = params.model
    mu_p, mu_m, mu_s = m.mu_p, m.mu_m, m.mu_s
    has_prefill = view.prefill_class >= 0
    r_prefill = jnp.where(has_prefill, mu_p[jnp.maximum(view.prefill_class, 0)], 0.0)
    per_decode = jnp.where(_mixed_mode(spec, view)[:, None], mu_m[None, :], mu_s[None, :])
    return jnp.concatenate([
        m.theta * view.q_p,
        (m.theta[None, :] * view.q_d).ravel(),
        r_prefill,
        (view.decodes * per_decode).ravel(),
    ])


def _bump(counts, row, cls, amount):
    return counts.at[row, jnp.maximum(cls, 0)].add(jnp.where(cls >= 0, amount, 0).astype(_I32))


def _count(state: SimState, row, cls, post, do=True) -> SimState:
    do = jnp.asarray(do) & (cls >= 0)
    return eqx.tree_at(lambda s: (s.counts, s.totals), state,
                       (_bump(state.counts, row, cls, do & post), _bump(state.totals, row, cls, do)))


# Waiting rooms: per class, entry times sorted ascending in a compacted prefix of length count, +inf
# after it. Entries arrive in time order, so a push appends; a removal shifts the suffix left. The head
# (oldest) is column 0 and the count is stored, so reading a room is O(1).

def _push(room, count, cls, time, do):
    """Append to ``room[cls]``; returns (room, count, lost) where lost means the room was full."""
    c = jnp.maximum(cls, 0)
    full = count[c] >= room.shape[-1]
    ok = do & (cls >= 0) & ~full
    pos = jnp.minimum(count[c], room.shape[-1] - 1)
    room = room.at[c, pos].set(jnp.where(ok, time, room[c, pos]))
    return room, count.at[c].add(ok.astype(_I32)), do & (cls >= 0) & full


def _remove(room, count, cls, pos, do):
    """Remove entry ``pos`` of ``room[cls]`` (0 = head), closing the gap."""
    c = jnp.maximum(cls, 0)
    do = do & (cls >= 0)
    row = room[c]
    shifted = jnp.concatenate([row[1:], jnp.full((1,), jnp.inf, row.dtype)])
    row = jnp.where(do & (jnp.arange(row.shape[0]) >= pos), shifted, row)
    return room.at[c].set(row), count.at[c].add(-do.astype(_I32))


def _lose(state: SimState, cls, post, lost) -> SimState:
    state = _count(state, LOST, cls, post, lost)
    return eqx.tree_at(lambda s: s.status, state, state.status | jnp.where(lost, OVERFLOW, 0))


def _uniform_index(key, count):
    """Uniform on {0, ..., count-1} (each waiting job abandons at the same rate)."""
    return jnp.minimum(jnp.floor(jax.random.uniform(key) * count), count - 1).astype(_I32)


class _Sim(eqx.Module):
    """Closure over the static pieces; methods are the pieces of one step."""

    spec: SimSpec = eqx.field(static=True)
    policy: AbstractPolicy = eqx.field(static=True)

    def view(self, params, state):
        return make_view(self.spec, params, state, self.policy)

    # -- decisions -------------------------------------------------------------------------------
    def admit(self, key, params, state, post):
        k_gate, k_gpu = jax.random.split(key)
        v = self.view(params, state)
        cls = self.policy.gate(k_gate, v, params.targets)
        gpu = self.policy.prefill_gpu(k_gpu, v, params.targets, cls)
        do = (cls >= 0) & (gpu >= 0) & jnp.any(v.idle_prefill) & (v.q_p[jnp.maximum(cls, 0)] > 0)
        g = jnp.maximum(gpu, 0)
        queue, q_p = _remove(state.queue, state.q_p, cls, 0, do)
        state = eqx.tree_at(lambda s: (s.queue, s.q_p, s.prefill_class), state,
                            (queue, q_p, state.prefill_class.at[g].set(jnp.where(do, cls, state.prefill_class[g]))))
        return _count(state, ADMITTED, cls, post, do)

    def start_decode(self, state, gpu, cls, post, do):
        g, c = jnp.maximum(gpu, 0), jnp.maximum(cls, 0)
        state = eqx.tree_at(lambda s: s.decodes, state, state.decodes.at[g, c].add(do.astype(_I32)))
        return _count(state, DECODE_STARTED, cls, post, do)

    def place_pending(self, key, params, state, pending_cls, pending_gpu, post):
        do = pending_cls >= 0
        if self.policy.coupled:  # the decode continues in its prefill's slot
            return self.start_decode(state, pending_gpu, pending_cls, post, do), jnp.int32(-1)
        v = self.view(params, state)
        gpu, buf = self.policy.route(key, v, params.targets, pending_cls, jnp.int32(-1))
        placed = do & (gpu >= 0)
        state = self.start_decode(state, gpu, pending_cls, post, placed)
        wait = do & (gpu < 0)
        b = jnp.clip(buf, 0, self.spec.num_buffers - 1)
        room, count, lost = _push(state.buffers[b], state.q_d[b], pending_cls, state.t, wait)
        state = eqx.tree_at(lambda s: (s.buffers, s.q_d), state,
                            (state.buffers.at[b].set(room), state.q_d.at[b].set(count)))
        return _lose(state, pending_cls, post, lost), jnp.int32(-1)

    def drain(self, key, params, state, post):
        if self.policy.coupled:
            return state
        for b in range(self.spec.num_buffers):
            v = self.view(params, state)
            cls = self.policy.buffer_head(v, b)
            gpu, _ = self.policy.route(jax.random.fold_in(key, b), v, params.targets, cls, jnp.int32(b))
            do = (cls >= 0) & (gpu >= 0)
            room, count = _remove(state.buffers[b], state.q_d[b], cls, 0, do)
            state = eqx.tree_at(lambda s: (s.buffers, s.q_d), state,
                                (state.buffers.at[b].set(room), state.q_d.at[b].set(count)))
            state = self.start_decode(state, gpu, cls, post, do)
        return state

    def decide(self, key, params, state, pending_cls, pending_gpu, post):
        for r in range(ROUNDS):
            k_admit, k_route, k_drain = jax.random.split(jax.random.fold_in(key, r), 3)
            # A coupled decode keeps its prefill's slot, so it is placed before anything can take it.
            if self.policy.coupled:
                state, pending_cls = self.place_pending(k_route, params, state, pending_cls, pending_gpu, post)
            if self.policy.prefill_first:
                state = self.admit(k_admit, params, state, post)
            state, pending_cls = self.place_pending(k_route, params, state, pending_cls, pending_gpu, post)
            state = self.drain(k_drain, params, state, post)
            if not self.policy.prefill_first:
                state = self.admit(k_admit, params, state, post)
        return eqx.tree_at(lambda s: s.status, state,
                           state.status | jnp.where(self.actions_left(key, params, state), DECISIONS_INCOMPLETE, 0))

    def actions_left(self, key, params, state):
        """Whether an admission or a buffer-to-slot move is still possible (then rounds ran out)."""
        v = self.view(params, state)
        left = jnp.any(v.idle_prefill) & (self.policy.gate(key, v, params.targets) >= 0)
        if not self.policy.coupled:
            for b in range(self.spec.num_buffers):
                nonempty = jnp.any(v.q_d[b] > 0)
                left = left | (nonempty & self.policy.buffer_has_slot(v, params.targets, b))
        return left

    def capacity_ok(self, params, state):
        """Every GPU within its slots, at most one prefill, prefills only where allowed, nothing negative."""
        v = self.view(params, state)
        B = params.model.B.astype(_I32)
        has_prefill = v.prefill_class >= 0
        ndec = jnp.sum(v.decodes, axis=1)
        ok = jnp.all(v.free_decode >= 0) & jnp.all(v.decodes >= 0) & jnp.all(ndec + has_prefill <= B)
        ok &= ~jnp.any(has_prefill & (v.group == SOLO))
        ok &= jnp.all(state.q_p >= 0) & jnp.all(state.q_d >= 0)
        return ok

    # -- events ----------------------------------------------------------------------------------
    def other_event(self, key, params, state, view, rates, post):
        """Apply the state-dependent event chosen by its share of the total rate."""
        spec = self.spec
        num, nb, n = spec.num_classes, spec.num_buffers, spec.num_gpus
        k_choose, k_pick = jax.random.split(key)
        cum = jnp.cumsum(rates)
        e = jnp.searchsorted(cum, jax.random.uniform(k_choose) * cum[-1], side="right")
        # u * total can round up to total itself: never let that select a trailing zero-rate event
        last_positive = rates.shape[0] - 1 - jnp.argmax(rates[::-1] > 0)
        e = jnp.minimum(e, last_positive).astype(_I32)
        edges = [int(v) for v in np.cumsum([num, nb * num, n])]
        kind = jnp.sum(e >= jnp.asarray(edges)).astype(_I32)
        none = jnp.int32(-1)

        def abandon_prefill(state):
            c = e
            pos = _uniform_index(k_pick, state.q_p[c])
            queue, q_p = _remove(state.queue, state.q_p, c, pos, jnp.bool_(True))
            state = eqx.tree_at(lambda s: (s.queue, s.q_p), state, (queue, q_p))
            return _count(state, ABANDON_PREFILL, c, post), none, none

        def abandon_decode(state):
            b, c = (e - edges[0]) // num, (e - edges[0]) % num
            pos = _uniform_index(k_pick, state.q_d[b, c])
            room, count = _remove(state.buffers[b], state.q_d[b], c, pos, jnp.bool_(True))
            state = eqx.tree_at(lambda s: (s.buffers, s.q_d), state,
                                (state.buffers.at[b].set(room), state.q_d.at[b].set(count)))
            return _count(state, ABANDON_DECODE, c, post), none, none

        def prefill_done(state):
            g = e - edges[1]
            c = state.prefill_class[g]
            state = eqx.tree_at(lambda s: s.prefill_class, state, state.prefill_class.at[g].set(-1))
            return _count(state, PREFILL_DONE, c, post), c, g

        def decode_done(state):
            g, c = (e - edges[2]) // num, (e - edges[2]) % num
            state = eqx.tree_at(lambda s: s.decodes, state, state.decodes.at[g, c].add(-1))
            return _count(state, DECODE_DONE, c, post), none, none

        return jax.lax.switch(kind, (abandon_prefill, abandon_decode, prefill_done, decode_done), state)

    def arrival(self, arrival_key, params, state, cls, post):
        state = _count(state, ARRIVED, cls, post)
        queue, q_p, lost = _push(state.queue, state.q_p, cls, state.t, jnp.bool_(True))
        state = _lose(eqx.tree_at(lambda s: (s.queue, s.q_p), state, (queue, q_p)), cls, post, lost)
        index = state.totals[ARRIVED, cls]
        gap = jax.random.exponential(jax.random.fold_in(jax.random.fold_in(arrival_key, cls), index))
        rate = self.spec.num_gpus * params.model.lam[cls]
        nxt = state.next_arrival.at[cls].set(state.t + gap / rate)
        return eqx.tree_at(lambda s: s.next_arrival, state, nxt), jnp.int32(-1), jnp.int32(-1)

    def integrate(self, params, state, view, t_new):
        lo = jnp.maximum(state.t, params.warmup)
        hi = jnp.minimum(t_new, params.horizon)
        w = jnp.maximum(hi - lo, 0.0)
        has_prefill = (view.prefill_class >= 0)[:, None]
        dec = view.decodes
        levels = jnp.stack([
            view.q_p, view.X, jnp.sum(view.q_d, axis=0),
            jnp.sum(jnp.where(has_prefill, dec, 0), axis=0), jnp.sum(jnp.where(has_prefill, 0, dec), axis=0),
            jnp.sum(jnp.where((view.group == MIXED)[:, None], dec, 0), axis=0),
        ]).astype(state.integrals.dtype)
        return eqx.tree_at(lambda s: (s.integrals, s.t), state, (state.integrals + w * levels, t_new))

    def step(self, keys, params, state, seg_end):
        arrival_key, service_key = keys
        key = jax.random.fold_in(service_key, state.step)
        k_time, k_event, k_decide = jax.random.split(key, 3)
        view = self.view(params, state)
        rates = event_rates(self.spec, params, view)
        total = jnp.sum(rates)
        dt = jax.random.exponential(k_time, dtype=state.t.dtype) / total
        cls_arrival = jnp.argmin(state.next_arrival).astype(_I32)
        t_arrival = state.next_arrival[cls_arrival]
        is_arrival = t_arrival <= state.t + dt
        t_next = jnp.minimum(t_arrival, state.t + dt)
        stop = t_next > seg_end
        t_new = jnp.where(stop, seg_end, t_next)
        state = self.integrate(params, state, view, t_new)
        post = t_new >= params.warmup

        def fire(state):
            waiting_before = state.q_p[cls_arrival]
            state, cls, gpu = jax.lax.cond(
                is_arrival,
                lambda s: self.arrival(arrival_key, params, s, cls_arrival, post),
                lambda s: self.other_event(k_event, params, s, view, rates, post),
                state,
            )
            state = self.decide(k_decide, params, state, cls, gpu, post)
            # an arrival waited iff its class's queue grew (FCFS within class: it is the tail)
            waited = is_arrival & (state.q_p[cls_arrival] > waiting_before)
            state = _count(state, WAITED, cls_arrival, post, waited)
            return eqx.tree_at(lambda s: s.status, state,
                               state.status | jnp.where(self.capacity_ok(params, state), 0, CAPACITY_VIOLATED))

        new = fire(state)
        state = jax.tree_util.tree_map(lambda a, b: jnp.where(stop, a, b), state, new)
        bad = ~jnp.isfinite(t_next) & ~stop
        return eqx.tree_at(lambda s: (s.step, s.status), state,
                           (state.step + 1, state.status | jnp.where(bad, NONFINITE, 0)))


def init_state(spec: SimSpec, params: SimParams, arrival_key, num_buffers: int) -> SimState:
    num, n, K = spec.num_classes, spec.num_gpus, spec.room
    first = jax.vmap(lambda c: jax.random.exponential(jax.random.fold_in(jax.random.fold_in(arrival_key, c), 0)))(
        jnp.arange(num))
    zeros = jnp.zeros((NUM_COUNTERS, num), _I32)
    return SimState(
        t=jnp.zeros((), jnp.float64), step=jnp.zeros((), _I32),
        prefill_class=jnp.full((n,), -1, _I32), decodes=jnp.zeros((n, num), _I32),
        queue=jnp.full((num, K), jnp.inf), q_p=jnp.zeros((num,), _I32),
        buffers=jnp.full((num_buffers, num, K), jnp.inf), q_d=jnp.zeros((num_buffers, num), _I32),
        next_arrival=first / (n * params.model.lam), counts=zeros, integrals=jnp.zeros((6, num)),
        totals=zeros, status=jnp.zeros((), _I32),
    )


def run_single(key, params: SimParams, spec: SimSpec, policy: AbstractPolicy, record_times=None):
    """Simulate one replica from an empty system to ``params.horizon``. Consumes ``key``.

    Returns the final state, and if ``record_times`` (a static tuple of increasing times) is given,
    the stacked (t, Q_p, X, Q_d, Y_m, Y_s) levels at those times."""
    if policy.num_buffers != spec.num_buffers:
        spec = SimSpec(spec.num_classes, spec.num_gpus, spec.room, policy.num_buffers, spec.convention)
    sim = _Sim(spec, policy)
    arrival_key, service_key = jax.random.split(key)
    state = init_state(spec, params, arrival_key, spec.num_buffers)

    def run_to(state, seg_end):
        def cond(s):
            return (s.t < seg_end) & (s.step < params.max_steps) & (s.status & NONFINITE == 0)

        return jax.lax.while_loop(cond, lambda s: sim.step((arrival_key, service_key), params, s, seg_end), state)

    if record_times is None:
        state = run_to(state, params.horizon)
        trajectory = None
    else:
        def seg(state, t_rec):
            state = run_to(state, t_rec)
            v = sim.view(params, state)
            has_prefill = (v.prefill_class >= 0)[:, None]
            levels = jnp.stack([v.q_p, v.X, jnp.sum(v.q_d, axis=0),
                                jnp.sum(jnp.where(has_prefill, v.decodes, 0), axis=0),
                                jnp.sum(jnp.where(has_prefill, 0, v.decodes), axis=0)])
            return state, levels

        state, trajectory = jax.lax.scan(seg, state, jnp.asarray(record_times, jnp.float64))
        state = run_to(state, params.horizon)
    hit_max = (state.step >= params.max_steps) & (state.t < params.horizon)
    state = eqx.tree_at(lambda s: s.status, state, state.status | jnp.where(hit_max, MAX_STEPS, 0))
    return state, trajectory


@eqx.filter_jit
def simulate(keys, params: SimParams, spec: SimSpec, policy: AbstractPolicy, record_times=None):
    """Replicas batched over ``keys`` (shape (R, ...)); ``params`` shared. Returns batched states."""
    return jax.vmap(lambda k: run_single(k, params, spec, policy, record_times))(keys)
