"""A while loop that batches without selecting its carry, and a branch that batches without running
its update for every replica (:func:`skip_unless`).

``jax.vmap`` of ``lax.while_loop`` with a per-replica predicate runs until every replica is done and,
at every iteration, keeps each finished replica's carry with a select over every carry leaf: a full
pass over the state per iteration, whatever the body touched. For an event engine whose state holds
waiting rooms of thousands of cells per class, those passes are most of the memory traffic of a step
(measured: canonical n = 500, R = 64, the two room selects and their copies move more bytes than the
event itself).

:func:`lockstep_while` is the same loop for a body that is already a no-op on a carry whose predicate
is false (the event engines mask every update by whether the replica still runs). Its batching rule
runs the vmapped body while any replica's predicate holds and keeps the body's output as it is: no
select. The rule calls :func:`lockstep_while` again, so nested vmaps (points x replicas in a sweep)
are each handled the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _batched(tree, batched, axis_size):
    """``tree`` with its unbatched leaves broadcast along a new leading axis of ``axis_size``."""
    return jax.tree_util.tree_map(
        lambda x, b: x if b else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x)), tree, batched)


def lockstep_while(cond, body, args, state):
    """``lax.while_loop(lambda s: cond(args, s), lambda s: body(args, s), state)``.

    Precondition (the caller's): ``body(args, s)`` returns ``s`` unchanged, bit for bit, whenever
    ``cond(args, s)`` is false. ``args`` and ``state`` are pytrees of arrays; ``cond`` and ``body``
    must not close over traced values (pass them in ``args``)."""

    @jax.custom_batching.custom_vmap
    def loop(args, state):
        return jax.lax.while_loop(lambda s: cond(args, s), lambda s: body(args, s), state)

    @loop.def_vmap
    def loop_batched(axis_size, in_batched, args, state):
        args_batched, state_batched = in_batched
        state = _batched(state, state_batched, axis_size)
        axes = jax.tree_util.tree_map(lambda b: 0 if b else None, args_batched)
        vcond = jax.vmap(cond, in_axes=(axes, 0))
        vbody = jax.vmap(body, in_axes=(axes, 0))
        # a replica whose predicate is false is left as it is by the body: the batch is done when
        # none holds, and a batched body is again a no-op where the batch's predicate is false
        out = lockstep_while(lambda a, s: jnp.any(vcond(a, s)), vbody, args, state)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return loop(args, state)


def skip_unless(pred, fn, consts, state):
    """``fn(consts, state)`` where ``pred`` holds, ``state`` itself otherwise; batched, ``fn`` runs (for
    the whole batch) only if some replica's ``pred`` holds.

    Precondition (the caller's): ``fn(consts, state)`` returns ``state`` unchanged, bit for bit,
    whenever ``pred`` is false (``fn`` masks its own update with a flag it finds in its arguments), and
    ``fn`` closes over no traced values (pass them in ``consts``, which it only reads). Under ``vmap``
    a ``lax.cond`` on a per-replica predicate becomes a select that runs both branches for every
    replica; this rule branches once on ``any(pred)`` instead, so a rare O(room) or O(n) update (an
    abandonment's shift of a waiting room, a drain of empty buffers) costs nothing in the steps where
    no replica of the batch needs it. It calls :func:`skip_unless` again, so nested vmaps (points x
    replicas in a sweep) branch on the whole batch. Unbatched ``consts`` stay unbatched (a shared
    table is not copied per replica)."""

    @jax.custom_batching.custom_vmap
    def run(pred, consts, state):
        return jax.lax.cond(pred, fn, lambda c, s: s, consts, state)

    @run.def_vmap
    def run_batched(axis_size, in_batched, pred, consts, state):
        pred_batched, consts_batched, state_batched = in_batched
        state = _batched(state, state_batched, axis_size)
        axes = jax.tree_util.tree_map(lambda b: 0 if b else None, consts_batched)
        out = skip_unless(jnp.any(pred) if pred_batched else pred, jax.vmap(fn, in_axes=(axes, 0)), consts, state)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return run(pred, consts, state)
