"""The paper's policies (MODEL.md §5) and the Sec 6.3 baselines (MODEL.md §7.3), built from parts.

| name         | admission (gate)                                   | router                                 | partition |
|--------------|----------------------------------------------------|----------------------------------------|-----------|
| gg-sp        | occupancy gate (xi rule)                           | greedy: solo first, then mixed, buffer | static    |
| priority     | static priority max D/P                            | greedy                                 | static    |
| sli          | occupancy gate                                     | split: p_solo,i, solo and mixed buffers | static   |
| fi-wsp       | FCFS across classes                                | coupled: decode stays in its prefill's slot | shared |
| gi-wsp       | occupancy gate                                     | coupled                                | shared    |
| gf-wsp       | occupancy gate (prefill first)                     | any free slot, one buffer              | shared    |
| fg-sp        | FCFS across classes                                | greedy                                 | static    |
| gg-sp-hb     | occupancy gate, held while the decode buffer is non-empty (option) | greedy                 | static    |

Every part here gives a fast bulk form for the time-stepped engine (:mod:`jaxq.policies.bulk`);
``jaxq.policies.per_job(policy)`` gives the per-job form of the same rules.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .bulk import allocate, count_draw, per_class, place
from .choice import choice_from_uniform, fcfs_class, lexicographic_argmin, uniform_choice
from .protocol import (
    PREFILL_FIRST,
    AbstractAdmission,
    AbstractRouter,
    Bulk,
    Policy,
    SharedGpus,
    StaticPartition,
)
from .view import MIXED, SOLO, PolicyTargets, View

_I32 = jnp.int32


# -- gates -----------------------------------------------------------------------------------------

def occupancy_gate(view: View, targets: PolicyTargets, allowed=True):
    """MODEL.md §5.1: among classes with waiting jobs, admit argmin xi_i; ties to the largest queue
    deviation Q_p,i - Q-dagger_i, then the lowest index; classes with x_i* = 0 are never admitted.

    xi_i = X_i/x_i* - n is ordered by X_i/x_i* alone, and that is what we compare: computing
    (X_i - n x_i*)/x_i* rounds differently per class (and per compiler: XLA may fuse the product into
    an FMA), so the exact ties at X_i = 0, frequent at small n, would be broken by rounding noise
    instead of by the queue deviation."""
    waiting = (view.q_p > 0) & (targets.x_target > 0) & allowed
    x = targets.x_target
    key = jnp.where(x > 0, view.X / jnp.where(x > 0, x, 1.0), jnp.inf)
    deviation = view.q_p - targets.q_p_target
    return lexicographic_argmin(waiting, key, -deviation)


class AbstractUniformAdmission(AbstractAdmission):
    """A gate whose admitted prefill starts on a uniformly random GPU able to take it [RECON: the paper
    is silent]; bulk form: a step's admissions fill idle GPUs from a uniformly random one."""

    exchangeable: ClassVar[bool] = True

    def prefill_gpu(self, key, view, targets, cls):
        return uniform_choice(key, view.idle_prefill, view.weight)

    places_by_count: ClassVar[bool] = True

    def place_bulk(self, key, view, targets, classes):
        return self.place_counts(key, view, targets, per_class(classes, view.X.shape[0]))

    def place_counts(self, key, view, targets, counts):
        idle = view.idle_prefill.astype(_I32)
        return place(jax.random.uniform(key, (1,)), counts[None, :], idle, [jnp.ones_like(view.idle_prefill)],
                     [jnp.sum(idle, dtype=_I32)], [0])


class OccupancyGate(AbstractUniformAdmission):
    """The gate of gate-and-route (:func:`occupancy_gate`)."""

    def gate(self, key, view, targets):
        return occupancy_gate(view, targets)


class FCFSGate(AbstractUniformAdmission):
    """FCFS across classes by arrival time: the oldest waiting job, whatever its class; every class
    admissible."""

    def gate(self, key, view, targets):
        return fcfs_class(view.queue_head)


class PriorityGate(AbstractUniformAdmission):
    """Prioritize-and-route's gate (MODEL.md §5.2): the waiting class with the largest D_i/P_i (ties:
    lowest index); every class admissible."""

    def gate(self, key, view, targets):
        return lexicographic_argmin(view.q_p > 0, -targets.priority, jnp.zeros_like(targets.priority))


class HoldBackGate(AbstractUniformAdmission):
    """The occupancy gate with a decode-aware hold-back (an option, not the paper's rule): while the
    decode buffer holds more than ``threshold`` jobs, it admits no class that the LP rations
    (q_p,i* > 0; the fully served classes still pass). At finite n, M = ceil(n sum x*) hands the spare
    prefill capacity to the class that always waits; its extra prefills overload the critically loaded
    decode stage and then abandon from the decode buffer after consuming a prefill. Holding them back
    keeps that overflow in the prefill queue, where abandoning costs nothing, and lets the idle G_mix
    GPUs decode at mu_s (docs/finite-n.md). When the buffer empties, several held slots open at once."""

    threshold: int = eqx.field(static=True, default=0)

    def gate(self, key, view, targets):
        congested = jnp.sum(view.q_d) > self.threshold
        rationed = targets.q_p_target > 0  # classes the LP does not serve in full
        return occupancy_gate(view, targets, allowed=~congested | ~rationed)


