"""The general-service engine: the exact engine's policies with non-exponential prompt and output lengths.

The exact engine (:mod:`jaxq.sim.engine`) simulates the CTMC of MODEL.md §2, where every phase is
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
work kept, :meth:`_GeneralSim._rescale`). This is the "advance all remaining work by speed x elapsed
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

The law is data inside the step (:class:`LawArrays`): a :class:`ServiceLaw` passed to
:func:`run_single` is compiled in as constants, while ``ServiceLaw.arrays()`` passed as an argument lets
one compiled program run every law (``vmap`` over laws, as ``jaxq reproduce service-laws`` does).

The decision logic (gate, routing, buffers, counters, time integrals, status) is the exact engine's,
inherited unchanged: only the four functions that change a GPU are extended to keep the per-job work
in step, and the step itself replaces the Gillespie choice of a completion by the earliest finish.
Cost per event: one O(n x max_batch) read (the argmin of the finish times) on top of the exact
engine's O(n) passes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Key

from .engine import _count, _Sim, _slow, _weighted_index, drive, room_remove, step_keys, stream_keys
from .engine import init_state as _exact_init_state
from .state import (
    ABANDON_DECODE,
    ABANDON_PREFILL,
    ADMITTED,
    CAPACITY_VIOLATED,
    DECODE_DONE,
    DECODE_STARTED,
    NONFINITE,
    PREFILL_DONE,
    WAITED,
    SimParams,
    SimSpec,
    SimState,
    first_argmin,
    first_argmin_2d,
    runs_slow,
)

if TYPE_CHECKING:
    from ..policies.base import AbstractPolicy

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


@dataclasses.dataclass(frozen=True)
class GeneralSpec(SimSpec):
    """:class:`SimSpec` plus ``max_batch``: decode slots tracked per GPU (the scenario's B; static, it
    fixes the (n, max_batch) shape of the per-slot work). A run whose ``params.model.B`` exceeds it
    raises the CAPACITY_VIOLATED status bit when a decode finds no slot."""

    max_batch: int = dataclasses.field(kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        v = self.max_batch
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"invalid GeneralSpec field 'max_batch': must be an integer >= 1, got {v!r}")

    @classmethod
    def from_spec(cls, spec: SimSpec, max_batch: int) -> GeneralSpec:
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(SimSpec)}
        return cls(**fields, max_batch=int(max_batch))


def as_general_spec(spec: SimSpec, params: SimParams) -> GeneralSpec:
    """``spec`` itself if it is a :class:`GeneralSpec`, else one with ``max_batch`` = params.model.B,
    which must then be concrete (not traced)."""
    if isinstance(spec, GeneralSpec):
        return spec
    try:
        B = int(params.model.B)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError, TypeError) as err:
        raise ValueError("invalid field 'max_batch': under jit the general engine needs a GeneralSpec "
                         "(GeneralSpec.from_spec(spec, max_batch=B)) to fix its slot arrays") from err
    return GeneralSpec.from_spec(spec, B)


class GeneralState(SimState):
    """The exact engine's state plus each job's remaining work, stored as the absolute time at which it
    finishes at its current speed (see :func:`remaining_work` for the tokens left)."""

    prefill_finish: Float[Array, " n"]  # when the running prefill finishes (+inf if none)
    decode_finish: Float[Array, "n S"]  # when each decode slot's stream finishes at its GPU's speed (+inf: empty)
    decode_class: Int[Array, "n S"]  # class in each decode slot, -1 if empty
    length_keys: Key[Array, "2 I"]  # the length stream of each (phase, class) (see the module docstring)


def remaining_work(spec: SimSpec, params: SimParams, state: GeneralState):
    """Tokens left: (of each GPU's prefill (n,), of each decode slot (n, max_batch)); 0 where empty.
    Works on one replica or a batch (leading axes)."""
    pre, slow, fast = phase_speeds(params.model)
    t = state.t[..., None]
    speed = jnp.where(runs_slow(spec.convention, state.group, state.prefill_class), slow, fast)
    left_p = jnp.where(state.prefill_class >= 0, (state.prefill_finish - t) * pre, 0.0)
    left_d = jnp.where(state.decode_class >= 0, (state.decode_finish - t[..., None]) * speed[..., None], 0.0)
    return left_p, left_d


class _GeneralSim(_Sim):
    law: LawArrays
    means: Float[Array, "2 I"]  # (P_i, D_i): the mean lengths, from the params of this run
    speeds: Float[Array, " 3"]  # tokens/s of a prefill, a slow decode, a fast decode (phase_speeds)

    def _draw(self, state, phase: int, c, index):
        kind = self.law.kind[phase]
        mean = self.means[phase, jnp.maximum(c, 0)]
        key = jax.random.fold_in(state.length_keys[phase, jnp.maximum(c, 0)], index)
        return draw_length(key, kind, mean, self.law.cv)

    def _decode_speed(self, state, g):
        return jnp.where(_slow(self.spec, state.group[g], state.prefill_class[g]), self.speeds[1], self.speeds[2])

    def _rescale(self, state, g, old_speed, do):
        """GPU g's decode speed changed from ``old_speed``: its streams' remaining work (finish - t) x
        speed is kept, so their finish times move. Only GPU g changes speed at this instant."""
        new_speed = self._decode_speed(state, g)
        row = state.decode_finish[g]
        moved = jnp.where(jnp.isfinite(row), state.t + (row - state.t) * (old_speed / new_speed), row)
        return eqx.tree_at(lambda s: s.decode_finish, state,
                           state.decode_finish.at[g].set(jnp.where(do & (new_speed != old_speed), moved, row)))

    # -- the functions that change a GPU, extended with the per-job work ----------------------------
    def start_prefill(self, state, g, c, do):
        index = state.totals[ADMITTED, jnp.maximum(c, 0)]  # counted by the caller after this returns
        old_speed = self._decode_speed(state, g)
        state = self._rescale(super().start_prefill(state, g, c, do), g, old_speed, do)
        end = state.t + self._draw(state, PROMPT, c, index) / self.speeds[0]
        return eqx.tree_at(lambda s: s.prefill_finish, state,
                           state.prefill_finish.at[g].set(jnp.where(do, end, state.prefill_finish[g])))

    def finish_prefill(self, state, g, do):
        old_speed = self._decode_speed(state, g)
        state, c = super().finish_prefill(state, g, do)
        state = self._rescale(state, g, old_speed, do)
        return eqx.tree_at(lambda s: s.prefill_finish, state,
                           state.prefill_finish.at[g].set(jnp.where(do, jnp.inf, state.prefill_finish[g]))), c

    def add_decode(self, state, g, c, post, do):
        do = do & (g >= 0) & (c >= 0)
        gg, cc = jnp.maximum(g, 0), jnp.maximum(c, 0)
        index = state.totals[DECODE_STARTED, cc]
        state = super().add_decode(state, g, c, post, do)
        free = state.decode_class[gg] < 0
        slot = jnp.argmax(free)
        ok = do & free[slot]
        end = state.t + self._draw(state, OUTPUT, c, index) / self._decode_speed(state, gg)
        return eqx.tree_at(
            lambda s: (s.decode_finish, s.decode_class, s.status), state,
            (state.decode_finish.at[gg, slot].set(jnp.where(ok, end, state.decode_finish[gg, slot])),
             state.decode_class.at[gg, slot].set(jnp.where(ok, cc, state.decode_class[gg, slot])),
             state.status | jnp.where(do & ~ok, CAPACITY_VIOLATED, 0)))

    def remove_decode(self, state, g, c, do, slot=None):
        """Remove a finished decode of class ``c`` from GPU ``g``; ``slot`` is its slot (required)."""
        if slot is None:
            raise TypeError("the general engine's remove_decode needs the finished decode's slot")
        state = super().remove_decode(state, g, c, do)
        do = do & (g >= 0) & (c >= 0)
        gg = jnp.maximum(g, 0)
        return eqx.tree_at(
            lambda s: (s.decode_finish, s.decode_class), state,
            (state.decode_finish.at[gg, slot].set(jnp.where(do, jnp.inf, state.decode_finish[gg, slot])),
             state.decode_class.at[gg, slot].set(jnp.where(do, -1, state.decode_class[gg, slot]))))

    # -- one step --------------------------------------------------------------------------------
    def step(self, keys, params, state, seg_end):
        spec = self.spec
        num = spec.num_classes
        class_keys, service_keys = keys
        k_event, *k_decide = step_keys(service_keys, state.step)
        dtype = jnp.dtype(spec.dtype)
        u = jax.random.uniform(k_event, (3,), dtype=dtype)
        m = jax.tree_util.tree_map(lambda a: a.astype(dtype), params.model)

        # abandonment: a Gillespie clock on theta x waiting jobs [prefill queues | decode buffers]
        rates = jnp.concatenate([m.theta * state.q_p, (m.theta[None, :] * state.q_d).ravel()])
        total = jnp.sum(rates)
        dt_abandon = jnp.where(total > 0, -jnp.log1p(-u[0]) / jnp.where(total > 0, total, 1), jnp.inf)
        dt_abandon = dt_abandon.astype(jnp.float64)
        # completions: the earliest finish over prefills and decode slots (absolute float64 times)
        g_pre = first_argmin(state.prefill_finish)
        g_dec, slot_dec = first_argmin_2d(state.decode_finish)
        t_pre, t_dec = state.prefill_finish[g_pre], state.decode_finish[g_dec, slot_dec]
        is_prefill = t_pre <= t_dec
        t_done = jnp.minimum(t_pre, t_dec)
        cls_arrival = jnp.argmin(state.next_arrival).astype(_I32)
        t_arrival = state.next_arrival[cls_arrival]
        t_abandon = state.t + dt_abandon
        t_service = jnp.minimum(t_abandon, t_done)
        is_arrival = t_arrival <= t_service
        is_done = ~is_arrival & (t_done <= t_abandon)
        t_next = jnp.minimum(t_arrival, t_service)
        stop = t_next > seg_end
        t_new = jnp.where(stop, seg_end, t_next)
        # (remaining work needs no update: finish times are absolute and speeds constant between events)
        state = self.integrate(params, state, t_new)
        live = ~stop
        post = t_new >= params.warmup
        waiting_before = state.q_p[cls_arrival]

        # -- an arrival (own stream, exactly as the exact engine) -------------------------------
        arrive = live & is_arrival
        state = self.arrive(class_keys, m, state, cls_arrival, t_arrival, post, arrive)

        # -- an abandonment: kind and class by rate, then a uniformly chosen waiting job -----------
        abandon = live & ~is_arrival & ~is_done
        e = _weighted_index(u[1], rates)
        kind = (e >= num).astype(_I32)
        c = jnp.where(kind == 1, (e - num) % num, e).astype(_I32)
        b = jnp.where(kind == 1, (e - num) // num, 0)
        room_count = jnp.where(kind == 0, state.q_p[c], state.q_d[b, c])
        pos = jnp.minimum(jnp.floor(u[2] * room_count), room_count - 1).astype(_I32)
        state = room_remove(state, "queue", c, pos, abandon & (kind == 0))
        state = room_remove(state, "buffers", self.buffer_row(b, c), pos, abandon & (kind == 1))
        state = _count(state, ABANDON_PREFILL, c, post, abandon & (kind == 0))
        state = _count(state, ABANDON_DECODE, c, post, abandon & (kind == 1))

        # -- a completion: the earliest finish ----------------------------------------------------
        done = live & is_done
        g = jnp.where(is_prefill, g_pre, g_dec).astype(_I32)
        slot = jnp.where(is_prefill, 0, slot_dec).astype(_I32)
        prefill_done = done & is_prefill
        state, pending_cls = self.finish_prefill(state, g, prefill_done)
        state = _count(state, PREFILL_DONE, pending_cls, post, prefill_done)
        decode_done = done & ~is_prefill
        c_dec = state.decode_class[g, slot]
        state = self.remove_decode(state, g, c_dec, decode_done, slot)
        state = _count(state, DECODE_DONE, c_dec, post, decode_done)

        pending_cls = jnp.where(prefill_done, pending_cls, -1)
        state = self.decide(k_decide, params, state, pending_cls, g, post, live)
        state = _count(state, WAITED, cls_arrival, post, arrive & (state.q_p[cls_arrival] > waiting_before))
        bad = ~jnp.isfinite(t_next) & live
        return eqx.tree_at(lambda s: (s.step, s.status), state,
                           (state.step + 1, state.status | jnp.where(bad, NONFINITE, 0)))


def init_state(spec: GeneralSpec, params: SimParams, arrival_key, length_key, num_buffers: int,
               partitioned: bool = True) -> GeneralState:
    """The exact engine's empty state (same arrival stream) plus empty per-job work."""
    base = _exact_init_state(spec, params, arrival_key, num_buffers, partitioned)
    n, S = spec.num_gpus, spec.max_batch
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(SimState)}
    return GeneralState(**fields, prefill_finish=jnp.full((n,), jnp.inf),
                        decode_finish=jnp.full((n, S), jnp.inf), decode_class=jnp.full((n, S), -1, _I32),
                        length_keys=jax.vmap(lambda p: jax.vmap(lambda c: jax.random.fold_in(
                            jax.random.fold_in(length_key, p), c))(jnp.arange(spec.num_classes)))(jnp.arange(2)))


