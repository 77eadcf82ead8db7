"""The time-stepped engine: every GPU advances together by ``dt`` (a discrete-time approximation of
the CTMC of MODEL.md §2.2, for sweeps too large for the exact engine).

The discrete-time model. Time runs in steps of ``dt`` (the horizon is split into a whole number of
them). In each step:

* class-i arrivals are Poisson(n lam_i dt) (own random stream: common random numbers across policies);
* every job in service or waiting finishes its phase with probability rate x dt, independently: a
  prefill with mu_p,i dt, a decode with mu_m,i dt or mu_s,i dt by its GPU's mode, a waiting job
  abandons with theta_i dt. Phase lengths are geometric in steps with mean dt/(rate dt) = 1/rate,
  exactly the CTMC's means (using 1 - exp(-rate dt) instead would lengthen every phase by dt/2 and
  bias throughput at first order);
* at the end of the step the policy decides, in bulk: finished prefills' jobs join the decode buffer
  (or keep their slot, for coupled policies), the buffer fills free decode slots, idle prefill slots
  admit, one ``gate`` call per admission (the gates look only at per-class aggregates, so this is
  O(I) each).

What differs from the exact engine (measured in docs/time-stepped.md):
* events inside a step see the state at its start; the decisions wait for its end (no slot idles:
  the completion and the refill happen at the same instant);
* the waiting rooms are counts per class, so FCFS *across* classes (the FCFS gates, the shared
  decode buffer) becomes random order of service across classes: each admission picks a class with
  probability proportional to its waiting count (an exponential race on "pseudo head times");
  within a class order does not matter for any metric (patience is memoryless);
* bulk placement: a step's decodes fill free slots of the target group in GPU order from a random
  starting GPU, not one uniform draw per job; a job arriving during a step abandons in it with
  probability theta dt/2 (its mean exposure);
* per GPU, "two or more decodes finish in one step" (probability O((d mu dt)^2), under 1e-3 per
  GPU-step at the default step) is taken as exactly two of one class.

Validity needs rate x dt <= 1 for every phase (checked on the host by :func:`check_dt`).
Cost per step is O(n I) elementwise plus O(I) per admission, whatever the event rate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .state import (
    ABANDON_DECODE,
    ABANDON_PREFILL,
    ADMITTED,
    ANY,
    ARRIVED,
    CAPACITY_VIOLATED,
    DECODE_DONE,
    DECODE_STARTED,
    INT_QP,
    MIXED,
    NONFINITE,
    NUM_COUNTERS,
    PREFILL_DONE,
    SOLO,
    WAITED,
    SimParams,
    SimSpec,
    View,
    gpu_groups,
    runs_slow,
)

if TYPE_CHECKING:
    from ..policies.base import AbstractPolicy

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
    # accumulators, as the exact engine's (rows: state.COUNTER_NAMES, state.INTEGRAL_NAMES)
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
    return jnp.stack(k)


def _two_uniforms(key, n, dtype):
    """Two uniforms per GPU from one 64-bit word (32 bits each): a third of the random bits that
    float64 uniforms would take, which is most of a step's cost on CPU."""
    bits = jax.random.bits(key, (n,), jnp.uint64)
    scale = 2.0 ** -32
    hi = (bits >> 32).astype(jnp.float64) * scale
    lo = (bits & 0xFFFFFFFF).astype(jnp.float64) * scale
    return hi.astype(dtype), lo.astype(dtype)


def _allocate(u, counts, k):
    """Split ``k`` jobs among classes holding ``counts`` (k <= sum) in proportion, by systematic
    sampling with one uniform: each class gets floor or ceil of its share and never more than it has."""
    cum = jnp.cumsum(counts).astype(jnp.float64)
    total = cum[-1]
    scale = jnp.where(total > 0, k / jnp.where(total > 0, total, 1.0), 0.0)
    edges = jnp.floor(jnp.concatenate([jnp.zeros(1), cum]) * scale + u)
    return (edges[1:] - edges[:-1]).astype(_I32)


