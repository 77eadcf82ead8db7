"""The exact event-by-event simulator of the prefill/decode CTMC (MODEL.md §2.2).

One replica is written here; batching is a ``vmap`` from outside (:func:`simulate`), which turns the
per-replica ``while_loop`` into one loop whose carry is the whole replica vector (the time-major layout
of STYLE.md).

Exactness. Every transition rate is exponential, so each step draws the time to the next
state-dependent event from the total rate and picks the event by its share (Gillespie). Arrivals run
on their own stream (each class's next arrival time is drawn from ``fold_in(arrival_key, class,
index)``): the superposition is the same CTMC, and two policies on one key see the same arrivals
(common random numbers). Stopping at the horizon (or at a recording time) and redrawing afterwards is
exact by memorylessness. Simulated time is float64.

Cost. Per-class aggregates (X, decodes by speed, ...) are kept in step with the per-GPU arrays by the
only four functions that change a GPU (:meth:`_Sim.start_prefill`, ``finish_prefill``, ``add_decode``,
``remove_decode``), so an event costs O(I) to pick its kind and class plus one O(n) pass to pick its
GPU, and each decision one O(n) pass. Updates are masked rather than branched: under ``vmap`` a
``lax.cond`` runs both sides anyway.

Decisions. After each event the policy's decisions are applied at once: a finished prefill's job is
routed, buffer heads take freed decode slots, an idle prefill slot admits. One event frees at most one
slot, so one round suffices; a replica for which an action is still possible afterwards is flagged
``DECISIONS_INCOMPLETE`` (and every step checks capacity, flagging ``CAPACITY_VIOLATED``) rather than
trusted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import equinox as eqx
import jax
import jax.numpy as jnp

from .state import (
    ABANDON_DECODE,
    ABANDON_PREFILL,
    ADMITTED,
    ANY,
    ARRIVED,
    CAPACITY_VIOLATED,
    DECISIONS_INCOMPLETE,
    DECODE_DONE,
    DECODE_STARTED,
    LOST,
    MAX_STEPS,
    MIXED,
    NONFINITE,
    NUM_COUNTERS,
    OVERFLOW,
    PREFILL_DONE,
    SOLO,
    WAITED,
    SimParams,
    SimSpec,
    SimState,
    View,
    gpu_groups,
    runs_slow,
    weighted_search,
)

if TYPE_CHECKING:  # policies import the state types from this package: avoid the cycle at run time
    from ..policies.base import AbstractPolicy

_I32 = jnp.int32
SLOW, FAST = 0, 1  # rows of Y_speed: decodes at mu_m, at mu_s


def make_view(spec: SimSpec, params: SimParams, state: SimState) -> View:
    """What policies see; O(n) elementwise from the maintained aggregates."""
    B = params.model.B.astype(_I32)
    group = state.group
    has_prefill = state.prefill_class >= 0
    cap = jnp.where(group == MIXED, B - 1, jnp.where(group == SOLO, B, B - has_prefill.astype(_I32)))
    idle = jnp.where(group == MIXED, ~has_prefill, (group == ANY) & ~has_prefill & (state.ndec < B))
    return View(
        n=spec.num_gpus, B=params.model.B, group=group, prefill_class=state.prefill_class,
        decodes=state.decodes, free_decode=cap - state.ndec, idle_prefill=idle, X=state.X,
        q_p=state.q_p, queue_head=room_heads(state, "queue"), q_d=state.q_d,
        buffer_head=room_heads(state, "buffers"),
    )


def _slow(spec: SimSpec, group, prefill_class):
    return runs_slow(spec.convention, group, prefill_class)


def _bump(counts, row, cls, do):
    return counts.at[row, jnp.maximum(cls, 0)].add((do & (cls >= 0)).astype(_I32))


def _count(state: SimState, row, cls, post, do) -> SimState:
    return eqx.tree_at(lambda s: (s.counts, s.totals), state,
                       (_bump(state.counts, row, cls, do & post), _bump(state.totals, row, cls, do)))


# Waiting rooms. Each class's room (the prefill queue, and each decode buffer) is a ring of entry times:
# ``start`` is the cell of the oldest entry and the count is stored, so the live entries are cells
# start, start + 1, ... (mod width), oldest first, and reading a head is O(1). Entries arrive in time
# order, so a push writes the cell after the newest and taking the head advances ``start``: both O(1).
# Only an abandonment (a uniformly chosen entry) moves cells: the newer entries shift one cell toward
# the head, a masked pass over the room. Cells past the count hold +inf (a state holds no stale values).
#
# The entry times serve one purpose: FCFS *across* classes (which class's head is oldest). With one
# class there is nothing to order (and abandonment, memoryless, needs no ages), so a one-class model
# keeps rooms of width 0: the counts alone, no capacity, never a lost job, and no O(room) shift.

ROOMS = {"queue": ("queue", "queue_start", "q_p"), "buffers": ("buffers", "buffer_start", "q_d")}


def room_width(spec) -> int:
    """Entry-time cells per class: ``spec.room``, or 0 (counts only) for a one-class model."""
    return 0 if spec.num_classes == 1 else spec.room


def _room(state, which):
    """A room family as (cells (rows, width), start (rows,), count (rows,)); a buffer's row is b x I + c."""
    cells, start, count = (getattr(state, f) for f in ROOMS[which])
    return cells.reshape(count.size, cells.shape[-1]), start.reshape(-1), count.reshape(-1)


