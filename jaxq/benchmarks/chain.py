"""The yardstick of ``jaxq bench``: the simplest exact JAX simulation of M/M/c+M.

One integer (the number in system) and one float64 clock per replica, a jump chain with exponential
holding times: each step draws (one counter-based draw, two uniforms) the holding time and which of the three transitions fires (arrival,
service completion, abandonment), so every step is an event. ``vmap`` of a per-replica ``lax.scan``,
the layout the engines use. Nothing in it is specific to LLM serving,
so its events/s are what this machine and XLA allow for an exact chain, the ceiling the engines are
measured against (issue "Speed", target 2: the general path within 3x of it).

Its answer is checked against Erlang A (mean queue length, probability of abandonment) in the same
run, so a fast but wrong chain cannot set the bar.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ChainResult:
    replicas: int
    steps: int
    events: float  # total over replicas (every step is an event)
    compile_s: float
    run_s: float
    events_per_s: float
    mean_queue: float
    mean_queue_se: float
    p_abandon: float
    p_abandon_se: float
    erlang_a_queue: float
    erlang_a_abandon: float

    @property
    def z_queue(self) -> float:
        return (self.mean_queue - self.erlang_a_queue) / max(self.mean_queue_se, 1e-300)

    @property
    def z_abandon(self) -> float:
        return (self.p_abandon - self.erlang_a_abandon) / max(self.p_abandon_se, 1e-300)


def _one_replica(key, c: int, lam: float, mu: float, theta: float, steps: int, warmup_steps: int):
    """Per replica: time-integral of the queue (k - c)^+ and counts of arrivals and abandonments, over
    the steps after ``warmup_steps`` (the chain starts empty)."""

    def step(carry, i):
        k, q_int, t_obs, arrivals, abandons = carry
        # one counter-based draw per step gives both uniforms (cheaper than splitting the key)
        u_hold, u_which = jax.random.uniform(jax.random.fold_in(key, i), (2,))
        busy = jnp.minimum(k, c)
        queue = k - busy
        r_arr, r_dep, r_ab = lam, mu * busy, theta * queue
        total = r_arr + r_dep + r_ab
        hold = -jnp.log1p(-u_hold) / total
        u = u_which * total
        arrive = u < r_arr
        abandon = u >= r_arr + r_dep
        on = i >= warmup_steps
        q_int = q_int + jnp.where(on, queue * hold, 0.0)
        t_obs = t_obs + jnp.where(on, hold, 0.0)
        arrivals = arrivals + (on & arrive)
        abandons = abandons + (on & abandon & ~arrive)
        k = k + jnp.where(arrive, 1, -1)
        return (k, q_int, t_obs, arrivals, abandons), None

    init = (jnp.int32(0), jnp.float64(0.0), jnp.float64(0.0), jnp.int32(0), jnp.int32(0))
    (_, q_int, t_obs, arrivals, abandons), _ = jax.lax.scan(step, init, jnp.arange(steps))
    return q_int, t_obs, arrivals, abandons


def simplest_chain(c: int, lam: float, mu: float, theta: float, replicas: int, steps: int, seed: int = 0,
                   warmup_fraction: float = 0.25, devices=None) -> ChainResult:
    """Compile (AOT, timed apart) and run the chain on ``replicas`` replicas for ``steps`` events each,
    split over ``devices`` (default: one), as the bench splits the engines' replicas."""
    from ..testing.closed_forms import erlang_a

    if theta <= 0 and not lam < c * mu:
        raise ValueError(f"invalid chain: lam={lam} >= c*mu={c * mu} without abandonment is unstable")
    warmup = int(steps * warmup_fraction)
    local = jax.vmap(lambda k: _one_replica(k, c, lam, mu, theta, steps, warmup))
    if devices is None:
        fn = jax.jit(local)
    else:
        from jax.sharding import PartitionSpec as P

        from ..sim.batch import AXIS, shard

        fn = shard(local, devices, (P(AXIS),), P(AXIS))  # one device: plain jit
    keys = jax.random.split(jax.random.key(seed), replicas)
    t0 = time.perf_counter()
    compiled = fn.lower(keys).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(keys))
    run_s = time.perf_counter() - t0
    q_int, t_obs, arrivals, abandons = (np.asarray(v, float) for v in out)
    queue = q_int / t_obs
    p_ab = abandons / np.maximum(arrivals, 1)
    ref = erlang_a(c, lam, mu, theta)
    events = float(replicas) * steps
    return ChainResult(replicas=replicas, steps=steps, events=events, compile_s=compile_s, run_s=run_s,
                       events_per_s=events / run_s, mean_queue=float(queue.mean()),
                       mean_queue_se=float(queue.std(ddof=1) / np.sqrt(replicas)) if replicas > 1 else float("nan"),
                       p_abandon=float(p_ab.mean()),
                       p_abandon_se=float(p_ab.std(ddof=1) / np.sqrt(replicas)) if replicas > 1 else float("nan"),
                       erlang_a_queue=ref.mean_queue, erlang_a_abandon=ref.p_abandon)