def _cumsum(x):
    """Inclusive prefix sum over GPUs. XLA:CPU's cumsum costs ~9 elementwise passes; the parallel
    scan about half that (measured: 0.9 vs 0.44 ms for 256 x 500 int32)."""
    return jax.lax.associative_scan(jnp.add, x)


def _place(u, blocks, free, masks, rooms=None, offsets=None):
    """Give jobs to GPUs with ``free`` slots. ``masks`` are G disjoint groups of GPUs, each a contiguous
    index range (as static planning lays them out), ``rooms`` their free slots and ``offsets`` the free
    slots of the GPUs before each group (so a group's slots are numbered from 0; both computed here when
    not given), and ``blocks[j, c]``
    class-c jobs go to group j (sum_c blocks[j] <= the group's free slots). Within a group the jobs
    take consecutive free slots (GPU by GPU) from a uniformly random free slot, wrapping, class blocks
    in order: a single job lands on a GPU with probability proportional to its free slots (uniformly
    among idle GPUs for prefills), and the whole placement is one prefix sum over all GPUs, not one
    draw per job. (Starting at a random *GPU* instead favours free GPUs behind long runs of full ones,
    which measurably biased the coupled policies.) ``u``: G uniforms. Returns the (I, n) jobs per GPU.

    Every GPU reads its own group's numbers (a select per GPU), so the class loop runs once for all
    groups, not once per group."""
    num_groups, num = blocks.shape
    excl = _cumsum(free) - free
    if rooms is None:
        rooms = [jnp.sum(jnp.where(mk, free, 0)) for mk in masks]
    if offsets is None:
        offsets = [excl[jnp.argmax(mk)] for mk in masks]
    rooms = [jnp.asarray(r).astype(_I32) for r in rooms]
    offsets = [jnp.asarray(o).astype(_I32) for o in offsets]

    def per_gpu(vals):  # a scalar per group -> the value of each GPU's group (0 outside every group)
        out = jnp.where(masks[num_groups - 1], vals[num_groups - 1], 0)
        for j in range(num_groups - 2, -1, -1):
            out = jnp.where(masks[j], vals[j], out)
        return out

    starts = [jnp.minimum(jnp.floor(u[j] * rooms[j]).astype(_I32), jnp.maximum(rooms[j] - 1, 0))
              for j in range(num_groups)]
    room = per_gpu(rooms)
    lo_slot = excl - per_gpu(offsets)  # the group's slots before each of its GPUs
    hi_slot = lo_slot + free
    inside = masks[0]
    for j in range(1, num_groups):
        inside = inside | masks[j]
    out = []
    lo_g = starts
    for c in range(num):
        hi_g = [lo_g[j] + blocks[j, c] for j in range(num_groups)]
        lo, hi = per_gpu(lo_g), per_gpu(hi_g)
        # the job range [lo, hi) may run past the group's last slot and wrap to its first
        got = (jnp.maximum(jnp.minimum(hi_slot, hi) - jnp.maximum(lo_slot, lo), 0)
               + jnp.maximum(jnp.minimum(hi_slot + room, hi) - jnp.maximum(lo_slot + room, lo), 0))
        out.append(jnp.where(inside, got, 0).astype(_I32))
        lo_g = hi_g
    return jnp.stack(out)


def _onehot_sum(cls, mask, num):
    """Per-class count of ``mask`` entries, ``cls`` giving each entry's class."""
    return jnp.stack([jnp.sum((cls == c) & mask, dtype=_I32) for c in range(num)])


_INVERSION_TERMS = 64
_TRACKED = 32  # per class, prefill completions per step whose finishing times are drawn
_INVERSION_MAX_MEAN = 25.0


