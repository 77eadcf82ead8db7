"""The population engine's cluster: GPUs counted by configuration, not stored one by one.

A policy whose parts are *exchangeable* (:mod:`jaxq.policies.protocol`) looks at a GPU only through
its group, its running prefill and its decodes, and picks "uniformly at random among the GPUs that
...". Two GPUs in the same *configuration* (group, class of the running prefill or none, decode streams
per class) are then exchangeable, and the number of GPUs in each configuration is itself a Markov chain
with the same law for every aggregate as the per-GPU chain (lumpability). This cluster simulates that
chain:

* the state holds ``pop[k]``, the number of GPUs in configuration k, for the K configurations allowed
  by the slots (:func:`configurations`); the configurations' attributes are constant tables;
* the policies see one row per configuration, with ``View.weight = pop`` and the empty configurations
  masked out, so ``uniform_choice`` picks a uniform GPU by weighing each row by its count;
* a completion picks a configuration in proportion to its share of the rate (count x per-GPU rate),
  exactly as the per-GPU engine picks a GPU; changing a GPU moves one unit of ``pop`` between two
  configurations through precomputed transition tables.

Everything else (arrivals, abandonment, waiting rooms, decisions, counters, time integrals, status
bits) is the event engine's (:mod:`jaxq.sim.core`). A policy with a part that is not exchangeable is
refused before tracing (:func:`jaxq.sim.engines.check`).

Cost. An event costs O(K) instead of O(n): K does not grow with n. For one class with B = 1 (the
M/M/c+M special case) K = 3; on the canonical instance (I = 2, B = 16, partitioned) K = 561, about the
per-GPU engine's cost at n = 500, and far less at n = 5,000 or 50,000. K grows like B^I / I!, so for
many classes and large batches the per-GPU engine is cheaper: :func:`num_configurations` says which.

B is a shape here (``spec.max_batch`` fixes the configurations; :func:`jaxq.sim.batch.engine_spec`
sets it to the scenario's B). A ``params.model.B`` above it raises CAPACITY_VIOLATED at the first move
the tables lack; one below it leaves some rows unused.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ..policies.view import ANY, MIXED, SOLO
from .core import AbstractCluster, Rows, gillespie_event
from .state import CAPACITY_VIOLATED, SimSpec, runs_slow

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
def configurations(num_classes: int, max_batch: int, kinds: tuple[int, ...]) -> Configurations:
    """Every configuration a GPU of the groups ``kinds`` (a partition's ``kinds``) can be in, group by
    group in that order: G_mix (a prefill of any class or none, at most B - 1 decodes), G_solo (no
    prefill, at most B decodes), "any" (at most B jobs, at most one of them a prefill)."""
    B, I = max_batch, num_classes
    rows = []
    for kind in kinds:
        if kind == MIXED:
            rows += [(MIXED, p, d) for p in range(-1, I) for d in _decode_vectors(I, B - 1)]
        elif kind == SOLO:
            rows += [(SOLO, -1, d) for d in _decode_vectors(I, B)]
        elif kind == ANY:
            rows += [(ANY, p, d) for p in range(-1, I) for d in _decode_vectors(I, B - (p >= 0))]
        else:
            raise ValueError(f"invalid field 'kinds': each must be SOLO, MIXED or ANY, got {kind!r}")
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


def num_configurations(num_classes: int, max_batch: int, kinds: tuple[int, ...] = (MIXED, SOLO)) -> int:
    """K, the population engine's per-event cost in rows (the per-GPU engine's is n)."""
    return configurations(num_classes, max_batch, tuple(kinds)).size


class PerConfiguration(AbstractCluster):
    """One row per GPU configuration; ``state.gpus`` is ``pop``, the GPUs in each (K,)."""

    spec: SimSpec = eqx.field(static=True)
    kinds: tuple[int, ...] = eqx.field(static=True)
    idle: tuple[int, ...] = eqx.field(static=True)  # the empty configuration of each kind
    tables: dict  # the Configurations' attributes, transition tables and contributions, as arrays

    def __init__(self, spec: SimSpec, kinds: tuple[int, ...]):
        if spec.max_batch is None:
            raise ValueError("invalid SimSpec field 'max_batch': the population engine needs it (the batch size B "
                             "fixes its configurations); see jaxq.sim.batch.engine_spec")
        self.spec, self.kinds = spec, tuple(kinds)
        cfg = configurations(spec.num_classes, spec.max_batch, self.kinds)
        I = spec.num_classes
        onehot = (cfg.prefill[:, None] == np.arange(I)[None, :]).astype(np.int32)
        slow = np.asarray(runs_slow(spec.convention, cfg.group, cfg.prefill))[:, None]
        contrib = np.stack([onehot, cfg.decodes * slow, cfg.decodes * ~slow, cfg.decodes * (cfg.prefill >= 0)[:, None],
                            cfg.decodes * (cfg.group == MIXED)[:, None]], axis=1).astype(np.int32)  # (K, 5, I)
        self.idle = tuple(cfg.index(kind, -1, np.zeros(I, np.int32)) for kind in self.kinds)
        self.tables = {"contrib": jnp.asarray(contrib), "add": jnp.asarray(cfg.add), "remove": jnp.asarray(cfg.remove),
                       "set_prefill": jnp.asarray(cfg.set_prefill), "group": jnp.asarray(cfg.group),
                       "prefill": jnp.asarray(cfg.prefill), "decodes": jnp.asarray(cfg.decodes),
                       "ndec": jnp.asarray(cfg.ndec)}

    def init(self, params, groups, service_key):
        """Every GPU idle, in its group's empty configuration."""
        pop = jnp.zeros((self.tables["group"].shape[0],), _I32)
        for kind, k in zip(self.kinds, self.idle):
            pop = pop.at[k].set(jnp.sum(groups == kind, dtype=_I32))
        return pop

    def rows(self, state):
        t = self.tables
        return Rows(group=t["group"], prefill_class=t["prefill"], decodes=t["decodes"], ndec=t["ndec"],
                    weight=state.gpus)

    def _move(self, state, k, new, do):
        """One GPU in configuration k moves to configuration ``new`` (where ``do``); a move the slots do
        not allow (new = -1) is refused and flagged."""
        ok = do & (k >= 0) & (new >= 0)
        kk, nn = jnp.maximum(k, 0), jnp.maximum(new, 0)
        one = ok.astype(_I32)
        contrib = self.tables["contrib"]
        delta = (contrib[nn] - contrib[kk]) * one
        return eqx.tree_at(
            lambda s: (s.gpus, s.X, s.Y_speed, s.Y_pre, s.Y_mixgroup, s.status), state,
            (state.gpus.at[kk].add(-one).at[nn].add(one), state.X + delta[_X],
             state.Y_speed + delta[_SLOW:_FAST + 1], state.Y_pre + delta[_PRE], state.Y_mixgroup + delta[_MIXGROUP],
             state.status | jnp.where(do & ~ok, CAPACITY_VIOLATED, 0)))

    def start_prefill(self, state, row, cls, do):
        do = do & (cls >= 0)
        return self._move(state, row, self.tables["set_prefill"][jnp.maximum(row, 0), jnp.maximum(cls, 0) + 1], do)

    def finish_prefill(self, state, row, do):
        c = self.tables["prefill"][jnp.maximum(row, 0)]
        after = self.tables["set_prefill"][jnp.maximum(row, 0), 0]
        return self._move(state, row, after, do & (c >= 0)), c, after

    def add_decode(self, state, row, cls, do):
        do = do & (row >= 0) & (cls >= 0)
        return self._move(state, row, self.tables["add"][jnp.maximum(row, 0), jnp.maximum(cls, 0)], do)

    def remove_decode(self, state, row, cls, slot, do):
        do = do & (row >= 0) & (cls >= 0)
        return self._move(state, row, self.tables["remove"][jnp.maximum(row, 0), jnp.maximum(cls, 0)], do)

    def completion_weights(self, state, kind, c):
        """A configuration's share of the chosen completion's rate: its count times one GPU's share."""
        t = self.tables
        slow = runs_slow(self.spec.convention, t["group"], t["prefill"])
        one = jnp.where(kind == 2, (t["prefill"] == c).astype(_I32), t["decodes"][:, c] * (slow == (kind == 3)))
        return state.gpus * one

    def next_event(self, key, model, state):
        return gillespie_event(key, model, state, lambda kind, c: self.completion_weights(state, kind, c),
                               jnp.dtype(self.spec.dtype))

    def job_table(self):
        return None  # no replay: per-GPU counts keep no job identities

    def running_job(self, state, row):
        raise ValueError("invalid field 'replay': only the general engine replays a trace's jobs")

    def consistent(self, state):
        return jnp.all(state.gpus >= 0) & (jnp.sum(state.gpus) == self.spec.num_gpus)