# -- routers ---------------------------------------------------------------------------------------

def greedy_route(key, view: View):
    """MODEL.md §5.1 decode router: a G_solo GPU with a free slot (uniformly), else a G_mix GPU with a
    free decode slot (uniformly), else the single FCFS buffer 0."""
    free = view.free_decode > 0
    solo = (view.group == SOLO) & free
    group = jnp.where(jnp.any(solo), solo, (view.group == MIXED) & free)
    return uniform_choice(key, group, view.weight), jnp.int32(0)


def any_free_route(key, view: View):
    """Uniformly among all GPUs with a free slot, else buffer 0."""
    return uniform_choice(key, view.free_decode > 0, view.weight), jnp.int32(0)


def _join_buffer(view: View, finished) -> Bulk:
    """Bulk routing of a step's finished prefills into buffer 0; the drain then places them with the
    jobs already waiting (a step's completions and the buffer compete in random order)."""
    num = view.X.shape[0]
    done = per_class(finished, num)
    return Bulk(decodes=jnp.zeros((num, finished.shape[0]), _I32),
                buffers=done[None, :], lost=jnp.zeros((num,), _I32))


def _drain_groups(u, view: View, masks, offsets):
    """Bulk drain of buffer 0 into groups ``masks`` in order (fill the first, then the next): the jobs
    moved are drawn from the buffer in proportion to its class counts (random order of service across
    classes) and split between groups in proportion too. ``u``: 2 x len(masks) + 1 uniforms."""
    free = jnp.maximum(view.free_decode, 0)
    room = [jnp.sum(jnp.where(mk, free, 0), dtype=_I32) for mk in masks]
    k = jnp.minimum(jnp.sum(view.q_d[0]), sum(room))
    remaining = allocate(u[0], view.q_d[0], k)
    blocks = []
    for j in range(len(masks)):
        here = allocate(u[1 + j], remaining, jnp.minimum(jnp.sum(remaining), room[j]))
        blocks.append(here)
        remaining = remaining - here
    taken = sum(blocks)
    add = place(u[1 + len(masks):], jnp.stack(blocks), free, masks, room, offsets)
    return Bulk(decodes=add, buffers=-taken[None, :], lost=jnp.zeros_like(taken))


class _FCFSBuffers(AbstractRouter):
    """One buffer, FCFS across classes; a head has a slot when some GPU has a free decode slot, and in
    bulk a step's finished prefills join the buffer (the drain then places them)."""

    def buffer_head(self, view, b):
        return fcfs_class(view.buffer_head[b])

    def has_slot(self, key, view, targets, b):
        return jnp.any(view.free_decode > 0)

    def route_bulk(self, key, view, targets, finished):
        return _join_buffer(view, finished)


class GreedyRouter(_FCFSBuffers):
    """Gate-and-route's decode router (:func:`greedy_route`): solo first, then mixed, then one FCFS
    buffer. Bulk: a step's finished prefills join the buffer; the buffer fills G_solo's free slots,
    then G_mix's (G_mix first in GPU order, as :class:`StaticPartition` lays it out)."""

    num_buffers: ClassVar[int] = 1
    exchangeable: ClassVar[bool] = True

    def route(self, key, view, targets, cls, buffer, gpu):
        return greedy_route(key, view)

    def drain_bulk(self, key, view, targets):
        free = jnp.maximum(view.free_decode, 0)
        mixed = view.group == MIXED
        offsets = [jnp.sum(jnp.where(mixed, free, 0), dtype=_I32), 0]  # G_solo's slots come after all of G_mix's
        return _drain_groups(jax.random.uniform(key, (5,)), view, [view.group == SOLO, mixed], offsets)


class AnyFreeRouter(_FCFSBuffers):
    """Uniformly among all GPUs with a free slot (:func:`any_free_route`), else one FCFS buffer."""

    num_buffers: ClassVar[int] = 1
    exchangeable: ClassVar[bool] = True

    def route(self, key, view, targets, cls, buffer, gpu):
        return any_free_route(key, view)

    def drain_bulk(self, key, view, targets):
        return _drain_groups(jax.random.uniform(key, (3,)), view, [jnp.ones_like(view.idle_prefill)], [0])