def _count_draw(u, mean, count=None):
    """Poisson(mean) (``count`` None) or Binomial(count, mean/count) from uniforms ``u``, elementwise.

    jax.random.poisson/binomial run rejection loops that cost ~0.3 ms per call on a batched CPU step,
    more than everything else these few draws feed. Here: inverse CDF over the first 64 terms when the
    mean is at most 25 (the mass beyond them is below 1e-11), and a rounded normal with the same mean
    and variance above (where the step's counts are sums of many small contributions)."""
    # the pmf by its term ratios pmf(k+1)/pmf(k) (a running product, no transcendental per term)
    shape = (1,) * mean.ndim + (_INVERSION_TERMS - 1,)
    ks = np.arange(_INVERSION_TERMS - 1).reshape(shape)
    inv = jnp.asarray(1.0 / (ks + 1.0), mean.dtype)
    m = mean[..., None]
    if count is None:
        first = jnp.exp(-mean)
        ratio = m * inv
        var = mean
        cap = jnp.full(mean.shape, jnp.inf, mean.dtype)
    else:
        q = count.astype(mean.dtype)
        p = jnp.clip(mean / jnp.maximum(q, 1.0), 0.0, 1.0)
        p_ = jnp.minimum(p, 1.0 - 1e-12)
        first = jnp.exp(q * jnp.log1p(-p_))
        ratio = jnp.maximum(q[..., None] - jnp.asarray(ks, mean.dtype), 0.0) * inv * (p_ / (1.0 - p_))[..., None]
        var = mean * (1.0 - p)
        cap = q
    pmf = first[..., None] * jnp.concatenate([jnp.ones_like(m), jnp.cumprod(ratio, axis=-1)], axis=-1)
    cdf = jnp.cumsum(pmf, axis=-1)
    small = jnp.sum(u[..., None] > cdf, axis=-1).astype(mean.dtype)
    z = jax.scipy.special.ndtri(jnp.clip(u, 1e-12, 1 - 1e-12))
    large = jnp.round(mean + jnp.sqrt(jnp.maximum(var, 0.0)) * z)
    k = jnp.where(mean <= _INVERSION_MAX_MEAN, small, large)
    return jnp.clip(k, 0, cap).astype(_I32)


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


