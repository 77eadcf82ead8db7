"""The time-stepped engine: every GPU advances together by ``dt`` (a discrete-time approximation of
the CTMC of MODEL.md §2.2, for sweeps too large for the exact engine).

The discrete-time model. Time runs in steps of ``dt`` (the horizon is split into a whole number of
them). In each step:

* class-i arrivals are Poisson(n lam_i dt) (own random stream: common random numbers across policies);
  under a rate schedule (``params.model.arrivals``) Poisson with mean n lam_i int f_i over the step
  (:func:`arrival_means`), exact for a nonstationary Poisson process;
* every job in service or waiting finishes its phase with probability rate x dt, independently: a
  prefill with mu_p,i dt, a decode with mu_m,i dt or mu_s,i dt by its GPU's mode, a waiting job
  abandons with theta_i dt. Phase lengths are geometric in steps with mean dt/(rate dt) = 1/rate,
  exactly the CTMC's means (using 1 - exp(-rate dt) instead would lengthen every phase by dt/2 and
  bias throughput at first order);
* at the end of the step the policy decides, in bulk and in its order (``policy.order``): the router
  places the finished prefills' jobs (``route_bulk``: into buffers, or their own slot for coupled
  placement), the buffers fill free decode slots (``drain_bulk``), idle prefill slots admit, one
  ``gate`` call per admission (the gates look only at per-class aggregates, so this is O(I) each),
  and the admission places the step's prefills (``place_bulk``). A policy written per job gets these
  bulk forms from its per-job decisions (:mod:`jaxq.policies.protocol`); the built-ins have faster
  ones (:mod:`jaxq.policies.bulk`).

What differs from the exact engine (measured in docs/time-stepped.md):
* events inside a step see the state at its start; the decisions wait for its end (no slot idles:
  the completion and the refill happen at the same instant);
* the waiting rooms are counts per class, so FCFS *across* classes (the FCFS gates, the shared
  decode buffer) becomes random order of service across classes: the views' head times are a race
  in which each class's head is exponential with rate its count, so the "oldest" is a class drawn in
  proportion to its waiting jobs; within a class order does not matter for any metric (patience is
  memoryless);
* bulk placement (the built-ins): a step's decodes fill free slots of the target group in GPU order
  from a random starting slot, not one uniform draw per job; a job arriving during a step abandons
  in it with probability theta dt/2 (its mean exposure);
* per GPU, "two or more decodes finish in one step" (probability O((d mu dt)^2), under 1e-3 per
  GPU-step at the default step) is taken as exactly two of one class.

Validity needs rate x dt <= 1 for every phase (checked on the host by :func:`check_dt`).
Cost per step is O(n I) elementwise plus O(I) per admission, whatever the event rate (a per-job bulk
form adds O(n) per job placed).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ..policies.bulk import allocate, count_draw, per_class, race_from, stack_rows
from ..policies.protocol import ADMIT, DRAIN, ROUTE, Bulk, Policy
from ..policies.view import MIXED, View
from .core import AbstractEngine, Rows, capacity_flags, count, slots
from .state import (
    ABANDON_DECODE,
    ABANDON_PREFILL,
    ADMITTED,
    ARRIVED,
    CAPACITY_VIOLATED,
    DECODE_DONE,
    DECODE_STARTED,
    INT_QP,
    LOST,
    NONFINITE,
    NUM_COUNTERS,
    OVERFLOW,
    PREFILL_DONE,
    WAITED,
    SimSpec,
    runs_slow,
)

# The default step (s). Chosen by the bias study in docs/time-stepped.md: on the canonical instance
# at n = 500 the revenue bias against the exact engine is below 0.5% of R* (and mu_p,max dt <= 1).
DEFAULT_DT = 0.02
_I32 = jnp.int32


class SteppedState(eqx.Module):
    # dynamics
    t: Float[Array, ""]
    step: Int[Array, ""]
    group: Int[Array, " n"]
    prefill_class: Int[Array, " n"]
    decodes: Int[Array, "I n"]  # class-major (the exact engine's is n x I): rows are contiguous per class
    q_p: Int[Array, " I"]
    q_d: Int[Array, "NB I"]
    # accumulators, as the event engines' (rows: state.COUNTER_NAMES, state.INTEGRAL_NAMES)
    counts: Int[Array, "C I"]
    integrals: Float[Array, "6 I"]
    totals: Int[Array, "C I"]
    status: Int[Array, ""]


def check_dt(model, dt: float) -> None:
    """Raise ValueError unless every phase's per-step probability rate x dt is at most 1."""
    if not (isinstance(dt, (int, float)) and np.isfinite(dt) and dt > 0):
        raise ValueError(f"invalid field 'dt': must be a positive number of seconds, got {dt!r}")
    rates = {"mu_p": model.mu_p, "mu_m": model.mu_m, "mu_s": model.mu_s, "theta": model.theta}
    worst = max(float(np.max(np.asarray(v))) for v in rates.values())
    if worst * dt > 1.0:
        name = max(rates, key=lambda k: float(np.max(np.asarray(rates[k]))))
        raise ValueError(f"invalid field 'dt': the fastest phase ({name} = {worst:.4g}/s) needs dt <= "
                         f"{1.0 / worst:.4g} s so that its per-step probability rate x dt stays <= 1, got dt = {dt}")