def run_single(key, params: SimParams, spec: SimSpec, policy: AbstractPolicy, record_times=None,
               events_per_iteration: int = 1, *, law: ServiceLaw | LawArrays | str = "exponential"):
    """Simulate one replica under ``law`` from an empty system to ``params.horizon``. Consumes ``key``.

    ``law`` is a :class:`ServiceLaw` or law name (compiled in as constants), or :class:`LawArrays`
    (data: ``vmap`` over it, or pass new laws without recompiling).

    As :func:`jaxq.sim.engine.run_single` (same arrivals for the same key; same outputs), with the final
    state a :class:`GeneralState`. ``spec`` should be a :class:`GeneralSpec`; a plain SimSpec is
    accepted outside jit (max_batch is then ``params.model.B``)."""
    law = law if isinstance(law, LawArrays) else ServiceLaw.of(law).arrays()
    spec = as_general_spec(spec, params)
    if policy.num_buffers != spec.num_buffers:
        spec = dataclasses.replace(spec, num_buffers=policy.num_buffers)
    means = jnp.stack([params.model.P, params.model.D]).astype(jnp.float64)
    speeds = jnp.stack([jnp.asarray(v, jnp.float64) for v in phase_speeds(params.model)])
    sim = _GeneralSim(spec, policy, law, means, speeds)
    arrival_key, service_key = jax.random.split(key)  # the exact engine's split: common arrivals
    length_key = jax.random.fold_in(service_key, 2**31 - 1)
    state = init_state(spec, params, arrival_key, length_key, spec.num_buffers, policy.partitioned)
    keys = stream_keys(arrival_key, service_key, spec.num_classes)
    return drive(sim, keys, params, state, record_times, events_per_iteration)


@eqx.filter_jit
def simulate(keys, params: SimParams, spec: SimSpec, policy: AbstractPolicy, record_times=None,
             events_per_iteration: int = 1, law: ServiceLaw | LawArrays | str = "exponential"):
    """Replicas batched over ``keys`` (shape (R, ...)); ``params`` shared. Returns batched states."""
    return jax.vmap(lambda k: run_single(k, params, spec, policy, record_times, events_per_iteration, law=law))(keys)
