"""The policy protocol: what every engine asks a policy, as pure functions.

A :class:`Policy` is a name and three parts, each an ``eqx.Module`` of pure methods:

* an **admission** (:class:`AbstractAdmission`): the gate, which class's head-of-line job takes an
  idle prefill slot (-1: leave it idle), and which GPU the admitted prefill takes;
* a **router** (:class:`AbstractRouter`): where a job that needs a decode slot goes (a GPU, or one of
  the router's ``num_buffers`` decode buffers), and which class heads each buffer;
* a **partition** (:class:`AbstractPartition`): each GPU's group (G_mix, G_solo, or "any").

plus the ``order`` of the three decisions after an event (``DECODE_FIRST``: route the job whose
prefill finished, refill decode slots from the buffers, then admit; ``PREFILL_FIRST``: admit first, so
that a freed shared slot goes to a new prefill before a waiting decode) and the LP that plans it.

Every engine calls these and nothing else: the engine owns slots, buffers, mode switches and events;
the policy only answers questions about a :class:`~jaxq.policies.view.View`. Keys are consumed: the
engine gives each call its own.

**Per job and in bulk.** The event engines ask one job at a time. A time-stepped engine makes a step's
decisions together, through each part's bulk form (``place_bulk``, ``route_bulk``, ``drain_bulk``).
A part written per job gets its bulk form for free by subclassing :class:`AbstractPerJobAdmission`
or :class:`AbstractPerJobRouter` (the step's jobs are decided one after another, each an O(rows)
call); the built-in parts give faster bulk forms of the same rules, and :class:`PerJobAdmission` /
:class:`PerJobRouter` wrap any part to get the per-job form back (tests compare the two).

**Exchangeable parts.** The population engine keeps GPUs as counts per configuration, which is exact
only for a policy that treats GPUs of one configuration alike (chooses among them uniformly, through
``View.weight``). Each part declares ``exchangeable``; the population engine refuses a policy with a
part that does not.
"""


import abc
from typing import ClassVar

import equinox as eqx
from equinox import AbstractClassVar
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from .bulk import race
from .choice import fcfs_class, weighted_search
from .view import ANY, MIXED, SOLO, PolicyTargets, View

_I32 = jnp.int32

ROUTE, DRAIN, ADMIT = "route", "drain", "admit"
DECODE_FIRST = (ROUTE, DRAIN, ADMIT)
PREFILL_FIRST = (ADMIT, ROUTE, DRAIN)
PLANNING = ("bundled", "separate")


class Bulk(eqx.Module):
    """One step's bulk decision: decode streams started per class and GPU (class-major), the change
    of each decode buffer's count per class (+ joined, - left), and the jobs per class that a router
    without buffers failed to place (the engine counts them lost and flags the replica)."""

    decodes: Int[Array, "I n"]
    buffers: Int[Array, "NB I"]
    lost: Int[Array, " I"]


# -- the parts ---------------------------------------------------------------------------------

class AbstractPartition(eqx.Module):
    """Each GPU's group. ``kinds`` names the groups it may use (static: they fix the population
    engine's configurations)."""

    kinds: AbstractClassVar[tuple[int, ...]]

    @abc.abstractmethod
    def groups(self, targets: PolicyTargets, n: int) -> Int[Array, " n"]:
        """The group (SOLO, MIXED or ANY) of each of the n GPUs, constant over a run."""


class AbstractAdmission(eqx.Module):
    """Admission to prefill: the gate and the GPU an admitted prefill takes."""

    exchangeable: AbstractClassVar[bool]

    @abc.abstractmethod
    def gate(self, key, view: View, targets: PolicyTargets) -> Int[Array, ""]:
        """The class whose head-of-line job takes an idle prefill slot now, or -1 (leave it idle).
        Asked again after each admission while slots are idle, so a gate that holds slots back can
        release several at one event."""

    @abc.abstractmethod
    def prefill_gpu(self, key, view: View, targets: PolicyTargets, cls) -> Int[Array, ""]:
        """Which GPU (row) with ``view.idle_prefill`` starts the admitted class-``cls`` prefill."""

    @abc.abstractmethod
    def place_bulk(self, key, view: View, targets: PolicyTargets, classes) -> Int[Array, "I n"]:
        """Where a time step's admissions go: ``classes`` (n,) holds the admitted classes in the order
        the gate chose them (-1 after the last); returns the prefills started per class and GPU, at
        most one per GPU with ``view.idle_prefill``."""

    #: True when the bulk placement depends only on how many jobs of each class were admitted, not on
    #: the order the gate chose them in. Such an admission also defines
    #: ``place_counts(key, view, targets, counts)``: ``place_bulk`` from the counts per class (I,).
    #: The time-stepped engine then calls it and does not record the gate's order (an (n,) array
    #: that its admission loop would otherwise carry, and copy, at every admission).
    places_by_count: ClassVar[bool] = False