def arrival_means(n: int, lam, schedule, t0, t1, dt):
    """Expected class arrivals in the step [t0, t1) of length ``dt`` (in ``lam``'s dtype): n lam dt at
    constant rate, n lam (F(t1) - F(t0)) under a schedule of S > 1 pieces (F: the cumulative factor,
    float64). S is static: no schedule or one piece compiles the constant-rate code (factor 1: the same
    bits as no schedule)."""
    if schedule is None:
        return n * lam * dt
    if schedule.num_pieces == 1:
        return n * (lam * schedule.factors[:, 0].astype(lam.dtype)) * dt
    mass = schedule.integral(t1) - schedule.integral(t0)
    return (n * lam.astype(jnp.float64) * mass).astype(lam.dtype)


def _decode_completions(u, decodes, slow, p_slow, p_fast):
    """Decodes finishing on each GPU this step, per class, from one uniform per GPU.

    Every decode on GPU g finishes independently with probability p_c (``p_slow`` if the GPU runs at
    mu_m, else ``p_fast``; per class). The GPU's outcome is drawn by inverse CDF over: none (prob
    prod_c (1-p_c)^d_c), exactly one of class c (that times d_c p_c/(1-p_c)), and "two or more",
    taken as two of one class drawn in proportion to d_c p_c (exact up to events of probability
    O((d p)^2), under 1e-3 per GPU-step at the default step). The classes are a static Python loop:
    I is small, and XLA's cumsum over a short axis costs more than the loop."""
    num = decodes.shape[0]
    d = [decodes[c].astype(p_slow.dtype) for c in range(num)]
    p = [jnp.where(slow, p_slow[c], p_fast[c]) for c in range(num)]
    log_q = [jnp.where(slow, jnp.log1p(-p_slow[c]), jnp.log1p(-p_fast[c])) for c in range(num)]
    none = jnp.exp(sum(d[c] * log_q[c] for c in range(num)))
    k = []
    lo = none
    for c in range(num):
        hi = lo + none * d[c] * p[c] / (1.0 - p[c])
        k.append(((u >= lo) & (u < hi)).astype(_I32))
        lo = hi
    many = u >= lo  # two or more: two of a class drawn from the residual
    weight = [d[c] * p[c] for c in range(num)]
    total = sum(weight)
    resid = (u - lo) / jnp.maximum(1.0 - lo, 1e-300) * total
    acc = jnp.zeros_like(u)
    for c in range(num):
        chosen = many & (resid >= acc) & (resid < acc + weight[c]) if c < num - 1 else many & (resid >= acc)
        k[c] = jnp.minimum(k[c] + 2 * chosen.astype(_I32), decodes[c])
        acc = acc + weight[c]
    return stack_rows(k)


