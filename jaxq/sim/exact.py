"""The exact engine's cluster: one row per GPU (MODEL.md §2.2).

Each GPU carries its group, the class of its running prefill (or none) and its decodes per class;
the per-class aggregates of :class:`~jaxq.sim.core.EventState` are kept in step by the four functions
that change a GPU, so an event costs O(I) to pick its kind and class plus one O(n) pass to pick its
GPU (its share of the chosen completion's rate), and each decision one O(n) pass.
"""


import equinox as eqx
from equinox import AbstractVar
import jax.numpy as jnp
from jaxtyping import Array, Int

from ..policies.view import MIXED
from .core import FAST, SLOW, AbstractCluster, Rows, gillespie_event
from .state import SimSpec, runs_slow

_I32 = jnp.int32


class AbstractGpuArrays(eqx.Module):
    """Per-GPU arrays: what :class:`PerGpu` reads and writes (an engine may keep more beside them)."""

    group: AbstractVar[Int[Array, " n"]]  # SOLO / MIXED / ANY (constant over a run: static planning)
    prefill_class: AbstractVar[Int[Array, " n"]]  # class of the running prefill, -1 if none
    decodes: AbstractVar[Int[Array, "n I"]]  # decode streams per GPU and class
    ndec: AbstractVar[Int[Array, " n"]]  # decode streams per GPU


class GpuArrays(AbstractGpuArrays):
    group: Int[Array, " n"]
    prefill_class: Int[Array, " n"]
    decodes: Int[Array, "n I"]
    ndec: Int[Array, " n"]

    @classmethod
    def empty(cls, groups, num_classes: int) -> "GpuArrays":
        n = groups.shape[0]
        return cls(group=groups, prefill_class=jnp.full((n,), -1, _I32), decodes=jnp.zeros((n, num_classes), _I32),
                   ndec=jnp.zeros((n,), _I32))


class PerGpu(AbstractCluster):
    """One row per GPU; completions chosen by their rates (Gillespie)."""

    spec: SimSpec = eqx.field(static=True)

    def init(self, params, groups, service_key):
        return GpuArrays.empty(groups, self.spec.num_classes)

    def rows(self, state):
        g = state.gpus
        return Rows(group=g.group, prefill_class=g.prefill_class, decodes=g.decodes, ndec=g.ndec, weight=None)

    def _slow(self, group, prefill_class):
        return runs_slow(self.spec.convention, group, prefill_class)

    def _retime(self, state, g, new_prefill_class, do):
        """Set GPU g's prefill class; move its decodes between the speed and prefill aggregates."""
        gpus = state.gpus
        old = gpus.prefill_class[g]
        new = jnp.where(do, new_prefill_class, old)
        row = gpus.decodes[g]
        was_slow = self._slow(gpus.group[g], old)
        is_slow = self._slow(gpus.group[g], new)
        moved = (was_slow != is_slow).astype(_I32)
        sign = jnp.where(is_slow, 1, -1) * moved  # +1: FAST -> SLOW
        Y_speed = state.Y_speed.at[SLOW].add(sign * row).at[FAST].add(-sign * row)
        pre_sign = (new >= 0).astype(_I32) - (old >= 0).astype(_I32)
        return eqx.tree_at(lambda s: (s.gpus.prefill_class, s.Y_speed, s.Y_pre), state,
                           (gpus.prefill_class.at[g].set(new), Y_speed, state.Y_pre + pre_sign * row))

    def start_prefill(self, state, row, cls, do):
        state = self._retime(state, row, cls, do)
        return eqx.tree_at(lambda s: s.X, state, state.X.at[jnp.maximum(cls, 0)].add(do.astype(_I32)))

    def finish_prefill(self, state, row, do):
        c = state.gpus.prefill_class[row]
        state = eqx.tree_at(lambda s: s.X, state, state.X.at[jnp.maximum(c, 0)].add(-(do & (c >= 0)).astype(_I32)))
        return self._retime(state, row, jnp.int32(-1), do), c, row

    def _change_decode(self, state, g, c, delta):
        gpus = state.gpus
        g, c = jnp.maximum(g, 0), jnp.maximum(c, 0)
        speed = jnp.where(self._slow(gpus.group[g], gpus.prefill_class[g]), SLOW, FAST)
        return eqx.tree_at(
            lambda s: (s.gpus.decodes, s.gpus.ndec, s.Y_speed, s.Y_pre, s.Y_mixgroup), state,
            (gpus.decodes.at[g, c].add(delta), gpus.ndec.at[g].add(delta), state.Y_speed.at[speed, c].add(delta),
             state.Y_pre.at[c].add(delta * (gpus.prefill_class[g] >= 0)),
             state.Y_mixgroup.at[c].add(delta * (gpus.group[g] == MIXED))),
        )

    def add_decode(self, state, row, cls, do):
        return self._change_decode(state, row, cls, (do & (row >= 0) & (cls >= 0)).astype(_I32))

    def remove_decode(self, state, row, cls, slot, do):
        return self._change_decode(state, row, cls, -(do & (row >= 0) & (cls >= 0)).astype(_I32))

    def completion_weights(self, state, kind, c):
        """Each GPU's share of the chosen completion's rate: its class-c prefill (kind 2) or its class-c
        decodes at mu_m (kind 3) or at mu_s (kind 4)."""
        gpus = state.gpus
        slow = self._slow(gpus.group, gpus.prefill_class)
        return jnp.where(kind == 2, (gpus.prefill_class == c).astype(_I32), gpus.decodes[:, c] * (slow == (kind == 3)))

    def next_event(self, key, model, state):
        return gillespie_event(key, model, state, lambda kind, c: self.completion_weights(state, kind, c),
                               jnp.dtype(self.spec.dtype))

    def job_table(self):
        return None  # no replay: per-GPU counts keep no job identities

    def running_job(self, state, row):
        raise ValueError("invalid field 'replay': only the general engine replays a trace's jobs")

    def consistent(self, state):
        return jnp.bool_(True)