class _Stepper(eqx.Module):
    spec: SimSpec = eqx.field(static=True)
    policy: AbstractPolicy = eqx.field(static=True)

    # -- what is in the system --------------------------------------------------------------------
    def levels(self, state):
        """(Q_p, X, Q_d, Y_m, Y_s, Y on G_mix) per class now (rows as state.INTEGRAL_NAMES)."""
        num = self.spec.num_classes
        has = state.prefill_class >= 0
        X = _onehot_sum(state.prefill_class, has, num)
        Y = jnp.sum(state.decodes, axis=1, dtype=_I32)
        Y_pre = jnp.sum(jnp.where(has[None, :], state.decodes, 0), axis=1, dtype=_I32)
        Y_mix = jnp.sum(jnp.where((state.group == MIXED)[None, :], state.decodes, 0), axis=1, dtype=_I32)
        return jnp.stack([state.q_p, X, jnp.sum(state.q_d, axis=0), Y_pre, Y - Y_pre, Y_mix])

    def _caps(self, params, state):
        B = params.model.B.astype(_I32)
        has = state.prefill_class >= 0
        ndec = jnp.sum(state.decodes, axis=0, dtype=_I32)
        cap = jnp.where(state.group == MIXED, B - 1, jnp.where(state.group == SOLO, B, B - has.astype(_I32)))
        idle = jnp.where(state.group == MIXED, ~has, (state.group == ANY) & ~has & (ndec < B))
        return cap - ndec, idle, ndec

    # -- decisions in bulk --------------------------------------------------------------------------
    def drain(self, rand, params, state, post):
        """Buffered decodes into free slots, by the policy's bulk router: "greedy" (G_solo first, then
        G_mix), "split" (buffer 0 to G_solo, buffer 1 to G_mix) or "any" (every GPU alike). The jobs a
        step moves are drawn from the buffer in proportion to its class counts (random order of
        service across classes), and split between groups in proportion too."""
        router = self.policy.batch_router
        free, _, _ = self._caps(params, state)
        free = jnp.maximum(free, 0)
        if router == "any":
            masks = [jnp.ones_like(free, bool)]
        else:
            masks = [state.group == SOLO, state.group == MIXED]
        room = [jnp.sum(jnp.where(mk, free, 0)) for mk in masks]
        if router == "split":  # buffer b feeds group b only
            blocks = [_allocate(rand.take(1)[0], state.q_d[b],
                                jnp.minimum(jnp.sum(state.q_d[b]), room[b])) for b in range(2)]
            taken = jnp.stack(blocks)
        else:  # one buffer feeding the groups in order
            k = jnp.minimum(jnp.sum(state.q_d[0]), sum(room))
            remaining = _allocate(rand.take(1)[0], state.q_d[0], k)
            blocks = []
            for j in range(len(masks)):
                here = _allocate(rand.take(1)[0], remaining,
                                 jnp.minimum(jnp.sum(remaining), room[j]))
                blocks.append(here)
                remaining = remaining - here
            taken = sum(blocks)[None, :]
        # the groups are contiguous, G_mix first: G_solo's slots start after all of G_mix's
        offsets = [0] if router == "any" else [room[1], 0]
        add = _place(rand.take(len(masks)), jnp.stack(blocks), free, masks, room, offsets)
        state = eqx.tree_at(lambda s: (s.decodes, s.q_d), state, (state.decodes + add, state.q_d - taken))
        return self._count(state, DECODE_STARTED, jnp.sum(taken, axis=0), post)

    def admit(self, key, rand, params, state, post, done_cls, idle_at_start, X0):
        """Fill idle prefill slots: one ``gate`` call per admission, on per-class aggregates, in the
        order the slots freed within the step. Slots idle since the step's start come first; the
        slots freed during it follow at the order statistics of uniform times, and each decision sees
        as still running the prefills (``done_cls`` of them per class) that had not yet finished by
        then (their finishing times are uniform in the step, drawn once). Deciding all slots as if every
        completion came first would let a class whose short prefills finish often take slots that
        freed before its completion did (an O(dt) bias measured on GI-WSP)."""
        num = self.spec.num_classes
        _, idle, _ = self._caps(params, state)
        slots = jnp.sum(idle, dtype=_I32)
        freed = jnp.maximum(slots - idle_at_start, 0)
        dtype = jnp.dtype(self.spec.dtype)

        def view(X, q_p, k):
            # FCFS across classes on counts: exponential race with rates q_p (random order of service)
            race = -jnp.log(jax.random.uniform(jax.random.fold_in(key, k), (num,))) / jnp.maximum(q_p, 1)
            return View(n=self.spec.num_gpus, B=params.model.B, group=state.group, prefill_class=state.prefill_class,
                        decodes=state.decodes.T, free_decode=jnp.zeros_like(state.group), idle_prefill=idle, X=X,
                        q_p=q_p, queue_head=jnp.where(q_p > 0, race, jnp.inf), q_d=state.q_d,
                        buffer_head=jnp.full(state.q_d.shape, jnp.inf))

        # the finishing times of this step's prefill completions: uniform, drawn once (so "still running
        # at t" is consistent across the decisions); beyond _TRACKED per class, in expectation
        taus = jax.random.uniform(jax.random.fold_in(key, 2**22), (num, _TRACKED), dtype=dtype)
        tracked = jnp.arange(_TRACKED)[None, :] < done_cls[:, None]

        def running(t):
            extra = jnp.maximum(done_cls - _TRACKED, 0).astype(dtype) * (1.0 - t)
            return jnp.sum(tracked & (taus > t), axis=1, dtype=_I32) + jnp.round(extra).astype(_I32)

        # Without coupling, a prefill's completion is what frees its prefill slot: the j-th slot freed
        # in the step frees at the j-th completion time. Drawing slot times independently of the
        # completions would let a decision still count as running the very prefill whose completion
        # freed its slot, and so under-admit the class whose prefills finish most often (measured: x_0
        # 35% under the exact engine's on an SLI-planned GG-SP). Slots freed otherwise (decode
        # completions on shared GPUs, completions beyond the tracked ones) get uniform order statistics.
        completion_times = jnp.sort(jnp.where(tracked, taus, jnp.inf).ravel())
        from_completions = 0 if self.policy.coupled else jnp.sum(tracked, dtype=_I32)

        def advance(k, t):
            """Time of slot k: 0 for the slots idle since the start, then the slots freed during the
            step in the order they freed."""
            u = jax.random.uniform(jax.random.fold_in(key, k + 2**21), dtype=dtype)
            j = k - idle_at_start
            remaining = jnp.maximum(freed - j, 1).astype(dtype)
            drawn = 1.0 - (1.0 - t) * u ** (1.0 / remaining)
            at_completion = jnp.maximum(completion_times[jnp.clip(j, 0, completion_times.shape[0] - 1)], t)
            return jnp.where(j < 0, t, jnp.where(j < from_completions, at_completion, drawn))

        def pick(X, q_p, k, t):
            return self.policy.gate(jax.random.fold_in(key, k + 2**20), view(X + running(t), q_p, k), params.targets)

        # the carry holds the gate's next choice, so that each admission calls the gate once (the loop
        # condition only reads it)
        def cond(carry):
            _, q_p, _, k, _, c = carry
            return (k < slots) & (c >= 0) & (q_p[jnp.maximum(c, 0)] > 0)

        def body(carry):
            X, q_p, adm, k, t, c = carry
            one = (jnp.arange(num) == c).astype(_I32)
            X, q_p, k = X + one, q_p - one, k + 1
            t = advance(k, t)
            return X, q_p, adm + one, k, t, pick(X, q_p, k, t)

        zeros = jnp.zeros((num,), _I32)
        t0 = advance(jnp.int32(0), jnp.zeros((), dtype))
        c0 = pick(X0, state.q_p, jnp.int32(0), t0)
        _, q_p, adm, _, _, _ = jax.lax.while_loop(cond, body, (X0, state.q_p, zeros, jnp.int32(0), t0, c0))
        got = _place(rand.take(1), adm[None, :], idle.astype(_I32), [jnp.ones_like(idle)], [slots], [0])
        # an idle GPU has one prefill slot: at most one class gets it
        prefill_class = state.prefill_class
        for c in range(num - 1, -1, -1):
            prefill_class = jnp.where(got[c] > 0, c, prefill_class)
        state = eqx.tree_at(lambda s: (s.prefill_class, s.q_p), state, (prefill_class, q_p))
        return self._count(state, ADMITTED, adm, post), adm

    def _count(self, state, row, per_class, post):
        per_class = per_class.astype(_I32)  # sums of int32 are int64 under x64
        return eqx.tree_at(lambda s: (s.counts, s.totals), state,
                           (state.counts.at[row].add(jnp.where(post, per_class, 0)), state.totals.at[row].add(per_class)))

    # -- one step -----------------------------------------------------------------------------------
    def step(self, keys, params, state, dt):
        spec, pol = self.spec, self.policy
        num, n = spec.num_classes, spec.num_gpus
        arrival_key, service_key = keys
        key = jax.random.fold_in(service_key, state.step)
        k_gpu, k_misc, k_admit = jax.random.split(key, 3)
        dtype = jnp.dtype(spec.dtype)
        m = jax.tree_util.tree_map(lambda a: a.astype(dtype), params.model)
        dt_ = jnp.asarray(dt, dtype)

        t0 = state.t
        t1 = (state.step + 1).astype(jnp.float64) * dt
        post = 0.5 * (t0 + t1) >= params.warmup
        w = jnp.maximum(jnp.minimum(t1, params.horizon) - jnp.maximum(t0, params.warmup), 0.0)
        rand = _Uniforms(k_misc, 16 + 5 * num * spec.num_buffers, dtype)
        u_arrive = jax.random.uniform(jax.random.fold_in(arrival_key, state.step), (num,), dtype=dtype)
        arrivals = _count_draw(u_arrive, n * m.lam * dt_)
        # levels are constant through the step, except that this step's arrivals wait from their
        # arrival (uniform in the step) to its end: half a step each on average
        levels = self.levels(state)
        integrals = state.integrals + w * levels.astype(jnp.float64)
        integrals = integrals.at[INT_QP].add(0.5 * w * arrivals)
        state = eqx.tree_at(lambda s: (s.integrals, s.t), state, (integrals, t1))
        idle_at_start = jnp.sum(self._caps(params, state)[1], dtype=_I32)

        # -- draws from the state at the start of the step ----------------------------------------
        ab_p = _count_draw(rand.take(num), state.q_p * m.theta * dt_, state.q_p)
        ab_d = _count_draw(rand.take(num * spec.num_buffers).reshape(state.q_d.shape),
                           state.q_d * (m.theta * dt_)[None, :], state.q_d)
        u_pre, u_dec = _two_uniforms(k_gpu, n, dtype)
        has = state.prefill_class >= 0
        pc = jnp.maximum(state.prefill_class, 0)
        prefill_done = has & (u_pre < m.mu_p[pc] * dt_)
        slow = runs_slow(spec.convention, state.group, state.prefill_class)
        dec_done = _decode_completions(u_dec, state.decodes, slow, m.mu_m * dt_, m.mu_s * dt_)

        # -- apply them ---------------------------------------------------------------------------
        done_cls = _onehot_sum(state.prefill_class, prefill_done, num)
        X_run = levels[1].astype(_I32) - done_cls  # prefills still running after the completions
        decodes = state.decodes - dec_done
        if pol.coupled:  # the job decodes in the slot its prefill held
            decodes = decodes + ((pc[None, :] == jnp.arange(num)[:, None]) & prefill_done[None, :]).astype(_I32)
        q_d = state.q_d - ab_d
        if not pol.coupled:
            if spec.num_buffers == 2:  # SLI router: solo-bound with probability p_solo,i
                to_solo = _count_draw(rand.take(num), done_cls * params.targets.p_solo.astype(dtype), done_cls)
                q_d = q_d + jnp.stack([to_solo, done_cls - to_solo])
            else:
                q_d = q_d.at[0].add(done_cls)
        # an arrival waits from its (uniform) arrival time to the step's end: it abandons on the way
        # with probability theta dt/2 on average
        ab_new = _count_draw(rand.take(num), 0.5 * arrivals * m.theta * dt_, arrivals)
        queued = state.q_p - ab_p + arrivals - ab_new
        state = eqx.tree_at(lambda s: (s.prefill_class, s.decodes, s.q_d, s.q_p), state,
                            (jnp.where(prefill_done, -1, state.prefill_class), decodes, q_d, queued))
        for row, v in ((ARRIVED, arrivals), (ABANDON_PREFILL, ab_p + ab_new), (ABANDON_DECODE, jnp.sum(ab_d, axis=0)),
                       (PREFILL_DONE, done_cls), (DECODE_DONE, jnp.sum(dec_done, axis=1))):
            state = self._count(state, row, v, post)
        if pol.coupled:
            state = self._count(state, DECODE_STARTED, done_cls, post)

        # -- decisions at the end of the step -------------------------------------------------------
        if pol.prefill_first:
            state, adm = self.admit(k_admit, rand, params, state, post, done_cls, idle_at_start, X_run)
        if not pol.coupled:
            state = self.drain(rand, params, state, post)
        if not pol.prefill_first:
            state, adm = self.admit(k_admit, rand, params, state, post, done_cls, idle_at_start, X_run)
        # Who waited, as the CTMC would count it. FCFS within class: admissions take older jobs first,
        # so this step's arrivals admitted now are adm - older. Those that took a slot already idle at
        # the step's start would not have waited; one that took a slot freed during the step waited iff
        # it arrived before the slot freed (both times uniform in the step: probability 1/2).
        older = queued - (arrivals - ab_new)
        new_in = jnp.clip(adm - older, 0, arrivals - ab_new)
        immediate = _allocate(rand.take(1)[0], new_in, jnp.minimum(jnp.sum(new_in), idle_at_start))
        rest = new_in - immediate
        lucky = _count_draw(rand.take(num), 0.5 * rest.astype(dtype), rest)
        state = self._count(state, WAITED, arrivals - immediate - lucky, post)

        free, _, ndec = self._caps(params, state)
        has = state.prefill_class >= 0
        gpu_ok = (free >= 0) & (ndec + has <= params.model.B.astype(_I32)) & ~(has & (state.group == SOLO))
        for c in range(num):
            gpu_ok &= state.decodes[c] >= 0
        ok = jnp.all(gpu_ok) & jnp.all(state.q_p >= 0) & jnp.all(state.q_d >= 0)
        bad = jnp.where(ok, 0, CAPACITY_VIOLATED)
        return eqx.tree_at(lambda s: (s.step, s.status), state, (state.step + 1, state.status | bad))


