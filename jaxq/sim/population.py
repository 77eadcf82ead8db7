"""The population engine: the exact engine's CTMC with GPUs counted by configuration, not stored one by one.

Every policy in :mod:`jaxq.policies` treats the GPUs of a group alike: it looks at a GPU only through
its group, its running prefill and its decodes, and it picks "uniformly at random among the GPUs that
...". Two GPUs in the same *configuration* (group, class of the running prefill or none, decode streams
per class) are then exchangeable, and the number of GPUs in each configuration is itself a Markov chain
with the same law for every aggregate as the per-GPU chain (lumpability). This engine simulates that
chain:

* the state holds ``pop[k]``, the number of GPUs in configuration k, for the K configurations allowed
  by the slots (:func:`configurations`); the per-GPU fields of :class:`~jaxq.sim.state.SimState`
  (``group``, ``prefill_class``, ``decodes``, ``ndec``) hold the configurations' constant attributes;
* the policies see one row per configuration, with ``View.weight = pop`` and the empty configurations
  masked out, so ``uniform_choice`` picks a uniform GPU by weighing each row by its count;
* a completion picks a configuration in proportion to its share of the rate (count x per-GPU rate),
  exactly as the per-GPU engine picks a GPU; changing a GPU moves one unit of ``pop`` between two
  configurations through precomputed transition tables.

Everything else (arrivals on their own stream, abandonment, waiting rooms, decision rounds, counters,
time integrals, status bits) is the exact engine's code, unchanged (:class:`jaxq.sim.engine._Sim`).

Cost. An event costs O(K) instead of O(n): K does not grow with n. For one class with B = 1 (the
M/M/c+M special case) K = 3; on the canonical instance (I = 2, B = 16, partitioned) K = 561, about the
per-GPU engine's cost at n = 500, and far less at n = 5,000 or 50,000. K grows like B^I / I!, so for
many classes and large batches the per-GPU engine is cheaper: :func:`num_configurations` says which.

B is a shape here: the spec is a :class:`~jaxq.sim.general.GeneralSpec` whose ``max_batch`` fixes the
configurations (:func:`jaxq.sim.api.run` sets it to the scenario's B). A ``params.model.B`` above it
raises CAPACITY_VIOLATED at the first move the tables lack; one below it leaves some rows unused.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import TYPE_CHECKING

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from .engine import _count, _Sim, drive, make_view, stream_keys
from .engine import init_state as _exact_init_state
from .general import GeneralSpec, as_general_spec
from .state import ANY, CAPACITY_VIOLATED, DECODE_STARTED, MIXED, SOLO, SimParams, SimSpec, SimState, runs_slow

if TYPE_CHECKING:
    from ..policies.base import AbstractPolicy

_I32 = jnp.int32
# rows of the per-configuration contributions to the maintained aggregates
_X, _SLOW, _FAST, _PRE, _MIXGROUP = range(5)


@dataclasses.dataclass(frozen=True)
class Configurations:
    """The K GPU configurations of a cluster and the moves between them (numpy, int32).

    group, prefill (class or -1), decodes (K, I), ndec: the attributes of each configuration;
    add[k, c] / remove[k, c]: the configuration after a class-c decode joins / leaves (-1: not allowed);
    set_prefill[k, p + 1]: after the running prefill becomes class p (p = -1: none; -1: not allowed)."""

    group: np.ndarray
    prefill: np.ndarray
    decodes: np.ndarray
    ndec: np.ndarray
    add: np.ndarray
    remove: np.ndarray
    set_prefill: np.ndarray

    @property
    def size(self) -> int:
        return int(self.group.shape[0])

    def index(self, group: int, prefill: int, decodes) -> int:
        hit = np.flatnonzero((self.group == group) & (self.prefill == prefill)
                             & np.all(self.decodes == np.asarray(decodes), axis=1))
        if hit.size != 1:
            raise KeyError((group, prefill, tuple(decodes)))
        return int(hit[0])


def _decode_vectors(num_classes: int, most: int):
    return [d for d in itertools.product(range(most + 1), repeat=num_classes) if sum(d) <= most]


@functools.cache
def configurations(num_classes: int, max_batch: int, partitioned: bool) -> Configurations:
    """Every configuration a GPU can be in: with a partition, G_mix (a prefill of any class or none,
    at most B - 1 decodes) and G_solo (no prefill, at most B decodes); without, "any" GPUs (at most B
    jobs, at most one of them a prefill)."""
    B, I = max_batch, num_classes
    rows = []
    if partitioned:
        rows += [(MIXED, p, d) for p in range(-1, I) for d in _decode_vectors(I, B - 1)]
        rows += [(SOLO, -1, d) for d in _decode_vectors(I, B)]
    else:
        rows += [(ANY, p, d) for p in range(-1, I) for d in _decode_vectors(I, B - (p >= 0))]
    where = {r: k for k, r in enumerate(rows)}
    K = len(rows)
    add = np.full((K, I), -1, np.int32)
    remove = np.full((K, I), -1, np.int32)
    set_prefill = np.full((K, I + 1), -1, np.int32)
    for k, (g, p, d) in enumerate(rows):
        for c in range(I):
            up = d[:c] + (d[c] + 1,) + d[c + 1:]
            add[k, c] = where.get((g, p, up), -1)
            if d[c] > 0:
                remove[k, c] = where[(g, p, d[:c] + (d[c] - 1,) + d[c + 1:])]
        for q in range(-1, I):
            set_prefill[k, q + 1] = where.get((g, q, d), -1)
    return Configurations(
        group=np.array([r[0] for r in rows], np.int32), prefill=np.array([r[1] for r in rows], np.int32),
        decodes=np.array([r[2] for r in rows], np.int32).reshape(K, I),
        ndec=np.array([sum(r[2]) for r in rows], np.int32), add=add, remove=remove, set_prefill=set_prefill)


def num_configurations(num_classes: int, max_batch: int, partitioned: bool = True) -> int:
    """K, the population engine's per-event cost in rows (the per-GPU engine's is n)."""
    return configurations(num_classes, max_batch, partitioned).size


class PopulationState(SimState):
    """The exact engine's state with one row per configuration instead of one per GPU: ``group``,
    ``prefill_class``, ``decodes`` and ``ndec`` are the configurations' (constant) attributes, and
    ``pop`` counts the GPUs in each."""

    pop: Int[Array, " K"]


class _PopulationSim(_Sim):
    tables: dict  # the Configurations' transition tables and contributions, as arrays

    def view(self, params, state):
        v = make_view(self.spec, params, state)
        there = state.pop > 0
        return eqx.tree_at(lambda v: (v.free_decode, v.idle_prefill, v.weight), v,
                           (jnp.where(there, v.free_decode, 0), v.idle_prefill & there, state.pop),
                           is_leaf=lambda x: x is None)

    def _move(self, state, k, new, do):
        """One GPU in configuration k moves to configuration ``new`` (where ``do``); a move the slots do
        not allow (new = -1) is refused and flagged."""
        ok = do & (k >= 0) & (new >= 0)
        kk, nn = jnp.maximum(k, 0), jnp.maximum(new, 0)
        one = ok.astype(_I32)
        contrib = self.tables["contrib"]
        delta = (contrib[nn] - contrib[kk]) * one
        return eqx.tree_at(
            lambda s: (s.pop, s.X, s.Y_speed, s.Y_pre, s.Y_mixgroup, s.status), state,
            (state.pop.at[kk].add(-one).at[nn].add(one), state.X + delta[_X],
             state.Y_speed + delta[_SLOW:_FAST + 1], state.Y_pre + delta[_PRE], state.Y_mixgroup + delta[_MIXGROUP],
             state.status | jnp.where(do & ~ok, CAPACITY_VIOLATED, 0)))

    # -- the only functions that change a GPU ------------------------------------------------------
    def start_prefill(self, state, g, c, do):
        do = do & (c >= 0)
        return self._move(state, g, self.tables["set_prefill"][jnp.maximum(g, 0), jnp.maximum(c, 0) + 1], do)

    def finish_prefill(self, state, g, do):
        c = state.prefill_class[jnp.maximum(g, 0)]
        return self._move(state, g, self.gpu_after_prefill(g), do & (c >= 0)), c

    def add_decode(self, state, g, c, post, do):
        do = do & (g >= 0) & (c >= 0)
        state = self._move(state, g, self.tables["add"][jnp.maximum(g, 0), jnp.maximum(c, 0)], do)
        return _count(state, DECODE_STARTED, c, post, do)

    def remove_decode(self, state, g, c, do):
        do = do & (g >= 0) & (c >= 0)
        return self._move(state, g, self.tables["remove"][jnp.maximum(g, 0), jnp.maximum(c, 0)], do)

    def gpu_after_prefill(self, g):
        return self.tables["set_prefill"][jnp.maximum(g, 0), 0]

    def completion_weights(self, state, kind, c):
        # a configuration's share: its count times one GPU's share
        return state.pop * super().completion_weights(state, kind, c)

    def capacity_ok(self, params, state):
        return (super().capacity_ok(params, state) & jnp.all(state.pop >= 0)
                & (jnp.sum(state.pop) == self.spec.num_gpus))


def _tables(spec: GeneralSpec, partitioned: bool) -> tuple[Configurations, dict]:
    cfg = configurations(spec.num_classes, spec.max_batch, partitioned)
    I = spec.num_classes
    onehot = (cfg.prefill[:, None] == np.arange(I)[None, :]).astype(np.int32)
    slow = np.asarray(runs_slow(spec.convention, cfg.group, cfg.prefill))[:, None]
    contrib = np.stack([onehot, cfg.decodes * slow, cfg.decodes * ~slow, cfg.decodes * (cfg.prefill >= 0)[:, None],
                        cfg.decodes * (cfg.group == MIXED)[:, None]], axis=1).astype(np.int32)  # (K, 5, I)
    tables = {"contrib": jnp.asarray(contrib), "add": jnp.asarray(cfg.add), "remove": jnp.asarray(cfg.remove),
              "set_prefill": jnp.asarray(cfg.set_prefill)}
    return cfg, tables


def init_state(spec: GeneralSpec, params: SimParams, arrival_key, num_buffers: int,
               partitioned: bool = True) -> PopulationState:
    """Every GPU idle: G_mix's num_mixed and G_solo's n - num_mixed (or n "any" GPUs). The arrival
    stream is the exact engine's (same key: the same arrivals)."""
    base = _exact_init_state(spec, params, arrival_key, num_buffers, partitioned)  # per-GPU fields unused
    n = spec.num_gpus
    cfg, _ = _tables(spec, partitioned)
    zero = np.zeros(spec.num_classes, np.int32)
    pop = jnp.zeros((cfg.size,), _I32)
    if partitioned:
        mixed = jnp.clip(params.targets.num_mixed, 0, n).astype(_I32)
        pop = pop.at[cfg.index(MIXED, -1, zero)].set(mixed).at[cfg.index(SOLO, -1, zero)].set(n - mixed)
    else:
        pop = pop.at[cfg.index(ANY, -1, zero)].set(n)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(SimState)}
    fields.update(group=jnp.asarray(cfg.group), prefill_class=jnp.asarray(cfg.prefill),
                  decodes=jnp.asarray(cfg.decodes), ndec=jnp.asarray(cfg.ndec))
    return PopulationState(**fields, pop=pop)