class AbstractRouter(eqx.Module):
    """Decode placement: a GPU for each job that needs a decode slot, or a decode buffer to wait in."""

    num_buffers: AbstractClassVar[int]
    exchangeable: AbstractClassVar[bool]

    @abc.abstractmethod
    def route(self, key, view: View, targets: PolicyTargets, cls, buffer, gpu):
        """Where a class-``cls`` job needing a decode slot goes: ``(gpu, buffer)``. ``buffer`` is -1
        for a job whose prefill just finished on row ``gpu``, and b >= 0 for the head of buffer b
        (``gpu`` is then -1). Return a row with a free decode slot to place it there, else gpu = -1 and
        the buffer it waits in (ignored for a buffer head, which stays where it is). A router without
        buffers must always place."""

    @abc.abstractmethod
    def buffer_head(self, view: View, b: int) -> Int[Array, ""]:
        """The class whose job is at the head of buffer ``b`` (-1: empty)."""

    @abc.abstractmethod
    def has_slot(self, key, view: View, targets: PolicyTargets, b: int):
        """Whether buffer ``b``'s head would take a slot now (the engines' check that no decision was
        left undone after an event)."""

    @abc.abstractmethod
    def route_bulk(self, key, view: View, targets: PolicyTargets, finished) -> Bulk:
        """A time step's jobs whose prefill finished: ``finished`` (n,) is the class of the prefill
        that finished on each GPU this step (-1: none)."""

    @abc.abstractmethod
    def drain_bulk(self, key, view: View, targets: PolicyTargets) -> Bulk:
        """Buffered jobs into free decode slots at the end of a time step."""


