"""The simulation core: one abstract engine, one event loop, one set of decisions.

Every engine is an :class:`AbstractEngine`: it says how a replica starts (``init``), how time advances
to a given instant (``advance``), what is in the system (``levels``) and what a finished run reports
(``finish``); the final :meth:`AbstractEngine.run` drives it to the horizon, stopping at recording
times. Two kinds exist:

* :class:`EventEngine` (final) advances event by event, exactly. What differs between the exact
  engines is how they keep the GPUs and how they choose a completion, an :class:`AbstractCluster`
  passed in: one row per GPU (:mod:`jaxq.sim.exact`), one row per GPU configuration
  (:mod:`jaxq.sim.population`), or per-job remaining work (:mod:`jaxq.sim.general`). Arrivals,
  abandonment, waiting rooms, counters, time integrals, status bits and the policy's decisions are
  written once, here.
* :class:`jaxq.sim.stepped.SteppedEngine` advances all GPUs together in steps of ``dt``.

Both ask the policy the same questions (:mod:`jaxq.policies.protocol`), the event engine one job at a
time, the stepped engine in bulk, in the order the policy gives (``policy.order``). No engine knows
which policy it runs.

Exactness of the event engine. Arrivals run on their own stream (each class's next arrival time is
drawn from ``fold_in(arrival_key, class, index)``): the superposition is the same CTMC, and two
policies on one key see the same arrivals (common random numbers). Every other event comes from the
cluster (:meth:`AbstractCluster.next_event`); stopping at the horizon (or at a recording time) and
redrawing afterwards is exact by memorylessness. Simulated time is float64. Under a rate schedule
(``params.model.arrivals``) the same Exp(1) draw is mapped through the cumulative intensity
(:func:`next_arrival_time`), which is exact for a nonstationary Poisson process.

Decisions. After each event the policy's decisions are applied at once, in its order: a finished
prefill's job is routed, buffer heads take freed decode slots, idle prefill slots admit (the gate is
asked again after each admission, so a gate that held slots back can release several). One event
frees at most one decode slot, so one pass over the buffers suffices; a replica for which an action
is still possible afterwards is flagged ``DECISIONS_INCOMPLETE`` (and every step checks capacity,
flagging ``CAPACITY_VIOLATED``) rather than trusted. Updates are masked rather than branched: under
``vmap`` a ``lax.cond`` runs both sides anyway; the rare ones that cost O(room) or O(n) (an
abandonment's shift of a room, a drain of a buffer) branch once on the whole batch instead
(:func:`jaxq.sim.lockstep.skip_unless`).
"""


import abc

import equinox as eqx
from equinox import AbstractVar
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PyTree

from ..policies.choice import weighted_search
from ..policies.protocol import ADMIT, DRAIN, ROUTE, Policy
from ..policies.view import ANY, MIXED, SOLO, View
from .lockstep import lockstep_while, skip_unless
from .rooms import room_head_job, room_heads, room_pop, room_push, room_remove, room_width
from .state import (
    ABANDON_DECODE,
    ABANDON_PREFILL,
    ADMITTED,
    ARRIVED,
    CAPACITY_VIOLATED,
    DECISIONS_INCOMPLETE,
    DECODE_DONE,
    DECODE_STARTED,
    LOST,
    MAX_STEPS,
    NONFINITE,
    NUM_COUNTERS,
    OVERFLOW,
    PREFILL_DONE,
    WAITED,
    SimParams,
    SimSpec,
)

_I32 = jnp.int32
SLOW, FAST = 0, 1  # rows of EventState.Y_speed: decodes at mu_m, at mu_s
# kinds of a state-dependent event (Event.kind)
ABANDON_QUEUE, ABANDON_BUFFER, PREFILL, DECODE = range(4)


# -- the abstract engine ------------------------------------------------------------------------

class Rows(eqx.Module):
    """The cluster's rows as a policy sees them: one per GPU, or one per configuration with
    ``weight`` GPUs in it."""

    group: Int[Array, " rows"]
    prefill_class: Int[Array, " rows"]
    decodes: Int[Array, "rows I"]
    ndec: Int[Array, " rows"]
    weight: Int[Array, " rows"] | None