def run_single(key, params: SimParams, spec: SimSpec, policy: AbstractPolicy, record_times=None,
               events_per_iteration: int = 1):
    """As :func:`jaxq.sim.engine.run_single` (same arrivals for the same key; same outputs), with the
    final state a :class:`PopulationState`. ``spec`` should be a :class:`GeneralSpec` (``max_batch`` =
    B); a plain SimSpec is accepted outside jit."""
    spec = as_general_spec(spec, params)
    if policy.num_buffers != spec.num_buffers:
        spec = dataclasses.replace(spec, num_buffers=policy.num_buffers)
    _, tables = _tables(spec, policy.partitioned)
    sim = _PopulationSim(spec, policy, tables)
    arrival_key, service_key = jax.random.split(key)
    state = init_state(spec, params, arrival_key, spec.num_buffers, policy.partitioned)
    keys = stream_keys(arrival_key, service_key, spec.num_classes)
    return drive(sim, keys, params, state, record_times, events_per_iteration)


@eqx.filter_jit
def simulate(keys, params: SimParams, spec: SimSpec, policy: AbstractPolicy, record_times=None,
             events_per_iteration: int = 1):
    """Replicas batched over ``keys`` (shape (R, ...)); ``params`` shared. Returns batched states."""
    return jax.vmap(lambda k: run_single(k, params, spec, policy, record_times, events_per_iteration))(keys)
