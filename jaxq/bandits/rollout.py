"""Scanned rollouts: rounds under ``lax.scan``, algorithms vmapped inside a round, seeds batched outside.

One replica (seed) runs a stack of A algorithms on the same stream: each round draws the contexts and the
noise once and every algorithm acts on them (common random numbers). Rounds are grouped into blocks of
``record_every``: an inner scan over the rounds of a block and an outer scan over blocks, with the exact
Gram refresh and one record per block, so memory is O(blocks x A), not O(T x A).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from . import algorithms as alg
from . import suplinucb as sup
from .env import BanditSpec, Problem, draw_round, round_key


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Horizon and recording resolution (static: they fix the scan lengths)."""

    T: int
    record_every: int = 50

    def __post_init__(self):
        for name in ("T", "record_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid run field '{name}': must be an integer >= 1, got {value!r}")
        if self.T % self.record_every:
            raise ValueError(f"invalid run field 'T': must be a multiple of record_every = {self.record_every}, "
                             f"got {self.T}")

    @property
    def blocks(self) -> int:
        return self.T // self.record_every


class Record(NamedTuple):
    """One row per block and algorithm (leading axes: blocks B, algorithms A)."""

    regret: Float[Array, "B A"]  # cumulative pseudo-regret at the end of the block
    pooled: Int[Array, "B A"]  # rounds of the block whose chosen arm's min-UCB came from the pooled branch
    viol_on: Int[Array, "B A"]  # (arm, round) pairs of the block with <x,θ> outside the online interval
    viol_pool: Int[Array, "B A"]  # ... outside the pooled interval
    eval_on: Int[Array, "B A"]  # (arm, round) pairs where the online interval was evaluated
    eval_pool: Int[Array, "B A"]
    cert_ok: Bool[Array, "B A"]  # the learned certificate in force at the block end contains Δ (else False)


def _certificate_holds(params: alg.MinUCBParams, state: alg.MinUCBState, shift):
    """Whether the learned certificate in force contains Δ: every |<u_k, Δ>| <= c_k for the box form,
    Δᵀ M̂ Δ = (1/d) Σ (<u_k, Δ>/c_k)² <= 1 for the ellipsoid (meaningful for the learned variant only)."""
    proj = jnp.abs(state.basis.T @ shift)
    box_ok = jnp.all(proj <= state.cert_c)
    ell_ok = jnp.mean((proj / state.cert_c) ** 2) <= 1.0
    return params.learned & jnp.where(params.box, box_ok, ell_ok)


@dataclasses.dataclass(frozen=True)
class MinUCBFamily:
    """OFUL, the warm starts and every MINUCB variant (:mod:`jaxq.bandits.algorithms`)."""

    def init(self, params, offline):
        return alg.init(params, offline)

    def act(self, key, params, state, contexts):
        return alg.act(key, params, state, contexts)

    def update(self, params, state, x, r, info):
        return alg.update(params, state, x, r)

    def refresh(self, params, state):
        return alg.refresh(params, state)

    def cert_ok(self, params, state, shift):
        return _certificate_holds(params, state, shift)


@dataclasses.dataclass(frozen=True)
class SupFamily:
    """SupLinUCB and its MINUCB version (:mod:`jaxq.bandits.suplinucb`) with ``stages`` stages."""

    stages: int

    def init(self, params, offline):
        return sup.init(params, offline, self.stages)

    def act(self, key, params, state, contexts):
        return sup.act(key, params, state, contexts)

    def update(self, params, state, x, r, info):
        return sup.update(params, state, x, r, info.stage)

    def refresh(self, params, state):
        return sup.refresh(params, state)

    def cert_ok(self, params, state, shift):
        return jnp.asarray(False)


