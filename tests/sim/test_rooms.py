"""The waiting rooms (rings of entry times, jaxq.sim.rooms) against plain Python lists.

A room must behave as a FIFO list per class from which any entry can also be removed: a push appends
(or is refused when the room is full), taking the head removes the oldest, and an abandonment removes
entry ``pos``, the others keeping their order; cells holding no entry hold +inf. Random operation sequences on small rings (so the
cells wrap around many times) are replayed on both and compared after every operation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.sim import rooms as E


class _Rooms:
    """Just the fields the room functions touch."""

    def __init__(self, rows, width):
        self.queue = jnp.full((rows, width), jnp.inf)
        self.queue_start = jnp.zeros((rows,), jnp.int32)
        self.q_p = jnp.zeros((rows,), jnp.int32)


jax.tree_util.register_pytree_node(
    _Rooms, lambda r: ((r.queue, r.queue_start, r.q_p), None),
    lambda _, ch: _from_children(*ch))


def _from_children(queue, start, count):
    r = object.__new__(_Rooms)
    r.queue, r.queue_start, r.q_p = queue, start, count
    return r


def _live(state, row):
    """The live entries of a ring, oldest first; every other cell must hold +inf (no stale values)."""
    cells, start, count = (np.asarray(x) for x in (state.queue[row], state.queue_start[row], state.q_p[row]))
    width = cells.shape[0]
    live = [(int(start) + k) % width for k in range(int(count))]
    assert np.all(np.isinf(np.delete(cells, live)))
    return [float(cells[i]) for i in live]


@jax.jit
def _apply(state, op, row, pos, time):
    pushed, lost = E.room_push(state, "queue", row, time, op == 0)
    popped = E.room_pop(state, "queue", row, (op == 1) & (state.q_p[row] > 0))
    removed = E.room_remove(state, "queue", row, pos, (op == 2) & (state.q_p[row] > 0))
    pick = lambda *xs: jnp.select([op == 0, op == 1], xs[:2], xs[2])  # noqa: E731
    return jax.tree_util.tree_map(pick, pushed, popped, removed), lost & (op == 0)


@pytest.mark.parametrize("width", [1, 3, 7])
@pytest.mark.parametrize("seed", [0, 1])
def test_rings_behave_as_lists(width, seed):
    rng = np.random.default_rng(seed)
    rows = 2
    state = _Rooms(rows, width)
    lists = [[] for _ in range(rows)]
    t = 0.0
    for _ in range(300):
        op, row = int(rng.integers(3)), int(rng.integers(rows))
        pos = int(rng.integers(max(len(lists[row]), 1)))
        t += 1.0
        state, lost = _apply(state, jnp.int32(op), jnp.int32(row), jnp.int32(pos), jnp.float64(t))
        if op == 0:
            assert bool(lost) == (len(lists[row]) >= width)
            if not lost:
                lists[row].append(t)
        elif lists[row]:
            lists[row].pop(0 if op == 1 else pos)
        for r in range(rows):
            assert _live(state, r) == lists[r], (op, r, pos)
        heads = np.asarray(E.room_heads(state, "queue"))
        assert list(heads) == [lst[0] if lst else np.inf for lst in lists]


def test_a_width_zero_room_keeps_counts():
    state = _Rooms(1, 0)
    for op, expect in ((0, 1), (0, 2), (1, 1), (2, 0)):
        state, lost = _apply(state, jnp.int32(op), jnp.int32(0), jnp.int32(0), jnp.float64(1.0))
        assert not bool(lost) and int(state.q_p[0]) == expect
    assert float(E.room_heads(state, "queue")[0]) == np.inf
