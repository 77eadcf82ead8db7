"""The choices every rule is built from: uniform and weighted picks among GPUs, argmin with ties, FCFS
across classes. Pure functions of arrays; each consumes only the key or uniform it is given."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_SHORT = 32  # entries summed and compared whole by weighted_search


def weighted_search(weights, v):
    """``jnp.searchsorted(jnp.cumsum(weights), v, side="right")`` for weights >= 0 along one axis: the
    entry whose cumulative interval holds ``v`` (len(weights) when v >= the total).

    A step needs this for every weighted or uniform choice, so it avoids a full prefix sum (on CPU
    ``jnp.cumsum`` compiles to a reduce-window, ~1.5 us per 500 entries per replica; a parallel scan
    is log2(n) passes). Long arrays go in two levels: per-block totals (one pass over the entries), the
    block holding v, then the prefix sum of that block alone, so the cost is one pass plus O(sqrt(n)).
    Short arrays are summed and compared whole (one fused pass; bisection would be a loop)."""
    n = weights.shape[-1]
    if n <= _SHORT:
        return jnp.searchsorted(jnp.cumsum(weights), v, side="right", method="compare_all")
    width = 1 << max(3, ((int(n) - 1).bit_length() + 1) // 2)  # a power of two near sqrt(n), >= 8
    num = -(-n // width)
    blocks = jnp.pad(weights, (0, num * width - n)).reshape(num, width)
    block_sum = jnp.sum(blocks, axis=1)
    block_cum = jnp.cumsum(block_sum)
    j = jnp.minimum(jnp.searchsorted(block_cum, v, side="right", method="compare_all"), num - 1)
    inner = jnp.cumsum(blocks[j]) + (block_cum[j] - block_sum[j])
    i = jnp.searchsorted(inner, v, side="right", method="compare_all")
    return jnp.minimum(j * width + i, n)


def uniform_choice(key, mask, weight=None):
    """Index of a uniformly random True entry of ``mask`` (-1 if none). O(len(mask)). With ``weight``
    (a count of GPUs per entry, :attr:`View.weight`), a uniform GPU among the entries' GPUs: entry j
    with probability proportional to mask_j x weight_j. Consumes ``key``."""
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
