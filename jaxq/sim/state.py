"""Spec, params and state of the exact simulator, and the read-only view policies decide on.

* :class:`SimSpec` is static (Python ints: classes, GPUs, waiting-room capacity, decode buffers,
  mode convention); changing it recompiles.
* :class:`SimParams` holds every number as an array (rates, targets, horizon, warm-up), so a sweep over
  them is a ``vmap`` and reuses the compiled code.
* :class:`SimState` is the scan/while carry, grouped as diffrax groups its loop state: dynamics,
  then accumulators, then status.

Waiting jobs are kept individually in fixed-size rooms of entry times (oldest first) so that
FCFS *across* classes (one decode buffer shared by all classes; the FCFS gates) is exact; a full room
drops the job, counts it in ``LOST`` and raises the ``OVERFLOW`` status bit of that replica.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ..model.params import ModelParams

# Group of a GPU.
SOLO, MIXED, ANY = 0, 1, 2

# Rows of the per-class counters.
ARRIVED, ADMITTED, PREFILL_DONE, DECODE_STARTED, DECODE_DONE, ABANDON_PREFILL, ABANDON_DECODE, LOST, WAITED = range(9)
COUNTER_NAMES = ("arrived", "admitted", "prefill_done", "decode_started", "decode_done",
                 "abandon_prefill", "abandon_decode", "lost", "waited")
NUM_COUNTERS = len(COUNTER_NAMES)
# The counters that are events (arrivals, completions, abandonments): the engine-independent event count.
EVENT_ROWS = (ARRIVED, PREFILL_DONE, DECODE_DONE, ABANDON_PREFILL, ABANDON_DECODE)

# Rows of the per-class time integrals.
INT_QP, INT_X, INT_QD, INT_YM, INT_YS, INT_Y_MIXGROUP = range(6)
INTEGRAL_NAMES = ("Q_p", "X", "Q_d", "Y_m", "Y_s", "Y_mixgroup")

# Status bits (failures are data: reported per replica, never raised inside a batch).
OK, OVERFLOW, DECISIONS_INCOMPLETE, MAX_STEPS, NONFINITE, CAPACITY_VIOLATED = 0, 1, 2, 4, 8, 16
STATUS_NAMES = {OVERFLOW: "waiting room full (jobs lost)", DECISIONS_INCOMPLETE: "decision rounds exhausted",
                MAX_STEPS: "max_steps reached before the horizon", NONFINITE: "non-finite time or rate",
                CAPACITY_VIOLATED: "a GPU exceeded its slots or a count went negative (engine bug)"}


@dataclasses.dataclass(frozen=True)
class SimSpec:
    """Static shape and semantics constants.

    num_classes, num_gpus: I and n.
    room: capacity of each per-class waiting room (prefill queue, each decode buffer). A one-class
        model keeps no entry times (nothing to order across classes): its rooms are counts, unbounded.
    num_buffers: decode buffers (1 shared FCFS buffer; 2 for the SLI router's solo/mixed buffers).
    convention: "B" (paper eqs. 18-19: a decode runs at mu_m while its GPU runs a prefill) or "A"
        (decodes on mixed-group GPUs always at mu_m, on solo-group GPUs at mu_s).
    dtype: "float64" or "float32" for rates and random draws (faster on accelerators). Simulated
        time and the time integrals stay float64 whatever this says.
    """

    num_classes: int
    num_gpus: int
    room: int = 1024
    num_buffers: int = 1
    convention: Literal["A", "B"] = "B"
    dtype: Literal["float64", "float32"] = "float64"

    def __post_init__(self):
        for name, lo in (("num_classes", 1), ("num_gpus", 1), ("room", 1), ("num_buffers", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"invalid SimSpec field '{name}': must be an integer >= {lo}, got {v!r}")
        if self.num_buffers > 2:
            raise ValueError(f"invalid SimSpec field 'num_buffers': must be 1 or 2, got {self.num_buffers!r}")
        if self.dtype not in ("float64", "float32"):
            raise ValueError(f"invalid SimSpec field 'dtype': must be 'float64' or 'float32', got {self.dtype!r}")
        if self.convention not in ("A", "B"):
            raise ValueError(f"invalid SimSpec field 'convention': must be 'A' or 'B', got {self.convention!r}")


class PolicyTargets(eqx.Module):
    """Static-planning outputs as arrays (see :func:`jaxq.lp.static_plan`)."""

    num_mixed: Int[Array, ""]
    x_target: Float[Array, " I"]
    q_p_target: Float[Array, " I"]
    p_solo: Float[Array, " I"]
    priority: Float[Array, " I"]

    @classmethod
    def from_plan(cls, plan) -> "PolicyTargets":
        f = lambda v: jnp.asarray(v, dtype=jnp.float64)  # noqa: E731
        return cls(num_mixed=jnp.asarray(plan.num_mixed, dtype=jnp.int32), x_target=f(plan.x_target),
                   q_p_target=f(plan.q_p_target), p_solo=f(plan.p_solo), priority=f(plan.priority))


class SimParams(eqx.Module):
    model: ModelParams
    targets: PolicyTargets
    horizon: Float[Array, ""]
    warmup: Float[Array, ""]
    max_steps: Int[Array, ""]


class SimState(eqx.Module):
    # dynamics
    t: Float[Array, ""]
    step: Int[Array, ""]
    group: Int[Array, " n"]  # SOLO / MIXED / ANY (constant over a run: static planning)
    prefill_class: Int[Array, " n"]  # class of the running prefill, -1 if none
    decodes: Int[Array, "n I"]  # decode streams per GPU and class
    # aggregates kept in step with the per-GPU arrays by the only four functions that change a GPU
    ndec: Int[Array, " n"]  # decode streams per GPU
    X: Int[Array, " I"]  # running prefills per class
    Y_speed: Int[Array, "2 I"]  # decodes running at mu_m (row 0) and at mu_s (row 1)
    Y_pre: Int[Array, " I"]  # decodes on GPUs running a prefill (the paper's Y_m)
    Y_mixgroup: Int[Array, " I"]  # decodes on G_mix GPUs
    # waiting rooms: rings of entry times, the oldest at cell *_start, q_* live cells (engine.py, "rooms")
    queue: Float[Array, "I K"]  # entry times of waiting prefill jobs
    queue_start: Int[Array, " I"]
    q_p: Int[Array, " I"]  # waiting prefill jobs per class
    buffers: Float[Array, "NB I K"]  # entry times of waiting decodes
    buffer_start: Int[Array, "NB I"]
    q_d: Int[Array, "NB I"]
    next_arrival: Float[Array, " I"]  # absolute time of each class's next arrival (own random stream)
    # accumulators
    counts: Int[Array, "C I"]  # after the warm-up (rows: COUNTER_NAMES)
    integrals: Float[Array, "6 I"]  # time integrals after the warm-up (rows: INTEGRAL_NAMES)
    totals: Int[Array, "C I"]  # the same counters over the whole run, for conservation checks
    # status
    status: Int[Array, ""]


class View(eqx.Module):
    """What a policy may look at: the state plus derived capacities. Built once per decision."""

    n: int = eqx.field(static=True)
    B: Float[Array, ""]
    group: Int[Array, " n"]
    prefill_class: Int[Array, " n"]
    decodes: Int[Array, "n I"]
    free_decode: Int[Array, " n"]  # decode streams each GPU could still take now
    idle_prefill: Bool[Array, " n"]  # a prefill could start on this GPU now
    X: Int[Array, " I"]  # prefills running per class
    q_p: Int[Array, " I"]
    queue_head: Float[Array, " I"]  # entry time of each class's oldest waiting prefill job (+inf)
    q_d: Int[Array, "NB I"]
    buffer_head: Float[Array, "NB I"]
    # GPUs behind each row: None when a row is one GPU (the per-GPU engines); the population engine's
    # rows are GPU configurations, and a uniform choice among GPUs weighs each row by its count
    weight: Int[Array, " n"] | None = None


def gpu_groups(params: "SimParams", n: int, partitioned: bool):
    """Group of each GPU: the first ``num_mixed`` are G_mix, the rest G_solo (static planning); all
    "any" without a partition. Both engines rely on the groups being contiguous index ranges."""
    if partitioned:
        return jnp.where(jnp.arange(n) < params.targets.num_mixed, MIXED, SOLO).astype(jnp.int32)
    return jnp.full((n,), ANY, jnp.int32)


def runs_slow(convention: str, group, prefill_class):
    """Whether decodes on a GPU run at mu_m (True) or mu_s. Convention B (paper eqs. 18-19): while the
    GPU runs a prefill. Convention A: always on G_mix, never on G_solo (and B's rule on "any" GPUs)."""
    has_prefill = prefill_class >= 0
    if convention == "A":
        return (group == MIXED) | ((group == ANY) & has_prefill)
    return has_prefill


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


_SHORT = 32  # entries summed and compared whole


def first_argmin(x):
    """``jnp.argmin`` of a 1-D array (the first minimum) by two plain reductions, the minimum and then
    the least index attaining it: XLA's CPU argmin is a variadic (value, index) reduce, several times
    slower per entry (docs/simulation.md, "What a step costs"). Without a NaN the same index."""
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.minimum(jnp.min(jnp.where(x == jnp.min(x), index, x.shape[-1])), x.shape[-1] - 1)


def first_argmin_2d(x):
    """(row, column) of the first minimum of a 2-D array in row-major order, as ``divmod(jnp.argmin(
    x.ravel()), x.shape[1])`` would give: row minima (one plain pass), then :func:`first_argmin` over
    the rows, then over that row."""
    row = first_argmin(jnp.min(x, axis=1))
    return row, first_argmin(x[row])