def _two_uniforms(key, n, dtype):
    """Two uniforms per GPU from one 64-bit word (32 bits each): a third of the random bits that
    float64 uniforms would take, which is most of a step's cost on CPU."""
    bits = jax.random.bits(key, (n,), jnp.uint64)
    scale = 2.0 ** -32
    hi = (bits >> 32).astype(jnp.float64) * scale
    lo = (bits & 0xFFFFFFFF).astype(jnp.float64) * scale
    return hi.astype(dtype), lo.astype(dtype)


def _per_class(cls, mask, num):
    """Per-class count of ``mask`` entries, ``cls`` giving each entry's class (through the bulk rules'
    formula, so that XLA merges it with theirs where they count the same jobs)."""
    return per_class(jnp.where(mask, cls, -1), num)


_TRACKED = 32  # per class, prefill completions per step whose finishing times are drawn
# Admissions per step whose random draws are made before the admission loop, in one batch: inside the
# loop each draw is a PRNG hash, a loop of its own on CPU, run once per admission for the whole batch
# (measured: the two of the slot times were 14% of a canonical GG-SP step at n = 500). Later admissions
# of a step draw theirs in a second loop. On the Sec 6.3 family at n = 500 a replica admits 5-6 per
# step on average, 16 at the 99th percentile, 27 at most (2e5 replica-steps per policy); drawing more
# ahead than are used costs hashes in every step.
_DRAWN_AHEAD = 32


def _race_uniforms(key, buffers_shape):
    """The uniforms of :func:`jaxq.policies.bulk.race` for the waiting room and the buffers, from one
    decision's key (split in two, as the View has always drawn them)."""
    k_queue, k_buffers = jax.random.split(key)
    return jax.random.uniform(k_queue, buffers_shape[1:]), jax.random.uniform(k_buffers, buffers_shape)


class _Uniforms:
    """Hands out slices of one batch of uniforms drawn per step (one PRNG call instead of a split and
    a draw per use). The count is fixed at trace time; asking for more than was drawn is a bug."""

    def __init__(self, key, size, dtype):
        self.u = jax.random.uniform(key, (size,), dtype=dtype)
        self.used = 0

    def take(self, k: int):
        if self.used + k > self.u.shape[0]:
            raise AssertionError("stepped engine: per-step uniform budget exceeded (engine bug)")
        out = self.u[self.used:self.used + k]
        self.used += k
        return out


