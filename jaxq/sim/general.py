"""The general-service engine: the exact engine's policies with non-exponential prompt and output lengths.

The exact engine (:mod:`jaxq.sim.exact`) simulates the CTMC of MODEL.md §2, where every phase is
exponential. Here the prompt length P and output length D of each job follow a :class:`ServiceLaw`
(exponential, deterministic or lognormal, with the scenario's means P_i and D_i), and the engine keeps
each job's remaining work:

* a running prefill's, per GPU, shape (n,);
* each decode stream's, and its class, per GPU and slot, shape (n, max_batch) (class -1: empty slot).

Speeds (tokens/s), constant between events: a prefill processes C/tau prompt tokens per second (it
runs P/C chunks of tau s each); a decode one output token per iteration, so 1/tau while it runs slow
(:func:`jaxq.sim.state.runs_slow`, the exact engine's rule) and gamma otherwise. A phase of mean
length therefore lasts 1/mu_p, 1/mu_m or 1/mu_s (MODEL.md eq. 4; :func:`phase_speeds`).

Remaining work is stored as the absolute time at which the job finishes at its current speed (float64;
:func:`remaining_work` converts back to tokens: (finish - t) x speed). Between events every speed is
constant, so these times stand still while every job's work drains at its speed; a speed changes only
when a prefill starts or ends on a GPU, and then only that GPU's streams are re-timed (their remaining
work kept, :meth:`PerJob._rescale`). This is the "advance all remaining work by speed x elapsed
time" bookkeeping done lazily: an event costs one read of the n x max_batch finish times (the argmin)
and O(max_batch) writes, not a rewrite of every job's work.

Exactness. Arrivals come from the exact engine's own stream (same keys: the same arrival times, common
random numbers). Patience stays exponential, so abandonment is a Gillespie clock on the total rate
theta x (waiting jobs), redrawn at every event (memoryless). Service completions are deterministic
given the state: the next one is the earliest finish time over prefills and decode slots. Each step
takes the earliest of the three candidate times and applies that event. With exponential laws the
remaining work of a job is exponential whatever its past (memorylessness), so the process is the exact
engine's CTMC in distribution (tested in tests/sim/test_general.py).

Lengths are drawn when the phase starts: the k-th prefill admission of class i takes the prompt length
from one uniform of ``fold_in(length_key, 0, i, k)``, the k-th decode start of class i the output
length from ``fold_in(length_key, 1, i, k)`` (inverted: exponential, or lognormal via the normal
quantile). These keys are independent of everything that decides k, so the lengths are i.i.d. per
class; two policies on one key see the same sequence of lengths per class. Completions that coincide
(deterministic lengths) are applied one per step at the same instant.

The law is data inside the step (:class:`LawArrays`): one compiled program runs every law when the
law is passed as an argument (``vmap`` over laws, as ``jaxq reproduce service-laws`` does).

This is a cluster of the event engine (:mod:`jaxq.sim.core`): the decision logic (gate, routing,
buffers, counters, time integrals, status) is the core's; the per-GPU arrays are the exact engine's
(:class:`~jaxq.sim.exact.PerGpu`, wrapped: its four functions that change a GPU are extended to keep
the per-job work in step), and the next completion is the earliest finish instead of a Gillespie draw.
Cost per event: one O(n x max_batch) read (the argmin of the finish times) on top of the exact
engine's O(n) passes.
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Key

from .core import ABANDON_BUFFER, ABANDON_QUEUE, DECODE, PREFILL, AbstractCluster, Event, weighted_index
from .exact import AbstractGpuArrays, GpuArrays, PerGpu
from .state import ADMITTED, CAPACITY_VIOLATED, DECODE_STARTED, SimParams, SimSpec, runs_slow

_I32 = jnp.int32
LAWS = ("exponential", "deterministic", "lognormal")
PROMPT, OUTPUT = 0, 1  # length streams


@dataclasses.dataclass(frozen=True)
class ServiceLaw:
    """Laws of the prompt length P and the output length D of a job of class i, each with the scenario's
    mean (P_i, D_i): "exponential" (the paper's model, MODEL.md §1.3), "deterministic" (always the
    mean), or "lognormal" with coefficient of variation ``cv`` (std / mean; used only by lognormal
    phases). Hashable: the api compiles one program per law; :meth:`arrays` passes it as data instead."""

    prompt: str = "exponential"
    output: str = "exponential"
    cv: float = 1.0

    def __post_init__(self):
        for name in ("prompt", "output"):
            v = getattr(self, name)
            if v not in LAWS:
                raise ValueError(f"invalid ServiceLaw field '{name}': must be one of {', '.join(LAWS)}, got {v!r}")
        cv = self.cv
        if isinstance(cv, bool) or not isinstance(cv, (int, float)) or not math.isfinite(cv) or not cv > 0:
            raise ValueError(f"invalid ServiceLaw field 'cv': must be a finite number > 0, got {cv!r}")
        # cv only shapes lognormal phases: normalised otherwise, so equal behaviour means equal laws
        object.__setattr__(self, "cv", float(cv) if "lognormal" in (self.prompt, self.output) else 1.0)

    @classmethod
    def of(cls, law: ServiceLaw | str | None, cv: float | None = None) -> ServiceLaw:
        """A law from a ServiceLaw, a kind name (that law for both phases) or None (exponential)."""
        if law is None:
            law = "exponential"
        if isinstance(law, ServiceLaw):
            return law if cv is None else dataclasses.replace(law, cv=cv)
        if isinstance(law, str):
            if law not in LAWS:
                raise ValueError(f"invalid field 'service': must be a ServiceLaw or one of {', '.join(LAWS)}, "
                                 f"got {law!r}")
            return cls(law, law, 1.0 if cv is None else cv)
        raise ValueError(f"invalid field 'service': must be a ServiceLaw or one of {', '.join(LAWS)}, got {law!r}")

    @property
    def is_exponential(self) -> bool:
        return self.prompt == "exponential" and self.output == "exponential"

    def label(self) -> str:
        parts = []
        for kind in dict.fromkeys((self.prompt, self.output)):
            parts.append(f"lognormal(cv={self.cv:g})" if kind == "lognormal" else kind)
        if self.prompt == self.output:
            return parts[0]
        return f"prompt {parts[0]}, output {parts[-1]}"

    def arrays(self) -> LawArrays:
        """The law as arrays, to pass it to jitted code as data (one compile for every law)."""
        return LawArrays(kind=jnp.asarray([LAWS.index(self.prompt), LAWS.index(self.output)], _I32),
                         cv=jnp.asarray(self.cv, jnp.float64))


class LawArrays(eqx.Module):
    """A :class:`ServiceLaw` as arrays: ``kind`` (prompt, output) indexes LAWS; ``cv`` as there. Stack
    several with ``jax.tree_util.tree_map(jnp.stack, ...)`` to ``vmap`` over laws."""

    kind: Int[Array, " 2"]
    cv: Float[Array, ""]


def draw_length(key, kind, mean, cv):
    """One length with mean ``mean`` (float64) of law ``kind`` (a name in LAWS or its index, possibly
    traced), from one uniform: exponential by inversion, lognormal through the normal quantile. Consumes
    ``key``."""
    kind = LAWS.index(kind) if isinstance(kind, str) else kind
    u = jax.random.uniform(key, dtype=jnp.float64)
    s2 = jnp.log1p(jnp.square(jnp.asarray(cv, jnp.float64)))  # lognormal with E = 1, std = cv
    lognormal = jnp.exp(jnp.sqrt(s2) * jax.scipy.special.ndtri(u) - 0.5 * s2)
    unit = jnp.where(kind == 0, -jnp.log1p(-u), jnp.where(kind == 1, 1.0, lognormal))
    return jnp.asarray(mean, jnp.float64) * unit


def phase_speeds(model):
    """(prefill, slow decode, fast decode) speeds in tokens/s: C/tau, 1/tau, gamma. Divided by P_i, D_i,
    D_i they are mu_p, mu_m, mu_s (MODEL.md eq. 4)."""
    tau = model.alpha + model.beta * model.C
    return model.C / tau, 1.0 / tau, model.gamma




def first_argmin(x):
    """``jnp.argmin`` of a 1-D array (the first minimum) by two plain reductions, the minimum and then
    the least index attaining it: XLA's CPU argmin is a variadic (value, index) reduce, several times
    slower per entry (docs/simulation.md, "What a step costs"). Without a NaN the same index."""
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.minimum(jnp.min(jnp.where(x == jnp.min(x), index, x.shape[-1])), x.shape[-1] - 1)


def first_argmin_2d(x):
    """(row, column) of the first minimum of a 2-D array in row-major order, as ``divmod(jnp.argmin(
    x.ravel()), x.shape[1])`` would give: row minima (one plain pass), then :func:`first_argmin` over
    the rows, then over that row."""
    row = first_argmin(jnp.min(x, axis=1))
    return row, first_argmin(x[row])


class JobArrays(AbstractGpuArrays):
    """The per-GPU arrays plus each job's remaining work, stored as the absolute time at which it
    finishes at its current speed (see :func:`remaining_work` for the tokens left)."""

    group: Int[Array, " n"]
    prefill_class: Int[Array, " n"]
    decodes: Int[Array, "n I"]
    ndec: Int[Array, " n"]
    prefill_finish: Float[Array, " n"]  # when the running prefill finishes (+inf if none)
    decode_finish: Float[Array, "n S"]  # when each decode slot's stream finishes at its GPU's speed (+inf: empty)
    decode_class: Int[Array, "n S"]  # class in each decode slot, -1 if empty
    length_keys: Key[Array, "2 I"]  # the length stream of each (phase, class) (see the module docstring)


def remaining_work(spec: SimSpec, params: SimParams, state):
    """Tokens left: (of each GPU's prefill (n,), of each decode slot (n, max_batch)); 0 where empty.
    Works on one replica or a batch (leading axes)."""
    pre, slow, fast = phase_speeds(params.model)
    jobs = state.gpus
    t = state.t[..., None]
    speed = jnp.where(runs_slow(spec.convention, jobs.group, jobs.prefill_class), slow, fast)
    left_p = jnp.where(jobs.prefill_class >= 0, (jobs.prefill_finish - t) * pre, 0.0)
    left_d = jnp.where(jobs.decode_class >= 0, (jobs.decode_finish - t[..., None]) * speed[..., None], 0.0)
    return left_p, left_d


class PerJob(AbstractCluster):
    """One row per GPU (the exact engine's :class:`~jaxq.sim.exact.PerGpu`, wrapped) plus each job's
    remaining work; the next completion is the earliest finish."""

    spec: SimSpec = eqx.field(static=True)
    gpu: PerGpu
    law: LawArrays
    means: Float[Array, "2 I"]  # (P_i, D_i): the mean lengths, from the params of this run
    speeds: Float[Array, " 3"]  # tokens/s of a prefill, a slow decode, a fast decode (phase_speeds)

    def __init__(self, spec: SimSpec, params: SimParams, law: LawArrays):
        if spec.max_batch is None:
            raise ValueError("invalid SimSpec field 'max_batch': the general engine needs it (the batch size B "
                             "fixes its decode slots per GPU); see jaxq.sim.batch.engine_spec")
        self.spec, self.gpu, self.law = spec, PerGpu(spec), law
        self.means = jnp.stack([params.model.P, params.model.D]).astype(jnp.float64)
        self.speeds = jnp.stack([jnp.asarray(v, jnp.float64) for v in phase_speeds(params.model)])

    def init(self, params, groups, service_key):
        n, S, num = self.spec.num_gpus, self.spec.max_batch, self.spec.num_classes
        base = GpuArrays.empty(groups, num)
        length_key = jax.random.fold_in(service_key, 2**31 - 1)
        keys = jax.vmap(lambda p: jax.vmap(lambda c: jax.random.fold_in(jax.random.fold_in(length_key, p), c))(
            jnp.arange(num)))(jnp.arange(2))
        return JobArrays(group=base.group, prefill_class=base.prefill_class, decodes=base.decodes, ndec=base.ndec,
                         prefill_finish=jnp.full((n,), jnp.inf), decode_finish=jnp.full((n, S), jnp.inf),
                         decode_class=jnp.full((n, S), -1, _I32), length_keys=keys)

    def rows(self, state):
        return self.gpu.rows(state)

    def _draw(self, state, phase: int, c, index):
        kind = self.law.kind[phase]
        mean = self.means[phase, jnp.maximum(c, 0)]
        key = jax.random.fold_in(state.gpus.length_keys[phase, jnp.maximum(c, 0)], index)
        return draw_length(key, kind, mean, self.law.cv)

    def _decode_speed(self, state, g):
        jobs = state.gpus
        slow = runs_slow(self.spec.convention, jobs.group[g], jobs.prefill_class[g])
        return jnp.where(slow, self.speeds[1], self.speeds[2])

    def _rescale(self, state, g, old_speed, do):
        """GPU g's decode speed changed from ``old_speed``: its streams' remaining work (finish - t) x
        speed is kept, so their finish times move. Only GPU g changes speed at this instant."""
        new_speed = self._decode_speed(state, g)
        row = state.gpus.decode_finish[g]
        moved = jnp.where(jnp.isfinite(row), state.t + (row - state.t) * (old_speed / new_speed), row)
        return eqx.tree_at(lambda s: s.gpus.decode_finish, state,
                           state.gpus.decode_finish.at[g].set(jnp.where(do & (new_speed != old_speed), moved, row)))

    # -- the functions that change a GPU: the per-GPU ones, plus the per-job work ---------------------
    def start_prefill(self, state, row, cls, do):
        index = state.totals[ADMITTED, jnp.maximum(cls, 0)]  # counted by the caller after this returns
        old_speed = self._decode_speed(state, row)
        state = self._rescale(self.gpu.start_prefill(state, row, cls, do), row, old_speed, do)
        end = state.t + self._draw(state, PROMPT, cls, index) / self.speeds[0]
        finish = state.gpus.prefill_finish
        return eqx.tree_at(lambda s: s.gpus.prefill_finish, state, finish.at[row].set(jnp.where(do, end, finish[row])))

    def finish_prefill(self, state, row, do):
        old_speed = self._decode_speed(state, row)
        state, c, after = self.gpu.finish_prefill(state, row, do)
        state = self._rescale(state, row, old_speed, do)
        finish = state.gpus.prefill_finish
        return eqx.tree_at(lambda s: s.gpus.prefill_finish, state,
                           finish.at[row].set(jnp.where(do, jnp.inf, finish[row]))), c, after

    def add_decode(self, state, row, cls, do):
        do = do & (row >= 0) & (cls >= 0)
        gg, cc = jnp.maximum(row, 0), jnp.maximum(cls, 0)
        index = state.totals[DECODE_STARTED, cc]  # counted by the caller after this returns
        state = self.gpu.add_decode(state, row, cls, do)
        jobs = state.gpus
        free = jobs.decode_class[gg] < 0
        slot = jnp.argmax(free)
        ok = do & free[slot]
        end = state.t + self._draw(state, OUTPUT, cls, index) / self._decode_speed(state, gg)
        return eqx.tree_at(
            lambda s: (s.gpus.decode_finish, s.gpus.decode_class, s.status), state,
            (jobs.decode_finish.at[gg, slot].set(jnp.where(ok, end, jobs.decode_finish[gg, slot])),
             jobs.decode_class.at[gg, slot].set(jnp.where(ok, cc, jobs.decode_class[gg, slot])),
             state.status | jnp.where(do & ~ok, CAPACITY_VIOLATED, 0)))

    def remove_decode(self, state, row, cls, slot, do):
        state = self.gpu.remove_decode(state, row, cls, slot, do)
        do = do & (row >= 0) & (cls >= 0)
        gg = jnp.maximum(row, 0)
        jobs = state.gpus
        return eqx.tree_at(
            lambda s: (s.gpus.decode_finish, s.gpus.decode_class), state,
            (jobs.decode_finish.at[gg, slot].set(jnp.where(do, jnp.inf, jobs.decode_finish[gg, slot])),
             jobs.decode_class.at[gg, slot].set(jnp.where(do, -1, jobs.decode_class[gg, slot]))))

    def next_event(self, key, model, state):
        """The earliest of an abandonment (a Gillespie clock on theta x waiting jobs, redrawn at every
        event: memoryless) and the earliest finish over prefills and decode slots."""
        num = self.spec.num_classes
        m = model
        u = jax.random.uniform(key, (3,), dtype=jnp.dtype(self.spec.dtype))
        # abandonment: [prefill queues | decode buffers]
        rates = jnp.concatenate([m.theta * state.q_p, (m.theta[None, :] * state.q_d).ravel()])
        total = jnp.sum(rates)
        dt_abandon = jnp.where(total > 0, -jnp.log1p(-u[0]) / jnp.where(total > 0, total, 1), jnp.inf)
        t_abandon = state.t + dt_abandon.astype(jnp.float64)
        e = weighted_index(u[1], rates)
        in_buffer = e >= num
        c_ab = jnp.where(in_buffer, (e - num) % num, e).astype(_I32)
        b = jnp.where(in_buffer, (e - num) // num, 0).astype(_I32)
        room_count = jnp.where(in_buffer, state.q_d[b, c_ab] if state.q_d.shape[0] else 0, state.q_p[c_ab])
        pos = jnp.minimum(jnp.floor(u[2] * room_count), room_count - 1).astype(_I32)
        # completions: the earliest finish over prefills and decode slots (absolute float64 times)
        jobs = state.gpus
        g_pre = first_argmin(jobs.prefill_finish)
        g_dec, slot_dec = first_argmin_2d(jobs.decode_finish)
        t_pre, t_dec = jobs.prefill_finish[g_pre], jobs.decode_finish[g_dec, slot_dec]
        is_prefill = t_pre <= t_dec
        t_done = jnp.minimum(t_pre, t_dec)
        is_done = t_done <= t_abandon
        g = jnp.where(is_prefill, g_pre, g_dec).astype(_I32)
        slot = jnp.where(is_prefill, 0, slot_dec).astype(_I32)
        c_done = jnp.where(is_prefill, jobs.prefill_class[g], jobs.decode_class[g, slot])
        kind = jnp.where(is_done, jnp.where(is_prefill, PREFILL, DECODE),
                         jnp.where(in_buffer, ABANDON_BUFFER, ABANDON_QUEUE)).astype(_I32)
        return Event(t=jnp.minimum(t_abandon, t_done), kind=kind, job_class=jnp.where(is_done, c_done, c_ab).astype(_I32),
                     buffer=b, pos=pos, row=g, slot=slot)

    def consistent(self, state):
        return jnp.bool_(True)
