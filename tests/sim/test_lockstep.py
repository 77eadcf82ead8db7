"""lockstep_while: the batched loop without per-leaf selects equals vmap of lax.while_loop; skip_unless:
the batched branch on any replica's predicate equals vmap of a per-replica select."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.sim.lockstep import lockstep_while, skip_unless


def _cond(args, s):
    limit, _ = args
    return s["i"] < limit


def _body(args, s):
    # a no-op where the condition is false (lockstep_while's precondition): every update is masked
    limit, scale = args
    run = s["i"] < limit
    return {"i": s["i"] + run.astype(jnp.int32),
            "x": jnp.where(run, s["x"] * scale + 1.0, s["x"]),
            "room": s["room"].at[jnp.minimum(s["i"], 7)].set(jnp.where(run, s["x"][0], s["room"][jnp.minimum(s["i"], 7)]))}


def _plain(args, s):
    return jax.lax.while_loop(lambda c: _cond(args, c), lambda c: _body(args, c), s)


def _start(r):
    return {"i": jnp.zeros((r,), jnp.int32), "x": jnp.ones((r, 3)), "room": jnp.zeros((r, 8))}


def test_equals_vmapped_while_loop_with_batched_and_shared_arguments():
    limits = jnp.array([0, 3, 7, 12, 1])  # different trip counts, one replica that never runs
    scale = jnp.float64(0.5)
    want = jax.vmap(_plain, in_axes=((0, None), 0))((limits, scale), _start(5))
    got = jax.jit(jax.vmap(lambda a, s: lockstep_while(_cond, _body, a, s), in_axes=((0, None), 0)))((limits, scale), _start(5))
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
    np.testing.assert_array_equal(np.asarray(got["i"]), np.asarray(limits))


def test_nested_vmaps_and_an_unbatched_state_leaf():
    """points x replicas, as a sweep batches; the state's "x" starts shared by every replica."""
    limits = jnp.array([[1, 4], [6, 0], [2, 2]])

    def one(limit, i0, room0):
        s = {"i": i0, "x": jnp.ones((3,)), "room": room0}
        return lockstep_while(_cond, _body, (limit, jnp.float64(1.5)), s)

    def plain(limit, i0, room0):
        return _plain((limit, jnp.float64(1.5)), {"i": i0, "x": jnp.ones((3,)), "room": room0})

    i0 = jnp.zeros((3, 2), jnp.int32)
    room0 = jnp.zeros((3, 2, 8))
    want = jax.vmap(jax.vmap(plain))(limits, i0, room0)
    got = jax.jit(jax.vmap(jax.vmap(one)))(limits, i0, room0)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))


def test_unbatched_call_is_the_plain_loop():
    s = {"i": jnp.int32(0), "x": jnp.ones((3,)), "room": jnp.zeros((8,))}
    args = (jnp.int32(5), jnp.float64(2.0))
    got, want = lockstep_while(_cond, _body, args, s), _plain(args, s)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))


def _shift(where, room):
    # a no-op where the flag is false (skip_unless's precondition): the update is masked by it
    pos, do = where
    cell = jnp.arange(room.shape[0])
    moved = jnp.where(cell >= pos, jnp.roll(room, -1).at[-1].set(-1.0), room)
    return jnp.where(do, moved, room)


def _selected(room, pos, do):
    return jnp.where(do, _shift((pos, True), room), room)


def test_skip_unless_equals_a_per_replica_select_batched_nested_and_alone():
    room = jnp.arange(24.0).reshape(3, 8)
    pos = jnp.array([2, 0, 7])
    for do in (jnp.array([True, False, True]), jnp.array([False, False, False])):  # some replicas; none
        want = jax.vmap(_selected)(room, pos, do)
        got = jax.jit(jax.vmap(lambda r, p, d: skip_unless(d, _shift, (p, d), r)))(room, pos, do)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # points x replicas, a room shared by all replicas (unbatched state) and a shared position (unbatched const)
    do2 = jnp.array([[True, False, False], [False, False, False]])
    pos2 = jnp.array([[1, 3, 5], [0, 6, 2]])
    for p2 in (pos2, jnp.int32(3)):
        axes = 0 if jnp.ndim(p2) else None
        want = jax.vmap(jax.vmap(lambda p, d: _selected(room[0], p, d), in_axes=(axes, 0)), in_axes=(axes, 0))(p2, do2)
        got = jax.jit(jax.vmap(jax.vmap(lambda p, d: skip_unless(d, _shift, (p, d), room[0]), in_axes=(axes, 0)),
                               in_axes=(axes, 0)))(p2, do2)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for d in (True, False):
        alone = skip_unless(jnp.bool_(d), _shift, (jnp.int32(4), jnp.bool_(d)), room[1])
        np.testing.assert_array_equal(np.asarray(alone), np.asarray(_selected(room[1], jnp.int32(4), jnp.bool_(d))))


def test_skip_unless_branches_once_on_the_whole_batch():
    """Batched, the update sits behind one branch on an unbatched predicate, any(pred): no select."""
    jaxpr = jax.make_jaxpr(jax.vmap(lambda r, p, d: skip_unless(d, _shift, (p, d), r)))(
        jnp.zeros((4, 8)), jnp.zeros((4,), jnp.int32), jnp.zeros((4,), bool))
    names = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    assert names == ["reduce_or", "custom_vmap_call"], names
    call = jaxpr.jaxpr.eqns[1]
    assert call.invars[0] is jaxpr.jaxpr.eqns[0].outvars[0] and call.invars[0].aval.shape == ()
    inner = [e.primitive.name for e in call.params["call"].jaxpr.eqns]
    assert inner[-1] == "cond" and "select_n" not in inner, inner  # (a convert of the predicate first)