def _set_room(state, which, cells, start, count):
    names = ROOMS[which]
    shapes = [getattr(state, f).shape for f in names]
    return eqx.tree_at(lambda s: tuple(getattr(s, f) for f in names), state,
                       (cells.reshape(shapes[0]), start.reshape(shapes[1]), count.reshape(shapes[2])))


def room_heads(state, which):
    """Entry time of each room's oldest waiting job (+inf if empty), shaped as its count. A width-0
    room has no ages: its classes (one) are ordered by nothing, so any finite value marks a non-empty
    room."""
    cells, start, count = _room(state, which)
    if cells.shape[-1] == 0:
        heads = jnp.zeros(count.shape, cells.dtype)
    else:
        heads = jnp.take_along_axis(cells, start[:, None], axis=1)[:, 0]
    return jnp.where(count > 0, heads, jnp.inf).reshape(getattr(state, ROOMS[which][2]).shape)


def _wrap(i, width):
    return jnp.where(i >= width, i - width, i)


def room_push(state, which, row, time, do):
    """Append ``time`` to room ``row`` where ``do`` (row < 0: nothing); returns (state, lost), lost
    meaning the room was full."""
    cells, start, count = _room(state, which)
    r, do = jnp.maximum(row, 0), do & (row >= 0)
    width = cells.shape[-1]
    if width == 0:
        return _set_room(state, which, cells, start, count.at[r].add(do.astype(_I32))), jnp.zeros((), bool)
    full = count[r] >= width
    ok = do & ~full
    cell = jnp.minimum(_wrap(start[r] + count[r], width), width - 1)
    cells = cells.at[r, cell].set(jnp.where(ok, time, cells[r, cell]))
    return _set_room(state, which, cells, start, count.at[r].add(ok.astype(_I32))), do & full


def room_pop(state, which, row, do):
    """Take the head (oldest entry) of room ``row`` where ``do``."""
    cells, start, count = _room(state, which)
    r, do = jnp.maximum(row, 0), do & (row >= 0)
    if cells.shape[-1] > 0:
        cells = cells.at[r, start[r]].set(jnp.where(do, jnp.inf, cells[r, start[r]]))
        start = start.at[r].set(jnp.where(do, _wrap(start[r] + 1, cells.shape[-1]), start[r]))
    return _set_room(state, which, cells, start, count.at[r].add(-do.astype(_I32)))


def room_remove(state, which, row, pos, do):
    """Remove entry ``pos`` (0 = oldest) of room ``row`` where ``do``: the newer entries each move one
    cell toward the head. One masked pass over the whole family of rooms: selecting the row first
    (a gather, then a scatter back) measured slower on CPU, and so did a ring shift by concatenation."""
    cells, start, count = _room(state, which)
    r, do = jnp.maximum(row, 0), do & (row >= 0)
    width = cells.shape[-1]
    if width > 0:
        cell = jnp.arange(width, dtype=_I32)
        unwrapped = jnp.where(cell >= start[r], cell, cell + width)  # start .. start + width - 1
        first = start[r] + pos
        last = start[r] + count[r] - 1
        moved = (unwrapped >= first) & (unwrapped < last)  # takes the next cell
        in_row = (jnp.arange(cells.shape[0]) == r)[:, None] & do
        # each cell's successor (the last cell's is cell 0); padding, then one select, fuses into a
        # single cheap pass where a wrapping concatenation of two slices does not
        padded = jnp.concatenate([cells[:, 1:], jnp.full((cells.shape[0], 1), jnp.inf, cells.dtype)], axis=1)
        after = jnp.where(cell == width - 1, cells[:, :1], padded)
        cells = jnp.where(in_row & moved[None, :], after, jnp.where(in_row & (unwrapped == last)[None, :], jnp.inf, cells))
    return _set_room(state, which, cells, start, count.at[r].add(-do.astype(_I32)))


