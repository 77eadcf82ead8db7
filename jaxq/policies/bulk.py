"""Bulk choices for a time step: the fast forms of the built-in rules' per-job decisions.

A time-stepped engine makes a step's decisions together: many jobs join free slots at once. Drawing
one uniform GPU per job would cost O(n) each; these helpers place a whole block of jobs in one pass
(``place``), split a count among classes in proportion (``allocate``) and draw the Poisson and
binomial counts of a step cheaply (``count_draw``). Every function consumes only the uniforms given.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_I32 = jnp.int32


def per_class(cls, num):
    """Counts per class of the entries of ``cls`` (-1 entries count for nothing): (num,), int32.
    Engines and bulk rules count a step's jobs with this one formula, so that XLA merges the
    repeated counts of the same array (common subexpressions) instead of streaming it again."""
    return jnp.sum(cls[None, :] == jnp.arange(num)[:, None], axis=1, dtype=_I32)


def prefix_sum(x):
    """Inclusive prefix sum along the last axis. XLA:CPU's cumsum costs ~9 elementwise passes; the
    parallel scan about half that (measured: 0.9 vs 0.44 ms for 256 x 500 int32)."""
    return jax.lax.associative_scan(jnp.add, x, axis=x.ndim - 1)


def stack_rows(rows):
    """``jnp.stack(rows)`` for 1-d rows of one shape, built as selects over the row index: XLA:CPU emits a
    concatenate of computed rows as a loop that branches per element, with the rows' whole computation
    fused into it (measured several times slower on a step's per-GPU rows)."""
    index = jnp.arange(len(rows))[:, None]
    out = rows[-1][None, :]
    for i in range(len(rows) - 2, -1, -1):
        out = jnp.where(index == i, rows[i][None, :], out)
    return out


def allocate(u, counts, k):
    """Split ``k`` jobs among classes holding ``counts`` (k <= sum) in proportion, by systematic
    sampling with one uniform: each class gets floor or ceil of its share and never more than it has.
    The bulk form of "the next job is of a class drawn in proportion to its waiting count", applied k
    times (random order of service across classes)."""
    cum = jnp.cumsum(counts).astype(jnp.float64)
    total = cum[-1]
    scale = jnp.where(total > 0, k / jnp.where(total > 0, total, 1.0), 0.0)
    edges = jnp.floor(jnp.concatenate([jnp.zeros(1), cum]) * scale + u)
    return (edges[1:] - edges[:-1]).astype(_I32)


def place(u, blocks, free, masks, rooms=None, offsets=None):
    """Give jobs to GPUs with ``free`` slots: the bulk form of "a uniformly random GPU of the group
    with a free slot", for a whole block of jobs at once.

    ``masks`` are G disjoint groups of GPUs, each a contiguous index range (as static planning lays
    them out), ``rooms`` their free slots and ``offsets`` the free slots of the GPUs before each group
    (so a group's slots are numbered from 0; both computed here when not given), and ``blocks[j, c]``
    class-c jobs go to group j (sum_c blocks[j] <= the group's free slots). Within a group the jobs
    take consecutive free slots (GPU by GPU) from a uniformly random free slot, wrapping, class blocks
    in order: a single job lands on a GPU with probability proportional to its free slots (uniformly
    among idle GPUs for prefills), and the whole placement is one prefix sum over all GPUs, not one
    draw per job. (Starting at a random *GPU* instead favours free GPUs behind long runs of full ones,
    which measurably biased the coupled policies.) ``u``: G uniforms. Returns the (I, n) jobs per GPU.

    Every GPU reads its own group's numbers (a select per GPU), so the class loop runs once for all
    groups, not once per group."""
    num_groups, num = blocks.shape
    excl = prefix_sum(free) - free
    if rooms is None:
        rooms = [jnp.sum(jnp.where(mk, free, 0)) for mk in masks]
    if offsets is None:
        offsets = [excl[jnp.argmax(mk)] for mk in masks]
    rooms = [jnp.asarray(r).astype(_I32) for r in rooms]
    offsets = [jnp.asarray(o).astype(_I32) for o in offsets]

    def per_gpu(vals):  # a scalar per group -> the value of each GPU's group (0 outside every group)
        out = jnp.where(masks[num_groups - 1], vals[num_groups - 1], 0)
        for j in range(num_groups - 2, -1, -1):
            out = jnp.where(masks[j], vals[j], out)
        return out

    starts = [jnp.minimum(jnp.floor(u[j] * rooms[j]).astype(_I32), jnp.maximum(rooms[j] - 1, 0))
              for j in range(num_groups)]
    room = per_gpu(rooms)
    lo_slot = excl - per_gpu(offsets)  # the group's slots before each of its GPUs
    hi_slot = lo_slot + free
    inside = masks[0]
    for j in range(1, num_groups):
        inside = inside | masks[j]
    out = []
    lo_g = starts
    for c in range(num):
        hi_g = [lo_g[j] + blocks[j, c] for j in range(num_groups)]
        lo, hi = per_gpu(lo_g), per_gpu(hi_g)
        # the job range [lo, hi) may run past the group's last slot and wrap to its first
        got = (jnp.maximum(jnp.minimum(hi_slot, hi) - jnp.maximum(lo_slot, lo), 0)
               + jnp.maximum(jnp.minimum(hi_slot + room, hi) - jnp.maximum(lo_slot + room, lo), 0))
        out.append(jnp.where(inside, got, 0).astype(_I32))
        lo_g = hi_g
    return stack_rows(out)


_INVERSION_TERMS = 64
_INVERSION_MAX_MEAN = 25.0


def count_draw(u, mean, count=None):
    """Poisson(mean) (``count`` None) or Binomial(count, mean/count) from uniforms ``u``, elementwise.

    jax.random.poisson/binomial run rejection loops that cost ~0.3 ms per call on a batched CPU step,
    more than everything else these few draws feed. Here: inverse CDF over the first 64 terms when the
    mean is at most 25 (the mass beyond them is below 1e-11), and a rounded normal with the same mean
    and variance above (where the step's counts are sums of many small contributions)."""
    # the pmf by its term ratios pmf(k)/pmf(k-1) (a running product, no transcendental per term), the
    # first ratio set to 1 rather than a 1 concatenated in front: XLA:CPU emits a concatenate of
    # computed values as a loop that branches per element, which made these draws twice as costly
    shape = (1,) * mean.ndim + (_INVERSION_TERMS,)
    ks = np.arange(_INVERSION_TERMS).reshape(shape)
    inv = jnp.asarray(1.0 / np.maximum(ks, 1), mean.dtype)  # 1/k (k >= 1)
    lead = jnp.asarray(ks == 0)
    m = mean[..., None]
    if count is None:
        first = jnp.exp(-mean)
        ratio = jnp.where(lead, 1.0, m * inv)
        var = mean
        cap = jnp.full(mean.shape, jnp.inf, mean.dtype)
    else:
        q = count.astype(mean.dtype)
        p = jnp.clip(mean / jnp.maximum(q, 1.0), 0.0, 1.0)
        p_ = jnp.minimum(p, 1.0 - 1e-12)
        first = jnp.exp(q * jnp.log1p(-p_))
        odds = (p_ / (1.0 - p_))[..., None]
        ratio = jnp.where(lead, 1.0, jnp.maximum(q[..., None] - jnp.asarray(ks - 1, mean.dtype), 0.0) * inv * odds)
        var = mean * (1.0 - p)
        cap = q
    pmf = first[..., None] * jnp.cumprod(ratio, axis=-1)
    cdf = jnp.cumsum(pmf, axis=-1)
    small = jnp.sum(u[..., None] > cdf, axis=-1).astype(mean.dtype)
    z = jax.scipy.special.ndtri(jnp.clip(u, 1e-12, 1 - 1e-12))
    large = jnp.round(mean + jnp.sqrt(jnp.maximum(var, 0.0)) * z)
    k = jnp.where(mean <= _INVERSION_MAX_MEAN, small, large)
    return jnp.clip(k, 0, cap).astype(_I32)


def race(key, counts):
    """Pseudo head times for rooms kept as counts: class c's head is an exponential with rate its count
    (+inf when empty), so the oldest head is a class drawn in proportion to its waiting jobs. Consumes
    ``key``."""
    return race_from(jax.random.uniform(key, counts.shape), counts)


def race_from(u, counts):
    """:func:`race` from its uniforms ``u`` (drawn as ``race`` draws them, when made ahead)."""
    return jnp.where(counts > 0, -jnp.log(u) / jnp.maximum(counts, 1), jnp.inf)
