"""What a policy decides on: the read-only :class:`View` of a cluster and the static-planning
:class:`PolicyTargets`. Every engine builds these; policies never see an engine's own state.

GPU groups (static planning, MODEL.md §5.1): a G_mix GPU reserves one slot for a prefill and runs at
most B - 1 decodes; a G_solo GPU never prefills and runs at most B decodes; without a partition every
GPU is "any": at most B jobs, at most one of them a prefill.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

SOLO, MIXED, ANY = 0, 1, 2
GROUP_NAMES = {SOLO: "solo", MIXED: "mixed", ANY: "any"}


class PolicyTargets(eqx.Module):
    """Static-planning outputs as arrays (from :func:`jaxq.lp.static_plan`): the number of G_mix GPUs,
    the prefill occupancy and prefill queue targets n x_i* and n q_p,i*, the SLI router's solo
    probabilities p_solo,i and the prioritize-and-route priority D_i / P_i."""

    num_mixed: Int[Array, ""]
    x_target: Float[Array, " I"]
    q_p_target: Float[Array, " I"]
    p_solo: Float[Array, " I"]
    priority: Float[Array, " I"]

    @classmethod
    def from_plan(cls, plan) -> PolicyTargets:
        f = lambda v: jnp.asarray(v, dtype=jnp.float64)  # noqa: E731
        return cls(num_mixed=jnp.asarray(plan.num_mixed, dtype=jnp.int32), x_target=f(plan.x_target),
                   q_p_target=f(plan.q_p_target), p_solo=f(plan.p_solo), priority=f(plan.priority))


class View(eqx.Module):
    """The cluster as a policy sees it, built fresh for every decision.

    Rows are GPUs on the per-GPU engines; on the population engine a row is a GPU *configuration*
    (group, running prefill, decodes per class) and ``weight`` counts the GPUs in it, so a policy
    that picks "a uniform GPU among ..." must weigh rows by ``weight`` (the helpers of
    :mod:`jaxq.policies.choice` do). ``n`` is the number of GPUs, not of rows.

    On the time-stepped engine the waiting rooms are counts, so ``queue_head`` and ``buffer_head``
    are not entry times but a random race (each class's head is an exponential with rate its count):
    the oldest head is then a class drawn in proportion to its waiting jobs (random order of service
    across classes, docs/time-stepped.md).
    """

    n: int = eqx.field(static=True)
    B: Float[Array, ""]
    group: Int[Array, " rows"]
    prefill_class: Int[Array, " rows"]  # class of the running prefill, -1 if none
    decodes: Int[Array, "rows I"]
    free_decode: Int[Array, " rows"]  # decode streams each GPU could still take now (0 on empty rows)
    idle_prefill: Bool[Array, " rows"]  # a prefill could start on this GPU now
    X: Int[Array, " I"]  # prefills running per class
    q_p: Int[Array, " I"]
    queue_head: Float[Array, " I"]  # entry time of each class's oldest waiting prefill job (+inf: none)
    q_d: Int[Array, "NB I"]
    buffer_head: Float[Array, "NB I"]
    # GPUs behind each row: None when every row is one GPU (the per-GPU engines)
    weight: Int[Array, " rows"] | None = None