def _weighted_index(u, weights):
    """Index drawn with probability proportional to ``weights`` (>= 0) from one uniform ``u``."""
    idx = weighted_search(weights, u * jnp.sum(weights))
    # u * total can round up to total itself: never let that select a trailing zero weight
    last_positive = jnp.max(jnp.where(weights > 0, jnp.arange(weights.shape[0], dtype=_I32), 0))
    return jnp.minimum(idx, last_positive).astype(_I32)


# One step's randomness, by role: each role has its own key, into which a step folds its index. One
# hash per role, not one batched hash for all: XLA then drops the keys a policy never uses (an FCFS gate
# draws nothing), and on CPU a threefry call's cost grows with its width (it runs as a rolled loop that
# copies its words each round), so unused words are not free (docs/simulation.md, "What a step costs").
STEP_ROLES = ("event", "gate", "gpu", "route", "drain", "check")


def arrival_keys(arrival_key, num_classes: int):
    """Each class's arrival stream: its k-th gap is drawn from ``fold_in(arrival_keys[c], k)``."""
    return jax.vmap(lambda c: jax.random.fold_in(arrival_key, c))(jnp.arange(num_classes))


def stream_keys(arrival_key, service_key, num_classes: int):
    """What :meth:`_Sim.step` takes: the per-class arrival keys and one service key per step role."""
    return arrival_keys(arrival_key, num_classes), jax.random.split(service_key, len(STEP_ROLES))


def step_keys(service_keys, step):
    """The step's key for each role, in STEP_ROLES order."""
    return [jax.random.fold_in(service_keys[j], step) for j in range(len(STEP_ROLES))]


