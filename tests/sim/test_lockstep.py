"""lockstep_while: the batched loop without per-leaf selects equals vmap of lax.while_loop."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.sim.lockstep import lockstep_while


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