class Policy(eqx.Module):
    """A policy: a name, its three parts, the order of its decisions and the LP that plans it
    ("bundled" or "separate", MODEL.md §4). Static (no arrays): the plan's numbers come to every call
    as ``targets``."""

    name: str = eqx.field(static=True)
    admission: AbstractAdmission
    router: AbstractRouter
    partition: AbstractPartition
    order: tuple[str, ...] = eqx.field(static=True, default=DECODE_FIRST)
    planning: str = eqx.field(static=True, default="bundled")

    def __check_init__(self):
        for field, value, kind in (("admission", self.admission, AbstractAdmission),
                                   ("router", self.router, AbstractRouter),
                                   ("partition", self.partition, AbstractPartition)):
            if not isinstance(value, kind):
                raise ValueError(f"invalid Policy field '{field}': must be a {kind.__name__}, got {value!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"invalid Policy field 'name': must be a non-empty string, got {self.name!r}")
        if sorted(self.order) != sorted(DECODE_FIRST):
            raise ValueError(f"invalid Policy field 'order': must order {', '.join(DECODE_FIRST)} (each once), "
                             f"got {self.order!r}")
        if self.planning not in PLANNING:
            raise ValueError(f"invalid Policy field 'planning': must be one of {', '.join(PLANNING)}, "
                             f"got {self.planning!r}")
        nb = self.router.num_buffers
        if isinstance(nb, bool) or not isinstance(nb, int) or not 0 <= nb <= 2:
            raise ValueError(f"invalid field 'num_buffers' of router {type(self.router).__name__}: must be 0, 1 or 2, "
                             f"got {nb!r}")

    @property
    def num_buffers(self) -> int:
        return self.router.num_buffers

    @property
    def exchangeable(self) -> bool:
        """Whether every part treats GPUs of one configuration alike (the population engine needs it)."""
        return bool(self.admission.exchangeable and self.router.exchangeable)

    def not_exchangeable(self) -> list[str]:
        return [type(p).__name__ for p in (self.admission, self.router) if not p.exchangeable]


# -- bulk forms from per-job decisions -----------------------------------------------------------

def _jth(mask, j):
    """Index of the j-th (0-based) True entry of ``mask``."""
    return weighted_search(mask.astype(_I32), j).astype(_I32)


def _placed(view: View, gpu, cls, ok):
    """The view after a class-``cls`` decode joins row ``gpu`` (where ``ok``)."""
    g, c = jnp.maximum(gpu, 0), jnp.maximum(cls, 0)
    one = ok.astype(_I32)
    return eqx.tree_at(lambda v: (v.decodes, v.free_decode), view,
                       (view.decodes.at[g, c].add(one), view.free_decode.at[g].add(-one)))


def per_job_route_bulk(router: AbstractRouter, key, view: View, targets: PolicyTargets, finished) -> Bulk:
    """``route_bulk`` by one ``route`` call per job: the step's finished prefills in turn (from a random
    one, cyclically), each seeing the placements before it. In a step jobs have no individual ages,
    so buffer heads are a race (:func:`jaxq.policies.bulk.race`)."""
    rows, num = view.decodes.shape
    nb = router.num_buffers
    todo = finished >= 0
    count = jnp.sum(todo, dtype=_I32)
    first = jnp.floor(jax.random.uniform(jax.random.fold_in(key, 2**30)) * count).astype(_I32)

    def body(carry):
        j, v, added, buffered, lost = carry
        idx = first + j
        g = _jth(todo, jnp.where(idx >= count, idx - count, idx))
        cls = finished[g]
        k_race, k_route = jax.random.split(jax.random.fold_in(key, j))
        v = eqx.tree_at(lambda w: w.buffer_head, v, race(k_race, v.q_d))
        gpu, b = router.route(k_route, v, targets, cls, jnp.int32(-1), g)
        ok = gpu >= 0
        v = _placed(v, gpu, cls, ok)
        added = added.at[jnp.maximum(cls, 0), jnp.maximum(gpu, 0)].add(ok.astype(_I32))
        wait = (~ok).astype(_I32)
        if nb:
            bb = jnp.clip(b, 0, nb - 1)
            v = eqx.tree_at(lambda w: w.q_d, v, v.q_d.at[bb, cls].add(wait))
            buffered = buffered.at[bb, cls].add(wait)
        else:
            lost = lost.at[cls].add(wait)
        return j + 1, v, added, buffered, lost

    init = (jnp.int32(0), view, jnp.zeros((num, rows), _I32), jnp.zeros((nb, num), _I32), jnp.zeros((num,), _I32))
    _, _, added, buffered, lost = jax.lax.while_loop(lambda c: c[0] < count, body, init)
    return Bulk(decodes=added, buffers=buffered, lost=lost)


def per_job_drain_bulk(router: AbstractRouter, key, view: View, targets: PolicyTargets) -> Bulk:
    """``drain_bulk`` by one ``buffer_head`` and ``route`` call per job: each buffer's heads take slots
    while the router places them (heads are a race, as in :func:`per_job_route_bulk`)."""
    rows, num = view.decodes.shape
    nb = router.num_buffers
    added = jnp.zeros((num, rows), _I32)
    taken = jnp.zeros((nb, num), _I32)
    bound = jnp.sum(jnp.maximum(view.free_decode, 0), dtype=_I32)
    for b in range(nb):
        def body(carry, b=b):
            j, v, added, taken, _ = carry
            k_race, k_route = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, b), j))
            v = eqx.tree_at(lambda w: w.buffer_head, v, race(k_race, v.q_d))
            cls = router.buffer_head(v, b)
            gpu, _ = router.route(k_route, v, targets, cls, jnp.int32(b), jnp.int32(-1))
            ok = (cls >= 0) & (gpu >= 0)
            c = jnp.maximum(cls, 0)
            v = _placed(v, gpu, cls, ok)
            v = eqx.tree_at(lambda w: w.q_d, v, v.q_d.at[b, c].add(-ok.astype(_I32)))
            added = added.at[c, jnp.maximum(gpu, 0)].add(ok.astype(_I32))
            taken = taken.at[b, c].add(ok.astype(_I32))
            return j + 1, v, added, taken, ok

        init = (jnp.int32(0), view, added, taken, jnp.bool_(True))
        _, view, added, taken, _ = jax.lax.while_loop(lambda c: c[4] & (c[0] <= bound), body, init)
    return Bulk(decodes=added, buffers=-taken, lost=jnp.zeros((num,), _I32))