def init_state(spec: SimSpec, params: SimParams, partitioned: bool) -> SteppedState:
    num, n = spec.num_classes, spec.num_gpus
    zeros = jnp.zeros((NUM_COUNTERS, num), _I32)
    group = gpu_groups(params, n, partitioned)
    return SteppedState(
        t=jnp.zeros((), jnp.float64), step=jnp.zeros((), _I32), group=group,
        prefill_class=jnp.full((n,), -1, _I32), decodes=jnp.zeros((num, n), _I32), q_p=jnp.zeros((num,), _I32),
        q_d=jnp.zeros((spec.num_buffers, num), _I32), counts=zeros, integrals=jnp.zeros((6, num)), totals=zeros,
        status=jnp.zeros((), _I32),
    )


def run_single(key, params: SimParams, spec: SimSpec, policy: AbstractPolicy, record_times=None, *,
               dt: float = DEFAULT_DT):
    """Simulate one replica from an empty system to ``params.horizon`` in steps of about ``dt`` (the
    horizon is split into ceil(horizon/dt) equal steps). Same return as the exact engine's
    :func:`jaxq.sim.engine.run_single`; a recorded level is the state after the last step ending at
    or before the recording time."""
    if policy.batch_router is None:
        raise ValueError(f"invalid field 'policy': {policy.name!r} has no bulk router (batch_router), so only "
                         "the exact engine can run it; set batch_router or use engine='exact'")
    if policy.num_buffers != spec.num_buffers:
        spec = SimSpec(spec.num_classes, spec.num_gpus, spec.room, policy.num_buffers, spec.convention, spec.dtype)
    sim = _Stepper(spec, policy)
    arrival_key, service_key = jax.random.split(key)
    state = init_state(spec, params, policy.partitioned)
    num_steps = jnp.ceil(params.horizon / dt).astype(_I32)
    step_len = params.horizon / num_steps  # a whole number of steps ends exactly at the horizon

    def run_to(state, last_step):
        def cond(s):
            return s.step < last_step

        return jax.lax.while_loop(cond, lambda s: sim.step((arrival_key, service_key), params, s, step_len), state)

    if record_times is None:
        state = run_to(state, num_steps)
        trajectory = None
    else:
        def seg(state, t_rec):
            state = run_to(state, jnp.minimum(jnp.floor(t_rec / step_len + 1e-9).astype(_I32), num_steps))
            return state, sim.levels(state)

        state, trajectory = jax.lax.scan(seg, state, jnp.asarray(record_times, jnp.float64))
        state = run_to(state, num_steps)
    bad = ~jnp.isfinite(state.integrals).all()
    state = eqx.tree_at(lambda s: s.status, state, state.status | jnp.where(bad, NONFINITE, 0))
    return state, trajectory


@eqx.filter_jit
def simulate(keys, params: SimParams, spec: SimSpec, policy: AbstractPolicy, record_times=None, dt: float = DEFAULT_DT):
    """Replicas batched over ``keys``; ``params`` shared. Returns batched final states."""
    return jax.vmap(lambda k: run_single(k, params, spec, policy, record_times, dt=dt))(keys)