class AbstractEngine(eqx.Module):
    """An engine for one replica: ``spec`` and ``policy`` are static; batch it from outside with
    ``vmap`` over keys (:mod:`jaxq.sim.batch`)."""

    spec: AbstractVar[SimSpec]
    policy: AbstractVar[Policy]

    @abc.abstractmethod
    def init(self, key, params: SimParams):
        """(keys, state) of a replica starting from an empty cluster. Consumes ``key``."""

    @abc.abstractmethod
    def advance(self, keys, params: SimParams, state, until):
        """The state at time ``until`` (or where the engine had to stop short, flagged in its status)."""

    @abc.abstractmethod
    def levels(self, state) -> Int[Array, "6 I"]:
        """(Q_p, X, Q_d, Y_m, Y_s, Y on G_mix) per class now (rows as state.INTEGRAL_NAMES)."""

    @abc.abstractmethod
    def rows(self, state) -> Rows:
        """The GPUs now, as policies see them: one row per GPU, or per configuration with its count."""

    @abc.abstractmethod
    def finish(self, params: SimParams, state):
        """The final state, with the status bits only the end of a run can set."""

    def run(self, key, params: SimParams, record_times=None):
        """Simulate one replica from an empty system to ``params.horizon``. Consumes ``key``.

        Returns the final state, and if ``record_times`` (a static tuple of increasing times) is given,
        the levels per class at those times, shape (len(record_times), 6, I)."""
        keys, state = self.init(key, params)
        if record_times is None:
            state = self.advance(keys, params, state, params.horizon)
            trajectory = None
        else:
            def seg(state, t_rec):
                state = self.advance(keys, params, state, t_rec)
                return state, self.levels(state)

            state, trajectory = jax.lax.scan(seg, state, jnp.asarray(record_times, jnp.float64))
            state = self.advance(keys, params, state, params.horizon)
        return self.finish(params, state), trajectory


def count(state, row, per_class, post):
    """Add ``per_class`` (I,) to counter ``row``: to the totals always, to the counts after the warm-up."""
    per_class = per_class.astype(_I32)  # sums of int32 are int64 under x64
    return eqx.tree_at(lambda s: (s.counts, s.totals), state,
                       (state.counts.at[row].add(jnp.where(post, per_class, 0)), state.totals.at[row].add(per_class)))


def capacity_flags(params: SimParams, view: View, ndec):
    """Every GPU (row) within its slots, prefills only where its group allows (the check behind
    ``CAPACITY_VIOLATED``); ``ndec``: decode streams per row. Rows without GPUs (empty configurations)
    are not checked: their attributes may exceed a batch size below the one the rows were built for."""
    B = params.model.B.astype(_I32)
    has_prefill = view.prefill_class >= 0
    there = True if view.weight is None else view.weight > 0
    ok = jnp.all(view.free_decode >= 0) & jnp.all(~there | (ndec + has_prefill <= B))
    return ok & ~jnp.any(there & has_prefill & (view.group == SOLO))


def slots(B, group, prefill_class, ndec):
    """(free decode slots, idle prefill slot) of GPUs by group: G_mix reserves one slot for a prefill
    and runs at most B - 1 decodes, G_solo never prefills and runs at most B, an "any" GPU at most B
    jobs of which at most one a prefill (MODEL.md §5.1, §7.3)."""
    has_prefill = prefill_class >= 0
    cap = jnp.where(group == MIXED, B - 1, jnp.where(group == SOLO, B, B - has_prefill.astype(_I32)))
    idle = jnp.where(group == MIXED, ~has_prefill, (group == ANY) & ~has_prefill & (ndec < B))
    return cap - ndec, idle


# -- the event engine -------------------------------------------------------------------------------