def per_job_place_bulk(admission: AbstractAdmission, key, view: View, targets: PolicyTargets, classes):
    """``place_bulk`` by one ``prefill_gpu`` call per admission, in the gate's order."""
    rows, num = view.decodes.shape
    count = jnp.sum(classes >= 0, dtype=_I32)

    def body(carry):
        j, v, out = carry
        cls = classes[j]
        g = admission.prefill_gpu(jax.random.fold_in(key, j), v, targets, cls)
        ok = (g >= 0) & (cls >= 0)
        gg = jnp.maximum(g, 0)
        v = eqx.tree_at(lambda w: (w.idle_prefill, w.prefill_class), v,
                        (v.idle_prefill.at[gg].set(v.idle_prefill[gg] & ~ok),
                         v.prefill_class.at[gg].set(jnp.where(ok, cls, v.prefill_class[gg]))))
        return j + 1, v, out.at[jnp.maximum(cls, 0), gg].add(ok.astype(_I32))

    _, _, out = jax.lax.while_loop(lambda c: c[0] < count, body, (jnp.int32(0), view, jnp.zeros((num, rows), _I32)))
    return out


class AbstractPerJobAdmission(AbstractAdmission):
    """An admission written per job (``gate`` and ``prefill_gpu``); its bulk form calls ``prefill_gpu``
    once per admission."""

    def place_bulk(self, key, view, targets, classes):
        return per_job_place_bulk(self, key, view, targets, classes)


class AbstractPerJobRouter(AbstractRouter):
    """A router written per job (``route``): buffers are FCFS across classes, a buffer head has a slot
    when ``route`` would place it, and the bulk forms call ``route`` once per job."""

    def buffer_head(self, view, b):
        return fcfs_class(view.buffer_head[b])

    def has_slot(self, key, view, targets, b):
        cls = self.buffer_head(view, b)
        return (cls >= 0) & (self.route(key, view, targets, cls, jnp.int32(b), jnp.int32(-1))[0] >= 0)

    def route_bulk(self, key, view, targets, finished):
        return per_job_route_bulk(self, key, view, targets, finished)

    def drain_bulk(self, key, view, targets):
        return per_job_drain_bulk(self, key, view, targets)


class PerJobAdmission(AbstractAdmission):
    """``inner`` with its bulk form replaced by per-job ``prefill_gpu`` calls (to compare the two)."""

    inner: AbstractAdmission

    def __init__(self, inner: AbstractAdmission):
        self.inner = inner

    @property
    def exchangeable(self) -> bool:  # type: ignore[override]
        return self.inner.exchangeable

    def gate(self, key, view, targets):
        return self.inner.gate(key, view, targets)

    def prefill_gpu(self, key, view, targets, cls):
        return self.inner.prefill_gpu(key, view, targets, cls)

    def place_bulk(self, key, view, targets, classes):
        return per_job_place_bulk(self, key, view, targets, classes)


class PerJobRouter(AbstractRouter):
    """``inner`` with its bulk forms replaced by per-job ``buffer_head`` and ``route`` calls."""

    inner: AbstractRouter

    def __init__(self, inner: AbstractRouter):
        self.inner = inner

    @property
    def exchangeable(self) -> bool:  # type: ignore[override]
        return self.inner.exchangeable

    @property
    def num_buffers(self) -> int:  # type: ignore[override]
        return self.inner.num_buffers

    def route(self, key, view, targets, cls, buffer, gpu):
        return self.inner.route(key, view, targets, cls, buffer, gpu)

    def buffer_head(self, view, b):
        return self.inner.buffer_head(view, b)

    def has_slot(self, key, view, targets, b):
        return self.inner.has_slot(key, view, targets, b)

    def route_bulk(self, key, view, targets, finished):
        return per_job_route_bulk(self, key, view, targets, finished)

    def drain_bulk(self, key, view, targets):
        return per_job_drain_bulk(self, key, view, targets)


def per_job(policy: Policy) -> Policy:
    """``policy`` with every bulk form replaced by its per-job decisions (same name and rules)."""
    return Policy(policy.name, PerJobAdmission(policy.admission), PerJobRouter(policy.router), policy.partition,
                  policy.order, policy.planning)


# -- partitions --------------------------------------------------------------------------------

class StaticPartition(AbstractPartition):
    """Static planning (MODEL.md §5.1): the first ``targets.num_mixed`` GPUs are G_mix, the rest G_solo
    (contiguous ranges, G_mix first: the built-in bulk routers rely on it)."""

    kinds: ClassVar[tuple[int, ...]] = (MIXED, SOLO)

    def groups(self, targets, n):
        return jnp.where(jnp.arange(n) < targets.num_mixed, MIXED, SOLO).astype(_I32)


class SharedGpus(AbstractPartition):
    """No partition: every GPU is "any" (at most B jobs, at most one of them a prefill)."""

    kinds: ClassVar[tuple[int, ...]] = (ANY,)

    def groups(self, targets, n):
        return jnp.full((n,), ANY, _I32)