def rollout_families(key: PRNGKeyArray, spec: BanditSpec, run: RunSpec, families: tuple, params: tuple,
                     problem: Problem) -> tuple[Record, tuple]:
    """Run several algorithm families (each a static family object with a parameter stack) on one
    replica and one shared stream. Records are concatenated along the algorithm axis, family by family.
    Consumes ``key`` (round t uses ``fold_in(key, t)``, see :func:`jaxq.bandits.env.sample_stream`)."""
    states = tuple(jax.vmap(f.init, in_axes=(0, None))(p, problem.offline) for f, p in zip(families, params))
    A = sum(p_leaf.shape[0] for p_leaf in (jax.tree.leaves(p)[0] for p in params))
    dtype = problem.theta.dtype
    shift = problem.theta_off - problem.theta

    def one_round(carry, t):
        states, cum_regret, pooled, viol_on, viol_pool, eval_on, eval_pool = carry
        draw = draw_round(round_key(key, t), spec, problem)
        means = draw.contexts @ problem.theta
        new_states, regrets, used, v_on, v_pool, e_on, e_pool = [], [], [], [], [], [], []
        for f, p, st in zip(families, params, states):
            arms, info = jax.vmap(f.act, in_axes=(None, 0, 0, None))(draw.tie_key, p, st, draw.contexts)
            rewards = means[arms] + draw.noise
            new_states.append(jax.vmap(f.update)(p, st, draw.contexts[arms], rewards, info))
            regrets.append(jnp.max(means) - means[arms])
            used.append(info.pooled_used.astype(jnp.int32))
            m = means[None, :]
            v_on.append(jnp.sum((m > info.ucb_on) | (m < info.lcb_on), axis=-1, dtype=jnp.int32))
            v_pool.append(jnp.sum((m > info.ucb_pool) | (m < info.lcb_pool), axis=-1, dtype=jnp.int32))
            e_on.append(spec.K * jnp.isfinite(info.ucb_on[:, 0]).astype(jnp.int32))
            e_pool.append(spec.K * jnp.isfinite(info.ucb_pool[:, 0]).astype(jnp.int32))
        cat = jnp.concatenate
        carry = (tuple(new_states), cum_regret + cat(regrets), pooled + cat(used), viol_on + cat(v_on),
                 viol_pool + cat(v_pool), eval_on + cat(e_on), eval_pool + cat(e_pool))
        return carry, None

    def one_block(carry, block):
        states, cum_regret = carry
        zeros = jnp.zeros((A,), jnp.int32)
        ts = block * run.record_every + jnp.arange(run.record_every)
        inner = (states, cum_regret, zeros, zeros, zeros, zeros, zeros)
        (states, cum_regret, pooled, viol_on, viol_pool, eval_on, eval_pool), _ = jax.lax.scan(one_round, inner, ts)
        states = tuple(jax.vmap(f.refresh)(p, st) for f, p, st in zip(families, params, states))
        cert_ok = jnp.concatenate([jax.vmap(f.cert_ok, in_axes=(0, 0, None))(p, st, shift)
                                   for f, p, st in zip(families, params, states)])
        record = Record(regret=cum_regret, pooled=pooled, viol_on=viol_on, viol_pool=viol_pool,
                        eval_on=eval_on, eval_pool=eval_pool, cert_ok=cert_ok)
        return (states, cum_regret), record

    init_carry = (states, jnp.zeros((A,), dtype))
    (states, _), records = jax.lax.scan(one_block, init_carry, jnp.arange(run.blocks))
    return records, states


def rollout(key: PRNGKeyArray, spec: BanditSpec, run: RunSpec, params: alg.MinUCBParams,
            problem: Problem) -> tuple[Record, alg.MinUCBState]:
    """Run the algorithm stack ``params`` (leading axis A) on one replica. Consumes ``key`` (the stream:
    round t uses ``fold_in(key, t)``, see :func:`jaxq.bandits.env.sample_stream`)."""
    records, (states,) = rollout_families(key, spec, run, (MinUCBFamily(),), (params,), problem)
    return records, states


class Trace(NamedTuple):
    """Per-round outputs of :func:`rollout_actions` (leading axes: rounds T, algorithms A)."""

    arms: Int[Array, "T A"]
    pooled_used: Bool[Array, "T A"]
    regrets: Float[Array, "T A"]
    ucb_on: Float[Array, "T A K"]
    ucb_pool: Float[Array, "T A K"]


def rollout_actions(key: PRNGKeyArray, spec: BanditSpec, T: int, params: alg.MinUCBParams,
                    problem: Problem, refresh_every=50) -> tuple[Trace, alg.MinUCBState]:
    """Per-round trace of the stack ``params`` over ``T`` rounds, for tests against the reference (the
    experiments use :func:`rollout`, which records per block). Consumes ``key`` as :func:`rollout` does.
    ``refresh_every`` may be traced (it only enters the refresh predicate)."""
    states = jax.vmap(alg.init, in_axes=(0, None))(params, problem.offline)

    def one_round(states, t):
        draw = draw_round(round_key(key, t), spec, problem)
        means = draw.contexts @ problem.theta
        arms, info = jax.vmap(alg.act, in_axes=(None, 0, 0, None))(draw.tie_key, params, states, draw.contexts)
        rewards = means[arms] + draw.noise
        states = jax.vmap(alg.update)(params, states, draw.contexts[arms], rewards)
        # Same refresh schedule as rollout(): after every refresh_every-th round.
        states = jax.lax.cond((t + 1) % refresh_every == 0, jax.vmap(alg.refresh), lambda p, s: s, params, states)
        return states, Trace(arms, info.pooled_used, jnp.max(means) - means[arms], info.ucb_on, info.ucb_pool)

    states, trace = jax.lax.scan(one_round, states, jnp.arange(T))
    return trace, states