class EventState(eqx.Module):
    # dynamics
    t: Float[Array, ""]
    step: Int[Array, ""]
    gpus: PyTree  # the cluster's own state: per GPU, per configuration, per job
    # aggregates kept in step with the GPUs by the cluster's functions that change a GPU
    X: Int[Array, " I"]  # running prefills per class
    Y_speed: Int[Array, "2 I"]  # decodes running at mu_m (row SLOW) and at mu_s (row FAST)
    Y_pre: Int[Array, " I"]  # decodes on GPUs running a prefill (the paper's Y_m)
    Y_mixgroup: Int[Array, " I"]  # decodes on G_mix GPUs
    # waiting rooms (jaxq.sim.rooms): rings of entry times, the oldest at cell *_start, q_* live cells
    queue: Float[Array, "I K"]  # entry times of waiting prefill jobs
    queue_start: Int[Array, " I"]
    q_p: Int[Array, " I"]  # waiting prefill jobs per class
    # entry times of waiting decodes, buffer b's class-c room in row b x I + c: stored flat, because
    # XLA gave an (NB, I, K) family with NB = 1 another layout than the step's (I, K) view of it and
    # copied the whole family twice per event (the copies cost as much as the rest of the step at the
    # default room of 3,189 cells)
    buffers: Float[Array, "NBI K"]
    buffer_start: Int[Array, "NB I"]
    q_d: Int[Array, "NB I"]
    next_arrival: Float[Array, " I"]  # absolute time of each class's next arrival (own random stream)
    # accumulators
    counts: Int[Array, "C I"]  # after the warm-up (rows: COUNTER_NAMES)
    integrals: Float[Array, "6 I"]  # time integrals after the warm-up (rows: INTEGRAL_NAMES)
    totals: Int[Array, "C I"]  # the same counters over the whole run, for conservation checks
    # status
    status: Int[Array, ""]
    # a trace replay's job index in each waiting-room cell (jaxq.sim.rooms, "Job indices"); else None
    queue_job: Int[Array, "I K"] | None = None
    buffers_job: Int[Array, "NBI K"] | None = None


def _job_kw(job, **more):
    """The keywords a cluster's start_prefill/add_decode takes in a replay: the job's index (and, for
    add_decode, ``first``: its first token's time); none without a replay."""
    return {} if job is None else {"job": job, **more}


class Event(eqx.Module):
    """The next state-dependent event (an arrival is the core's): its absolute time (+inf: none), kind
    (ABANDON_QUEUE, ABANDON_BUFFER, PREFILL or DECODE completion), class, buffer (abandonment), position
    in the room (abandonment), row (completion) and decode slot (general engine)."""

    t: Float[Array, ""]
    kind: Int[Array, ""]
    job_class: Int[Array, ""]
    buffer: Int[Array, ""]
    pos: Int[Array, ""]
    row: Int[Array, ""]
    slot: Int[Array, ""]


class AbstractCluster(eqx.Module):
    """How an event engine keeps the GPUs and chooses the next completion. Its functions that change a
    GPU keep the aggregates X, Y_speed, Y_pre, Y_mixgroup of :class:`EventState` in step."""

    spec: AbstractVar[SimSpec]

    @abc.abstractmethod
    def init(self, params: SimParams, groups, service_key) -> PyTree:
        """The empty cluster's own state, given each GPU's group. May derive keys from ``service_key``."""

    @abc.abstractmethod
    def rows(self, state: EventState) -> Rows:
        """The rows policies see."""

    @abc.abstractmethod
    def start_prefill(self, state: EventState, row, cls, do) -> EventState:
        """A class-``cls`` prefill starts on ``row`` (where ``do``)."""

    @abc.abstractmethod
    def finish_prefill(self, state: EventState, row, do):
        """``row``'s prefill finishes (where ``do``): (state, its class, the row of that GPU now)."""

    @abc.abstractmethod
    def add_decode(self, state: EventState, row, cls, do) -> EventState:
        """A class-``cls`` decode joins ``row`` (where ``do``)."""

    @abc.abstractmethod
    def remove_decode(self, state: EventState, row, cls, slot, do) -> EventState:
        """A class-``cls`` decode in ``slot`` of ``row`` finishes (where ``do``)."""

    @abc.abstractmethod
    def next_event(self, key, model, state: EventState) -> Event:
        """The next abandonment or completion (``model``: the ModelParams in the spec's dtype)."""

    @abc.abstractmethod
    def consistent(self, state: EventState):
        """The cluster's own invariants (beyond the slots of each row)."""

    @abc.abstractmethod
    def job_table(self):
        """A trace replay's jobs (:class:`jaxq.sim.general.JobTable`: per class, each job's arrival time
        and token counts), or None: arrivals then come from the random streams. A cluster that returns
        a table takes ``job=`` in ``start_prefill`` and ``add_decode`` and answers :meth:`running_job`."""

    @abc.abstractmethod
    def running_job(self, state: EventState, row):
        """The job index of ``row``'s running prefill (replay only)."""


