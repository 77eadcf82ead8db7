"""The policy interface and the choice helpers every rule is built from.

A policy is an ``eqx.Module`` of static switches with four pure methods. The engine owns the
mechanics (slots, buffers, mode switches, events); the policy only answers questions:

* ``gate(key, view, targets) -> class`` : which class's head-of-line job takes an idle prefill slot
  (-1: leave it idle). Called only when some GPU can start a prefill.
* ``prefill_gpu(key, view, targets, cls) -> gpu`` : which of the GPUs able to start a prefill gets it.
* ``route(key, view, targets, cls, origin) -> (gpu, buffer)`` : where a job of class ``cls`` that needs
  a decode slot goes. ``origin`` is -1 for a job whose prefill just finished and ``b`` for the head of
  decode buffer ``b``. Return ``gpu >= 0`` to place it, else ``gpu = -1`` and the buffer it waits in
  (ignored for buffer heads, which simply stay).
* ``buffer_head(view, b) -> class`` : which class's job is at the head of buffer ``b`` (default: FCFS
  across classes, the oldest entry).

Static switches: ``partitioned`` (static planning into G_mix / G_solo, G_mix reserving one slot for
prefill), ``coupled`` (a decode stays in the slot of its prefill: no routing, no buffer),
``prefill_first`` (with shared slots, a freed slot goes to a new prefill before a waiting decode),
``num_buffers``. Randomness: every method that takes a key consumes it; the engine hands each call its
own key.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from ..sim.state import MIXED, SOLO, PolicyTargets, View, weighted_search


def uniform_choice(key, mask, weight=None):
    """Index of a uniformly random True entry of ``mask`` (-1 if none). O(len(mask)). With ``weight``
    (a count of GPUs per entry, :attr:`View.weight`), a uniform GPU among the entries' GPUs: entry j
    with probability proportional to mask_j x weight_j."""
    return choice_from_uniform(jax.random.uniform(key), mask, weight)


def choice_from_uniform(u, mask, weight=None):
    """:func:`uniform_choice` from a uniform ``u`` in [0, 1) already drawn. A rule that makes several
    choices draws their uniforms in one call (each ``jax.random`` call is a hash: fewer is faster)."""
    mask = mask.astype(jnp.int32) if weight is None else jnp.where(mask, weight, 0).astype(jnp.int32)
    count = jnp.sum(mask, dtype=jnp.int32)
    k = jnp.minimum(jnp.floor(u * count).astype(jnp.int32), count - 1)
    idx = weighted_search(mask, k).astype(jnp.int32)
    return jnp.where(count > 0, idx, -1)


def lexicographic_argmin(eligible, primary, secondary):
    """Index minimising ``primary`` over ``eligible``, ties broken by the smallest ``secondary``, then
    by the lowest index; -1 if nothing is eligible."""
    big = jnp.inf
    p = jnp.where(eligible, primary, big)
    tied = eligible & (p == jnp.min(p))
    s = jnp.where(tied, secondary, big)
    idx = jnp.argmin(s).astype(jnp.int32)
    return jnp.where(jnp.any(eligible), idx, -1)


def fcfs_class(heads):
    """Class of the oldest entry among per-class heads (+inf = empty); -1 if all empty."""
    idx = jnp.argmin(heads).astype(jnp.int32)
    return jnp.where(jnp.isfinite(heads[idx]), idx, -1)


class AbstractPolicy(eqx.Module):
    partitioned: eqx.AbstractClassVar[bool]
    coupled: eqx.AbstractClassVar[bool]
    prefill_first: eqx.AbstractClassVar[bool]
    num_buffers: eqx.AbstractClassVar[int]
    name: eqx.AbstractClassVar[str]
    # True for a rule that may keep prefill slots idle and later release several at one event
    admits_in_bursts: ClassVar[bool] = False
    # How the time-stepped engine places a step's decodes in bulk (it cannot call ``route`` once per
    # job and stay fast): "greedy" (G_solo first, then G_mix), "any" (every GPU alike), "split" (buffer
    # 0 to G_solo, buffer 1 to G_mix), "coupled" (the prefill's own slot). None: exact engine only.
    batch_router: ClassVar[str | None] = None

    @abc.abstractmethod
    def gate(self, key, view: View, targets: PolicyTargets):
        ...

    def prefill_gpu(self, key, view: View, targets: PolicyTargets, cls):
        """Uniformly at random among the GPUs that can start a prefill [RECON: the paper is silent]."""
        return uniform_choice(key, view.idle_prefill, view.weight)

    @abc.abstractmethod
    def route(self, key, view: View, targets: PolicyTargets, cls, origin):
        ...

    def buffer_head(self, view: View, b: int):
        return fcfs_class(view.buffer_head[b])

    def buffer_has_slot(self, view: View, targets: PolicyTargets, b: int):
        """Whether buffer b's head may take a slot now (the engine's check that no decision was left
        undone). Default: any GPU with a free decode slot. Override with a router that holds back."""
        return jnp.any(view.free_decode > 0)


# -- reusable rules ------------------------------------------------------------------------------

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


def fcfs_gate(view: View):
    """FCFS across classes by arrival time: the oldest waiting job, whatever its class."""
    return fcfs_class(view.queue_head)


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