class SteppedEngine(AbstractEngine):
    """Every GPU advances together in steps of about ``dt`` (the horizon is split into
    ceil(horizon/dt) equal steps); a recorded level is the state after the last step ending at or
    before the recording time."""

    spec: SimSpec = eqx.field(static=True)
    policy: Policy = eqx.field(static=True)
    dt: float = eqx.field(static=True, default=DEFAULT_DT)

    # -- start and clock -------------------------------------------------------------------------
    def init(self, key, params):
        spec = self.spec
        num, n = spec.num_classes, spec.num_gpus
        zeros = jnp.zeros((NUM_COUNTERS, num), _I32)
        state = SteppedState(
            t=jnp.zeros((), jnp.float64), step=jnp.zeros((), _I32),
            group=self.policy.partition.groups(params.targets, n), prefill_class=jnp.full((n,), -1, _I32),
            decodes=jnp.zeros((num, n), _I32), q_p=jnp.zeros((num,), _I32),
            q_d=jnp.zeros((self.policy.num_buffers, num), _I32), counts=zeros, integrals=jnp.zeros((6, num)),
            totals=zeros, status=jnp.zeros((), _I32))
        return tuple(jax.random.split(key)), state

    def _grid(self, params):
        num_steps = jnp.ceil(params.horizon / self.dt).astype(_I32)
        return num_steps, params.horizon / num_steps  # a whole number of steps ends exactly at the horizon

    def advance(self, keys, params, state, until):
        num_steps, step_len = self._grid(params)
        last = jnp.minimum(jnp.floor(until / step_len + 1e-9).astype(_I32), num_steps)
        return jax.lax.while_loop(lambda s: s.step < last, lambda s: self.step(keys, params, s, step_len), state)

    def finish(self, params, state):
        bad = ~jnp.isfinite(state.integrals).all()
        return eqx.tree_at(lambda s: s.status, state, state.status | jnp.where(bad, NONFINITE, 0))

    # -- what is in the system --------------------------------------------------------------------
    def levels(self, state):
        num = self.spec.num_classes
        has = state.prefill_class >= 0
        X = _per_class(state.prefill_class, has, num)
        Y = jnp.sum(state.decodes, axis=1, dtype=_I32)
        Y_pre = jnp.sum(jnp.where(has[None, :], state.decodes, 0), axis=1, dtype=_I32)
        Y_mix = jnp.sum(jnp.where((state.group == MIXED)[None, :], state.decodes, 0), axis=1, dtype=_I32)
        return jnp.stack([state.q_p, X, jnp.sum(state.q_d, axis=0), Y_pre, Y - Y_pre, Y_mix])

    def rows(self, state):
        return Rows(group=state.group, prefill_class=state.prefill_class, decodes=state.decodes.T,
                    ndec=jnp.sum(state.decodes, axis=0, dtype=_I32), weight=None)

    def _caps(self, params, state):
        ndec = jnp.sum(state.decodes, axis=0, dtype=_I32)
        free, idle = slots(params.model.B.astype(_I32), state.group, state.prefill_class, ndec)
        return free, idle, ndec

    def view(self, key, params, state, X=None, q_p=None, race_uniforms=None) -> View:
        """The View of the state now (``X``, ``q_p``: the aggregates a decision should see instead).
        Rooms are counts: their head times are a race from ``key`` (see the module docstring), or from
        ``race_uniforms`` = :func:`_race_uniforms` (key), drawn beforehand."""
        free, idle, _ = self._caps(params, state)
        X = _per_class(state.prefill_class, state.prefill_class >= 0, self.spec.num_classes) if X is None else X
        q_p = state.q_p if q_p is None else q_p
        u_queue, u_buffers = _race_uniforms(key, state.q_d.shape) if race_uniforms is None else race_uniforms
        return View(n=self.spec.num_gpus, B=params.model.B, group=state.group, prefill_class=state.prefill_class,
                    decodes=state.decodes.T, free_decode=free, idle_prefill=idle, X=X, q_p=q_p,
                    queue_head=race_from(u_queue, q_p), q_d=state.q_d, buffer_head=race_from(u_buffers, state.q_d))

    # -- decisions in bulk --------------------------------------------------------------------------
    def apply(self, state, bulk: Bulk, post):
        """Start a bulk decision's decodes, move its buffer counts, count its lost jobs."""
        state = eqx.tree_at(lambda s: (s.decodes, s.q_d), state, (state.decodes + bulk.decodes, state.q_d + bulk.buffers))
        state = count(state, DECODE_STARTED, jnp.sum(bulk.decodes, axis=1, dtype=_I32), post)
        state = count(state, LOST, bulk.lost, post)
        return eqx.tree_at(lambda s: s.status, state, state.status | jnp.where(jnp.any(bulk.lost > 0), OVERFLOW, 0))

    def admit(self, key, params, state, post, done_cls, finished, idle_at_start, X0):
        """Fill idle prefill slots: one ``gate`` call per admission, on per-class aggregates, in the
        order the slots freed within the step; then the admission places the step's prefills.

        Slots idle since the step's start come first; the slots freed during it follow at the order
        statistics of uniform times, and each decision sees as still running the prefills
        (``done_cls`` of them per class) that had not yet finished by then (their finishing times are
        uniform in the step, drawn once). Deciding all slots as if every completion came first would
        let a class whose short prefills finish often take slots that freed before its completion did
        (an O(dt) bias measured on GI-WSP)."""
        num, n = self.spec.num_classes, self.spec.num_gpus
        admission = self.policy.admission
        _, idle, _ = self._caps(params, state)
        slots_now = jnp.sum(idle, dtype=_I32)
        freed = jnp.maximum(slots_now - idle_at_start, 0)
        dtype = jnp.dtype(self.spec.dtype)

        # the finishing times of this step's prefill completions: uniform, drawn once (so "still running
        # at t" is consistent across the decisions); beyond _TRACKED per class, in expectation
        taus = jax.random.uniform(jax.random.fold_in(key, 2**22), (num, _TRACKED), dtype=dtype)
        tracked = jnp.arange(_TRACKED)[None, :] < done_cls[:, None]

        def running(t):
            extra = jnp.maximum(done_cls - _TRACKED, 0).astype(dtype) * (1.0 - t)
            return jnp.sum(tracked & (taus > t), axis=1, dtype=_I32) + jnp.round(extra).astype(_I32)

        # A slot that a prefill's completion frees (its GPU can start a prefill now) frees at that
        # completion's time: drawing slot times independently of the completions would let a decision
        # still count as running the very prefill whose completion freed its slot, and so under-admit
        # the class whose prefills finish most often (measured: x_0 35% under the exact engine's on an
        # SLI-planned GG-SP). Slots freed otherwise (decode completions on shared GPUs, completions
        # beyond the tracked ones) get uniform order statistics.
        freeing = _per_class(finished, idle & (finished >= 0), num)
        from_completion = jnp.arange(_TRACKED)[None, :] < jnp.minimum(freeing, done_cls)[:, None]
        completion_times = jnp.where(from_completion, taus, jnp.inf).ravel()
        from_completions = jnp.sum(from_completion, dtype=_I32)
        slot_index = jnp.arange(completion_times.shape[0], dtype=_I32)

        def next_completion(last):
            """The completion time after ``last`` = (time, index) in ascending (time, index) order: the
            loop takes them in turn, which gives jnp.sort's order without a sort (XLA:CPU's sort of
            these 64 entries cost more than a tenth of a step)."""
            last_t, last_i = last
            after = (completion_times > last_t) | ((completion_times == last_t) & (slot_index > last_i))
            t = jnp.min(jnp.where(after, completion_times, jnp.inf))
            return t, jnp.min(jnp.where(after & (completion_times == t), slot_index, completion_times.shape[0]))

        def draws(k):
            """The random inputs of admission k: its slot time's uniform, the race of its view, the
            gate's key (each from its own fold of ``key``, as drawn one by one)."""
            return (jax.random.uniform(jax.random.fold_in(key, k + 2**21), dtype=dtype),
                    _race_uniforms(jax.random.fold_in(key, k), state.q_d.shape), jax.random.fold_in(key, k + 2**20))

        ahead = jax.vmap(draws)(jnp.arange(_DRAWN_AHEAD, dtype=_I32))

        def advance(k, t, last, drawn_k):
            """Time of slot k: 0 for the slots idle since the start, then the slots freed during the
            step in the order they freed (``last``: the completion the previous slot took)."""
            u = drawn_k[0]
            j = k - idle_at_start
            remaining = jnp.maximum(freed - j, 1).astype(dtype)
            drawn = 1.0 - (1.0 - t) * u ** (1.0 / remaining)
            takes = (j >= 0) & (j < from_completions)
            taken = next_completion(last)
            last = (jnp.where(takes, taken[0], last[0]), jnp.where(takes, taken[1], last[1]))
            t = jnp.where(j < 0, t, jnp.where(takes, jnp.maximum(taken[0], t), drawn))
            return t, last

        def pick(X, q_p, t, drawn_k):
            v = self.view(None, params, state, X=X + running(t), q_p=q_p, race_uniforms=drawn_k[1])
            return admission.gate(drawn_k[2], v, params.targets)

        # the carry holds the gate's next choice, so that each admission calls the gate once (the loop
        # condition only reads it)
        def cond(carry):
            _, q_p, _, k, _, _, c, _ = carry
            return (k < slots_now) & (c >= 0) & (q_p[jnp.maximum(c, 0)] > 0)

        def body(carry, drawn):
            X, q_p, adm, k, t, last, c, order = carry
            one = (jnp.arange(num) == c).astype(_I32)
            if order is not None:
                order = order.at[k].set(c)
            X, q_p, k = X + one, q_p - one, k + 1
            drawn_k = drawn(k)
            t, last = advance(k, t, last, drawn_k)
            return X, q_p, adm + one, k, t, last, pick(X, q_p, t, drawn_k), order

        zeros = jnp.zeros((num,), _I32)
        first = jax.tree_util.tree_map(lambda a: a[0], ahead)
        t0, last0 = advance(jnp.int32(0), jnp.zeros((), dtype), (jnp.asarray(-1.0, dtype), jnp.int32(-1)), first)
        c0 = pick(X0, state.q_p, t0, first)
        # the gate's order, only for a placement that reads it: under vmap the loop copies its whole
        # carry every iteration, and an (n,) record would make each admission O(n)
        by_count = admission.places_by_count
        init = (X0, state.q_p, zeros, jnp.int32(0), t0, last0, c0, None if by_count else jnp.full((n,), -1, _I32))
        # the first _DRAWN_AHEAD admissions read the draws made ahead; any later ones draw their own
        early = jax.lax.while_loop(
            lambda c: cond(c) & (c[3] + 1 < _DRAWN_AHEAD),
            lambda c: body(c, lambda k: jax.tree_util.tree_map(lambda a: a[k], ahead)), init)
        _, q_p, adm, _, _, _, _, order = jax.lax.while_loop(cond, lambda c: body(c, draws), early)
        k_place, view = jax.random.fold_in(key, 2**23), self.view(key, params, state)
        if by_count:
            got = admission.place_counts(k_place, view, params.targets, adm)
        else:
            got = admission.place_bulk(k_place, view, params.targets, order)
        # an idle GPU has one prefill slot: at most one class gets it
        prefill_class = state.prefill_class
        for c in range(num - 1, -1, -1):
            prefill_class = jnp.where(got[c] > 0, c, prefill_class)
        state = eqx.tree_at(lambda s: (s.prefill_class, s.q_p), state, (prefill_class, q_p))
        return count(state, ADMITTED, adm, post), adm

    # -- one step -----------------------------------------------------------------------------------
    def step(self, keys, params, state, dt):
        spec, pol = self.spec, self.policy
        num, n, nb = spec.num_classes, spec.num_gpus, pol.num_buffers
        arrival_key, service_key = keys
        key = jax.random.fold_in(service_key, state.step)
        k_gpu, k_misc, k_decide = jax.random.split(key, 3)
        dtype = jnp.dtype(spec.dtype)
        m = jax.tree_util.tree_map(lambda a: a.astype(dtype), params.model)
        dt_ = jnp.asarray(dt, dtype)

        t0 = state.t
        t1 = (state.step + 1).astype(jnp.float64) * dt
        post = 0.5 * (t0 + t1) >= params.warmup
        w = jnp.maximum(jnp.minimum(t1, params.horizon) - jnp.maximum(t0, params.warmup), 0.0)
        rand = _Uniforms(k_misc, 3 * num + num * nb + 1, dtype)
        u_arrive = jax.random.uniform(jax.random.fold_in(arrival_key, state.step), (num,), dtype=dtype)
        arrivals = count_draw(u_arrive, arrival_means(n, m.lam, params.model.arrivals, t0, t1, dt_))
        # levels are constant through the step, except that this step's arrivals wait from their
        # arrival (uniform in the step) to its end: half a step each on average
        levels = self.levels(state)
        integrals = state.integrals + w * levels.astype(jnp.float64)
        integrals = integrals.at[INT_QP].add(0.5 * w * arrivals)
        state = eqx.tree_at(lambda s: (s.integrals, s.t), state, (integrals, t1))
        idle_at_start = jnp.sum(self._caps(params, state)[1], dtype=_I32)

        # -- draws from the state at the start of the step ----------------------------------------
        ab_p = count_draw(rand.take(num), state.q_p * m.theta * dt_, state.q_p)
        ab_d = count_draw(rand.take(num * nb).reshape(state.q_d.shape), state.q_d * (m.theta * dt_)[None, :], state.q_d)
        u_pre, u_dec = _two_uniforms(k_gpu, n, dtype)
        has = state.prefill_class >= 0
        pc = jnp.maximum(state.prefill_class, 0)
        prefill_done = has & (u_pre < m.mu_p[pc] * dt_)
        slow = runs_slow(spec.convention, state.group, state.prefill_class)
        dec_done = _decode_completions(u_dec, state.decodes, slow, m.mu_m * dt_, m.mu_s * dt_)

        # -- apply them ---------------------------------------------------------------------------
        done_cls = _per_class(state.prefill_class, prefill_done, num)
        finished = jnp.where(prefill_done, state.prefill_class, -1)  # the jobs the router places
        X_run = levels[1].astype(_I32) - done_cls  # prefills still running after the completions
        # an arrival waits from its (uniform) arrival time to the step's end: it abandons on the way
        # with probability theta dt/2 on average
        ab_new = count_draw(rand.take(num), 0.5 * arrivals * m.theta * dt_, arrivals)
        queued = state.q_p - ab_p + arrivals - ab_new
        state = eqx.tree_at(lambda s: (s.prefill_class, s.decodes, s.q_d, s.q_p), state,
                            (jnp.where(prefill_done, -1, state.prefill_class), state.decodes - dec_done,
                             state.q_d - ab_d, queued))
        for row, v in ((ARRIVED, arrivals), (ABANDON_PREFILL, ab_p + ab_new), (ABANDON_DECODE, jnp.sum(ab_d, axis=0, dtype=_I32)),
                       (PREFILL_DONE, done_cls), (DECODE_DONE, jnp.sum(dec_done, axis=1, dtype=_I32))):
            state = count(state, row, v, post)

        # -- decisions at the end of the step, in the policy's order ------------------------------
        k_route, k_drain, k_admit, k_view = jax.random.split(k_decide, 4)
        adm = jnp.zeros((num,), _I32)
        for op in pol.order:
            if op == ROUTE:
                bulk = pol.router.route_bulk(k_route, self.view(jax.random.fold_in(k_view, 0), params, state),
                                             params.targets, finished)
                state = self.apply(state, bulk, post)
            elif op == DRAIN:
                bulk = pol.router.drain_bulk(k_drain, self.view(jax.random.fold_in(k_view, 1), params, state),
                                             params.targets)
                state = self.apply(state, bulk, post)
            elif op == ADMIT:
                state, adm = self.admit(k_admit, params, state, post, done_cls, finished, idle_at_start, X_run)
        # Who waited, as the CTMC would count it. FCFS within class: admissions take older jobs first,
        # so this step's arrivals admitted now are adm - older. Those that took a slot already idle at
        # the step's start would not have waited; one that took a slot freed during the step waited iff
        # it arrived before the slot freed (both times uniform in the step: probability 1/2).
        older = queued - (arrivals - ab_new)
        new_in = jnp.clip(adm - older, 0, arrivals - ab_new)
        immediate = allocate(rand.take(1)[0], new_in, jnp.minimum(jnp.sum(new_in), idle_at_start))
        rest = new_in - immediate
        lucky = count_draw(rand.take(num), 0.5 * rest.astype(dtype), rest)
        state = count(state, WAITED, arrivals - immediate - lucky, post)

        _, _, ndec = self._caps(params, state)
        ok = (capacity_flags(params, self.view(k_view, params, state), ndec) & jnp.all(state.decodes >= 0)
              & jnp.all(state.q_p >= 0) & jnp.all(state.q_d >= 0))
        bad = jnp.where(ok, 0, CAPACITY_VIOLATED)
        return eqx.tree_at(lambda s: (s.step, s.status), state, (state.step + 1, state.status | bad))