def weighted_index(u, weights):
    """Index drawn with probability proportional to ``weights`` (>= 0) from one uniform ``u``."""
    idx = weighted_search(weights, u * jnp.sum(weights))
    # u * total can round up to total itself: never let that select a trailing zero weight
    last_positive = jnp.max(jnp.where(weights > 0, jnp.arange(weights.shape[0], dtype=_I32), 0))
    return jnp.minimum(idx, last_positive).astype(_I32)


def gillespie_event(key, model, state: EventState, completion_weights, dtype) -> Event:
    """The next event of the exponential model (MODEL.md §2.1): its time from the total rate of
    abandonments and completions, its kind and class by their shares, then an entry of the room
    (abandonment: uniformly, all having the same patience rate) or a row by
    ``completion_weights(kind, cls)`` (its share of the chosen completion's rate: kind 2 a prefill,
    3 a decode at mu_m, 4 one at mu_s). Four uniforms from ``key``."""
    num, nb = state.q_p.shape[0], state.q_d.shape[0]
    m = model
    u = jax.random.uniform(key, (4,), dtype=dtype)
    # rates by kind and class: [abandon prefill | abandon buffers | prefill done | decode at mu_m | at mu_s]
    rates = jnp.concatenate([m.theta * state.q_p, (m.theta[None, :] * state.q_d).ravel(), m.mu_p * state.X,
                             m.mu_m * state.Y_speed[SLOW], m.mu_s * state.Y_speed[FAST]])
    total = jnp.sum(rates)
    dt = (-jnp.log1p(-u[0]) / total).astype(jnp.float64)  # time itself stays float64
    e = weighted_index(u[1], rates)
    kind = (e >= num).astype(_I32) + (e >= num + nb * num) + (e >= (2 + nb) * num) + (e >= (3 + nb) * num)
    c = jnp.where(kind == 1, (e - num) % num, e % num).astype(_I32)
    b = jnp.where(kind == 1, (e - num) // num, 0).astype(_I32)
    room_count = jnp.where(kind == 0, state.q_p[c], state.q_d[b, c] if nb else 0)
    pos = jnp.minimum(jnp.floor(u[2] * room_count), room_count - 1).astype(_I32)
    g = weighted_index(u[3], completion_weights(kind, c))
    return Event(t=state.t + dt, kind=jnp.minimum(kind, DECODE), job_class=c, buffer=b, pos=pos, row=g,
                 slot=jnp.zeros((), _I32))


# One step's randomness, by role: each role has its own key, into which a step folds its index. One
# hash per role, not one batched hash for all: XLA then drops the keys a policy never uses (an FCFS gate
# draws nothing), and on CPU a threefry call's cost grows with its width (it runs as a rolled loop that
# copies its words each round), so unused words are not free (docs/simulation.md, "What a step costs").
STEP_ROLES = ("event", "gate", "gpu", "route", "drain", "check")


def arrival_keys(arrival_key, num_classes: int):
    """Each class's arrival stream: its k-th gap is drawn from ``fold_in(arrival_keys[c], k)``."""
    return jax.vmap(lambda c: jax.random.fold_in(arrival_key, c))(jnp.arange(num_classes))


def next_arrival_time(n: int, lam, schedule, cls, t, gap):
    """The next class-``cls`` arrival after ``t`` from its Exp(1) variate ``gap`` (float64 time):
    ``t + gap / (n lam)`` at constant rate; under a :class:`~jaxq.model.params.RateSchedule` of S > 1
    pieces F^{-1}(F(t) + gap / (n lam)) with F the cumulative factor (the inverse of the cumulative
    intensity: exact for a nonstationary Poisson process; +inf when the rate is 0 from some time on and
    the draw reaches beyond). S is static: no schedule or one piece compiles the constant-rate code
    (a one-piece factor f scales lam; f = 1 is bit-identical to no schedule)."""
    if schedule is None:
        return t + (gap / (n * lam[cls])).astype(jnp.float64)
    if schedule.num_pieces == 1:
        return t + (gap / (n * (lam[cls] * schedule.factors[cls, 0].astype(lam.dtype)))).astype(jnp.float64)
    y = schedule.integral(t, cls) + (gap / (n * lam[cls])).astype(jnp.float64)
    return jnp.maximum(schedule.invert(cls, y), t)


def step_keys(service_keys, step):
    """The step's key for each role, in STEP_ROLES order."""
    return [jax.random.fold_in(service_keys[j], step) for j in range(len(STEP_ROLES))]


def _bump(counts, row, cls, do):
    return counts.at[row, jnp.maximum(cls, 0)].add((do & (cls >= 0)).astype(_I32))


def count_one(state, row, cls, post, do):
    """Count one class-``cls`` event in counter ``row`` where ``do`` (cls < 0: nothing)."""
    return eqx.tree_at(lambda s: (s.counts, s.totals), state,
                       (_bump(state.counts, row, cls, do & post), _bump(state.totals, row, cls, do)))


class EventEngine(AbstractEngine):
    """The exact event-by-event engine over a given cluster (see the module docstring)."""

    spec: SimSpec = eqx.field(static=True)
    policy: Policy = eqx.field(static=True)
    cluster: AbstractCluster

    # -- start -------------------------------------------------------------------------------------
    def init(self, key, params):
        spec = self.spec
        jobs = self.cluster.job_table()
        num, n, nb = spec.num_classes, spec.num_gpus, self.policy.num_buffers
        K = room_width(spec, jobs=jobs is not None)
        arrival_key, service_key = jax.random.split(key)
        class_keys = arrival_keys(arrival_key, num)
        if jobs is None:
            first = jax.vmap(lambda k: jax.random.exponential(jax.random.fold_in(k, 0)))(class_keys)
            t0 = jnp.zeros((), jnp.float64)  # each class's first arrival, as every later one (from t = 0)
            first_arrivals = jax.vmap(
                lambda c, e: next_arrival_time(n, params.model.lam, params.model.arrivals, c, t0, e))(jnp.arange(num), first)
        else:
            first_arrivals = jobs.arrival[:, 0]
        zeros = jnp.zeros((NUM_COUNTERS, num), _I32)
        groups = self.policy.partition.groups(params.targets, n)
        state = EventState(
            t=jnp.zeros((), jnp.float64), step=jnp.zeros((), _I32),
            gpus=self.cluster.init(params, groups, service_key),
            X=jnp.zeros((num,), _I32), Y_speed=jnp.zeros((2, num), _I32), Y_pre=jnp.zeros((num,), _I32),
            Y_mixgroup=jnp.zeros((num,), _I32),
            queue=jnp.full((num, K), jnp.inf), queue_start=jnp.zeros((num,), _I32), q_p=jnp.zeros((num,), _I32),
            buffers=jnp.full((nb * num, K), jnp.inf), buffer_start=jnp.zeros((nb, num), _I32),
            q_d=jnp.zeros((nb, num), _I32),
            next_arrival=first_arrivals, counts=zeros, integrals=jnp.zeros((6, num)),
            totals=zeros, status=jnp.zeros((), _I32),
            queue_job=None if jobs is None else jnp.full((num, K), -1, _I32),
            buffers_job=None if jobs is None else jnp.full((nb * num, K), -1, _I32),
        )
        return (class_keys, jax.random.split(service_key, len(STEP_ROLES))), state

    # -- what policies see ---------------------------------------------------------------------------
    def view(self, params, state) -> View:
        """The View policies decide on; O(rows) elementwise from the maintained aggregates."""
        return self._view(params, state, self.cluster.rows(state))

    def _view(self, params, state, r: Rows) -> View:
        free, idle = slots(params.model.B.astype(_I32), r.group, r.prefill_class, r.ndec)
        if r.weight is not None:  # rows are configurations: only those with GPUs in them exist
            there = r.weight > 0
            free, idle = jnp.where(there, free, 0), idle & there
        return View(n=self.spec.num_gpus, B=params.model.B, group=r.group, prefill_class=r.prefill_class,
                    decodes=r.decodes, free_decode=free, idle_prefill=idle, X=state.X, q_p=state.q_p,
                    queue_head=room_heads(state, "queue"), q_d=state.q_d, buffer_head=room_heads(state, "buffers"),
                    weight=r.weight)

    def levels(self, state):
        return jnp.stack([state.q_p, state.X, jnp.sum(state.q_d, axis=0), state.Y_pre,
                          jnp.sum(state.Y_speed, axis=0) - state.Y_pre, state.Y_mixgroup])

    def rows(self, state):
        return self.cluster.rows(state)

    def buffer_row(self, b, cls):
        """The row of decode buffer ``b``'s class-``cls`` room in the buffers' family (-1 for no class)."""
        return jnp.where(cls >= 0, b * self.spec.num_classes + cls, -1)

    # -- decisions -------------------------------------------------------------------------------------
    def add_decode(self, state, row, cls, post, do, job=None, first=None):
        do = do & (row >= 0) & (cls >= 0)
        state = self.cluster.add_decode(state, row, cls, do, **_job_kw(job, first=first))
        return count_one(state, DECODE_STARTED, cls, post, do)

    def admit_one(self, k_gate, k_gpu, params, state, post, live):
        adm = self.policy.admission
        v = self.view(params, state)
        cls = adm.gate(k_gate, v, params.targets)
        gpu = adm.prefill_gpu(k_gpu, v, params.targets, cls)
        do = live & (cls >= 0) & (gpu >= 0) & (v.q_p[jnp.maximum(cls, 0)] > 0)
        g = jnp.maximum(gpu, 0)
        do = do & v.idle_prefill[g]
        job = None if state.queue_job is None else room_head_job(state, "queue", cls)
        state = room_pop(state, "queue", cls, do)
        state = self.cluster.start_prefill(state, g, cls, do, **_job_kw(job))
        return count_one(state, ADMITTED, cls, post, do)

    def admit(self, k_gate, k_gpu, params, state, post, live):
        """Admit while an idle prefill slot and a gated class remain (at most n times), the k-th
        admission on the keys folded with k. The paper's rules never admit twice at one event; a gate
        that holds slots back (the hold-back option) can release several at once."""

        def can(carry):
            state, k = carry
            v = self.view(params, state)
            return live & (k < self.spec.num_gpus) & jnp.any(v.idle_prefill) & (
                self.policy.admission.gate(jax.random.fold_in(k_gate, k), v, params.targets) >= 0)

        def body(carry):
            state, k = carry
            k_gate_k, k_gpu_k = jax.vmap(jax.random.fold_in, in_axes=(0, None))(jnp.stack([k_gate, k_gpu]), k)
            return self.admit_one(k_gate_k, k_gpu_k, params, state, post, live), k + 1

        state = self.admit_one(k_gate, k_gpu, params, state, post, live)
        state, _ = jax.lax.while_loop(can, body, (state, jnp.int32(1)))
        return state

    def place_pending(self, key, params, state, pending_cls, pending_row, post, pending_job=None):
        """Route the job whose prefill just finished on ``pending_row`` (where ``pending_cls`` >= 0;
        ``pending_job``: its index in a replay)."""
        do = pending_cls >= 0
        v = self.view(params, state)
        gpu, buf = self.policy.router.route(key, v, params.targets, pending_cls, jnp.int32(-1), pending_row)
        state = self.add_decode(state, gpu, pending_cls, post, do & (gpu >= 0), job=pending_job, first=state.t)
        wait = do & (gpu < 0)
        nb = self.policy.num_buffers
        if nb:
            b = jnp.clip(buf, 0, nb - 1)
            state, lost = room_push(state, "buffers", self.buffer_row(b, pending_cls), state.t, wait, job=pending_job)
        else:  # a router without buffers must place: a job it does not is lost, and flagged
            lost = wait
        return self.lose(state, pending_cls, post, lost)

    def drain(self, key, params, state, post, live):
        """Each buffer's head takes a free decode slot if the router places it. Batched, a buffer's
        drain runs only in the steps where some replica has a job in that buffer (a drain of an empty
        buffer changes nothing: its head is no class)."""
        for b in range(self.policy.num_buffers):
            k_b = key if b == 0 else jax.random.fold_in(key, b)
            waiting = live & jnp.any(state.q_d[b] > 0)
            # (the engine travels in the branch's arguments, as in advance: a replay's tables are data)
            state = skip_unless(waiting, lambda a, s, b=b: a[0].drain_one(a[1], a[2], s, a[3], a[4], b),
                                (self, k_b, params, post, live), state)
        return state

    def drain_one(self, key, params, state, post, live, b):
        """Buffer ``b``'s head takes a free decode slot if the router places it (``b``: a Python int)."""
        router = self.policy.router
        v = self.view(params, state)
        cls = router.buffer_head(v, b)
        gpu, _ = router.route(key, v, params.targets, cls, jnp.int32(b), jnp.int32(-1))
        # (a head of an empty room takes nothing: the drain is then a no-op, which skip_unless needs)
        do = live & (cls >= 0) & (gpu >= 0) & (state.q_d[b, jnp.maximum(cls, 0)] > 0)
        row = self.buffer_row(b, cls)
        job, first = None, None
        if state.buffers_job is not None:  # a replay: the job, and its first token's time (its entry)
            job = room_head_job(state, "buffers", row)
            first = room_heads(state, "buffers")[b, jnp.maximum(cls, 0)]
        state = room_pop(state, "buffers", row, do)
        return self.add_decode(state, gpu, cls, post, do, job=job, first=first)

    def decide(self, keys, params, state, pending_cls, pending_row, post, live, pending_job=None):
        """Apply the policy's decisions after an event, in its order; ``keys`` are the step's keys for
        the roles gate, gpu, route, drain and check (STEP_ROLES[1:])."""
        k_gate, k_gpu, k_route, k_drain, k_check = keys
        pending_cls = jnp.where(live, pending_cls, -1)
        ops = {ROUTE: lambda s: self.place_pending(k_route, params, s, pending_cls, pending_row, post, pending_job),
               DRAIN: lambda s: self.drain(k_drain, params, s, post, live),
               ADMIT: lambda s: self.admit(k_gate, k_gpu, params, s, post, live)}
        for op in self.policy.order:
            state = ops[op](state)
        flags = jnp.where(self.actions_left(k_check, params, state), DECISIONS_INCOMPLETE, 0)
        flags |= jnp.where(self.capacity_ok(params, state), 0, CAPACITY_VIOLATED)
        return eqx.tree_at(lambda s: s.status, state, state.status | jnp.where(live, flags, 0))

    def actions_left(self, key, params, state):
        """Whether an admission or a buffer-to-slot move is still possible (decisions left undone)."""
        v = self.view(params, state)
        policy = self.policy
        left = jnp.any(v.idle_prefill) & (policy.admission.gate(key, v, params.targets) >= 0)
        for b in range(policy.num_buffers):
            left |= jnp.any(v.q_d[b] > 0) & policy.router.has_slot(key, v, params.targets, b)
        return left

    def capacity_ok(self, params, state):
        """Every GPU within its slots, prefills only where allowed, nothing negative."""
        r = self.cluster.rows(state)
        ok = capacity_flags(params, self._view(params, state, r), r.ndec) & self.cluster.consistent(state)
        return ok & jnp.all(state.X >= 0) & jnp.all(state.Y_speed >= 0) & jnp.all(state.q_p >= 0) & jnp.all(state.q_d >= 0)

    def lose(self, state, cls, post, lost):
        state = count_one(state, LOST, cls, post, lost)
        return eqx.tree_at(lambda s: s.status, state, state.status | jnp.where(lost, OVERFLOW, 0))

    # -- events ------------------------------------------------------------------------------------
    def arrive(self, class_keys, m, schedule, state, cls_arrival, t_arrival, post, arrive):
        """Apply an arrival of class ``cls_arrival`` (where ``arrive``) and draw that class's next one
        from its own stream: the k-th gap of class c comes from ``fold_in(class_keys[c], k)``
        (:func:`arrival_keys`), so every policy and engine on one key sees the same arrivals (common
        random numbers); ``schedule``: the rate schedule (float64) or None (:func:`next_arrival_time`).
        In a replay the class's next arrival is the next job of its table, and the job's index (its
        place in the class's arrival order) goes into the queue with it."""
        job = state.totals[ARRIVED, cls_arrival]
        state = count_one(state, ARRIVED, cls_arrival, post, arrive)
        state, lost = room_push(state, "queue", cls_arrival, state.t, arrive, job=job)
        state = self.lose(state, cls_arrival, post, lost)
        index = state.totals[ARRIVED, cls_arrival]
        jobs = self.cluster.job_table()
        if jobs is None:
            key = jax.random.fold_in(class_keys[cls_arrival], index)
            gap = jax.random.exponential(key, dtype=m.lam.dtype)
            nxt = next_arrival_time(self.spec.num_gpus, m.lam, schedule, cls_arrival, state.t, gap)
        else:  # the table's last column is +inf: no arrival after a class's last job
            nxt = jobs.arrival[cls_arrival, jnp.minimum(index, jobs.arrival.shape[1] - 1)]
        return eqx.tree_at(lambda s: s.next_arrival, state,
                           state.next_arrival.at[cls_arrival].set(jnp.where(arrive, nxt, t_arrival)))

    def integrate(self, params, state, t_new):
        lo = jnp.maximum(state.t, params.warmup)
        hi = jnp.minimum(t_new, params.horizon)
        w = jnp.maximum(hi - lo, 0.0)
        levels = self.levels(state).astype(state.integrals.dtype)
        return eqx.tree_at(lambda s: (s.integrals, s.t), state, (state.integrals + w * levels, t_new))

    def step(self, keys, params, state, seg_end):
        """One event (or a stop at ``seg_end`` when the next event lies beyond it)."""
        class_keys, service_keys = keys
        k_event, *k_decide = step_keys(service_keys, state.step)
        dtype = jnp.dtype(self.spec.dtype)
        m = jax.tree_util.tree_map(lambda a: a.astype(dtype), params.model)
        ev = self.cluster.next_event(k_event, m, state)
        cls_arrival = jnp.argmin(state.next_arrival).astype(_I32)
        t_arrival = state.next_arrival[cls_arrival]
        is_arrival = t_arrival <= ev.t
        t_next = jnp.minimum(t_arrival, ev.t)
        # a replica that no longer runs is left exactly as it is (lockstep_while's precondition)
        running = self.running(params, state, seg_end)
        beyond = t_next > seg_end
        stop = beyond | ~running
        t_new = jnp.where(running, jnp.where(beyond, seg_end, t_next), state.t)
        state = self.integrate(params, state, t_new)
        live = ~stop
        post = t_new >= params.warmup
        waiting_before = state.q_p[cls_arrival]

        # an arrival (own stream)
        arrive = live & is_arrival
        state = self.arrive(class_keys, m, params.model.arrivals, state, cls_arrival, t_arrival, post, arrive)

        # otherwise the cluster's event
        other = live & ~is_arrival
        c = ev.job_class
        state = room_remove(state, "queue", c, ev.pos, other & (ev.kind == ABANDON_QUEUE))
        state = room_remove(state, "buffers", self.buffer_row(ev.buffer, c), ev.pos, other & (ev.kind == ABANDON_BUFFER))
        state = count_one(state, ABANDON_PREFILL, c, post, other & (ev.kind == ABANDON_QUEUE))
        state = count_one(state, ABANDON_DECODE, c, post, other & (ev.kind == ABANDON_BUFFER))
        prefill_done = other & (ev.kind == PREFILL)
        pending_job = None if state.queue_job is None else self.cluster.running_job(state, ev.row)
        state, pending_cls, pending_row = self.cluster.finish_prefill(state, ev.row, prefill_done)
        state = count_one(state, PREFILL_DONE, c, post, prefill_done)
        decode_done = other & (ev.kind == DECODE)
        state = self.cluster.remove_decode(state, ev.row, c, ev.slot, decode_done)
        state = count_one(state, DECODE_DONE, c, post, decode_done)

        pending_cls = jnp.where(prefill_done, pending_cls, -1)
        state = self.decide(k_decide, params, state, pending_cls, pending_row, post, live, pending_job)
        # an arrival waited iff its class's queue grew (FCFS within class: it is the tail)
        state = count_one(state, WAITED, cls_arrival, post, arrive & (state.q_p[cls_arrival] > waiting_before))
        bad = ~jnp.isfinite(t_next) & live
        return eqx.tree_at(lambda s: (s.step, s.status), state,
                           (state.step + running.astype(state.step.dtype), state.status | jnp.where(bad, NONFINITE, 0)))

    @staticmethod
    def running(params, state, until):
        """Whether a replica still has events to run before ``until``."""
        return (state.t < until) & (state.step < params.max_steps) & (state.status & NONFINITE == 0)

    def advance(self, keys, params, state, until):
        # under vmap, a plain while_loop would select every carry leaf (the rooms too) per event
        # (the engine travels in the loop's arguments: a replay's job tables are per replica)
        return lockstep_while(lambda a, s: a[0].running(a[2], s, a[3]),
                              lambda a, s: a[0].step(a[1], a[2], s, a[3]), (self, keys, params, jnp.asarray(until)), state)

    def finish(self, params, state):
        hit_max = (state.step >= params.max_steps) & (state.t < params.horizon)
        return eqx.tree_at(lambda s: s.status, state, state.status | jnp.where(hit_max, MAX_STEPS, 0))