class _Sim(eqx.Module):
    """The static pieces (spec, policy) closed over; methods are the pieces of one step."""

    spec: SimSpec = eqx.field(static=True)
    policy: AbstractPolicy = eqx.field(static=True)

    def view(self, params, state):
        return make_view(self.spec, params, state)

    def buffer_row(self, b, cls):
        """The row of decode buffer ``b``'s class-``cls`` room in the buffers' family (-1 for no class)."""
        return jnp.where(cls >= 0, b * self.spec.num_classes + cls, -1)

    # -- the only functions that change a GPU -----------------------------------------------------
    def _retime(self, state, g, new_prefill_class, do):
        """Set GPU g's prefill class; move its decodes between the speed and prefill aggregates."""
        old = state.prefill_class[g]
        new = jnp.where(do, new_prefill_class, old)
        row = state.decodes[g]
        was_slow = _slow(self.spec, state.group[g], old)
        is_slow = _slow(self.spec, state.group[g], new)
        moved = (was_slow != is_slow).astype(_I32)
        sign = jnp.where(is_slow, 1, -1) * moved  # +1: FAST -> SLOW
        Y_speed = state.Y_speed.at[SLOW].add(sign * row).at[FAST].add(-sign * row)
        pre_sign = (new >= 0).astype(_I32) - (old >= 0).astype(_I32)
        return eqx.tree_at(lambda s: (s.prefill_class, s.Y_speed, s.Y_pre), state,
                           (state.prefill_class.at[g].set(new), Y_speed, state.Y_pre + pre_sign * row))

    def start_prefill(self, state, g, c, do):
        state = self._retime(state, g, c, do)
        return eqx.tree_at(lambda s: s.X, state, state.X.at[jnp.maximum(c, 0)].add(do.astype(_I32)))

    def finish_prefill(self, state, g, do):
        c = state.prefill_class[g]
        state = eqx.tree_at(lambda s: s.X, state, state.X.at[jnp.maximum(c, 0)].add(-(do & (c >= 0)).astype(_I32)))
        return self._retime(state, g, jnp.int32(-1), do), c

    def _change_decode(self, state, g, c, delta):
        g, c = jnp.maximum(g, 0), jnp.maximum(c, 0)
        speed = jnp.where(_slow(self.spec, state.group[g], state.prefill_class[g]), SLOW, FAST)
        return eqx.tree_at(
            lambda s: (s.decodes, s.ndec, s.Y_speed, s.Y_pre, s.Y_mixgroup), state,
            (state.decodes.at[g, c].add(delta), state.ndec.at[g].add(delta), state.Y_speed.at[speed, c].add(delta),
             state.Y_pre.at[c].add(delta * (state.prefill_class[g] >= 0)),
             state.Y_mixgroup.at[c].add(delta * (state.group[g] == MIXED))),
        )

    def add_decode(self, state, g, c, post, do):
        do = do & (g >= 0) & (c >= 0)
        state = self._change_decode(state, g, c, do.astype(_I32))
        return _count(state, DECODE_STARTED, c, post, do)

    def remove_decode(self, state, g, c, do):
        return self._change_decode(state, g, c, -(do & (g >= 0) & (c >= 0)).astype(_I32))

    # -- decisions -------------------------------------------------------------------------------
    def admit(self, k_gate, k_gpu, params, state, post, live):
        """Admit while an idle prefill slot and a gated class remain. One admission per event is all the
        paper's rules ever need; a rule that holds slots idle (the hold-back option) can release several
        at once, so this loops (bounded by n), the k-th admission on the keys folded with k."""

        def can(carry):
            state, k = carry
            v = self.view(params, state)
            return live & (k < self.spec.num_gpus) & jnp.any(v.idle_prefill) & (
                self.policy.gate(jax.random.fold_in(k_gate, k), v, params.targets) >= 0)

        def body(carry):
            state, k = carry
            k_gate_k, k_gpu_k = jax.vmap(jax.random.fold_in, in_axes=(0, None))(jnp.stack([k_gate, k_gpu]), k)
            return self.admit_one(k_gate_k, k_gpu_k, params, state, post, live), k + 1

        state = self.admit_one(k_gate, k_gpu, params, state, post, live)
        if self.policy.admits_in_bursts:
            state, _ = jax.lax.while_loop(can, body, (state, jnp.int32(1)))
        return state

    def admit_one(self, k_gate, k_gpu, params, state, post, live):
        v = self.view(params, state)
        cls = self.policy.gate(k_gate, v, params.targets)
        gpu = self.policy.prefill_gpu(k_gpu, v, params.targets, cls)
        do = live & (cls >= 0) & (gpu >= 0) & (v.q_p[jnp.maximum(cls, 0)] > 0)
        g = jnp.maximum(gpu, 0)
        do = do & v.idle_prefill[g]
        state = room_pop(state, "queue", cls, do)
        state = self.start_prefill(state, g, cls, do)
        return _count(state, ADMITTED, cls, post, do)

    def place_pending(self, key, params, state, pending_cls, pending_gpu, post):
        do = pending_cls >= 0
        if self.policy.coupled:  # the decode continues in its prefill's slot
            return self.add_decode(state, pending_gpu, pending_cls, post, do)
        v = self.view(params, state)
        gpu, buf = self.policy.route(key, v, params.targets, pending_cls, jnp.int32(-1))
        state = self.add_decode(state, gpu, pending_cls, post, do & (gpu >= 0))
        wait = do & (gpu < 0)
        b = jnp.clip(buf, 0, self.spec.num_buffers - 1)
        state, lost = room_push(state, "buffers", self.buffer_row(b, pending_cls), state.t, wait)
        return self._lose(state, pending_cls, post, lost)

    def drain(self, key, params, state, post, live):
        if self.policy.coupled:
            return state
        for b in range(self.spec.num_buffers):
            v = self.view(params, state)
            cls = self.policy.buffer_head(v, b)
            k_b = key if b == 0 else jax.random.fold_in(key, b)
            gpu, _ = self.policy.route(k_b, v, params.targets, cls, jnp.int32(b))
            do = live & (cls >= 0) & (gpu >= 0)
            state = room_pop(state, "buffers", self.buffer_row(b, cls), do)
            state = self.add_decode(state, gpu, cls, post, do)
        return state

    def decide(self, keys, params, state, pending_cls, pending_gpu, post, live):
        """Apply the policy's decisions after an event; ``keys`` are the step's keys for the roles
        gate, gpu, route, drain and check (STEP_ROLES[1:])."""
        k_gate, k_gpu, k_route, k_drain, k_check = keys
        pending_cls = jnp.where(live, pending_cls, -1)
        if self.policy.coupled:  # a coupled decode keeps its prefill's slot: place it before anything
            state = self.place_pending(k_route, params, state, pending_cls, pending_gpu, post)
        if self.policy.prefill_first:
            state = self.admit(k_gate, k_gpu, params, state, post, live)
        if not self.policy.coupled:
            state = self.place_pending(k_route, params, state, pending_cls, pending_gpu, post)
        state = self.drain(k_drain, params, state, post, live)
        if not self.policy.prefill_first:
            state = self.admit(k_gate, k_gpu, params, state, post, live)
        flags = jnp.where(self.actions_left(k_check, params, state), DECISIONS_INCOMPLETE, 0)
        flags |= jnp.where(self.capacity_ok(params, state), 0, CAPACITY_VIOLATED)
        return eqx.tree_at(lambda s: s.status, state, state.status | jnp.where(live, flags, 0))

    def actions_left(self, key, params, state):
        """Whether an admission or a buffer-to-slot move is still possible (decisions left undone)."""
        v = self.view(params, state)
        left = jnp.any(v.idle_prefill) & (self.policy.gate(key, v, params.targets) >= 0)
        if not self.policy.coupled:
            for b in range(self.spec.num_buffers):
                left |= jnp.any(v.q_d[b] > 0) & self.policy.buffer_has_slot(v, params.targets, b)
        return left

    def capacity_ok(self, params, state):
        """Every GPU within its slots, prefills only where allowed, nothing negative."""
        v = self.view(params, state)
        B = params.model.B.astype(_I32)
        has_prefill = v.prefill_class >= 0
        ok = jnp.all(v.free_decode >= 0) & jnp.all(state.ndec + has_prefill <= B)
        ok &= ~jnp.any(has_prefill & (v.group == SOLO))
        ok &= jnp.all(state.X >= 0) & jnp.all(state.Y_speed >= 0) & jnp.all(state.q_p >= 0) & jnp.all(state.q_d >= 0)
        return ok

    def _lose(self, state, cls, post, lost):
        state = _count(state, LOST, cls, post, lost)
        return eqx.tree_at(lambda s: s.status, state, state.status | jnp.where(lost, OVERFLOW, 0))

    def arrive(self, class_keys, m, state, cls_arrival, t_arrival, post, arrive):
        """Apply an arrival of class ``cls_arrival`` (where ``arrive``) and draw that class's next one
        from its own stream: the k-th gap of class c comes from ``fold_in(class_keys[c], k)``
        (:func:`arrival_keys`), so every policy and engine on one key sees the same arrivals (common
        random numbers)."""
        state = _count(state, ARRIVED, cls_arrival, post, arrive)
        state, lost = room_push(state, "queue", cls_arrival, state.t, arrive)
        state = self._lose(state, cls_arrival, post, lost)
        index = state.totals[ARRIVED, cls_arrival]
        key = jax.random.fold_in(class_keys[cls_arrival], index)
        gap = jax.random.exponential(key, dtype=m.lam.dtype)
        nxt = state.t + (gap / (self.spec.num_gpus * m.lam[cls_arrival])).astype(jnp.float64)
        return eqx.tree_at(lambda s: s.next_arrival, state,
                           state.next_arrival.at[cls_arrival].set(jnp.where(arrive, nxt, t_arrival)))

    # -- one step --------------------------------------------------------------------------------
    def step(self, keys, params, state, seg_end):
        spec = self.spec
        num, nb = spec.num_classes, spec.num_buffers
        class_keys, service_keys = keys
        k_event, *k_decide = step_keys(service_keys, state.step)
        dtype = jnp.dtype(spec.dtype)
        u = jax.random.uniform(k_event, (4,), dtype=dtype)
        m = jax.tree_util.tree_map(lambda a: a.astype(dtype), params.model)

        # rates by kind and class: [abandon prefill | abandon buffers | prefill done | decode at mu_m | at mu_s]
        rates = jnp.concatenate([m.theta * state.q_p, (m.theta[None, :] * state.q_d).ravel(), m.mu_p * state.X,
                                 m.mu_m * state.Y_speed[SLOW], m.mu_s * state.Y_speed[FAST]])
        total = jnp.sum(rates)
        dt = (-jnp.log1p(-u[0]) / total).astype(jnp.float64)  # time itself stays float64
        cls_arrival = jnp.argmin(state.next_arrival).astype(_I32)
        t_arrival = state.next_arrival[cls_arrival]
        is_arrival = t_arrival <= state.t + dt
        t_next = jnp.minimum(t_arrival, state.t + dt)
        stop = t_next > seg_end
        t_new = jnp.where(stop, seg_end, t_next)
        state = self.integrate(params, state, t_new)
        live = ~stop
        post = t_new >= params.warmup
        waiting_before = state.q_p[cls_arrival]

        # -- an arrival (own stream) ------------------------------------------------------------
        arrive = live & is_arrival
        state = self.arrive(class_keys, m, state, cls_arrival, t_arrival, post, arrive)

        # -- otherwise a state-dependent event: kind and class from O(I) rates, GPU from one O(n) pass
        other = live & ~is_arrival
        e = _weighted_index(u[1], rates)
        kind = (e >= num).astype(_I32) + (e >= num + nb * num) + (e >= (2 + nb) * num) + (e >= (3 + nb) * num)
        c = jnp.where(kind == 1, (e - num) % num, e % num).astype(_I32)
        b = jnp.where(kind == 1, (e - num) // num, 0)
        # abandonment: a uniformly chosen waiting job of the class (all have the same patience rate)
        room_count = jnp.where(kind == 0, state.q_p[c], state.q_d[b, c])
        pos = jnp.minimum(jnp.floor(u[2] * room_count), room_count - 1).astype(_I32)
        state = room_remove(state, "queue", c, pos, other & (kind == 0))
        state = room_remove(state, "buffers", self.buffer_row(b, c), pos, other & (kind == 1))
        state = _count(state, ABANDON_PREFILL, c, post, other & (kind == 0))
        state = _count(state, ABANDON_DECODE, c, post, other & (kind == 1))
        # completions: the GPU in proportion to its share of the chosen kind's rate
        g = _weighted_index(u[3], self.completion_weights(state, kind, c))
        prefill_done = other & (kind == 2)
        state, pending_cls = self.finish_prefill(state, g, prefill_done)
        state = _count(state, PREFILL_DONE, c, post, prefill_done)
        decode_done = other & (kind >= 3)
        state = self.remove_decode(state, g, c, decode_done)
        state = _count(state, DECODE_DONE, c, post, decode_done)

        pending_cls = jnp.where(prefill_done, pending_cls, -1)
        state = self.decide(k_decide, params, state, pending_cls, self.gpu_after_prefill(g), post, live)
        # an arrival waited iff its class's queue grew (FCFS within class: it is the tail)
        state = _count(state, WAITED, cls_arrival, post, arrive & (state.q_p[cls_arrival] > waiting_before))
        bad = ~jnp.isfinite(t_next) & live
        return eqx.tree_at(lambda s: (s.step, s.status), state,
                           (state.step + 1, state.status | jnp.where(bad, NONFINITE, 0)))

    def completion_weights(self, state, kind, c):
        """Each GPU's share of the chosen completion's rate: its class-c prefill (kind 2) or its class-c
        decodes at mu_m (kind 3) or at mu_s (kind 4)."""
        slow = _slow(self.spec, state.group, state.prefill_class)
        return jnp.where(kind == 2, (state.prefill_class == c).astype(_I32),
                         state.decodes[:, c] * (slow == (kind == 3)))

    def gpu_after_prefill(self, g):
        """The index of GPU g once its prefill finished (the same GPU here; a configuration changes)."""
        return g

    def integrate(self, params, state, t_new):
        lo = jnp.maximum(state.t, params.warmup)
        hi = jnp.minimum(t_new, params.horizon)
        w = jnp.maximum(hi - lo, 0.0)
        levels = self.levels(state).astype(state.integrals.dtype)
        return eqx.tree_at(lambda s: (s.integrals, s.t), state, (state.integrals + w * levels, t_new))

    def levels(self, state):
        """(Q_p, X, Q_d, Y_m, Y_s, Y on G_mix) per class now (rows as INTEGRAL_NAMES)."""
        return jnp.stack([state.q_p, state.X, jnp.sum(state.q_d, axis=0), state.Y_pre,
                          jnp.sum(state.Y_speed, axis=0) - state.Y_pre, state.Y_mixgroup])


def init_state(spec: SimSpec, params: SimParams, arrival_key, num_buffers: int, partitioned: bool = True) -> SimState:
    num, n, K = spec.num_classes, spec.num_gpus, room_width(spec)
    first = jax.vmap(lambda k: jax.random.exponential(jax.random.fold_in(k, 0)))(arrival_keys(arrival_key, num))
    zeros = jnp.zeros((NUM_COUNTERS, num), _I32)
    group = gpu_groups(params, n, partitioned)
    return SimState(
        t=jnp.zeros((), jnp.float64), step=jnp.zeros((), _I32), group=group,
        prefill_class=jnp.full((n,), -1, _I32), decodes=jnp.zeros((n, num), _I32),
        ndec=jnp.zeros((n,), _I32), X=jnp.zeros((num,), _I32), Y_speed=jnp.zeros((2, num), _I32),
        Y_pre=jnp.zeros((num,), _I32), Y_mixgroup=jnp.zeros((num,), _I32),
        queue=jnp.full((num, K), jnp.inf), queue_start=jnp.zeros((num,), _I32), q_p=jnp.zeros((num,), _I32),
        buffers=jnp.full((num_buffers, num, K), jnp.inf), buffer_start=jnp.zeros((num_buffers, num), _I32),
        q_d=jnp.zeros((num_buffers, num), _I32),
        next_arrival=first / (n * params.model.lam), counts=zeros, integrals=jnp.zeros((6, num)),
        totals=zeros, status=jnp.zeros((), _I32),
    )


def run_single(key, params: SimParams, spec: SimSpec, policy: AbstractPolicy, record_times=None,
               events_per_iteration: int = 1):
    """Simulate one replica from an empty system to ``params.horizon``. Consumes ``key``.

    Returns the final state, and if ``record_times`` (a static tuple of increasing times) is given,
    the (Q_p, X, Q_d, Y_m, Y_s, Y on G_mix) levels per class at those times, shape
    (len(record_times), 6, I)."""
    if policy.num_buffers != spec.num_buffers:
        spec = SimSpec(spec.num_classes, spec.num_gpus, spec.room, policy.num_buffers, spec.convention, spec.dtype)
    sim = _Sim(spec, policy)
    arrival_key, service_key = jax.random.split(key)
    state = init_state(spec, params, arrival_key, spec.num_buffers, policy.partitioned)
    keys = stream_keys(arrival_key, service_key, spec.num_classes)
    return drive(sim, keys, params, state, record_times, events_per_iteration)


def drive(sim, keys, params: SimParams, state, record_times=None, events_per_iteration: int = 1):
    """Run ``sim.step`` from ``state`` to the horizon (stopping at each recording time to read
    ``sim.levels``) and flag a replica that ran out of steps. Shared by every event-by-event engine."""

    def run_to(state, seg_end):
        def cond(s):
            return (s.t < seg_end) & (s.step < params.max_steps) & (s.status & NONFINITE == 0)

        def body(s):
            # several events per loop iteration (the unrolled copies after a stop are masked no-ops)
            for _ in range(events_per_iteration):
                s = sim.step(keys, params, s, seg_end)
            return s

        return jax.lax.while_loop(cond, body, state)

    if record_times is None:
        state = run_to(state, params.horizon)
        trajectory = None
    else:
        def seg(state, t_rec):
            state = run_to(state, t_rec)
            return state, sim.levels(state)

        state, trajectory = jax.lax.scan(seg, state, jnp.asarray(record_times, jnp.float64))
        state = run_to(state, params.horizon)
    hit_max = (state.step >= params.max_steps) & (state.t < params.horizon)
    state = eqx.tree_at(lambda s: s.status, state, state.status | jnp.where(hit_max, MAX_STEPS, 0))
    return state, trajectory


@eqx.filter_jit
def simulate(keys, params: SimParams, spec: SimSpec, policy: AbstractPolicy, record_times=None,
             events_per_iteration: int = 1):
    """Replicas batched over ``keys`` (shape (R, ...)); ``params`` shared. Returns batched states."""
    return jax.vmap(lambda k: run_single(k, params, spec, policy, record_times, events_per_iteration))(keys)