class SplitRouter(AbstractRouter):
    """The SLI-aware router (MODEL.md §5.3): a class-i job whose prefill finished targets G_solo with
    probability p_solo,i, else G_mix; it takes a GPU of that group with a free decode slot uniformly
    at random, else waits in that group's own buffer (0: solo-bound, 1: mixed-bound), FCFS across
    classes. A freed slot in a group takes that group's buffer head."""

    num_buffers: ClassVar[int] = 2
    exchangeable: ClassVar[bool] = True

    def route(self, key, view, targets, cls, buffer, gpu):
        u = jax.random.uniform(key, (2,))  # the coin and the GPU, from one draw
        to_solo = u[0] <= targets.p_solo[jnp.maximum(cls, 0)]
        # a buffer head keeps the group of its buffer: 0 -> solo, 1 -> mixed
        to_solo = jnp.where(buffer >= 0, buffer == 0, to_solo)
        group = jnp.where(to_solo, SOLO, MIXED)
        gpu = choice_from_uniform(u[1], (view.group == group) & (view.free_decode > 0), view.weight)
        return gpu, jnp.where(to_solo, 0, 1).astype(_I32)

    def buffer_head(self, view, b):
        return fcfs_class(view.buffer_head[b])

    def has_slot(self, key, view, targets, b):
        group = SOLO if b == 0 else MIXED
        return jnp.any((view.group == group) & (view.free_decode > 0))

    def route_bulk(self, key, view, targets, finished):
        num = view.X.shape[0]
        done = per_class(finished, num)
        u = jax.random.uniform(key, (num,))
        to_solo = count_draw(u, done * targets.p_solo.astype(u.dtype), done)
        return Bulk(decodes=jnp.zeros((num, finished.shape[0]), _I32), buffers=jnp.stack([to_solo, done - to_solo]),
                    lost=jnp.zeros((num,), _I32))

    def drain_bulk(self, key, view, targets):
        u = jax.random.uniform(key, (4,))
        free = jnp.maximum(view.free_decode, 0)
        masks = [view.group == SOLO, view.group == MIXED]
        room = [jnp.sum(jnp.where(mk, free, 0), dtype=_I32) for mk in masks]
        taken = jnp.stack([allocate(u[b], view.q_d[b], jnp.minimum(jnp.sum(view.q_d[b]), room[b])) for b in range(2)])
        add = place(u[2:], taken, free, masks, room, [room[1], 0])
        return Bulk(decodes=add, buffers=-taken, lost=jnp.zeros((taken.shape[1],), _I32))


class CoupledRouter(AbstractRouter):
    """Coupled "immediate" placement (FI-WSP, GI-WSP): the decode runs in the slot its prefill held, on
    the same GPU, with no buffer."""

    num_buffers: ClassVar[int] = 0
    exchangeable: ClassVar[bool] = True

    def route(self, key, view, targets, cls, buffer, gpu):
        return gpu, jnp.int32(-1)

    def buffer_head(self, view, b):
        return jnp.int32(-1)

    def has_slot(self, key, view, targets, b):
        return jnp.bool_(False)

    def route_bulk(self, key, view, targets, finished):
        num = view.X.shape[0]
        decodes = (finished[None, :] == jnp.arange(num)[:, None]).astype(_I32)
        return Bulk(decodes=decodes, buffers=jnp.zeros((0, num), _I32), lost=jnp.zeros((num,), _I32))

    def drain_bulk(self, key, view, targets):
        num = view.X.shape[0]
        return Bulk(decodes=jnp.zeros((num, view.group.shape[0]), _I32), buffers=jnp.zeros((0, num), _I32),
                    lost=jnp.zeros((num,), _I32))


# -- the policies ----------------------------------------------------------------------------------

GG_SP = Policy("gg-sp", OccupancyGate(), GreedyRouter(), StaticPartition())
PRIORITY = Policy("priority", PriorityGate(), GreedyRouter(), StaticPartition(), planning="separate")
SLI = Policy("sli", OccupancyGate(), SplitRouter(), StaticPartition())
FI_WSP = Policy("fi-wsp", FCFSGate(), CoupledRouter(), SharedGpus())
GI_WSP = Policy("gi-wsp", OccupancyGate(), CoupledRouter(), SharedGpus())
GF_WSP = Policy("gf-wsp", OccupancyGate(), AnyFreeRouter(), SharedGpus(), order=PREFILL_FIRST)
FG_SP = Policy("fg-sp", FCFSGate(), GreedyRouter(), StaticPartition())
GG_SP_HB = Policy("gg-sp-hb", HoldBackGate(), GreedyRouter(), StaticPartition())

POLICIES: dict[str, Policy] = {p.name: p for p in (GG_SP, PRIORITY, SLI, FI_WSP, GI_WSP, GF_WSP, FG_SP, GG_SP_HB)}


def get_policy(name: str) -> Policy:
    """A built-in policy by name (see POLICIES)."""
    if isinstance(name, str) and name.lower() in POLICIES:
        return POLICIES[name.lower()]
    raise ValueError(f"invalid field 'policy': must be one of {', '.join(POLICIES)}, got {name!r}")
